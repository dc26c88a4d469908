"""The omni pipeline end to end: thinker → talker → code2wav on the session's real stages,
through orchestrator subprocesses: one with the streaming hand-off, one that waits."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import omnistage
from examples.omni.code2wav import HOP_LENGTH, SAMPLE_RATE
from omnistage.audio import mono_samples, write_wav
from omnistage.launch import ServerProcess
from omnistage.traces import ORCHESTRATOR_PID
from omnistage.types import PipelineOutput
from omnistage.v1 import stage_pb2
from tests.servers import RunningStage, serve_pipeline
from tests.unit.trace_checks import flow_problems, nesting_problems, tef_problems
from tests.waiting import wait_until

THINKER_TOKENS = 16
TALKER_TOKENS = 40
STREAM_CHUNK = 16
# The streaming test's talker runs longer: its last 72 codes are 72 engine steps that code2wav's
# first chunks can overlap, well above the client's timing noise even on a fast CPU, where 24
# steps (40 codes) once overlapped by less than the margin.
STREAMED_TOKENS = 88  # chunks of 16 (five times) and 8
PROMPT = [{"role": "user", "content": "Tell me one fact about the sea."}]


def start_omni_orchestrator(
    tmp: Path, name: str, addresses: dict[str, str], stream_chunk: int | None
) -> ServerProcess:
    chunk = f", stream_chunk: {stream_chunk}" if stream_chunk else ""
    text = f"""name: {name}
outputs: all
stages:
  - name: thinker
    address: {addresses["thinker"]}
    sampling: {{max_tokens: {THINKER_TOKENS}, temperature: 0.0}}
  - name: talker
    address: {addresses["talker"]}
    input: {{processor: token_ids}}
    sampling: {{max_tokens: {TALKER_TOKENS}, ignore_eos: true, temperature: 0.8, seed: 1234}}
  - name: code2wav
    address: {addresses["code2wav"]}
    input: {{processor: "examples.omni.processors:tokens_to_codes"{chunk}}}
"""
    return serve_pipeline(tmp, name, text)


@pytest.fixture(scope="module")
def omni_addresses(
    stage: RunningStage, talker_stage: RunningStage, code2wav_stage: RunningStage
) -> dict[str, str]:
    return {
        "thinker": stage.address,
        "talker": talker_stage.address,
        "code2wav": code2wav_stage.address,
    }


@pytest.fixture(scope="module")
def streaming(
    tmp_path_factory: pytest.TempPathFactory, omni_addresses: dict[str, str]
) -> Iterator[omnistage.Client]:
    tmp = tmp_path_factory.mktemp("omni-streaming")
    process = start_omni_orchestrator(tmp, "omni-streaming", omni_addresses, STREAM_CHUNK)
    with omnistage.Client(process.address) as client:
        yield client
    process.stop()


@pytest.fixture(scope="module")
def waiting(
    tmp_path_factory: pytest.TempPathFactory, omni_addresses: dict[str, str]
) -> Iterator[omnistage.Client]:
    tmp = tmp_path_factory.mktemp("omni-waiting")
    process = start_omni_orchestrator(tmp, "omni-waiting", omni_addresses, None)
    with omnistage.Client(process.address) as client:
        yield client
    process.stop()


def running(stage: RunningStage) -> int:
    return int(stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5).running_requests)


def of(outputs: list[PipelineOutput], stage: str) -> list[PipelineOutput]:
    return [o for o in outputs if o.stage == stage]


def audio_of(outputs: list[PipelineOutput]) -> np.ndarray[Any, Any]:
    return mono_samples([o.tensor for o in of(outputs, "code2wav") if o.tensor is not None])


def streamed_answer(client: omnistage.Client) -> tuple[list[PipelineOutput], float]:
    """One answer, and how much longer code2wav ran than the time between the talker's finish
    and the end, as seen here: more than 0 when code2wav started while the talker still ran."""
    outputs, arrived = [], []
    talk = {"talker": {"max_tokens": STREAMED_TOKENS}}
    for output in client.generate(messages=PROMPT, stage_sampling=talk):
        outputs.append(output)
        arrived.append(time.monotonic())
    talker_done = next(i for i, o in enumerate(outputs) if o.stage == "talker" and o.finished)
    assert outputs[-1].metrics is not None
    return outputs, outputs[-1].metrics.duration_s - (arrived[-1] - arrived[talker_done])


def test_text_then_audio_in_a_wav(streaming: omnistage.Client, tmp_path: Path) -> None:
    # code2wav started while the talker still ran: the stage's duration (from its first chunk
    # to its end) is longer than the time between the talker's finish and the end, as seen here.
    # Which output reaches the client first is a race, so the order of outputs is not checked.
    # The margin keeps a hand-off that waited for the talker from passing on timing noise. On
    # two busy cores the talker's stream can stall for about 250 ms and then come in a burst;
    # when that falls before its first chunk, code2wav cannot start early, so one of three
    # answers has to show the overlap.
    overlaps = []
    for _ in range(3):
        outputs, overlap_s = streamed_answer(streaming)
        overlaps.append(round(overlap_s, 3))
        if overlap_s > 0.03:
            break
    else:
        raise AssertionError(f"code2wav never overlapped the talker: {overlaps} s")
    thinker, talker, code2wav = (of(outputs, s) for s in ("thinker", "talker", "code2wav"))
    assert "".join(o.text for o in thinker).strip()
    codes = [t for o in talker for t in o.token_ids]
    assert len(codes) == STREAMED_TOKENS
    # The talker starts on the thinker's finished answer.
    assert outputs.index(talker[0]) > outputs.index(thinker[-1])
    # code2wav gets the codes in chunks of STREAM_CHUNK, one audio piece per chunk, in order.
    pieces = [o.tensor for o in code2wav if o.tensor is not None]
    assert [len(mono_samples([p])) for p in pieces] == [16 * HOP_LENGTH] * 5 + [8 * HOP_LENGTH]
    # One `finished` for code2wav, at the very end, with the whole stage's metrics.
    assert [o for o in outputs if o.stage == "code2wav" and o.finished] == [outputs[-1]]
    last = outputs[-1]
    assert last.final and last.metrics is not None
    assert 0 < last.metrics.time_to_first_output_s <= last.metrics.duration_s
    # Summed over code2wav's chunk calls, which overlap the stage's span only in part.
    assert last.metrics.stage_time_s > 0
    assert all(o.stage_index == 2 and o.final for o in code2wav)
    info = write_wav(tmp_path / "answer.wav", [o.tensor for o in code2wav if o.tensor is not None])
    with wave.open(str(info.path), "rb") as wav:
        assert wav.getframerate() == SAMPLE_RATE == 24_000 and wav.getnchannels() == 1
        assert wav.getnframes() == len(codes) * HOP_LENGTH


def test_streaming_hand_off_gives_the_same_audio(
    streaming: omnistage.Client, waiting: omnistage.Client
) -> None:
    streamed = list(streaming.generate(messages=PROMPT))
    waited = list(waiting.generate(messages=PROMPT))
    tokens = [[t for o in of(run, "talker") for t in o.token_ids] for run in (streamed, waited)]
    assert tokens[0] == tokens[1] and len(tokens[0]) == TALKER_TOKENS
    audio, expected = audio_of(streamed), audio_of(waited)
    assert audio.shape == expected.shape == (TALKER_TOKENS * HOP_LENGTH,)
    np.testing.assert_allclose(audio, expected, atol=1e-5)
    # Waiting: code2wav starts only after the talker's finished output.
    talker_done = next(i for i, o in enumerate(waited) if o.stage == "talker" and o.finished)
    assert all(i > talker_done for i, o in enumerate(waited) if o.stage == "code2wav")


def test_profiles_thinker_and_code2wav_only(
    streaming: omnistage.Client,
    stage: RunningStage,
    talker_stage: RunningStage,
    code2wav_stage: RunningStage,
    tmp_path: Path,
) -> None:
    session = streaming.start_profile(stages=["thinker", "code2wav"], label="omni")
    list(streaming.generate(messages=PROMPT))
    report = streaming.stop_profile("omni")
    folder = Path(report.output_dir)
    assert folder.name == session
    assert sorted(s.stage for s in report.stages) == ["code2wav", "thinker"]
    assert all(s.ok for s in report.stages), [s.error for s in report.stages]
    # No slimming was asked for: none is reported and no slimmed copy is written.
    assert report.slimming is None, report.slimming
    assert not list(folder.rglob("*.slim.pt.trace.json.gz"))
    for name in ("thinker", "code2wav"):
        traces = list((folder / name).glob("*.pt.trace.json.gz"))
        assert traces, f"no trace for {name} in {folder / name}"
    assert not (folder / "talker").exists()
    assert talker_stage.profiler_dir is not None
    assert not list(talker_stage.profiler_dir.rglob("*.pt.trace.json.gz"))
    assert Path(report.timeline).is_file() and Path(report.summary).is_file()


def test_cancelling_mid_audio_aborts_every_stage(
    streaming: omnistage.Client,
    stage: RunningStage,
    talker_stage: RunningStage,
    code2wav_stage: RunningStage,
) -> None:
    outputs = streaming.generate(messages=PROMPT, stage_sampling={"talker": {"max_tokens": 1500}})
    for out in outputs:
        if out.stage == "code2wav" and out.tensor is not None:
            break
    assert running(talker_stage) == 1  # the talker is mid-request
    outputs.close()  # type: ignore[attr-defined]
    stages = (stage, talker_stage, code2wav_stage)
    wait_until(
        lambda: not any(running(s) for s in stages),
        timeout=5,
        what="every stage to abort the cancelled request",
    )


def test_cli_writes_the_audio_as_a_wav(streaming: omnistage.Client, tmp_path: Path) -> None:
    wav_path = tmp_path / "cli.wav"
    command = [sys.executable, "-m", "omnistage.cli", "generate", "--address", streaming.address]
    result = subprocess.run(
        [*command, "--chat", "Say hi.", "--wav", str(wav_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "[0:thinker]" in result.stdout and f"wrote {wav_path}" in result.stdout
    assert "24000 Hz" in result.stdout
    with wave.open(str(wav_path), "rb") as wav:
        assert wav.getframerate() == 24_000 and wav.getnframes() == TALKER_TOKENS * HOP_LENGTH


@pytest.fixture(scope="module")
def three_stage_report(streaming: omnistage.Client) -> tuple[str, Any]:
    """One profile of all three stages around one request (vLLM's stop takes a while: once)."""
    session = streaming.start_profile(label="all-three")
    list(streaming.generate(messages=PROMPT))
    return session, streaming.stop_profile("all-three", slim=True)


def test_report_on_a_three_stage_profile(three_stage_report: tuple[str, Any]) -> None:
    """All three stages side by side on one time axis, and a summary naming the costliest."""
    session, report = three_stage_report
    folder = Path(report.output_dir)
    assert folder.name == session
    assert sorted(s.stage for s in report.stages) == ["code2wav", "talker", "thinker"]
    assert all(s.ok for s in report.stages), [s.error for s in report.stages]
    timeline = json.loads(gzip.decompress(Path(report.timeline).read_bytes()))
    events = timeline["traceEvents"]
    names = {
        e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    for stage_name in ("thinker", "talker", "code2wav", "orchestrator"):
        assert any(n == stage_name or n.startswith(f"{stage_name} ") for n in names), names
    spans = [
        e for e in events if e.get("ph") == "X" and str(e.get("name", "")).startswith("stage ")
    ]
    assert {e["name"] for e in spans} >= {"stage thinker", "stage talker", "stage code2wav"}
    starts = {e["id"] for e in events if e.get("ph") == "s"}
    ends = {e["id"] for e in events if e.get("ph") == "f"}
    assert starts and starts == ends  # every flow arrow has both ends
    assert tef_problems(events) == []
    # code2wav streams from talker's chunks: their spans overlap, each on its own thread
    orchestrator = [e for e in events if e["pid"] == ORCHESTRATOR_PID]
    assert nesting_problems(orchestrator) == []
    assert flow_problems(orchestrator) == []
    summary = Path(report.summary).read_text()
    for name in ("thinker", "talker", "code2wav"):
        assert f"### {name}: top " in summary and " ops by self CPU time" in summary, name
        assert f"| {name} | 1 | " in summary, name  # its row in the requests table
    # The dominant stage is named, with its share of the requests' time.
    assert re.search(r"\*\*Dominant stage: (thinker|talker|code2wav)\*\*, with [\d.]+%", summary)
    # vLLM profiles without Python stacks here: the saving comes from stripped bookkeeping args
    assert report.slimming is not None and report.slimming.bytes_saved > 0, report.slimming
    assert f"**{report.slimming.bytes_saved:,} bytes saved**" in summary
    assert (folder / "report.json").is_file()
    # engine steps: each traced stage's compute on the path, split into model steps and the rest
    (path,) = report.critical_paths
    split = {s.stage: s for s in path.steps}
    for name in ("thinker", "talker", "code2wav"):  # execute_context_*, omnistage.step
        record = split[name]
        assert 0 < record.step_ns <= record.compute_ns, record
        assert 0 < record.step_share_ns <= record.step_ns, record
        fraction = f"{100 * record.step_ns / record.compute_ns:.1f}%"
        assert f"{name} {fraction}" in summary, (fraction, summary)


HANDOFFS_SQL = """
SELECT o.ts AS out_ts, o.dur AS out_dur, i.ts AS in_ts, o.name AS out_name, i.name AS in_name,
       (SELECT display_value FROM args a WHERE a.arg_set_id = i.arg_set_id
        AND a.key IN ('args.request_id', 'debug.request_id')) AS request_id,
       (SELECT display_value FROM args a WHERE a.arg_set_id = i.arg_set_id
        AND a.key IN ('args.to', 'debug.to')) AS stage
FROM flow f JOIN slice o ON f.slice_out = o.id JOIN slice i ON f.slice_in = i.id
WHERE o.name = 'handoff' OR i.name = 'handoff'
"""
NAMES_SQL = """
SELECT name FROM slice WHERE name = 'queued→first output'
UNION ALL SELECT name FROM thread WHERE name LIKE '% · %'
UNION ALL SELECT name FROM track WHERE name LIKE '% · %'
"""
ESCAPED_SQL = (
    "SELECT name FROM slice WHERE name LIKE '%\\u%' "
    "UNION ALL SELECT name FROM thread WHERE name LIKE '%\\u%'"
)


@pytest.mark.parametrize("kind", ["json", "protobuf"])
def test_the_timeline_reads_right_in_the_perfetto_ui(
    three_stage_report: tuple[str, Any], kind: str
) -> None:
    """The omni pipeline's timeline, opened in the real Perfetto UI (its own trace processor):
    nothing dropped, every hand-off arrow as long as the hand-off, names as written."""
    from tests.browser import perfetto_ui

    reason = perfetto_ui.available()
    if reason is not None:
        pytest.skip(reason)
    _, report = three_stage_report
    json_path, proto_path = (Path(p) for p in report.timelines)
    assert json_path == Path(report.timeline) and proto_path.name == "timeline.pftrace.gz"
    path = json_path if kind == "json" else proto_path
    queries = {
        "errors": perfetto_ui.ERROR_STATS_SQL,
        "handoffs": HANDOFFS_SQL,
        "names": NAMES_SQL,
        "escaped": ESCAPED_SQL,
    }
    opened = perfetto_ui.open_trace(path, queries)
    assert opened.results["errors"] == [], opened.results["errors"]
    record = json.loads((Path(report.output_dir) / "report.json").read_text())
    expected = {
        (s["request_id"], s["stage"]): s["handoff_s"]
        for s in record["spans"]
        if s["stage_index"] > 0
    }
    arrows = opened.results["handoffs"]
    assert arrows and all(a["out_name"] == a["in_name"] == "handoff" for a in arrows), arrows
    seen = {}
    for arrow in arrows:
        delay_s = (arrow["in_ts"] - arrow["out_ts"] - arrow["out_dur"]) / 1e9
        seen[(arrow["request_id"], arrow["stage"])] = delay_s
    assert seen.keys() == expected.keys()
    for key, delay_s in seen.items():
        assert delay_s == pytest.approx(expected[key], abs=1e-3), key
    names = {row["name"] for row in opened.results["names"]}
    assert "queued→first output" in names
    assert any(" · thinker" in n for n in names), names
    assert opened.results["escaped"] == []
    if kind == "protobuf":  # stages in pipeline order under the root track
        (root,) = [n for n in opened.tracks if n.name.startswith("pipeline")]
        order = [n.name for n in root.children]
        stages = [
            next(i for i, n in enumerate(order) if n.startswith(s))
            for s in ("orchestrator", "thinker", "talker", "code2wav")
        ]
        assert stages == sorted(stages), order


def test_a_timing_only_session_profiles_no_stage_and_splits_each_request(
    streaming: omnistage.Client,
    stage: RunningStage,
    talker_stage: RunningStage,
    code2wav_stage: RunningStage,
) -> None:
    session = streaming.start_profile(label="timing", timing_only=True)
    for running_stage in (stage, talker_stage, code2wav_stage):
        info = running_stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5)
        assert not info.profiling_active  # no StartProfile reached it
    outputs = list(streaming.generate(messages=PROMPT))
    report = streaming.stop_profile("timing")
    assert report.session_id == session and report.timing_only
    assert sorted(s.stage for s in report.stages) == ["code2wav", "talker", "thinker"]
    assert all(s.ok and not s.files for s in report.stages)
    folder = Path(report.output_dir)
    assert not list(folder.rglob("*.pt.trace.json.gz"))
    (path,) = report.critical_paths
    assert path.request_id == outputs[-1].request_id
    for segments, target in ((path.first_output, path.first_output_unix_ns),
                             (path.end_to_end, path.end_unix_ns)):  # fmt: skip
        assert sum(s.end_unix_ns - s.start_unix_ns for s in segments) == (
            target - path.start_unix_ns
        )
    kinds = {(s.stage, s.kind) for s in path.end_to_end}
    assert {("thinker", "compute"), ("code2wav", "compute")} <= kinds
    assert ("code2wav", "waiting_for_upstream") in kinds  # streamed: it waited for chunks
    assert path.steps == ()  # no trace: no engine step to split the compute with
    summary = Path(report.summary).read_text()
    assert "- timing only:" in summary and "## Critical path" in summary
