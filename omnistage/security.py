"""TLS, mutual TLS and bearer tokens, for every omnistage server and client.

    ServerSecurity(tls_cert="server.pem", tls_key="server.key")  # TLS
    ServerSecurity(..., tls_client_ca="clients-ca.pem")  # mTLS: client certificates required
    ServerSecurity(token="s3cret", auth_scope="profiling")  # a token for the profiling RPCs

    security = ClientSecurity(tls_ca="ca.pem", token="s3cret")
    channel = aio_channel("stage:50051", security)  # or sync_channel(...)

Both check their files when they are made, so a wrong path fails at start-up with the flag or
key that named it. Tokens travel as the metadata `authorization: Bearer <token>` and never
appear in a repr or a log line.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import grpc

from omnistage.errors import InvalidRequestError
from omnistage.rpc import CHANNEL_OPTIONS

AuthScope = Literal["profiling", "all"]
AUTH_SCOPES: tuple[AuthScope, ...] = ("profiling", "all")
SERVER_TOKEN_ENV = "OMNISTAGE_AUTH_TOKEN"
CLIENT_TOKEN_ENV = "OMNISTAGE_TOKEN"
AUTHORIZATION_KEY = "authorization"
FLAGS_ORIGIN = "flags"  # `origin` of a config built from command-line flags


class SecurityConfigError(InvalidRequestError):
    """A TLS file or token that cannot be used; the message names the flag or key to fix."""


def _where(origin: str, name: str, flags: dict[str, str]) -> str:
    """How to name one setting in a message: its flag, its key path, or its field name."""
    if origin == FLAGS_ORIGIN:
        return flags.get(name, "--" + name.replace("_", "-"))
    return f"{origin}.{name}" if origin else name


def read_file(path: str | Path, *, label: str) -> bytes:
    """A file's bytes, or a SecurityConfigError that names `label` and the path."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise SecurityConfigError(
            f"{label}: cannot read {str(path)!r}: {exc.strerror or exc}"
        ) from None
    if not data.strip():
        raise SecurityConfigError(f"{label}: {str(path)!r} is empty")
    return data


def read_token(path: str | Path | None, *, env: str | None, label: str) -> str | None:
    """The token in file `path`, else in environment variable `env`, else None.

    Surrounding whitespace is dropped. An empty file, or an environment variable that is set
    but empty, is an error: silently serving without a token would be worse.
    """
    if path is not None and str(path):
        return read_file(path, label=label).decode("utf-8", errors="strict").strip()
    value = os.environ.get(env) if env else None
    if value is None:
        return None
    if not value.strip():
        raise SecurityConfigError(f"${env} is set but empty; unset it or give it the token")
    return value.strip()


def _check_token(token: str | None, label: str) -> None:
    if token is not None and (not token.strip() or any(c in token for c in "\r\n")):
        raise SecurityConfigError(f"{label}: the token is empty or spans lines")


class _Settings:
    """What both sides' settings check alike; each names a setting as its user wrote it."""

    origin: str
    token: str | None
    FLAGS: ClassVar[dict[str, str]]

    def _where(self, name: str) -> str:
        return _where(self.origin, name, self.FLAGS)

    def _check_token_and_files(self, *names: str) -> None:
        """The token is one line; each file named is there and readable."""
        _check_token(self.token, self._where("token"))
        for name in names:
            path = getattr(self, name)
            if path is not None:
                read_file(path, label=self._where(name))


@dataclass(frozen=True)
class ServerSecurity(_Settings):
    """How a server accepts connections: plaintext, TLS, or mTLS; with or without a token."""

    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    tls_client_ca: str | Path | None = None  # set: clients must present a cert it signed
    token: str | None = field(default=None, repr=False)
    auth_scope: AuthScope = "profiling"  # which RPCs need the token: profiling ones, or all
    origin: str = field(default="", repr=False, compare=False)  # names settings in errors

    FLAGS: ClassVar[dict[str, str]] = {"token": "--auth-token-file"}

    def __post_init__(self) -> None:
        cert, key, ca = (self._where(n) for n in ("tls_cert", "tls_key", "tls_client_ca"))
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityConfigError(f"{cert} and {key} go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise SecurityConfigError(f"{ca} (mutual TLS) needs the server's own {cert} and {key}")
        if self.auth_scope not in AUTH_SCOPES:
            raise SecurityConfigError(
                f"{self._where('auth_scope')} must be one of {', '.join(AUTH_SCOPES)} "
                f"(got {self.auth_scope!r})"
            )
        self._check_token_and_files("tls_cert", "tls_key", "tls_client_ca")

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def mtls(self) -> bool:
        return self.tls_client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC's server credentials for the TLS port; mTLS requires a client certificate."""
        if self.tls_cert is None or self.tls_key is None:
            raise SecurityConfigError("no TLS configured: set tls_cert and tls_key")
        pair = (
            read_file(self.tls_key, label=self._where("tls_key")),
            read_file(self.tls_cert, label=self._where("tls_cert")),
        )
        ca = self.tls_client_ca
        return grpc.ssl_server_credentials(
            [pair],
            root_certificates=read_file(ca, label=self._where("tls_client_ca")) if ca else None,
            require_client_auth=ca is not None,
        )

    def describe(self) -> str:
        """For the start-up log line; never the token."""
        transport = "mTLS" if self.mtls else "TLS" if self.tls else "plaintext"
        auth = f", bearer token on {self.auth_scope} RPCs" if self.token else ""
        return transport + auth


@dataclass(frozen=True)
class ClientSecurity(_Settings):
    """How a client connects: which CA to trust, its own certificate for mTLS, and a token.

    TLS is on when `tls_ca`, `tls_cert` or `tls_server_name` is set, or `use_tls` (which
    trusts the system's roots when no `tls_ca` is given).
    """

    tls_ca: str | Path | None = None
    tls_cert: str | Path | None = None
    tls_key: str | Path | None = None
    tls_server_name: str | None = None  # the name the server's certificate must carry
    token: str | None = field(default=None, repr=False)
    use_tls: bool = False
    origin: str = field(default="", repr=False, compare=False)

    FLAGS: ClassVar[dict[str, str]] = {"token": "--token-file", "use_tls": "--tls"}

    def __post_init__(self) -> None:
        cert, key = self._where("tls_cert"), self._where("tls_key")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityConfigError(f"{cert} and {key} go together: give both or neither")
        self._check_token_and_files("tls_ca", "tls_cert", "tls_key")

    @property
    def tls(self) -> bool:
        return self.use_tls or any(
            v is not None for v in (self.tls_ca, self.tls_cert, self.tls_server_name)
        )

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC's channel credentials: the CA (or the system's roots) and the client cert."""
        read = {
            name: read_file(path, label=self._where(name)) if path is not None else None
            for name, path in (
                ("tls_ca", self.tls_ca),
                ("tls_cert", self.tls_cert),
                ("tls_key", self.tls_key),
            )
        }
        return grpc.ssl_channel_credentials(
            root_certificates=read["tls_ca"],
            private_key=read["tls_key"],
            certificate_chain=read["tls_cert"],
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        options: list[tuple[str, Any]] = list(CHANNEL_OPTIONS)
        if self.tls_server_name:
            options.append(("grpc.ssl_target_name_override", self.tls_server_name))
        return options


def aio_channel(address: str, security: ClientSecurity | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to `address`: TLS when `security` says so, the token on every call."""
    security = security or ClientSecurity()
    interceptors = _aio_token_interceptors(security.token) if security.token else None
    options = security.channel_options()
    if security.tls:
        return grpc.aio.secure_channel(
            address, security.credentials(), options=options, interceptors=interceptors
        )
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def sync_channel(address: str, security: ClientSecurity | None = None) -> grpc.Channel:
    """The blocking counterpart of `aio_channel` (health checks, scripts)."""
    security = security or ClientSecurity()
    options = security.channel_options()
    if security.tls:
        channel = grpc.secure_channel(address, security.credentials(), options=options)
    else:
        channel = grpc.insecure_channel(address, options=options)
    if security.token:
        return grpc.intercept_channel(channel, _SyncToken(security.token))
    return channel


def bearer(token: str) -> tuple[str, str]:
    """The metadata entry that carries `token`."""
    return (AUTHORIZATION_KEY, f"Bearer {token}")


def _with_token(details: grpc.aio.ClientCallDetails, token: str) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*bearer(token))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _AioTokenUnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


class _AioTokenUnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_token(details, self._token), request)


def _aio_token_interceptors(token: str) -> list[Any]:
    # grpc.aio files each interceptor under one call kind, so one object per kind.
    return [_AioTokenUnaryUnary(token), _AioTokenUnaryStream(token)]


class _SyncCallDetails(
    collections.namedtuple(
        "_SyncCallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready")
    ),
    grpc.ClientCallDetails,
):
    pass


class _SyncToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._entry = bearer(token)

    def _details(self, details: Any) -> _SyncCallDetails:
        metadata = [*(details.metadata or ()), self._entry]
        return _SyncCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)
