"""Metrics and traces of real servers (docs/observability.md): two torch stages and an
orchestrator in their own processes, each with --metrics-port and OTEL_EXPORTER_OTLP_ENDPOINT
pointing at a real OTLP TraceService run by this module. Their /metrics pages are parsed with
prometheus_client's own parser; their spans are read as the collector receives them."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

import omnistage
from omnistage.errors import InvalidRequestError
from omnistage.launch import ServerProcess, stage_args
from omnistage.stage_client import StageClient, make_request
from tests.otlp import ReceivedSpan, TraceReceiver
from tests.prometheus_text import delta, scrape, total, value
from tests.servers import RunningStage, free_port
from tests.waiting import wait_until

RECORDING = "tests.torch_models:build_recording"  # doubles token_ids; 13 is INVALID_ARGUMENT
OPTIONS = {"max_batch_size": 4, "max_wait_ms": 5, "num_threads": 1}
STAGES = ("doubler", "again")
SERVER_SPAN, CLIENT_SPAN = 2, 3  # OTLP's SpanKind


@dataclass
class Observed:
    receiver: TraceReceiver
    stages: dict[str, ServerProcess]
    stage_metrics: dict[str, int]
    orchestrator: ServerProcess
    orchestrator_metrics: int
    profiles: Path

    def client(self) -> omnistage.Client:
        return omnistage.Client(self.orchestrator.address)


def _pipeline(stages: dict[str, ServerProcess]) -> str:
    return (
        "name: observed\noutputs: all\nhealth_interval_s: 0.5\nstages:\n"
        f"  - {{name: doubler, address: '{stages['doubler'].address}'}}\n"
        f"  - name: again\n    address: '{stages['again'].address}'\n"
        "    input: {processor: 'tests.unit.custom_processors:tensor_to_token_ids'}\n"
    )


@pytest.fixture(scope="module")
def observed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Observed]:
    tmp = tmp_path_factory.mktemp("observability")
    receiver = TraceReceiver()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    started: list[ServerProcess] = []
    try:
        stages, stage_metrics = {}, {}
        for name in STAGES:
            stage_metrics[name] = free_port()
            profiler = {"torch_profiler_dir": str(tmp / f"{name}-profiles")}
            stages[name] = ServerProcess(
                f"stage {name!r}",
                [
                    *stage_args(
                        name=name,
                        engine="torch",
                        model=RECORDING,
                        profiler_config={**profiler, "torch_profiler_with_stack": False},
                        extra=["--engine-options", json.dumps(OPTIONS), "--grace-seconds", "2"],
                    ),
                    "--metrics-port",
                    str(stage_metrics[name]),
                ],
                log_path=tmp / f"{name}.log",
                env=env,
            )
            started.append(stages[name])
        for process in stages.values():
            process.wait_serving(timeout=120)
        (tmp / "pipeline.yaml").write_text(_pipeline(stages))
        orchestrator_metrics = free_port()
        orchestrator = ServerProcess(
            "orchestrator",
            [
                "orchestrator",
                "serve",
                "--pipeline",
                str(tmp / "pipeline.yaml"),
                "--port",
                "0",
                "--host",
                "127.0.0.1",
                "--profile-dir",
                str(tmp / "profiles"),
                "--metrics-port",
                str(orchestrator_metrics),
            ],
            log_path=tmp / "orchestrator.log",
            env=env,
        )
        started.append(orchestrator)
        orchestrator.wait_serving(timeout=60)
        yield Observed(
            receiver, stages, stage_metrics, orchestrator, orchestrator_metrics, tmp / "profiles"
        )
    finally:
        for process in reversed(started):
            process.stop()
        receiver.close()


def run_requests(observed: Observed, count: int) -> None:
    with observed.client() as client:
        for n in range(count):
            outputs = list(client.generate(token_ids=[1, 2, n + 3]))
            assert [o.stage for o in outputs if o.finished] == list(STAGES)


def test_metrics_count_the_requests_sent(observed: Observed) -> None:
    doubler = observed.stage_metrics["doubler"]
    before, stage_before = scrape(observed.orchestrator_metrics), scrape(doubler)
    run_requests(observed, 3)
    with observed.client() as client, pytest.raises(InvalidRequestError):
        list(client.generate())  # no input: refused before any stage runs
    stage = StageClient(observed.stages["doubler"].address)
    with stage, pytest.raises(InvalidRequestError, match="13"):
        list(stage.generate(make_request(token_ids=[13])))
    after, stage_after = scrape(observed.orchestrator_metrics), scrape(doubler)

    assert delta(before, after, "omnistage_requests_total", code="OK") == 3
    assert delta(before, after, "omnistage_requests_total", code="INVALID_ARGUMENT") == 1
    assert delta(before, after, "omnistage_request_latency_seconds_count") == 4
    assert delta(before, after, "omnistage_request_time_to_first_output_seconds_count") == 3
    assert value(after, "omnistage_requests_in_flight") == 0
    for name in STAGES:
        replica = observed.stages[name].address
        labels = {"stage": name, "replica": replica}
        for metric in ("latency", "time_to_first_output", "queue", "handoff"):
            assert delta(before, after, f"omnistage_stage_{metric}_seconds_count", **labels) == 3
        latency = delta(before, after, "omnistage_stage_latency_seconds_sum", **labels)
        first = delta(before, after, "omnistage_stage_time_to_first_output_seconds_sum", **labels)
        assert 0 < first <= latency < 30, (name, first, latency)
        assert value(after, "omnistage_replica_up", **labels) == 1
    total = delta(before, after, "omnistage_request_latency_seconds_sum")
    assert 0 < total < 60
    assert value(after, "omnistage_profile_sessions_active") == 0
    assert value(after, "process_cpu_seconds_total") > 0

    stage = {"stage": "doubler"}
    assert (
        delta(stage_before, stage_after, "omnistage_stage_requests_total", **stage, code="OK") == 3
    )
    refused = delta(
        stage_before,
        stage_after,
        "omnistage_stage_requests_total",
        **stage,
        code="INVALID_ARGUMENT",
    )
    assert refused == 1
    assert (
        delta(stage_before, stage_after, "omnistage_stage_request_latency_seconds_count", **stage)
        == 4
    )
    assert (
        delta(stage_before, stage_after, "omnistage_stage_request_queue_seconds_count", **stage)
        == 3
    )
    batched = delta(stage_before, stage_after, "omnistage_stage_batch_size_sum", **stage)
    steps = delta(stage_before, stage_after, "omnistage_stage_step_seconds_count", **stage)
    assert batched == 3 and 1 <= steps <= 3  # the 13's step failed: not a step that ran
    assert value(stage_after, "omnistage_stage_running_requests", **stage) == 0
    assert value(stage_after, "omnistage_stage_profiling", **stage) == 0


def _under(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return [s for s in spans if s.parent_span_id == parent.span_id]


def test_one_trace_holds_every_stage_under_the_clients_span(observed: Observed) -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("client") as root:
        run_requests(observed, 1)
    trace_id = f"{root.get_span_context().trace_id:032x}"
    spans = wait_until(
        lambda: (got := observed.receiver.of_trace(trace_id)) and len(got) >= 5 and got,
        timeout=30,
        what="five spans of the client's trace",
    )
    (top,) = [s for s in spans if s.parent_span_id == f"{root.get_span_context().span_id:016x}"]
    assert (top.service, top.name, top.kind) == (
        "omnistage-orchestrator",
        "omnistage.v1.Orchestrator/Generate",
        SERVER_SPAN,
    )
    assert top.attributes["rpc.grpc.status_code"] == 0
    calls = {s.attributes["omnistage.stage"]: s for s in _under(spans, top)}
    assert set(calls) == set(STAGES)
    for name, call in calls.items():
        assert (call.name, call.kind, call.service) == (f"stage {name}", CLIENT_SPAN, top.service)
        assert call.attributes["omnistage.replica"] == observed.stages[name].address
        assert call.attributes["omnistage.request_id"] == top.attributes["omnistage.request_id"]
        assert call.attributes["omnistage.finish_reason"] == "stop"
        (served,) = _under(spans, call)
        assert served.service == f"omnistage-stage-{name}"
        assert (served.name, served.kind) == ("omnistage.v1.Stage/Generate", SERVER_SPAN)
        assert served.attributes["omnistage.stage"] == name
        assert served.attributes["rpc.grpc.status_code"] == 0
    assert len(spans) == 5, [s.name for s in spans]


def test_a_failed_request_is_an_error_span(observed: Observed) -> None:
    tracer = TracerProvider().get_tracer("test")
    client = observed.client()
    with tracer.start_as_current_span("client") as root, client, pytest.raises(InvalidRequestError):
        list(client.generate(token_ids=[13]))  # the doubler's model refuses 13
    trace_id = f"{root.get_span_context().trace_id:032x}"
    spans = wait_until(
        lambda: (got := observed.receiver.of_trace(trace_id)) and len(got) >= 3 and got,
        timeout=30,
        what="three spans of the failed request",
    )
    assert sorted(s.name for s in spans) == [
        "omnistage.v1.Orchestrator/Generate",
        "omnistage.v1.Stage/Generate",
        "stage doubler",
    ]
    for span in spans:
        assert span.status_code == 2, span  # ERROR
        assert span.attributes["rpc.grpc.status_code"] == 3, span  # INVALID_ARGUMENT


def test_a_profile_session_is_metered_and_its_timeline_names_the_traces(observed: Observed) -> None:
    before = scrape(observed.orchestrator_metrics)
    tracer = TracerProvider().get_tracer("test")
    with observed.client() as client:
        session = client.start_profile(stages=["doubler"])
        assert (
            value(scrape(observed.orchestrator_metrics), "omnistage_profile_sessions_active") == 1
        )
        profiling = scrape(observed.stage_metrics["doubler"])
        assert value(profiling, "omnistage_stage_profiling", stage="doubler") == 1
        with tracer.start_as_current_span("client") as root:
            run_requests(observed, 1)
        report = client.stop_profile()
    after = scrape(observed.orchestrator_metrics)
    assert value(after, "omnistage_profile_sessions_active") == 0
    assert delta(before, after, "omnistage_profile_stop_seconds_count") == 1
    pulled = sum(f.size_bytes for stage in report.stages for f in stage.files)
    assert pulled > 0
    assert delta(before, after, "omnistage_profile_pulled_bytes_total") == pulled

    trace_id = f"{root.get_span_context().trace_id:032x}"
    with gzip.open(report.timeline, "rt") as handle:
        events = json.load(handle)["traceEvents"]
    slices = [e for e in events if e.get("cat") == "request" and e["name"].startswith("stage ")]
    assert {e["args"].get("trace_id") for e in slices} == {trace_id}
    spans = wait_until(
        lambda: (got := observed.receiver.of_trace(trace_id)) and len(got) >= 5 and got,
        timeout=30,
        what="the profiled request's spans",
    )
    servers = [s for s in spans if s.kind == SERVER_SPAN]
    assert {s.attributes.get("omnistage.profile_session_id") for s in servers} >= {session}
    assert os.path.isdir(report.output_dir)


PROMETHEUS = shutil.which("prometheus")


def _prometheus_config(observed: Observed) -> str:
    stages = ", ".join(f"'127.0.0.1:{port}'" for port in observed.stage_metrics.values())
    return (
        "global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
        "scrape_configs:\n"
        f"  - {{job_name: orchestrator, static_configs: "
        f"[{{targets: ['127.0.0.1:{observed.orchestrator_metrics}']}}]}}\n"
        f"  - {{job_name: stages, static_configs: [{{targets: [{stages}]}}]}}\n"
    )


def _query(port: int, expression: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            answer = json.load(reply)
    except OSError:
        return []  # not up yet
    assert answer["status"] == "success", answer
    return list(answer["data"]["result"])


@pytest.mark.skipif(
    PROMETHEUS is None,
    reason="Debian's prometheus is not installed (make prometheus, or apt-get install prometheus)",
)
def test_a_real_prometheus_scrapes_every_server(observed: Observed, tmp_path: Path) -> None:
    assert PROMETHEUS is not None
    run_requests(observed, 2)
    sent = value(scrape(observed.orchestrator_metrics), "omnistage_requests_total", code="OK")
    (tmp_path / "prometheus.yml").write_text(_prometheus_config(observed))
    port = free_port()
    command = [
        PROMETHEUS,
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    log = (tmp_path / "prometheus.log").open("w")
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    try:
        up = wait_until(
            lambda: len(got := _query(port, "up == 1")) == 3 and got,
            timeout=60,
            what="Prometheus scraping the orchestrator and both stages",
        )
        assert {r["metric"]["job"] for r in up} == {"orchestrator", "stages"}
        (total,) = wait_until(
            lambda: _query(port, 'omnistage_requests_total{code="OK"}'),
            timeout=30,
            what="the orchestrator's request count in Prometheus",
        )
        assert float(total["value"][1]) == sent
        replicas = _query(port, "omnistage_replica_up == 1")
        assert {r["metric"]["stage"] for r in replicas} == set(STAGES)
        calls = _query(port, 'sum by (stage) (omnistage_stage_requests_total{code="OK"})')
        assert {r["metric"]["stage"] for r in calls} == set(STAGES)
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def test_a_vllm_stage_re_exports_vllms_engine_metrics(plain_stage: RunningStage) -> None:
    """A real vLLM stage's /metrics has vLLM's own `vllm:*` engine series beside the stage's,
    and they count what the stage generated."""
    before = scrape(plain_stage.metrics_port)
    with StageClient(plain_stage.address) as stage:
        for n in range(2):
            request = make_request(prompt=f"Count to {n + 3}.", max_tokens=4, ignore_eos=True)
            outputs = list(stage.generate(request))
            assert sum(len(o.token_ids) for o in outputs) == 4
    after = scrape(plain_stage.metrics_port)
    assert (
        total(after, "vllm:generation_tokens_total") - total(before, "vllm:generation_tokens_total")
        == 8
    )
    success = "vllm:request_success_total"
    assert total(after, success) - total(before, success) == 2
    assert total(after, "vllm:num_requests_running") == 0
    ok = {"stage": "plain", "code": "OK"}
    assert delta(before, after, "omnistage_stage_requests_total", **ok) == 2
    assert not [name for name, _ in after if name.startswith("omnistage_stage_batch_size")]
