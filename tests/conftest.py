"""Session-wide real servers: vLLM stages on the bundled model, the omni pipeline's talker
(vLLM, random weights) and code2wav (torch), in their own processes.

Engines start once per session, concurrently, and every integration test runs against them.
Fixtures wait on the gRPC health check, never on log lines; finalizers SIGTERM, then kill
the process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from omnistage.launch import ServerProcess, stage_args
from omnistage.v1 import stage_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_PROMPTS = [
    "What is the capital of France?",
    "Write one sentence about the sea.",
]
REFERENCE_MAX_TOKENS = 24
PLAIN_GRACE_S = 15.0  # the plain stage's SIGTERM drain time; its SIGTERM test waits it out


@dataclass
class RunningStage:
    process: ServerProcess
    address: str
    profiler_dir: Path | None
    health_seen: list[str] = field(default_factory=list)
    channel: grpc.Channel | None = None

    @property
    def stub(self) -> stage_pb2_grpc.StageStub:
        if self.channel is None:
            self.channel = grpc.insecure_channel(self.address)
        return stage_pb2_grpc.StageStub(self.channel)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that stop a shared stage run last."""
    items.sort(key=lambda item: item.get_closest_marker("stops_shared_stage") is not None)


@pytest.fixture(scope="session")
def reference_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[str]]:
    """vLLM's own offline greedy output, computed in a separate process while stages start."""
    out = tmp_path_factory.mktemp("reference") / "reference.json"
    payload = json.dumps({"prompts": REFERENCE_PROMPTS, "max_tokens": REFERENCE_MAX_TOKENS})
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "vllm_reference.py"), payload, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    process.out_path = out  # type: ignore[attr-defined]
    yield process
    if process.poll() is None:
        os.killpg(process.pid, 9)
        process.wait()


TALKER_MODEL = ROOT / "examples" / "omni" / "talker"
CODE2WAV_MODEL = "examples.omni.code2wav:build"
CODE2WAV_OPTIONS = {"max_batch_size": 4, "max_wait_ms": 5, "num_threads": 1}


def _start_stage(
    name: str,
    logs: Path,
    profiler_dir: Path | None,
    *,
    engine: str = "vllm",
    model: str = "smollm2",
    extra: tuple[str, ...] = (),
) -> ServerProcess:
    return ServerProcess(
        f"stage {name!r}",
        stage_args(
            name=name,
            engine=engine,
            model=model,
            profiler_config=(
                {"torch_profiler_dir": str(profiler_dir), "torch_profiler_with_stack": False}
                if profiler_dir
                else None
            ),
            extra=["--grace-seconds", "20", *extra],
        ),
        log_path=logs / f"{name}.log",
    )


@pytest.fixture(scope="session")
def _stages(
    tmp_path_factory: pytest.TempPathFactory, reference_process: subprocess.Popen[str]
) -> Iterator[dict[str, RunningStage]]:
    logs = tmp_path_factory.mktemp("logs")
    profiler_dir = tmp_path_factory.mktemp("profiles")
    rewriter_dir = tmp_path_factory.mktemp("rewriter-profiles")
    talker_dir = tmp_path_factory.mktemp("talker-profiles")
    code2wav_dir = tmp_path_factory.mktemp("code2wav-profiles")
    talker_args = ("--max-num-seqs", "16")
    code2wav_args = ("--engine-options", json.dumps(CODE2WAV_OPTIONS))
    processes = {
        "profiled": (_start_stage("thinker", logs, profiler_dir), profiler_dir),
        "rewriter": (_start_stage("rewriter", logs, rewriter_dir), rewriter_dir),
        "plain": (
            _start_stage("plain", logs, None, extra=("--grace-seconds", str(PLAIN_GRACE_S))),
            None,
        ),
        "talker": (
            _start_stage("talker", logs, talker_dir, model=str(TALKER_MODEL), extra=talker_args),
            talker_dir,
        ),
        "code2wav": (
            _start_stage(
                "code2wav",
                logs,
                code2wav_dir,
                engine="torch",
                model=CODE2WAV_MODEL,
                extra=code2wav_args,
            ),
            code2wav_dir,
        ),
    }
    running: dict[str, RunningStage] = {}
    try:
        for key, (process, directory) in processes.items():
            seen: list[str] = []
            address = process.wait_serving(
                timeout=900, progress=lambda status, _s, seen=seen: seen.append(status)
            )
            running[key] = RunningStage(process, address, directory, seen)
        yield running
    finally:
        for stage in running.values():
            if stage.channel is not None:
                stage.channel.close()
        # Each stage drains and closes its engine on SIGTERM; stop them all at once.
        stoppers = [threading.Thread(target=p.stop) for p, _ in processes.values()]
        for stopper in stoppers:
            stopper.start()
        for stopper in stoppers:
            stopper.join()


@pytest.fixture(scope="session")
def stage(_stages: dict[str, RunningStage]) -> RunningStage:
    """A vLLM stage named 'thinker' with profiling configured."""
    return _stages["profiled"]


@pytest.fixture(scope="session")
def rewriter_stage(_stages: dict[str, RunningStage]) -> RunningStage:
    """A second profiled vLLM stage, named 'rewriter', for pipelines."""
    return _stages["rewriter"]


@pytest.fixture(scope="session")
def plain_stage(_stages: dict[str, RunningStage]) -> RunningStage:
    """A vLLM stage started without a profiler dir."""
    return _stages["plain"]


@pytest.fixture(scope="session")
def talker_stage(_stages: dict[str, RunningStage]) -> RunningStage:
    """The omni pipeline's talker: vLLM on the random-weight codec LM, profiler configured."""
    return _stages["talker"]


@pytest.fixture(scope="session")
def code2wav_stage(_stages: dict[str, RunningStage]) -> RunningStage:
    """The omni pipeline's code2wav: the torch engine on the vocoder, profiler configured."""
    return _stages["code2wav"]
