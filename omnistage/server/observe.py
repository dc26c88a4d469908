"""One Generate call as both servers observe it: its metrics (`RequestMeter`) and its server
span (`omnistage.server.tracing`), opened and closed in one place.

    with observer.observe(context) as call:
        ...
        call.output()            # on each output sent: the first one times the first output
        call.annotate(key=value) # span attributes (tokens, finish reason), when tracing
        yield ...

With neither metrics nor tracing on, `observe` hands out one shared call that does nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

from omnistage.server import tracing
from omnistage.server.metrics import RequestMeter, outcome_code


class ObservedCall:
    """The timings and the span of one call."""

    __slots__ = ("first_output_at", "span", "started")

    def __init__(self, span: Any = None) -> None:
        self.started = time.monotonic()
        self.first_output_at = 0.0
        self.span = span

    def output(self) -> None:
        if not self.first_output_at:
            self.first_output_at = time.monotonic()

    def annotate(self, **attributes: Any) -> None:
        if self.span is not None:
            self.span.set_attributes({f"omnistage.{k}": v for k, v in attributes.items()})


class _NoCall(ObservedCall):
    __slots__ = ()

    def output(self) -> None:
        pass


NO_CALL = _NoCall()


class RequestObserver:
    """Meters and traces the calls of one RPC (`span_name`, e.g. omnistage.v1.Stage/Generate);
    `attributes` go on every span (the stage's name)."""

    def __init__(
        self,
        meter: RequestMeter | None,
        *,
        span_name: str,
        attributes: dict[str, Any] | None = None,
    ) -> None:
        self._meter = meter
        self._span_name = span_name
        service, _, method = span_name.rpartition("/")
        self._attributes = {
            "rpc.system": "grpc",
            "rpc.service": service,
            "rpc.method": method,
            **(attributes or {}),
        }

    @contextlib.contextmanager
    def observe(self, context: Any, *, profile_session_id: str = "") -> Iterator[ObservedCall]:
        """Observe the body of one call; the span is current inside it, so the calls it
        makes are its children."""
        span = None
        if tracing.tracing_enabled():
            attributes = dict(self._attributes)
            if profile_session_id:
                attributes["omnistage.profile_session_id"] = profile_session_id
            span = tracing.start_server_span(
                self._span_name, context.invocation_metadata(), attributes
            )
        elif self._meter is None:
            yield NO_CALL
            return
        call = ObservedCall(span)
        token = tracing.attach(span)
        meter = self._meter
        if meter is not None and meter.in_flight is not None:
            meter.in_flight.inc()
        error: BaseException | None = None
        try:
            yield call
        except BaseException as exc:
            error = exc
            raise
        finally:
            code = outcome_code(error, context)
            if meter is not None:
                if meter.in_flight is not None:
                    meter.in_flight.dec()
                meter.record(code, call.started, call.first_output_at)
            tracing.detach(token)
            tracing.end_span(span, code, error)
