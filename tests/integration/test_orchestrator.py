"""The orchestrator, in its own process, chaining real vLLM stages and profiling them."""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import omnistage
from omnistage import errors
from omnistage.launch import ServerProcess
from omnistage.traces import slim_copy_path
from omnistage.types import ProfileReport
from omnistage.v1 import stage_pb2
from tests.servers import RunningStage, free_port, serve_pipeline
from tests.unit.trace_checks import tef_problems
from tests.waiting import wait_until


def start_orchestrator(
    tmp: Path, name: str, stages: list[tuple[str, str]], outputs: str = "all"
) -> ServerProcess:
    lines = [f"name: {name}", f"outputs: {outputs}", "stages:"]
    for index, (stage, address) in enumerate(stages):
        lines += [f"  - name: {stage}", f"    address: {address}"]
        lines += ["    sampling: {max_tokens: 12, temperature: 0.0}"]
        if index:
            lines += ["    input: {processor: text, template: 'Rewrite formally: {text}'}"]
    return serve_pipeline(tmp, name, "\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def pipeline(
    tmp_path_factory: pytest.TempPathFactory, stage: RunningStage, rewriter_stage: RunningStage
) -> Iterator[omnistage.Client]:
    tmp = tmp_path_factory.mktemp("pipeline")
    process = start_orchestrator(
        tmp, "two-stage", [("thinker", stage.address), ("rewriter", rewriter_stage.address)]
    )
    with omnistage.Client(process.address) as client:
        yield client
    process.stop()


@pytest.fixture(scope="module")
def faulty(
    tmp_path_factory: pytest.TempPathFactory, stage: RunningStage, plain_stage: RunningStage
) -> Iterator[tuple[omnistage.Client, str]]:
    """thinker → plain (no profiler) → a stage whose address nothing listens on."""
    tmp = tmp_path_factory.mktemp("faulty")
    dead = f"127.0.0.1:{free_port()}"
    process = start_orchestrator(
        tmp, "faulty", [("thinker", stage.address), ("plain", plain_stage.address), ("ghost", dead)]
    )
    with omnistage.Client(process.address) as client:
        yield client, dead
    process.stop()


def running(stage: RunningStage) -> int:
    return int(stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5).running_requests)


def profiling(stage: RunningStage) -> bool:
    return bool(stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5).profiling_active)


def wait_idle(*stages: RunningStage, timeout: float = 15) -> None:
    wait_until(
        lambda: not any(running(s) for s in stages),
        timeout=timeout,
        what=f"no request left in {[s.address for s in stages]}",
    )


def test_two_stages_stream_in_order(pipeline: omnistage.Client) -> None:
    outputs = list(pipeline.generate(messages=[{"role": "user", "content": "Name a fruit."}]))
    stages = [o.stage for o in outputs]
    assert stages == sorted(stages, key=["thinker", "rewriter"].index)
    assert {"thinker", "rewriter"} == set(stages)
    assert all(o.final == (o.stage == "rewriter") for o in outputs)
    finished = [o for o in outputs if o.finished]
    assert [o.stage_index for o in finished] == [0, 1]
    for out in finished:
        assert out.metrics is not None
        assert 0 < out.metrics.time_to_first_output_s <= out.metrics.duration_s
        # The stage's own time, as it reported it, fits inside the orchestrator's view.
        assert 0 < out.metrics.stage_time_s <= out.metrics.duration_s
        assert 0 <= out.metrics.queue_time_s <= out.metrics.duration_s
    # Only a stage's finished output carries its metrics.
    assert all(o.metrics is None for o in outputs if not o.finished)
    # The hand-off to the rewriter happened (it has a duration), and took well under a second.
    assert finished[1].metrics is not None and 0 < finished[1].metrics.handoff_s < 1
    assert "".join(o.text for o in outputs if o.stage == "rewriter").strip()


def test_stage_sampling_overrides_one_stage(pipeline: omnistage.Client) -> None:
    outputs = list(
        pipeline.generate(
            "Tell me about rivers.",
            max_tokens=6,
            ignore_eos=True,
            stage_sampling={"rewriter": {"max_tokens": 3}},
        )
    )
    tokens = {
        s: sum(len(o.token_ids) for o in outputs if o.stage == s) for s in ("thinker", "rewriter")
    }
    assert tokens == {"thinker": 6, "rewriter": 3}


def test_unknown_stage_sampling_key(pipeline: omnistage.Client) -> None:
    with pytest.raises(errors.InvalidRequestError) as info:
        list(pipeline.generate("hi", stage_sampling={"talker": {"max_tokens": 3}}))
    assert "talker" in str(info.value) and "thinker" in str(info.value)
    # A bad value for stage 1 is refused before stage 0 runs, not after it finished.
    with pytest.raises(errors.InvalidRequestError) as info:
        outputs = pipeline.generate("hi", stage_sampling={"rewriter": {"top_p": 1.5}})
        assert next(outputs, None) is None
    assert str(info.value).startswith("stage_sampling['rewriter']: top_p must lie in (0, 1]")


def test_a_20000_character_stage_name_is_invalid_argument_with_a_short_message(
    pipeline: omnistage.Client, stage: RunningStage
) -> None:
    """Issue 14: the message repeated the whole name, and gRPC answered RESOURCE_EXHAUSTED
    "received metadata size exceeds hard limit"."""
    with pytest.raises(errors.InvalidRequestError) as info:
        list(pipeline.generate("hi", stage_sampling={"x" * 20_000: {"max_tokens": 3}}))
    assert info.value.code == "INVALID_ARGUMENT"
    assert "20,000 characters" in str(info.value) and len(str(info.value)) < 600


def test_an_oversized_prompt_never_reaches_a_stage(
    pipeline: omnistage.Client, stage: RunningStage
) -> None:
    """Issue 14: a 30 MB prompt went on to the thinker, which tokenized it on its event loop."""
    with pytest.raises(errors.InvalidRequestError) as info:
        list(pipeline.generate("word " * 400_000))
    assert "over the limit of 1,048,576 bytes of the orchestrator" in str(info.value)
    assert "orchestrator serve --max-prompt-bytes" in str(info.value)
    assert running(stage) == 0


def test_final_only_outputs(
    tmp_path: Path, stage: RunningStage, rewriter_stage: RunningStage
) -> None:
    process = start_orchestrator(
        tmp_path,
        "final-only",
        [("thinker", stage.address), ("rewriter", rewriter_stage.address)],
        outputs="final",
    )
    try:
        with omnistage.Client(process.address) as client:
            outputs = list(client.generate("Name a colour."))
        assert {o.stage for o in outputs} == {"rewriter"} and all(o.final for o in outputs)
    finally:
        process.stop()


def test_get_pipeline_shows_stages(pipeline: omnistage.Client, stage: RunningStage) -> None:
    info = pipeline.pipeline()
    assert info.name == "two-stage"
    assert [(s.index, s.name, s.health) for s in info.stages] == [
        (0, "thinker", "SERVING"),
        (1, "rewriter", "SERVING"),
    ]
    assert info.stages[0].addresses == (stage.address,)
    assert info.stages[0].engine == "vllm" and not info.profiling_active


def traces_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.pt.trace.json.gz") if "async_llm" not in p.name)


def test_concurrent_requests_share_each_stage(
    pipeline: omnistage.Client, stage: RunningStage, rewriter_stage: RunningStage
) -> None:
    """8 requests at once through the orchestrator: each gets both stages' outputs, and the
    thinker's engine holds several of them at a time (it batches them)."""
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, running(stage))
            stop.wait(0.05)  # the sampling interval; returns at once when the requests end

    async def scenario() -> list[list[omnistage.types.PipelineOutput]]:
        async with omnistage.AsyncClient(pipeline.address) as client:

            async def one(i: int) -> list[omnistage.types.PipelineOutput]:
                prompt = f"Count from {i} to {i + 5}."
                return [o async for o in client.generate(prompt, max_tokens=16, ignore_eos=True)]

            return list(await asyncio.gather(*(one(i) for i in range(8))))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = asyncio.run(scenario())
    finally:
        stop.set()
        watcher.join()
    assert len({o.request_id for outputs in results for o in outputs}) == 8
    for outputs in results:
        assert [o.stage for o in outputs if o.finished] == ["thinker", "rewriter"]
        assert sum(len(o.token_ids) for o in outputs if o.stage == "thinker") == 16
    assert peak > 1, "the thinker never held two requests at once"
    wait_idle(stage, rewriter_stage)


def test_async_client_profiles_one_stage_only(
    pipeline: omnistage.Client, stage: RunningStage, rewriter_stage: RunningStage, tmp_path: Path
) -> None:
    """The asyncio client end to end: generate, and a profile of stage 1 alone."""

    async def scenario() -> tuple[str, list[omnistage.types.PipelineOutput], ProfileReport]:
        async with omnistage.AsyncClient(pipeline.address) as client:
            session = await client.start_profile(stages=[1], label="only-rewriter")
            assert profiling(rewriter_stage) and not profiling(stage)
            assert (await client.pipeline()).stages[1].profiling_active
            outputs = [out async for out in client.generate("Say hello.", max_tokens=6)]
            return session, outputs, await client.stop_profile("only-rewriter")

    session, outputs, report = asyncio.run(scenario())
    assert [o.stage_index for o in outputs if o.finished] == [0, 1]
    assert sum(len(o.token_ids) for o in outputs if o.stage == "thinker") <= 6
    assert report.session_id == session and not report.failed
    assert [s.stage for s in report.stages] == ["rewriter"]
    root = Path(report.output_dir)
    assert root.name == session and root.parent.name == "only-rewriter"
    assert [p.name for p in root.iterdir() if p.is_dir()] == ["rewriter"]
    (trace,) = traces_in(root / "rewriter")
    json.loads(gzip.decompress(trace.read_bytes()))
    assert (root / "rewriter" / "profiler_out_rewriter.txt").stat().st_size > 0
    assert json.loads((root / "report.json").read_text())["session_id"] == session
    assert not profiling(rewriter_stage)


def test_profile_all_stages(pipeline: omnistage.Client, tmp_path: Path) -> None:
    session = pipeline.start_profile()
    list(pipeline.generate("Say hello."))
    report = pipeline.stop_profile("all-stages", slim=True)
    assert Path(report.output_dir).name == session
    assert {s.stage for s in report.stages} == {"thinker", "rewriter"} and not report.failed
    for name in ("thinker", "rewriter"):
        assert traces_in(Path(report.output_dir) / name)
        result = next(s for s in report.stages if s.stage == name)
        pulled = {f.name for f in result.files}
        local = {p.name for p in (Path(report.output_dir) / name).iterdir()}
        # Every file of the stage's manifest was pulled; the only others are the slimmed
        # copies the orchestrator wrote beside the traces it pulled.
        slim_copies = {slim_copy_path(Path(n)).name for n in pulled if ".pt.trace.json" in n}
        assert pulled <= local and local - pulled <= slim_copies, (pulled, local)
        assert result.stop_seconds > 0


def test_profile_by_name_and_index_mixed(pipeline: omnistage.Client, tmp_path: Path) -> None:
    pipeline.start_profile(stages=["thinker", "1", 0])
    try:
        with pytest.raises(errors.ProfilerStateError) as info:
            pipeline.start_profile()
        assert "StopProfile" in str(info.value)
    finally:
        report = pipeline.stop_profile("mixed")
    assert sorted(s.stage for s in report.stages) == ["rewriter", "thinker"]


def test_unknown_stage_starts_nothing(
    pipeline: omnistage.Client, stage: RunningStage, rewriter_stage: RunningStage
) -> None:
    for bad in (["thinker", "talker"], ["7"], ["-1"]):
        with pytest.raises(errors.InvalidRequestError) as info:
            pipeline.start_profile(stages=bad)
        assert "thinker" in str(info.value)
    assert not profiling(stage) and not profiling(rewriter_stage)


def test_stop_with_nothing_active(pipeline: omnistage.Client) -> None:
    with pytest.raises(errors.ProfilerStateError) as info:
        pipeline.stop_profile()
    assert "no profile session is active" in str(info.value)


def test_failed_start_rolls_back(faulty: tuple[omnistage.Client, str], stage: RunningStage) -> None:
    client, _ = faulty
    with pytest.raises(errors.ProfilerStateError) as info:
        client.start_profile(stages=["thinker", "plain"])
    message = str(info.value)
    assert (
        "plain" in message
        and "--profiler-config" in message
        and "no stage is left profiling" in message
    )
    assert not profiling(stage)
    assert not client.pipeline().profiling_active


def test_unreachable_stage_is_unavailable(
    faulty: tuple[omnistage.Client, str], stage: RunningStage
) -> None:
    client, dead = faulty
    with pytest.raises(errors.StageUnavailableError) as info:
        list(client.generate("hi", max_tokens=2, timeout=60))
    assert "ghost" in str(info.value) and dead in str(info.value)
    status = client.pipeline()
    assert status.stages[2].health == "UNAVAILABLE" and status.stages[0].health == "SERVING"
    wait_idle(stage)


def test_stage_rejecting_midway_ends_the_stream_with_its_status(
    pipeline: omnistage.Client, stage: RunningStage, rewriter_stage: RunningStage
) -> None:
    outputs: list[omnistage.types.PipelineOutput] = []
    # 2040 tokens fit the rewriter's 2048-token context after a one-token prompt, so its
    # ValidateSampling accepts them before the thinker runs; they do not fit after the prompt
    # that the thinker's output makes, which only the rewriter's Generate can know.
    with pytest.raises(errors.InvalidRequestError) as info:
        for out in pipeline.generate(
            "Name a fruit.", stage_sampling={"rewriter": {"max_tokens": 2040}}
        ):
            outputs.append(out)
    # The thinker finished and streamed; the rewriter refused what it was handed.
    assert {o.stage for o in outputs} == {"thinker"} and outputs[-1].finished
    message = str(info.value)
    assert message.startswith("stage 'rewriter': max_tokens 2040 does not fit")
    assert rewriter_stage.address in message
    wait_idle(stage, rewriter_stage, timeout=5)


def test_stage_status_without_an_error_class_passes_through(
    pipeline: omnistage.Client, stage: RunningStage, tmp_path: Path
) -> None:
    """A 'stage' that answers health but not the Stage API (here another orchestrator) ends
    the stream with its own UNIMPLEMENTED, not INTERNAL, once the thinker has streamed."""
    process = start_orchestrator(
        tmp_path, "impostor", [("thinker", stage.address), ("impostor", pipeline.address)]
    )
    outputs: list[omnistage.types.PipelineOutput] = []
    try:
        with (
            omnistage.Client(process.address) as client,
            pytest.raises(errors.OmnistageError) as info,
        ):
            for out in client.generate("Name a fruit.", timeout=60):
                outputs.append(out)
    finally:
        process.stop()
    assert info.value.code == "UNIMPLEMENTED"
    assert str(info.value).startswith("stage 'impostor': ")
    assert pipeline.address in str(info.value) and "omnistage service" in str(info.value)
    assert {o.stage for o in outputs} == {"thinker"} and outputs[-1].finished
    wait_idle(stage, timeout=5)


def test_client_cancel_reaches_the_stage(pipeline: omnistage.Client, stage: RunningStage) -> None:
    outputs = pipeline.generate(
        "Write a long essay.", stage_sampling={"thinker": {"max_tokens": 1500, "ignore_eos": True}}
    )
    for count, _out in enumerate(outputs, start=1):
        if count == 3:
            break
    assert running(stage) >= 1
    outputs.close()  # type: ignore[attr-defined]
    wait_idle(stage)


def test_client_deadline_reaches_the_stage(pipeline: omnistage.Client, stage: RunningStage) -> None:
    with pytest.raises(errors.DeadlineError):
        list(
            pipeline.generate(
                "Write a long essay.",
                timeout=2.0,
                stage_sampling={"thinker": {"max_tokens": 1500, "ignore_eos": True}},
            )
        )
    wait_idle(stage)


@pytest.mark.stops_shared_stage
def test_dead_stage_during_stop_keeps_the_others(
    pipeline: omnistage.Client, stage: RunningStage, rewriter_stage: RunningStage, tmp_path: Path
) -> None:
    session = pipeline.start_profile()
    list(pipeline.generate("Say hello."))
    result: dict[str, object] = {}

    def stop() -> None:
        result["report"] = pipeline.stop_profile("dead-stage")

    stopper = threading.Thread(target=stop)
    stopper.start()
    rewriter_stage.process.kill()
    stopper.join(timeout=600)
    report = result["report"]
    assert isinstance(report, omnistage.types.ProfileReport)
    by_stage = {s.stage: s for s in report.stages}
    assert by_stage["thinker"].ok and traces_in(Path(report.output_dir) / "thinker")
    assert Path(report.output_dir).name == session
    assert not by_stage["rewriter"].ok and by_stage["rewriter"].error
    # The orchestrator keeps serving, and says which stage is down.
    info = pipeline.pipeline()
    assert info.stages[1].health == "UNAVAILABLE" and not info.profiling_active
    with pytest.raises(errors.StageUnavailableError) as down:
        list(pipeline.generate("hi", timeout=60))
    assert "rewriter" in str(down.value)
    assert not profiling(stage)


def test_report_has_aligned_timeline_and_summary(
    pipeline: omnistage.Client, tmp_path: Path
) -> None:
    session = pipeline.start_profile(label="timeline")
    list(pipeline.generate("Name a river."))
    report = pipeline.stop_profile("timeline")
    root = Path(report.output_dir)
    assert root.name == session
    record = json.loads((root / "report.json").read_text())
    assert set(record["clocks"]) == {"thinker", "rewriter"}
    for clock in record["clocks"].values():
        assert 0 <= clock["error_ns"] < 50_000_000 and clock["samples"] >= 5
    spans = record["spans"]
    assert sorted(s["stage"] for s in spans) == ["rewriter", "thinker"]
    assert Path(report.timeline) == root / "timeline.json.gz"
    assert Path(report.summary) == root / "summary.md"
    events = json.loads(gzip.decompress(Path(report.timeline).read_bytes()))["traceEvents"]
    names = {
        e["pid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    assert {"thinker", "rewriter", "orchestrator"} <= {
        n.split("/")[0].split(" ")[0] for n in names.values()
    }
    assert tef_problems(events) == []  # ph, ts and pid on every event; every pid named
    # The thinker's model ops lie inside the thinker's request span, once clocks are aligned.
    orchestrator_pid = next(p for p, n in names.items() if n == "orchestrator")
    span = next(
        e
        for e in events
        if e.get("pid") == orchestrator_pid and e.get("ph") == "X" and e["name"] == "stage thinker"
    )
    # the engine's own tracks, not vLLM's front end (its track is "thinker front end")
    thinker_pids = {p for p, n in names.items() if n.startswith("thinker") and "front end" not in n}
    assert thinker_pids and len(thinker_pids) < sum(n.startswith("thinker") for n in names.values())
    ops = [e for e in events if e.get("pid") in thinker_pids and e.get("cat") == "cpu_op"]
    assert ops
    slack_us = 50_000  # the clock error bound plus scheduling noise, generously
    inside = [
        o for o in ops if span["ts"] - slack_us <= o["ts"] <= span["ts"] + span["dur"] + slack_us
    ]
    assert len(inside) / len(ops) > 0.95
    summary = (root / "summary.md").read_text()
    assert "thinker" in summary and "rewriter" in summary and "p50" in summary
    # The CLI rebuilds the same report from the folder alone.
    (root / "timeline.json.gz").unlink()
    rebuilt = subprocess.run(
        [sys.executable, "-m", "omnistage.cli", "profile", "report", str(root), "--slim"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "timeline:" in rebuilt.stdout and (root / "timeline.json.gz").exists()
    assert "slimming: " in rebuilt.stdout and " bytes saved (" in rebuilt.stdout
