"""The metric keys a campus's replies declare: per message type, per task, and per subgroup.

The campus's release guard lets no other metric key leave the campus
(:mod:`clients.reply_checks`); the coordinator and the results read the same
names.
"""

from __future__ import annotations

from .runconfig import TASKS
from .schema import FederationSchema
from .wire import NUM_EXAMPLES

__all__ = ["PRIMARY_METRIC", "SUBGROUPS", "TRAIN_METRICS", "evaluate_metrics", "subgroup_keys"]

TRAIN_METRICS = (NUM_EXAMPLES, "train-loss", "epsilon", "delta", "noise-multiplier", "sample-rate", "steps")
"""The metric keys of a train reply: rows trained on, mean loss, the run's ε and δ so far, and the DP-SGD plan."""
_BINARY_METRICS = ("auc", "average-precision", "f1", "brier", "loss")
_MULTICLASS = "final_result"


def evaluate_metrics(task: str, schema: FederationSchema) -> tuple[str, ...]:
    """The metric keys of ``task``'s evaluate replies under ``schema`` (besides the subgroup keys of
    :func:`subgroup_keys`): the binary metrics, or for ``final_result`` the multiclass ones with an F1 per outcome.

    Raises
    ------
    KeyError
        When ``task`` is not one of the tasks."""
    if task == _MULTICLASS:
        return (NUM_EXAMPLES, "macro-f1", "accuracy", "macro-auc", *(f"f1-{c}" for c in schema.outcomes), "loss")
    return {t: (NUM_EXAMPLES, *_BINARY_METRICS) for t in TASKS}[task]


PRIMARY_METRIC: dict[str, str] = {**{task: "auc" for task in TASKS if task != _MULTICLASS}, _MULTICLASS: "macro-f1"}
"""The metric each task is judged by: in the worst-campus figure, study tables and plots, and per subgroup."""
SUBGROUPS = ("gender", "age_band", "disability", "imd_band")
"""The fairness view: the learner fields whose groups (each value of the federation schema's vocabulary)
are evaluated apart. For every value held by at least the policy's
``release.min_cohort_size`` test rows, an evaluate reply also holds that group's number of test rows,
the task's primary metric on them and the metric's bootstrap interval (:func:`subgroup_keys`); smaller
groups are not sent (see :func:`federation.training.subgroup_metrics`)."""


def subgroup_keys(task: str, schema: FederationSchema) -> dict[tuple[str, str], tuple[str, str, str, str]]:
    """The declared per-subgroup metric keys of ``task``'s evaluate replies, in the order of
    :class:`federation.training.Subgroup`'s fields.

    Returns
    -------
    dict
        ``(attribute, value) -> (count key, metric key, interval low key, interval high key)`` for every
        value (in ``schema``'s vocabulary) of every field of :data:`SUBGROUPS`, e.g.
        ``("gender", "F") -> ("group:gender=F:num-examples",
        "group:gender=F:auc", "group:gender=F:auc-low", "group:gender=F:auc-high")``.

    Raises
    ------
    KeyError
        When ``task`` is not one of the tasks.
    """
    metric = PRIMARY_METRIC[task]

    def keys(prefix: str) -> tuple[str, str, str, str]:
        return f"{prefix}{NUM_EXAMPLES}", f"{prefix}{metric}", f"{prefix}{metric}-low", f"{prefix}{metric}-high"

    return {(a, v): keys(f"group:{a}={v}:") for a in SUBGROUPS for v in schema.vocabulary(a)}
