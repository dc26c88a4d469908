"""The bearer-token check of every omnistage server: one grpc.aio server interceptor.

Scope "profiling" guards the RPCs that start, stop and read profiles (traces can be large, and
they reveal the model's code); scope "all" guards every omnistage RPC. Health and reflection
stay open in both, so load balancers and Kubernetes probes need no token.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import grpc

from omnistage.security import AUTHORIZATION_KEY, CLIENT_TOKEN_ENV, AuthScope
from omnistage.server.errors import Context, Handler, HandlerInterceptor
from omnistage.v1 import orchestrator_pb2, stage_pb2

logger = logging.getLogger(__name__)

_STAGE = stage_pb2.DESCRIPTOR.services_by_name["Stage"].full_name
_ORCHESTRATOR = orchestrator_pb2.DESCRIPTOR.services_by_name["Orchestrator"].full_name
PROFILING_METHODS = frozenset(
    [f"/{_STAGE}/{m}" for m in ("StartProfile", "StopProfile", "FetchProfileFile")]
    + [
        f"/{_ORCHESTRATOR}/{m}"
        for m in (
            "StartProfile",
            "StopProfile",
            "StopProfileStream",
            "ListSessions",
            "FetchSessionFile",
            "DeleteSession",
        )
    ]
)
OMNISTAGE_PREFIX = "/omnistage."


def protects(method: str, scope: AuthScope) -> bool:
    """Whether `method` (a full gRPC method path) needs the token under `scope`."""
    if scope == "all":
        return method.startswith(OMNISTAGE_PREFIX)
    return method in PROFILING_METHODS


def presented_token(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer <token>` entry; "" for another scheme."""
    for key, value in metadata or ():
        if key.lower() == AUTHORIZATION_KEY:
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


class BearerTokenInterceptor(HandlerInterceptor):
    """Refuses protected calls without the right token, with UNAUTHENTICATED."""

    def __init__(self, token: str, *, scope: AuthScope) -> None:
        self._expected = token.encode()
        self._scope = scope

    def wrap(self, handler: Handler, method: str, details: grpc.HandlerCallDetails) -> Handler:
        if not protects(method, self._scope):
            return handler
        token = presented_token(details.invocation_metadata)
        if token is None:
            return _refusal(
                handler,
                f"this server requires a bearer token for {method.lstrip('/')}; "
                f"pass --token-file or set {CLIENT_TOKEN_ENV}",
            )
        if not hmac.compare_digest(token.encode(), self._expected):
            logger.warning("refused %s: wrong bearer token", method)
            return _refusal(handler, "bearer token rejected")
        return handler


def _refusal(handler: Handler, message: str) -> Handler:
    """A handler of the same call kind as `handler` that aborts with UNAUTHENTICATED.

    It takes the body as bytes and never decodes it: a call without the token is refused
    whatever it sent, a corrupt message included."""

    async def refuse(request: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    for kind, make in kinds.items():
        if getattr(handler, kind) is not None:
            return make(
                refuse,
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
    raise AssertionError(f"a method handler of no known kind: {handler!r}")
