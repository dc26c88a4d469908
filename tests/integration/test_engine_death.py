"""A vLLM stage whose engine core process is killed while the stage is idle reports
NOT_SERVING within one health interval, and then answers Generate with UNAVAILABLE.

Only vLLM runs its engine in processes of its own (the torch engine is a thread of the stage),
so this module uses a vLLM stage of its own, `doomed_stage`: one of the session's stages, so
that its engine loads beside the others, but one no other test uses.
"""

from __future__ import annotations

import signal
import time

import grpc
import psutil
import pytest

from omnistage.launch import health_status
from omnistage.v1 import stage_pb2, stage_pb2_grpc
from tests.servers import DOOMED_HEALTH_INTERVAL_S, RunningStage

pytestmark = pytest.mark.slow

DETECTION_SLACK_S = 2.0  # vLLM's monitor thread sees the death; one health check's round trip


def _engine_core(stage_pid: int) -> psutil.Process:
    deadline = time.monotonic() + 30
    while True:
        children = psutil.Process(stage_pid).children(recursive=True)
        cores = [c for c in children if "EngineCore" in c.name() + " ".join(c.cmdline())]
        if cores:
            return cores[0]
        assert time.monotonic() < deadline, f"no EngineCore among {children}"
        time.sleep(0.1)  # a poll's period, not a synchronisation


def test_a_killed_engine_core_flips_health_to_not_serving(doomed_stage: RunningStage) -> None:
    doomed = doomed_stage.process
    assert health_status(doomed.address) == "SERVING"
    core = _engine_core(doomed.process.pid)
    killed = time.monotonic()
    core.send_signal(signal.SIGKILL)
    deadline = killed + DOOMED_HEALTH_INTERVAL_S + DETECTION_SLACK_S
    while (status := health_status(doomed.address)) == "SERVING":
        assert time.monotonic() < deadline, "still SERVING past one health interval"
        time.sleep(0.05)  # a poll's period, not a synchronisation
    assert status == "NOT_SERVING"
    assert doomed.process.poll() is None, "the stage itself must keep answering"
    with grpc.insecure_channel(doomed.address) as channel:
        stub = stage_pb2_grpc.StageStub(channel)
        request = stage_pb2.GenerateRequest(prompt="hi")
        with pytest.raises(grpc.RpcError) as failed:
            list(stub.Generate(request, timeout=30))
    assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "has died" in (failed.value.details() or "")
