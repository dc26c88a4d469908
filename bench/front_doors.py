"""The bundled two-stage chain through its three front doors, on servers that are all up at
once: omnistage's gRPC client and its OpenAI-compatible HTTP API (the same orchestrator and
stages serve both), and two chained `vllm serve` OpenAI servers (`compare.py`'s `openai`
system). The windows alternate (A B C, C B A, ...), so each system is measured beside the
others on engines that started together, not in runs of their own: in `compare.py` each
system starts its own engines, and two fresh starts of the same stack differ by several
percent on this machine (`observability_overhead.py --modes off,off-again`).

Per window: requests/s, output tokens/s, and the CPU each process spent per request
(`proc_cpu`: the orchestrator, each stage's or server's front end, vLLM's engines, this
client). The goals of the HTTP API (docs/http.md): throughput through HTTP >= 0.97x the gRPC
client's, and the front door's CPU per request (the orchestrator's) <= that of one `vllm
serve` front end.

    .venv/bin/python bench/front_doors.py [--requests 48] [--rounds 6] [--max-tokens 16]
        [--systems grpc,http,openai] [--baseline OTHER_CHECKOUT]

Writes bench/results/front_doors.json. Every number printed is measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from bench_machine import machine_info
from chain_systems import (
    HTTP_MODEL,
    LOCAL_PORT_0,
    Chain,
    ChainSettings,
    OmnistageChain,
    OmnistageHttpChain,
    http_session,
    omnistage_servers,
    openai_system,
    start_servers,
)
from compare_stats import closed_loop, summarize_level
from proc_cpu import cpu_seconds_by_role, sample

import omnistage
from omnistage.launch import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "front_doors.json"
SYSTEMS = ("grpc", "http", "openai")
CONCURRENCY = 16


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


async def window(chain: Chain, requests: int, first: int) -> dict[str, Any]:
    """`requests` requests, CONCURRENCY callers in a closed loop: the level's summary, with
    each role's CPU milliseconds per request."""
    before = sample(chain.roots)
    records, seconds = await closed_loop(chain.one, CONCURRENCY, requests, first=first)
    cpu = cpu_seconds_by_role(before, sample(chain.roots))
    row = summarize_level(CONCURRENCY, records, seconds, cpu)
    row["cpu_ms_per_request"] = {role: s * 1000 / requests for role, s in sorted(cpu.items())}
    row["loadavg_1min"] = os.getloadavg()[0]
    return row


@contextlib.asynccontextmanager
async def baseline_door(
    checkout: Path, folder: Path, roots: dict[int, str], s: ChainSettings, session: Any
) -> AsyncIterator[Chain]:
    """A second orchestrator, run from another checkout of omnistage (`--baseline`, e.g. a
    `git worktree` of the commit before a change), over the same stages, with its HTTP API:
    the change's effect on the front door, measured beside it on the same engines."""
    pipeline = next(folder.glob("bench-*.yaml"))  # the one omnistage_servers wrote
    args = ["orchestrator", "serve", "--pipeline", str(pipeline), *LOCAL_PORT_0]
    args += ["--http-port", "0", "--served-model-name", HTTP_MODEL]
    env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))
    }
    door = ServerProcess("baseline", args, log_path=folder / "baseline.log", env=env)
    try:
        await start_servers([door], say, "baseline")
        mine = {pid: role for pid, role in roots.items() if role != "orchestrator"}
        mine[door.process.pid] = "orchestrator"
        yield OmnistageHttpChain(session, door.http_url, s, mine)
    finally:
        await asyncio.to_thread(door.stop)


async def measure(args: argparse.Namespace, folder: Path) -> dict[str, list[dict[str, Any]]]:
    s = ChainSettings(max_tokens=args.max_tokens)
    chains: dict[str, Chain] = {}
    async with contextlib.AsyncExitStack() as stack:
        if {"grpc", "http"} & set(args.systems):
            orchestrator, roots = await stack.enter_async_context(
                omnistage_servers(s, folder, say, http=True)
            )
            if "grpc" in args.systems:
                client = await stack.enter_async_context(
                    omnistage.AsyncClient(orchestrator.address)
                )
                chains["grpc"] = OmnistageChain(client, s, roots)
            session = await stack.enter_async_context(http_session())
            if "http" in args.systems:
                chains["http"] = OmnistageHttpChain(session, orchestrator.http_url, s, roots)
            if args.baseline is not None:
                chains["http-baseline"] = await stack.enter_async_context(
                    baseline_door(args.baseline, folder, roots, s, session)
                )
        if "openai" in args.systems:
            chains["openai"] = await stack.enter_async_context(openai_system(s, folder, say))
        order = [name for name in (*args.systems, "http-baseline") if name in chains]
        sent = 0
        for name in order:  # warm up each: the channels, the engines' first batches
            await closed_loop(chains[name].one, CONCURRENCY, CONCURRENCY, first=sent)
            sent += CONCURRENCY
        say(f"warmed up {', '.join(order)}")
        results: dict[str, list[dict[str, Any]]] = {name: [] for name in order}
        for round_index in range(args.rounds):
            for name in order if round_index % 2 == 0 else reversed(order):
                row = await window(chains[name], args.requests, sent)
                sent += args.requests
                results[name].append(row)
                cpu = ", ".join(f"{k} {v:.1f}" for k, v in row["cpu_ms_per_request"].items())
                say(
                    f"round {round_index + 1} {name}: {row['requests_per_s']:.2f} req/s, "
                    f"{row['output_tok_s']:.1f} tok/s, load {row['loadavg_1min']:.1f}; "
                    f"CPU ms/request: {cpu}"
                )
    return results


def front_door_ms(system: str, cpu: dict[str, float]) -> float:
    """The CPU per request of the process a caller talks to: omnistage's orchestrator, or the
    mean of the two `vllm serve` front ends (each is one chained server's front door)."""
    if system == "openai":
        ends = [v for k, v in cpu.items() if k.startswith("frontend:")]
        return sum(ends) / len(ends)
    return cpu["orchestrator"]


def summarize(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for name, rows in results.items():
        roles = rows[0]["cpu_ms_per_request"]
        summary[name] = {
            "requests_per_s": statistics.median(r["requests_per_s"] for r in rows),
            "output_tok_s": statistics.median(r["output_tok_s"] for r in rows),
            "front_door_ms": statistics.median(
                front_door_ms(name, r["cpu_ms_per_request"]) for r in rows
            ),
            "cpu_ms_per_request": {
                role: statistics.median(r["cpu_ms_per_request"].get(role, 0.0) for r in rows)
                for role in roles
            },
        }
    ratios: dict[str, Any] = {}
    pairs_to_compare = [("http", "grpc"), ("grpc", "openai"), ("http", "openai")]
    pairs_to_compare += [("http", "http-baseline"), ("http-baseline", "openai")]
    for a, b in pairs_to_compare:
        if a in results and b in results:
            pairs = [
                x["requests_per_s"] / y["requests_per_s"]
                for x, y in zip(results[a], results[b], strict=True)
            ]
            doors = [
                front_door_ms(a, x["cpu_ms_per_request"])
                / front_door_ms(b, y["cpu_ms_per_request"])
                for x, y in zip(results[a], results[b], strict=True)
            ]
            ratios[f"{a}/{b}"] = {
                "throughput_median_of_rounds": statistics.median(pairs),
                "throughput_rounds": pairs,
                "throughput_pooled": sum(r["requests_per_s"] for r in results[a])
                / sum(r["requests_per_s"] for r in results[b]),
                "front_door_cpu_median_of_rounds": statistics.median(doors),
                "front_door_cpu_rounds": doors,
            }
    return {"systems": summary, "ratios": ratios}


def print_table(summary: dict[str, Any]) -> None:
    print(f"{'system':8} {'req/s':>7} {'tok/s':>7} {'front door ms/req':>18}  CPU ms/request")
    for name, row in summary["systems"].items():
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in row["cpu_ms_per_request"].items())
        print(
            f"{name:8} {row['requests_per_s']:7.2f} {row['output_tok_s']:7.1f} "
            f"{row['front_door_ms']:18.2f}  {cpu}"
        )
    print(f"\n{'ratio':12} {'throughput':>11} {'(pooled)':>9} {'front door CPU':>15}  rounds")
    for name, r in summary["ratios"].items():
        rounds = " ".join(f"{x:.3f}" for x in r["throughput_rounds"])
        print(
            f"{name:12} {r['throughput_median_of_rounds']:11.3f} {r['throughput_pooled']:9.3f} "
            f"{r['front_door_cpu_median_of_rounds']:15.3f}  {rounds}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48, help="per system and round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=16, help="per stage")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="which, in window order")
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout: its orchestrator too, over the same stages (http-baseline)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    args.systems = [x for x in args.systems.split(",") if x]
    unknown = sorted(set(args.systems) - set(SYSTEMS))
    if unknown or not args.systems:
        parser.error(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    with tempfile.TemporaryDirectory(prefix="omnistage-doors-") as folder:
        results = asyncio.run(measure(args, Path(folder)))
    summary = summarize(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {"machine": machine_info(), "settings": vars(args) | {"out": str(args.out)}}
    args.out.write_text(
        json.dumps(report | {"rounds": results, "summary": summary}, indent=2, default=str)
    )
    print_table(summary)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
