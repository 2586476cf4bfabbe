"""Privacy accounting for DP-SGD: noise calibration and ε over everything a campus released.

Mechanism: DP-SGD with Poisson subsampling, per-example clipping to
``max_grad_norm`` and Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm`` (Abadi et al., "Deep Learning with
Differential Privacy", CCS 2016). Accountant: Rényi DP of the subsampled
Gaussian mechanism (Mironov, Talwar and Zhang, "Rényi Differential Privacy of
the Sampled Gaussian Mechanism", 2019), as implemented by Opacus's
``RDPAccountant``; composition over steps, local epochs and rounds is RDP
composition of the full step history.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from opacus.accountants.utils import get_noise_multiplier

from .contract import PRIVACY_UNIT, PRIVACY_UNIT_SHORT

__all__ = [
    "ACCOUNTANT",
    "DPSettings",
    "History",
    "ORDERS",
    "PRIVACY_SCOPE",
    "PRIVACY_UNIT",
    "PRIVACY_UNIT_SHORT",
    "calibrate_noise",
    "client_level_epsilon",
    "epsilon",
    "poisson_plan",
]

ACCOUNTANT = "rdp"
ORDERS = tuple(RDPAccountant.DEFAULT_ALPHAS)
PRIVACY_SCOPE = (
    "ε covers the model updates each campus computed from its training rows. "
    "Evaluation metrics (AUC, AP, F1, Brier) on each campus's held-out test rows, the F1 "
    "threshold chosen on training rows, and the row counts n_train and n_test are released "
    "without noise and are not covered by ε."
)

History = list[tuple[float, float, int]]
"""Accountant history: (noise multiplier, sampling rate, number of steps) entries."""


@dataclass(frozen=True)
class DPSettings:
    """A campus's DP-SGD parameters for one run.

    Raises
    ------
    ValueError
        Unless ``target_epsilon`` > 0 and finite, 0 < ``delta`` < 1 and
        ``max_grad_norm`` > 0 and finite (privacy inputs fail closed).
    """

    target_epsilon: float
    delta: float
    max_grad_norm: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.target_epsilon) and self.target_epsilon > 0):
            raise ValueError(f"target-epsilon must be a finite number > 0, got {self.target_epsilon}")
        if not (0 < self.delta < 1):
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max-grad-norm must be a finite number > 0, got {self.max_grad_norm}")


def poisson_plan(n_examples: int, batch_size: int) -> tuple[float, int]:
    """(sampling rate q, steps per epoch) of DP-SGD's Poisson sampling over ``n_examples`` rows at expected
    batch ``batch_size``: exactly what Opacus's ``DPDataLoader`` runs for a plain loader of that batch size,
    ``q = 1 / ceil(n / batch_size)`` and ``int(1 / q)`` batches per epoch (which is one fewer than
    ``ceil(n / batch_size)`` wherever the division rounds down, e.g. 92 at n = 5,000, batch 54).

    Raises
    ------
    ValueError
        Unless ``n_examples`` and ``batch_size`` are >= 1.
    """
    if n_examples < 1 or batch_size < 1:
        raise ValueError(f"Poisson sampling needs n_examples and batch_size >= 1, got {n_examples}, {batch_size}")
    q = 1 / math.ceil(n_examples / batch_size)
    return q, int(1 / q)


@contextlib.contextmanager
def _best_order_is_largest_ok() -> Iterator[None]:
    # Opacus warns when the best RDP order is the largest one tried: the bound is then
    # looser than it could be, never smaller than the true ε.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def calibrate_noise(settings: DPSettings, n_examples: int, batch_size: int, epochs: int) -> float:
    """The smallest noise multiplier (Opacus's search, tolerance 0.01 in ε) such that ``epochs``
    epochs of DP-SGD over ``n_examples`` rows, at the sampling rate and steps of
    :func:`poisson_plan` (what the sampler runs), spend at most ``settings.target_epsilon`` at ``settings.delta``."""
    q, steps = poisson_plan(n_examples, batch_size)
    return _calibrated(settings, q, epochs * steps)


@functools.lru_cache(maxsize=256)
def _calibrated(settings: DPSettings, sample_rate: float, steps: int) -> float:
    # The search takes 0.2-1 s; campuses of similar size share (q, steps), so a
    # process serving many campuses (a simulation with many shards) searches once.
    with _best_order_is_largest_ok():
        return float(
            get_noise_multiplier(
                target_epsilon=settings.target_epsilon,
                target_delta=settings.delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=ACCOUNTANT,
            )
        )


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    # Rényi DP of one step at each order; composition over n steps multiplies by n.
    # Computing it is the costly part of accounting, and a campus's (σ, q) never
    # changes within a run, so it is computed once.
    rdp: np.ndarray = np.asarray(compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=ORDERS))
    rdp.setflags(write=False)
    return rdp


def epsilon(history: History, delta: float) -> float:
    """ε at ``delta`` spent by all steps in ``history`` (0.0 for an empty history, ∞ if any σ is 0).

    The same computation as Opacus's ``RDPAccountant.get_epsilon`` over that
    history (same orders, same conversion), with the per-step RDP cached.
    """
    if not history:
        return 0.0
    if any(float(s) == 0.0 for s, _, _ in history):
        return math.inf  # a release without noise has no finite guarantee
    rdp = sum(_rdp_per_step(float(s), float(q)) * int(n) for s, q, n in history)
    with _best_order_is_largest_ok():
        eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=delta)
    return float(eps)


def client_level_epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """Client-level ε at ``delta`` of central DP on the coordinator after ``rounds`` noised aggregations.

    Each round releases the mean of campus updates clipped to C plus Gaussian
    noise of standard deviation ``noise_multiplier`` · C / m (DP-FedAvg,
    McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private
    Recurrent Language Models", ICLR 2018), with campuses sampled at
    ``sample_rate`` (1.0: every campus, every round, so no amplification). The
    privacy unit is one whole campus (added or removed). Accountant: the
    sampled Gaussian mechanism's Rényi DP composed over ``rounds`` (Mironov,
    Talwar and Zhang 2019), Opacus's ``compute_rdp`` and ``get_privacy_spent``
    as in :func:`epsilon`. With adaptive clipping the noise multiplier is the
    effective one of Andrew et al. ("Differentially Private Learning with
    Adaptive Clipping", NeurIPS 2021, Theorem 1), which covers the noised
    clipped-count query too.
    """
    return epsilon([(noise_multiplier, sample_rate, rounds)], delta)
