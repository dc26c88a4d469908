"""Record a profile of all three stages of the bundled omni pipeline, for `report_build.py`.

    .venv/bin/python bench/omni_profile.py [--requests 4] [--stack-stages thinker,...] [--out DIR]

It copies `examples/omni/pipeline.yaml` into DIR (default `bench/results/omni-profile/`),
moves its ports off the demo's (5017x instead of 5007x) and points every stage's profiler
there, starts the pipeline as `omnistage up` does, profiles thinker, talker and code2wav
around a few requests (two at a time), and stops without slimming. It prints the session
folder, which `bench/report_build.py` takes:

    .venv/bin/python bench/report_build.py "$(.venv/bin/python bench/omni_profile.py)"

`--stack-stages` names the stages that record Python stacks too (vLLM's
`torch_profiler_with_stack`), which is where vLLM's idle loops show up and what the slimming
patterns drop. Stacks cost memory at stop: on 2 cores, the talker's 4 x 96 steps with stacks
took more than 12 GB in its profiler and over 5 minutes without finishing, so the default
run leaves them off.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

import omnistage
from omnistage.up import launch_pipeline, stop_all

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "examples" / "omni" / "pipeline.yaml"
DEFAULT_OUT = ROOT / "bench" / "results" / "omni-profile"
STAGES = {"thinker", "talker", "code2wav"}
PORT_SHIFT = 100  # 50070-50073 (the demo's) become 50170-50173
PROMPTS = [
    "What is the capital of France?",
    "Name one planet and one fact about it.",
    "Why is the sky blue?",
    "Write one sentence about the sea.",
]


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_pipeline(out: Path, stack_stages: set[str]) -> Path:
    """The omni pipeline file, rewritten for this run, in `out`."""
    spec: dict[str, Any] = yaml.safe_load(PIPELINE.read_text())
    launch = spec["launch"]
    launch["orchestrator_port"] += PORT_SHIFT
    launch["profile_dir"] = str(out / "profiles")
    for name, stage in launch["stages"].items():
        stage["port"] += PORT_SHIFT
        folder = PIPELINE.parent / str(stage["model"])
        if stage["engine"] == "vllm" and folder.is_dir():
            stage["model"] = str(folder)  # the talker's config folder, beside the original
        stage["profiler_config"]["torch_profiler_dir"] = str(out / "stages" / name)
        stage["profiler_config"]["torch_profiler_with_stack"] = name in stack_stages
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


async def one_request(client: omnistage.AsyncClient, prompt: str) -> int:
    """Send one prompt through all three stages; return the audio samples received."""
    samples = 0
    async for out in client.generate(messages=[{"role": "user", "content": prompt}]):
        if out.tensor is not None and out.tensor.shape:
            samples += out.tensor.shape[-1]
    return samples


async def profile(address: str, requests: int) -> str:
    """Warm up, profile every stage around `requests` requests (two at a time), stop."""
    client = omnistage.AsyncClient(address)
    try:
        await one_request(client, PROMPTS[0])  # warm-up, not profiled
        session = await client.start_profile(label="report-bench")
        say(f"profiling thinker, talker and code2wav: session {session}")
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(requests)]
        samples = []
        for pair in range(0, len(prompts), 2):
            batch = prompts[pair : pair + 2]
            samples += await asyncio.gather(*(one_request(client, p) for p in batch))
        say(f"{len(samples)} requests, {sum(samples):,} audio samples; stopping")
        started = time.monotonic()
        report = await client.stop_profile()
        say(f"StopProfile took {time.monotonic() - started:.1f} s")
    finally:
        await client.close()
    failed = [s.stage for s in report.stages if not s.ok]
    if failed:
        raise SystemExit(f"stages that failed: {failed}")
    return str(report.output_dir)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=4, help="requests while profiling")
    parser.add_argument(
        "--stack-stages",
        default="",
        help="comma-separated stages that record Python stacks too (default: none)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    stack_stages = {name.strip() for name in args.stack_stages.split(",") if name.strip()}
    unknown = stack_stages - STAGES
    if unknown:
        parser.error(f"--stack-stages names no stage of the omni pipeline: {sorted(unknown)}")
    os.chdir(ROOT)  # the pipeline's processors and code2wav import as `examples.omni...`
    pipeline = bench_pipeline(args.out.resolve(), stack_stages)
    say(f"starting the omni pipeline from {pipeline}")
    # Only the session folder goes to stdout, so `report_build.py "$(omni_profile.py)"` works.
    with contextlib.redirect_stdout(sys.stderr):
        processes = launch_pipeline(pipeline, log_dir=args.out.resolve() / "logs")
        try:
            session = asyncio.run(profile(processes[-1].address, args.requests))
        finally:
            stop_all(processes)
    print(session)
    return 0


if __name__ == "__main__":
    sys.exit(main())
