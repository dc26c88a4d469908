"""The pipeline file (YAML): its models, validated once at load, and errors that give the file,
the line and the key path of every problem, e.g.

    pipeline.yaml:14: stages[1].sampling.temperature: Input should be greater than or equal to 0
"""

from __future__ import annotations

import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from omnistage.errors import InvalidRequestError, echo
from omnistage.settings import STAGE_NAME_PATTERN, ProfilerSettings
from omnistage.validation import Sampling
from orchestrator.addresses import address_problems, join_host_port
from orchestrator.config_lines import (
    KeyPath,
    LineMap,
    StrPath,
    format_key_path,
    line_of,
    map_lines,
    pydantic_message,
    template_problems,
)
from orchestrator.security import StageSecurityConfig
from orchestrator.sessions import DEFAULT_MAX_BYTES, DEFAULT_MAX_SESSIONS, SessionStoreConfig
from orchestrator.shared_memory import SharedMemoryConfig

BUILTIN_PROCESSORS = ("text", "token_ids", "chat", "tensor")


class PipelineConfigError(InvalidRequestError):
    """The pipeline file is wrong. One problem per line, each with file, line and key path."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class _Problems(ValueError):
    """Cross-field problems, each at a key path relative to the model that found them."""

    def __init__(self, problems: list[tuple[KeyPath, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{format_key_path(p)}: {m}" for p, m in problems))


class SamplingConfig(Sampling):
    """A stage's sampling; the same keys and rules as a request's `sampling`."""


class InputConfig(BaseModel):
    """How a stage's input is built from the previous stage's output (an edge processor)."""

    model_config = ConfigDict(extra="forbid")

    processor: str = Field(default="text", description="A built-in or 'package.module:function'.")
    template: str | None = Field(default=None, description="text/chat: of {text} and {prompt}.")
    system: str | None = Field(default=None, description="chat: an optional system message.")
    stream_chunk: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Streaming hand-off: start this stage on every `stream_chunk` new tokens of the"
            " previous stage while it still generates (the last chunk may be shorter), one call"
            " per chunk, outputs in chunk order. Unset: wait for the previous stage to finish."
        ),
    )
    stream_first_chunk: int | None = Field(
        default=None, ge=1, description="With stream_chunk: the first chunk's size (sooner)."
    )

    @model_validator(mode="after")
    def _check(self) -> InputConfig:
        problems: list[tuple[KeyPath, str]] = []
        name = self.processor
        builtin = name in BUILTIN_PROCESSORS
        if not builtin and ":" not in name and "." not in name:
            why = f"unknown processor {name!r}; use a built-in ({', '.join(BUILTIN_PROCESSORS)})"
            problems.append((("processor",), f"{why} or 'package.module:function'"))
        elif not builtin and not re.fullmatch(r"\w+(\.\w+)*(:\w+(\.\w+)*)?", name):
            problems.append((("processor",), f"{name!r} is not a 'package.module:function' path"))
        if builtin and self.template is not None:
            if name in ("token_ids", "tensor"):
                problems.append((("template",), f"the {name} processor takes no template"))
            else:
                problems.extend((("template",), m) for m in template_problems(self.template))
        if builtin and name != "chat" and self.system is not None:
            problems.append((("system",), f"system is for the chat processor, not {name!r}"))
        if self.stream_first_chunk is not None and self.stream_chunk is None:
            problems.append((("stream_first_chunk",), "it needs stream_chunk; set both"))
        if problems:
            raise _Problems(problems)
        return self


class StageSpec(BaseModel):
    """One stage of the pipeline and where its service listens."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=STAGE_NAME_PATTERN, description="The stage's name.")
    address: str | None = Field(
        default=None,
        min_length=1,
        description="host:port of one server, or dns:///name:port: every address of the name.",
    )
    addresses: list[typing.Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="host:port of several replicas; instead of address."
    )
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Its defaults.")
    input: InputConfig = Field(default_factory=InputConfig, description="Unused by stage 0.")
    timeout_s: float | None = Field(default=None, gt=0, description="Per-stage deadline.")
    security: StageSecurityConfig | None = Field(
        default=None, description="Replaces the top-level security block for this stage."
    )

    @model_validator(mode="after")
    def _one_address_kind(self) -> StageSpec:
        if self.address is not None and self.addresses:
            raise _Problems([(("addresses",), "set address or addresses, not both")])
        problems: list[tuple[KeyPath, str]] = []
        if self.address is not None:
            problems += [(("address",), why) for why in address_problems(self.address)]
        for i, address in enumerate(self.addresses):
            problems += [(("addresses", i), why) for why in address_problems(address)]
        if problems:
            raise _Problems(problems)
        return self

    @property
    def all_addresses(self) -> list[str]:
        return [self.address] if self.address is not None else list(self.addresses)


class LaunchStage(BaseModel):
    """How `omnistage up` starts one stage locally."""

    model_config = ConfigDict(extra="forbid")

    engine: Literal["vllm", "torch"] = Field(default="vllm", description="The engine adapter.")
    model: str = Field(
        default="smollm2",
        min_length=1,
        description="vllm: smollm2 or a model folder (relative to this file); torch: pkg.mod:fn.",
    )
    port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port.")
    host: str = Field(default="127.0.0.1", min_length=1, description="The interface to bind.")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Prometheus /metrics port; None: off."
    )
    profiler_config: dict[str, Any] | None = Field(
        default=None, description="vLLM's profiler keys, passed to --profiler-config as JSON."
    )
    args: list[str] = Field(default_factory=list, description="Extra `stage serve` arguments.")

    @field_validator("profiler_config")
    @classmethod
    def _vllm_profiler_keys(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                ProfilerSettings.model_validate(value)
            except ValidationError as exc:
                raise _Problems(
                    [(tuple(e["loc"]), pydantic_message(e, ProfilerSettings)) for e in exc.errors()]
                ) from None
        return value

    @property
    def connect_address(self) -> str:
        """Where a client on this machine reaches the stage."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return join_host_port(host, self.port)


class LaunchConfig(BaseModel):
    """How `omnistage up` starts the pipeline locally."""

    model_config = ConfigDict(extra="forbid")

    stages: dict[str, LaunchStage] = Field(default_factory=dict, description="Keyed by stage name.")
    orchestrator_port: int = Field(default=50050, ge=0, le=65535, description="0: any port.")
    http_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="The orchestrator's OpenAI-compatible HTTP port; None: no HTTP, 0: any port.",
    )
    http_text_stage: str | None = Field(
        default=None,
        description="The stage whose text the HTTP API answers with; None: the last that makes "
        "text.",
    )
    orchestrator_metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="The orchestrator's /metrics port; None: off."
    )
    profile_dir: str = Field(
        default="profiles",
        min_length=1,
        description="The orchestrator's profile root: every collected session lands below it.",
    )
    profile_max_sessions: int = Field(
        default=DEFAULT_MAX_SESSIONS, ge=0, description="Sessions the orchestrator keeps; 0: all."
    )
    profile_max_bytes: int = Field(
        default=DEFAULT_MAX_BYTES, ge=0, description="Bytes of sessions it keeps; 0: no limit."
    )


class PipelineConfig(BaseModel):
    """The whole pipeline file."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(default="pipeline", min_length=1, description="The pipeline's name.")
    outputs: Literal["final", "all"] = Field(default="all", description="Which stages stream back.")
    stages: list[StageSpec] = Field(min_length=1, description="The stages, in order.")
    health_interval_s: float = Field(
        default=2.0, gt=0, le=300, description="Health checks' and dns:/// re-resolving's period."
    )
    shared_memory: SharedMemoryConfig = Field(
        default_factory=SharedMemoryConfig, description="Tensor hand-off on one host."
    )
    launch: LaunchConfig | None = Field(default=None, description="For `omnistage up`.")
    security: StageSecurityConfig | None = Field(
        default=None, description="TLS and token for connecting to every stage."
    )
    _source: Path | None = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _cross_check(self) -> PipelineConfig:
        problems: list[tuple[KeyPath, str]] = []
        launched = self.launch.stages if self.launch is not None else {}
        first: dict[str, int] = {}
        for i, stage in enumerate(self.stages):
            if stage.name in first:
                why = f"duplicate stage name {stage.name!r} (also stages[{first[stage.name]}])"
                problems.append((("stages", i, "name"), why))
            first.setdefault(stage.name, i)
            if i == 0 and stage.input.stream_chunk is not None:
                why = "stage 0 takes the client's request; set stream_chunk on a later stage"
                problems.append((("stages", 0, "input", "stream_chunk"), why))
            upstream = launched.get(self.stages[i - 1].name) if i else None
            if stage.input.stream_chunk is not None and upstream and upstream.engine == "torch":
                why = (
                    f"stage {self.stages[i - 1].name!r} is a torch stage (launch.stages): its "
                    "tensors cannot stream in chunks of tokens; remove stream_chunk to wait for "
                    "its finished output"
                )
                problems.append((("stages", i, "input", "stream_chunk"), why))
            if stage.all_addresses:
                continue
            launch = launched.get(stage.name)
            if launch is not None and launch.port != 0:
                self.stages[i] = stage.model_copy(update={"address": launch.connect_address})
            else:
                why = "its launch port is 0 (any free port)" if launch else "it has no launch entry"
                why = f"stage {stage.name!r} needs address or addresses ({why}), or a fixed port"
                problems.append((("stages", i), f"{why} under launch.stages"))
        for key in launched:
            if key not in first:
                why = f"{key!r} is not a stage of this pipeline; stages: {', '.join(first)}"
                problems.append((("launch", "stages", key), why))
        text_stage = self.launch.http_text_stage if self.launch is not None else None
        if text_stage is not None and text_stage not in first:
            why = f"{text_stage!r} is not a stage of this pipeline; stages: {', '.join(first)}"
            problems.append((("launch", "http_text_stage"), why))
        if problems:
            raise _Problems(problems)
        return self

    @property
    def source(self) -> Path | None:
        """The file this was loaded from, set by `load_pipeline`."""
        return self._source

    @property
    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    def stage_index(self, key: str) -> int:
        """A stage's index from its name or decimal index."""
        key = key.strip()
        names = self.stage_names
        if key in names:
            return names.index(key)
        if key.isascii() and key.isdecimal() and int(key) < len(names):
            return int(key)
        known = ", ".join(f"{i} {n!r}" for i, n in enumerate(names))
        raise InvalidRequestError(f"unknown stage {echo(key)}; the stages are {known}")

    def resolve_path(self, value: str) -> Path:
        """`value` as a path, relative to the pipeline file's folder unless absolute."""
        path = Path(value).expanduser()
        base = self._source.parent if self._source is not None else Path.cwd()
        return path if path.is_absolute() else (base / path).resolve()

    def default_profile_dir(self) -> Path:
        """The profile root: where StopProfile writes when the caller gives no output_dir."""
        return self.resolve_path(self.launch.profile_dir if self.launch else "profiles")

    def session_store(
        self,
        *,
        profile_dir: Path | None = None,
        max_sessions: int | None = None,
        max_bytes: int | None = None,
    ) -> SessionStoreConfig:
        """The profile root and retention: the arguments given, else the launch section's."""
        launch = self.launch or LaunchConfig()
        return SessionStoreConfig(
            root=profile_dir if profile_dir is not None else self.default_profile_dir(),
            max_sessions=launch.profile_max_sessions if max_sessions is None else max_sessions,
            max_total_bytes=launch.profile_max_bytes if max_bytes is None else max_bytes,
        )


def load_pipeline(path: Path) -> PipelineConfig:
    """Read and validate a pipeline file; PipelineConfigError lists every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineConfigError([f"{path}: cannot read the pipeline file: {exc}"]) from exc
    config = parse_pipeline(text, source=str(path))
    config._source = Path(path).resolve()
    return config


def parse_pipeline(text: str, *, source: str = "<string>") -> PipelineConfig:
    """Validate pipeline YAML; `source` names it in messages."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        what = f"{exc.problem} ({exc.context})" if exc.context else str(exc.problem)
        raise PipelineConfigError([f"{where}: invalid YAML: {what}"]) from None
    except yaml.YAMLError as exc:
        raise PipelineConfigError([f"{source}: invalid YAML: {exc}"]) from None
    finally:
        loader.dispose()
    if node is None:
        raise PipelineConfigError([f"{source}: the pipeline file is empty"])
    lines: LineMap = {}
    duplicates: list[StrPath] = []
    map_lines(node, (), lines, duplicates, set())
    problems = [
        (lines[d], f"{source}:{lines[d]}: {format_key_path(d)}: duplicate key") for d in duplicates
    ]
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            located = error.get("ctx", {}).get("error")
            found = [((), pydantic_message(error, PipelineConfig))]
            for rel, message in located.problems if isinstance(located, _Problems) else found:
                path: KeyPath = (*error["loc"], *rel)
                line = line_of(path, lines)
                problems.append((line, f"{source}:{line}: {format_key_path(path)}: {message}"))
    else:
        problems += _processor_problems(config, lines, source)
    if problems:
        raise PipelineConfigError([p for _, p in sorted(problems, key=lambda p: p[0])])
    return config


def _processor_problems(
    config: PipelineConfig, lines: LineMap, source: str
) -> list[tuple[int, str]]:
    """Each custom processor imported now, so a bad one fails at load, not on a request."""
    from orchestrator.processors import resolve_processor  # it imports this module

    problems = []
    for index, stage in enumerate(config.stages):
        if stage.input.processor in BUILTIN_PROCESSORS:
            continue
        try:
            resolve_processor(stage.input)
        except InvalidRequestError as exc:
            path: KeyPath = ("stages", index, "input", "processor")
            line = line_of(path, lines)
            problems.append((line, f"{source}:{line}: {format_key_path(path)}: {exc}"))
    return problems
