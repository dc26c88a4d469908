"""How long vLLM's queue readers spin (OMNISTAGE_VLLM_BUSY_POLL_S), on the omni hand-off.

vLLM's engine core and worker hand each step to each other through a shared-memory ring whose
reader spins for a second after its last read (services/engines/vllm_plugin.py). For each
setting, this starts the omni pipeline's thinker (the bundled model) and talker as two fresh
`omnistage stage serve` processes with it, and sends what the pipeline's hand-off sends, one
after the other: the thinker's answer, then its tokens to the talker (88 codes, ignore_eos).
It reports each setting's talker time per answer, its longest gap between two codes (a stall),
and the cores both stages' process trees used over the rounds (`proc_cpu`); `1` is vLLM's own
behaviour.

    .venv/bin/python bench/vllm_busy_poll.py [--settings 1,0.002,0] [--rounds 8] [--out F.json]

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
from pathlib import Path
from typing import Any

from bench_machine import align_table, machine_info
from proc_cpu import cpu_seconds_by_role, sample

from omnistage.launch import ServerProcess, stage_args
from omnistage.stage_client import StageClient
from omnistage.types import GenerateInput, SamplingOptions
from services.engines.vllm_plugin import BUSY_POLL_ENV

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "vllm_busy_poll.json"
TALKER = str(ROOT / "examples" / "omni" / "talker")
PROMPT = "Tell me one fact about the sea."
CODES = 88


def talker_answer(thinker: StageClient, talker: StageClient, i: int) -> tuple[float, float]:
    """One hand-off: the thinker's answer, then its tokens to the talker; the talker's time
    and its longest gap between two codes, in seconds."""
    ids: list[int] = []
    sampling = SamplingOptions(max_tokens=16, temperature=0.0)
    request = GenerateInput(request_id=f"t{i}", prompt=PROMPT, sampling=sampling)
    for delta in thinker.generate(request, timeout=120):
        ids += delta.token_ids
    sampling = SamplingOptions(max_tokens=CODES, ignore_eos=True, temperature=0.8)
    request = GenerateInput(request_id=f"c{i}", token_ids=tuple(ids), sampling=sampling)
    started = last = time.monotonic()
    longest = 0.0
    for _ in talker.generate(request, timeout=120):
        now = time.monotonic()
        longest, last = max(longest, now - last), now
    return last - started, longest


def measure(setting: str, rounds: int, workdir: Path) -> dict[str, Any]:
    os.environ[BUSY_POLL_ENV] = setting  # the stages and their vLLM processes inherit it
    processes = [
        ServerProcess(
            f"stage {name}",
            stage_args(name=name, model=model, extra=["--max-num-seqs", "16"]),
            log_path=workdir / f"{name}-{setting}.log",
            die_with_parent=True,
        )
        for name, model in (("thinker", "smollm2"), ("talker", TALKER))
    ]
    try:
        addresses = [p.wait_serving(timeout=180) for p in processes]
        roots = {p.process.pid: p.name for p in processes}
        with StageClient(addresses[0]) as thinker, StageClient(addresses[1]) as talker:
            talker_answer(thinker, talker, 0)  # warm-up
            before, started = sample(roots), time.monotonic()
            answers = [talker_answer(thinker, talker, i) for i in range(1, rounds + 1)]
            cpu_s = sum(cpu_seconds_by_role(before, sample(roots)).values())
            cores = cpu_s / (time.monotonic() - started)
    finally:
        for process in processes:
            process.stop()
    talker_s, stalls = [a[0] for a in answers], [a[1] for a in answers]
    return {
        "setting_s": setting,
        "talker_p50_s": statistics.median(talker_s),
        "talker_max_s": max(talker_s),
        "longest_gap_p50_ms": statistics.median(stalls) * 1000,
        "longest_gap_max_ms": max(stalls) * 1000,
        "cores": cores,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--settings", default="1,0.002,0", help="seconds, comma-separated")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for setting in args.settings.split(","):
            print(f"busy poll {setting} s: starting the thinker and the talker", file=sys.stderr)
            results.append(measure(setting, args.rounds, Path(tmp)))
    base = results[0]["talker_p50_s"]
    rows = [["spin (s)", "talker p50", "max", "longest gap p50", "max", "cores", "vs first"]]
    for r in results:
        rows.append(
            [
                r["setting_s"],
                f"{r['talker_p50_s']:.3f} s",
                f"{r['talker_max_s']:.3f} s",
                f"{r['longest_gap_p50_ms']:.0f} ms",
                f"{r['longest_gap_max_ms']:.0f} ms",
                f"{r['cores']:.2f}",
                f"{r['talker_p50_s'] / base:.2f}x",
            ]
        )
    print(align_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {"machine": machine_info(), "rounds": args.rounds, "results": results}
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
