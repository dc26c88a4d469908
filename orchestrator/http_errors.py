"""Errors and the bearer token on the HTTP front door.

An omnistage error becomes OpenAI's error object, `{"error": {"message", "type", "param",
"code"}}`, with the HTTP status its gRPC code stands for; `code` is that gRPC code's name.
The token check is the gRPC interceptor's, on HTTP: scope "profiling" guards the profiling
endpoints, scope "all" every endpoint but /health.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from omnistage.errors import (
    RETRY_AFTER_KEY,
    OmnistageError,
    OverloadedError,
    UnauthenticatedError,
    bounded,
)
from omnistage.security import AuthScope, ServerSecurity
from orchestrator.http_openai import SAMPLING_KEYS, describe_errors

logger = logging.getLogger(__name__)

HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 409,
    "ALREADY_EXISTS": 409,
    "ABORTED": 409,
    "RESOURCE_EXHAUSTED": 429,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
"""The HTTP status of each gRPC code; any other code is 500."""

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}
PARAMS = frozenset(SAMPLING_KEYS) | {
    "messages", "prompt", "model", "stage_sampling", "stages", "n", "logprobs", "tools"
}  # fmt: skip


def http_status(error: OmnistageError) -> int:
    return HTTP_STATUS.get(error.code, 500)


def error_body(error: OmnistageError, *, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error object for an omnistage error. `param` defaults to the field that the
    message starts with, when it is a request field ("temperature must be ≥ 0 ...")."""
    message = bounded(str(error))
    if param is None:
        first = message.split(" ", 1)[0].split("[", 1)[0].split(".", 1)[0].rstrip(":")
        param = first if first in PARAMS else None
    status = http_status(error)
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error"),
            "param": param,
            "code": error.code,
        }
    }


def error_response(error: OmnistageError, *, param: str | None = None) -> JSONResponse:
    headers = {}
    if isinstance(error, OverloadedError) and error.retry_after_ms:
        # Retry-After is in whole seconds; OpenAI's SDKs read retry-after-ms first.
        headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_ms / 1000)))
        headers[RETRY_AFTER_KEY] = str(error.retry_after_ms)
    return JSONResponse(
        error_body(error, param=param), status_code=http_status(error), headers=headers
    )


async def on_omnistage_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OmnistageError)
    return error_response(exc)


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """A body FastAPI could not read into the request's types: 400, each field named."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    loc = [str(p) for p in errors[0]["loc"] if p != "body"] if errors else []
    error = OmnistageError(describe_errors(errors), code="INVALID_ARGUMENT")
    return error_response(error, param=loc[0] if loc else None)


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (an unknown path, a wrong method) as OpenAI error objects."""
    assert isinstance(exc, HTTPException)
    body = {
        "error": {
            "message": f"{request.method} {request.url.path}: {exc.detail}",
            "type": ERROR_TYPES.get(exc.status_code, "invalid_request_error"),
            "param": None,
            "code": None,
        }
    }
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    """A bug: 500 with a generic message; uvicorn logs the traceback once this returns."""
    error = OmnistageError(
        f"{request.method} {request.url.path} failed inside the server; see the server's log"
    )
    return error_response(error)


Handler = Callable[[Request, Any], Coroutine[Any, Any, Response]]
EXCEPTION_HANDLERS: dict[int | type[Exception], Handler] = {
    OmnistageError: on_omnistage_error,
    RequestValidationError: on_validation_error,
    HTTPException: on_http_error,
    Exception: on_unexpected_error,
}


class TokenCheck:
    """Whether a request may use an endpoint: the server's token, when it has one, is
    required on the profiling endpoints (scope "profiling") or on all but /health ("all")."""

    def __init__(self, security: ServerSecurity) -> None:
        self._expected = security.token.encode() if security.token else None
        self._scope: AuthScope = security.auth_scope

    def guards(self, group: str) -> bool:
        """`group` is "profiling" or "inference"."""
        return self._expected is not None and (self._scope == "all" or group == "profiling")

    def check(self, request: Request, group: str) -> None:
        if self._expected is None or not self.guards(group):
            return
        header = request.headers.get("authorization")
        where = f"{request.method} {request.url.path}"
        if header is None:
            raise UnauthenticatedError(
                f"this server requires a bearer token for {where}: send the header "
                "'Authorization: Bearer <token>'"
            )
        scheme, _, token = header.strip().partition(" ")
        presented = token.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(presented, self._expected):
            logger.warning("refused %s: wrong bearer token", where)
            raise UnauthenticatedError("bearer token rejected")
