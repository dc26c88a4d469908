"""What a stage's gRPC layer costs: `Stage.Generate` and `StopProfile` through a real
`omnistage stage serve` process, against the same vLLM engine called in process.

Run it from the repository root:

    .venv/bin/python bench/stage_overhead.py [--quick] [--out bench/results/stage_overhead.json]

The two paths run one after the other, never side by side: each engine is three processes and
this machine may have two cores. Every number printed is measured in this run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from bench_machine import align_table, machine_info

from omnistage.client import AsyncStageClient, make_request
from omnistage.launch import ServerProcess, stage_args
from omnistage.types import GenerateInput, OutputDelta, ProfileOptions

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "stage_overhead.json"
TRACE_MARK = ".pt.trace.json"
STAGE_NAME = "bench"
PROMPTS = (
    "Explain how a hash map handles collisions.",
    "Write a short poem about the sea at night.",
    "What are the main causes of inflation?",
    "Describe the water cycle to a ten-year-old.",
    "List three tips for writing clear documentation.",
    "How does a CPU cache improve performance?",
    "Summarize the plot of a detective story in a few lines.",
    "What is the difference between a process and a thread?",
    "Give a recipe for a simple tomato soup.",
    "Why is the sky blue?",
    "Describe a walk through a busy market.",
    "What makes a good unit test?",
    "Explain gradient descent in plain words.",
    "Tell me about the history of the printing press.",
    "How do vaccines train the immune system?",
    "Plan a one-day trip to a mountain village.",
)
_T0 = time.perf_counter()
_LOAD_SAMPLES: list[float] = []  # the 1-minute load average at every progress line


# -- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    """Everything that shapes the workload; written to the JSON as is."""

    quick: bool
    model: str = "smollm2"
    dtype: str = "float32"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    kv_cache_gib: float = 1.0
    enforce_eager: bool = True
    max_tokens: int = 64
    temperature: float = 0.0
    ignore_eos: bool = True
    rounds: dict[int, int] = field(default_factory=dict)  # concurrency -> measured rounds
    warmup_requests: int = 1
    profile_repeats: int = 1  # each stop takes minutes on a small CPU
    profile_requests: int = 2  # sent together inside each profile session
    order: tuple[str, ...] = ("grpc", "inprocess")


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    quick = bool(args.quick)
    rounds = {1: 3, 16: 2} if quick else {1: 6, 16: 4}
    default_tokens = 32 if quick else 64
    order = ("grpc", "inprocess") if args.order == "grpc-first" else ("inprocess", "grpc")
    return BenchSettings(
        quick=quick,
        max_tokens=args.max_tokens or default_tokens,
        rounds=rounds,
        profile_repeats=args.profile_repeats,
        order=order,
    )


def stage_cli_flags(settings: BenchSettings) -> list[str]:
    """The engine settings as `omnistage stage serve` flags (eager unless --compile)."""
    flags = ["--dtype", settings.dtype, "--max-model-len", str(settings.max_model_len)]
    flags += ["--max-num-seqs", str(settings.max_num_seqs)]
    flags += ["--kv-cache-gib", f"{settings.kv_cache_gib:g}"]
    return flags if settings.enforce_eager else [*flags, "--compile"]


def profiler_config(directory: Path) -> dict[str, object]:
    """vLLM's profiler keys, the same for both paths; everything else stays at vLLM's defaults."""
    return {"profiler": "torch", "torch_profiler_dir": str(directory)}


def progress(message: str) -> None:
    """One line on stderr, with the load average: on a small machine other work shows here."""
    load = os.getloadavg()[0]
    _LOAD_SAMPLES.append(load)
    elapsed = time.perf_counter() - _T0
    print(f"[{elapsed:7.1f} s, load {load:5.2f}] {message}", file=sys.stderr, flush=True)


# -- the two paths behind one small interface --------------------------------------------------


@dataclass(frozen=True)
class ProfileStop:
    wall_s: float
    inside_stage_s: float | None  # what the stage measured around the engine's stop
    files: dict[str, int]  # name -> bytes

    @property
    def trace_bytes(self) -> int:
        return sum(size for name, size in self.files.items() if TRACE_MARK in name)


class Target(Protocol):
    def generate(self, request: GenerateInput) -> AsyncIterator[OutputDelta]: ...

    async def start_profile(self) -> None: ...

    async def stop_profile(self) -> ProfileStop: ...


class GrpcTarget:
    """`Stage.Generate` and the profile RPCs of a stage service."""

    def __init__(self, client: AsyncStageClient) -> None:
        self._client = client

    def generate(self, request: GenerateInput) -> AsyncIterator[OutputDelta]:
        return self._client.generate(request)

    async def start_profile(self) -> None:
        await self._client.start_profile(label="bench")

    async def stop_profile(self) -> ProfileStop:
        started = time.perf_counter()
        manifest = await self._client.stop_profile()
        wall = time.perf_counter() - started
        files = {item.name: item.size_bytes for item in manifest.files}
        return ProfileStop(wall_s=wall, inside_stage_s=manifest.stop_seconds, files=files)


class InProcessTarget:
    """The same engine adapter, awaited directly in this process."""

    def __init__(self, engine: Any, profiler_dir: Path) -> None:
        self._engine = engine
        self._profiler_dir = profiler_dir
        self._session_dir: Path | None = None

    def generate(self, request: GenerateInput) -> AsyncIterator[OutputDelta]:
        request_id = request.request_id or uuid.uuid4().hex  # the servicer's job over gRPC
        result: AsyncIterator[OutputDelta] = self._engine.generate(
            replace(request, request_id=request_id)
        )
        return result

    async def start_profile(self) -> None:
        session_dir = self._profiler_dir / f"inprocess-{uuid.uuid4().hex[:8]}"
        session_dir.mkdir(parents=True)
        await self._engine.start_profile(session_dir, ProfileOptions(label="bench"))
        self._session_dir = session_dir

    async def stop_profile(self) -> ProfileStop:
        assert self._session_dir is not None, "start_profile first"
        started = time.perf_counter()
        moved: list[Path] = await self._engine.stop_profile(self._session_dir)
        wall = time.perf_counter() - started
        self._session_dir = None
        return ProfileStop(wall_s=wall, inside_stage_s=None, files=_file_sizes(moved))


def _file_sizes(paths: list[Path]) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in paths if path.is_file()}


# -- measurement -------------------------------------------------------------------------------


@dataclass(frozen=True)
class RequestSample:
    ttft_s: float  # seen by the caller: from the call to the first delta with tokens
    duration_s: float
    tokens: int
    engine_ttft_s: float  # what the engine adapter reported in the final delta's metrics


@dataclass(frozen=True)
class RoundResult:
    wall_s: float
    samples: list[RequestSample]

    @property
    def tokens(self) -> int:
        return sum(sample.tokens for sample in self.samples)


def bench_request(settings: BenchSettings, index: int) -> GenerateInput:
    return make_request(
        prompt=PROMPTS[index % len(PROMPTS)],
        max_tokens=settings.max_tokens,
        ignore_eos=settings.ignore_eos,
        temperature=settings.temperature,
    )


async def timed_request(target: Target, request: GenerateInput) -> RequestSample:
    started = time.perf_counter()
    first = 0.0
    tokens = 0
    engine_ttft = 0.0
    async for delta in target.generate(request):
        if delta.token_ids and not first:
            first = time.perf_counter()
        tokens += len(delta.token_ids)
        if delta.metrics is not None:
            engine_ttft = delta.metrics.time_to_first_token_s
    ended = time.perf_counter()
    ttft = (first - started) if first else math.nan
    return RequestSample(ttft, ended - started, tokens, engine_ttft)


async def run_round(
    target: Target, settings: BenchSettings, concurrency: int, round_index: int
) -> RoundResult:
    first = round_index * concurrency
    requests = [bench_request(settings, first + i) for i in range(concurrency)]
    started = time.perf_counter()
    samples = await asyncio.gather(*(timed_request(target, r) for r in requests))
    return RoundResult(time.perf_counter() - started, list(samples))


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(v for v in values if not math.isnan(v))
    if not ordered:
        return math.nan
    k = (len(ordered) - 1) * q / 100
    low = math.floor(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def summarize_level(concurrency: int, rounds: list[RoundResult]) -> dict[str, Any]:
    rates = [r.tokens / r.wall_s for r in rounds]
    samples = [s for r in rounds for s in r.samples]
    ttfts = [s.ttft_s * 1000 for s in samples]
    engine_ttfts = [s.engine_ttft_s * 1000 for s in samples]
    return {
        "concurrency": concurrency,
        "rounds": len(rounds),
        "requests": len(samples),
        "output_tokens": sum(r.tokens for r in rounds),
        "tok_s_median": statistics.median(rates),
        "tok_s_min": min(rates),
        "tok_s_max": max(rates),
        "tok_s_pooled": sum(r.tokens for r in rounds) / sum(r.wall_s for r in rounds),
        "ttft_ms_p50": percentile(ttfts, 50),
        "ttft_ms_p90": percentile(ttfts, 90),
        "engine_ttft_ms_p50": percentile(engine_ttfts, 50),
        "engine_ttft_ms_p90": percentile(engine_ttfts, 90),
        "round_wall_s": [r.wall_s for r in rounds],
        "tokens_per_request": sorted({s.tokens for s in samples}),
    }


async def measure_generate(target: Target, settings: BenchSettings, path: str) -> dict[str, Any]:
    for i in range(settings.warmup_requests):
        await timed_request(target, bench_request(settings, i))
    progress(f"{path}: warm-up done")
    levels = {}
    for concurrency, count in settings.rounds.items():
        rounds = []
        for index in range(count):
            rounds.append(await run_round(target, settings, concurrency, index))
            rate = rounds[-1].tokens / rounds[-1].wall_s
            progress(f"{path}: c={concurrency} round {index + 1}/{count}: {rate:.1f} tok/s")
        levels[str(concurrency)] = summarize_level(concurrency, rounds)
    return levels


async def measure_profile(target: Target, settings: BenchSettings, path: str) -> dict[str, Any]:
    stops = []
    for index in range(settings.profile_repeats):
        await target.start_profile()
        await run_round(target, settings, settings.profile_requests, 0)
        progress(f"{path}: profile {index + 1}/{settings.profile_repeats}: stopping")
        stop = await target.stop_profile()
        progress(
            f"{path}: profile stopped in {stop.wall_s:.1f} s, trace {stop.trace_bytes:,} bytes"
        )
        stops.append(stop)
    return summarize_profile(stops)


def summarize_profile(stops: list[ProfileStop]) -> dict[str, Any]:
    inside = [s.inside_stage_s for s in stops if s.inside_stage_s is not None]
    overhead = [s.wall_s - s.inside_stage_s for s in stops if s.inside_stage_s is not None]
    return {
        "repeats": len(stops),
        "stop_wall_s_median": statistics.median(s.wall_s for s in stops),
        "stop_wall_s": [s.wall_s for s in stops],
        "stop_inside_stage_s_median": statistics.median(inside) if inside else None,
        "stop_inside_stage_s": inside,
        "stop_outside_engine_s_median": statistics.median(overhead) if overhead else None,
        "trace_bytes_median": statistics.median(s.trace_bytes for s in stops),
        "files": [s.files for s in stops],
    }


async def measure_target(target: Target, settings: BenchSettings, path: str) -> dict[str, Any]:
    generate = await measure_generate(target, settings, path)
    profile = await measure_profile(target, settings, path)
    return {"generate": generate, "profile": profile}


# -- running each path -------------------------------------------------------------------------


async def run_grpc_path(settings: BenchSettings, workdir: Path, log_path: Path) -> dict[str, Any]:
    args = stage_args(
        name=STAGE_NAME,
        model=settings.model,
        profiler_config=profiler_config(workdir / "grpc-profiles"),
        extra=stage_cli_flags(settings),
    )
    progress(f"grpc: starting `omnistage stage serve` (log: {log_path})")
    started = time.perf_counter()
    server = ServerProcess(f"stage {STAGE_NAME!r}", args, log_path=log_path)
    try:
        address = await asyncio.to_thread(
            server.wait_serving, progress=lambda s, t: progress(f"grpc: {s} after {t:.0f} s")
        )
        ready_s = time.perf_counter() - started
        progress(f"grpc: SERVING at {address} after {ready_s:.1f} s")
        async with AsyncStageClient(address) as client:
            result = await measure_target(GrpcTarget(client), settings, "grpc")
        return {"engine_ready_s": ready_s, **result}
    finally:
        progress("grpc: stopping the stage process (SIGTERM)")
        stopping = time.perf_counter()
        code = await asyncio.to_thread(server.stop)
        progress(f"grpc: stage exited with code {code} in {time.perf_counter() - stopping:.1f} s")


async def run_inprocess_path(settings: BenchSettings, workdir: Path) -> dict[str, Any]:
    from services.config import ProfilerSettings, StageConfig
    from services.engines.vllm_engine import VllmEngine

    profiler_dir = workdir / "inprocess-profiles"
    config = StageConfig(
        name=STAGE_NAME,
        model=settings.model,
        profiler=ProfilerSettings.model_validate(profiler_config(profiler_dir)),
        dtype=settings.dtype,
        max_model_len=settings.max_model_len,
        max_num_seqs=settings.max_num_seqs,
        kv_cache_gib=settings.kv_cache_gib,
        enforce_eager=settings.enforce_eager,
    )
    engine = VllmEngine(config)
    progress("inprocess: starting VllmEngine in this process")
    started = time.perf_counter()
    try:
        await engine.start()
        ready_s = time.perf_counter() - started
        progress(f"inprocess: engine ready after {ready_s:.1f} s")
        target = InProcessTarget(engine, profiler_dir)
        result = await measure_target(target, settings, "inprocess")
        return {"engine_ready_s": ready_s, **result}
    finally:
        progress("inprocess: closing the engine")
        closing = time.perf_counter()
        await engine.close()
        progress(f"inprocess: engine closed in {time.perf_counter() - closing:.1f} s")


async def run_paths(settings: BenchSettings, log_path: Path, results: dict[str, Any]) -> None:
    """Fill `results` path by path, so a failure still leaves what was measured."""
    with tempfile.TemporaryDirectory(prefix="omnistage-bench-") as tmp:
        workdir = Path(tmp)
        for path in settings.order:
            first_sample = len(_LOAD_SAMPLES)
            progress(f"{path}: starting")
            if path == "grpc":
                results[path] = await run_grpc_path(settings, workdir, log_path)
            else:
                results[path] = await run_inprocess_path(settings, workdir)
            progress(f"{path}: done")
            samples = _LOAD_SAMPLES[first_sample:]
            results[path]["loadavg_1min"] = {"first": samples[0], "max": max(samples)}


# -- machine, versions, report -----------------------------------------------------------------


def versions() -> dict[str, str]:
    import grpc
    import torch
    import vllm

    import omnistage

    return {
        "python": sys.version.split()[0],
        "vllm": str(vllm.__version__),
        "torch": str(torch.__version__),
        "grpcio": str(grpc.__version__),
        "omnistage": str(omnistage.__version__),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def table_rows(results: dict[str, Any], settings: BenchSettings) -> list[dict[str, Any]]:
    """One row per metric: its label, both paths' values, their ratio and the number format."""
    rows: list[tuple[str, Callable[[dict[str, Any]], Any], str]] = []
    for c in settings.rounds:
        getter = _get("generate", str(c), "tok_s_median")
        rows.append((f"output tok/s, c={c} (median)", getter, ".1f"))
    for c in settings.rounds:
        for q in ("p50", "p90"):
            getter = _get("generate", str(c), f"ttft_ms_{q}")
            rows.append((f"TTFT {q} ms, c={c} (caller)", getter, ".1f"))
    for c in settings.rounds:
        getter = _get("generate", str(c), "engine_ttft_ms_p50")
        rows.append((f"TTFT p50 ms, c={c} (engine)", getter, ".1f"))
    rows.append(("engine ready s", _get("engine_ready_s"), ".1f"))
    rows.append(("StopProfile wall s (median)", _get("profile", "stop_wall_s_median"), ".2f"))
    inside = _get("profile", "stop_inside_stage_s_median")
    rows.append(("StopProfile inside stage s (median)", inside, ".2f"))
    outside = _get("profile", "stop_outside_engine_s_median")
    rows.append(("StopProfile wall - inside stage s", outside, ".3f"))
    rows.append(("trace bytes (median)", _get("profile", "trace_bytes_median"), ",.0f"))
    return [_row(label, getter, fmt, results) for label, getter, fmt in rows]


def _get(*keys: str) -> Callable[[dict[str, Any]], Any]:
    def getter(data: dict[str, Any]) -> Any:
        for key in keys:
            if not isinstance(data, dict) or key not in data:
                return None
            data = data[key]
        return data

    return getter


def _row(
    label: str, getter: Callable[[dict[str, Any]], Any], fmt: str, results: dict[str, Any]
) -> dict[str, Any]:
    grpc_value = getter(results.get("grpc", {}))
    local_value = getter(results.get("inprocess", {}))
    return {
        "metric": label,
        "grpc": grpc_value,
        "inprocess": local_value,
        "ratio_grpc_over_inprocess": ratio(grpc_value, local_value),
        "format": fmt,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    header = ("metric", "gRPC", "in-process", "gRPC/in-proc")
    lines = [header]
    for row in rows:
        lines.append(
            (
                row["metric"],
                _fmt(row["grpc"], row["format"]),
                _fmt(row["inprocess"], row["format"]),
                _fmt(row["ratio_grpc_over_inprocess"], ".3f"),
            )
        )
    return align_table(lines)


def _fmt(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def headline(report: dict[str, Any]) -> str:
    m, s, v = report["machine"], report["settings"], report["versions"]
    return (
        f"stage overhead: model {s['model']} ({s['dtype']}, "
        f"{'eager' if s['enforce_eager'] else 'compiled'}), max_tokens {s['max_tokens']}, "
        f"ignore_eos {s['ignore_eos']}, temperature {s['temperature']}\n"
        f"machine: {m['nproc']} CPUs, {m['cpu_model']}, {m['ram_total_gib']} GiB RAM; "
        f"load {m['loadavg'][0]:.2f} before, {report['loadavg_after'][0]:.2f} after\n"
        f"versions: vllm {v['vllm']}, torch {v['torch']}, grpcio {v['grpcio']}, "
        f"omnistage {v['omnistage']}; run took {report['duration_s']:.0f} s"
    )


def resolved_profiler_settings() -> dict[str, Any]:
    """The profiler settings both paths get, vLLM's defaults filled in (the folder varies)."""
    from services.config import ProfilerSettings

    config = profiler_config(Path("<temporary folder>"))
    settings = ProfilerSettings.model_validate(config).model_dump()
    return {**settings, "torch_profiler_dir": config["torch_profiler_dir"]}


def load_warnings(results: dict[str, Any], nproc: int) -> list[str]:
    """A line per path whose load average rose past the CPU count: other work shared the CPUs."""
    lines = []
    for path, result in results.items():
        peak = result.get("loadavg_1min", {}).get("max", 0.0)
        if peak > nproc:
            lines.append(
                f"warning: {path}: the 1-min load average reached {peak:.1f} on {nproc} CPUs; "
                "other processes shared the CPUs, so its numbers are not comparable"
            )
    return lines


def write_report(out: Path, report: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")


# -- entry -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer rounds, 32 tokens (5 min)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the JSON report")
    parser.add_argument("--max-tokens", type=int, default=0, help="override (64; quick 32)")
    parser.add_argument(
        "--profile-repeats", type=int, default=1, help="profile sessions per path (default 1)"
    )
    parser.add_argument(
        "--order",
        choices=("grpc-first", "inprocess-first"),
        default="grpc-first",
        help="which path runs first",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = settings_from_args(args)
    out: Path = args.out.resolve()
    report: dict[str, Any] = {
        "benchmark": "stage_overhead",
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": [sys.executable, *sys.argv],
        "machine": machine_info(),
        "versions": versions(),
        "settings": {**asdict(settings), "prompts": list(PROMPTS)},
        "profiler_settings": resolved_profiler_settings(),
    }
    results: dict[str, Any] = {}
    started = time.perf_counter()
    error: BaseException | None = None
    try:
        asyncio.run(run_paths(settings, out.with_suffix(".stage.log"), results))
    except BaseException as exc:
        error = exc
        report["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        report["duration_s"] = time.perf_counter() - started
        report["loadavg_after"] = list(os.getloadavg())
        report["results"] = results
        report["table"] = table_rows(results, settings)
        write_report(out, report)
        if error is None:
            print(headline(report))
            print(format_table(report["table"]))
            for line in load_warnings(results, report["machine"]["nproc"]):
                print(line)
        print(f"JSON: {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
