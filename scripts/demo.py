"""`make demo`: the bundled two-stage pipeline, streamed, with a profile of stage 0 only.

It does what a user does from the README: `omnistage up` the pipeline (here through the same
code, in process), stream a few prompts through it with `omnistage.Client`, profile one of
the stages, and print where the orchestrator collected the traces.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import omnistage
from omnistage.up import launch_pipeline, stop_all

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "examples" / "two-stage" / "pipeline.yaml"
PROMPTS = [
    "What is the capital of France?",
    "Name one planet and one fact about it.",
]


def stream(client: omnistage.Client, prompt: str) -> None:
    print(f"\n>>> {prompt}")
    current = None
    for out in client.generate(messages=[{"role": "user", "content": prompt}]):
        if out.stage != current:
            current = out.stage
            print(f"\n  [{out.stage_index}:{out.stage}] ", end="", flush=True)
        print(out.text.replace("\n", " "), end="", flush=True)
        if out.finished and out.metrics is not None:
            m = out.metrics
            print(
                f"\n      first output {m.time_to_first_output_s * 1000:.0f} ms, "
                f"done in {m.duration_s:.2f} s, hand-off {m.handoff_s * 1000:.1f} ms",
                end="",
            )
    print()


def main() -> int:
    print(f"==> omnistage up {PIPELINE.relative_to(ROOT)} (two vLLM stages on the CPU: 1-3 min)")
    processes = launch_pipeline(PIPELINE)
    try:
        address = processes[-1].address
        with omnistage.Client(address) as client:
            stream(client, PROMPTS[0])
            print("\n==> profiling stage 0 ('thinker') only")
            session = client.start_profile(stages=[0], label="demo")
            print(f"    session {session}")
            stream(client, PROMPTS[1])
            print("\n==> stopping the profile; the orchestrator pulls the traces over gRPC")
            started = time.monotonic()
            report = client.stop_profile()
            print(f"    done in {time.monotonic() - started:.1f} s")
        print(f"\n==> report: {report.output_dir}")
        for stage in report.stages:
            state = "ok" if stage.ok else f"FAILED: {stage.error}"
            print(f"    {stage.stage}: {state}, {len(stage.files)} files in {stage.local_dir}")
            for item in stage.files:
                print(f"      {item.name:<60} {item.size_bytes:>10,} bytes")
        table = next(Path(report.output_dir).glob("*/profiler_out_*.txt"), None)
        if table is not None:
            print(f"\n==> top of {table.name}:")
            print("\n".join(table.read_text().splitlines()[:10]))
        return 0 if not report.failed else 1
    finally:
        print("\n==> stopping the pipeline")
        stop_all(processes)


if __name__ == "__main__":
    sys.exit(main())
