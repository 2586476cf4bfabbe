"""What both ends of secure aggregation (SecAgg+) rely on: the model's arrays in Flower's legacy format, and the
one unmask request that would reveal a campus's update.

Flower's SecAgg+ (``SecAggPlusWorkflow`` on the coordinator, ``secaggplus_mod``
on each campus, flwr 1.42) speaks the legacy FitIns/FitRes, whose parameters
are a list of unnamed arrays in the model's parameter order;
:func:`named_arrays` gives them back their names, shapes and dtypes. At the
``unmask`` stage the coordinator asks each campus, for every other node, for
its share of that node's mask seed (a node it calls active) or of its masking
key (one it calls dropped); :func:`doubly_named` lists the nodes a request
would reveal both secrets of.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from flwr.app import Array, ArrayRecord
from flwr.common import parameters_to_ndarrays
from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters

__all__ = ["doubly_named", "named_arrays"]


def named_arrays(record: ArrayRecord, specs: Sequence[tuple[str, Sequence[int], str]]) -> ArrayRecord:
    """The legacy (unnamed) arrays of ``record``, named and cast by ``specs``: (name, shape, dtype) of each
    parameter, in order (dtype as NumPy names it, e.g. ``"float32"``).

    Raises
    ------
    ValueError
        When ``record`` does not hold one array of each shape of ``specs``, in order.
    """
    arrays = parameters_to_ndarrays(arrayrecord_to_parameters(record, keep_input=True))
    if [list(a.shape) for a in arrays] != [list(shape) for _, shape, _ in specs]:
        raise ValueError(f"arrays of shapes {[list(a.shape) for a in arrays]}; expected {[list(s) for _, s, _ in specs]}")
    return ArrayRecord({name: Array(array.astype(dtype)) for (name, _, dtype), array in zip(specs, arrays, strict=True)})


def doubly_named(active: Iterable[int], dropped: Iterable[int], own: int) -> list[int]:
    """The nodes an ``unmask`` request naming ``active`` and ``dropped`` nodes asks both shares of, in order:
    those named both active and dropped, and the asked campus's ``own`` node id if named dropped (after it
    sent its masked vector). Empty for a request that reveals no campus's update."""
    dropped = set(dropped)
    return sorted(set(active) & dropped | {own} & dropped)
