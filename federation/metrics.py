"""The metric keys a campus's replies declare: per message type, per task, and per subgroup.

The campus's release guard lets no other metric key leave the campus
(:mod:`clients.reply_checks`); the coordinator and the results read the same
names.
"""

from __future__ import annotations

from .contract import CATEGORICAL_FEATURES, FINAL_RESULTS
from .runconfig import TASKS
from .wire import NUM_EXAMPLES

__all__ = ["EVALUATE_METRICS", "PRIMARY_METRIC", "SUBGROUPS", "TRAIN_METRICS", "subgroup_keys"]

TRAIN_METRICS = (NUM_EXAMPLES, "train-loss", "epsilon", "delta", "noise-multiplier", "sample-rate", "steps")
"""The metric keys of a train reply: rows trained on, mean loss, the run's ε and δ so far, and the DP-SGD plan."""
_BINARY_METRICS = ("auc", "average-precision", "f1", "brier", "loss")
_MULTICLASS = "final_result"
EVALUATE_METRICS: dict[str, tuple[str, ...]] = {
    **{task: (NUM_EXAMPLES, *_BINARY_METRICS) for task in TASKS if task != _MULTICLASS},
    _MULTICLASS: (NUM_EXAMPLES, "macro-f1", "accuracy", "macro-auc", *(f"f1-{c}" for c in FINAL_RESULTS), "loss"),
}
"""The metric keys of an evaluate reply, per task (besides the subgroup keys of :func:`subgroup_keys`)."""
PRIMARY_METRIC: dict[str, str] = {**{task: "auc" for task in TASKS if task != _MULTICLASS}, _MULTICLASS: "macro-f1"}
"""The metric each task is judged by: in the worst-campus figure, study tables and plots, and per subgroup."""
SUBGROUPS = {a: CATEGORICAL_FEATURES[a] for a in ("gender", "age_band", "disability", "imd_band")}
"""The fairness view: {attribute: its values}. For every value held by at least the policy's
``release.min_cohort_size`` test rows, an evaluate reply also holds that group's number of test rows,
the task's primary metric on them and the metric's bootstrap interval (:func:`subgroup_keys`); smaller
groups are not sent (see :func:`federation.training.subgroup_metrics`)."""


def subgroup_keys(task: str) -> dict[tuple[str, str], tuple[str, str, str, str]]:
    """The declared per-subgroup metric keys of ``task``'s evaluate replies, in the order of
    :class:`federation.training.Subgroup`'s fields.

    Returns
    -------
    dict
        ``(attribute, value) -> (count key, metric key, interval low key, interval high key)`` for every
        value of every attribute of :data:`SUBGROUPS`, e.g. ``("gender", "F") -> ("group:gender=F:num-examples",
        "group:gender=F:auc", "group:gender=F:auc-low", "group:gender=F:auc-high")``.

    Raises
    ------
    KeyError
        When ``task`` is not one of the tasks.
    """
    metric = PRIMARY_METRIC[task]

    def keys(prefix: str) -> tuple[str, str, str, str]:
        return f"{prefix}{NUM_EXAMPLES}", f"{prefix}{metric}", f"{prefix}{metric}-low", f"{prefix}{metric}-high"

    return {(a, v): keys(f"group:{a}={v}:") for a, vocab in SUBGROUPS.items() for v in vocab}
