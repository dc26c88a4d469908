"""OpenTelemetry spans of every omnistage server, exported over OTLP/gRPC, only when asked for.

`setup_tracing` does nothing unless `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
`OTEL_EXPORTER_OTLP_ENDPOINT` is set: no SDK is imported, no span made, nothing exported, and
every function below returns at its first line. When set, it makes the process's tracer: a
`TracerProvider` named by `OTEL_SERVICE_NAME` (else the server's default name) whose spans go
through a `BatchSpanProcessor` to the OTLP/gRPC exporter, which reads the other `OTEL_*`
variables itself (headers, TLS, timeouts; `OTEL_BSP_*` for the batching).

The provider is this module's own, not OpenTelemetry's global one, so omnistage's spans never
depend on what another library installs. Context propagation is W3C trace context on gRPC
metadata (`omnistage.trace_context`).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

from omnistage.trace_context import incoming_context, span_context_metadata

logger = logging.getLogger(__name__)

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
INSTRUMENTATION = "omnistage"

_tracer: Any = None
_provider: Any = None


def tracing_configured(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return any(env.get(name) for name in ENDPOINT_VARIABLES)


def setup_tracing(default_service_name: str) -> bool:
    """Make the process's tracer when an OTLP endpoint is configured; return whether it did."""
    global _tracer, _provider
    if not tracing_configured() or _tracer is not None:
        return _tracer is not None
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    class _Resource(Resource):
        """The SDK's resource, its hash computed once: the OTLP encoder groups every batch's
        spans by resource, and `Resource.__hash__` runs `json.dumps` each time (a fifth of a
        span's encoding). It is immutable, so the hash cannot change."""

        def __init__(self, resource: Resource) -> None:
            super().__init__(resource.attributes, resource.schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    name = os.environ.get("OTEL_SERVICE_NAME") or default_service_name
    resource = _Resource(Resource.create({SERVICE_NAME: name}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider, _tracer = provider, provider.get_tracer(INSTRUMENTATION)
    endpoint = next(os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v))
    logger.info("OpenTelemetry: spans of %r go over OTLP/gRPC to %s", name, endpoint)
    return True


def shutdown_tracing() -> None:
    """Export what is still batched, then stop (a server's last step)."""
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()


def tracing_enabled() -> bool:
    return _tracer is not None


@functools.cache
def _otel() -> SimpleNamespace:
    """OpenTelemetry's API, imported once a tracer exists (never when tracing is off)."""
    import grpc
    from opentelemetry import context, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode

    return SimpleNamespace(
        context=context,
        trace=trace,
        server=SpanKind.SERVER,
        client=SpanKind.CLIENT,
        error=StatusCode.ERROR,
        status=Status,
        codes={code.name: int(code.value[0]) for code in grpc.StatusCode},
    )


def start_server_span(
    name: str, metadata: Iterable[tuple[str, str | bytes]] | None, attributes: dict[str, Any]
) -> Any:
    """A SERVER span continuing the caller's `traceparent` (or a new trace); None when off."""
    tracer = _tracer
    if tracer is None:
        return None
    parent = incoming_context(metadata)
    return tracer.start_span(name, context=parent, kind=_otel().server, attributes=attributes)


def start_client_span(name: str, attributes: dict[str, Any]) -> Any:
    """A CLIENT span, child of the current span (an outgoing call); None when tracing is off."""
    tracer = _tracer
    if tracer is None:
        return None
    return tracer.start_span(name, kind=_otel().client, attributes=attributes)


def span_metadata(span: Any) -> tuple[tuple[str, str], ...]:
    """The `traceparent` that makes the callee's span a child of `span`; () without one."""
    if span is None:
        return ()
    return span_context_metadata(span.get_span_context())


def attach(span: Any) -> Any:
    """Make `span` the current one (for the calls made under it); returns the token."""
    if span is None:
        return None
    otel = _otel()
    return otel.context.attach(otel.trace.set_span_in_context(span))


def detach(token: Any) -> None:
    if token is not None:
        _otel().context.detach(token)


def end_span(span: Any, code: str, error: BaseException | None = None) -> None:
    """Close `span` with the call's gRPC code; an error is recorded on it."""
    if span is None:
        return
    otel = _otel()
    span.set_attribute("rpc.grpc.status_code", otel.codes.get(code, 2))  # 2: UNKNOWN
    if code != "OK":
        if error is not None and not isinstance(error, GeneratorExit):
            span.record_exception(error)
        span.set_status(otel.status(otel.error, f"{code}: {error}" if error else code))
    span.end()
