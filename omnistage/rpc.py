"""What every omnistage client shares: channel options, status mapping and the sync bridge."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

import grpc

from omnistage import errors

T = TypeVar("T")

# Clients and servers alike: tensors and trace chunks are larger than gRPC's 4 MiB default.
MESSAGE_SIZE_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]
# Clients: a peer behind a cut link is found dead within about 10 s, even mid-stream (keepalive
# pings), and a peer that comes back is reconnected within 5 s (capped reconnect backoff).
CHANNEL_OPTIONS = [
    *MESSAGE_SIZE_OPTIONS,
    ("grpc.keepalive_time_ms", 5000),
    ("grpc.keepalive_timeout_ms", 5000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.max_reconnect_backoff_ms", 5000),
]
# Servers: accept those pings rather than answer them with GOAWAY (too_many_pings).
SERVER_OPTIONS = [
    *MESSAGE_SIZE_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 4000),
    ("grpc.keepalive_permit_without_calls", 1),
]
STOP_PROFILE_TIMEOUT_S = 600.0  # a vLLM stop on the CPU takes tens of seconds

_ERRORS_BY_CODE: dict[grpc.StatusCode, type[errors.OmnistageError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidRequestError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.ProfilerStateError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.OverloadedError,
    grpc.StatusCode.UNAVAILABLE: errors.StageUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineError,
    grpc.StatusCode.CANCELLED: errors.CancelledError,
    grpc.StatusCode.UNAUTHENTICATED: errors.UnauthenticatedError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.ABORTED: errors.AbortedError,
}


def error_from_rpc(
    exc: grpc.RpcError, *, address: str = "", tls: bool = False
) -> errors.OmnistageError:
    """The omnistage error for a failed call, keeping the server's message; `tls` says
    whether the link was TLS, so that a hint about it fits the link."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    cls = _ERRORS_BY_CODE.get(code, errors.OmnistageError)
    where = f" ({address})" if address else ""
    hint = _tls_hint(code, details, tls=tls)
    error = cls(f"{details}{where}{hint}{_api_hint(code)}", code=code.name)
    if isinstance(error, errors.OverloadedError):
        error.retry_after_ms = retry_after_ms(exc)
    return error


@contextlib.contextmanager
def rpc_errors(address: str, call: Any = None, *, tls: bool = False) -> Iterator[None]:
    """The one client-side translation: a `grpc.RpcError` raised inside becomes the omnistage
    error for its status, naming `address` (`tls`: whether the link is TLS). A streaming
    `call` is cancelled on the way out, so a caller that stops reading (or fails) stops the
    server sending."""
    try:
        yield
    except grpc.RpcError as exc:
        raise error_from_rpc(exc, address=address, tls=tls) from exc
    finally:
        if call is not None:
            call.cancel()


def retry_after_ms(exc: grpc.RpcError) -> int:
    """The `retry-after-ms` trailing metadata of a failed call, or 0 when it has none."""
    trailing: Any = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == errors.RETRY_AFTER_KEY:
            try:
                return max(0, int(value))
            except (TypeError, ValueError):
                return 0
    return 0


def _api_hint(code: grpc.StatusCode) -> str:
    """What to check when the peer does not serve the method called."""
    if code is not grpc.StatusCode.UNIMPLEMENTED:
        return ""
    return "; check that the address serves this omnistage service, at a matching version"


def _tls_hint(code: grpc.StatusCode, details: str, *, tls: bool) -> str:
    """What to check when a connection could not be set up in a way a TLS mismatch causes.

    Only a failure to connect gets a hint: a link that was up and dropped (a stage killed
    mid-call: "Stream removed", or "Connection refused" on the next try) is no TLS matter.
    On a TLS link a failed handshake points at the certificates; on a plaintext link a peer
    that closes the socket while connecting may speak TLS."""
    if code is not grpc.StatusCode.UNAVAILABLE or "failed to connect" not in details:
        return ""
    if tls and "handshake" in details.lower():
        return (
            "; the TLS handshake failed: check that --tls-ca is the CA that signed the "
            "server's certificate, that --tls-server-name matches it, and for mutual TLS "
            "that the server trusts --tls-cert; if the server speaks plaintext, connect "
            "without TLS"
        )
    if not tls and "Socket closed" in details:
        return (
            "; this link is plaintext: if the server uses TLS, pass the CA that signed its "
            "certificate (--tls-ca), and for mutual TLS a client certificate it trusts "
            "(--tls-cert, --tls-key)"
        )
    return ""


class LoopThread:
    """One event loop on a daemon thread, shared by the sync wrappers of one client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self.run(_anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None:
                self.run(aclose())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


async def _anext(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()
