"""Empirical privacy check: a loss-threshold membership-inference attack on one campus.

Attack (Yeom, Giacomelli, Fredrikson and Jha, "Privacy Risk in Machine
Learning: Analyzing the Connection to Overfitting", IEEE CSF 2018): a row is
guessed to be a training member when the model's loss on it is low. Sweeping
the threshold over every value gives the attack's ROC curve; its AUC is 0.5
for a model whose loss does not depend on membership and grows towards 1 as
the model memorises its training rows. DP-SGD bounds every such attack, so a DP
model's attack AUC should stay close to 0.5.

Members are a campus's training rows, non-members its held-out test rows (the
same distribution, never trained on). The larger group is subsampled, with a
fixed seed, to the size of the smaller one so the AUC is not skewed by the
80/20 split. The function needs only one campus's rows and the model, so a
campus can run it on its own machine and release only the AUC.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from edufl.federation.tasks import TaskData
from edufl.federation.training import row_loss

__all__ = ["loss_attack_auc", "per_example_loss"]


def per_example_loss(model: nn.Module, data: TaskData) -> np.ndarray:
    """The training loss (nats) of ``model`` on each row of ``data``, shape (n,): binary
    cross-entropy for a binary task, cross-entropy over the classes for ``final_result``."""
    model.eval()
    with torch.no_grad():
        return row_loss(model(torch.from_numpy(data.x)), torch.from_numpy(data.y)).numpy()


def loss_attack_auc(model: nn.Module, members: TaskData, non_members: TaskData, seed: int = 0) -> tuple[float, int]:
    """ROC AUC of the loss-threshold attack (score = −loss) telling ``members`` from ``non_members``.

    Both groups are cut to the size ``k`` of the smaller one by a seeded random
    subsample. Returns ``(auc, k)``; the AUC is NaN when either group is empty.
    """
    k = min(len(members), len(non_members))
    if k == 0:
        return float("nan"), 0
    rng = np.random.default_rng(seed)
    scores = []
    for group in (members, non_members):
        index = np.sort(rng.choice(len(group), size=k, replace=False))
        scores.append(-per_example_loss(model, group.take(index)))
    labels = np.r_[np.ones(k), np.zeros(k)]
    return float(roc_auc_score(labels, np.concatenate(scores))), k
