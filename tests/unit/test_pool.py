"""Replica discovery and health-skipping in the stage pool, against real gRPC health servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from omnistage.errors import StageUnavailableError
from orchestrator.config import PipelineConfigError, parse_pipeline
from orchestrator.pool import SLOW_CHECKS_TOLERATED, StagePool
from tests.waiting import eventually

T = TypeVar("T")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@asynccontextmanager
async def health_server(status: int) -> AsyncIterator[tuple[int, health.aio.HealthServicer]]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await servicer.set("", status)
    try:
        yield port, servicer
    finally:
        await server.stop(0)


def pipeline(addresses: str) -> Any:
    return parse_pipeline(f"stages:\n  - name: s\n    {addresses}\n")


def run(main: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(main())  # type: ignore[arg-type]


def test_requests_skip_a_replica_that_is_not_serving() -> None:
    async def main() -> None:
        async with health_server(SERVING) as (a, _), health_server(NOT_SERVING) as (b, b_health):
            pool = StagePool(pipeline(f"addresses: [127.0.0.1:{a}, 127.0.0.1:{b}]"))
            await pool.refresh()
            picked = {(await pool.pick("s")).address for _ in range(4)}
            assert picked == {f"127.0.0.1:{a}"}
            await b_health.set("", SERVING)
            await pool.refresh()
            picked = {(await pool.pick("s")).address for _ in range(4)}
            assert picked == {f"127.0.0.1:{a}", f"127.0.0.1:{b}"}
            await pool.close()

    run(main)


def test_no_serving_replica_is_unavailable_naming_each_replica() -> None:
    async def main() -> None:
        async with health_server(NOT_SERVING) as (a, a_health):
            pool = StagePool(pipeline(f"address: 127.0.0.1:{a}"))
            await pool.refresh()
            with pytest.raises(StageUnavailableError, match=rf"127\.0\.0\.1:{a} NOT_SERVING"):
                await pool.pick("s")
            # pick checks again at once when nothing is SERVING: no wait for the watcher
            await a_health.set("", SERVING)
            assert (await pool.pick("s")).address == f"127.0.0.1:{a}"
            await pool.close()

    run(main)


def test_dns_address_resolves_to_every_address_of_the_name() -> None:
    async def main() -> None:
        async with health_server(SERVING) as (a, _):
            pool = StagePool(pipeline(f"address: dns:///localhost:{a}"))
            assert pool.replicas("s") == []  # nothing until resolved
            assert pool.has_replicas("s")
            await pool.refresh()
            addresses = {r.address for r in pool.replicas("s")}
            assert f"127.0.0.1:{a}" in addresses
            assert (await pool.pick("s")).address in addresses
            await pool.close()

    run(main)


def test_dns_name_that_does_not_resolve_says_so() -> None:
    async def main() -> None:
        pool = StagePool(pipeline("address: dns:///no-such-stage.invalid:50051"))
        with pytest.raises(StageUnavailableError, match=r"no-such-stage\.invalid:50051 did not"):
            await pool.pick("s")
        await pool.close()

    run(main)


def test_the_watcher_notices_a_replica_going_down() -> None:
    async def main() -> None:
        async with health_server(SERVING) as (a, a_health):
            config = pipeline(f"address: 127.0.0.1:{a}")
            config = config.model_copy(update={"health_interval_s": 0.1})
            pool = StagePool(config)
            await pool.start()
            assert pool.replicas("s")[0].health == "SERVING"
            await a_health.set("", NOT_SERVING)
            await eventually(
                lambda: pool.replicas("s")[0].health == "NOT_SERVING",
                timeout=10,
                what="the watcher to see NOT_SERVING",
            )
            await pool.close()

    run(main)


def test_a_slow_health_check_does_not_take_a_serving_replica_out() -> None:
    """A busy stage can miss a health check's deadline while it serves fine; only
    SLOW_CHECKS_TOLERATED timeouts in a row, or a definite answer, take it out."""

    async def main() -> None:
        async with health_server(SERVING) as (a, _):
            pool = StagePool(pipeline(f"address: 127.0.0.1:{a}"))
            await pool.start()
            replica = pool.replicas("s")[0]
            answers = iter(["DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", "SERVING"])

            async def check(_: object) -> str:
                return next(answers)

            pool._check = check  # type: ignore[method-assign, assignment]
            for _ in range(3):
                await pool.refresh()
                assert replica.health == "SERVING"
                assert await pool.pick("s") is replica
            answers = iter(["DEADLINE_EXCEEDED"] * SLOW_CHECKS_TOLERATED + ["NOT_SERVING"])
            for _ in range(SLOW_CHECKS_TOLERATED - 1):
                await pool.refresh()
            assert replica.health == "SERVING"
            await pool.refresh()
            assert replica.health == "DEADLINE_EXCEEDED"
            await pool.refresh()
            assert replica.health == "NOT_SERVING"
            answers = iter(["SERVING", "NOT_SERVING"])
            await pool.refresh()
            await pool.refresh()
            assert replica.health == "NOT_SERVING"  # a definite answer counts at once
            await pool.close()

    run(main)


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("localhost", "has no port"),
        ("localhost:0", "port must be 1 to 65535"),
        ("localhost:http", "port must be 1 to 65535"),
        ("dns:///localhost", "has no port"),
        ("http://localhost:80", "write host:port"),
        ("dns:localhost:80", "write host:port"),
    ],
)
def test_bad_addresses_are_refused_at_load(address: str, problem: str) -> None:
    with pytest.raises(PipelineConfigError, match=problem):
        pipeline(f"address: {address!r}")
    with pytest.raises(PipelineConfigError, match=r"stages\[0\]\.addresses\[1\]"):
        pipeline(f"addresses: ['localhost:1', {address!r}]")


@pytest.mark.parametrize("address", ["localhost:1", "[::1]:50051", "dns:///talker:50072"])
def test_good_addresses_load(address: str) -> None:
    assert pipeline(f"address: {address!r}").stages[0].all_addresses == [address]
