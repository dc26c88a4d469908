"""What the orchestrator's gRPC chaining costs: the same two vLLM engines chained in one
process (no network) against the gRPC pipeline (two `omnistage stage serve` processes and
an `omnistage orchestrator serve`), on the same prompts, one setup after the other. Each
gRPC request also measures its own hops: the orchestrator reports, per stage, its own view
of the stage's duration beside the stage's own time (`stage_time_s`), so the difference is
what the hop to the stage and back cost; the client's latency minus everything the
orchestrator accounts for is the client's hop.

    .venv/bin/python bench/pipeline_overhead.py [--quick] [--out FILE.json]

Every number printed is measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from bench_machine import machine_info

import omnistage
from omnistage.launch import ServerProcess, stage_args
from omnistage.types import GenerateInput, SamplingOptions
from orchestrator.config import InputConfig
from orchestrator.processors import StageOutput, resolve_processor

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "pipeline_overhead.json"
SHORT_TOKENS = 4  # one token can decode to no text, which the text edge refuses
TEMPLATE = "Rewrite this in one formal sentence: {text}"
PROMPTS = [
    "Explain how a hash map handles collisions.",
    "Write a short poem about the sea at night.",
    "What are the main causes of inflation?",
    "Describe the water cycle to a ten-year-old.",
    "How does a CPU cache improve performance?",
    "Why is the sky blue?",
    "What makes a good unit test?",
    "Explain gradient descent in plain words.",
]


@dataclass(frozen=True)
class Measurement:
    setup: str
    concurrency: int
    requests: int
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    latency_p50_s: float
    latency_p90_s: float
    handoff_p50_ms: float
    trial_tok_s: list[float]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


Result = tuple[float, int, float]  # latency, output tokens, hand-off
Request = Callable[[int, int], Awaitable[Result]]
Trial = tuple[list[Result], float]  # one wave's results and its wall time


def summarize(setup: str, concurrency: int, trials: list[Trial]) -> Measurement:
    """Pool the trials of one setup at one concurrency: (results, seconds) per trial."""
    latencies = [latency for results, _ in trials for latency, _, _ in results]
    handoffs = [handoff for results, _ in trials for _, _, handoff in results]
    tokens = sum(count for results, _ in trials for _, count, _ in results)
    seconds = sum(elapsed for _, elapsed in trials)
    n = len(latencies)
    return Measurement(
        setup=setup,
        concurrency=concurrency,
        requests=n,
        seconds=seconds,
        requests_per_s=n / seconds,
        output_tokens_per_s=tokens / seconds,
        latency_p50_s=statistics.median(latencies),
        latency_p90_s=percentile(latencies, 0.9),
        handoff_p50_ms=statistics.median(handoffs) * 1000,
        trial_tok_s=[
            sum(count for _, count, _ in results) / elapsed for results, elapsed in trials
        ],
    )


async def wave(one: Request, concurrency: int, first: int, max_tokens: int) -> Trial:
    started = time.perf_counter()
    results = await asyncio.gather(*(one(first + i, max_tokens) for i in range(concurrency)))
    return list(results), time.perf_counter() - started


async def measure_setup(
    name: str,
    setup: InProcess | GrpcPipeline,
    plan: dict[int, int],
    max_tokens: int,
    short_repeats: int,
) -> tuple[list[Measurement], float]:
    """One setup: short requests one at a time (their p50 latency), then waves of
    `concurrency` requests at each level. `setup.phase` names what runs, so each hop is
    measured per phase: under load at concurrency 16 a hop costs more than on an idle path."""
    one = setup.one
    setup.phase = "short"
    short = [(await one(i, SHORT_TOKENS))[0] for i in range(short_repeats)]
    p50 = statistics.median(short)
    say(f"{name}: {short_repeats} {SHORT_TOKENS}-token requests, p50 {p50:.3f} s")
    results = []
    for concurrency, waves in plan.items():
        setup.phase = f"c{concurrency}"
        trials = []
        for index in range(waves):
            say(f"{name}: concurrency {concurrency}, wave {index + 1}/{waves}")
            trials.append(await wave(one, concurrency, index * concurrency, max_tokens))
        results.append(summarize(name, concurrency, trials))
    return results, statistics.median(short)


class InProcess:
    """The two engines in this process, the edge processor between them, no network."""

    def __init__(self) -> None:
        from services.config import StageConfig
        from services.engines.vllm_engine import VllmEngine

        self.engines = [
            VllmEngine(StageConfig(name=n, model="smollm2")) for n in ("thinker", "rewriter")
        ]
        self.edge = resolve_processor(InputConfig(processor="text", template=TEMPLATE))
        self.phase = "warm-up"  # set by measure_setup; the in-process chain has no hops

    async def start(self) -> None:
        say("in process: starting two vLLM engines")
        for engine in self.engines:
            await engine.start()

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self.engines))

    async def one(self, i: int, max_tokens: int) -> tuple[float, int, float]:
        sampling = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        started = time.perf_counter()
        request = GenerateInput(
            request_id=f"inproc-{i}-{time.monotonic_ns()}",
            prompt=PROMPTS[i % len(PROMPTS)],
            sampling=sampling,
        )
        text, count = "", 0
        async for delta in self.engines[0].generate(request):
            text += delta.text
            count += len(delta.token_ids)
        handed = time.perf_counter()
        built = self.edge(
            StageOutput("thinker", text, ()),
            request,
            InputConfig(processor="text", template=TEMPLATE),
        )
        second = GenerateInput(
            request_id=f"{request.request_id}-b", prompt=built.prompt, sampling=sampling
        )
        handoff = time.perf_counter() - handed
        async for delta in self.engines[1].generate(second):
            count += len(delta.token_ids)
        return time.perf_counter() - started, count, handoff


class GrpcPipeline:
    """Two `omnistage stage serve` processes behind an `omnistage orchestrator serve`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.processes: list[ServerProcess] = []
        self.client: omnistage.AsyncClient | None = None
        # Per request, measured on the request itself: the client's hop (its latency minus
        # the orchestrator's hand-offs and stage durations) and each stage's hop (the
        # orchestrator's duration for the stage minus the stage's own time).
        self.phase = "warm-up"
        # (phase, hop) -> seconds, one value per request
        self.hops: dict[tuple[str, str], list[float]] = {}

    async def start(self) -> None:
        stages = {
            name: ServerProcess(
                f"stage {name}",
                stage_args(name=name),
                log_path=self.workdir / f"{name}.log",
                die_with_parent=True,
            )
            for name in ("thinker", "rewriter")
        }
        self.processes = list(stages.values())
        say("gRPC: starting two stage processes")
        addresses = {}
        for name, process in stages.items():
            addresses[name] = await asyncio.to_thread(process.wait_serving, timeout=900)
        pipeline = self.workdir / "pipeline.yaml"
        pipeline.write_text(
            "name: bench\nstages:\n"
            f"  - name: thinker\n    address: {addresses['thinker']}\n"
            f"  - name: rewriter\n    address: {addresses['rewriter']}\n"
            f"    input: {{processor: text, template: '{TEMPLATE}'}}\n"
        )
        orchestrator = ServerProcess(
            "orchestrator",
            [
                *("orchestrator", "serve", "--pipeline", str(pipeline)),
                *("--port", "0", "--host", "127.0.0.1"),
            ],
            log_path=self.workdir / "orchestrator.log",
            die_with_parent=True,
        )
        self.processes.append(orchestrator)
        await asyncio.to_thread(orchestrator.wait_serving, timeout=60)
        self.client = omnistage.AsyncClient(orchestrator.address)

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
        for process in reversed(self.processes):
            process.stop()

    async def one(self, i: int, max_tokens: int) -> tuple[float, int, float]:
        assert self.client is not None
        started = time.perf_counter()
        count, handoff, inside = 0, 0.0, 0.0
        async for out in self.client.generate(
            PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, temperature=0.0, ignore_eos=True
        ):
            count += len(out.token_ids)
            if out.finished and out.metrics is not None:
                inside += out.metrics.handoff_s + out.metrics.duration_s
                hop = out.metrics.duration_s - out.metrics.stage_time_s
                self.hops.setdefault((self.phase, out.stage), []).append(hop)
                if out.stage_index == 1:
                    handoff = out.metrics.handoff_s
        latency = time.perf_counter() - started
        self.hops.setdefault((self.phase, "client"), []).append(latency - inside)
        return latency, count, handoff


async def run(
    max_tokens: int, plan: dict[int, int], short_repeats: int, workdir: Path, grpc_first: bool
) -> tuple[list[Measurement], dict[str, float], dict[str, dict[str, float]]]:
    """Each setup on its own, one after the other: four vLLM engines at once would share the
    one core that vLLM pins every engine's worker to, and slow each other unevenly."""
    results: list[Measurement] = []
    short: dict[str, float] = {}
    grpc_pipeline = GrpcPipeline(workdir)
    setups: list[tuple[str, InProcess | GrpcPipeline]] = [
        ("in process", InProcess()),
        ("gRPC pipeline", grpc_pipeline),
    ]
    for name, setup in reversed(setups) if grpc_first else setups:
        try:
            await setup.start()
            await setup.one(-1, max_tokens)  # warm-up, not measured
            measured, short[name] = await measure_setup(
                name, setup, plan, max_tokens, short_repeats
            )
            results += measured
        finally:
            await setup.close()
    hops: dict[str, dict[str, float]] = {}
    for (phase, hop), values in grpc_pipeline.hops.items():
        if phase != "warm-up":
            hops.setdefault(phase, {})[hop] = statistics.median(values)
    return sorted(results, key=lambda m: (m.concurrency, m.setup != "in process")), short, hops


def table(
    results: list[Measurement], short: dict[str, float], hops: dict[str, dict[str, float]]
) -> str:
    header = f"{'setup':<15} {'conc':>4} {'req':>4} {'req/s':>7} {'tok/s':>7}"
    lines = [f"{header} {'p50 s':>7} {'p90 s':>7} {'hand-off p50':>13}  tok/s per wave"]
    for m in results:
        waves = ", ".join(f"{value:.1f}" for value in m.trial_tok_s)
        lines.append(
            f"{m.setup:<15} {m.concurrency:>4} {m.requests:>4} {m.requests_per_s:>7.2f} "
            f"{m.output_tokens_per_s:>7.1f} {m.latency_p50_s:>7.2f} {m.latency_p90_s:>7.2f} "
            f"{m.handoff_p50_ms:>10.2f} ms  {waves}"
        )
    by = {(m.setup, m.concurrency): m for m in results}
    lines.append("")
    for concurrency in sorted({m.concurrency for m in results}):
        base, grpc_ = by[("in process", concurrency)], by[("gRPC pipeline", concurrency)]
        ratio = grpc_.output_tokens_per_s / base.output_tokens_per_s
        delta_ms = (grpc_.latency_p50_s - base.latency_p50_s) * 1000
        lines.append(
            f"concurrency {concurrency}: gRPC/in-process throughput {ratio:.3f}x, "
            f"p50 latency {delta_ms:+.0f} ms"
        )
    added = (short["gRPC pipeline"] - short["in process"]) * 1000
    lines.append(
        f"{SHORT_TOKENS}-token requests, p50: in process {short['in process'] * 1000:.0f} ms, "
        f"gRPC {short['gRPC pipeline'] * 1000:.0f} ms ({added:+.0f} ms)"
    )
    lines.append("hops, p50 per phase, each measured on the gRPC request itself:")
    for phase, by_hop in hops.items():
        lines.append(
            f"  {phase:<6} client ↔ orchestrator {by_hop['client'] * 1000:.1f} ms, "
            f"orchestrator ↔ thinker {by_hop['thinker'] * 1000:.1f} ms, "
            f"orchestrator ↔ rewriter {by_hop['rewriter'] * 1000:.1f} ms"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and tokens")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--order", choices=["inprocess-first", "grpc-first"], default="inprocess-first"
    )
    args = parser.parse_args()
    max_tokens = args.max_tokens or (16 if args.quick else 32)
    plan = {1: 2, 16: 2} if args.quick else {1: 6, 16: 4}
    short_repeats = 6 if args.quick else 20
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="omnistage-bench-") as tmp:
        results, short, hops = asyncio.run(
            run(max_tokens, plan, short_repeats, Path(tmp), args.order == "grpc-first")
        )
    text = table(results, short, hops)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "benchmark": "pipeline_overhead",
                "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "machine": machine_info(),
                "settings": {
                    "max_tokens_per_stage": max_tokens,
                    "waves": {str(c): w for c, w in plan.items()},
                    "order": args.order,
                    "short_request_tokens": SHORT_TOKENS,
                    "short_request_repeats": short_repeats,
                    "template": TEMPLATE,
                    "enforce_eager": True,
                    "dtype": "float32",
                },
                "load_average_before": load_before,
                "load_average_after": os.getloadavg(),
                "results": [asdict(m) for m in results],
                "short_request_p50_s": short,
                "hop_p50_s": hops,
                "table": text,
            },
            indent=2,
        )
    )
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
