"""Every error class maps to a real gRPC status, and back again in the client."""

from __future__ import annotations

from typing import Any

import grpc
import pytest

from omnistage import errors
from omnistage.rpc import error_from_rpc
from omnistage.server.errors import status_code
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
