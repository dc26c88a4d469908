"""What the orchestrator's gRPC chaining costs: the same two vLLM engines chained in one
process (no network) against the gRPC pipeline (two `omnistage stage serve` processes and
an `omnistage orchestrator serve`), on the same prompts, one setup after the other.

    .venv/bin/python bench/pipeline_overhead.py [--quick] [--out FILE.json]

Every number printed is measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


async def measure(
    setup: str,
    concurrency: int,
    rounds: int,
    one: Callable[[int], Awaitable[tuple[float, int, float]]],
) -> Measurement:
    """Run `rounds` waves of `concurrency` requests; `one(i)` returns (latency, tokens, handoff)."""
    latencies, handoffs, tokens = [], [], 0
    started = time.perf_counter()
    for wave in range(rounds):
        results = await asyncio.gather(*(one(wave * concurrency + i) for i in range(concurrency)))
        for latency, count, handoff in results:
            latencies.append(latency)
            tokens += count
            handoffs.append(handoff)
    seconds = time.perf_counter() - started
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
    )


async def run_in_process(max_tokens: int, plan: dict[int, int]) -> list[Measurement]:
    from services.config import StageConfig
    from services.engines.vllm_engine import VllmEngine

    engines = [VllmEngine(StageConfig(name=n, model="smollm2")) for n in ("thinker", "rewriter")]
    say("in process: starting two vLLM engines")
    await asyncio.gather(*(e.start() for e in engines))
    edge = resolve_processor(InputConfig(processor="text", template=TEMPLATE))
    sampling = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(i: int) -> tuple[float, int, float]:
        started = time.perf_counter()
        request = GenerateInput(
            request_id=f"inproc-{i}", prompt=PROMPTS[i % len(PROMPTS)], sampling=sampling
        )
        text, count = "", 0
        async for delta in engines[0].generate(request):
            text += delta.text
            count += len(delta.token_ids)
        handed = time.perf_counter()
        second = edge(
            StageOutput("thinker", text, ()),
            request,
            InputConfig(processor="text", template=TEMPLATE),
        )
        second = GenerateInput(
            request_id=f"{request.request_id}-b", prompt=second.prompt, sampling=sampling
        )
        handoff = 0.0
        async for delta in engines[1].generate(second):
            if not handoff:
                handoff = time.perf_counter() - handed
            count += len(delta.token_ids)
        return time.perf_counter() - started, count, 0.0

    try:
        await one(-1)
        results = []
        for concurrency, rounds in plan.items():
            say(f"in process: concurrency {concurrency}")
            results.append(await measure("in process", concurrency, rounds, one))
        return results
    finally:
        await asyncio.gather(*(e.close() for e in engines))


async def run_grpc(max_tokens: int, plan: dict[int, int], workdir: Path) -> list[Measurement]:
    stages = {
        name: ServerProcess(
            f"stage {name}", stage_args(name=name), log_path=workdir / f"{name}.log"
        )
        for name in ("thinker", "rewriter")
    }
    processes = list(stages.values())
    try:
        say("gRPC: starting two stage processes")
        addresses = {name: p.wait_serving(timeout=900) for name, p in stages.items()}
        pipeline = workdir / "pipeline.yaml"
        pipeline.write_text(
            "name: bench\nstages:\n"
            f"  - name: thinker\n    address: {addresses['thinker']}\n"
            f"  - name: rewriter\n    address: {addresses['rewriter']}\n"
            f"    input: {{processor: text, template: '{TEMPLATE}'}}\n"
        )
        orchestrator = ServerProcess(
            "orchestrator",
            [
                "orchestrator",
                "serve",
                "--pipeline",
                str(pipeline),
                "--port",
                "0",
                "--host",
                "127.0.0.1",
            ],
            log_path=workdir / "orchestrator.log",
        )
        processes.append(orchestrator)
        orchestrator.wait_serving(timeout=60)
        client = omnistage.AsyncClient(orchestrator.address)

        async def one(i: int) -> tuple[float, int, float]:
            started = time.perf_counter()
            count, handoff = 0, 0.0
            async for out in client.generate(
                PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, temperature=0.0, ignore_eos=True
            ):
                count += len(out.token_ids)
                if out.finished and out.stage_index == 1 and out.metrics is not None:
                    handoff = out.metrics.handoff_s
            return time.perf_counter() - started, count, handoff

        try:
            await one(-1)
            results = []
            for concurrency, rounds in plan.items():
                say(f"gRPC: concurrency {concurrency}")
                results.append(await measure("gRPC pipeline", concurrency, rounds, one))
            return results
        finally:
            await client.close()
    finally:
        for process in reversed(processes):
            process.stop()


def table(results: list[Measurement], hops: int) -> str:
    header = f"{'setup':<15} {'conc':>4} {'req':>4} {'req/s':>7} {'tok/s':>7}"
    lines = [f"{header} {'p50 s':>7} {'p90 s':>7} {'hand-off p50':>13}"]
    for m in results:
        lines.append(
            f"{m.setup:<15} {m.concurrency:>4} {m.requests:>4} {m.requests_per_s:>7.2f} "
            f"{m.output_tokens_per_s:>7.1f} {m.latency_p50_s:>7.2f} {m.latency_p90_s:>7.2f} "
            f"{m.handoff_p50_ms:>10.2f} ms"
        )
    by = {(m.setup, m.concurrency): m for m in results}
    lines.append("")
    for concurrency in sorted({m.concurrency for m in results}):
        base, grpc_ = by[("in process", concurrency)], by[("gRPC pipeline", concurrency)]
        added = (grpc_.latency_p50_s - base.latency_p50_s) / hops * 1000
        ratio = grpc_.output_tokens_per_s / base.output_tokens_per_s
        delta_ms = (grpc_.latency_p50_s - base.latency_p50_s) * 1000
        lines.append(
            f"concurrency {concurrency}: gRPC/in-process throughput {ratio:.3f}x, "
            f"p50 latency {delta_ms:+.0f} ms, {added:+.1f} ms per hop ({hops} hops)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds and tokens")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    max_tokens = args.max_tokens or (16 if args.quick else 32)
    plan = {1: 3, 16: 1} if args.quick else {1: 5, 16: 2}
    hops = 3  # client → orchestrator, orchestrator → thinker, orchestrator → rewriter
    with tempfile.TemporaryDirectory(prefix="omnistage-bench-") as tmp:
        results = asyncio.run(run_in_process(max_tokens, plan))
        results += asyncio.run(run_grpc(max_tokens, plan, Path(tmp)))
    text = table(results, hops)
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
                    "rounds": plan,
                    "hops": hops,
                    "template": TEMPLATE,
                    "enforce_eager": True,
                    "dtype": "float32",
                },
                "results": [asdict(m) for m in results],
                "table": text,
            },
            indent=2,
        )
    )
    say(f"wrote {args.out}")


if __name__ == "__main__":
    main()
