"""Every error class maps to a real gRPC status, and back again in the client."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from omnistage import errors
from omnistage.rpc import error_from_rpc
from omnistage.server.errors import abort_for, status_code
from omnistage.types import ChatTurn, GenerateInput, TensorData
from omnistage.validation import validate_generate_input
from tests.unit.fake_grpc import FakeRpcError

ALL = [
    errors.InvalidRequestError,
    errors.ProfilerStateError,
    errors.NotFoundError,
    errors.OverloadedError,
    errors.EngineDeadError,
    errors.StageUnavailableError,
    errors.DeadlineError,
    errors.CancelledError,
    errors.UnauthenticatedError,
    errors.AlreadyExistsError,
    errors.AbortedError,
]


@pytest.mark.parametrize("cls", ALL)
def test_each_error_names_a_grpc_status(cls: type[errors.OmnistageError]) -> None:
    assert status_code(cls("x")) is grpc.StatusCode[cls.code]


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.INVALID_ARGUMENT, errors.InvalidRequestError),
        (grpc.StatusCode.FAILED_PRECONDITION, errors.ProfilerStateError),
        (grpc.StatusCode.NOT_FOUND, errors.NotFoundError),
        (grpc.StatusCode.UNAVAILABLE, errors.StageUnavailableError),
        (grpc.StatusCode.DEADLINE_EXCEEDED, errors.DeadlineError),
        (grpc.StatusCode.INTERNAL, errors.OmnistageError),
    ],
)
def test_client_maps_status_back(code: grpc.StatusCode, cls: type[errors.OmnistageError]) -> None:
    error = error_from_rpc(FakeRpcError(code, "what to fix"), address="h:1")
    assert type(error) is cls
    assert "what to fix" in str(error) and "h:1" in str(error)


def test_the_error_interceptor_wraps_only_omnistage_methods() -> None:
    """Health and reflection keep their own error handling (a Watch ended by shutdown is not
    an omnistage INTERNAL error); every omnistage method gets the mapping."""
    from omnistage.server.errors import ErrorInterceptor

    async def body(request: object, context: object) -> None:
        return None

    handler = grpc.unary_unary_rpc_method_handler(body)
    streaming = grpc.unary_stream_rpc_method_handler(body)
    interceptor = ErrorInterceptor()
    details: Any = None
    assert interceptor.wrap(streaming, "/grpc.health.v1.Health/Watch", details) is streaming
    assert interceptor.wrap(handler, "/grpc.reflection.v1alpha.X/Y", details) is handler
    wrapped = interceptor.wrap(handler, "/omnistage.v1.Stage/GetInfo", details)
    assert wrapped is not handler and wrapped.unary_unary is not body


# What grpc answers in each case (seen on grpcio 1.85 against real servers).
KILLED_MID_CALL = "Stream removed (Socket closed)"
KILLED_BEFORE = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:9: "
    "Failed to connect to remote host: Connection refused"
)
PLAINTEXT_TO_TLS = (
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:h:1: Socket closed"
)
UNTRUSTED_CERT = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:h:1: Tls handshake failed "
    "(TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: CERTIFICATE_VERIFY_FAILED"
)


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize("details", [KILLED_MID_CALL, KILLED_BEFORE])
def test_a_killed_stages_unavailable_carries_no_tls_hint(details: str, tls: bool) -> None:
    """The issue's case: a stage killed mid-call gave a TLS hint on a plaintext link."""
    error = error_from_rpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE, details), tls=tls)
    assert error.code == "UNAVAILABLE"
    assert "TLS" not in str(error) and "--tls" not in str(error)


def test_tls_hints_match_the_link() -> None:
    def message(details: str, *, tls: bool) -> str:
        return str(error_from_rpc(FakeRpcError(grpc.StatusCode.UNAVAILABLE, details), tls=tls))

    plaintext = message(PLAINTEXT_TO_TLS, tls=False)
    assert "this link is plaintext: if the server uses TLS, pass the CA" in plaintext
    handshake = message(UNTRUSTED_CERT, tls=True)
    assert "the TLS handshake failed: check that --tls-ca" in handshake
    assert "this link is plaintext" not in handshake
    # a TLS link never hears it is plaintext, and a plaintext one has no handshake to fail
    assert "--tls" not in message(PLAINTEXT_TO_TLS, tls=True)
    assert "handshake failed: check" not in message(UNTRUSTED_CERT, tls=False)


@pytest.mark.parametrize("tls", [False, True])
def test_each_client_hints_for_its_own_link(tls: bool) -> None:
    from omnistage.security import ClientSecurity
    from omnistage.stage_client import AsyncStageClient

    async def main() -> str:
        security = ClientSecurity(use_tls=True) if tls else None
        client = AsyncStageClient("127.0.0.1:9", security=security)
        try:
            with pytest.raises(errors.StageUnavailableError) as caught, client._errors():
                details = UNTRUSTED_CERT if tls else PLAINTEXT_TO_TLS
                raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, details)
        finally:
            await client.close()
        return str(caught.value)

    message = asyncio.run(main())
    assert ("handshake failed: check" in message) is tls
    assert ("this link is plaintext" in message) is not tls


# --- Issue 14: an error message that echoes a 20,000-character value stays short ---

HUGE = "x" * 20_000


def test_echo_clips_a_20000_character_value_to_200_and_an_ellipsis() -> None:
    assert errors.echo("float32") == "'float32'"
    clipped = errors.echo(HUGE)
    assert clipped.startswith("'" + "x" * 200 + "'…") and "20,000 characters" in clipped
    assert len(clipped) < 250
    assert len(errors.echo(list(range(10_000)))) == errors.MAX_ECHO_CHARS + 1


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        pytest.param(
            GenerateInput(request_id="r", messages=(ChatTurn(HUGE, "hi"),)),
            "messages[0].role",
            id="20000-character-role",
        ),
        pytest.param(
            GenerateInput(request_id="r", tensor=TensorData(dtype=HUGE, shape=(1,), data=b"")),
            "tensor dtype",
            id="20000-character-dtype",
        ),
    ],
)
def test_a_message_echoing_a_20000_character_value_is_short(
    request_: GenerateInput, words: str
) -> None:
    with pytest.raises(errors.InvalidRequestError) as info:
        validate_generate_input(request_)
    assert words in str(info.value) and len(str(info.value)) < 400


def test_the_wire_bounds_any_message_however_it_was_built() -> None:
    """The last safety net: a message no `echo` clipped (a third party's, say) is cut before
    it becomes gRPC status details or an HTTP error body."""
    from orchestrator.http_errors import error_body
    from tests.unit.fake_grpc import Aborted, FakeContext

    error = errors.InvalidRequestError(f"the chat template rejected {HUGE}")
    context = FakeContext()
    with pytest.raises(Aborted):
        asyncio.run(abort_for(context, "Generate", error))  # type: ignore[arg-type]
    assert context.status is not None
    code, message = context.status
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("the chat template rejected xxx")
    assert errors.MAX_MESSAGE_CHARS < len(message) < errors.MAX_MESSAGE_CHARS + 50
    body = error_body(error)["error"]
    assert body["code"] == "INVALID_ARGUMENT" and len(body["message"]) == len(message)


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (grpc.StatusCode.ALREADY_EXISTS, errors.AlreadyExistsError),
        (grpc.StatusCode.ABORTED, errors.AbortedError),
    ],
)
def test_the_new_codes_map_both_ways(
    code: grpc.StatusCode, cls: type[errors.OmnistageError]
) -> None:
    assert status_code(cls("x")) is code
    assert type(error_from_rpc(FakeRpcError(code, "x"))) is cls
