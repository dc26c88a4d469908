from omnistage.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PipelineRequest(_message.Message):
    __slots__ = ("request_id", "prompt", "token_ids", "messages", "tensor", "sampling", "stage_sampling")
    class StageSamplingEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.SamplingParams
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STAGE_SAMPLING_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    messages: _containers.RepeatedCompositeFieldContainer[_common_pb2.ChatMessage]
    tensor: _common_pb2.Tensor
    sampling: _common_pb2.SamplingParams
    stage_sampling: _containers.MessageMap[str, _common_pb2.SamplingParams]
    def __init__(self, request_id: _Optional[str] = ..., prompt: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., messages: _Optional[_Iterable[_Union[_common_pb2.ChatMessage, _Mapping]]] = ..., tensor: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ..., stage_sampling: _Optional[_Mapping[str, _common_pb2.SamplingParams]] = ...) -> None: ...

class StageMetrics(_message.Message):
    __slots__ = ("queue_time_s", "time_to_first_output_s", "duration_s", "handoff_s", "stage_time_s")
    QUEUE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_OUTPUT_S_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_S_FIELD_NUMBER: _ClassVar[int]
    STAGE_TIME_S_FIELD_NUMBER: _ClassVar[int]
    queue_time_s: float
    time_to_first_output_s: float
    duration_s: float
    handoff_s: float
    stage_time_s: float
    def __init__(self, queue_time_s: _Optional[float] = ..., time_to_first_output_s: _Optional[float] = ..., duration_s: _Optional[float] = ..., handoff_s: _Optional[float] = ..., stage_time_s: _Optional[float] = ...) -> None: ...

class PipelineResponse(_message.Message):
    __slots__ = ("stage", "stage_index", "request_id", "text", "token_ids", "tensor", "finished", "final", "finish_reason", "metrics", "replica")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    stage: str
    stage_index: int
    request_id: str
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    tensor: _common_pb2.Tensor
    finished: bool
    final: bool
    finish_reason: str
    metrics: StageMetrics
    replica: str
    def __init__(self, stage: _Optional[str] = ..., stage_index: _Optional[int] = ..., request_id: _Optional[str] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., tensor: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., finished: _Optional[bool] = ..., final: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., metrics: _Optional[_Union[StageMetrics, _Mapping]] = ..., replica: _Optional[str] = ...) -> None: ...

class PipelineStartProfileRequest(_message.Message):
    __slots__ = ("stages", "label", "delay_iterations", "max_iterations", "timing_only")
    STAGES_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    DELAY_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_ITERATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMING_ONLY_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedScalarFieldContainer[str]
    label: str
    delay_iterations: int
    max_iterations: int
    timing_only: bool
    def __init__(self, stages: _Optional[_Iterable[str]] = ..., label: _Optional[str] = ..., delay_iterations: _Optional[int] = ..., max_iterations: _Optional[int] = ..., timing_only: _Optional[bool] = ...) -> None: ...

class StageProfileStart(_message.Message):
    __slots__ = ("stage", "session_id")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    stage: str
    session_id: str
    def __init__(self, stage: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class PipelineStartProfileResponse(_message.Message):
    __slots__ = ("session_id", "stages")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    stages: _containers.RepeatedCompositeFieldContainer[StageProfileStart]
    def __init__(self, session_id: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageProfileStart, _Mapping]]] = ...) -> None: ...

class PipelineStopProfileRequest(_message.Message):
    __slots__ = ("stages", "output_dir", "slim_min_duration_us", "slim_patterns", "slim")
    STAGES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    SLIM_MIN_DURATION_US_FIELD_NUMBER: _ClassVar[int]
    SLIM_PATTERNS_FIELD_NUMBER: _ClassVar[int]
    SLIM_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedScalarFieldContainer[str]
    output_dir: str
    slim_min_duration_us: float
    slim_patterns: _containers.RepeatedScalarFieldContainer[str]
    slim: bool
    def __init__(self, stages: _Optional[_Iterable[str]] = ..., output_dir: _Optional[str] = ..., slim_min_duration_us: _Optional[float] = ..., slim_patterns: _Optional[_Iterable[str]] = ..., slim: _Optional[bool] = ...) -> None: ...

class StageProfileResult(_message.Message):
    __slots__ = ("stage", "ok", "error", "files", "stage_session_id", "replica", "local_dir", "stop_seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    STAGE_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DIR_FIELD_NUMBER: _ClassVar[int]
    STOP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    ok: bool
    error: str
    files: _containers.RepeatedCompositeFieldContainer[_common_pb2.ProfileFile]
    stage_session_id: str
    replica: str
    local_dir: str
    stop_seconds: float
    def __init__(self, stage: _Optional[str] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ..., files: _Optional[_Iterable[_Union[_common_pb2.ProfileFile, _Mapping]]] = ..., stage_session_id: _Optional[str] = ..., replica: _Optional[str] = ..., local_dir: _Optional[str] = ..., stop_seconds: _Optional[float] = ...) -> None: ...

class ProfileReport(_message.Message):
    __slots__ = ("session_id", "output_dir", "stages", "timeline", "summary", "slimming", "session_files", "timelines", "warnings", "summary_html", "critical_paths", "timing_only")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DIR_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SLIMMING_FIELD_NUMBER: _ClassVar[int]
    SESSION_FILES_FIELD_NUMBER: _ClassVar[int]
    TIMELINES_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_HTML_FIELD_NUMBER: _ClassVar[int]
    CRITICAL_PATHS_FIELD_NUMBER: _ClassVar[int]
    TIMING_ONLY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    output_dir: str
    stages: _containers.RepeatedCompositeFieldContainer[StageProfileResult]
    timeline: str
    summary: str
    slimming: ProfileSlimming
    session_files: _containers.RepeatedCompositeFieldContainer[_common_pb2.ProfileFile]
    timelines: _containers.RepeatedScalarFieldContainer[str]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    summary_html: str
    critical_paths: _containers.RepeatedCompositeFieldContainer[RequestCriticalPath]
    timing_only: bool
    def __init__(self, session_id: _Optional[str] = ..., output_dir: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageProfileResult, _Mapping]]] = ..., timeline: _Optional[str] = ..., summary: _Optional[str] = ..., slimming: _Optional[_Union[ProfileSlimming, _Mapping]] = ..., session_files: _Optional[_Iterable[_Union[_common_pb2.ProfileFile, _Mapping]]] = ..., timelines: _Optional[_Iterable[str]] = ..., warnings: _Optional[_Iterable[str]] = ..., summary_html: _Optional[str] = ..., critical_paths: _Optional[_Iterable[_Union[RequestCriticalPath, _Mapping]]] = ..., timing_only: _Optional[bool] = ...) -> None: ...

class CriticalSegment(_message.Message):
    __slots__ = ("stage", "kind", "start_unix_ns", "end_unix_ns")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    kind: str
    start_unix_ns: int
    end_unix_ns: int
    def __init__(self, stage: _Optional[str] = ..., kind: _Optional[str] = ..., start_unix_ns: _Optional[int] = ..., end_unix_ns: _Optional[int] = ...) -> None: ...

class RequestCriticalPath(_message.Message):
    __slots__ = ("request_id", "start_unix_ns", "first_output_unix_ns", "end_unix_ns", "first_output", "end_to_end", "steps")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    START_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    FIRST_OUTPUT_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    END_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    FIRST_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    END_TO_END_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    start_unix_ns: int
    first_output_unix_ns: int
    end_unix_ns: int
    first_output: _containers.RepeatedCompositeFieldContainer[CriticalSegment]
    end_to_end: _containers.RepeatedCompositeFieldContainer[CriticalSegment]
    steps: _containers.RepeatedCompositeFieldContainer[StageStepTime]
    def __init__(self, request_id: _Optional[str] = ..., start_unix_ns: _Optional[int] = ..., first_output_unix_ns: _Optional[int] = ..., end_unix_ns: _Optional[int] = ..., first_output: _Optional[_Iterable[_Union[CriticalSegment, _Mapping]]] = ..., end_to_end: _Optional[_Iterable[_Union[CriticalSegment, _Mapping]]] = ..., steps: _Optional[_Iterable[_Union[StageStepTime, _Mapping]]] = ...) -> None: ...

class StageStepTime(_message.Message):
    __slots__ = ("stage", "compute_ns", "step_ns", "step_share_ns")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    STEP_NS_FIELD_NUMBER: _ClassVar[int]
    STEP_SHARE_NS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    compute_ns: int
    step_ns: int
    step_share_ns: int
    def __init__(self, stage: _Optional[str] = ..., compute_ns: _Optional[int] = ..., step_ns: _Optional[int] = ..., step_share_ns: _Optional[int] = ...) -> None: ...

class StopProfileProgress(_message.Message):
    __slots__ = ("phase", "stage", "replica", "file", "bytes_done", "bytes_total", "seconds", "message", "report")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    FILE_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    phase: str
    stage: str
    replica: str
    file: str
    bytes_done: int
    bytes_total: int
    seconds: float
    message: str
    report: ProfileReport
    def __init__(self, phase: _Optional[str] = ..., stage: _Optional[str] = ..., replica: _Optional[str] = ..., file: _Optional[str] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., seconds: _Optional[float] = ..., message: _Optional[str] = ..., report: _Optional[_Union[ProfileReport, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SessionSummary(_message.Message):
    __slots__ = ("session_id", "path", "modified_unix_ns", "total_bytes", "files")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODIFIED_UNIX_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    path: str
    modified_unix_ns: int
    total_bytes: int
    files: _containers.RepeatedCompositeFieldContainer[_common_pb2.ProfileFile]
    def __init__(self, session_id: _Optional[str] = ..., path: _Optional[str] = ..., modified_unix_ns: _Optional[int] = ..., total_bytes: _Optional[int] = ..., files: _Optional[_Iterable[_Union[_common_pb2.ProfileFile, _Mapping]]] = ...) -> None: ...

class SessionList(_message.Message):
    __slots__ = ("profile_root", "sessions", "max_sessions", "max_total_bytes")
    PROFILE_ROOT_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    profile_root: str
    sessions: _containers.RepeatedCompositeFieldContainer[SessionSummary]
    max_sessions: int
    max_total_bytes: int
    def __init__(self, profile_root: _Optional[str] = ..., sessions: _Optional[_Iterable[_Union[SessionSummary, _Mapping]]] = ..., max_sessions: _Optional[int] = ..., max_total_bytes: _Optional[int] = ...) -> None: ...

class FetchSessionFileRequest(_message.Message):
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

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ("session_id", "bytes_freed")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    bytes_freed: int
    def __init__(self, session_id: _Optional[str] = ..., bytes_freed: _Optional[int] = ...) -> None: ...

class ProfileSlimming(_message.Message):
    __slots__ = ("bytes_before", "bytes_after", "events_before", "events_after", "traces", "copies_written")
    BYTES_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BYTES_AFTER_FIELD_NUMBER: _ClassVar[int]
    EVENTS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    EVENTS_AFTER_FIELD_NUMBER: _ClassVar[int]
    TRACES_FIELD_NUMBER: _ClassVar[int]
    COPIES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    bytes_before: int
    bytes_after: int
    events_before: int
    events_after: int
    traces: int
    copies_written: int
    def __init__(self, bytes_before: _Optional[int] = ..., bytes_after: _Optional[int] = ..., events_before: _Optional[int] = ..., events_after: _Optional[int] = ..., traces: _Optional[int] = ..., copies_written: _Optional[int] = ...) -> None: ...

class GetPipelineRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageStatus(_message.Message):
    __slots__ = ("name", "index", "addresses", "health", "profiling_active", "engine", "model", "error")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    PROFILING_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    name: str
    index: int
    addresses: _containers.RepeatedScalarFieldContainer[str]
    health: str
    profiling_active: bool
    engine: str
    model: str
    error: str
    def __init__(self, name: _Optional[str] = ..., index: _Optional[int] = ..., addresses: _Optional[_Iterable[str]] = ..., health: _Optional[str] = ..., profiling_active: _Optional[bool] = ..., engine: _Optional[str] = ..., model: _Optional[str] = ..., error: _Optional[str] = ...) -> None: ...

class PipelineInfo(_message.Message):
    __slots__ = ("name", "stages", "profiling_active", "profile_session_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    PROFILING_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    PROFILE_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    stages: _containers.RepeatedCompositeFieldContainer[StageStatus]
    profiling_active: bool
    profile_session_id: str
    def __init__(self, name: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageStatus, _Mapping]]] = ..., profiling_active: _Optional[bool] = ..., profile_session_id: _Optional[str] = ...) -> None: ...
