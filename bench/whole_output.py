"""What a stage's deltas cost when no one reads them: one vLLM stage (the bundled thinker's
settings, `compare.py`'s engine flags) asked for the same chat requests two ways, streamed (a
message per token) and `final_only` (the whole output in one message, as the orchestrator now
asks a stage whose deltas its caller does not read). The same server serves both, in
alternating windows (A B B A ...), so the windows differ by the request alone; per window it
counts the CPU the stage's front end (its process, vLLM's engine processes apart) and this
client spent per request, with `proc_cpu`.

    .venv/bin/python bench/whole_output.py [--requests 48] [--rounds 4] [--max-tokens 16]

Writes bench/results/whole_output.json. Every number printed is measured in this run.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench_machine import machine_info
from chain_systems import ChainSettings, first_request, kv_cache_env, omnistage_stage_flags
from proc_cpu import cpu_seconds_by_role, sample

from omnistage.launch import ServerProcess, stage_args
from omnistage.stage_client import AsyncStageClient
from omnistage.types import SamplingOptions

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "whole_output.json"
CONCURRENCY = 16
MODES = ("streamed", "final_only")


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def window(
    client: AsyncStageClient, mode: str, requests: int, max_tokens: int, roots: dict[int, str]
) -> dict[str, Any]:
    """`requests` requests, CONCURRENCY at a time; messages, tokens and CPU per request."""
    sampling = SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    queue = list(range(requests))
    messages = tokens = 0

    async def worker() -> None:
        nonlocal messages, tokens
        while queue:
            n = queue.pop()
            request = replace(
                first_request(n),
                request_id=f"{mode}-{n}-{time.monotonic_ns()}",
                sampling=sampling,
                final_only=mode == "final_only",
            )
            async for delta in client.generate(request, timeout=600):
                messages += 1
                tokens += len(delta.token_ids)

    before = sample(roots)
    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    seconds = time.perf_counter() - began
    cpu = cpu_seconds_by_role(before, sample(roots))
    return {
        "requests_per_s": requests / seconds,
        "messages_per_request": messages / requests,
        "tokens_per_request": tokens / requests,
        "cpu_s_per_request": {role: cpu.get(role, 0.0) / requests for role in roots.values()},
    }


async def run(args: argparse.Namespace, address: str, roots: dict[int, str]) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    async with AsyncStageClient(address) as client:
        await window(client, "streamed", CONCURRENCY, args.max_tokens, roots)  # warm up
        for round_index in range(args.rounds):
            order = MODES if round_index % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                row = await window(client, mode, args.requests, args.max_tokens, roots)
                results[mode].append(row)
                ms = ", ".join(f"{k} {v * 1000:.2f}" for k, v in row["cpu_s_per_request"].items())
                say(
                    f"round {round_index + 1} {mode}: {row['requests_per_s']:.2f} req/s, "
                    f"{row['messages_per_request']:.1f} messages per request; CPU ms per "
                    f"request: {ms}"
                )
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48, help="per mode and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    settings = ChainSettings(max_tokens=args.max_tokens)
    with tempfile.TemporaryDirectory(prefix="omnistage-whole-") as folder:
        say("starting one vLLM stage (about 40 s)")
        stage = ServerProcess(
            "thinker",
            stage_args(name="thinker", model=settings.model, extra=omnistage_stage_flags(settings)),
            log_path=Path(folder) / "thinker.log",
            env=kv_cache_env(settings),
        )
        try:
            address = stage.wait_serving(timeout=900)
            roots = {stage.process.pid: "stage front end", os.getpid(): "client"}
            results = asyncio.run(run(args, address, roots))
        finally:
            stage.stop()
    summary = {
        mode: {
            "requests_per_s": statistics.median(r["requests_per_s"] for r in rows),
            "messages_per_request": statistics.median(r["messages_per_request"] for r in rows),
            "cpu_ms_per_request": {
                role: statistics.median(r["cpu_s_per_request"][role] for r in rows) * 1000
                for role in rows[0]["cpu_s_per_request"]
            },
        }
        for mode, rows in results.items()
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(), "settings": vars(args) | {"out": str(args.out)}}
    args.out.write_text(json.dumps(report | {"rounds": results, "summary": summary}, indent=2))
    print(
        f"{'mode':12} {'req/s':>7} {'messages/req':>13} "
        + " ".join(f"{r:>22}" for r in roots.values())
    )
    for mode, row in summary.items():
        cpu = " ".join(f"{v:19.2f} ms" for v in row["cpu_ms_per_request"].values())
        print(f"{mode:12} {row['requests_per_s']:7.2f} {row['messages_per_request']:13.1f} {cpu}")
    base = summary["streamed"]["cpu_ms_per_request"]
    for role, value in summary["final_only"]["cpu_ms_per_request"].items():
        print(f"{role}: final_only / streamed CPU per request = {value / base[role]:.3f}")
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
