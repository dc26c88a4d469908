from omnistage.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "token_ids", "messages", "tensor", "sampling", "shared_tensor", "shared_output", "final_only")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    SHARED_TENSOR_FIELD_NUMBER: _ClassVar[int]
    SHARED_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FINAL_ONLY_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    tensor: _common_pb2.Tensor
    sampling: _common_pb2.SamplingParams
    shared_tensor: _common_pb2.SharedTensor
    shared_output: _common_pb2.SharedOutput
    final_only: bool
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., tensor: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., shared_tensor: _Optional[_Union[_common_pb2.SharedTensor, _Mapping]] = ..., shared_output: _Optional[_Union[_common_pb2.SharedOutput, _Mapping]] = ..., final_only: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "token_ids", "text", "finished", "finish_reason", "metrics", "tensor", "shared_tensor")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SHARED_TENSOR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    finished: bool
    finish_reason: str
    metrics: _common_pb2.RequestMetrics
    tensor: _common_pb2.Tensor
    shared_tensor: _common_pb2.SharedTensor
    def __init__(self, request_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., metrics: _Optional[_Union[_common_pb2.RequestMetrics, _Mapping]] = ..., tensor: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., shared_tensor: _Optional[_Union[_common_pb2.SharedTensor, _Mapping]] = ...) -> None: ...

class StartProfileRequest(_message.Message):
    __slots__ = ("label", "delay_iterations", "max_iterations")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    DELAY_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    label: str
    delay_iterations: int
    max_iterations: int
    def __init__(self, label: _Optional[str] = ..., delay_iterations: _Optional[int] = ..., max_iterations: _Optional[int] = ...) -> None: ...

class StartProfileResponse(_message.Message):
    __slots__ = ("session_id", "profile_dir")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROFILE_DIR_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    profile_dir: str
    def __init__(self, session_id: _Optional[str] = ..., profile_dir: _Optional[str] = ...) -> None: ...

class StopProfileRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StopProfileResponse(_message.Message):
    __slots__ = ("session_id", "files", "profile_dir", "stop_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    PROFILE_DIR_FIELD_NUMBER: _ClassVar[int]
    STOP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    files: _containers.RepeatedCompositeFieldContainer[_common_pb2.ProfileFile]
    profile_dir: str
    stop_seconds: float
    def __init__(self, session_id: _Optional[str] = ..., files: _Optional[_Iterable[_Union[_common_pb2.ProfileFile, _Mapping]]] = ..., profile_dir: _Optional[str] = ..., stop_seconds: _Optional[float] = ...) -> None: ...

class FetchProfileFileRequest(_message.Message):
    __slots__ = ("session_id", "name", "chunk_size", "offset")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    name: str
    chunk_size: int
    offset: int
    def __init__(self, session_id: _Optional[str] = ..., name: _Optional[str] = ..., chunk_size: _Optional[int] = ..., offset: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("name", "engine", "model", "profiling_enabled", "profiling_active", "profile_session_id", "running_requests", "server_time_unix_ns", "version", "engine_version", "max_model_len", "device", "profiler_dir", "shm_domain")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROFILING_ENABLED_FIELD_NUMBER: _ClassVar[int]
    PROFILING_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    SERVER_TIME_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PROFILER_DIR_FIELD_NUMBER: _ClassVar[int]
    SHM_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    engine: str
    model: str
    profiling_enabled: bool
    profiling_active: bool
    profile_session_id: str
    running_requests: int
    server_time_unix_ns: int
    version: str
    engine_version: str
    max_model_len: int
    device: str
    profiler_dir: str
    shm_domain: str
    def __init__(self, name: _Optional[str] = ..., engine: _Optional[str] = ..., model: _Optional[str] = ..., profiling_enabled: _Optional[bool] = ..., profiling_active: _Optional[bool] = ..., profile_session_id: _Optional[str] = ..., running_requests: _Optional[int] = ..., server_time_unix_ns: _Optional[int] = ..., version: _Optional[str] = ..., engine_version: _Optional[str] = ..., max_model_len: _Optional[int] = ..., device: _Optional[str] = ..., profiler_dir: _Optional[str] = ..., shm_domain: _Optional[str] = ...) -> None: ...

class ValidateSamplingRequest(_message.Message):
    __slots__ = ("sampling",)
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    sampling: _common_pb2.SamplingParams
    def __init__(self, sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class ValidateSamplingResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
