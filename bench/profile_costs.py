"""What profiling costs on a stage and across stages.

1. **Idle profiler**: two `stage serve` processes of the same model side by side, one without
   a profiler and one with the profiler configured but never started. Rounds of concurrent
   requests alternate between them (A B B A ..., only one works at a time, each round after a
   pause); the ratio is the pooled output tok/s of the configured stage over the other's
   (goal ≥ 0.99), with the spread of the per-pair ratios beside it.
2. **StopProfile across stages**: the configured stage stays as `thinker`, a `rewriter` (vLLM)
   and a `code2wav` (torch, examples/omni) join it behind an orchestrator: a three-stage
   pipeline (thinker → rewriter → codes → audio). Each session profiles the same workload, 2
   concurrent pipeline requests.
   - each stage's own stop: `Stage.StartProfile`/`StopProfile` on that stage alone, called
     directly; then every file is pulled with `FetchProfileFile` (MB/s), and the engine steps
     in the trace counted (vLLM's `execute_context_*` and the torch engine's `omnistage.step`
     annotations), for trace bytes per step;
   - the orchestrator's `StopProfile` of the first 1, 2 and 3 stages at once (stop, pull,
     checksums, merged timeline and summary), against the slowest of those stages' own stop
     (goal ≤ 1.1), and against the slowest stage's share inside the same session.

    .venv/bin/python bench/profile_costs.py [--quick] [--with-stack] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench_machine import machine_info
from chain_systems import (
    LOCAL_PORT_0,
    ChainSettings,
    bench_pipeline_file,
    first_request,
    kv_cache_env,
    omnistage_stage_flags,
    start_servers,
)
from stage_overhead import BenchSettings, GrpcTarget, progress, run_round

import omnistage
from omnistage.client import AsyncStageClient
from omnistage.launch import ServerProcess, stage_args

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "profile_costs.json"
STEP_MARKERS = (b'"execute_context_', b'"omnistage.step')
TRACE_MARK = ".pt.trace.json"
CODE2WAV_OPTIONS = {"max_batch_size": 4, "max_wait_ms": 5, "num_threads": 1}
SESSION_REQUESTS = 2
SETTLE_S = 3.0  # the pause before each idle-comparison round


def count_steps(trace_json: bytes) -> int:
    """Engine steps in a trace: one annotation per vLLM model step or torch engine step."""
    return sum(trace_json.count(marker) for marker in STEP_MARKERS)


def trace_steps(path: Path) -> int:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as handle:
        return count_steps(handle.read())


def profiler_config(directory: Path, *, with_stack: bool) -> dict[str, object]:
    return {"torch_profiler_dir": str(directory), "torch_profiler_with_stack": with_stack}


# -- 1. the idle profiler -----------------------------------------------------------------------


async def measure_idle(
    clients: dict[str, AsyncStageClient], s: ChainSettings, pairs: int, concurrency: int
) -> dict[str, Any]:
    """Pairs of rounds, one on each stage, in A B B A ... order, each after a settle pause: an
    engine keeps its CPU busy for a moment after its last step, which would slow the round
    that follows it on the other engine."""
    settings = BenchSettings(quick=False, max_tokens=s.max_tokens)
    targets = {name: GrpcTarget(client) for name, client in clients.items()}
    for target in targets.values():
        await run_round(target, settings, 1, 0)  # warm-up
    rates: dict[str, list[float]] = {name: [] for name in targets}
    tokens: dict[str, int] = dict.fromkeys(targets, 0)
    walls: dict[str, float] = dict.fromkeys(targets, 0.0)
    names = list(targets)
    for index in range(pairs):
        for name in names if index % 2 == 0 else reversed(names):
            await asyncio.sleep(SETTLE_S)
            result = await run_round(targets[name], settings, concurrency, index)
            rates[name].append(result.tokens / result.wall_s)
            tokens[name] += result.tokens
            walls[name] += result.wall_s
        progress(
            f"profile: idle pair {index + 1}/{pairs}: "
            + ", ".join(f"{n} {rates[n][-1]:.1f} tok/s" for n in names)
        )
    pooled = {name: tokens[name] / walls[name] for name in names}
    pair_ratios = [c / n for c, n in zip(rates["configured"], rates["not_configured"], strict=True)]
    return {
        "concurrency": concurrency,
        "pairs": pairs,
        "settle_s": SETTLE_S,
        "tok_s_rounds": rates,
        "tok_s_pooled": pooled,
        "ratio": pooled["configured"] / pooled["not_configured"],
        "pair_ratios": pair_ratios,
        "pair_ratio_min": min(pair_ratios),
        "pair_ratio_max": max(pair_ratios),
    }


# -- 2. stops -------------------------------------------------------------------------------------


async def pipeline_workload(client: omnistage.AsyncClient, s: ChainSettings) -> None:
    async def one(index: int) -> None:
        async for _ in client.generate(
            messages=first_request(index).messages,
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            ignore_eos=True,
        ):
            pass

    await asyncio.gather(*(one(i) for i in range(SESSION_REQUESTS)))


async def own_stop(
    stage: AsyncStageClient, client: omnistage.AsyncClient, s: ChainSettings, pulled: Path
) -> dict[str, Any]:
    """One stage profiled alone, stopped directly, its files pulled over FetchProfileFile."""
    await stage.start_profile(label="own")
    await pipeline_workload(client, s)
    started = time.perf_counter()
    manifest = await stage.stop_profile()
    wall = time.perf_counter() - started
    files: dict[str, dict[str, Any]] = {}
    fetch_bytes, fetch_seconds = 0, 0.0
    for item in manifest.files:
        target = pulled / manifest.session_id / item.name
        began = time.perf_counter()
        size = await stage.fetch_file(manifest.session_id, item.name, target)
        seconds = time.perf_counter() - began
        fetch_bytes += size
        fetch_seconds += seconds
        entry: dict[str, Any] = {"bytes": size, "fetch_s": seconds}
        if TRACE_MARK in item.name:
            entry["steps"] = await asyncio.to_thread(trace_steps, target)
        files[item.name] = entry
    traces = {n: f for n, f in files.items() if "steps" in f}
    engine = max(traces.values(), key=lambda f: f["steps"], default=None)
    steps = engine["steps"] if engine else 0
    return {
        "stop_wall_s": wall,
        "inside_stage_s": manifest.stop_seconds,
        "files": files,
        "trace_bytes": sum(f["bytes"] for f in traces.values()),
        "engine_steps": steps,
        "trace_bytes_per_step": engine["bytes"] / steps if engine and steps else None,
        "all_trace_bytes_per_step": (
            sum(f["bytes"] for f in traces.values()) / steps if steps else None
        ),
        "fetch": {
            "bytes": fetch_bytes,
            "seconds": fetch_seconds,
            "mb_s": fetch_bytes / fetch_seconds / 1e6 if fetch_seconds else None,
        },
    }


async def orchestrated_stop(
    client: omnistage.AsyncClient,
    stages: list[str],
    s: ChainSettings,
    output_dir: Path,
    own: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    await client.start_profile(stages=stages, label=f"stop{len(stages)}")
    await pipeline_workload(client, s)
    started = time.perf_counter()
    report = await client.stop_profile(str(output_dir))
    wall = time.perf_counter() - started
    failed = [f"{r.stage}: {r.error}" for r in report.failed]
    in_session = {r.stage: r.stop_seconds for r in report.stages}
    slowest_own = max(own[name]["stop_wall_s"] for name in stages)
    return {
        "stages": stages,
        "wall_s": wall,
        "stage_stop_and_pull_s": in_session,
        "bytes_pulled": sum(f.size_bytes for r in report.stages for f in r.files),
        "slowest_own_s": slowest_own,
        "ratio_to_slowest_own": wall / slowest_own,
        "ratio_to_slowest_in_session": wall / max(in_session.values()),
        "failed": failed,
    }


# -- the run --------------------------------------------------------------------------------------


async def run_profile_costs(
    s: ChainSettings, out: dict[str, Any], *, with_stack: bool = False, quick: bool = False
) -> None:
    """Fill `out` part by part, so a failure keeps what was measured."""
    pairs, concurrency = (2, 4) if quick else (4, 8)
    out["settings"] = {
        "with_stack": with_stack,
        "idle_pairs": pairs,
        "idle_concurrency": concurrency,
        "session_requests": SESSION_REQUESTS,
        "max_tokens": s.max_tokens,
        "code2wav_engine_options": CODE2WAV_OPTIONS,
    }
    os.environ.update(kv_cache_env(s))
    flags = omnistage_stage_flags(s)
    with tempfile.TemporaryDirectory(prefix="omnistage-profile-") as tmp:
        work = Path(tmp)

        def stage(name: str, *, profiled: bool, **kwargs: Any) -> ServerProcess:
            config = profiler_config(work / "stages" / name, with_stack=with_stack)
            args = stage_args(name=name, profiler_config=config if profiled else None, **kwargs)
            return ServerProcess(f"stage {name}", args, log_path=work / f"{name}.log")

        servers: list[ServerProcess] = []
        try:
            plain = stage("thinker-plain", profiled=False, model=s.model, extra=flags)
            thinker = stage("thinker", profiled=True, model=s.model, extra=flags)
            servers += [plain, thinker]
            progress("profile: starting a stage without and one with a profiler (about 40 s)")
            await start_servers([plain, thinker], progress, "profile")
            async with (
                AsyncStageClient(plain.address) as a,
                AsyncStageClient(thinker.address) as b,
            ):
                clients = {"not_configured": a, "configured": b}
                out["idle"] = await measure_idle(clients, s, pairs, concurrency)
            progress(f"profile: idle ratio {out['idle']['ratio']:.3f} (goal ≥ 0.99)")
            await asyncio.to_thread(plain.stop)
            servers.remove(plain)

            rewriter = stage("rewriter", profiled=True, model=s.model, extra=flags)
            code2wav = stage(
                "code2wav",
                profiled=True,
                engine="torch",
                model="examples.omni.code2wav:build",
                extra=["--engine-options", json.dumps(CODE2WAV_OPTIONS)],
            )
            servers += [rewriter, code2wav]
            progress("profile: starting rewriter (vLLM) and code2wav (torch)")
            await start_servers([rewriter, code2wav], progress, "profile")
            addresses = {"thinker": thinker.address, "rewriter": rewriter.address}
            audio = {
                "name": "code2wav",
                "address": code2wav.address,
                "input": {"processor": "examples.omni.processors:tokens_to_codes"},
            }
            pipeline = bench_pipeline_file(s, addresses, work, extra=[audio])
            orchestrator = ServerProcess(
                "orchestrator",
                ["orchestrator", "serve", "--pipeline", str(pipeline), *LOCAL_PORT_0],
                log_path=work / "orchestrator.log",
            )
            servers.append(orchestrator)
            await start_servers([orchestrator], progress, "profile")
            stages = {"thinker": thinker, "rewriter": rewriter, "code2wav": code2wav}
            async with omnistage.AsyncClient(orchestrator.address) as client:
                await pipeline_workload(client, s)  # warm-up
                own: dict[str, dict[str, Any]] = {}
                out["own_stops"] = own
                for name, server in stages.items():
                    async with AsyncStageClient(server.address) as direct:
                        own[name] = await own_stop(direct, client, s, work / "pulled")
                    progress(
                        f"profile: {name} own stop {own[name]['stop_wall_s']:.2f} s, "
                        f"{own[name]['trace_bytes']:,} trace bytes, "
                        f"{own[name]['engine_steps']} steps, pull "
                        f"{own[name]['fetch']['mb_s'] or 0:.1f} MB/s"
                    )
                out["orchestrated_stops"] = []
                names = list(stages)
                for count in range(1, len(names) + 1):
                    # relative: under the orchestrator's profile root, where an output dir must be
                    stop = await orchestrated_stop(client, names[:count], s, Path("orch"), own)
                    out["orchestrated_stops"].append(stop)
                    progress(
                        f"profile: orchestrator stop of {count} stage(s) {stop['wall_s']:.2f} s, "
                        f"{stop['ratio_to_slowest_own']:.2f}x the slowest own stop"
                    )
        finally:
            progress("profile: stopping the stages and the orchestrator")
            await asyncio.gather(*(asyncio.to_thread(p.stop) for p in reversed(servers)))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--with-stack", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    settings = ChainSettings(max_tokens=args.max_tokens or (16 if args.quick else 32))
    result: dict[str, Any] = {}
    try:
        asyncio.run(
            run_profile_costs(settings, result, with_stack=args.with_stack, quick=args.quick)
        )
    finally:
        report = {
            "benchmark": "profile_costs",
            "machine": machine_info(),
            "settings": asdict(settings),
            "profile": result,
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
