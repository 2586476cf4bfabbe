from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArraySpec(_message.Message):
    __slots__ = ("name", "shape", "dtype")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ...) -> None: ...

class DpRelease(_message.Message):
    __slots__ = ("mechanism", "noise_multiplier", "sample_rate", "steps", "epsilon", "delta", "accountant")
    MECHANISM_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_FIELD_NUMBER: _ClassVar[int]
    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    epsilon: float
    delta: float
    accountant: str
    def __init__(self, mechanism: _Optional[str] = ..., noise_multiplier: _Optional[float] = ..., sample_rate: _Optional[float] = ..., steps: _Optional[int] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., accountant: _Optional[str] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("recorded_at", "campus", "run_id", "server_round", "message_type", "sent", "reason", "arrays", "metric_keys", "payload_bytes", "payload_sha256", "dp", "num_examples", "fab_sha256")
    RECORDED_AT_FIELD_NUMBER: _ClassVar[int]
    CAMPUS_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ROUND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_TYPE_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ARRAYS_FIELD_NUMBER: _ClassVar[int]
    METRIC_KEYS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    DP_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    FAB_SHA256_FIELD_NUMBER: _ClassVar[int]
    recorded_at: str
    campus: str
    run_id: str
    server_round: int
    message_type: str
    sent: bool
    reason: str
    arrays: _containers.RepeatedCompositeFieldContainer[ArraySpec]
    metric_keys: _containers.RepeatedScalarFieldContainer[str]
    payload_bytes: int
    payload_sha256: str
    dp: DpRelease
    num_examples: int
    fab_sha256: str
    def __init__(self, recorded_at: _Optional[str] = ..., campus: _Optional[str] = ..., run_id: _Optional[str] = ..., server_round: _Optional[int] = ..., message_type: _Optional[str] = ..., sent: _Optional[bool] = ..., reason: _Optional[str] = ..., arrays: _Optional[_Iterable[_Union[ArraySpec, _Mapping]]] = ..., metric_keys: _Optional[_Iterable[str]] = ..., payload_bytes: _Optional[int] = ..., payload_sha256: _Optional[str] = ..., dp: _Optional[_Union[DpRelease, _Mapping]] = ..., num_examples: _Optional[int] = ..., fab_sha256: _Optional[str] = ...) -> None: ...
