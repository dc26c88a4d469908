"""The servers' event loop: uvloop when installed unless OMNISTAGE_EVENT_LOOP says asyncio,
and a real grpc.aio streaming call served and answered on it."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from omnistage.errors import InvalidRequestError
from omnistage.server.event_loop import LOOP_VARIABLE, loop_kind, run_server
from omnistage.v1 import stage_pb2, stage_pb2_grpc

uvloop = pytest.importorskip("uvloop")


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (None, "uvloop"),
        ("", "uvloop"),
        ("auto", "uvloop"),
        ("UVLOOP", "uvloop"),
        ("asyncio", "asyncio"),
    ],
)
def test_loop_kind(value: str | None, kind: str) -> None:
    environ = {} if value is None else {LOOP_VARIABLE: value}
    assert loop_kind(environ) == kind


def test_unknown_loop_is_refused_with_the_choices() -> None:
    with pytest.raises(
        InvalidRequestError, match=r"must be one of auto, uvloop, asyncio \(got 'trio'\)"
    ):
        loop_kind({LOOP_VARIABLE: "trio"})


class _TwoDeltas(stage_pb2_grpc.StageServicer):  # type: ignore[misc]
    async def Generate(self, request: stage_pb2.GenerateRequest, context: object):  # type: ignore[no-untyped-def]
        yield stage_pb2.GenerateResponse(request_id=request.request_id, token_ids=[7])
        yield stage_pb2.GenerateResponse(request_id=request.request_id, finished=True)


async def _round_trip() -> tuple[str, list[bool]]:
    server = grpc.aio.server()
    stage_pb2_grpc.add_StageServicer_to_server(_TwoDeltas(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = stage_pb2_grpc.StageStub(channel)
            call = stub.Generate(stage_pb2.GenerateRequest(request_id="r1"), timeout=10)
            finished = [msg.finished async for msg in call]
    finally:
        await server.stop(None)
    return type(asyncio.get_running_loop()).__module__, finished


@pytest.mark.parametrize(("value", "module"), [("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_grpc_aio_serves_a_stream_on_the_chosen_loop(
    value: str, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(LOOP_VARIABLE, value)
    loop_module, finished = run_server(_round_trip())
    assert loop_module.split(".")[0] == module
    assert finished == [False, True]
