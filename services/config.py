"""Validated configuration of one stage service."""

from __future__ import annotations

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from omnistage.errors import InvalidRequestError
from omnistage.profile_files import RetentionPolicy
from omnistage.security import ServerSecurity

STAGE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


DEFAULT_MAX_INFLIGHT = 128
"""Twice vLLM's default max_num_seqs: as many waiting in the engine as it runs at once."""

TorchProfilerActivity = Literal["CPU", "CUDA", "PrivateUse1", "XPU"]

# vLLM's Proton keys and their defaults: accepted so a vLLM config loads as is, but a stage's
# sessions are torch traces, so each must stay at its default (vLLM allows them only with
# profiler "proton").
PROTON_DEFAULTS: dict[str, Any] = {
    "proton_profiler_dir": "",
    "proton_context": "shadow",
    "proton_data": "tree",
    "proton_backend": None,
    "proton_mode": None,
    "proton_hook": None,
    "proton_output_format": None,
    "proton_graph_attribution": False,
}


class ProfilerSettings(BaseModel):
    """vLLM 0.32's `ProfilerConfig` keys, every one of them, with vLLM's defaults, so a vLLM
    profiler config works unchanged. Off unless torch_profiler_dir is set.

    A vLLM stage passes them all to its engine. The torch engine honours with_stack,
    record_shapes, with_memory, with_flops, use_gzip and the delay/max iteration bounds.
    """

    model_config = ConfigDict(extra="forbid")

    profiler: Literal["torch"] | None = Field(
        default=None, description="Which profiler; 'torch' is the one a stage supports."
    )
    torch_profiler_dir: str = Field(
        default="", description="Where session folders go. Required to enable profiling."
    )
    torch_profiler_activities: list[TorchProfilerActivity] | None = Field(
        default=None, min_length=1, description="What workers record; None: the platform's."
    )
    torch_profiler_with_stack: bool = True
    torch_profiler_with_flops: bool = False
    torch_profiler_use_gzip: bool = True
    torch_profiler_dump_cuda_time_total: bool = True
    torch_profiler_record_shapes: bool = False
    torch_profiler_with_memory: bool = False
    capture_torch_profiler: bool = Field(
        default=False, description="Also profile CUDA graph capture (vLLM, GPU only)."
    )
    detailed_trace_annotation: bool = Field(
        default=False, description="Roofline metrics in vLLM's per-step trace annotations."
    )
    ignore_frontend: bool = Field(
        default=False, description="Skip the vLLM front-end trace (the API process)."
    )
    delay_iterations: int = Field(default=0, ge=0, description="Engine steps to skip.")
    max_iterations: int = Field(default=0, ge=0, description="Most steps recorded; 0: no limit.")
    warmup_iterations: int = Field(
        default=0, ge=0, description="torch schedule warm-up steps; 0: no schedule (vLLM)."
    )
    active_iterations: int = Field(default=5, ge=1, description="torch schedule active steps.")
    wait_iterations: int = Field(default=0, ge=0, description="torch schedule wait steps.")
    proton_profiler_dir: str = ""
    proton_context: Literal["shadow", "python"] = "shadow"
    proton_data: Literal["tree", "trace"] = "tree"
    proton_backend: Literal["cupti"] | None = None
    proton_mode: str | None = None
    proton_hook: Literal["triton"] | None = None
    proton_output_format: Literal["hatchet", "hatchet_msgpack", "chrome_trace"] | None = None
    proton_graph_attribution: bool = False

    @model_validator(mode="after")
    def _dir_and_kind_agree(self) -> ProfilerSettings:
        if self.torch_profiler_dir and self.profiler is None:
            self.profiler = "torch"
        if self.profiler is not None and not self.torch_profiler_dir:
            raise ValueError(
                "profiler 'torch' needs torch_profiler_dir: the folder where traces go"
            )
        activities = self.torch_profiler_activities
        if activities is not None and len(activities) != len(set(activities)):
            raise ValueError(f"torch_profiler_activities has duplicates: {activities}")
        if activities is not None and self.profiler is None:
            raise ValueError("torch_profiler_activities needs torch_profiler_dir")
        if self.capture_torch_profiler and self.profiler is None:
            raise ValueError("capture_torch_profiler needs torch_profiler_dir")
        proton = [k for k, default in PROTON_DEFAULTS.items() if getattr(self, k) != default]
        if proton:
            raise ValueError(
                f"{', '.join(proton)}: vLLM's proton_* keys need profiler 'proton', and a "
                "stage records torch traces; remove them and set torch_profiler_dir"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.profiler is not None and bool(self.torch_profiler_dir)

    @property
    def directory(self) -> Path:
        return Path(self.torch_profiler_dir).expanduser().resolve()

    def vllm_options(self, *, torch_profiler_dir: Path) -> dict[str, Any]:
        """Every key for vLLM's `ProfilerConfig`, with traces going to `torch_profiler_dir`."""
        return {
            **self.model_dump(),
            "profiler": "torch",
            "torch_profiler_dir": str(torch_profiler_dir),
        }


def unknown_profiler_keys_message(unknown: list[str]) -> str:
    """Name the unknown keys, the closest known one, and every key vLLM's profiler takes."""
    known = list(ProfilerSettings.model_fields)
    hints = [h for key in unknown for h in difflib.get_close_matches(key, known, n=1)]
    did_you_mean = f"; did you mean {', '.join(repr(h) for h in hints)}?" if hints else ""
    return (
        f"unknown profiler key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}"
        f"{did_you_mean} (vLLM's profiler keys: {', '.join(known)})"
    )


class StageConfig(BaseModel):
    """Everything one stage service needs, validated once at start."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=STAGE_NAME_PATTERN, description="The stage's name.")
    engine: Literal["vllm", "torch"] = "vllm"
    model: str = Field(min_length=1, description="A local model folder, or 'smollm2'.")
    host: str = "0.0.0.0"
    port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port.")
    profiler: ProfilerSettings = Field(default_factory=ProfilerSettings)
    dtype: str = Field(default="float32", description="float32 is fastest on CPUs without AMX.")
    max_model_len: int | None = Field(default=2048, ge=16)
    max_num_seqs: int = Field(default=64, ge=1)
    enforce_eager: bool = Field(
        default=True,
        description=(
            "Skip torch.compile. On a 2-core CPU compiling adds about 90 s to every start "
            "for about 1.3x the throughput; set False (--compile) for long-running stages."
        ),
    )
    kv_cache_gib: float = Field(default=1.0, gt=0, description="vLLM's CPU KV cache size.")
    grace_seconds: float = Field(default=30.0, ge=0, description="SIGTERM drain time.")
    max_inflight: int = Field(
        default=DEFAULT_MAX_INFLIGHT,
        ge=1,
        description=(
            "Generate calls the stage serves at once, queued ones included; the next is "
            "refused with RESOURCE_EXHAUSTED and a retry-after-ms hint. The torch engine's "
            "request queue holds as many."
        ),
    )
    health_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="How often the engine's liveness is polled; a dead one is NOT_SERVING.",
    )
    engine_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra engine arguments, passed through."
    )
    security: ServerSecurity = Field(
        default_factory=ServerSecurity, description="TLS, mTLS and the bearer token."
    )
    health_port: int | None = Field(
        default=None, ge=0, le=65535, description="An extra plaintext port for health only."
    )
    profile_max_sessions: int = Field(
        default=10,
        ge=0,
        description=(
            "Past profile sessions kept under torch_profiler_dir; after each StopProfile and "
            "at start the oldest beyond it are deleted. 0: no limit. The active session and "
            "the newest are always kept."
        ),
    )
    profile_max_bytes: int = Field(
        default=10 * 2**30,
        ge=0,
        description=(
            "Bytes all past profile sessions may take in all (default 10 GiB); the oldest "
            "sessions are deleted beyond it, but never the newest, even alone over it. 0: no "
            "limit."
        ),
    )

    @property
    def profile_retention(self) -> RetentionPolicy:
        return RetentionPolicy(
            max_sessions=self.profile_max_sessions, max_total_bytes=self.profile_max_bytes
        )


def parse_profiler_config(text: str) -> ProfilerSettings:
    """Parse `--profiler-config` JSON, with a message that says what to fix."""
    if not text.strip():
        return ProfilerSettings()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"--profiler-config is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidRequestError("--profiler-config must be a JSON object of vLLM's keys")
    unknown = sorted(str(k) for k in raw if k not in ProfilerSettings.model_fields)
    if unknown:
        raise InvalidRequestError(f"--profiler-config: {unknown_profiler_keys_message(unknown)}")
    try:
        return ProfilerSettings.model_validate(raw)
    except ValidationError as exc:
        raise InvalidRequestError(f"--profiler-config: {describe_validation_error(exc)}") from exc


def describe_validation_error(exc: ValidationError) -> str:
    """One line per problem, each with its key path."""
    parts = []
    for error in exc.errors():
        path = ".".join(str(p) for p in error["loc"]) or "(top level)"
        message = re.sub(r"^Value error, ", "", error["msg"])
        parts.append(f"{path}: {message}")
    return "; ".join(parts)
