"""The metrics and tracing kit in process (docs/observability.md): call outcomes as gRPC codes,
registries that several servers share a process with, vLLM's metrics re-exported, W3C trace
context on metadata, and tracing that costs nothing when no endpoint is set."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import urllib.request
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY, Counter, generate_latest

from omnistage.errors import InvalidRequestError, OmnistageError, reworded
from omnistage.server.metrics import MetricsEndpoint, outcome_code
from omnistage.trace_context import current_trace_id, incoming_context, outgoing_metadata
from omnistage.traces.spans import RequestSpan, orchestrator_events, span_from_mapping
from services.metrics import StageMetrics
from tests.conftest import ROOT


class _Context:
    def __init__(self, remaining: float | None) -> None:
        self._remaining = remaining

    def time_remaining(self) -> float | None:
        return self._remaining


@pytest.mark.parametrize(
    ("error", "context", "code"),
    [
        (None, None, "OK"),
        (InvalidRequestError("max_tokens must be ≥ 1"), None, "INVALID_ARGUMENT"),
        (reworded(OmnistageError("x", code="DATA_LOSS"), "stage 'a': x"), None, "DATA_LOSS"),
        (asyncio.CancelledError(), _Context(None), "CANCELLED"),
        (asyncio.CancelledError(), _Context(0.0), "DEADLINE_EXCEEDED"),
        (GeneratorExit(), _Context(5.0), "CANCELLED"),
        (ValueError("a bug"), None, "INTERNAL"),
    ],
)
def test_a_calls_outcome_is_the_code_its_caller_gets(
    error: BaseException | None, context: Any, code: str
) -> None:
    assert outcome_code(error, context) == code


def _stage_metrics(engine: str) -> StageMetrics:
    return StageMetrics(stage="s", engine=engine, running=lambda: 2, profiling=lambda: 0)


def test_two_servers_in_one_process_keep_their_own_metrics() -> None:
    first, second = _stage_metrics("torch"), _stage_metrics("torch")
    first.requests.record("OK", 0.0, 0.0)
    first.step(3, 0.01)
    page = generate_latest(first.registry).decode()
    assert 'omnistage_stage_requests_total{code="OK",stage="s"} 1.0' in page
    assert 'omnistage_stage_running_requests{stage="s"} 2.0' in page
    assert 'omnistage_stage_batch_size_sum{stage="s"} 3.0' in page
    assert 'omnistage_stage_requests_total{code="OK",stage="s"} 0.0' in (
        generate_latest(second.registry).decode()
    )


def test_a_vllm_stage_re_exports_vllms_own_metrics() -> None:
    vllm = Counter("vllm:fake_requests", "what vLLM's front end records", registry=REGISTRY)
    try:
        vllm.inc(4)
        assert (
            "vllm:fake_requests_total 4.0"
            in generate_latest(_stage_metrics("vllm").registry).decode()
        )
        torch_page = generate_latest(_stage_metrics("torch").registry).decode()
        assert "vllm:" not in torch_page
        assert "omnistage_stage_batch_size" in torch_page
    finally:
        REGISTRY.unregister(vllm)


def test_the_endpoint_serves_the_registry_on_a_free_port() -> None:
    metrics = _stage_metrics("torch")
    endpoint = MetricsEndpoint(metrics.registry, host="127.0.0.1", port=0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=5) as r:
            assert b"omnistage_stage_profiling" in r.read()
    finally:
        endpoint.close()


def test_trace_context_goes_out_and_comes_back_on_metadata() -> None:
    assert outgoing_metadata() == ()  # no current span: nothing extra is sent
    assert current_trace_id() == ""
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("caller") as span:
        sent = dict(outgoing_metadata())
        trace_id = current_trace_id()
    assert trace_id == f"{span.get_span_context().trace_id:032x}"
    assert sent["traceparent"].split("-")[1] == trace_id
    received = incoming_context([("TraceParent", sent["traceparent"].encode()), ("x", "y")])
    from opentelemetry import trace

    assert trace.get_current_span(received).get_span_context().trace_id == int(trace_id, 16)
    assert incoming_context([("authorization", "Bearer t")]) is None


def test_a_stage_calls_traceparent_is_what_the_w3c_propagator_writes() -> None:
    """`span_metadata` and `outgoing_metadata` format the header themselves (a fifth of the
    propagator's cost): they must write exactly what the propagator does, with and without a
    caller's tracestate."""
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from omnistage.server import tracing

    def propagated(span: Any) -> tuple[tuple[str, str], ...]:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(span))
        return tuple(carrier.items())

    tracer = TracerProvider().get_tracer("test")
    assert tracing.span_metadata(None) == ()
    assert tracing.span_metadata(trace.INVALID_SPAN) == ()
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    for sent in ([("traceparent", caller)], [("traceparent", caller), ("tracestate", "a=1,b=2")]):
        span = tracer.start_span("call", context=incoming_context(sent))
        expected = propagated(span)
        assert tracing.span_metadata(span) == expected
        assert outgoing_metadata(trace.set_span_in_context(span)) == expected
        assert dict(expected)["traceparent"].split("-")[1] == caller.split("-")[1]
        assert len(expected) == len(sent)
    unsampled = tracer.start_span(
        "call", context=incoming_context([("traceparent", caller[:-2] + "00")])
    )
    assert tracing.span_metadata(unsampled) == propagated(unsampled)


def test_without_an_endpoint_tracing_loads_no_sdk() -> None:
    code = (
        "import sys\n"
        "from omnistage.server import tracing\n"
        "import services.server, orchestrator.server\n"
        "print(tracing.setup_tracing('x'), tracing.tracing_enabled(),"
        " any(m.startswith('opentelemetry.sdk') for m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False", "False"]


def test_a_request_span_carries_its_trace_id_onto_the_timeline() -> None:
    span = RequestSpan("r1", "thinker", 0, "h:1", 1_000, 2_000, 3_000, 0.0, 0.0, trace_id="ab" * 16)
    (stage,) = [e for e in orchestrator_events([span], origin_ns=0) if e.name == "stage thinker"]
    assert stage.args["trace_id"] == "ab" * 16
    untraced = span_from_mapping({k: v for k, v in span.__dict__.items() if k != "trace_id"})
    assert untraced.trace_id == ""
    (plain,) = [
        e for e in orchestrator_events([untraced], origin_ns=0) if e.name == "stage thinker"
    ]
    assert "trace_id" not in plain.args


class _FakeProcess:
    def __init__(self, name: str, args: list[str], **options: Any) -> None:
        self.name, self.args, self.address = name, args, "127.0.0.1:1"
        self.http_port = 0  # as ServerProcess: an orchestrator's HTTP port, when it has one

    def wait_serving(self, timeout: float = 0, **options: Any) -> str:
        return self.address

    def stop(self) -> None:
        pass


def test_up_gives_each_server_the_launch_sections_metrics_port(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from omnistage import up

    monkeypatch.setattr(up, "ServerProcess", _FakeProcess)
    (tmp_path / "pipeline.yaml").write_text(
        "stages: [{name: a}, {name: b}]\n"
        "launch:\n"
        "  orchestrator_port: 50090\n"
        "  orchestrator_metrics_port: 9400\n"
        "  stages:\n"
        "    a: {engine: torch, model: 'm:f', port: 50091, metrics_port: 9401}\n"
        "    b: {engine: torch, model: 'm:f', port: 50092}\n"
    )
    a, b, orchestrator = up.launch_pipeline(tmp_path / "pipeline.yaml")
    flag = "--metrics-port"
    assert a.args[a.args.index(flag) + 1] == "9401"
    assert flag not in b.args
    assert orchestrator.args[orchestrator.args.index(flag) + 1] == "9400"


def test_each_chunk_call_of_a_streamed_stage_is_a_child_span_whose_context_it_sends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from omnistage.server import tracing
    from omnistage.types import GenerateInput
    from orchestrator.config import parse_pipeline
    from orchestrator.runner import PipelineRunner
    from tests.unit.fake_stages import FakePool, FakeStage

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    pool = FakePool(talker=FakeStage("talker"), code2wav=FakeStage("code2wav"))
    pipeline = parse_pipeline(
        "stages:\n  - {name: talker, address: fake:1}\n"
        "  - {name: code2wav, address: fake:2, input: {processor: token_ids, stream_chunk: 4}}\n"
    )
    run = PipelineRunner(pipeline, pool)  # type: ignore[arg-type]

    async def request() -> None:
        async for _ in run.run(GenerateInput(request_id="r1", prompt="hi")):
            pass

    with provider.get_tracer("test").start_as_current_span("server") as parent:
        asyncio.run(request())
    calls = [s for s in exporter.get_finished_spans() if s.name.startswith("stage ")]
    assert sorted(s.name for s in calls) == ["stage code2wav"] * 3 + ["stage talker"]
    for span in calls:
        assert span.parent is not None and span.parent.span_id == parent.get_span_context().span_id
        assert span.kind == trace.SpanKind.CLIENT
        assert span.attributes is not None and span.attributes["rpc.grpc.status_code"] == 0
    sent = [m["traceparent"].split("-")[2] for m in pool.stages["code2wav"].metadata]
    chunk_spans = [s for s in calls if s.name == "stage code2wav"]
    assert sorted(sent) == sorted(f"{s.context.span_id:016x}" for s in chunk_spans)
    assert sorted(s.attributes["omnistage.request_id"] for s in chunk_spans) == [  # type: ignore[index]
        f"r1-chunk{n}" for n in range(3)
    ]
