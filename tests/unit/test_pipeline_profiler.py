"""The pipeline profiler's fan-out on fake stages: rollback when cancelled, concurrent stop,
and the files it pulls checked (names that would escape the session folder, corrupt bytes)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from omnistage.errors import (
    DeadlineError,
    InvalidRequestError,
    OmnistageError,
    ProfilerStateError,
    StageDrainingError,
    StageUnavailableError,
)
from omnistage.traces.slimming import SlimOptions
from omnistage.types import (
    EngineInfo,
    OutputDelta,
    ProfileFileInfo,
    ProfileManifest,
    ProfileOptions,
    ProfileReport,
    StageDescription,
)
from orchestrator.config import parse_pipeline
from orchestrator.pool import SERVING, StageReplica
from orchestrator.profiling import PipelineProfiler
from orchestrator.sessions import CollectedSessions, SessionStoreConfig
from orchestrator.stage_call import StageEvent, StageTiming
from tests.waiting import eventually

TRACE = b'{"traceEvents": []}'


@dataclass
class FakeStageClient:
    """A stage's profiler: start and stop take their delays; stop serves `files`."""

    name: str
    start_delay: float = 0.0
    stop_delay: float = 0.0
    files: dict[str, bytes] = field(default_factory=lambda: {"profiler_out_0.txt": TRACE})
    served: dict[str, bytes] = field(default_factory=dict)  # bytes served instead, by name
    profiling: bool = False
    starts: int = 0
    stops: int = 0
    stops_done: int = 0  # stops that have returned or raised
    fetched: list[str] = field(default_factory=list)
    # StartProfile fails with this; `start_reaches` says whether the stage started all the same
    # (an answer lost on the way back, such as a deadline), or refused (already profiling).
    start_error: OmnistageError | None = None
    start_reaches: bool = False
    fetch_error: OSError | None = None
    fetch_refusals: list[OmnistageError] = field(default_factory=list)  # the next fetches fail
    restarted: bool = False  # GetInfo answers: no active session (the stage came back empty)

    async def start_profile(
        self, *, label: str = "", delay_iterations: int = 0, max_iterations: int = 0
    ) -> str:
        self.starts += 1
        await asyncio.sleep(self.start_delay)  # the stage's time to start: behaviour, not a wait
        if self.start_error is not None:
            if self.start_reaches:
                self.profiling = True
            raise self.start_error
        self.profiling = True
        return f"{self.name}-{label}"

    async def stop_profile(self, *, timeout: float = 0.0) -> ProfileManifest:
        self.stops += 1
        try:
            await asyncio.sleep(self.stop_delay)  # the stage's time to stop: behaviour, not a wait
            if not self.profiling:
                raise ProfilerStateError("no profile session is active")
            self.profiling = False
        finally:
            self.stops_done += 1
        infos = tuple(
            ProfileFileInfo(name, len(data), hashlib.sha256(data).hexdigest())
            for name, data in self.files.items()
        )
        return ProfileManifest(session_id=f"{self.name}-s", profile_dir="", files=infos)

    async def fetch_file(
        self,
        session_id: str,
        name: str,
        dest: Path,
        *,
        offset: int = 0,
        on_bytes: Callable[[int], None] | None = None,
    ) -> int:
        self.fetched.append(name)
        if self.fetch_error is not None:
            raise self.fetch_error
        if self.fetch_refusals:
            raise self.fetch_refusals.pop(0)
        data = self.served.get(name, self.files[name])
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        if on_bytes is not None:
            on_bytes(len(data))
        return len(data)

    async def info(self, *, timeout: float = 10.0) -> object:
        if self.restarted:
            engine = EngineInfo(engine="torch", model="m", running_requests=0)
            return StageDescription(self.name, engine, True, False, "", time.time_ns(), "", "")
        raise StageUnavailableError("no clock samples in these tests")


class FakePool:
    def __init__(self, clients: list[FakeStageClient]) -> None:
        self._replicas = {
            c.name: StageReplica(c.name, i, f"fake:{i}", c, health=SERVING)  # type: ignore[arg-type]
            for i, c in enumerate(clients)
        }

    async def refresh(self, stages: object = None) -> None:
        pass

    def replicas(self, stage: str) -> list[StageReplica]:
        return [self._replicas[stage]]

    def has_replicas(self, stage: str) -> bool:
        return False

    def describe_unready(self, stage: str) -> str:
        return "down"


def profiler(clients: list[FakeStageClient], out: Path) -> PipelineProfiler:
    pipeline = parse_pipeline(
        "stages:\n"
        + "".join(
            f"  - {{name: {c.name}, address: 'fake:{i + 1}'}}\n" for i, c in enumerate(clients)
        )
    )
    sessions = CollectedSessions(SessionStoreConfig(root=out))
    return PipelineProfiler(pipeline, FakePool(clients), sessions=sessions)  # type: ignore[arg-type]


def three(**delays: float) -> list[FakeStageClient]:
    return [
        FakeStageClient(name, **{k: v[i] for k, v in delays.items()})  # type: ignore[arg-type]
        for i, name in enumerate(("thinker", "talker", "code2wav"))
    ]


def two_started(clients: list[FakeStageClient]) -> Callable[[], bool]:
    return lambda: clients[0].profiling and clients[1].profiling


def test_cancelled_start_stops_every_stage_it_reached(tmp_path: Path) -> None:
    clients = three(start_delay=(0.0, 0.0, 30.0))
    prof = profiler(clients, tmp_path)

    async def scenario() -> None:
        task = asyncio.create_task(prof.start([], ProfileOptions()))
        await eventually(two_started(clients), timeout=10, what="thinker and talker started")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert [c.starts for c in clients] == [1, 1, 1]
    assert [c.stops for c in clients] == [1, 1, 1]
    assert not any(c.profiling for c in clients)
    assert prof.active_session_id == "" and prof.profiling_stages() == []


def test_rollback_finishes_when_cancelled_again(tmp_path: Path) -> None:
    clients = three(start_delay=(0.0, 0.0, 30.0), stop_delay=(0.2, 0.2, 0.2))
    prof = profiler(clients, tmp_path)

    async def scenario() -> None:
        task = asyncio.create_task(prof.start([], ProfileOptions()))
        await eventually(two_started(clients), timeout=10, what="thinker and talker started")
        task.cancel()
        await eventually(
            lambda: all(c.stops for c in clients), timeout=10, what="the rollback's stops"
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the shielded rollback goes on to its end
        await eventually(
            lambda: all(c.stops_done for c in clients), timeout=10, what="the rollback's end"
        )
        # and the profiler can start a new session afterwards
        for client in clients:
            client.start_delay = 0.0
        await prof.start(["thinker"], ProfileOptions())

    asyncio.run(scenario())
    assert not clients[1].profiling and not clients[2].profiling
    assert clients[0].profiling and prof.profiling_stages() == ["thinker"]


def stop(prof: PipelineProfiler, out: Path) -> ProfileReport:
    async def scenario() -> ProfileReport:
        await prof.start([], ProfileOptions())
        return await prof.stop([], str(out))

    return asyncio.run(scenario())


def test_stop_runs_the_stages_concurrently(tmp_path: Path) -> None:
    delays = (0.3, 0.6, 0.9)
    clients = three(stop_delay=delays)
    prof = profiler(clients, tmp_path)

    async def scenario() -> tuple[float, ProfileReport]:
        await prof.start([], ProfileOptions())
        started = time.monotonic()
        report = await prof.stop([], str(tmp_path))
        return time.monotonic() - started, report

    elapsed, report = asyncio.run(scenario())
    assert all(s.ok for s in report.stages)
    assert max(delays) <= elapsed < sum(delays) - 0.5
    stop_seconds = [s.stop_seconds for s in report.stages]
    assert all(d <= s < d + 0.3 for d, s in zip(delays, stop_seconds, strict=True))


@pytest.mark.parametrize("bad", ["../escaped.txt", "<tmp>/escaped.txt", "sub/x.txt", "..", ""])
def test_unsafe_manifest_name_fails_that_stage_only(tmp_path: Path, bad: str) -> None:
    bad = bad.replace("<tmp>", str(tmp_path))  # an absolute name
    clients = three()
    clients[1].files = {"ok.txt": TRACE, bad: b"evil"}
    out = tmp_path / "out"
    report = stop(profiler(clients, out), out)
    by_stage = {s.stage: s for s in report.stages}
    talker = by_stage["talker"]
    assert not talker.ok and repr(bad) in talker.error and "plain file name" in talker.error
    assert clients[1].fetched == []  # rejected before any file was opened
    assert not list(tmp_path.rglob("escaped.txt"))
    for name in ("thinker", "code2wav"):
        assert by_stage[name].ok
        assert (Path(report.output_dir) / name / "profiler_out_0.txt").read_bytes() == TRACE


def test_corrupt_file_fails_that_stage_with_both_hashes(tmp_path: Path) -> None:
    clients = three()
    clients[2].served = {"profiler_out_0.txt": b"corrupted bytes"}
    report = stop(profiler(clients, tmp_path), tmp_path)
    by_stage = {s.stage: s for s in report.stages}
    error = by_stage["code2wav"].error
    assert not by_stage["code2wav"].ok and "profiler_out_0.txt" in error
    assert hashlib.sha256(b"corrupted bytes").hexdigest() in error
    assert hashlib.sha256(TRACE).hexdigest() in error
    assert "deleted" in error  # corrupt bytes are not left where a trace is expected
    assert not (Path(report.output_dir) / "code2wav" / "profiler_out_0.txt").exists()
    for name in ("thinker", "talker"):
        assert by_stage[name].ok
        assert (Path(report.output_dir) / name / "profiler_out_0.txt").read_bytes() == TRACE


def test_a_start_whose_answer_was_lost_is_rolled_back_too(tmp_path: Path) -> None:
    """A deadline after the stage started: the stage is profiling, so it is stopped again."""
    clients = three()
    clients[2].start_error = DeadlineError("StartProfile ran past its deadline")
    clients[2].start_reaches = True
    prof = profiler(clients, tmp_path)
    with pytest.raises(DeadlineError) as info:
        asyncio.run(prof.start([], ProfileOptions()))
    assert "'code2wav'" in str(info.value) and "no stage is left profiling" in str(info.value)
    assert not any(c.profiling for c in clients)
    assert [c.stops for c in clients] == [1, 1, 1]
    assert prof.active_session_id == ""


def test_a_stage_that_refused_keeps_its_own_session(tmp_path: Path) -> None:
    """A stage already profiling (someone started it directly) refuses; the rollback stops
    only the stages this call started, never the session the stage already had."""
    clients = three()
    clients[1].profiling = True
    clients[1].start_error = ProfilerStateError("profile session s-1 is already active")
    prof = profiler(clients, tmp_path)
    with pytest.raises(ProfilerStateError) as info:
        asyncio.run(prof.start([], ProfileOptions()))
    assert "'talker'" in str(info.value) and "already active" in str(info.value)
    assert clients[1].profiling and clients[1].stops == 0
    assert not clients[0].profiling and not clients[2].profiling


def test_a_refusal_keeps_the_stages_own_status_code(tmp_path: Path) -> None:
    clients = three()
    refusal = OmnistageError("method not implemented", code="UNIMPLEMENTED")
    clients[0].start_error = refusal
    with pytest.raises(OmnistageError) as info:
        asyncio.run(profiler(clients, tmp_path).start([], ProfileOptions()))
    assert info.value.code == "UNIMPLEMENTED"
    assert "'thinker'" in str(info.value) and "method not implemented" in str(info.value)


def test_a_file_that_cannot_be_written_fails_that_stage_only(tmp_path: Path) -> None:
    clients = three()
    clients[0].fetch_error = OSError(28, "No space left on device")
    prof = profiler(clients, tmp_path)
    report = stop(prof, tmp_path)
    by_stage = {s.stage: s for s in report.stages}
    error = by_stage["thinker"].error
    assert not by_stage["thinker"].ok and "No space left on device" in error
    assert "output_dir" in error and "thinker-s" in error
    assert by_stage["talker"].ok and by_stage["code2wav"].ok
    assert prof.active_session_id == ""  # the session ended; the others' files are kept


def test_an_unwritable_output_dir_stops_nothing(tmp_path: Path) -> None:
    clients = three()
    prof = profiler(clients, tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    async def scenario() -> None:
        await prof.start([], ProfileOptions())
        with pytest.raises(InvalidRequestError) as info:
            await prof.stop([], str(blocker / "out"))
        assert "writable output_dir" in str(info.value) and "still profiling" in str(info.value)
        assert all(c.profiling for c in clients) and prof.active_session_id
        report = await prof.stop([], str(tmp_path / "out"))
        assert all(s.ok for s in report.stages)

    asyncio.run(scenario())


def _stage_done(stage: str, index: int, start_ms: float, end_ms: float) -> StageEvent:
    base = time.time_ns()
    start, end = base + round(start_ms * 1e6), base + round(end_ms * 1e6)
    timing = StageTiming(
        queue_time_s=0.001,
        time_to_first_output_s=0.002,
        duration_s=(end - start) / 1e9,
        handoff_s=0.0,
        start_unix_ns=start,
        first_output_unix_ns=start + 2_000_000,
        end_unix_ns=end,
        stage_time_s=(end - start) / 1e9 * 0.9,
    )
    return StageEvent(stage, index, "r1", OutputDelta("r1", finished=True), True, timing)


def test_a_timing_only_session_asks_no_stage_to_profile(tmp_path: Path) -> None:
    clients = three()
    prof = profiler(clients, tmp_path)

    async def scenario() -> ProfileReport:
        await prof.start([], ProfileOptions(label="timing", timing_only=True))
        assert prof.profiling_stages() == ["thinker", "talker", "code2wav"]
        for i, (name, start, end) in enumerate((("thinker", 0, 40), ("talker", 41, 90))):
            prof.record(_stage_done(name, i, start, end))
        prof.record(_stage_done("code2wav", 2, 91, 120))
        with pytest.raises(InvalidRequestError, match="timing-only: it has no traces to slim"):
            await prof.stop([], "", slim=SlimOptions())
        return await prof.stop([], "")

    report = asyncio.run(scenario())
    assert [(c.starts, c.stops, c.fetched) for c in clients] == [(0, 0, [])] * 3
    assert report.timing_only and not report.failed
    assert all(s.ok and not s.files for s in report.stages)
    (path,) = report.critical_paths
    segments = path.end_to_end
    assert sum(s.end_unix_ns - s.start_unix_ns for s in segments) == (
        path.end_unix_ns - path.start_unix_ns
    )
    folder = Path(report.output_dir)
    assert json.loads((folder / "report.json").read_text())["timing_only"] is True
    summary = Path(report.summary).read_text()
    assert "- timing only:" in summary and "## Critical path" in summary
    assert "| r1 |" in summary and "**Bottleneck:**" in summary


@pytest.mark.parametrize("key", ["delay_iterations", "max_iterations"])
def test_timing_only_refuses_a_profilers_step_counts(tmp_path: Path, key: str) -> None:
    clients = three()
    options = ProfileOptions(timing_only=True, **{key: 3})  # type: ignore[arg-type]
    with pytest.raises(InvalidRequestError, match=f"timing_only starts no profiler, so {key}"):
        asyncio.run(profiler(clients, tmp_path).start([], options))
    assert all(c.starts == 0 for c in clients)


def test_timing_only_comes_over_the_wire() -> None:
    from omnistage.convert import profile_options_from_pb
    from omnistage.v1 import orchestrator_pb2, stage_pb2

    request = orchestrator_pb2.PipelineStartProfileRequest(label="x", timing_only=True)
    assert profile_options_from_pb(request) == ProfileOptions(label="x", timing_only=True)
    assert not profile_options_from_pb(stage_pb2.StartProfileRequest(label="x")).timing_only


# -- the orchestrator's own disk: pulled files are written only inside the session folder ------


def planted(prof: PipelineProfiler, root: Path, plant: Callable[[Path], None]) -> Callable[[], Any]:
    """Start a session, call `plant(session folder)` (where it will be), then stop it."""

    async def scenario() -> Any:
        session_id, _ = await prof.start([], ProfileOptions())
        plant(root / session_id)
        try:
            return await prof.stop([], "")
        except InvalidRequestError as exc:
            return exc

    return lambda: asyncio.run(scenario())


def test_a_symlink_planted_in_a_stage_folder_is_never_written_through(tmp_path: Path) -> None:
    """The issue's symlink to /etc/passwd, on the orchestrator's side: a link where a pulled
    file goes fails that stage, and the file it points at is untouched."""
    victim = tmp_path / "passwd"
    victim.write_text("root:x:0:0\n")
    root, clients = tmp_path / "root", three()

    def plant(session: Path) -> None:
        (session / "thinker").mkdir(parents=True)
        (session / "thinker" / "profiler_out_0.txt").symlink_to(victim)

    report = planted(profiler(clients, root), root, plant)()
    by_stage = {s.stage: s for s in report.stages}
    error = by_stage["thinker"].error
    assert not by_stage["thinker"].ok and "is a symlink on its own disk" in error
    assert "the orchestrator did not write profiler_out_0.txt" in error and "thinker-s" in error
    assert victim.read_text() == "root:x:0:0\n" and clients[0].fetched == []
    assert by_stage["talker"].ok and by_stage["code2wav"].ok


def test_a_stage_folder_that_is_a_symlink_out_is_never_written(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root, clients = tmp_path / "root", three()

    def plant(session: Path) -> None:
        session.mkdir(parents=True)
        (session / "talker").symlink_to(elsewhere, target_is_directory=True)

    report = planted(profiler(clients, root), root, plant)()
    by_stage = {s.stage: s for s in report.stages}
    assert not by_stage["talker"].ok and "is a symlink" in by_stage["talker"].error
    assert list(elsewhere.iterdir()) == []
    assert by_stage["thinker"].ok and by_stage["code2wav"].ok


def test_a_session_folder_that_is_a_symlink_out_is_refused_and_stays_active(
    tmp_path: Path,
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root, clients = tmp_path / "root", three()
    prof = profiler(clients, root)

    def plant(session: Path) -> None:
        root.mkdir()
        session.symlink_to(elsewhere, target_is_directory=True)

    error = planted(prof, root, plant)()
    assert isinstance(error, InvalidRequestError), error
    assert "is a symlink" in str(error) and "still profiling" in str(error)
    assert list(elsewhere.iterdir()) == [] and all(c.profiling for c in clients)
    assert prof.active_session_id  # stop again with another output_dir


def test_nul_in_output_dir_is_the_callers_error_not_a_stages(tmp_path: Path) -> None:
    """The issue's NUL in output_dir was INTERNAL "StopProfile failed inside the stage": the
    orchestrator's own ValueError. It is refused before any stage is asked to stop."""
    clients = three()
    prof = profiler(clients, tmp_path / "root")

    async def scenario() -> InvalidRequestError:
        await prof.start([], ProfileOptions())
        with pytest.raises(InvalidRequestError) as info:
            await prof.stop([], "runs\0/x")
        return info.value

    error = asyncio.run(scenario())
    assert "output_dir must not contain NUL" in str(error) and "still profiling" in str(error)
    assert "stage" not in str(error).replace("still profiling", "")
    assert [c.stops for c in clients] == [0, 0, 0] and all(c.profiling for c in clients)


def test_a_pull_refused_while_the_stage_drains_is_retried(tmp_path: Path) -> None:
    """SIGTERM to a stage during StopProfile: a fetch it refuses while draining (UNAVAILABLE)
    is retried, and the stage's files still arrive."""
    clients = three()
    draining = StageDrainingError("stage 'talker' is draining (it got SIGTERM)")
    clients[1].fetch_refusals = [draining, draining]
    report = stop(profiler(clients, tmp_path), tmp_path)
    assert all(s.ok for s in report.stages), [s.error for s in report.stages]
    assert clients[1].fetched == ["profiler_out_0.txt"] * 3
    assert (Path(report.output_dir) / "talker" / "profiler_out_0.txt").read_bytes() == TRACE


def test_a_stage_restarted_during_a_session_is_not_shown_profiling(tmp_path: Path) -> None:
    """A stage that restarted during a session holds no session any more: the profiler shows
    it profiling no more, and its stop reports it failed without asking it to stop."""
    clients = three()
    prof = profiler(clients, tmp_path)

    async def scenario() -> tuple[list[str], ProfileReport]:
        await prof.start([], ProfileOptions())
        clients[0].restarted = True
        return await prof.check_stages(), await prof.stop([], str(tmp_path))

    profiling, report = asyncio.run(scenario())
    assert profiling == ["talker", "code2wav"]
    by_stage = {s.stage: s for s in report.stages}
    assert not by_stage["thinker"].ok and "no longer holds" in by_stage["thinker"].error
    assert "restarted" in by_stage["thinker"].error
    assert by_stage["talker"].ok and by_stage["code2wav"].ok
    assert clients[0].stops == 0 and prof.active_session_id == ""
