"""Profile results to a remote caller: download speed and the cost of `profile stop --download`.

    .venv/bin/python bench/session_download.py [--size-mb 100] [--rounds 3] [--out FILE.json]

Two parts, side by side in one run, as ratios:

1. **Download** of a 100 MB session (`--size-mb`, four stage files of random bytes and a
   report) that sits in a real orchestrator's profile root: `Client.fetch_session` over
   loopback gRPC (sha256 checked, `.part` then rename), against `shutil.copytree` of the same
   folder, the floor. The first fetch lists the session cold (the orchestrator hashes every
   file once and then caches); later rounds list it warm.
2. **Stop and download** of a two-stage session (the omni example's code2wav and the tests'
   audio encoder, real torch stages; `--requests` requests profiled): `stop_profile(
   download_to=...)` (the streamed stop, then the download), against a unary `StopProfile`
   plus `shutil.copytree` of the session it collected. The two alternate, `--rounds` times.

Goals (issue "Profile results reach the caller"): download ≥ 200 MB/s, and stop+download ≤
1.1x StopProfile + copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_machine import align_table, machine_info

import omnistage
from omnistage.launch import ServerProcess, stage_args
from omnistage.types import StopProgress

ROOT = Path(__file__).resolve().parent.parent

DEFAULT_OUT = ROOT / "bench" / "results" / "session_download.json"
CODES = list(range(0, 1000, 10))  # 100 codes: two seconds of audio per request
STAGE_OPTIONS = json.dumps({"max_batch_size": 4, "max_wait_ms": 2, "num_threads": 1})


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


EDGES = {
    "torch": "{processor: 'tests.encoder:audio_in'}",
    "vllm": "{processor: text, template: 'Rewrite formally: {text}'}",
}
STAGES = {
    "torch": {"code2wav": "examples.omni.code2wav:build", "encoder": "tests.encoder:build"},
    "vllm": {"thinker": "smollm2", "rewriter": "smollm2"},
}


def orchestrator(
    tmp: Path, stages: dict[str, str], name: str, edge: str = EDGES["torch"]
) -> ServerProcess:
    lines = [f"name: {name}", "outputs: final", "stages:"]
    for index, (stage, address) in enumerate(stages.items()):
        lines += [f"  - name: {stage}", f"    address: {address}"]
        if index:
            lines += [f"    input: {edge}"]
    pipeline = tmp / f"{name}.yaml"
    pipeline.write_text("\n".join(lines) + "\n")
    args = ["orchestrator", "serve", "--pipeline", str(pipeline), "--port", "0"]
    args += ["--host", "127.0.0.1", "--profile-dir", str(tmp / f"{name}-root")]
    args += ["--profile-max-sessions", "0", "--profile-max-bytes", "0"]
    process = ServerProcess(f"orchestrator {name}", args, log_path=tmp / f"{name}.log")
    process.wait_serving(timeout=60)
    return process


def plant_session(root: Path, size_mb: int) -> str:
    """A collected-looking session of `size_mb` MB of random bytes under the profile root."""
    session = "20261201T000000Z-download-bench-000001"
    folder = root / "bench" / session
    for stage in ("thinker", "talker"):
        for part in range(2):
            path = folder / stage / f"rank0.{part}.pt.trace.json.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(size_mb * (1 << 20) // 4))
    (folder / "report.json").write_text(json.dumps({"session_id": session}))
    return session


def download_part(tmp: Path, size_mb: int, rounds: int) -> dict[str, Any]:
    process = orchestrator(tmp, {"ghost": "127.0.0.1:1"}, "download")
    try:
        session = plant_session(tmp / "download-root", size_mb)
        source = tmp / "download-root" / "bench" / session
        size = folder_bytes(source)
        rows = []
        with omnistage.Client(process.address) as client:
            for index in range(rounds):
                dest = tmp / f"fetched-{index}"
                fetch_s, _ = timed(lambda dest=dest: client.fetch_session(session, dest))
                copy_s, _ = timed(lambda i=index: shutil.copytree(source, tmp / f"copied-{i}"))
                assert folder_bytes(dest / session) == size
                rows.append({"round": index, "fetch_s": fetch_s, "copy_s": copy_s})
                shutil.rmtree(dest)
                shutil.rmtree(tmp / f"copied-{index}")
    finally:
        process.stop()
    warm = rows[1:] or rows
    fetch_s = statistics.median(r["fetch_s"] for r in warm)
    copy_s = statistics.median(r["copy_s"] for r in warm)
    return {
        "bytes": size,
        "rounds": rows,
        "cold_fetch_s": rows[0]["fetch_s"],
        "fetch_s": fetch_s,
        "copy_s": copy_s,
        "fetch_mb_s": size / fetch_s / 1e6,
        "cold_fetch_mb_s": size / rows[0]["fetch_s"] / 1e6,
        "copy_mb_s": size / copy_s / 1e6,
    }


def stop_part(tmp: Path, engine: str, requests: int, rounds: int) -> dict[str, Any]:
    stages = {}
    for name, model in STAGES[engine].items():
        profiler = {
            "profiler": "torch",
            "torch_profiler_dir": str(tmp / f"{name}-stage"),
            "torch_profiler_with_stack": False,
        }
        args = stage_args(name=name, engine=engine, model=model, profiler_config=profiler)
        if engine == "torch":
            args += ["--engine-options", STAGE_OPTIONS]
        stages[name] = ServerProcess(name, args, log_path=tmp / f"{name}.log")
    if engine == "torch":
        request: dict[str, Any] = {"token_ids": CODES}
    else:
        request = {"prompt": "Name a planet.", "max_tokens": 16, "ignore_eos": True}
    try:
        addresses = {name: p.wait_serving(timeout=300) for name, p in stages.items()}
        process = orchestrator(tmp, addresses, f"stop-{engine}", EDGES[engine])
        rows = []
        try:
            with omnistage.Client(process.address) as client:
                list(client.generate(timeout=120, **request))  # warm-up
                for index in range(rounds):
                    modes = ("stop+copy", "stop --download")
                    for mode in modes if index % 2 == 0 else modes[::-1]:  # ABBA: no order bias
                        client.start_profile(label=mode.replace(" ", "").replace("+", "-"))
                        for _ in range(requests):
                            list(client.generate(timeout=120, **request))
                        dest = tmp / f"{engine}-{mode.split()[0]}-{index}-{len(rows)}"
                        marks: list[float] = []

                        def mark(event: StopProgress, marks: list[float] = marks) -> None:
                            if event.phase == "done":
                                marks.append(time.perf_counter())

                        started = time.perf_counter()
                        if mode == "stop+copy":
                            report = client.stop_profile()
                            marks.append(time.perf_counter())
                            shutil.copytree(report.output_dir, dest)
                        else:
                            report = client.stop_profile(download_to=dest, progress=mark)
                        total = time.perf_counter() - started
                        assert not report.failed, report.failed
                        rows.append(
                            {
                                "round": index,
                                "mode": mode,
                                "seconds": total,
                                "stop_s": marks[0] - started,
                                "copy_s": total - (marks[0] - started),
                                "bytes": folder_bytes(Path(report.output_dir)),
                            }
                        )
                        stop_s = marks[0] - started
                        say(
                            f"{engine} round {index} {mode}: {total:.3f} s "
                            f"(stop {stop_s:.3f} s, then {total - stop_s:.3f} s)"
                        )
        finally:
            process.stop()
    finally:
        for stage in stages.values():
            stage.stop()
    baseline = statistics.median(r["seconds"] for r in rows if r["mode"] == "stop+copy")
    download = statistics.median(r["seconds"] for r in rows if r["mode"] == "stop --download")
    return {
        "engine": engine,
        "requests": requests,
        "rounds": rows,
        "stop_copy_s": baseline,
        "stop_download_s": download,
        "ratio": download / baseline,
        "session_bytes": statistics.median(r["bytes"] for r in rows),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=100, help="the planted session's size")
    parser.add_argument("--rounds", type=int, default=4, help="of each part, per engine")
    parser.add_argument("--requests", type=int, default=4, help="requests per profiled session")
    parser.add_argument(
        "--engines", default="torch,vllm", help="part 2's stages: torch, vllm or both"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    engines = [e for e in args.engines.split(",") if e]
    unknown = set(engines) - set(STAGES)
    if unknown:
        parser.error(f"--engines: unknown {sorted(unknown)}; choose from torch, vllm")
    os.chdir(ROOT)  # the stages import examples.omni.code2wav and tests.encoder
    with tempfile.TemporaryDirectory(prefix="omnistage-download-") as tmp_name:
        tmp = Path(tmp_name)
        say(f"part 1: downloading a {args.size_mb} MB session, {args.rounds} rounds")
        download = download_part(tmp, args.size_mb, args.rounds)
        stops = []
        for engine in engines:
            say(f"part 2: stop --download against StopProfile + copy, two {engine} stages")
            stops.append(stop_part(tmp, engine, args.requests, args.rounds))
    result = {"machine": machine_info(), "download": download, "stop": stops}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    rows = [
        ("measure", "omnistage", "floor", "ratio", "goal"),
        (
            f"download {download['bytes'] / 1e6:.0f} MB (warm listing)",
            f"{download['fetch_mb_s']:.0f} MB/s",
            f"copy {download['copy_mb_s']:.0f} MB/s",
            f"{download['copy_s'] / download['fetch_s']:.2f}x",
            "≥ 200 MB/s",
        ),
        ("download, first (cold listing)", f"{download['cold_fetch_mb_s']:.0f} MB/s", "", "", ""),
    ]
    for stop in stops:
        rows.append(
            (
                f"stop --download, {stop['engine']} ({stop['session_bytes'] / 1e6:.1f} MB)",
                f"{stop['stop_download_s']:.2f} s",
                f"stop+copy {stop['stop_copy_s']:.2f} s",
                f"{stop['ratio']:.2f}x",
                "≤ 1.10x",
            )
        )
    print(align_table(rows))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
