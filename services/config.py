"""Validated configuration of one stage service."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from omnistage.profile_files import RetentionPolicy
from omnistage.security import ServerSecurity
from omnistage.settings import STAGE_NAME_PATTERN, ProfilerSettings
from omnistage.validation import DEFAULT_MAX_PROMPT_BYTES

DEFAULT_MAX_INFLIGHT = 128
"""Twice vLLM's default max_num_seqs: as many waiting in the engine as it runs at once."""


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
    max_prompt_bytes: int = Field(
        default=DEFAULT_MAX_PROMPT_BYTES,
        ge=0,
        description=(
            "UTF-8 bytes of a request's text (prompt, or all messages) the stage takes; a "
            "longer one is refused with INVALID_ARGUMENT before it is tokenized. 0: no limit."
        ),
    )
    max_prompt_tokens: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Tokens of a prompt the stage takes (after tokenizing, or token_ids); more are "
            "refused with INVALID_ARGUMENT. None: the model's context less one token."
        ),
    )
    shared_memory: bool = Field(
        default=True,
        description=(
            "Take and send tensors through shared memory for callers on this host "
            "(docs/shared-memory.md); False (--no-shm): bytes over gRPC only."
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
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Serve Prometheus' /metrics here; None: off."
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
