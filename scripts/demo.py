"""`make demo`: the bundled omni pipeline, thinker → talker → code2wav, with a WAV and a profile.

It does what a user does from the README: `omnistage up examples/omni/pipeline.yaml` (here
through the same code, in process), send a prompt with `omnistage.Client`, print the thinker's
answer, write the audio as a WAV file, then profile two of the three stages (thinker and
code2wav) around a second prompt and print where the orchestrator collected the traces.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import omnistage
from omnistage.audio import write_wav
from omnistage.types import TensorData
from omnistage.up import launch_pipeline, stop_all

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "examples" / "omni" / "pipeline.yaml"
OUT_DIR = ROOT / "examples" / "omni" / "out"
SAMPLE_RATE = 24_000
PROMPTS = [
    "What is the capital of France?",
    "Name one planet and one fact about it.",
]


def speak(client: omnistage.Client, prompt: str, wav: Path) -> None:
    """One request: the thinker's answer as it streams, then the audio as a WAV file."""
    print(f"\n>>> {prompt}\n    thinker: ", end="", flush=True)
    sent = time.monotonic()
    first_audio = 0.0
    talker_tokens = 0
    audio: list[TensorData] = []
    for out in client.generate(messages=[{"role": "user", "content": prompt}]):
        if out.stage == "thinker":
            print(out.text.replace("\n", " "), end="", flush=True)
        elif out.stage == "talker":
            talker_tokens += len(out.token_ids)
        elif out.tensor is not None:
            first_audio = first_audio or time.monotonic() - sent
            audio.append(out.tensor)
    total = time.monotonic() - sent
    info = write_wav(wav, audio, sample_rate=SAMPLE_RATE)
    print(
        f"\n    talker: {talker_tokens} codes → code2wav: {info.duration_s:.2f} s of audio"
        f"\n    wrote {info.path.relative_to(ROOT)} ({info.sample_rate} Hz mono, "
        f"{info.samples:,} samples)"
        f"\n    time to first audio {first_audio:.2f} s, whole request {total:.2f} s"
    )


def main() -> int:
    print(f"==> omnistage up {PIPELINE.relative_to(ROOT)}")
    print("    thinker (vLLM, SmolLM2-135M), talker (vLLM, random weights), code2wav (torch)")
    print("    on the CPU this takes 1-3 min; the talker's weights are drawn once, then cached")
    processes = launch_pipeline(PIPELINE)
    try:
        address = processes[-1].address
        with omnistage.Client(address) as client:
            speak(client, PROMPTS[0], OUT_DIR / "answer-1.wav")
            print("\n==> profiling 'thinker' and 'code2wav' only (not 'talker')")
            session = client.start_profile(stages=["thinker", "code2wav"], label="demo")
            print(f"    session {session}")
            speak(client, PROMPTS[1], OUT_DIR / "answer-2.wav")
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
        print(f"    merged timeline (chrome://tracing, HTA, scripts): {report.timeline}")
        for path in report.timelines[1:]:
            print(f"    for the Perfetto UI (ui.perfetto.dev): {path}")
        for warning in report.warnings:
            print(f"    warning: {warning}")
        print(f"    summary: {report.summary}")
        return 0 if not report.failed else 1
    finally:
        print("\n==> stopping the pipeline")
        stop_all(processes)


if __name__ == "__main__":
    sys.exit(main())
