"""The one place where exceptions become gRPC statuses, for every RPC of every omnistage server.

`ErrorInterceptor` wraps each method handler, so an RPC body just raises: omnistage errors keep
their code and message, an unknown error becomes INTERNAL with a generic message (its traceback
goes to the log), and cancellation and aborts pass through untouched. An `OverloadedError`
with a retry hint sends it as the trailing metadata `retry-after-ms`. A message is cut to
`MAX_MESSAGE_CHARS` (`omnistage.errors.bounded`), so a long one never exceeds gRPC's metadata limit.

It also decodes each request itself, inside the call, instead of letting grpc do it before:
a message that does not decode is INVALID_ARGUMENT, logged as one short line at most every
`DECODE_LOG_EVERY_S` (grpc's own decoding answers UNKNOWN and logs a traceback per message,
which lets any client flood the log). And since the body is decoded only once the call runs,
an interceptor in front of this one (the bearer token) refuses a call before its body is read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc

from omnistage.errors import (
    RETRY_AFTER_KEY,
    InvalidRequestError,
    OmnistageError,
    OverloadedError,
    bounded,
)

logger = logging.getLogger(__name__)
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"  # what every RPC body is given
Decoder: TypeAlias = "Callable[[bytes], Any] | None"
DECODE_LOG_EVERY_S = 10.0  # at most one log line per this many seconds for corrupt messages
MAX_DECODE_DETAIL_CHARS = 200  # of the protobuf library's reason, in the status message


def status_code(error: OmnistageError) -> grpc.StatusCode:
    """The error's code: the one its instance carries, else its class's."""
    return grpc.StatusCode[error.code]


class RateLimitedLog:
    """One warning line per `every_s` seconds at most, for requests that do not decode; the
    next line counts those left out in between. Never a traceback."""

    def __init__(self, every_s: float) -> None:
        self._every_s = every_s
        self._last = -every_s
        self._skipped = 0

    def note(self, rpc: str, size: int, reason: str) -> bool:
        """Log one corrupt `rpc` request of `size` bytes, unless one was logged lately;
        whether this one was."""
        now = time.monotonic()
        if now - self._last < self._every_s:
            self._skipped += 1
            return False
        more = f" (and {self._skipped} more since the last such line)" if self._skipped else ""
        logger.warning(
            "refused a %s request of %d bytes that does not decode: %s%s", rpc, size, reason, more
        )
        self._last, self._skipped = now, 0
        return True


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
        self._decode_log = RateLimitedLog(DECODE_LOG_EVERY_S)

    def wrap(self, handler: Handler, method: str, details: grpc.HandlerCallDetails) -> Handler:
        if handler.request_streaming or not method.startswith("/omnistage."):
            return handler  # health and reflection keep their own; no omnistage RPC streams in
        rpc = method.rsplit("/", 1)[-1]
        decode = handler.request_deserializer
        # request_deserializer=None: grpc hands the body over as bytes; it is decoded below.
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, rpc, decode),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            self._unary(handler.unary_unary, rpc, decode),
            request_deserializer=None,
            response_serializer=handler.response_serializer,
        )

    def _unary(self, body: Any, rpc: str, decode: Decoder) -> Any:
        async def unary(raw: Any, context: Context) -> Any:
            try:
                return await body(self._decoded(raw, decode, rpc), context)
            except Exception as exc:  # noqa: BLE001 - every error gets its status below
                await self._abort(context, rpc, exc)

        return unary

    def _streaming(self, body: Any, rpc: str, decode: Decoder) -> Any:
        async def streaming(raw: Any, context: Context) -> AsyncIterator[Any]:
            try:
                async for reply in body(self._decoded(raw, decode, rpc), context):
                    yield reply
            except Exception as exc:  # noqa: BLE001 - every error gets its status below
                await self._abort(context, rpc, exc)

        return streaming

    def _decoded(self, raw: Any, decode: Decoder, rpc: str) -> Any:
        """The request message of `raw` bytes; InvalidRequestError when they do not decode."""
        if decode is None or not isinstance(raw, bytes):
            return raw
        try:
            return decode(raw)
        except Exception as exc:  # noqa: BLE001 - whatever the decoder raises, the bytes are bad
            reason = str(exc)[:MAX_DECODE_DETAIL_CHARS]
            self._decode_log.note(rpc, len(raw), reason)
            raise InvalidRequestError(
                f"the {rpc} request is not a valid message ({reason}); send one built from "
                "omnistage's protos (protos/omnistage/v1), at the server's version"
            ) from None

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
