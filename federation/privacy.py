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
import itertools
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

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
    """The smallest noise multiplier, to within 0.01 in ε (the tolerance of Opacus's
    ``get_noise_multiplier``; for huge targets, within what float precision allows), such that
    ``epochs`` epochs of DP-SGD over ``n_examples`` rows, at the sampling rate and steps of
    :func:`poisson_plan` (what the sampler runs), spend at most ``settings.target_epsilon`` at
    ``settings.delta``, by :func:`epsilon` (all of :data:`ORDERS`).

    Raises
    ------
    ValueError
        When no noise multiplier up to 10⁶ meets the target (as Opacus's search).
    """
    q, steps = poisson_plan(n_examples, batch_size)
    return _calibrated(settings, q, epochs * steps)


_INTEGER_ORDERS = tuple(a for a in ORDERS if float(a).is_integer())
_TOLERANCE = 0.01  # in ε, as Opacus's get_noise_multiplier
_MAX_NOISE_MULTIPLIER = 1e6  # as Opacus's get_noise_multiplier


@functools.lru_cache(maxsize=256)
def _calibrated(settings: DPSettings, sample_rate: float, steps: int) -> float:
    # Opacus's bisection evaluates ε over all orders a dozen times; the fractional orders' series
    # make each evaluation cost 10-40 times one over the integer orders alone (0.5 s at q = 0.5).
    # The integer orders' ε is never below the full ε (a minimum over fewer orders), so the σ it
    # calls enough is enough: bisect on it to 0.1 % in σ, then close the last gap (about 1 % in ε)
    # with a few full evaluations (one to five seen), interpolating log ε against log σ. The σ
    # returned has been checked with epsilon() itself, the function the ledger accounts with.
    target, delta = settings.target_epsilon, settings.delta
    with _best_order_is_largest_ok():

        @functools.cache  # the bracket's ends are asked for again after the loops that found them
        def bound(sigma: float) -> float:
            with warnings.catch_warnings():  # the integer orders start at 2: the search may pass where 2 is best
                warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
                rdp = compute_rdp(q=sample_rate, noise_multiplier=sigma, steps=steps, orders=_INTEGER_ORDERS)
                return float(get_privacy_spent(orders=_INTEGER_ORDERS, rdp=rdp, delta=delta)[0])

        def full(sigma: float) -> float:
            return epsilon([(sigma, sample_rate, steps)], delta)

        low, high = 0.5, 1.0
        while bound(high) > target:
            if high >= _MAX_NOISE_MULTIPLIER:
                raise ValueError(f"no noise multiplier up to {_MAX_NOISE_MULTIPLIER:g} spends at most ε = {target:g}")
            low, high = high, min(2 * high, _MAX_NOISE_MULTIPLIER)
        while low > 1e-6 and bound(low) <= target:
            low, high = low / 2, low
        while high / low > 1.001:
            middle = math.sqrt(low * high)
            low, high = (middle, high) if bound(middle) > target else (low, middle)
        # -d log ε / d log σ, from the bound; the secant needs ε > 0, which a large δ can take below 0
        positive = bound(low) > 0 and bound(high) > 0
        slope = math.log(bound(low) / bound(high)) / math.log(high / low) if positive else math.nan
        spent = full(high)
        if spent > target:  # cannot hold while epsilon() minimises over a superset of the orders: fail closed
            raise RuntimeError(f"ε over all orders ({spent}) exceeds the integer orders' bound at noise multiplier {high}")
        below = (0.0, math.inf)  # the largest σ known to spend over the target, and its ε
        last = (high, spent)  # the full evaluation before the newest
        aim = target - _TOLERANCE / 2
        for tries in itertools.count():
            if target - spent <= _TOLERANCE or high - below[0] <= 1e-9 * high:
                break
            secant = 0 < slope < math.inf and spent > 0 and aim > 0
            guess = high * (spent / aim) ** (1 / slope) if secant else math.nan
            if not below[0] < guess < high or (tries % 3 == 2 and below[0] > 0):  # then bisect: the bracket shrinks
                guess = (below[0] + high) / 2
            value = full(guess)
            if last[0] != guess and last[1] > 0 and value > 0 and value != last[1] and math.isfinite(value):
                slope = math.log(value / last[1]) / math.log(last[0] / guess)  # the secant through the two newest
            last = (guess, value)
            if value <= target:
                high, spent = guess, value
            else:
                below = (guess, value)
        return high


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
