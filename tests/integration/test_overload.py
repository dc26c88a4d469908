"""A real torch stage under more concurrent requests than its --max-inflight.

The stage serves `tests.gate_model`, one request a step, with a limit of LIMIT. While the test
holds the model's gate, admitted requests stay in flight, so exactly LIMIT of a burst are
answered and every other one is refused at once with RESOURCE_EXHAUSTED and a retry hint.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from omnistage.launch import ServerProcess
from omnistage.v1 import stage_pb2, stage_pb2_grpc
from tests.gate_model import Gate, gated_stage_args

pytestmark = pytest.mark.slow

LIMIT = 4
BURST = 40
ROUNDS = 8
RSS_GROWTH_BOUND = 24 << 20  # bytes; a leak of one request's state per refusal is far more
ROW = list(range(4096))  # 16 KiB of float32 per request, 32 KiB of output


@pytest.fixture(scope="module")
def gated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Gate]]:
    tmp = tmp_path_factory.mktemp("overload")
    gate = Gate(str(tmp / "gate"))
    process = ServerProcess(
        "stage 'gated'",
        gated_stage_args("gated", gate, max_inflight=LIMIT),
        log_path=tmp / "gated.log",
    )
    try:
        process.wait_serving(timeout=120)
        yield process, gate
    finally:
        gate.free()
        process.stop()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


async def _generate(stub: stage_pb2_grpc.StageStub, number: int) -> tuple[str, object]:
    """('ok', replies) or ('refused', (details, retry-after-ms)); anything else fails."""
    request = stage_pb2.GenerateRequest(request_id=f"r{number}", token_ids=ROW)
    call = stub.Generate(request, timeout=60)
    try:
        replies = [reply async for reply in call]
    except grpc.aio.AioRpcError as exc:
        assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, exc
        trailing = dict(exc.trailing_metadata() or ())
        return "refused", (exc.details(), trailing.get("retry-after-ms"))
    return "ok", replies


async def _running(stub: stage_pb2_grpc.StageStub) -> int:
    info = await stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=10)
    return int(info.running_requests)


async def _held_burst(address: str, gate: Gate) -> tuple[list[object], list[object]]:
    """BURST requests at once with the gate held: wait until all but LIMIT were answered and
    LIMIT are in the engine, then let those LIMIT through. Returns (answered, refused)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = stage_pb2_grpc.StageStub(channel)
        gate.hold()
        tasks = [asyncio.create_task(_generate(stub, n)) for n in range(BURST)]
        deadline = time.monotonic() + 60
        pending: set[asyncio.Task[tuple[str, object]]] = set(tasks)
        while len(pending) > LIMIT and time.monotonic() < deadline:
            _, pending = await asyncio.wait(
                pending, timeout=deadline - time.monotonic(), return_when=asyncio.FIRST_COMPLETED
            )
        assert len(pending) == LIMIT, f"{BURST - len(pending)} answered while the gate was held"
        assert await _running(stub) == LIMIT
        gate.release(LIMIT)
        results = await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
        gate.free()
        assert await _running(stub) == 0
    answered = [body for kind, body in results if kind == "ok"]
    refused = [body for kind, body in results if kind == "refused"]
    return answered, refused


def test_a_burst_past_the_limit_is_answered_or_refused_with_a_retry_hint(
    gated: tuple[ServerProcess, Gate],
) -> None:
    process, gate = gated
    answered, refused = asyncio.run(_held_burst(process.address, gate))
    assert len(answered) == LIMIT and len(refused) == BURST - LIMIT  # nothing lost
    for replies in answered:
        assert isinstance(replies, list) and replies[-1].finished
        assert sum(1 for r in replies if r.HasField("tensor")) >= 1
    for details, retry in refused:  # type: ignore[misc]
        assert f"limit of {LIMIT} requests in flight" in details and "--max-inflight" in details
        assert "retry after" in details and "another replica" in details
        assert retry is not None and int(retry) >= 10


def test_the_stage_memory_stays_flat_under_repeated_overload(
    gated: tuple[ServerProcess, Gate],
) -> None:
    process, gate = gated
    for _ in range(2):  # warm up: gRPC's and torch's allocators reach their working size
        asyncio.run(_held_burst(process.address, gate))
    before = rss_bytes(process.process.pid)
    for _ in range(ROUNDS):
        answered, refused = asyncio.run(_held_burst(process.address, gate))
        assert (len(answered), len(refused)) == (LIMIT, BURST - LIMIT)
    after = rss_bytes(process.process.pid)
    assert after - before < RSS_GROWTH_BOUND, (
        f"RSS grew {(after - before) >> 20} MiB over {ROUNDS * BURST} requests"
    )


def test_a_free_running_burst_loses_nothing(gated: tuple[ServerProcess, Gate]) -> None:
    """Without the gate, whether each is refused depends on timing; each is one or the other."""
    process, _ = gated

    async def burst() -> list[tuple[str, object]]:
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub = stage_pb2_grpc.StageStub(channel)
            return await asyncio.gather(*(_generate(stub, n) for n in range(BURST)))

    results = asyncio.run(burst())
    assert len(results) == BURST
    assert {kind for kind, _ in results} <= {"ok", "refused"}
    assert any(kind == "ok" for kind, _ in results)
