"""Retrieval metrics: CMC top-k and mAP over the full ranking, in bounded memory.

Pure functions: tensors in, numbers out. Distances are computed for a chunk of queries at a
time, so memory is O(chunk x gallery), never O(queries x gallery).

Ties are broken *against* the query: a gallery item at exactly the same distance as a match
ranks ahead of it. Collapsed embeddings (e.g. all-zero ReLU outputs) therefore score as
badly as they retrieve, and the result does not depend on the gallery's storage order.
This is done without a second sort: queries are processed one label at a time, with the
gallery columns permuted so that non-matches come first, and a stable sort keeps that order
among equal distances.

With `leave_one_out` the query set *is* the gallery (item i queries with its own row i
excluded), the paper's protocol when the test set is both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import torch
import torch.nn.functional as F

Metric = Literal["l2", "cosine"]


def pairwise_distance(query: torch.Tensor, gallery: torch.Tensor, metric: Metric = "l2") -> torch.Tensor:
    """(B, D), (G, D) -> (B, G): squared L2 distance (same ranking as L2) or cosine distance."""
    if metric == "cosine":
        return 1.0 - F.normalize(query, dim=1) @ F.normalize(gallery, dim=1).T
    if metric != "l2":
        raise ValueError(f"metric: expected 'l2' or 'cosine', got {metric!r}")
    q2 = query.pow(2).sum(1, keepdim=True)  # (B, 1)
    g2 = gallery.pow(2).sum(1)  # (G,)
    return (q2 + g2 - 2.0 * query @ gallery.T).clamp_(min=0.0)


@dataclass(frozen=True)
class RetrievalResult:
    """Per-query outcomes; `summary` averages them over all or some queries."""

    average_precision: torch.Tensor  # (Q,) float
    hits: torch.Tensor  # (Q, len(topk)) bool: a match within the top k
    has_match: torch.Tensor  # (Q,) bool: queries with no match in the gallery are left out
    topk: tuple[int, ...]

    def summary(self, mask: torch.Tensor | None = None) -> dict[str, float]:
        """{"top1", "top5", ..., "mAP"} as fractions in [0, 1], and "n_queries"."""
        keep = self.has_match if mask is None else self.has_match & mask
        n = int(keep.sum())
        out: dict[str, float] = {}
        for j, k in enumerate(self.topk):
            out[f"top{k}"] = float(self.hits[keep, j].float().mean()) if n else float("nan")
        out["mAP"] = float(self.average_precision[keep].mean()) if n else float("nan")
        out["n_queries"] = n
        return out


def retrieve(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    *,
    leave_one_out: bool = False,
    metric: Metric = "l2",
    topk: Sequence[int] = (1, 5),
    chunk_size: int = 1024,
    max_chunk_elements: int = 1 << 24,
) -> RetrievalResult:
    """Rank the whole gallery for every query; returns per-query AP and top-k hits.

    query (Q, D), query_labels (Q,), gallery (G, D), gallery_labels (G,). A gallery item
    matches a query when their labels are equal.
    """
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"retrieval: query {tuple(query.shape)} and gallery {tuple(gallery.shape)} must be (N, D) with one D")
    for name, t in (("query", query), ("gallery", gallery)):
        if not torch.isfinite(t).all():
            raise ValueError(f"retrieval: {name} embeddings contain NaN or Inf")
    if leave_one_out and query.shape[0] != gallery.shape[0]:
        raise ValueError("retrieval: leave_one_out needs the query set to be the gallery (same length)")
    topk = tuple(topk)
    q_count, g_count = query.shape[0], gallery.shape[0]
    query, gallery = query.float(), gallery.float()
    ap = torch.zeros(q_count)
    hits = torch.zeros(q_count, len(topk), dtype=torch.bool)
    n_matches = torch.zeros(q_count, dtype=torch.long)
    chunk = max(1, min(chunk_size, max_chunk_elements // max(1, g_count)))
    ranks = torch.arange(1, g_count + 1, dtype=torch.float32)  # (G,)
    for label in torch.unique(query_labels):
        q_idx = torch.nonzero(query_labels == label).squeeze(1)
        is_match = gallery_labels == label
        # Non-matches first: the stable sort below then breaks distance ties against the query.
        perm = torch.cat([torch.nonzero(~is_match).squeeze(1), torch.nonzero(is_match).squeeze(1)])
        base = is_match[perm]  # (G,) bool: False..., True...
        g_perm = gallery[perm]
        position = torch.empty(g_count, dtype=torch.long)
        position[perm] = torch.arange(g_count)  # gallery index -> column in g_perm
        for start in range(0, len(q_idx), chunk):
            rows = q_idx[start : start + chunk]
            dist = pairwise_distance(query[rows], g_perm, metric)  # (B, G)
            match = base.expand(len(rows), g_count)
            if leave_one_out:
                # The query's own row goes to the very end and stops being a match.
                cols = position[rows]
                arange = torch.arange(len(rows))
                dist[arange, cols] = float("inf")
                match = match.clone()
                match[arange, cols] = False
            order = torch.sort(dist, dim=1, stable=True).indices  # (B, G)
            m = torch.gather(match, 1, order).float()  # (B, G): 1 where the ranked item matches
            cum = m.cumsum(1)
            count = cum[:, -1]
            ap[rows] = (m * cum / ranks).sum(1) / count.clamp(min=1)
            for j, k in enumerate(topk):
                hits[rows, j] = m[:, :k].any(1)
            n_matches[rows] = count.long()
    return RetrievalResult(average_precision=ap, hits=hits, has_match=n_matches > 0, topk=topk)


def evaluate_retrieval(
    query: torch.Tensor,
    query_labels: torch.Tensor,
    gallery: torch.Tensor,
    gallery_labels: torch.Tensor,
    **kwargs,
) -> dict[str, float]:
    """`retrieve(...).summary()`: {"top1", "top5", "mAP"} as fractions, and "n_queries"."""
    return retrieve(query, query_labels, gallery, gallery_labels, **kwargs).summary()
