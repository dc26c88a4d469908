"""One Generate call on one stage, and the events and timings the runner builds from it."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from omnistage.errors import OmnistageError
from omnistage.types import GenerateInput, OutputDelta
from orchestrator.config import StageSpec
from orchestrator.pool import StagePool

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class StageTiming:
    """One stage's share of one request, in seconds, plus wall-clock marks for timelines."""

    queue_time_s: float
    time_to_first_output_s: float
    duration_s: float
    handoff_s: float
    start_unix_ns: int
    first_output_unix_ns: int
    end_unix_ns: int


@dataclass(frozen=True)
class StageEvent:
    """One piece of a pipeline's output, tagged with the stage that produced it."""

    stage: str
    stage_index: int
    request_id: str
    delta: OutputDelta
    final: bool
    timing: StageTiming | None = None
    replica: str = ""


def name_stage(error: OmnistageError, stage: str) -> OmnistageError:
    """The same kind of error (so the same status code), its message prefixed with the stage."""
    renamed = type(error)(f"stage {stage!r}: {error}")
    renamed.__cause__ = error
    return renamed


@asynccontextmanager
async def closing(iterator: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """`iterator`, closed on exit (an async generator's `aclose`), so its calls end now."""
    try:
        yield iterator
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


def stage_timeout(spec: StageSpec, deadline: float | None) -> float | None:
    """Seconds one call may take: the request's deadline, capped by the stage's timeout_s."""
    timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
    if spec.timeout_s is not None:
        timeout = spec.timeout_s if timeout is None else min(timeout, spec.timeout_s)
    return timeout


async def call_stage(
    pool: StagePool, spec: StageSpec, stage_input: GenerateInput, *, deadline: float | None
) -> AsyncIterator[tuple[OutputDelta, str]]:
    """The deltas of one Generate call on the stage's next replica, with that replica's address.

    Closing this iterator early cancels the call, so the stage aborts the request.
    """
    replica = pool.next_replica(spec.name)
    try:
        deltas = replica.client.generate(stage_input, timeout=stage_timeout(spec, deadline))
        async with closing(deltas):
            async for delta in deltas:
                yield delta, replica.address
    except OmnistageError as exc:
        logger.info("request %s failed in stage %s: %s", stage_input.request_id, spec.name, exc)
        raise name_stage(exc, spec.name) from exc
