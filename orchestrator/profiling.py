"""Profile sessions across stages: validated fan-out start with rollback, concurrent stop,
and every stage's files pulled over gRPC into one folder on the orchestrator's side."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from omnistage.errors import (
    CancelledError,
    DeadlineError,
    EngineDeadError,
    InvalidRequestError,
    OmnistageError,
    ProfilerStateError,
    StageUnavailableError,
    reworded,
)
from omnistage.trace_context import current_trace_id
from omnistage.traces.clock import ClockEstimate, combine
from omnistage.traces.critical import critical_paths
from omnistage.traces.report import rebuild_report, write_session
from omnistage.traces.slimming import SlimOptions
from omnistage.traces.spans import RequestSpan
from omnistage.types import ProfileOptions, ProfileReport, StageProfileResult, StopProgress
from omnistage.validation import validate_profile_options
from orchestrator.clock_sampling import sample_clocks
from orchestrator.collect import Progress, StageCollector, replica_dir
from orchestrator.config import PipelineConfig
from orchestrator.pool import SERVING, StagePool, StageReplica
from orchestrator.profile_state import ActiveSession, find_lost, new_session
from orchestrator.runner import StageEvent
from orchestrator.sessions import CollectedSessions

logger = logging.getLogger(__name__)


# Errors after which a StartProfile may still have reached its stage (the answer was lost, not
# refused), so the rollback stops that stage too. A refusal (already profiling, profiling off,
# bad options) leaves the stage as it was: its own session, if any, is not ours to stop.
MAYBE_STARTED = (DeadlineError, StageUnavailableError, EngineDeadError, CancelledError)


class PipelineProfiler:
    """At most one cross-stage session at a time."""

    def __init__(
        self,
        pipeline: PipelineConfig,
        pool: StagePool,
        *,
        sessions: CollectedSessions,
        on_stopped: Callable[[float, ProfileReport], None] | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._pool = pool
        self._sessions = sessions
        self._on_stopped = on_stopped  # (seconds, report) of each stop that collected
        self._stopping: set[asyncio.Future[ProfileReport]] = set()
        self._active: ActiveSession | None = None
        self._lock = asyncio.Lock()

    @property
    def active_session_id(self) -> str:
        return self._active.session_id if self._active else ""

    def profiling_stages(self) -> list[str]:
        return self._active.profiling_stages() if self._active else []

    async def check_stages(self) -> list[str]:
        """Ask the profiling stages which session they hold, then `profiling_stages`: a stage
        that restarted during the session is profiling no more. Skipped while a start or stop
        holds the session (the stop checks them itself)."""
        session = self._active
        if session is not None and not self._lock.locked():
            await find_lost(session, [t for targets in session.stages.values() for t in targets])
        return self.profiling_stages()

    def _select(self, keys: list[str]) -> list[str]:
        """Stage names for names or decimal indices; empty means all. Raises before any call."""
        if not keys:
            return [spec.name for spec in self._pipeline.stages]
        names = []
        for key in keys:
            name = self._pipeline.stages[self._pipeline.stage_index(key)].name
            if name not in names:
                names.append(name)
        return names

    async def start(
        self, keys: list[str], options: ProfileOptions
    ) -> tuple[str, dict[str, list[str]]]:
        """Start the selected stages; on any failure stop those already started, then raise."""
        names = self._select(keys)
        validate_profile_options(options)
        async with self._lock:
            if self._active is not None:
                raise ProfilerStateError(
                    f"profile session {self._active.session_id} is active on stages "
                    f"{list(self._active.stages)}; call StopProfile first"
                )
            session = new_session(options)
            targets = await self._serving_replicas(names)
            asked: list[StageReplica] = []

            async def start_one(replica: StageReplica) -> str:
                asked.extend(() if options.timing_only else (replica,))  # timing-only: none
                return await self._start_one(replica, session.session_id, options)

            try:
                results = await asyncio.gather(
                    *(start_one(r) for r in targets), return_exceptions=True
                )
                failures = [
                    (r, e)
                    for r, e in zip(targets, results, strict=True)
                    if isinstance(e, BaseException)
                ]
                started = [
                    (r, sid)
                    for r, sid in zip(targets, results, strict=True)
                    if isinstance(sid, str)
                ]
                if not failures:
                    session.clock_start = await self._clocks([r for r, _ in started])
            except BaseException:
                # Cancelled (the caller went away) mid-way: a start still in flight may have
                # reached its stage, so every stage that was asked is stopped again, and the
                # rollback runs to its end even if this task is cancelled once more.
                logger.warning("StartProfile interrupted; stopping %d stages", len(asked))
                await asyncio.shield(self._rollback(asked))
                raise
            if failures:
                unsure = [r for r, e in failures if isinstance(e, MAYBE_STARTED)]
                await self._rollback([r for r, _ in started] + unsure)
                replica, error = failures[0]
                if isinstance(error, OmnistageError):
                    raise reworded(
                        error,
                        f"stage {replica.stage!r} ({replica.address}) could not start profiling: "
                        f"{error}; no stage is left profiling",
                    )
                raise error
            for replica, stage_session in started:
                session.stages.setdefault(replica.stage, []).append((replica, stage_session))
            self._active = session
            logger.info("profile session %s started on %s", session.session_id, names)
            return session.session_id, {n: [sid for _, sid in session.stages[n]] for n in names}

    async def _serving_replicas(self, names: list[str]) -> list[StageReplica]:
        """Every SERVING replica of the named stages, checked now; each stage needs one."""
        await self._pool.refresh(names)
        targets: list[StageReplica] = []
        for name in names:
            replicas = self._pool.replicas(name)
            serving = [r for r in replicas if r.health == SERVING]
            if not serving:
                raise StageUnavailableError(
                    f"stage {name!r} cannot be profiled: {self._pool.describe_unready(name)}; "
                    "no stage was started"
                )
            for replica in replicas:
                if replica.health != SERVING:
                    logger.warning(
                        "profiling stage %s without replica %s: it is %s",
                        name,
                        replica.address,
                        replica.health,
                    )
            targets += serving
        return targets

    def record(self, event: StageEvent) -> None:
        """Keep a finished stage's timing while a session is active, for the timeline."""
        session, timing = self._active, event.timing
        if session is None or timing is None:
            return
        session.spans.append(
            RequestSpan(
                request_id=event.request_id,
                stage=event.stage,
                stage_index=event.stage_index,
                replica=event.replica,
                start_unix_ns=timing.start_unix_ns,
                first_output_unix_ns=timing.first_output_unix_ns or timing.end_unix_ns,
                end_unix_ns=timing.end_unix_ns,
                handoff_s=timing.handoff_s,
                queue_time_s=timing.queue_time_s,
                trace_id=current_trace_id(),
                stage_time_s=timing.stage_time_s,
                stage_first_output_s=timing.stage_first_output_s,
                chunks=timing.chunks,
            )
        )

    async def _clocks(self, replicas: list[StageReplica]) -> dict[str, ClockEstimate]:
        """Each replica's clock offset from a few GetInfo round trips; failures are skipped."""
        return await sample_clocks(replicas, self._clock_key)

    def _clock_key(self, replica: StageReplica) -> str:
        """The stage's name, or stage/<replica folder> when the stage has replicas."""
        if self._pool.has_replicas(replica.stage):
            return f"{replica.stage}/{replica_dir(Path(), replica, True).name}"
        return replica.stage

    async def _start_one(
        self, replica: StageReplica, session_id: str, options: ProfileOptions
    ) -> str:
        if options.timing_only:  # spans, stage times and clocks only: the stage is not asked
            return ""
        return await replica.client.start_profile(
            label=session_id,
            delay_iterations=options.delay_iterations or 0,
            max_iterations=options.max_iterations or 0,
        )

    async def _rollback(self, started: list[StageReplica]) -> None:
        """Stop profiling on each replica; one that cannot stop is logged, not raised."""

        async def stop(replica: StageReplica) -> None:
            try:
                await replica.client.stop_profile()
            except OmnistageError as exc:
                logger.warning(
                    "rollback: could not stop %s (%s): %s", replica.stage, replica.address, exc
                )

        await asyncio.gather(*(stop(r) for r in started))

    async def _with_timeline(
        self,
        report: ProfileReport,
        session_dir: Path,
        slim: SlimOptions | None,
        progress: Progress,
    ) -> ProfileReport:
        """The report with its merged timeline and summary; without them if building fails."""
        progress(StopProgress(phase="merging", message="merging every trace onto one timeline"))
        started = time.monotonic()
        try:
            files = await asyncio.to_thread(rebuild_report, session_dir, slim=slim)
        except (OSError, ValueError) as exc:
            logger.exception("could not build the timeline of %s", session_dir)
            return replace(report, summary=f"timeline not built: {exc}")
        seconds = time.monotonic() - started
        logger.info("timeline and summary built in %.1f s", seconds)
        progress(
            StopProgress(
                phase="report",
                seconds=seconds,
                message=f"timeline and summary written in {seconds:.1f} s",
            )
        )
        return replace(
            report,
            timeline=str(files.timeline),
            timelines=tuple(str(p) for p in files.timelines),
            warnings=files.warnings,
            summary=str(files.summary),
            summary_html=str(files.summary_html),
            slimming=files.slimming(),
            critical_paths=files.critical_paths,  # with the engine steps' split
        )

    async def _collect(
        self,
        session: ActiveSession,
        targets: list[tuple[StageReplica, str]],
        session_dir: Path,
        progress: Progress,
    ) -> list[StageProfileResult]:
        """Stop each replica and pull its files (a timing-only session: neither)."""
        if session.timing_only:
            return await asyncio.gather(*(_collected_nothing(r) for r, _ in targets))
        multi = {r.stage for r, _ in targets if self._pool.has_replicas(r.stage)}
        collectors = [
            StageCollector(r, sid, replica_dir(session_dir, r, r.stage in multi), progress)
            for r, sid in targets
        ]
        return await asyncio.gather(*(c.collect() for c in collectors))

    async def stop(
        self,
        keys: list[str],
        output_dir: str,
        *,
        slim: SlimOptions | None = None,
        progress: Progress | None = None,
    ) -> ProfileReport:
        """Stop the selected profiling stages concurrently and pull their files.

        A caller that goes away (cancelled) does not cut the stop short: it runs to its end
        in the background, and the session is kept under the profile root.
        """
        task = asyncio.ensure_future(self._stop(keys, output_dir, slim, progress or _ignore))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
        if self._on_stopped is not None:
            task.add_done_callback(functools.partial(self._stopped, time.monotonic()))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                logger.warning(
                    "the caller of StopProfile went away; the session is still collected and "
                    "kept under %s (omnistage profile list)",
                    self._sessions.root,
                )
            raise

    async def _stop(
        self, keys: list[str], output_dir: str, slim: SlimOptions | None, progress: Progress
    ) -> ProfileReport:
        async with self._lock:
            session = self._active
            if session is None:
                raise ProfilerStateError("no profile session is active; call StartProfile first")
            names = list(session.stages) if not keys else self._select(keys)
            session_dir = await asyncio.to_thread(self._stop_dir, session, names, output_dir, slim)
            targets = [(r, sid) for n in names for r, sid in session.stages[n]]
            await find_lost(session, targets)  # a restarted stage is not asked to stop
            live, lost = session.split_lost(targets)
            clock_stop = await self._clocks([r for r, _ in live])
            results = await self._collect(session, live, session_dir, progress) + lost
            for result in results:  # checked on the pull: the listing below need not rehash
                for item in result.files if result.ok else ():
                    self._sessions.remember(Path(result.local_dir) / item.name, item.sha256)
            for name in names:
                del session.stages[name]
            if not session.stages:
                self._active = None
            report = ProfileReport(
                session_id=session.session_id,
                output_dir=str(session_dir),
                stages=tuple(results),
                critical_paths=critical_paths(session.spans),
                timing_only=session.timing_only,
            )
            clocks = {
                key: combine(session.clock_start.get(key), clock_stop.get(key))
                for key in session.clock_start.keys() | clock_stop.keys()
            }
            write_session(session_dir, report, spans=session.spans, clocks=clocks)
            report = await self._with_timeline(report, session_dir, slim, progress)
            listed = await self._sessions.summary(session_dir)
            await self._sessions.prune(keep=session_dir)
            return replace(report, session_files=listed.files)

    def _stop_dir(
        self, session: ActiveSession, names: list[str], output_dir: str, slim: SlimOptions | None
    ) -> Path:
        """Check a stop's arguments before any stage is asked; the session's folder, made."""
        idle = [n for n in names if n not in session.stages]
        if idle:
            raise InvalidRequestError(
                f"stages {idle} are not profiling in session {session.session_id}; "
                f"the profiling stages are {list(session.stages)}"
            )
        if session.timing_only and slim is not None:
            raise InvalidRequestError(
                f"session {session.session_id} is timing-only: it has no traces to slim; "
                "stop it without slimming (it is still recording)"
            )
        return self._sessions.make_session_dir(output_dir, session.session_id)

    def _stopped(self, started: float, task: asyncio.Future[ProfileReport]) -> None:
        if self._on_stopped is not None and not task.cancelled() and task.exception() is None:
            self._on_stopped(time.monotonic() - started, task.result())


async def _collected_nothing(replica: StageReplica) -> StageProfileResult:
    """A timing-only session's stage: no profiler to stop, no file to pull."""
    return StageProfileResult(stage=replica.stage, replica=replica.address, ok=True)


def _ignore(event: StopProgress) -> None:
    pass
