"""Reference computations for tests, written apart from the package: numpy, one query at a time."""

from __future__ import annotations

import numpy as np


def brute_force_retrieval(
    query: np.ndarray, gallery: np.ndarray, labels: np.ndarray
) -> dict[str, float]:
    """Leave-one-out retrieval (query i against every gallery row but i), squared L2 in float64:
    top-1, top-5 and mAP in percent. Ties rank a non-match ahead of a match (the project's rule).
    query, gallery (N, D); labels (N,)."""
    query, gallery = np.asarray(query, np.float64), np.asarray(gallery, np.float64)
    labels = np.asarray(labels)
    n = len(labels)
    top1 = top5 = ap = 0.0
    others = np.arange(n)
    for i in range(n):
        keep = others != i
        distance = ((gallery[keep] - query[i]) ** 2).sum(1)
        match = labels[keep] == labels[i]
        ranked = match[np.lexsort((match, distance))]  # by distance, non-matches first on ties
        top1 += ranked[0]
        top5 += ranked[:5].any()
        ranks = np.flatnonzero(ranked) + 1
        ap += (np.arange(1, len(ranks) + 1) / ranks).mean()
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "mAP": 100 * ap / n}


def brute_force_per_query(
    query: np.ndarray, gallery: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`brute_force_retrieval` per query: (top-1 right (N,) bool, AP (N,) in [0, 1])."""
    query, gallery = np.asarray(query, np.float64), np.asarray(gallery, np.float64)
    labels = np.asarray(labels)
    n = len(labels)
    right, ap = np.zeros(n, dtype=bool), np.zeros(n)
    others = np.arange(n)
    for i in range(n):
        keep = others != i
        distance = ((gallery[keep] - query[i]) ** 2).sum(1)
        match = labels[keep] == labels[i]
        ranked = match[np.lexsort((match, distance))]
        right[i] = ranked[0]
        ranks = np.flatnonzero(ranked) + 1
        ap[i] = (np.arange(1, len(ranks) + 1) / ranks).mean()
    return right, ap
