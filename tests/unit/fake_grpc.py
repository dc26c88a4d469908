"""Stand-ins for gRPC in unit tests: an RpcError with a code, a servicer context whose
`abort` records the status and raises `Aborted`, as grpc.aio's does, and `mapped`, which runs
an RPC body the way the servers' error interceptor does."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc

from omnistage.server.errors import abort_for


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self) -> None:
        self.status: tuple[grpc.StatusCode, str] | None = None

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        self.status = (code, message)
        raise Aborted

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()


async def mapped(context: FakeContext, rpc: str, body: Awaitable[Any]) -> None:
    """Await an RPC body; an error it raises becomes `context.abort`, as the servers'
    ErrorInterceptor makes it (so `Aborted` follows)."""
    try:
        await body
    except Exception as exc:
        await abort_for(context, rpc, exc)  # type: ignore[arg-type]
