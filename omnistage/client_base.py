"""What the orchestrator's and the stage's clients share: the channel and its security, the
one translation of gRPC errors, and the synchronous face that runs an async client on a
loop thread of its own."""

from __future__ import annotations

from collections.abc import Awaitable
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, ClassVar, Generic, TypeVar

import grpc

from omnistage.errors import InvalidRequestError
from omnistage.rpc import LoopThread, rpc_errors
from omnistage.security import ClientSecurity, aio_channel

T = TypeVar("T")
A = TypeVar("A", bound="AsyncRpcClient")


def with_token(security: ClientSecurity | None, token: str | None) -> ClientSecurity | None:
    """`security` with `token` added: the clients' `token=` shorthand."""
    if token is None:
        return security
    return replace(security or ClientSecurity(), token=token)


class AsyncRpcClient:
    """A grpc.aio channel to `address` (else `default_address`); `security` sets TLS, mTLS
    and the token (`token=` alone is the shorthand for a token over plaintext)."""

    default_address: ClassVar[str] = ""

    def __init__(
        self,
        address: str = "",
        *,
        security: ClientSecurity | None = None,
        token: str | None = None,
    ) -> None:
        name = type(self).__name__.removeprefix("Async")
        self.address = _address(address, self.default_address, name)
        self.security = with_token(security, token)
        self._channel = aio_channel(self.address, self.security)
        self._connected(self._channel)

    def _connected(self, channel: grpc.aio.Channel) -> None:
        """Make the stubs of the service this client speaks to."""

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _errors(self, call: Any = None) -> AbstractContextManager[None]:
        """`rpc_errors` for this client's link: its address, and whether it is TLS."""
        return rpc_errors(self.address, call, tls=self.security is not None and self.security.tls)

    async def _call(self, call: Awaitable[T]) -> T:
        """Await one unary call, its failure as the omnistage error for its status."""
        with self._errors():
            return await call


class SyncRpcClient(Generic[A]):
    """The synchronous face of an async client of class `async_class`, for scripts and
    notebooks: each call runs on the client's own loop thread."""

    async_class: type[A]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """The async client's arguments: `address`, and `security=` or `token=`."""
        self._loop = LoopThread()
        try:
            self._async: A = self._loop.run(self._make(*args, **kwargs))
        except BaseException:
            self._loop.close()  # a bad argument leaves no thread behind
            raise
        self.address = self._async.address

    async def _make(self, *args: Any, **kwargs: Any) -> A:
        return self.async_class(*args, **kwargs)  # on the loop that will use it

    def close(self) -> None:
        self._loop.run(self._async.close())
        self._loop.close()

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _address(address: str, default: str, client: str) -> str:
    """`address`, else the client's default; a client with neither says what it needs."""
    if address or default:
        return address or default
    raise InvalidRequestError(f"{client} needs the address of its server, as host:port")
