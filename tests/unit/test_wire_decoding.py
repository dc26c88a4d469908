"""Requests are decoded by the servers' error interceptor, inside the call: a corrupt message
is INVALID_ARGUMENT with at most one short log line (never grpc's UNKNOWN and a traceback per
message), and a call without the token is refused before its body is read.

A real grpc.aio server of the server kit (GrpcServer) on a free port, serving a small Stage
servicer; the calls send raw bytes, as a hostile client would.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any, TypeVar

import grpc
import pytest

from omnistage.security import AUTHORIZATION_KEY, ServerSecurity
from omnistage.server import GrpcServer
from omnistage.server import errors as errors_module
from omnistage.server.auth import BearerTokenInterceptor
from omnistage.server.errors import RateLimitedLog
from omnistage.v1 import stage_pb2, stage_pb2_grpc

T = TypeVar("T")
STAGE = stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name
TOKEN = "wire-token"
CORRUPT = b"\xff\xff\xff\xff"  # a field tag without its value: protobuf cannot parse it
GOOD_GENERATE = stage_pb2.GenerateRequest(prompt="hi").SerializeToString()


class EchoStage(stage_pb2_grpc.StageServicer):
    """Generate echoes the prompt; StartProfile answers a fixed session id."""

    async def Generate(self, request: Any, context: Any) -> AsyncIterator[Any]:
        yield stage_pb2.GenerateResponse(text=request.prompt, finished=True)

    async def StartProfile(self, request: Any, context: Any) -> Any:
        return stage_pb2.StartProfileResponse(session_id="s")


@asynccontextmanager
async def serving(security: ServerSecurity | None = None) -> AsyncIterator[grpc.aio.Channel]:
    kit = GrpcServer(STAGE, security=security)
    stage_pb2_grpc.add_StageServicer_to_server(EchoStage(), kit.server)
    port = kit.bind("127.0.0.1", 0)
    await kit.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await kit.stop(None)


async def raw_call(
    channel: grpc.aio.Channel, method: str, body: bytes, *, token: str | None = None
) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Send `body` as it is (identity serializers); the status, its message and the replies."""
    metadata = ((AUTHORIZATION_KEY, f"Bearer {token}"),) if token else None
    path = f"/{STAGE}/{method}"
    replies: list[bytes] = []
    try:
        if method == "Generate":
            call = channel.unary_stream(path)(body, timeout=10, metadata=metadata)
            replies = [reply async for reply in call]
        else:
            replies = [await channel.unary_unary(path)(body, timeout=10, metadata=metadata)]
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or "", replies
    return grpc.StatusCode.OK, "", replies


def run(main: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(main())  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["Generate", "StartProfile"])
def test_corrupt_messages_are_invalid_argument_with_one_short_log_line(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's 1,355 undecodable messages: each was UNKNOWN "Unexpected DecodeError"
    and wrote a ~750-byte traceback; now INVALID_ARGUMENT, and 50 of them log one line."""

    async def main() -> list[tuple[grpc.StatusCode, str, list[bytes]]]:
        async with serving() as channel:
            answers = [await raw_call(channel, method, CORRUPT) for _ in range(50)]
            answers.append(await raw_call(channel, "Generate", GOOD_GENERATE))
            return answers

    with caplog.at_level(logging.INFO):
        *corrupt, good = run(main)
    for code, message, _ in corrupt:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, message
        assert f"the {method} request is not a valid message" in message
        assert "omnistage's protos" in message and len(message) < 500
    assert good[0] == grpc.StatusCode.OK  # the server goes on serving
    assert stage_pb2.GenerateResponse.FromString(good[2][0]).text == "hi"
    lines = [r for r in caplog.records if "does not decode" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in caplog.records]
    assert lines[0].exc_info is None and len(lines[0].getMessage()) < 300
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


@pytest.mark.parametrize("method", ["Generate", "StartProfile"])
def test_an_undecodable_request_without_a_token_is_unauthenticated(method: str) -> None:
    """The token is checked before the body is decoded: a corrupt message without the token
    is UNAUTHENTICATED (it was UNKNOWN), and with the token it is INVALID_ARGUMENT."""
    security = ServerSecurity(token=TOKEN, auth_scope="all")

    async def main() -> list[tuple[grpc.StatusCode, str, list[bytes]]]:
        async with serving(security) as channel:
            return [
                await raw_call(channel, method, CORRUPT),
                await raw_call(channel, method, CORRUPT, token="wrong"),
                await raw_call(channel, method, CORRUPT, token=TOKEN),
            ]

    tokenless, wrong, right = run(main)
    assert tokenless[0] == grpc.StatusCode.UNAUTHENTICATED, tokenless
    assert "requires a bearer token" in tokenless[1]
    assert wrong[:2] == (grpc.StatusCode.UNAUTHENTICATED, "bearer token rejected")
    assert right[0] == grpc.StatusCode.INVALID_ARGUMENT, right


def test_the_decode_log_says_how_many_lines_it_left_out(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [1000.0]
    monkeypatch.setattr(errors_module.time, "monotonic", lambda: clock[0])
    log = RateLimitedLog(every_s=10.0)
    with caplog.at_level(logging.INFO):
        assert log.note("Generate", 4, "corrupt")
        clock[0] += 9.9
        assert not any(log.note("Generate", 4, "corrupt") for _ in range(3))
        clock[0] += 0.2
        assert log.note("StopProfile", 7, "corrupt")
    first, second = (r.getMessage() for r in caplog.records)
    assert first == "refused a Generate request of 4 bytes that does not decode: corrupt"
    assert second.endswith("(and 3 more since the last such line)")


def test_the_token_refusal_never_decodes_the_body() -> None:
    """Even in front of a handler that decodes (no error interceptor between them), the
    refusal takes the body as bytes."""

    async def body(request: object, context: object) -> None:
        return None

    decoding = grpc.unary_unary_rpc_method_handler(
        body, request_deserializer=stage_pb2.StartProfileRequest.FromString
    )
    refusing = BearerTokenInterceptor(TOKEN, scope="all")
    details: Any = SimpleNamespace(invocation_metadata=())
    wrapped = refusing.wrap(decoding, f"/{STAGE}/StartProfile", details)
    assert wrapped is not decoding and wrapped.request_deserializer is None
