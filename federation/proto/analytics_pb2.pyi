from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class StatisticQuery(_message.Message):
    __slots__ = ("name", "statistic", "value", "low", "high", "bin_edges", "group_by", "epsilon", "delta", "quantiles", "bins", "max_rows_per_registration")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    BIN_EDGES_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    BINS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_PER_REGISTRATION_FIELD_NUMBER: _ClassVar[int]
    name: str
    statistic: str
    value: str
    low: float
    high: float
    bin_edges: _containers.RepeatedScalarFieldContainer[float]
    group_by: _containers.RepeatedScalarFieldContainer[str]
    epsilon: float
    delta: float
    quantiles: _containers.RepeatedScalarFieldContainer[float]
    bins: int
    max_rows_per_registration: int
    def __init__(self, name: _Optional[str] = ..., statistic: _Optional[str] = ..., value: _Optional[str] = ..., low: _Optional[float] = ..., high: _Optional[float] = ..., bin_edges: _Optional[_Iterable[float]] = ..., group_by: _Optional[_Iterable[str]] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., quantiles: _Optional[_Iterable[float]] = ..., bins: _Optional[int] = ..., max_rows_per_registration: _Optional[int] = ...) -> None: ...

class Cell(_message.Message):
    __slots__ = ("group", "bin", "noisy_count", "noisy_sum")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    BIN_FIELD_NUMBER: _ClassVar[int]
    NOISY_COUNT_FIELD_NUMBER: _ClassVar[int]
    NOISY_SUM_FIELD_NUMBER: _ClassVar[int]
    group: _containers.RepeatedScalarFieldContainer[str]
    bin: str
    noisy_count: float
    noisy_sum: float
    def __init__(self, group: _Optional[_Iterable[str]] = ..., bin: _Optional[str] = ..., noisy_count: _Optional[float] = ..., noisy_sum: _Optional[float] = ...) -> None: ...

class StatisticAnswer(_message.Message):
    __slots__ = ("campus", "query_name", "cells", "noise_multiplier", "count_std", "sum_std", "epsilon", "delta", "suppressed_cells", "min_cell_count")
    CAMPUS_FIELD_NUMBER: _ClassVar[int]
    QUERY_NAME_FIELD_NUMBER: _ClassVar[int]
    CELLS_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    COUNT_STD_FIELD_NUMBER: _ClassVar[int]
    SUM_STD_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    SUPPRESSED_CELLS_FIELD_NUMBER: _ClassVar[int]
    MIN_CELL_COUNT_FIELD_NUMBER: _ClassVar[int]
    campus: str
    query_name: str
    cells: _containers.RepeatedCompositeFieldContainer[Cell]
    noise_multiplier: float
    count_std: float
    sum_std: float
    epsilon: float
    delta: float
    suppressed_cells: int
    min_cell_count: int
    def __init__(self, campus: _Optional[str] = ..., query_name: _Optional[str] = ..., cells: _Optional[_Iterable[_Union[Cell, _Mapping]]] = ..., noise_multiplier: _Optional[float] = ..., count_std: _Optional[float] = ..., sum_std: _Optional[float] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., suppressed_cells: _Optional[int] = ..., min_cell_count: _Optional[int] = ...) -> None: ...
