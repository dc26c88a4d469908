"""What metrics, tracing and a timing-only profile session cost: the same two-stage pipeline
(two torch stages whose model doubles its input, behind an orchestrator) served four ways,
one after the other and in alternating rounds (A B C D, D C B A, ...): with none of them,
with `--metrics-port` on every server (scraped every second, as Prometheus would), with
metrics and OpenTelemetry spans exported over OTLP/gRPC to a real OTLP TraceService in a
process of its own (a collector runs apart from the servers; in the load generator's process
its decoding would slow the client), and with a timing-only profile session active over the
whole measured window (`start_profile(timing_only=True)`: spans and clocks, no profiler).
By default (`--pipeline torch`) the stages' model takes microseconds, so what is measured is
the serving path itself, the worst case for any per-request cost. `--pipeline bundled` serves
the bundled two-stage vLLM chain instead (examples/two-stage: thinker, then rewriter, on
smollm2, with the settings `bench/compare.py` uses), what a user runs: there the engines'
work dominates each request.

    .venv/bin/python bench/observability_overhead.py [--pipeline torch|bundled]
        [--requests N] [--rounds N] [--modes off,...] [--out FILE]

Every number printed is measured in this run. docs/observability.md quotes the last one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench_machine import machine_info
from chain_systems import (
    ChainSettings,
    bench_pipeline_file,
    first_request,
    kv_cache_env,
    omnistage_stage_flags,
)
from proc_cpu import cpu_seconds_by_role, sample

import omnistage
from omnistage.launch import ServerProcess, stage_args

ROOT = Path(__file__).resolve().parent.parent
# The stages' model and the OTLP receiver are the tests' own (tests/): this process and every
# server it starts import them from the checkout.
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
from tests.servers import free_port  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "results" / "observability_overhead.json"
PIPELINES = ("torch", "bundled")
# The bundled chain's workload: compare.py's settings, 16 tokens per stage, every token kept.
BUNDLED = ChainSettings(max_tokens=16)
MODEL = "tests.torch_models:build_recording"
PROCESSOR = "tests.unit.custom_processors:tensor_to_token_ids"
OPTIONS = '{"max_batch_size": 8, "max_wait_ms": 0, "num_threads": 1}'
MODES = ("off", "metrics", "metrics+tracing", "timing-only")
# A second plain pipeline, for an A/A check: how far two identical setups differ by themselves.
AA_MODE = "off-again"
CONCURRENCY = 16


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Receiver:
    """An OTLP TraceService (tests/otlp.py) in its own process; `endpoint` is where it listens."""

    def __init__(self) -> None:
        code = (
            "import sys; from tests.otlp import TraceReceiver; r = TraceReceiver(); "
            "print(r.endpoint, flush=True); sys.stdin.read(); n = len(r.spans); r.close(); print(n)"
        )
        self._process = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        assert self._process.stdout is not None
        self.endpoint = self._process.stdout.readline().strip()

    @property
    def pid(self) -> int:
        return self._process.pid

    def close(self) -> int:
        """Stop it; return how many spans it received."""
        out, _ = self._process.communicate("", timeout=60)
        return int(out.strip() or 0)


class Pipeline:
    """Two stages and an orchestrator, started for one mode: the torch stages of the worst
    case, or the bundled chain's vLLM stages (`kind`)."""

    def __init__(self, mode: str, folder: Path, receiver: Receiver, kind: str = "torch") -> None:
        env = {"OTEL_BSP_SCHEDULE_DELAY": "1000"}
        if mode == "metrics+tracing":
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        self.metrics_ports: list[int] = []
        self.processes: list[ServerProcess] = []
        names = BUNDLED.stage_names if kind == "bundled" else ("first", "second")
        for name in names:
            extra = self._metrics(mode) if mode != "timing-only" else []
            if kind == "bundled":
                env |= kv_cache_env(BUNDLED)
                extra += omnistage_stage_flags(BUNDLED)
                args = stage_args(name=name, model=BUNDLED.model, extra=extra)
            else:
                extra += ["--engine-options", OPTIONS, "--grace-seconds", "1"]
                args = stage_args(name=name, engine="torch", model=MODEL, extra=extra)
            process = ServerProcess(name, args, log_path=folder / f"{name}.log", env=env)
            self.processes.append(process)
        timeout = 900 if kind == "bundled" else 120
        addresses = [process.wait_serving(timeout=timeout) for process in self.processes]
        if kind == "bundled":
            at = dict(zip(names, addresses, strict=True))
            pipeline = bench_pipeline_file(BUNDLED, at, folder)
        else:
            pipeline = folder / "pipeline.yaml"
            pipeline.write_text(
                "stages:\n"
                f"  - {{name: first, address: '{addresses[0]}'}}\n"
                f"  - {{name: second, address: '{addresses[1]}',\n"
                f"      input: {{processor: '{PROCESSOR}'}}}}\n"
            )
        args = ["orchestrator", "serve", "--pipeline", str(pipeline), "--port", "0"]
        args += ["--host", "127.0.0.1", "--profile-dir", str(folder / "profiles")]
        args += self._metrics(mode) if mode != "timing-only" else []
        orchestrator = ServerProcess("orchestrator", args, log_path=folder / "o.log", env=env)
        self.processes.append(orchestrator)
        self.address = orchestrator.wait_serving(timeout=60)
        self._stopping = threading.Event()
        self.scraping = threading.Event()
        """Set while this pipeline is measured: Prometheus scrapes it then only, so with
        `--together` an idle pipeline's scrapes are not charged to the one under load."""
        self.scraping.set()
        self._scraper = threading.Thread(target=self._scrape, daemon=True)
        self._scraper.start()

    def _metrics(self, mode: str) -> list[str]:
        if mode in ("off", AA_MODE):
            return []
        self.metrics_ports.append(free_port())
        return ["--metrics-port", str(self.metrics_ports[-1])]

    def _scrape(self) -> None:
        while not self._stopping.wait(1.0):
            if not self.scraping.is_set():
                continue
            for port in self.metrics_ports:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    r.read()

    def stop(self) -> None:
        self._stopping.set()
        self._scraper.join()
        for process in reversed(self.processes):
            process.stop()


async def load(
    address: str,
    requests: int,
    *,
    timing_only: bool = False,
    roots: Mapping[int, str] | None = None,
    kind: str = "torch",
) -> tuple[float, list[float], dict[str, float]]:
    """`requests` requests, CONCURRENCY at a time: (requests/s, latencies); for the bundled
    chain (`kind`) chat requests of BUNDLED.max_tokens tokens per stage. With
    `timing_only`, a timing-only profile session is active over the measured window (its stop,
    which writes the report, is not timed). With `roots` (pid -> name), the CPU seconds per
    request each of those processes spent in the measured window, with the processes it
    started (`proc_cpu`), are returned too."""
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(requests):
        queue.put_nowait(n)
    async with omnistage.AsyncClient(address) as client:

        async def one(n: int) -> None:
            if kind == "bundled":
                request = client.generate(
                    messages=first_request(n).messages,
                    max_tokens=BUNDLED.max_tokens,
                    temperature=BUNDLED.temperature,
                    ignore_eos=BUNDLED.ignore_eos,
                )
            else:
                request = client.generate(token_ids=[1 + n % 7] * 16)
            async for _ in request:
                pass

        async def worker() -> None:
            while not queue.empty():
                n = queue.get_nowait()
                started = time.perf_counter()
                await one(n)
                latencies.append(time.perf_counter() - started)

        # Warm up the channels and the engines, CONCURRENCY at a time as measured.
        await asyncio.gather(*(one(n) for n in range(CONCURRENCY if kind == "bundled" else 20)))
        if timing_only:
            await client.start_profile(timing_only=True, label="bench")
        before = sample(roots) if roots else {}
        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        rate = requests / (time.perf_counter() - began)
        by_role = cpu_seconds_by_role(before, sample(roots)) if roots else {}
        spent = {name: by_role.get(name, 0.0) / requests for name in (roots or {}).values()}
        if timing_only:
            report = await client.stop_profile()
            assert report.timing_only and len(report.critical_paths) >= requests, report
        return rate, latencies, spent


def micro(calls: int = 20_000) -> dict[str, float]:
    """Microseconds of CPU one observed call costs in process: the orchestrator's per-request
    bookkeeping with metrics alone, and with a server span and two stage-call spans, batched
    and encoded to OTLP protobuf as the exporter would send them (not sent: the receiver's
    decoding would count too). Steadier than throughput on a busy machine, where two runs of
    the same setup differ by a quarter."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    class EncodingExporter(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            encode_spans(spans).SerializeToString()
            return SpanExportResult.SUCCESS

    from omnistage.server import tracing
    from omnistage.server.metrics import RequestMeter, new_registry
    from omnistage.server.observe import RequestObserver

    class Context:
        def invocation_metadata(self) -> tuple[()]:
            return ()

        def time_remaining(self) -> None:
            return None

    meter = RequestMeter(
        new_registry(), total="t_total", latency="l", first_output="f", in_flight="i", what="x"
    )
    observer, context = RequestObserver(meter, span_name="omnistage.v1.X/Generate"), Context()

    def one() -> None:
        with observer.observe(context) as call:
            for _ in range(2):
                span = tracing.start_client_span("stage s", {"omnistage.stage": "s"})
                tracing.span_metadata(span)
                tracing.end_span(span, "OK")
            call.output()

    out = {}
    for name in ("metrics", "metrics+tracing"):
        if name == "metrics+tracing":
            provider = TracerProvider()
            processor = BatchSpanProcessor(EncodingExporter(), max_queue_size=4 * calls)
            provider.add_span_processor(processor)
            tracing._tracer = provider.get_tracer("bench")
        started = time.process_time()
        for _ in range(calls):
            one()
        out[name] = (time.process_time() - started) / calls * 1e6
        if name == "metrics+tracing":
            provider.shutdown()  # the export of what is batched counts too
            out[name] = (time.process_time() - started) / calls * 1e6
            tracing._tracer = None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", choices=PIPELINES, default="torch")
    parser.add_argument(
        "--requests", type=int, help="per mode and round (default 600; 96 for bundled)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="each runs every mode once")
    parser.add_argument(
        "--out", type=Path, help=f"default {DEFAULT_OUT.relative_to(ROOT)} (_bundled for bundled)"
    )
    parser.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"a comma-separated subset of {', '.join(MODES)}, or {AA_MODE} (a second plain "
        "pipeline: the A/A check)",
    )
    parser.add_argument(
        "--together",
        action="store_true",
        help="start every mode's pipeline first and keep them all up, so that rounds differ "
        "by the mode alone, not by a fresh start (the default for --pipeline bundled; each of "
        "its vLLM stages takes about 3.5 GB, so give it two modes at a time)",
    )
    args = parser.parse_args()
    modes = tuple(m for m in (*MODES, AA_MODE) if m in args.modes.split(","))
    if "off" not in modes or not set(args.modes.split(",")) <= {*MODES, AA_MODE}:
        parser.error(f"--modes takes 'off' and any of {', '.join((*MODES[1:], AA_MODE))}")
    kind = args.pipeline
    args.together = args.together or kind == "bundled"
    requests = args.requests or (96 if kind == "bundled" else 600)
    out = args.out or (
        DEFAULT_OUT.with_stem(DEFAULT_OUT.stem + "_bundled") if kind == "bundled" else DEFAULT_OUT
    )
    receiver = Receiver()
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    workdir = tempfile.TemporaryDirectory(prefix="omnistage-obs-")
    pipelines: dict[str, Pipeline] = {}

    def start(mode: str) -> Pipeline:
        say(f"{mode}: starting the {kind} pipeline")
        folder = Path(workdir.name) / mode
        folder.mkdir()
        pipelines[mode] = Pipeline(mode, folder, receiver, kind)
        return pipelines[mode]

    def stop(mode: str) -> None:
        pipelines.pop(mode).stop()
        shutil.rmtree(Path(workdir.name) / mode)

    try:
        if args.together:
            for mode in modes:
                start(mode).scraping.clear()
        for round_index in range(args.rounds):
            order = modes if round_index % 2 == 0 else tuple(reversed(modes))
            for mode in order:
                pipeline = pipelines[mode] if args.together else start(mode)
                pipeline.scraping.set()
                try:
                    roots = {p.process.pid: p.name for p in pipeline.processes}
                    roots |= {receiver.pid: "receiver", os.getpid(): "load generator"}
                    rate, latencies, spent = asyncio.run(
                        load(
                            pipeline.address,
                            requests,
                            timing_only=mode == "timing-only",
                            roots=roots,
                            kind=kind,
                        )
                    )
                finally:
                    pipeline.scraping.clear()
                    if not args.together:
                        stop(mode)
                p50 = statistics.median(latencies)
                ms = ", ".join(f"{k} {v * 1000:.2f}" for k, v in spent.items())
                say(
                    f"round {round_index + 1} {mode}: {rate:.2f} req/s, p50 {p50 * 1000:.2f} ms;"
                    f" CPU ms per request: {ms}"
                )
                results[mode].append(
                    {"requests_per_s": rate, "latency_p50_s": p50, "cpu_s_per_request": spent}
                )
        for mode in list(pipelines):
            stop(mode)
        per_call = micro()
        say(f"in process, per request: {per_call}")
    finally:
        for mode in list(pipelines):
            stop(mode)
        workdir.cleanup()
        spans = receiver.close()
    summary = summarize(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": machine_info(),
        "pipeline": kind,
        "requests": requests,
        "concurrency": CONCURRENCY,
        "together": args.together,
        "rounds": results,
        "summary": summary,
        "per_request_cpu_us": per_call,
    }
    out.write_text(json.dumps(report, indent=2))
    for mode, row in summary.items():
        print(
            f"{mode:16} {row['requests_per_s']:8.2f} req/s  x{row['relative']:.3f}  "
            f"p50 {row['latency_p50_s'] * 1000:.2f} ms  CPU ms/request: "
            + ", ".join(f"{k} {v * 1000:.2f}" for k, v in row["cpu_s_per_request"].items())
        )
    for name, us in per_call.items():
        print(f"{name:16} {us:8.1f} µs of CPU per request in the orchestrator's process")
    print(f"spans received: {spans}; written {out}")
    return 0


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per mode the median over rounds, and its throughput relative to `off`'s."""
    rows = {
        mode: {
            "requests_per_s": statistics.median(r["requests_per_s"] for r in runs),
            "latency_p50_s": statistics.median(r["latency_p50_s"] for r in runs),
            "cpu_s_per_request": {
                name: statistics.median(r["cpu_s_per_request"][name] for r in runs)
                for name in runs[0]["cpu_s_per_request"]
            },
        }
        for mode, runs in results.items()
    }
    base = rows["off"]["requests_per_s"]
    for row in rows.values():
        row["relative"] = row["requests_per_s"] / base
    return rows


if __name__ == "__main__":
    sys.exit(main())
