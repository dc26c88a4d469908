"""PipelineProfiler end to end over fake stages: clock offsets measured through GetInfo, the
merged timeline on the orchestrator's clock, and what slimming saved in the report."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from omnistage.profile_files import sha256_file
from omnistage.traces import RequestSpan
from omnistage.traces.report import rebuild_report
from omnistage.traces.slimming import SlimOptions
from omnistage.types import OutputDelta, ProfileFileInfo, ProfileManifest, ProfileOptions
from orchestrator.config import parse_pipeline
from orchestrator.pool import SERVING, StageReplica
from orchestrator.profiling import PipelineProfiler
from orchestrator.sessions import CollectedSessions, SessionStoreConfig
from orchestrator.stage_call import StageEvent, StageTiming
from tests.unit.trace_checks import misplaced_ops, tef_problems
from tests.unit.trace_factory import Session, read_json, shared_session, shift_base_time

SHIFT_NS = 2_345_678_901  # the talker host's clock runs 2.3 s ahead of the orchestrator's
SERVER_DELAY_S = 0.003  # GetInfo reads its clock this long after the request arrives
TOLERANCE_US = 1.0


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    return shared_session(tmp_path_factory)


class FakeStageClient:
    """A stage host whose wall clock is `shift_ns` ahead; its profile holds one trace."""

    def __init__(self, name: str, trace: Path, shift_ns: int, server_dir: Path) -> None:
        self.name = name
        self.shift_ns = shift_ns
        self.server_dir = server_dir
        self.trace = trace
        self.info_calls = 0
        self.active = ""  # the profile session it holds, as GetInfo says

    async def info(self, *, timeout: float = 10.0) -> Any:
        self.info_calls += 1
        # an asymmetric round trip: the estimate is off, by less than its error bound
        await asyncio.sleep(SERVER_DELAY_S)  # the skew under test, not a wait
        return SimpleNamespace(
            server_time_unix_ns=time.time_ns() + self.shift_ns, profile_session_id=self.active
        )

    async def start_profile(
        self, *, label: str = "", delay_iterations: int = 0, max_iterations: int = 0
    ) -> str:
        self.active = f"{label}-{self.name}"
        return self.active

    async def stop_profile(self) -> ProfileManifest:
        self.active = ""
        self.server_dir.mkdir(parents=True, exist_ok=True)
        target = self.server_dir / self.trace.name
        shutil.copy(self.trace, target)
        if self.shift_ns:
            shift_base_time(target, self.shift_ns)  # written on the host's clock
        info = ProfileFileInfo(target.name, target.stat().st_size, sha256_file(target))
        return ProfileManifest(f"stage-{self.name}", str(self.server_dir), (info,))

    async def fetch_file(
        self,
        session_id: str,
        name: str,
        dest: Path,
        *,
        offset: int = 0,
        on_bytes: Callable[[int], None] | None = None,
    ) -> int:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.server_dir / name, dest)
        if on_bytes is not None:
            on_bytes(dest.stat().st_size)
        return dest.stat().st_size


class FakePool:
    def __init__(self, replicas: list[StageReplica]) -> None:
        self._replicas = replicas

    async def refresh(self, names: list[str] | None = None) -> None:
        return None

    def replicas(self, stage: str) -> list[StageReplica]:
        return [r for r in self._replicas if r.stage == stage]

    def has_replicas(self, stage: str) -> bool:
        return False

    def describe_unready(self, stage: str) -> str:
        return "not serving"


def _event(span: RequestSpan) -> StageEvent:
    timing = StageTiming(
        queue_time_s=span.queue_time_s,
        time_to_first_output_s=(span.first_output_unix_ns - span.start_unix_ns) / 1e9,
        duration_s=(span.end_unix_ns - span.start_unix_ns) / 1e9,
        handoff_s=span.handoff_s,
        start_unix_ns=span.start_unix_ns,
        first_output_unix_ns=span.first_output_unix_ns,
        end_unix_ns=span.end_unix_ns,
    )
    delta = OutputDelta(span.request_id, finished=True)
    return StageEvent(span.stage, span.stage_index, span.request_id, delta, True, timing)


def _profile(session: Session, tmp_path: Path, slim: SlimOptions | None) -> tuple[Any, ...]:
    pipeline = parse_pipeline(
        "stages:\n  - name: thinker\n    address: 127.0.0.1:1\n"
        "  - name: talker\n    address: 127.0.0.1:2\n"
    )
    clients = {
        name: FakeStageClient(
            name, run.trace, SHIFT_NS if name == "talker" else 0, tmp_path / "hosts" / name
        )
        for name, run in session.stages.items()
    }
    replicas = [
        StageReplica(name, run.index, f"127.0.0.1:{run.index + 1}", clients[name], SERVING)  # type: ignore[arg-type]
        for name, run in session.stages.items()
    ]
    sessions = CollectedSessions(SessionStoreConfig(root=tmp_path))
    profiler = PipelineProfiler(pipeline, FakePool(replicas), sessions=sessions)  # type: ignore[arg-type]

    async def main() -> Any:
        await profiler.start([], ProfileOptions(label="clock"))
        for span in session.spans:
            profiler.record(_event(span))
        return await profiler.stop([], str(tmp_path / "out"), slim=slim)

    return asyncio.run(main()), clients


def test_an_offset_measured_through_get_info_is_recovered(session: Session, tmp_path: Path) -> None:
    report, clients = _profile(session, tmp_path, None)
    assert all(c.info_calls >= 2 for c in clients.values())  # at start and at stop
    assert not report.failed and report.timeline and report.slimming is None
    saved = json.loads((Path(report.output_dir) / "report.json").read_text())
    # every request passed both stages: each has its critical path, in report.json too
    assert [p.request_id for p in report.critical_paths] == ["r0", "r1", "r2"]
    assert [p["request_id"] for p in saved["critical_paths"]] == ["r0", "r1", "r2"]
    for name, shift in (("talker", SHIFT_NS), ("thinker", 0)):
        clock = saved["clocks"][name]
        # ten round trips (start and stop), none shorter than the server's delay
        assert clock["samples"] == 10 and clock["rtt_ns"] >= SERVER_DELAY_S * 1e9
        assert clock["error_ns"] >= SERVER_DELAY_S * 1e9 / 2
        assert abs(clock["offset_ns"] - shift) <= clock["error_ns"], name
    timeline = read_json(Path(report.timeline))
    events = timeline["traceEvents"]
    assert tef_problems(events) == []
    error_us = saved["clocks"]["talker"]["error_ns"] / 1000
    slack_us = error_us + TOLERANCE_US + session.torch_clock_error_us()
    assert misplaced_ops(events, slack_us) == []
    assert (
        timeline["metadata"]["clock_offsets"]["talker"]["offset_ns"]
        == (saved["clocks"]["talker"]["offset_ns"])
    )


def test_without_the_offset_the_ops_would_be_misplaced(session: Session, tmp_path: Path) -> None:
    """The check above can fail: the same run with the talker's clock taken as exact."""
    report, _ = _profile(session, tmp_path, None)
    folder = Path(report.output_dir)
    saved = json.loads((folder / "report.json").read_text())
    saved["clocks"]["talker"]["offset_ns"] = 0
    (folder / "report.json").write_text(json.dumps(saved))
    events = read_json(rebuild_report(folder).timeline)["traceEvents"]
    problems = misplaced_ops(events, 10_000.0)  # far more than any error bound, far less than 2.3 s
    assert problems and all(p.startswith("talker:") for p in problems)


def test_stop_reports_what_slimming_saved(session: Session, tmp_path: Path) -> None:
    report, _ = _profile(session, tmp_path, SlimOptions())
    slimming = report.slimming
    assert slimming is not None
    assert slimming.traces == 2 and slimming.copies_written == 2
    originals = list(Path(report.output_dir).glob("*/rank0.*[0-9].pt.trace.json.gz"))
    copies = list(Path(report.output_dir).glob("*/*.slim.pt.trace.json.gz"))
    assert len(originals) == len(copies) == 2
    assert slimming.bytes_before == sum(p.stat().st_size for p in originals)
    assert slimming.bytes_after == sum(p.stat().st_size for p in copies)
    assert slimming.bytes_saved > 0 and slimming.events_after < slimming.events_before
    summary = Path(report.summary).read_text()
    assert f"**{slimming.bytes_saved:,} bytes saved**" in summary
