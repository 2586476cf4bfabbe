"""Planning a campus's release of a DP statistic against its policy and its privacy ledger.

A statistic is one Gaussian release, accounted as DP-SGD's sampled Gaussian
mechanism at q = 1 for one step (:mod:`federation.statistics`), so it composes
with the campus's training releases on the same dataset in one budget.
"""

from __future__ import annotations

from edufl.federation.policy import CampusPolicy
from edufl.federation.privacy import History, epsilon
from edufl.federation.proto.analytics_pb2 import StatisticQuery
from edufl.federation.queries import QueryError, check
from edufl.federation.statistics import noise_multiplier

__all__ = ["plan_release"]


def plan_release(
    query: StatisticQuery, policy: CampusPolicy, run_history: History, dataset_history: History
) -> tuple[float, float]:
    """(z, the run's ε after the release) for a campus under ``policy``, given its ledger's histories
    (each a list of (noise multiplier, sample rate, steps)).

    z is the calibrated multiplier of ``query`` (:func:`federation.statistics.noise_multiplier`),
    raised to the policy's ``privacy.min_noise_multiplier``.

    Raises
    ------
    QueryError
        When the query is invalid (:func:`federation.queries.check`), or when ε
        exceeds ``privacy.max_epsilon_per_run`` (the run's ε, composed with its
        earlier releases), δ exceeds ``privacy.delta``, or the dataset's ε over
        all runs would exceed ``privacy.total_epsilon_budget``; the message names
        the policy key.
    """
    check(query)
    z = noise_multiplier(query)
    planned = (policy.noise_multiplier(z), 1.0, 1)
    run_eps = epsilon([*run_history, planned], query.delta)
    limits = policy.privacy
    if query.delta > limits.delta:
        raise QueryError(f"privacy.delta: delta {query.delta:g} > {limits.delta:g}")
    if run_eps > limits.max_epsilon_per_run:
        raise QueryError(f"privacy.max_epsilon_per_run: the run's ε would reach {run_eps:.3f} > {limits.max_epsilon_per_run:g}")
    if why := policy.over_budget(dataset_history, planned):
        raise QueryError(why)
    return planned[0], run_eps
