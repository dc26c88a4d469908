"""Prometheus metrics of every omnistage server (docs/observability.md).

Each server keeps its metrics in a `CollectorRegistry` of its own, never prometheus_client's
global one, so several servers can live in one process (the tests do that). `MetricsEndpoint`
serves that registry on `/metrics` with prometheus_client's own HTTP server, on a port of its
own and a thread of its own: a scrape never waits for the event loop, and nothing listens
unless `--metrics-port` is given.

`RequestMeter` is what both servers record per Generate call: the calls by their final gRPC
code, their latency, their time to the first output, and how many are in flight. A call costs
two clock reads and two or three lock-guarded histogram updates; gauges that mirror state the
server already holds (running requests, profiling) are read at scrape time instead.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)

from omnistage.errors import OmnistageError

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
"""Seconds: from a millisecond (a torch step, a hand-off) to five minutes (a long generation)."""


def new_registry() -> CollectorRegistry:
    """A server's own registry, with the process's CPU, memory and file descriptors
    (prometheus_client's global registry is left to vLLM's front end)."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    return registry


class MetricsEndpoint:
    """`/metrics` of one registry over HTTP, on a daemon thread; bound when constructed."""

    def __init__(self, registry: CollectorRegistry, *, host: str, port: int) -> None:
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise OSError(f"could not serve metrics on {host}:{port}: {exc}") from exc
        self.port = int(self._server.server_address[1])
        logger.info("Prometheus metrics on http://%s:%d/metrics", host, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def metrics_endpoint(
    registry: CollectorRegistry | None, *, host: str, port: int | None
) -> MetricsEndpoint | None:
    """`/metrics` of `registry` on `port`; None when either is None (metrics are off)."""
    if registry is None or port is None:
        return None
    return MetricsEndpoint(registry, host=host, port=port)


def outcome_code(error: BaseException | None, context: Any = None) -> str:
    """The gRPC status name a call ends with, from what its body raised (None: OK).

    An omnistage error carries its code; a cancelled call is DEADLINE_EXCEEDED when its
    deadline has passed and CANCELLED otherwise (the client went away); an abort keeps the
    code it set; anything else is INTERNAL, as the error interceptor answers it."""
    if error is None:
        return "OK"
    if isinstance(error, OmnistageError):
        return str(error.code)
    if isinstance(error, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining() if context is not None else None
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    code = _aborted_code(error, context)
    return code or "INTERNAL"


def _aborted_code(error: BaseException, context: Any) -> str:
    import grpc

    if isinstance(error, grpc.aio.AbortError) and context is not None:
        code = context.code()
        return str(code.name) if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return ""


class RequestMeter:
    """Calls by final code, their latency and time to first output, and those in flight.

    `labels` are constant labels of every series (a stage server names its stage). The child
    of each code is made once and kept, so recording a call looks nothing up by label."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        total: str,
        latency: str,
        first_output: str,
        in_flight: str | None,
        what: str,
        labels: dict[str, str] | None = None,
    ) -> None:
        self._labels = dict(labels or {})
        names = list(self._labels)
        self._total = Counter(
            total, f"{what} by final gRPC code", [*names, "code"], registry=registry
        )
        self._latency = Histogram(
            latency,
            f"Seconds from the start of a {what} to its end, whatever its code",
            names,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._first_output = Histogram(
            first_output,
            f"Seconds from the start of a {what} to its first output",
            names,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.in_flight: Any = None
        if in_flight is not None:
            gauge = Gauge(in_flight, f"{what}s being served now", names, registry=registry)
            self.in_flight = self._child(gauge)
        self._children_lock = threading.Lock()
        self._codes: dict[str, Any] = {}
        self.latency = self._child(self._latency)
        self.first_output = self._child(self._first_output)
        self.count("OK", 0)  # a series from the start, so rate() sees the first call

    def _child(self, metric: Any) -> Any:
        return metric.labels(**self._labels) if self._labels else metric

    def count(self, code: str, amount: float = 1) -> None:
        child = self._codes.get(code)
        if child is None:
            with self._children_lock:
                child = self._codes.setdefault(
                    code, self._total.labels(*self._labels.values(), code)
                )
        child.inc(amount)

    def record(self, code: str, started: float, first_output_at: float) -> None:
        """One call that ended with `code`; `first_output_at` 0 when it sent nothing."""
        now = time.monotonic()
        self.count(code)
        self.latency.observe(now - started)
        if first_output_at:
            self.first_output.observe(first_output_at - started)


def gauge_from(
    registry: CollectorRegistry,
    name: str,
    documentation: str,
    read: Callable[[], float],
    *,
    labels: dict[str, str] | None = None,
) -> Gauge:
    """A gauge whose value is `read()` at scrape time (on the metrics thread: `read` must only
    read plain attributes)."""
    values = dict(labels or {})
    gauge = Gauge(name, documentation, list(values), registry=registry)
    (gauge.labels(**values) if values else gauge).set_function(read)
    return gauge
