"""W3C trace context (`traceparent`, `tracestate`) on gRPC metadata, with OpenTelemetry's API
alone: what the clients send and the servers continue (docs/observability.md).

Nothing here sets up an SDK or exports anything. When opentelemetry is not importable, or no
valid span is current, the clients send nothing extra.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

TRACE_KEYS = frozenset({"traceparent", "tracestate"})


@functools.cache
def _api() -> tuple[Any, Any] | None:
    try:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    except ImportError:
        return None
    return trace, TraceContextTextMapPropagator()


def outgoing_metadata(context: Any = None) -> tuple[tuple[str, str], ...]:
    """The `traceparent` (and `tracestate`) of `context`'s span, or of the current span; ()
    when there is none, or opentelemetry is not installed."""
    api = _api()
    if api is None:
        return ()
    return span_context_metadata(api[0].get_current_span(context).get_span_context())


def span_context_metadata(span_context: Any) -> tuple[tuple[str, str], ...]:
    """What the W3C propagator's `inject` writes for `span_context`, formatted straight from
    it (a fifth of inject's cost, on every call); () when it is not valid."""
    if not span_context.is_valid:
        return ()
    sc = span_context
    parent = ("traceparent", f"00-{sc.trace_id:032x}-{sc.span_id:016x}-{sc.trace_flags:02x}")
    if sc.trace_state:
        return (parent, ("tracestate", sc.trace_state.to_header()))
    return (parent,)


def incoming_context(metadata: Iterable[tuple[str, str | bytes]] | None) -> Any:
    """The trace context a caller sent in its metadata (an empty context when none)."""
    api = _api()
    if api is None:
        return None
    carrier = {
        key.lower(): value.decode() if isinstance(value, bytes) else value
        for key, value in metadata or ()
        if key.lower() in TRACE_KEYS
    }
    return api[1].extract(carrier) if carrier else None


def current_trace_id() -> str:
    """The current span's trace id in hex, or "" when no valid span is current."""
    api = _api()
    if api is None:
        return ""
    context = api[0].get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else ""
