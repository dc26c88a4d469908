"""Start omnistage servers as child processes and wait for their health: for `omnistage up`,
the demo, the benchmarks and the tests alike."""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnistage.errors import StageUnavailableError
from omnistage.security import ClientSecurity, sync_channel

logger = logging.getLogger(__name__)

_BOUND = re.compile(r"listening on (?P<host>\S+):(?P<port>\d+)")
_HTTP_BOUND = re.compile(r"HTTP API on (?P<scheme>https?)://(?P<host>\S+):(?P<port>\d+)")


def health_status(
    address: str, *, timeout: float = 2.0, security: ClientSecurity | None = None
) -> str:
    """The health service's status name at `address`, or the gRPC error code's name."""
    with sync_channel(address, security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` after which the child gets SIGTERM when this process dies, even by
    SIGKILL (Linux's PR_SET_PDEATHSIG); None elsewhere. The signal comes when the thread that
    started the child ends, so start such children from a thread that lives as long as this
    process (the main thread)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, not in the forked child
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the call above took effect
            os._exit(1)

    return preexec


class ServerProcess:
    """One `omnistage ... serve` process in its own process group, with its log in a file.
    `security` is how to reach its health service (a TLS server needs the CA); with
    `die_with_parent`, the server gets SIGTERM (and drains and stops) when this process dies,
    however it dies."""

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        log_path: Path,
        env: dict[str, str] | None = None,
        prefix: Sequence[str] = (),
        connect_host: str = "127.0.0.1",
        security: ClientSecurity | None = None,
        die_with_parent: bool = False,
    ) -> None:
        """`prefix` goes before the command (e.g. `ip netns exec NS`); `connect_host` is where
        this process reaches the server once it is bound."""
        self.name = name
        self.connect_host = connect_host
        self.security = security
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("w")
        self.port = 0
        self.http_port = 0  # an orchestrator's HTTP API, when it serves one
        self.http_scheme = "http"
        self._bound = threading.Event()
        command = [*prefix, sys.executable, "-m", "omnistage.cli", *args]
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group: stopping it stops vLLM's children too
            env={**os.environ, **(env or {})},
            preexec_fn=_die_with_parent() if die_with_parent else None,
        )
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._log.write(line)
            self._log.flush()
            http = _HTTP_BOUND.search(line)
            if http and not self._bound.is_set():
                self.http_port, self.http_scheme = int(http.group("port")), http.group("scheme")
            match = _BOUND.search(line)
            if match and not self._bound.is_set():
                self.port = int(match.group("port"))
                self._bound.set()

    @property
    def address(self) -> str:
        return f"{self.connect_host}:{self.port}"

    @property
    def http_url(self) -> str:
        """The base URL of an orchestrator's HTTP API (its port printed before the gRPC one)."""
        return f"{self.http_scheme}://{self.connect_host}:{self.http_port}"

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_bound(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while not self._bound.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise StageUnavailableError(
                    f"{self.name} did not start (exit code {self.process.poll()}); "
                    f"its log {self.log_path} ends with:\n{self.log_tail()}"
                )
        return self.address

    def wait_serving(
        self, timeout: float = 600.0, *, progress: Callable[[str, float], None] | None = None
    ) -> str:
        """Block until health is SERVING; `progress(status, seconds)` is called every 5 s."""
        self.wait_bound()
        started = time.monotonic()
        last_report = 0.0
        while True:
            status = health_status(self.address, security=self.security)
            elapsed = time.monotonic() - started
            if status == "SERVING":
                return self.address
            if self.process.poll() is not None or elapsed > timeout:
                raise StageUnavailableError(
                    f"{self.name} at {self.address} is {status} after {elapsed:.0f} s "
                    f"(exit code {self.process.poll()}); its log {self.log_path} ends with:\n"
                    f"{self.log_tail()}"
                )
            if progress is not None and elapsed - last_report >= 5:
                progress(status, elapsed)
                last_report = elapsed
            time.sleep(0.5)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM the server alone, so it drains and closes its engine; then SIGKILL whatever
        of its process group is left (an engine process a crash orphaned)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
        self._signal_group(signal.SIGKILL)
        code = self.process.wait()
        self._reader.join(timeout=5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
        return code

    def kill(self) -> None:
        """SIGKILL the whole group at once, as a crash would."""
        self._signal_group(signal.SIGKILL)
        self.process.wait()

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)


def stage_args(
    *,
    name: str,
    model: str = "smollm2",
    port: int = 0,
    host: str = "127.0.0.1",
    engine: str = "vllm",
    profiler_config: dict[str, object] | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """Command-line arguments for `omnistage stage serve`."""
    args = ["stage", "serve", "--name", name, "--engine", engine, "--model", model]
    args += ["--port", str(port), "--host", host]
    if profiler_config is not None:
        args += ["--profiler-config", json.dumps(profiler_config)]
    return [*args, *extra]
