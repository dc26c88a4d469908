"""The one place where exceptions become gRPC statuses, for every RPC of every omnistage server.

`ErrorInterceptor` wraps each method handler, so an RPC body just raises: omnistage errors keep
their code and message, an unknown error becomes INTERNAL with a generic message (its traceback
goes to the log), and cancellation and aborts pass through untouched. An `OverloadedError`
with a retry hint sends it as the trailing metadata `retry-after-ms`. A message is cut to
`MAX_MESSAGE_CHARS` (`omnistage.errors.bounded`), so a long one never exceeds gRPC's metadata limit.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from omnistage.errors import RETRY_AFTER_KEY, OmnistageError, OverloadedError, bounded

logger = logging.getLogger(__name__)
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"  # what every RPC body is given


def status_code(error: OmnistageError) -> grpc.StatusCode:
    """The error's code: the one its instance carries, else its class's."""
    return grpc.StatusCode[error.code]


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor that looks at, or replaces, the handler of each known method."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        return None if handler is None else self.wrap(handler, str(details.method), details)

    def wrap(self, handler: Handler, method: str, details: grpc.HandlerCallDetails) -> Handler:
        raise NotImplementedError


class ErrorInterceptor(HandlerInterceptor):
    """Turns what a unary or server-streaming RPC body raises into `context.abort`.

    `on_unavailable` runs before an UNAVAILABLE answer (a stage's engine has died: the stage
    flips its health)."""

    def __init__(self, *, on_unavailable: Callable[[], None] | None = None) -> None:
        self._on_unavailable = on_unavailable

    def wrap(self, handler: Handler, method: str, details: grpc.HandlerCallDetails) -> Handler:
        if handler.request_streaming or not method.startswith("/omnistage."):
            return handler  # health and reflection keep their own; no omnistage RPC streams in
        rpc = method.rsplit("/", 1)[-1]
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, rpc),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._unary(handler.unary_unary, rpc),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, body: Any, rpc: str) -> Any:
        async def unary(request: Any, context: Context) -> Any:
            try:
                return await body(request, context)
            except Exception as exc:  # noqa: BLE001 - every error gets its status below
                await self._abort(context, rpc, exc)

        return unary

    def _streaming(self, body: Any, rpc: str) -> Any:
        async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for reply in body(request, context):
                    yield reply
            except Exception as exc:  # noqa: BLE001 - every error gets its status below
                await self._abort(context, rpc, exc)

        return streaming

    async def _abort(self, context: Context, rpc: str, exc: Exception) -> None:
        await abort_for(context, rpc, exc, on_unavailable=self._on_unavailable)


async def abort_for(
    context: Context,
    rpc: str,
    exc: Exception,
    *,
    on_unavailable: Callable[[], None] | None = None,
) -> None:
    """End the call with the status `exc` stands for (re-raising an abort or a cancel)."""
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, OmnistageError):
        code = status_code(exc)
        if code is grpc.StatusCode.UNAVAILABLE and on_unavailable is not None:
            on_unavailable()
        message = bounded(str(exc))  # the details travel as metadata, limited to 8 KiB
        if isinstance(exc, OverloadedError) and exc.retry_after_ms:
            hint = ((RETRY_AFTER_KEY, str(exc.retry_after_ms)),)
            await context.abort(code, message, trailing_metadata=hint)
        await context.abort(code, message)
    logger.error("%s failed", rpc, exc_info=exc)
    await context.abort(
        grpc.StatusCode.INTERNAL, f"{rpc} failed inside the server; see the server's log"
    )
