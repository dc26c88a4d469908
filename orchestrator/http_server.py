"""The HTTP front door's server: uvicorn, in the orchestrator's own process and event loop,
started and stopped with its gRPC server. The port is bound when the server is built, so port 0
gives a known free port at once, as the gRPC port does."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from omnistage.audio import DEFAULT_SAMPLE_RATE
from omnistage.security import ServerSecurity

logger = logging.getLogger(__name__)


class HttpApiConfig(BaseModel):
    """The OpenAI-compatible HTTP API beside the orchestrator's gRPC (docs/http.md)."""

    model_config = ConfigDict(extra="forbid")

    port: int = Field(ge=0, le=65535, description="0 picks a free port.")
    served_model_name: str | None = Field(
        default=None, min_length=1, description="The model id; None: the pipeline's name."
    )
    text_stage: str | None = Field(
        default=None,
        description="The stage whose text is the answer; None: the last stage that makes text.",
    )
    sample_rate: int = Field(
        default=DEFAULT_SAMPLE_RATE, ge=1, description="Hz of the final stage's audio."
    )


class _EmbeddedServer(uvicorn.Server):
    """uvicorn, leaving the signals to the orchestrator's serve loop."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.up = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.up.set()


class HttpServer:
    """Serves `app` on host:port, with TLS (and mTLS) when `security` has it."""

    def __init__(
        self, app: FastAPI, host: str, port: int, *, security: ServerSecurity, grace: float
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self._socket = socket.create_server((host, port), family=family)
        except OSError as exc:
            raise OSError(f"could not bind the HTTP port {host}:{port}: {exc.strerror}") from exc
        self.port = int(self._socket.getsockname()[1])
        self.scheme = "https" if security.tls else "http"
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=max(1, round(grace)),
            # TLS, with the gRPC port's certificate; mTLS: a client certificate is required.
            ssl_certfile=_path(security.tls_cert),
            ssl_keyfile=_path(security.tls_key),
            ssl_ca_certs=_path(security.tls_client_ca),
            ssl_cert_reqs=ssl.CERT_REQUIRED if security.mtls else ssl.CERT_NONE,
        )
        self._server = _EmbeddedServer(config)
        self._task: asyncio.Task[None] | None = None
        logger.info("HTTP API on port %d: %s", self.port, security.describe())

    async def start(self) -> None:
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]))
        up = asyncio.create_task(self._server.up.wait())
        await asyncio.wait({self._task, up}, return_when=asyncio.FIRST_COMPLETED)
        if not up.done():
            up.cancel()
            await self._task  # it ended before it served: raise its error
            raise OSError("the HTTP server stopped before it started")

    async def stop(self) -> None:
        """Stop taking requests; those in flight get the grace time, then are cancelled."""
        if self._task is None:
            self._socket.close()
            return
        self._server.should_exit = True
        await self._task


def _path(value: str | Path | None) -> str | None:
    return None if value is None else str(Path(value).expanduser())
