"""Time to first audio on the omni pipeline: streamed hand-offs of several chunk sizes against
waiting for the talker, and what bounded each one's first audio.

The omni pipeline's stages are launched once (`examples/omni/pipeline.yaml`, as `omnistage up`
does), with one orchestrator per hand-off mode over them, each built from the same file:

* `wait`: no `stream_chunk`; code2wav waits for the talker's finished output;
* `stream<N>`: code2wav starts on every N talker codes while the talker generates (the file's
  own N, a large one and a small one);
* `stream<M>+<N>`: a first chunk of M codes (`stream_first_chunk`), then N at a time.

The same prompts go through every mode, in an order that alternates each round, one request at
a time. "after talker start" (first audio minus the talker's first token) isolates the
hand-off from the thinker's time, which varies by prompt. Each orchestrator also runs a
timing-only profile session over its measured requests (no stage profiler runs); its report's
critical paths say which stage, and which kind of time, bounded each request's first audio.

    .venv/bin/python bench/handoff.py [--rounds N] [--modes wait,stream24,...] [--out FILE.json]

Every number printed is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from bench_machine import machine_info

import omnistage
from omnistage.launch import ServerProcess
from omnistage.traces.critical import shares
from omnistage.types import ProfileReport
from omnistage.up import launch_pipeline, stop_all
from orchestrator.config import load_pipeline

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "examples" / "omni" / "pipeline.yaml"
DEFAULT_OUT = ROOT / "bench" / "results" / "handoff.json"
PROMPTS = [
    "What is the capital of France?",
    "Name one planet and one fact about it.",
    "Why is the sky blue?",
    "Write one sentence about the sea.",
]


@dataclass(frozen=True)
class Run:
    mode: str
    prompt: str
    first_audio_s: float
    talker_first_s: float
    talker_done_s: float
    total_s: float
    codes: int
    audio_s: float
    server_first_output_s: float


def say(message: str) -> None:
    print(message, flush=True)


def parse_mode(mode: str) -> tuple[int | None, int | None]:
    """`wait` -> (None, None); `stream24` -> (24, None); `stream4+24` -> (24, 4)."""
    if mode == "wait":
        return None, None
    match = re.fullmatch(r"stream(\d+)(?:\+(\d+))?", mode)
    if not match:
        raise SystemExit(f"unknown mode {mode!r}: use wait, stream<N> or stream<M>+<N>")
    if match.group(2):
        return int(match.group(2)), int(match.group(1))
    return int(match.group(1)), None


def mode_pipeline(folder: Path, mode: str, thinker_tokens: int | None = None) -> Path:
    """The omni pipeline file with code2wav's hand-off set by `mode` (and the thinker's
    max_tokens by `thinker_tokens`), without launch, its stages at their launch ports."""
    chunk, first = parse_mode(mode)
    config = load_pipeline(PIPELINE)
    data = config.model_dump(mode="json", exclude={"launch"}, exclude_none=True)
    data["name"] = f"omni-{mode}"
    if thinker_tokens is not None:
        data["stages"][0].setdefault("sampling", {})["max_tokens"] = thinker_tokens
    edge = data["stages"][-1]["input"]
    edge.pop("stream_chunk", None)
    edge.pop("stream_first_chunk", None)
    if chunk is not None:
        edge["stream_chunk"] = chunk
    if first is not None:
        edge["stream_first_chunk"] = first
    path = folder / f"omni-{mode}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def first_audio_bounds(report: ProfileReport) -> dict[str, Any]:
    """From a timing-only session's report: the median share of the time to first audio per
    stage and per (stage, kind), and the (stage, kind) with the largest median."""
    paths = report.critical_paths
    by_stage = {
        k[0]: statistics.median(v) for k, v in shares(paths, first=True, by="stage").items()
    }
    both = {f"{k[0]}/{k[1]}": statistics.median(v) for k, v in shares(paths, first=True).items()}
    bound = max(both.items(), key=lambda item: item[1]) if both else ("", 0.0)
    return {
        "requests": len(paths),
        "share_by_stage": by_stage,
        "share_by_stage_and_kind": both,
        "bound_by": bound[0],
        "bound_share": bound[1],
    }


def measure(client: omnistage.Client, mode: str, prompt: str) -> Run:
    sent = time.monotonic()
    first_audio = talker_first = talker_done = 0.0
    codes = samples = 0
    server_first = 0.0
    for out in client.generate(messages=[{"role": "user", "content": prompt}]):
        now = time.monotonic() - sent
        if out.stage == "talker":
            codes += len(out.token_ids)
            talker_first = talker_first or now
            talker_done = now if out.finished else talker_done
        elif out.stage == "code2wav" and out.tensor is not None:
            first_audio = first_audio or now
            samples += out.tensor.shape[-1]
        if out.stage == "code2wav" and out.finished and out.metrics is not None:
            server_first = out.metrics.time_to_first_output_s
    if not codes or not first_audio:
        # a zero here would pass for the fastest run in the medians
        raise SystemExit(f"{mode}: {prompt!r} gave {codes} codes and no audio; see the logs")
    return Run(
        mode=mode,
        prompt=prompt,
        first_audio_s=first_audio,
        talker_first_s=talker_first,
        talker_done_s=talker_done,
        total_s=time.monotonic() - sent,
        codes=codes,
        audio_s=samples / 24_000,
        server_first_output_s=server_first,
    )


def summarize(runs: list[Run]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in sorted({r.mode for r in runs}):
        mine = [r for r in runs if r.mode == mode]
        out[mode] = {
            "runs": len(mine),
            "first_audio_p50_s": statistics.median(r.first_audio_s for r in mine),
            "first_audio_min_s": min(r.first_audio_s for r in mine),
            "first_audio_max_s": max(r.first_audio_s for r in mine),
            "after_talker_start_p50_s": statistics.median(
                r.first_audio_s - r.talker_first_s for r in mine
            ),
            "talker_done_p50_s": statistics.median(r.talker_done_s for r in mine),
            "total_p50_s": statistics.median(r.total_s for r in mine),
            "audio_s_p50": statistics.median(r.audio_s for r in mine),
        }
    return out


def table(summary: dict[str, Any], bounds: dict[str, dict[str, Any]]) -> str:
    wait = summary.get("wait", {}).get("first_audio_p50_s")
    lines = [
        f"{'mode':<11} {'runs':>4} {'first audio p50':>16} {'(min-max)':>14} {'/ wait':>7} "
        f"{'after talker start':>19} {'talker done':>12} {'total':>7} {'audio':>7}  "
        "first audio bound by (median share)"
    ]
    for mode, s in summary.items():
        ratio = f"{s['first_audio_p50_s'] / wait:>6.2f}x" if wait else f"{'-':>7}"
        bound = bounds.get(mode, {})
        lines.append(
            f"{mode:<11} {s['runs']:>4} {s['first_audio_p50_s']:>14.2f} s "
            f"{s['first_audio_min_s']:>6.2f}-{s['first_audio_max_s']:<5.2f} s {ratio} "
            f"{s['after_talker_start_p50_s']:>17.2f} s {s['talker_done_p50_s']:>10.2f} s "
            f"{s['total_p50_s']:>5.2f} s {s['audio_s_p50']:>5.2f} s  "
            f"{bound.get('bound_by', '-')} ({100 * bound.get('bound_share', 0.0):.0f}%)"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="requests per mode")
    parser.add_argument(
        "--modes",
        default="",
        help="comma-separated: wait, stream<N>, stream<M>+<N> (default: wait, the file's "
        "stream_chunk, stream48, stream2 and stream2+<the file's>)",
    )
    parser.add_argument(
        "--thinker-tokens",
        type=int,
        default=None,
        help="the thinker's max_tokens in every mode (default: the file's); a short answer "
        "makes the talker's time the larger part of first audio",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    config = load_pipeline(PIPELINE)
    chunk = config.stages[-1].input.stream_chunk
    modes = [m for m in args.modes.split(",") if m] or [
        "wait", f"stream{chunk}", "stream48", "stream2", f"stream2+{chunk}"
    ]  # fmt: skip
    for mode in modes:
        parse_mode(mode)
    load_before = os.getloadavg()
    bounds: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="handoff-") as tmp:
        folder = Path(tmp)
        say(f"==> launching {PIPELINE.relative_to(ROOT)}'s stages, and {len(modes)} orchestrators")
        processes = launch_pipeline(PIPELINE, port=0, log_dir=folder / "logs")
        orchestrators = {
            mode: ServerProcess(
                f"orchestrator omni-{mode}",
                [
                    "orchestrator",
                    "serve",
                    "--pipeline",
                    str(mode_pipeline(folder, mode, args.thinker_tokens)),
                    "--port",
                    "0",
                    "--profile-dir",
                    str(folder / "profiles" / mode),
                ],
                log_path=folder / "logs" / f"{mode}.log",
            )
            for mode in modes
        }
        runs: list[Run] = []
        try:
            for orchestrator in orchestrators.values():
                orchestrator.wait_serving(timeout=60)
            clients = {m: omnistage.Client(o.address) for m, o in orchestrators.items()}
            say("==> warm-up: one request per mode (not measured)")
            for mode, client in clients.items():
                measure(client, mode, PROMPTS[0])
            for client in clients.values():
                client.start_profile(timing_only=True, label="handoff")
            for number in range(args.rounds):
                prompt = PROMPTS[number % len(PROMPTS)]
                order = list(clients.items())
                for mode, client in order if number % 2 == 0 else reversed(order):
                    run = measure(client, mode, prompt)
                    runs.append(run)
                    say(
                        f"    {mode:<11} first audio {run.first_audio_s:5.2f} s, talker done "
                        f"{run.talker_done_s:5.2f} s, total {run.total_s:5.2f} s, {run.codes} codes"
                    )
            for mode, client in clients.items():
                bounds[mode] = first_audio_bounds(client.stop_profile())
                client.close()
        finally:
            for orchestrator in orchestrators.values():
                orchestrator.stop()
            stop_all(processes)
    summary = summarize(runs)
    say("\n" + table(summary, bounds))
    settings = {
        "pipeline": str(PIPELINE.relative_to(ROOT)),
        "stream_chunk": chunk,
        "modes": modes,
        "thinker_max_tokens": args.thinker_tokens,
        "stages": {
            s.name: {"sampling": s.sampling.model_dump(exclude_none=True)} for s in config.stages
        },
        "rounds": args.rounds,
        "concurrency": 1,
        "prompts": PROMPTS,
    }
    result = {
        "benchmark": "handoff",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            **machine_info(),
            "load_average_before": [round(v, 2) for v in load_before],
            "load_average_after": [round(v, 2) for v in os.getloadavg()],
        },
        "settings": settings,
        "summary": summary,
        "first_audio_bounds": bounds,
        "runs": [asdict(r) for r in runs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    say(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
