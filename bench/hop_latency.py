"""What each hop costs at idle, with a torch stage (no vLLM engine, starts in seconds).

One `omnistage stage serve --engine torch` process (the omni pipeline's code2wav on three
codes) behind an `omnistage orchestrator serve` of one stage. One request at a time, each
request measured on itself:

- client ↔ orchestrator: the client's latency minus the orchestrator's own duration of the
  stage call (`metrics.duration_s`);
- orchestrator ↔ stage: that duration minus the stage's own time (`metrics.stage_time_s`);
- direct: the same request sent straight to the stage, its latency minus the stage's time,
  for a plain client's view of one gRPC streaming call.

    .venv/bin/python bench/hop_latency.py [--requests 200] [--out FILE.json]

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
from pathlib import Path

import psutil
from bench_machine import machine_info

import omnistage
from omnistage.client import AsyncStageClient
from omnistage.launch import ServerProcess, stage_args
from omnistage.types import GenerateInput

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "hop_latency.json"
MODEL = "examples.omni.code2wav:build"
OPTIONS = '{"max_batch_size": 4, "max_wait_ms": 0, "num_threads": 1}'
CODES = (1, 2, 3)


def p50_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def measure(
    orchestrator: str, stage: str, requests: int, pids: dict[str, int]
) -> dict[str, float]:
    client = omnistage.AsyncClient(orchestrator)
    cpu: dict[str, float] = {}
    direct = AsyncStageClient(stage)
    client_hop, stage_hop, direct_hop, latency = [], [], [], []
    try:
        for i in range(requests + 20):  # the first 20 warm up
            started = time.perf_counter()
            duration = own = 0.0
            async for out in client.generate(token_ids=CODES):
                if out.finished and out.metrics is not None:
                    duration, own = out.metrics.duration_s, out.metrics.stage_time_s
            elapsed = time.perf_counter() - started
            started = time.perf_counter()
            direct_own = 0.0
            request = GenerateInput(request_id=f"direct-{i}", token_ids=CODES)
            async for delta in direct.generate(request):
                if delta.finished and delta.metrics is not None:
                    direct_own = delta.metrics.duration_s
            direct_elapsed = time.perf_counter() - started
            if i == 19:
                cpu = {name: cpu_s(pid) for name, pid in pids.items()}
            if i >= 20:
                latency.append(elapsed)
                client_hop.append(elapsed - duration)
                stage_hop.append(duration - own)
                direct_hop.append(direct_elapsed - direct_own)
        # each process's CPU per request, the direct calls' share of the stage's included
        used = {
            f"{name}_cpu_ms_per_request": (cpu_s(pid) - cpu[name]) * 1000 / requests
            for name, pid in pids.items()
        }
    finally:
        await client.close()
        await direct.close()
    return {
        **used,
        "latency_p50_ms": p50_ms(latency),
        "client_orchestrator_p50_ms": p50_ms(client_hop),
        "orchestrator_stage_p50_ms": p50_ms(stage_hop),
        "client_stage_direct_p50_ms": p50_ms(direct_hop),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        stage = ServerProcess(
            "stage code2wav",
            stage_args(
                name="code2wav",
                engine="torch",
                model=MODEL,
                extra=["--engine-options", OPTIONS],
            ),
            log_path=workdir / "stage.log",
            die_with_parent=True,
        )
        processes = [stage]
        try:
            address = stage.wait_serving(timeout=120)
            pipeline = workdir / "pipeline.yaml"
            pipeline.write_text(
                f"name: hops\nstages:\n  - name: code2wav\n    address: {address}\n"
            )
            orchestrator = ServerProcess(
                "orchestrator",
                [
                    *("orchestrator", "serve", "--pipeline", str(pipeline)),
                    *("--port", "0", "--host", "127.0.0.1"),
                ],
                log_path=workdir / "orchestrator.log",
                die_with_parent=True,
            )
            processes.append(orchestrator)
            orchestrator.wait_serving(timeout=60)
            pids = {"orchestrator": orchestrator.process.pid, "stage": stage.process.pid}
            result = asyncio.run(measure(orchestrator.address, address, args.requests, pids))
        finally:
            for process in reversed(processes):
                process.stop()
    for key, value in result.items():
        print(f"{key:<30} {value:7.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_info(), **result}, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
