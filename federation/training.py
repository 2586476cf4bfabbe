"""Local training (plain SGD or Opacus DP-SGD) and evaluation, shared by every mode.

The same functions train a campus's model inside the Flower ClientApp and in
the centralized and local-only baselines, so the modes differ only in which
rows they see and how weights are combined.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from scipy.stats import rankdata  # type: ignore[import-untyped]
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from .metrics import PRIMARY_METRIC, SUBGROUPS
from .privacy import History, poisson_plan
from .randomness import SECRET, Randomness, gaussian
from .schema import FederationSchema
from .tasks import TaskData, classes

__all__ = [
    "BOOTSTRAP_RESAMPLES",
    "Subgroup",
    "TrainResult",
    "average_precision",
    "best_f1_threshold",
    "binary_scores",
    "evaluate",
    "multiclass_scores",
    "precision_recall_curve",
    "predict",
    "row_loss",
    "subgroup_metrics",
    "train",
]


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one local training call.

    ``loss`` is the mean training loss (binary cross-entropy for one logit,
    cross-entropy over the classes for several; nats) over the batches of the
    call; ``history`` is the accountant history after it.
    """

    loss: float
    steps: int
    sample_rate: float
    history: History


def row_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Loss of each row, shape (n,), in nats: binary cross-entropy for logits of shape (n,),
    cross-entropy for logits of shape (n, classes) with ``y`` holding class indices."""
    if logits.ndim == 2:
        return F.cross_entropy(logits, y.long(), reduction="none")
    return F.binary_cross_entropy_with_logits(logits, y, reduction="none")


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Mean over the batch, and 0 (not NaN) for the empty batches Poisson sampling can draw.
    return row_loss(logits, y).sum() / max(len(y), 1)


class _Rows(TensorDataset):
    """A TensorDataset that gives a loader each batch by indexing every tensor once (torch's
    ``__getitems__``), not row by row; with :func:`_as_is` as the collate, the batches are those of
    ``TensorDataset`` and ``default_collate``."""

    def __getitems__(self, index: list[int]) -> list[torch.Tensor]:
        rows = torch.tensor(index, dtype=torch.long)
        return [t[rows] for t in self.tensors]


def _as_is(batch: list[torch.Tensor]) -> list[torch.Tensor]:
    return batch


class _SecretNoiseDPOptimizer(DPOptimizer):  # type: ignore[misc]  # Opacus ships no type information
    """Opacus's DP-SGD optimizer with its Gaussian noise drawn from ``rng`` (:func:`federation.randomness.gaussian`)
    instead of torch's generator; clipping, scaling and the accountant's step hook are Opacus's own."""

    def __init__(self, *args: Any, rng: np.random.Generator, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._rng = rng

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        noises = gaussian(self._rng, std, [tuple(p.summed_grad.shape) for p in self.params])
        for p, noise in zip(self.params, noises, strict=True):
            _check_processed_flag(p.summed_grad)
            p.grad = (p.summed_grad + torch.from_numpy(noise).to(p.summed_grad.dtype)).view_as(p)
            _mark_as_processed(p.summed_grad)


def train(
    model: nn.Module,
    data: TaskData,
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    noise_multiplier: float | None = None,
    max_grad_norm: float | None = None,
    history: History | tuple[()] = (),
    proximal_mu: float = 0.0,
    randomness: Randomness = SECRET,
) -> TrainResult:
    """Train ``model`` in place on ``data`` with SGD, or DP-SGD when ``noise_multiplier`` is given.

    DP-SGD (Abadi et al., CCS 2016) from Opacus's parts (``GradSampleModule``,
    ``DPDataLoader``, ``DPOptimizer``, the RDP accountant's step hook, as
    ``PrivacyEngine.make_private`` assembles them): Poisson sampling at the rate
    and for the steps of :func:`federation.privacy.poisson_plan`, per-example
    clipping to ``max_grad_norm``, Gaussian noise of std ``noise_multiplier *
    max_grad_norm``. Noise and sampling come from ``randomness`` (secret by
    default, :mod:`federation.randomness`), never from ``seed``, which orders
    the batches of plain SGD only. Every step, empty batches included, is added
    to the accountant history, which starts from ``history`` (the steps released
    in earlier rounds) so ε composes over the whole run; the returned
    ``sample_rate`` and ``steps`` are what the sampler ran. The model is wrapped
    afresh on each call, so Opacus hooks never stack across rounds.

    FedProx (Li et al., MLSys 2020): with ``proximal_mu`` > 0 each step also
    moves weights towards their starting values by ``learning_rate *
    proximal_mu * (w - w_start)``; that term does not depend on data, so it is
    applied after the private gradient step and costs no privacy.
    """
    dataset = _Rows(torch.from_numpy(data.x), torch.from_numpy(data.y))
    optimizer = torch.optim.SGD(model.parameters(), lr=learning_rate)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    model.train()
    net: nn.Module = model
    accountant = None
    losses, steps = [], 0
    with warnings.catch_warnings():
        # Opacus's backward hooks on the first layer, whose input needs no gradient.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        if noise_multiplier is None:
            torch.default_generator.manual_seed(seed)  # the shuffle follows torch's default (CPU) generator
            loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=_as_is)
        else:
            rng = randomness.generator()
            sample_rate, _ = poisson_plan(len(dataset), batch_size)
            sampler = torch.Generator().manual_seed(int(rng.integers(2**63)))
            loader = DPDataLoader(dataset, sample_rate=sample_rate, generator=sampler, collate_fn=_as_is)
            per_example: Any = GradSampleModule(model)  # Opacus's wrapper, untyped
            per_example.forbid_grad_accumulation()
            net = per_example
            optimizer = _SecretNoiseDPOptimizer(
                optimizer,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                expected_batch_size=int(len(dataset) * sample_rate),
                rng=rng,
            )
            accountant = RDPAccountant()
            accountant.history = list(history)
            optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
        for _ in range(epochs):
            for x, y in loader:
                optimizer.zero_grad()
                loss = _loss(net(x), y)
                loss.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
                steps += 1
                if len(y):
                    losses.append(loss.item())
                if anchor is not None:
                    with torch.no_grad():
                        for p, p0 in zip(model.parameters(), anchor, strict=True):
                            p.sub_(learning_rate * proximal_mu * (p - p0))
    if accountant is None:
        sample_rate, new_history = 1.0 / len(loader), list(history)
    else:
        new_history = [tuple(h) for h in accountant.history]
        per_example.remove_hooks()  # the caller's model leaves without Opacus hooks or attributes
        per_example.cleanup()
    return TrainResult(float(np.mean(losses)) if losses else float("nan"), steps, sample_rate, new_history)


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """Predicted probabilities: of the positive class, shape (n,), for a one-logit model;
    of each class, shape (n, classes), for a model with one logit per class."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        return (torch.softmax(logits, dim=1) if logits.ndim == 2 else torch.sigmoid(logits)).numpy().astype(np.float64)


def precision_recall_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision and recall of predicting positive at each distinct score of ``p`` and above, for labels ``y``
    (1 = positive, at least one; both shape (n,)): (precision, recall, thresholds), thresholds ascending and the
    two curves one longer, ending at (1, 0).

    The values of scikit-learn's ``precision_recall_curve`` (1.9, ``drop_intermediate=False``), computed as it
    does, without its input checks, which cost more than the curve on a campus's rows (as :func:`auc`).

    Raises
    ------
    ValueError
        When ``p`` holds NaN or an infinity (a diverged model), as scikit-learn does.
    """
    if not np.isfinite(p).all():
        raise ValueError("scores hold NaN or infinity; expected finite probabilities")
    order = np.argsort(-p, kind="stable")
    score, truth = p[order], y[order].astype(np.float64)
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]
    tps = np.cumsum(truth)[last]
    fps = 1 + last.astype(np.float64) - tps
    precision, recall = tps / (tps + fps), tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], score[last][::-1]


def average_precision(y: np.ndarray, p: np.ndarray) -> float:
    """Average precision of scores ``p`` for labels ``y`` (1 = positive, at least one; both shape (n,)): the step
    integral of :func:`precision_recall_curve`, as scikit-learn's ``average_precision_score``."""
    precision, recall, _ = precision_recall_curve(y, p)
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def best_f1_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Probability threshold maximising F1 on (y, p); 0.5 when y has no positives."""
    if y.sum() == 0 or len(y) == 0:
        return 0.5
    precision, recall, thresholds = precision_recall_curve(y, p)
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    return float(thresholds[int(np.argmax(f1))])


def binary_scores(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """Scores of positive-class probabilities ``p`` for labels ``y`` (1 = positive; both shape (n,)):
    ``auc`` (ROC), ``average_precision``, ``f1`` at ``threshold``, ``brier`` and ``loss``
    (BCE, nats). AUC and AP are NaN when ``y`` holds one class only; all but F1 are NaN on no rows."""
    y = y.astype(np.float64)
    both = 0 < y.sum() < len(y)
    pred = p >= threshold
    tp = float((pred & (y == 1)).sum())
    f1 = 2 * tp / max(pred.sum() + y.sum(), 1)
    eps = 1e-7
    return {
        "auc": auc(y, p),
        "average_precision": average_precision(y, p) if both else float("nan"),
        "f1": float(f1),
        "brier": float(np.mean((p - y) ** 2)) if len(y) else float("nan"),
        "loss": float(-np.mean(y * np.log(p + eps) + (1 - y) * np.log(1 - p + eps))) if len(y) else float("nan"),
    }


def multiclass_scores(y: np.ndarray, p: np.ndarray, classes: tuple[str, ...]) -> dict[str, float]:
    """Scores of class probabilities ``p`` (n, len(classes)) for class indices ``y`` (n,), predicting
    the most probable class.

    ``f1_<class>`` for each class (NaN for a class neither in ``y`` nor predicted);
    ``macro_f1``, their mean over the classes in ``y`` or predicted (as scikit-learn's
    ``f1_score(average="macro")``); ``accuracy``; ``macro_auc``, the mean one-vs-rest ROC AUC
    over the classes with both positive and negative rows (NaN if none); ``loss``
    (cross-entropy, nats). All are NaN on no rows.
    """
    y = y.astype(np.int64)
    pred = p.argmax(axis=1)
    f1 = {}
    for i, name in enumerate(classes):
        tp, counted = np.sum((pred == i) & (y == i)), np.sum(pred == i) + np.sum(y == i)
        f1[f"f1_{name}"] = float(2 * tp / counted) if counted else float("nan")
    aucs = [auc(y == i, p[:, i]) for i in range(len(classes)) if 0 < np.sum(y == i) < len(y)]
    present = [v for v in f1.values() if not np.isnan(v)]
    return {
        "macro_f1": float(np.mean(present)) if present else float("nan"),
        "accuracy": float(np.mean(pred == y)) if len(y) else float("nan"),
        "macro_auc": float(np.mean(aucs)) if aucs else float("nan"),
        **f1,
        "loss": float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-7))) if len(y) else float("nan"),
    }


def _scores(names: tuple[str, ...], y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    return multiclass_scores(y, p, names) if names else binary_scores(y, p, threshold)


def evaluate(
    model: nn.Module, train_data: TaskData, test_data: TaskData, task: str, schema: FederationSchema
) -> dict[str, float]:
    """Test-set metrics of ``model`` for ``task``: :func:`multiclass_scores` for a multiclass
    task (its classes: ``schema``'s outcomes); for a binary task :func:`binary_scores` at the threshold maximising
    F1 on ``train_data``, returned as ``threshold`` too."""
    p = predict(model, test_data.x)
    names = classes(task, schema)
    if names:
        return _scores(names, test_data.y, p, 0.5)
    threshold = best_f1_threshold(train_data.y, predict(model, train_data.x)) if len(train_data) else 0.5
    return {**_scores(names, test_data.y, p, threshold), "threshold": threshold}


class Subgroup(NamedTuple):
    """One subgroup's evaluation: its test rows (``n``), the task's primary metric on them (``value``) and
    that metric's 95 % percentile bootstrap interval (``low``, ``high``; NaN where it is undefined)."""

    n: int
    value: float
    low: float
    high: float


BOOTSTRAP_RESAMPLES = 200
"""Resamples of a subgroup's rows behind its bootstrap interval (:func:`subgroup_metrics`)."""


def auc(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC of scores ``p`` for labels ``y`` (1 = positive; both shape (n,)); NaN unless ``y`` holds both classes.

    The rank-sum (Mann-Whitney U) form, ties averaged: the value of scikit-learn's ``roc_auc_score``
    (to rounding), without its input checks, which cost more than the AUC on a campus's small subgroups."""
    return float(_resampled_auc(np.asarray(y, np.float64)[None], np.asarray(p)[None])[0])


def _resampled_auc(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    # ROC AUC of each row of (resamples, n) labels and scores, by the rank-sum (Mann-Whitney) formula, ties averaged.
    positives = y.sum(axis=1)
    negatives = y.shape[1] - positives
    ranks = rankdata(p, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(((ranks * y).sum(axis=1) - positives * (positives + 1) / 2) / (positives * negatives))


def _resampled_macro_f1(y: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    # Macro-F1 of each row of (resamples, n) class indices, as multiclass_scores computes it.
    f1 = np.full((y.shape[0], classes), np.nan)
    for c in range(classes):
        true_positives = ((y == c) & (predicted == c)).sum(axis=1)
        counted = (predicted == c).sum(axis=1) + (y == c).sum(axis=1)
        np.divide(2 * true_positives, counted, out=f1[:, c], where=counted > 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample without any class cannot occur: n >= 1
        return np.asarray(np.nanmean(f1, axis=1))


def _bootstrap_interval(
    multiclass: bool, y: np.ndarray, p: np.ndarray, rng: np.random.Generator, resamples: int
) -> tuple[float, float]:
    # 2.5th and 97.5th percentiles of the metric over resamples of the rows; NaN when over 5 % of the
    # resamples leave it undefined (an AUC resample with one class only).
    index = rng.integers(0, len(y), size=(resamples, len(y)))
    if multiclass:  # p: (n, classes)
        values = _resampled_macro_f1(y.astype(np.int64)[index], p.argmax(axis=1)[index], p.shape[1])
    else:
        values = _resampled_auc(y.astype(np.float64)[index], p[index])
    defined = values[np.isfinite(values)]
    if len(defined) < 0.95 * resamples:
        return float("nan"), float("nan")
    low, high = np.percentile(defined, [2.5, 97.5])
    return float(low), float(high)


def subgroup_metrics(
    model: nn.Module,
    test_data: TaskData,
    task: str,
    min_size: int,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
    *,
    schema: FederationSchema,
) -> dict[tuple[str, str], Subgroup]:
    """``task``'s primary metric (:data:`~federation.metrics.PRIMARY_METRIC`: AUC, or macro-F1)
    on each subgroup of ``test_data``'s rows: each value in ``schema``'s vocabulary of each field of
    :data:`~federation.metrics.SUBGROUPS` (gender, age band, disability, IMD band), with its 95 %
    percentile bootstrap interval over ``resamples`` resamples of the group's rows (Efron and
    Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 13), drawn from a generator seeded with ``seed``
    (``resamples`` = 0: no interval, NaN).

    Only groups of at least ``k = max(min_size, 1)`` rows are kept, and so that no
    smaller group's size can be recovered by subtracting the kept groups' sizes from
    ``len(test_data)``, an attribute's smallest kept groups are dropped too until the
    rows outside its kept groups (smaller groups, and rows with the attribute missing)
    number 0 or at least k (complementary suppression). The interval is computed on the
    kept group's rows only, like its metric.

    Returns
    -------
    dict
        ``(attribute, value) -> Subgroup(rows in the group, metric, interval low, interval high)`` for the kept groups.
    """
    p = predict(model, test_data.x)
    metric, k = PRIMARY_METRIC[task].replace("-", "_"), max(min_size, 1)
    rng = np.random.default_rng(seed)
    out = {}
    names = classes(task, schema)
    for attribute in SUBGROUPS:
        values = schema.vocabulary(attribute)
        column = test_data.rows[attribute].to_numpy(object)
        members = {value: np.flatnonzero(column == value) for value in values}
        kept = sorted((v for v in values if len(members[v]) >= k), key=lambda v: len(members[v]))
        while kept and 0 < len(test_data) - sum(len(members[v]) for v in kept) < k:
            kept.pop(0)
        for value in (v for v in values if v in kept):
            index = members[value]
            y, scores = test_data.y[index], p[index]
            low, high = _bootstrap_interval(bool(names), y, scores, rng, resamples) if resamples else (math.nan, math.nan)
            score = auc(y, scores) if metric == "auc" else _scores(names, y, scores, 0.5)[metric]
            out[(attribute, value)] = Subgroup(len(index), score, low, high)
    return out
