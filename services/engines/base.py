"""The one protocol every engine adapter implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

from omnistage.types import (
    EngineInfo,
    GenerateInput,
    OutputDelta,
    ProfileOptions,
    SamplingOptions,
)


class Engine(Protocol):
    """An engine behind a stage: generation, abort and a profiler with idempotent stop.

    Invalid requests raise `InvalidRequestError` before anything is queued, so nothing is
    left in the engine. Cancelling the iterator returned by `generate` aborts the request.
    """

    async def start(self) -> None:
        """Load the model; return when the engine can serve."""
        ...

    def generate(self, request: GenerateInput) -> AsyncIterator[OutputDelta]:
        """Stream one request's output, ending with a delta whose `finished` is True."""
        ...

    def check_sampling(self, options: SamplingOptions) -> None:
        """Raise `InvalidRequestError` when `generate` would refuse `options` whatever the
        input (a value past the engine's own bounds); run nothing. An orchestrator asks this
        of a later stage before its first stage runs."""
        ...

    async def abort(self, request_id: str) -> None:
        """Drop a request from the engine; a no-op for an unknown id."""
        ...

    async def start_profile(self, session_dir: Path, options: ProfileOptions) -> None:
        """Start the engine's profiler for a session whose files go into `session_dir`."""
        ...

    async def stop_profile(self, session_dir: Path) -> list[Path]:
        """Stop the profiler, move its files into `session_dir` and return them."""
        ...

    def info(self) -> EngineInfo:
        """Describe the engine and its current load."""
        ...

    async def close(self) -> None:
        """Release the engine and its processes."""
        ...
