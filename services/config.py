"""Validated configuration of one stage service."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from omnistage.errors import InvalidRequestError
from omnistage.security import ServerSecurity

STAGE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"


class ProfilerSettings(BaseModel):
    """vLLM's profiler keys, so vLLM users already know them. Profiling is off unless set."""

    model_config = ConfigDict(extra="forbid")

    profiler: Literal["torch"] | None = Field(
        default=None, description="Which profiler; 'torch' is the one supported."
    )
    torch_profiler_dir: str = Field(
        default="", description="Where session folders go. Required to enable profiling."
    )
    torch_profiler_with_stack: bool = True
    torch_profiler_record_shapes: bool = False
    torch_profiler_with_memory: bool = False
    torch_profiler_with_flops: bool = False
    torch_profiler_use_gzip: bool = True
    delay_iterations: int = Field(default=0, ge=0, description="Engine steps to skip.")
    max_iterations: int = Field(default=0, ge=0, description="Most steps recorded; 0: no limit.")
    ignore_frontend: bool = Field(
        default=False, description="Skip the vLLM front-end trace (the API process)."
    )

    @model_validator(mode="after")
    def _dir_and_kind_agree(self) -> ProfilerSettings:
        if self.torch_profiler_dir and self.profiler is None:
            self.profiler = "torch"
        if self.profiler is not None and not self.torch_profiler_dir:
            raise ValueError(
                "profiler 'torch' needs torch_profiler_dir: the folder where traces go"
            )
        return self

    @property
    def enabled(self) -> bool:
        return self.profiler is not None and bool(self.torch_profiler_dir)

    @property
    def directory(self) -> Path:
        return Path(self.torch_profiler_dir).expanduser().resolve()


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
    engine_options: dict[str, Any] = Field(
        default_factory=dict, description="Extra engine arguments, passed through."
    )
    security: ServerSecurity = Field(
        default_factory=ServerSecurity, description="TLS, mTLS and the bearer token."
    )
    health_port: int | None = Field(
        default=None, ge=0, le=65535, description="An extra plaintext port for health only."
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
