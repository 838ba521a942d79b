"""BCT (Shen et al. 2020), the baseline FCT is measured against.

The new model is trained with an influence loss through the *frozen old classifier*, so its
embeddings land where the old model's classifier expects old embeddings: comparable with the
old gallery, at the price of the new model's quality.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fct_ml.augment import to_float
from fct_ml.models import EmbeddingModel
from fct_ml.retrieval import Metric
from fct_ml.training import encode


@dataclass(frozen=True)
class BCTConfig:
    influence_weight: float = 1.0  # lambda in L = CE(new classifier) + lambda * CE(old classifier)
    # mu in + mu * ||phi_bct(x) - phi_old(x)||^2: pins the directions the influence loss leaves
    # free (losses.BCTObjective says why); 0 is the paper's BCT.
    alignment_weight: float = 1.0
    # BCT's cases (bct/old, bct/bct, and the cases they are compared with) are scored under
    # this metric: the criterion holds under cosine, not L2 (reproduce.bct_comparison).
    metric: Metric = "cosine"


def extended_old_classifier(
    old_model: EmbeddingModel,
    old_classes: Sequence[int],
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    num_classes: int,
    *,
    batch_size: int = 1024,
) -> torch.Tensor:
    """The old classifier over all `num_classes` classes: (num_classes, D).

    Rows of classes the old model saw are its classifier rows (its class i is
    `old_classes[i]`); a class it never saw gets the mean old embedding of its training
    items, as the BCT paper does for new classes. With a cosine classifier only directions
    count, so that mean is taken over the L2-normalised embeddings.
    """
    weight = old_model.classifier.weight.detach().float().cpu()  # (len(old_classes), D)
    rows = torch.zeros(num_classes, weight.shape[1])
    seen = {c: i for i, c in enumerate(old_classes)}
    unseen = [c for c in range(num_classes) if c not in seen]
    if unseen:
        mask = torch.isin(train_labels, torch.tensor(unseen))
        emb = encode(old_model, [train_images[mask]], batch_size=batch_size, transform=to_float)
        if old_model.config.classifier == "cosine":
            emb = torch.nn.functional.normalize(emb, dim=1)
        labels = train_labels[mask]
        for c in unseen:
            members = emb[labels == c]
            if len(members) == 0:
                raise ValueError(
                    f"BCT: class {c} has no training items to compute its mean old embedding"
                )
            rows[c] = members.mean(0)
    for c, i in seen.items():
        rows[c] = weight[i]
    return rows
