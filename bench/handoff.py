"""Time to first audio on the omni pipeline: streaming hand-off against waiting for the talker.

The omni pipeline's stages are launched once (`examples/omni/pipeline.yaml`, as `omnistage up`
does), with two orchestrators over them: the file's own, which hands the talker's codes to
code2wav in chunks of `stream_chunk` while the talker generates, and one built from the same
file without `stream_chunk`, which waits for the talker's finished output. The same prompts go
through both, alternating, one request at a time. "after talker start" (first audio minus the
talker's first token) isolates the hand-off from the thinker's time, which varies by prompt.

    .venv/bin/python bench/handoff.py [--rounds N] [--out FILE.json]

Every number printed is measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
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


def waiting_pipeline(folder: Path) -> Path:
    """The omni pipeline file without stream_chunk and launch, stages at their launch ports."""
    config = load_pipeline(PIPELINE)
    data = config.model_dump(mode="json", exclude={"launch"}, exclude_none=True)
    data["name"] = "omni-waiting"
    for stage in data["stages"]:
        stage["input"].pop("stream_chunk", None)
    path = folder / "omni-waiting.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


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


def table(summary: dict[str, Any]) -> str:
    lines = [
        f"{'mode':<10} {'runs':>4} {'first audio p50':>16} {'(min-max)':>14} "
        f"{'after talker start':>19} {'talker done':>12} {'total':>7} {'audio':>7}"
    ]
    for mode, s in summary.items():
        lines.append(
            f"{mode:<10} {s['runs']:>4} {s['first_audio_p50_s']:>14.2f} s "
            f"{s['first_audio_min_s']:>6.2f}-{s['first_audio_max_s']:<5.2f} s "
            f"{s['after_talker_start_p50_s']:>17.2f} s {s['talker_done_p50_s']:>10.2f} s "
            f"{s['total_p50_s']:>5.2f} s {s['audio_s_p50']:>5.2f} s"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="requests per mode")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    config = load_pipeline(PIPELINE)
    chunk = config.stages[-1].input.stream_chunk
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="handoff-") as tmp:
        folder = Path(tmp)
        say(f"==> launching {PIPELINE.relative_to(ROOT)} (stages and its streaming orchestrator)")
        processes = launch_pipeline(PIPELINE, port=0, log_dir=folder / "logs")
        waiting = ServerProcess(
            "orchestrator omni-waiting",
            ["orchestrator", "serve", "--pipeline", str(waiting_pipeline(folder)), "--port", "0"],
            log_path=folder / "logs" / "waiting.log",
        )
        runs: list[Run] = []
        try:
            waiting.wait_serving(timeout=60)
            clients = {
                f"stream{chunk}": omnistage.Client(processes[-1].address),
                "wait": omnistage.Client(waiting.address),
            }
            say("==> warm-up: one request per mode (not measured)")
            for mode, client in clients.items():
                measure(client, mode, PROMPTS[0])
            for number in range(args.rounds):
                prompt = PROMPTS[number % len(PROMPTS)]
                order = list(clients.items())
                for mode, client in order if number % 2 == 0 else reversed(order):
                    run = measure(client, mode, prompt)
                    runs.append(run)
                    say(
                        f"    {mode:<9} first audio {run.first_audio_s:5.2f} s, talker done "
                        f"{run.talker_done_s:5.2f} s, total {run.total_s:5.2f} s, {run.codes} codes"
                    )
            for client in clients.values():
                client.close()
        finally:
            waiting.stop()
            stop_all(processes)
    summary = summarize(runs)
    say("\n" + table(summary))
    settings = {
        "pipeline": str(PIPELINE.relative_to(ROOT)),
        "stream_chunk": chunk,
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
        "runs": [asdict(r) for r in runs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    say(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
