"""An orchestrator over two replicas of a torch stage, each with --max-inflight 1.

While one replica holds a request, the next request goes to the other one, whichever the
round-robin picked first; with both full the orchestrator answers RESOURCE_EXHAUSTED itself,
naming both replicas, with their retry hint.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from omnistage.launch import ServerProcess
from omnistage.v1 import orchestrator_pb2, orchestrator_pb2_grpc, stage_pb2, stage_pb2_grpc
from tests.gate_model import Gate, gated_stage_args

pytestmark = pytest.mark.slow
ORCHESTRATOR_FLAGS = ("--port", "0", "--host", "127.0.0.1")


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ServerProcess, list[ServerProcess], list[Gate]]]:
    tmp = tmp_path_factory.mktemp("replicas")
    gates = [Gate(str(tmp / f"gate{n}")) for n in range(2)]
    stages = [
        ServerProcess(
            f"stage 'vocoder' replica {n}",
            gated_stage_args("vocoder", gate, max_inflight=1),
            log_path=tmp / f"vocoder{n}.log",
        )
        for n, gate in enumerate(gates)
    ]
    orchestrator: ServerProcess | None = None
    try:
        addresses = [stage.wait_serving(timeout=120) for stage in stages]
        pipeline = tmp / "pipeline.yaml"
        pipeline.write_text(
            f"name: replicas\nstages:\n  - name: vocoder\n    addresses: [{', '.join(addresses)}]\n"
        )
        orchestrator = ServerProcess(
            "orchestrator",
            [*("orchestrator", "serve", "--pipeline", str(pipeline)), *ORCHESTRATOR_FLAGS],
            log_path=tmp / "orchestrator.log",
        )
        orchestrator.wait_serving(timeout=60)
        yield orchestrator, stages, gates
    finally:
        for gate in gates:
            gate.free()
        for process in [orchestrator, *stages]:
            if process is not None:
                process.stop()


async def _run(stub: orchestrator_pb2_grpc.OrchestratorStub, rid: str) -> str:
    """The replica that answered the request."""
    request = orchestrator_pb2.PipelineRequest(request_id=rid, token_ids=[1, 2, 3])
    replies = [reply async for reply in stub.Generate(request, timeout=60)]
    assert replies and replies[-1].finished
    return str(replies[-1].replica)


async def _running(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        info = await stage_pb2_grpc.StageStub(channel).GetInfo(stage_pb2.GetInfoRequest())
        return int(info.running_requests)


async def _wait_running(stages: list[str], counts: list[int]) -> None:
    """Poll the stages' GetInfo until they hold `counts` requests, within a deadline."""
    deadline = time.monotonic() + 30
    while (held := [await _running(a) for a in stages]) != counts:
        assert time.monotonic() < deadline, f"the replicas hold {held}, not {counts}"
        await asyncio.sleep(0.05)  # a poll's period, not a synchronisation


async def _busy_one(stages: list[str]) -> int:
    """Which replica holds the one request in flight, once one does."""
    deadline = time.monotonic() + 30
    while sum(held := [await _running(a) for a in stages]) != 1:
        assert time.monotonic() < deadline, f"the replicas hold {held}"
        await asyncio.sleep(0.05)
    return held.index(1)


async def _scenario(orchestrator: str, stages: list[str], gates: list[Gate]) -> None:
    async with grpc.aio.insecure_channel(orchestrator) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        for gate in gates:
            gate.hold()
        # Two at once: one on each replica, whichever the round-robin picked for each.
        pair = [asyncio.create_task(_run(stub, rid)) for rid in ("a", "b")]
        await _wait_running(stages, [1, 1])
        # Both replicas are full: the orchestrator refuses, naming both, with the hint.
        request = orchestrator_pb2.PipelineRequest(request_id="c", token_ids=[1])
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            _ = [reply async for reply in stub.Generate(request, timeout=30)]
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        details = refused.value.details() or ""
        assert details.startswith("stage 'vocoder': every replica is at its in-flight limit")
        assert all(address in details for address in stages) and "--max-inflight" in details
        trailing = dict(refused.value.trailing_metadata() or ())
        assert int(trailing["retry-after-ms"]) >= 10
        for gate in gates:
            gate.release(1)
        assert {await task for task in pair} == set(stages)
        # One replica busy: the next two requests both go to the other one, so at least one
        # of them was first picked for the busy one, refused there, and tried on the other.
        held = asyncio.create_task(_run(stub, "e"))
        busy = await _busy_one(stages)
        free = 1 - busy
        for rid in ("f", "g"):
            gates[free].release(1)
            assert await _run(stub, rid) == stages[free]
        gates[busy].release(1)
        assert await held == stages[busy]


def test_a_full_replica_sends_the_request_to_the_other(
    replicas: tuple[ServerProcess, list[ServerProcess], list[Gate]],
) -> None:
    orchestrator, stages, gates = replicas
    asyncio.run(_scenario(orchestrator.address, [s.address for s in stages], gates))
    log = Path(orchestrator.log_path).read_text()
    assert "full, trying another" in log
