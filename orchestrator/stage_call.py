"""One Generate call on one stage, and the events and timings the runner builds from it."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from omnistage import shm_session
from omnistage.errors import (
    AbortedError,
    OmnistageError,
    OverloadedError,
    StageUnavailableError,
    reworded,
)
from omnistage.server import tracing
from omnistage.server.metrics import outcome_code
from omnistage.traces.spans import ChunkSpan
from omnistage.types import GenerateInput, OutputDelta
from omnistage.v1 import stage_pb2
from orchestrator.config import StageSpec
from orchestrator.pool import StagePool, StageReplica

logger = logging.getLogger(__name__)

T = TypeVar("T")
STAGE_SERVICE = stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name


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
    stage_time_s: float = 0.0  # as the stage reported it; duration_s minus it is the hop
    stage_first_output_s: float = 0.0  # the stage's own time to its first output
    chunks: tuple[ChunkSpan, ...] = ()  # a streamed stage's chunk calls, in order


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
    """The same kind of error, its message prefixed with the stage.

    It keeps the status code the stage answered with (the error's `code`, even one no error
    class stands for), so the orchestrator passes it on unchanged.
    """
    return reworded(error, f"stage {stage!r}: {error}")


def check_complete(delta: OutputDelta, stage: str, next_stage: str) -> None:
    """Refuse to hand on the output of a stage that ended the request early itself.

    The orchestrator cancels a stage's call only by closing its stream, so a `finished`
    with finish_reason "abort" is one it did not ask for (the engine, or another caller,
    aborted it): its output is partial, and the next stage must not run on it as if whole.
    """
    if delta.finished and delta.finish_reason == "abort":
        tokens = delta.metrics.generated_tokens if delta.metrics is not None else 0
        raise AbortedError(
            f"stage {stage!r} ended the request early (finish_reason abort, after {tokens} "
            f"tokens) without being cancelled, so stage {next_stage!r} did not run on its "
            "partial output; retry the request"
        )


@asynccontextmanager
async def closing(iterator: AsyncIterator[T]) -> AsyncIterator[AsyncIterator[T]]:
    """`iterator`, closed on exit (an async generator's `aclose`), so its calls end now."""
    try:
        yield iterator
    finally:
        await aclose(iterator)


async def aclose(iterator: AsyncIterator[T]) -> None:
    """Close an async generator now (any other iterator has nothing to close)."""
    close = getattr(iterator, "aclose", None)
    if close is not None:
        await close()


def stage_timeout(spec: StageSpec, deadline: float | None) -> float | None:
    """Seconds one call may take: the request's deadline, capped by the stage's timeout_s."""
    timeout = None if deadline is None else max(0.001, deadline - time.monotonic())
    if spec.timeout_s is not None:
        timeout = spec.timeout_s if timeout is None else min(timeout, spec.timeout_s)
    return timeout


async def call_stage(
    pool: StagePool, spec: StageSpec, stage_input: GenerateInput, *, deadline: float | None
) -> AsyncIterator[tuple[OutputDelta, str]]:
    """The deltas of one Generate call on the stage's next SERVING replica, with its address.

    A replica that is unreachable, or full (RESOURCE_EXHAUSTED: at its in-flight limit),
    before it sent anything is skipped and the call goes to the next replica; an unreachable
    one is also marked down. When every replica is full, the call fails with RESOURCE_EXHAUSTED
    and the shortest of their retry hints. Once output has flowed, a failure ends the request.
    Closing this iterator early cancels the call, so the stage aborts the request. With
    tracing on, the call is one CLIENT span, whose `traceparent` goes to the stage.
    """
    tried: list[str] = []
    full: dict[str, OverloadedError] = {}
    span = tracing.start_client_span(f"stage {spec.name}", _span_attributes(spec, stage_input))
    metadata = tracing.span_metadata(span)
    shared = shm_session.current()  # the request's shared-memory segments, on one host
    error: BaseException | None = None
    try:
        while True:
            try:
                replica = await pool.pick(spec.name, exclude=tried)
            except StageUnavailableError as exc:
                if full:
                    raise all_full(spec.name, full, others=str(exc)) from exc
                raise name_stage(exc, spec.name) from exc
            if span is not None:
                span.set_attribute("omnistage.replica", replica.address)
            started = False
            try:
                timeout = stage_timeout(spec, deadline)
                deltas = replica.client.generate(
                    stage_input,
                    timeout=timeout,
                    metadata=metadata,
                    shared=shared,
                    shared_output=shared is not None and shared.wants_output(spec.name),
                )
                async with closing(deltas):
                    async for delta in deltas:
                        started = True
                        if span is not None and delta.finished:
                            _annotate(span, delta)
                        yield delta, replica.address
                return
            except (StageUnavailableError, OverloadedError) as exc:
                _skip_replica(pool, spec, stage_input, replica, exc, tried, full, started=started)
            except OmnistageError as exc:
                logger.info(
                    "request %s failed in stage %s: %s", stage_input.request_id, spec.name, exc
                )
                raise name_stage(exc, spec.name) from exc
    except BaseException as exc:
        error = exc
        raise
    finally:
        if span is not None:
            tracing.end_span(span, outcome_code(error), error)


def _skip_replica(
    pool: StagePool,
    spec: StageSpec,
    stage_input: GenerateInput,
    replica: StageReplica,
    exc: StageUnavailableError | OverloadedError,
    tried: list[str],
    full: dict[str, OverloadedError],
    *,
    started: bool,
) -> None:
    """Note a replica that was unreachable or full, so the call tries the next one; raise
    when output had flowed already, or no replica is left to try."""
    tried.append(replica.address)
    overloaded = isinstance(exc, OverloadedError)
    if isinstance(exc, OverloadedError):
        full[replica.address] = exc
    else:
        pool.mark(replica, "UNAVAILABLE")
    others = [r for r in pool.replicas(spec.name) if r.address not in tried]
    if started or not others:
        logger.info("request %s: stage %s: %s", stage_input.request_id, spec.name, exc)
        if full and not started:
            raise all_full(spec.name, full) from exc
        raise name_stage(exc, spec.name) from exc
    logger.log(
        logging.INFO if overloaded else logging.WARNING,
        "request %s: stage %s replica %s %s, trying another: %s",
        stage_input.request_id,
        spec.name,
        replica.address,
        "full" if overloaded else "unavailable",
        exc,
    )


def _span_attributes(spec: StageSpec, stage_input: GenerateInput) -> dict[str, str]:
    return {
        "rpc.system": "grpc",
        "rpc.service": STAGE_SERVICE,
        "rpc.method": "Generate",
        "omnistage.stage": spec.name,
        "omnistage.request_id": stage_input.request_id,
    }


def _annotate(span: Any, delta: OutputDelta) -> None:
    """The stage's finish reason and tokens, on its call's span."""
    span.set_attribute("omnistage.finish_reason", delta.finish_reason)
    if delta.metrics is not None:
        span.set_attribute("omnistage.prompt_tokens", delta.metrics.prompt_tokens)
        span.set_attribute("omnistage.generated_tokens", delta.metrics.generated_tokens)


def all_full(stage: str, full: dict[str, OverloadedError], *, others: str = "") -> OverloadedError:
    """RESOURCE_EXHAUSTED for a stage whose every reachable replica refused a call as full."""
    retry = min((e.retry_after_ms for e in full.values() if e.retry_after_ms), default=0)
    rest = f"; the others: {others}" if others else ""
    when = f"retry after {retry} ms (trailing metadata 'retry-after-ms')" if retry else "retry"
    return OverloadedError(
        f"stage {stage!r}: every replica is at its in-flight limit "
        f"({', '.join(full)}){rest}; {when}, add replicas, or raise their --max-inflight",
        retry_after_ms=retry,
    )
