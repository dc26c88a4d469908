"""The pipeline file's `shared_memory` block: tensor hand-off between stages on one host.

How it works is `omnistage.shm` and docs/shared-memory.md; the runner opens one
`omnistage.shm_session` per request, and the server sweeps what dead processes left.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class SharedMemoryConfig(BaseModel):
    """Tensor hand-off through shared memory between stages on this host (docs/shared-memory.md)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        default=True,
        description="Hand tensors over by shared memory where a stage shares this host's "
        "domain; false: gRPC bytes only.",
    )
    min_bytes: int = Field(
        default=1 << 20, ge=0, description="Smaller output tensors go as gRPC bytes."
    )
