"""Deaths of a vLLM stage's processes (only vLLM runs its engine in processes of its own; the
torch engine is a thread of the stage):

- its engine core killed while the stage is idle: the stage reports NOT_SERVING within one
  health interval, and then answers Generate with UNAVAILABLE;
- the stage's main process killed (`kill -9`): its engine core and worker die with it, and
  the watchdog too (services/watchdog.py).

Each destroys a session stage, so both are marked `destroys_stage` and run at the very end:
the engine core dies on the talker, and the thinker's main process is killed. No test uses
either afterwards (the tests that stop a shared stage, `stops_shared_stage`, run before them
and stop others), and no engine is started for these tests alone.
"""

from __future__ import annotations

import signal
import time

import grpc
import psutil
import pytest

from omnistage.launch import health_status
from omnistage.v1 import stage_pb2, stage_pb2_grpc
from tests.servers import HEALTH_INTERVAL_S, RunningStage

pytestmark = pytest.mark.slow

DETECTION_SLACK_S = 2.0  # vLLM's monitor thread sees the death; one health check's round trip
WATCHDOG_SLACK_S = 15.0  # the watchdog's SIGTERM grace and SIGKILL (services/watchdog.py)


def _engine_core(stage_pid: int) -> psutil.Process:
    deadline = time.monotonic() + 30
    while True:
        children = psutil.Process(stage_pid).children(recursive=True)
        cores = [c for c in children if "EngineCore" in c.name() + " ".join(c.cmdline())]
        if cores:
            return cores[0]
        assert time.monotonic() < deadline, f"no EngineCore among {children}"
        time.sleep(0.1)  # a poll's period, not a synchronisation


@pytest.mark.destroys_stage
def test_a_killed_engine_core_flips_health_to_not_serving(talker_stage: RunningStage) -> None:
    doomed = talker_stage.process
    assert health_status(doomed.address) == "SERVING"
    core = _engine_core(doomed.process.pid)
    killed = time.monotonic()
    core.send_signal(signal.SIGKILL)
    deadline = killed + HEALTH_INTERVAL_S + DETECTION_SLACK_S
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


@pytest.mark.destroys_stage
def test_kill_9_of_a_stage_leaves_no_engine_process(stage: RunningStage) -> None:
    """Issue 14: `kill -9` of a stage's main process left its EngineCore and Worker running,
    holding 3.3 GB. Now every process the stage started is gone within a few seconds."""
    main = psutil.Process(stage.process.process.pid)
    _engine_core(main.pid)
    descendants = main.children(recursive=True)
    names = " ".join(p.name() + " " + " ".join(p.cmdline()) for p in descendants)
    assert "EngineCore" in names and "services.watchdog" in names, names
    main.send_signal(signal.SIGKILL)  # the main process alone, not its group
    stage.process.process.wait(timeout=30)
    _, alive = psutil.wait_procs(descendants, timeout=WATCHDOG_SLACK_S)
    assert alive == [], f"still running after kill -9 of the stage: {alive}"
