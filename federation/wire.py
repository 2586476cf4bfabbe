"""The names both sides use in Flower messages: record keys, and the error codes of a campus's replies."""

from __future__ import annotations

__all__ = [
    "ARRAYS",
    "BLOCKED",
    "CAMPUS",
    "CONFIG",
    "EVALUATE_RECEIVED",
    "EVALUATION",
    "FAILED",
    "METRICS",
    "NUM_EXAMPLES",
    "REFUSED",
]

ARRAYS = "arrays"
"""The ``ArrayRecord`` of model weights (the global model in a request, the campus's in a train reply)."""
CONFIG = "config"
"""The ``ConfigRecord`` of a request: the run configuration's dashed keys and ``server-round``."""
METRICS = "metrics"
"""The ``MetricRecord`` of a reply (its declared keys: :mod:`federation.metrics`)."""
CAMPUS = "campus"
"""The ``ConfigRecord`` of every reply naming the campus that sent it (its one key: ``name``)."""
EVALUATE_RECEIVED = "evaluate-received"
"""A train request's config key: true asks the campus to evaluate the global model it received before training it
(RunConfig ``evaluate-in-train``), and to send the metrics with its training reply, under :data:`EVALUATION`."""
EVALUATION = "evaluation"
"""The ``MetricRecord`` of a train reply holding the evaluation of the received model (see :data:`EVALUATE_RECEIVED`);
its keys are an evaluate reply's :data:`METRICS` keys."""
NUM_EXAMPLES = "num-examples"
"""The metric key of the number of records a reply's metrics were computed on."""

REFUSED = 4000
"""Error code of a reply refusing the request: the campus's policy, its privacy budget or an invalid config."""
BLOCKED = 4001
"""Error code of a reply the campus's release guard blocked (the content broke what the protocol declares)."""
FAILED = 4002
"""Error code of a request that failed on the campus; the reason is a fixed sentence, never the exception's text."""
