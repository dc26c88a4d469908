"""A torch stage's lifecycle under an orchestrator (issue 14): SIGTERM while a StopProfile is
under way, and a restart on the same port during a profile session.

The stage runs tests/gate_model.py: while the test holds the gate, each forward waits, and so
does a StopProfile (the torch engine stops its profiler on the thread that runs forwards), so
the test decides when the stop can finish. Torch stages start in seconds: each test starts its
own.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest

import omnistage
from omnistage.launch import ServerProcess
from omnistage.types import ProfileReport
from omnistage.v1 import stage_pb2, stage_pb2_grpc
from tests.gate_model import Gate
from tests.servers import free_port, serve_pipeline
from tests.waiting import wait_for_log, wait_until

pytestmark = pytest.mark.slow
GRACE_S = 30  # the stage's drain; the SIGTERM test ends long before it


def _torch_stage(tmp: Path, name: str, *, port: int = 0, gate: Gate | None = None) -> ServerProcess:
    options: dict[str, Any] = {"max_batch_size": 1, "max_wait_ms": 0, "num_threads": 1}
    if gate is not None:
        options["gate"] = gate.path
    profiler = {
        "torch_profiler_dir": str(tmp / f"{name}-profiles"),
        "torch_profiler_with_stack": False,
    }
    args = [
        *("stage", "serve", "--name", name, "--engine", "torch"),
        *("--model", "tests.gate_model:build", "--port", str(port), "--host", "127.0.0.1"),
        *("--engine-options", json.dumps(options), "--grace-seconds", str(GRACE_S)),
        *("--profiler-config", json.dumps(profiler)),
    ]
    log = tmp / f"{name}-{port}-{len(list(tmp.glob('*.log')))}.log"
    process = ServerProcess(f"stage {name}", args, log_path=log)
    process.wait_serving(timeout=120)
    return process


def _pipeline(tmp: Path, stage: ServerProcess) -> ServerProcess:
    text = f"name: solo\nstages:\n  - name: vocoder\n    address: {stage.address}\n"
    return serve_pipeline(tmp, "solo", text, extra=["--profile-dir", str(tmp / "collected")])


def test_sigterm_during_stop_profile_still_serves_the_files(tmp_path: Path) -> None:
    gate = Gate(str(tmp_path / "gate"))
    stage = _torch_stage(tmp_path, "vocoder", gate=gate)
    orchestrator = _pipeline(tmp_path, stage)
    result: dict[str, Any] = {}
    try:
        with omnistage.Client(orchestrator.address) as client:
            client.start_profile()
            gate.hold()
            channel = grpc.insecure_channel(stage.address)
            stub = stage_pb2_grpc.StageStub(channel)
            call = stub.Generate(stage_pb2.GenerateRequest(token_ids=[1, 2, 3]), timeout=120)
            # the forward waits at the gate; the stop below waits behind it
            stopper = threading.Thread(
                target=lambda: result.setdefault("report", client.stop_profile("sigterm"))
            )
            stopper.start()
            wait_for_log([stage.log_path], "stopping profile session", timeout=60)
            stage.process.terminate()
            wait_for_log([stage.log_path], "draining stage", timeout=30)
            refused = stub.Generate(stage_pb2.GenerateRequest(token_ids=[4]), timeout=30)
            with pytest.raises(grpc.RpcError) as draining:
                list(refused)
            gate.free()  # the forward runs, then the stop, then the pulls
            replies = list(call)
            stopper.join(timeout=120)
            channel.close()
        code = stage.process.wait(timeout=GRACE_S)  # it exits once the files are pulled
    finally:
        gate.free()
        stage.stop()
        orchestrator.stop()
    assert draining.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "draining" in (draining.value.details() or "")
    assert replies and replies[-1].finished
    report = result["report"]
    assert isinstance(report, ProfileReport)
    (vocoder,) = report.stages
    assert vocoder.ok, vocoder.error
    pulled = Path(vocoder.local_dir)
    names = {item.name for item in vocoder.files}
    assert any(n.endswith(".pt.trace.json.gz") for n in names), names
    assert {p.name for p in pulled.iterdir()} >= names
    assert code == 0


def test_a_restarted_stage_is_not_shown_profiling(tmp_path: Path) -> None:
    port = free_port()
    stage = _torch_stage(tmp_path, "vocoder", port=port)
    orchestrator = _pipeline(tmp_path, stage)
    try:
        with omnistage.Client(orchestrator.address) as client:
            client.start_profile()
            assert client.pipeline().stages[0].profiling_active
            stage.kill()
            stage = _torch_stage(tmp_path, "vocoder", port=port)
            info = wait_until(
                lambda: (s := client.pipeline()).stages[0].health == "SERVING" and s,
                timeout=60,
                what="the orchestrator to see the restarted stage SERVING",
            )
            assert not info.stages[0].profiling_active
            report = client.stop_profile("restarted")
    finally:
        stage.stop()
        orchestrator.stop()
    (vocoder,) = report.stages
    assert not vocoder.ok and "no longer holds its profile session" in vocoder.error
