"""The coordinator's estimates from the campuses' DP answers to one statistic query.

Counts and means: the campuses' noisy counts (and a mean's noisy sums) of each
cell are summed over the campuses that released the cell; the noise of the
sum is the campuses' independent noise, whose stds each answer states.

Quantiles: each campus releases a DP histogram of the value over ``bins``
equal-width bins of [low, high] (values clipped to the bounds), exactly as a
histogram; the coordinator sums the campuses' noisy counts and reads each
quantile off the pooled histogram by linear interpolation within the bin
where the cumulative count reaches ``p·N`` (:func:`interpolate_quantiles`).
This is the noisy-histogram quantile estimator (the histogram release of
Dwork and Roth, "The Algorithmic Foundations of Differential Privacy", 2014, Section 3.3, then post-processing); it needs one
release per campus and composes across campuses by summing counts. Its error
has two parts: resolution, at most one bin width (the data's quantile lies in
the bin the exact histogram's does), and noise, which the coordinator
measures with a parametric bootstrap (Ferrando, Wang and Sheldon, "Parametric
Bootstrap for Differentially Private Confidence Intervals", AISTATS 2022):
taking what each campus sent as its true counts, it redraws each campus's
release (noise at the stated std, then the suppression rule) and takes the
95th percentile of the redrawn estimates' distance to the estimate
(:data:`BOOTSTRAP_DRAWS` draws: a simulation-based interval, not a proven
bound; mass a campus suppressed is taken as absent).

No error bound covers a campus's suppressed cells or clipping.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edufl.federation.proto.analytics_pb2 import StatisticAnswer, StatisticQuery
from edufl.federation.queries import bin_labels, cells, edges, group_values, threshold
from edufl.federation.schema import FederationSchema

__all__ = ["BOOTSTRAP_DRAWS", "Z_95", "Estimate", "combine", "interpolate_quantiles"]

BOOTSTRAP_DRAWS = 2000
"""Parametric-bootstrap redraws of the campuses' releases behind a quantile's error bound."""
Z_95 = 1.959964
"""Two-sided 95 % quantile of the standard normal distribution."""


@dataclass(frozen=True)
class Estimate:
    """The federation's estimate of one cell (or, for a quantile, of one group's quantile ``p``).

    ``estimate`` is the count (count, histogram), the mean ``Σ sums / Σ counts``
    or the quantile (value units); ``count`` the summed noisy count of the cell
    (of the group, for a quantile); ``campuses`` how many released it (any of
    the group's bins, for a quantile). ``std`` is the standard deviation of the
    estimate's noise: ``sqrt(Σ count_std²)`` for a count, for a mean the delta
    method, ``sqrt(Σ sum_std² + mean² · Σ count_std²) / Σ counts``, for a
    quantile that of its bootstrap draws. ``bound95`` is the half-width of
    its 95 % error interval: ``1.96 · std`` for counts and means; for a
    quantile one bin width (resolution) plus the 95th percentile of the
    bootstrap draws' distance to the estimate. Neither covers clipping or
    suppressed cells.
    """

    group: tuple[str, ...]
    bin: str
    estimate: float
    std: float
    bound95: float
    count: float
    campuses: int
    p: float | None = None


def interpolate_quantiles(counts: np.ndarray, edges_: np.ndarray, ps: Sequence[float]) -> np.ndarray:
    """Quantiles ``ps`` of histograms ``counts`` (shape ``(..., bins)``; negative counts taken as 0) with bin
    ``edges_`` (``bins + 1``, equal widths), by linear interpolation within the bin where the cumulative
    count reaches ``p·N``. Returns shape ``(..., len(ps))`` in value units; NaN where a histogram is empty."""
    c = np.clip(counts, 0.0, None)
    cum = np.cumsum(c, axis=-1)
    target = cum[..., -1:] * np.asarray(ps, dtype=float)  # (..., P)
    j = np.minimum((cum[..., None, :] < target[..., :, None]).sum(axis=-1), c.shape[-1] - 1)  # the bin reaching p·N
    inside = np.take_along_axis(c, j, axis=-1)
    before = np.take_along_axis(cum, j, axis=-1) - inside
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.clip((target - before) / inside, 0.0, 1.0)
    out = edges_[j] + fraction * (edges_[1] - edges_[0])
    return np.where(target > 0, out, np.nan)


def combine(query: StatisticQuery, answers: Sequence[StatisticAnswer], schema: FederationSchema) -> list[Estimate]:
    """Sum the released cells over campuses (the cells ``query`` declares under the federation ``schema``); one
    :class:`Estimate` per cell released by at least one campus
    (for a quantile: one per group with a released bin and requested probability, in order)."""
    released = [{(tuple(c.group), c.bin): c for c in a.cells} for a in answers]
    if query.statistic == "quantile":
        return _quantile_estimates(query, answers, released, schema)
    out = []
    for key in cells(query, schema):
        parts = [(a, got[key]) for a, got in zip(answers, released, strict=True) if key in got]
        if not parts:
            continue
        count = sum(c.noisy_count for _, c in parts)
        count_var = sum(a.count_std**2 for a, _ in parts)
        if query.statistic == "mean":
            mean = sum(c.noisy_sum for _, c in parts) / count
            std = math.sqrt(sum(a.sum_std**2 for a, _ in parts) + mean**2 * count_var) / count
            out.append(Estimate(key[0], key[1], mean, std, Z_95 * std, count, len(parts)))
        else:
            out.append(Estimate(key[0], key[1], count, math.sqrt(count_var), Z_95 * math.sqrt(count_var), count, len(parts)))
    return out


def _quantile_estimates(
    query: StatisticQuery, answers: Sequence[StatisticAnswer], released: list[dict], schema: FederationSchema
) -> list[Estimate]:
    e, labels, ps = edges(query), bin_labels(query), list(query.quantiles)
    rng = np.random.default_rng(0)  # the bootstrap simulates the stated noise; it needs no secrecy
    out = []
    for group in itertools.product(*(group_values(f, schema) for f in query.group_by)):
        keys = [(group, label) for label in labels]
        per_campus = np.array([[got[k].noisy_count if k in got else 0.0 for k in keys] for got in released]).reshape(
            -1, len(keys)
        )
        counts = per_campus.sum(axis=0)
        if counts.sum() <= 0:
            continue
        # Each campus's release, redrawn around what it sent: noise at its stated std, then its suppression rule.
        draws = np.zeros((BOOTSTRAP_DRAWS, len(keys)))
        for a, sent in zip(answers, per_campus, strict=True):
            redrawn = sent + rng.normal(0.0, a.count_std, size=draws.shape)
            draws += np.where(redrawn >= threshold(query, a.min_cell_count), redrawn, 0.0)
        estimate = interpolate_quantiles(counts, e, ps)
        drawn = interpolate_quantiles(draws, e, ps)
        spread = np.nanquantile(np.abs(drawn - estimate), 0.95, axis=0)
        campuses = int((per_campus > 0).any(axis=1).sum())
        out += [
            Estimate(group, f"q{p:g}", float(q), float(np.nanstd(d)), float(e[1] - e[0] + w), float(counts.sum()), campuses, p)
            for p, q, d, w in zip(ps, estimate, drawn.T, spread, strict=True)
        ]
    return out
