"""Session-wide real servers: vLLM stages on the bundled model, in their own processes.

Engines start once per session, concurrently, and every integration test runs against them.
Fixtures wait on the gRPC health check, never on log lines; finalizers SIGTERM, then kill
the process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def _start_stage(name: str, logs: Path, profiler_dir: Path | None) -> ServerProcess:
    return ServerProcess(
        f"stage {name!r}",
        stage_args(
            name=name,
            profiler_config=(
                {"torch_profiler_dir": str(profiler_dir), "torch_profiler_with_stack": False}
                if profiler_dir
                else None
            ),
            extra=["--grace-seconds", "20"],
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
    processes = {
        "profiled": (_start_stage("thinker", logs, profiler_dir), profiler_dir),
        "rewriter": (_start_stage("rewriter", logs, rewriter_dir), rewriter_dir),
        "plain": (_start_stage("plain", logs, None), None),
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
        for process, _ in processes.values():
            process.stop()


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
