"""Plain typed objects that core logic works with. Protobuf stays at the edges."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omnistage.shm import SharedTensorRef

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling options; None means "use the default"."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool | None = None

    def merged_over(self, base: SamplingOptions) -> SamplingOptions:
        """These options, with unset fields taken from `base`."""
        return SamplingOptions(
            max_tokens=self.max_tokens if self.max_tokens is not None else base.max_tokens,
            temperature=self.temperature if self.temperature is not None else base.temperature,
            top_p=self.top_p if self.top_p is not None else base.top_p,
            top_k=self.top_k if self.top_k is not None else base.top_k,
            seed=self.seed if self.seed is not None else base.seed,
            stop=self.stop or base.stop,
            ignore_eos=self.ignore_eos if self.ignore_eos is not None else base.ignore_eos,
        )


@dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True)
class TensorData:
    """A dense tensor as it travels: dtype name, shape and little-endian C-order bytes; a
    memoryview where they are read in place (a shared-memory segment: `shared` says which)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview
    shared: SharedTensorRef | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class GenerateInput:
    """One request to a stage. Exactly one of the inputs is set."""

    request_id: str
    prompt: str = ""
    token_ids: tuple[int, ...] = ()
    messages: tuple[ChatTurn, ...] = ()
    tensor: TensorData | None = None
    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    final_only: bool = False  # only the whole output is read: one message (stage.proto)

    def input_kinds(self) -> list[str]:
        """The names of the inputs that are set."""
        kinds = []
        if self.prompt:
            kinds.append("prompt")
        if self.token_ids:
            kinds.append("token_ids")
        if self.messages:
            kinds.append("messages")
        if self.tensor is not None:
            kinds.append("tensor")
        return kinds


@dataclass(frozen=True)
class RequestMetrics:
    queue_time_s: float = 0.0
    time_to_first_token_s: float = 0.0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    duration_s: float = 0.0


@dataclass(frozen=True)
class OutputDelta:
    """One streamed piece of a request's output."""

    request_id: str
    token_ids: tuple[int, ...] = ()
    text: str = ""
    finished: bool = False
    finish_reason: str = ""
    metrics: RequestMetrics | None = None
    tensor: TensorData | None = None


@dataclass(frozen=True)
class ProfileOptions:
    """What a caller asks of one profile session. None uses the stage's configured value."""

    label: str = ""
    delay_iterations: int | None = None
    max_iterations: int | None = None
    timing_only: bool = False
    """Record the requests' spans and the clocks, and start no stage's torch profiler."""


@dataclass(frozen=True)
class ProfileFileInfo:
    name: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class ProfileManifest:
    session_id: str
    profile_dir: str
    files: tuple[ProfileFileInfo, ...]
    stop_seconds: float = 0.0


@dataclass(frozen=True)
class EngineInfo:
    """What an engine reports about itself."""

    engine: str
    model: str
    running_requests: int
    engine_version: str = ""
    max_model_len: int = 0
    device: str = "cpu"
    dead_reason: str = ""
    """Why the engine can no longer serve (its process died, its loop stopped); empty while
    it can. The stage's health watch polls it and reports NOT_SERVING once it is set."""


@dataclass(frozen=True)
class StageDescription:
    """What a stage reports through GetInfo."""

    name: str
    engine: EngineInfo
    profiling_enabled: bool
    profiling_active: bool
    profile_session_id: str
    server_time_unix_ns: int
    version: str
    profiler_dir: str
    shm_domain: str = ""
    """Its shared-memory domain (`omnistage.shm.local_domain`); empty: it takes no handles."""


@dataclass(frozen=True)
class StageStatus:
    """One stage of a pipeline as the orchestrator sees it (GetPipeline)."""

    name: str
    index: int
    addresses: tuple[str, ...]
    health: str  # each replica's, comma-separated: "SERVING,UNAVAILABLE"
    profiling_active: bool
    engine: str = ""
    model: str = ""
    error: str = ""  # why no replica is ready, or why its GetInfo failed


@dataclass(frozen=True)
class PipelineStatus:
    """A pipeline's stages, their health and its profiling state (GetPipeline)."""

    name: str
    stages: tuple[StageStatus, ...]
    profiling_active: bool
    profile_session_id: str


@dataclass(frozen=True)
class StageProfileResult:
    """What one stage (one replica of it) gave back when a pipeline profile stopped."""

    stage: str
    replica: str
    ok: bool
    error: str = ""
    files: tuple[ProfileFileInfo, ...] = ()
    stage_session_id: str = ""
    local_dir: str = ""
    stop_seconds: float = 0.0


class SizeSaving:
    """The bytes a smaller copy saved: for one trace's slimming and a session's."""

    bytes_before: int
    bytes_after: int

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    @property
    def size_ratio(self) -> float:
        """Slimmed size over full size (1.0 when there were no bytes)."""
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0


@dataclass(frozen=True)
class ProfileSlimming(SizeSaving):
    """What slimming saved over a session's traces (file sizes; events in them)."""

    bytes_before: int = 0
    bytes_after: int = 0
    """The originals' size where no smaller copy was written."""
    events_before: int = 0
    events_after: int = 0
    traces: int = 0
    copies_written: int = 0

    def describe(self) -> str:
        """One line for people: bytes saved, size ratio, events dropped."""
        return (
            f"{self.bytes_saved:,} bytes saved ({self.bytes_before:,} → {self.bytes_after:,}, "
            f"size ratio {self.size_ratio:.2f}); {self.events_before - self.events_after:,} of "
            f"{self.events_before:,} events dropped; {self.copies_written} of {self.traces} "
            "traces got a slimmed copy"
        )


@dataclass(frozen=True)
class CriticalSegment:
    """One piece of a request's critical path, on the orchestrator's wall clock.

    ``kind`` is one of ``queued``, ``compute``, ``waiting_for_upstream``, ``handoff`` and
    ``transport`` (docs/profiling.md, *Critical path*)."""

    stage: str
    kind: str
    start_unix_ns: int
    end_unix_ns: int

    @property
    def seconds(self) -> float:
        return (self.end_unix_ns - self.start_unix_ns) / 1e9


@dataclass(frozen=True)
class StageStepTime:
    """A request's compute in one traced stage, on its end-to-end critical path, split into
    the engine's model steps and the rest (docs/profiling.md, *Engine steps*)."""

    stage: str
    compute_ns: int
    """The stage's ``compute`` segments on the path."""
    step_ns: int
    """The part of them during which the stage's engine was inside a step."""
    step_share_ns: int
    """The request's share of those steps: each moment of a step is shared equally among
    the requests whose compute on the stage covers it."""

    @property
    def rest_ns(self) -> int:
        """Compute outside any engine step."""
        return self.compute_ns - self.step_ns

    @property
    def step_fraction(self) -> float | None:
        """``step_ns`` over ``compute_ns`` (0 to 1); None without compute."""
        return self.step_ns / self.compute_ns if self.compute_ns else None


@dataclass(frozen=True)
class RequestCriticalPath:
    """What bounded one request: the segments, in time order, that tile its time from its
    start to the final stage's first output, and to its end."""

    request_id: str
    start_unix_ns: int
    first_output_unix_ns: int
    end_unix_ns: int
    first_output: tuple[CriticalSegment, ...] = ()
    end_to_end: tuple[CriticalSegment, ...] = ()
    steps: tuple[StageStepTime, ...] = ()
    """Per stage whose traces hold engine steps, in path order: its compute split into model
    steps and the rest. Empty in a timing-only session and before the traces are read."""

    @property
    def time_to_first_output_s(self) -> float:
        return (self.first_output_unix_ns - self.start_unix_ns) / 1e9

    @property
    def total_s(self) -> float:
        return (self.end_unix_ns - self.start_unix_ns) / 1e9


@dataclass(frozen=True)
class ProfileReport:
    """A pipeline profile session, collected on the orchestrator's side."""

    session_id: str
    output_dir: str
    stages: tuple[StageProfileResult, ...]
    timeline: str = ""
    summary: str = ""
    slimming: ProfileSlimming | None = None
    """Set when slimming was asked for (also when it saved nothing)."""
    session_files: tuple[ProfileFileInfo, ...] = ()
    """Every file of the session folder on the orchestrator, named relative to it."""
    downloaded_to: str = ""
    """The caller's local copy of the session, when the client downloaded it."""
    timelines: tuple[str, ...] = ()
    """Every merged timeline written: ``timeline`` (JSON) first, then the protobuf one."""
    warnings: tuple[str, ...] = ()
    """Problems that did not stop the report, such as a trace that could not be read."""
    summary_html: str = ""
    """``summary.html`` beside ``summary``: the summary as one offline page, with a waterfall."""
    critical_paths: tuple[RequestCriticalPath, ...] = ()
    """Per request of the session that passed every stage: what bounded its time."""
    timing_only: bool = False
    """The session recorded spans and clocks only: no stage's torch profiler ran."""

    @property
    def failed(self) -> list[StageProfileResult]:
        return [s for s in self.stages if not s.ok]


@dataclass(frozen=True)
class StageMetrics:
    """One stage's share of one pipeline request, in seconds."""

    queue_time_s: float = 0.0
    time_to_first_output_s: float = 0.0
    duration_s: float = 0.0
    handoff_s: float = 0.0
    stage_time_s: float = 0.0  # the stage server's own time: duration_s minus it is the hop


@dataclass(frozen=True)
class PipelineOutput:
    """One piece of a pipeline's streamed output."""

    stage: str
    stage_index: int
    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    finished: bool = False
    final: bool = False
    finish_reason: str = ""
    metrics: StageMetrics | None = None
    tensor: TensorData | None = None
    replica: str = ""  # host:port of the stage replica that produced it


@dataclass(frozen=True)
class StopProgress:
    """One step of a streamed StopProfile.

    Phases: per stage "flushing", "flushed", "pulling", "pulled" or "failed"; then "merging",
    "report" and, last, "done", which carries the report.
    """

    phase: str
    stage: str = ""
    replica: str = ""
    file: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    seconds: float = 0.0
    message: str = ""
    report: ProfileReport | None = None


@dataclass(frozen=True)
class SessionSummary:
    """A profile session kept on the orchestrator's disk."""

    session_id: str
    path: str
    """Its folder, relative to the orchestrator's profile root."""
    modified_unix_ns: int
    total_bytes: int
    files: tuple[ProfileFileInfo, ...]
    """Names relative to the session folder, e.g. "thinker/profiler_out_thinker.txt"."""


@dataclass(frozen=True)
class SessionList:
    profile_root: str
    sessions: tuple[SessionSummary, ...]
    """Newest first."""
    max_sessions: int = 0
    max_total_bytes: int = 0
