"""`make demo`: one stage on the bundled model, a streamed answer, and a profile of it.

It starts `omnistage stage serve` as a child process, streams an answer to the console,
profiles that request, pulls the trace back over gRPC and prints where everything landed.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from omnistage.client import StageClient, make_request
from omnistage.launch import ServerProcess, stage_args

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "profiles" / "demo"
QUESTION = "What is the capital of France? Answer in one sentence, then name one landmark there."


def main() -> int:
    stage_dir = OUT / "stage-disk"  # the stage's own disk; the client pulls copies over gRPC
    print("==> starting stage 'thinker' (vLLM on SmolLM2-135M-Instruct, CPU); about 30-60 s")
    stage = ServerProcess(
        "stage 'thinker'",
        stage_args(
            name="thinker",
            profiler_config={
                "torch_profiler_dir": str(stage_dir),
                "torch_profiler_with_stack": False,
            },
        ),
        log_path=OUT / "thinker.log",
    )
    try:
        address = stage.wait_serving(
            progress=lambda status, s: print(f"    ... {status} after {s:.0f} s", flush=True)
        )
        print(f"==> stage SERVING at {address} (log: {stage.log_path})")
        with StageClient(address) as client:
            session = client.start_profile(label="demo")
            print(f"==> profile session {session} started; asking: {QUESTION}\n")
            started = time.monotonic()
            request = make_request(
                messages=[{"role": "user", "content": QUESTION}], max_tokens=64, temperature=0.0
            )
            for delta in client.generate(request):
                print(delta.text, end="", flush=True)
                if delta.finished and delta.metrics is not None:
                    m = delta.metrics
                    print(
                        f"\n\n    {m.generated_tokens} tokens in "
                        f"{time.monotonic() - started:.2f} s, "
                        f"time to first token {m.time_to_first_token_s * 1000:.0f} ms, "
                        f"finish reason {delta.finish_reason!r}"
                    )
            print("==> stopping the profile (the engine flushes its trace)")
            manifest = client.stop_profile()
            print(
                f"    stopped in {manifest.stop_seconds:.1f} s; stage-side: {manifest.profile_dir}"
            )
            pulled = OUT / "pulled" / manifest.session_id
            for item in manifest.files:
                size = client.fetch_file(manifest.session_id, item.name, pulled / item.name)
                print(f"    pulled {item.name} ({size:,} bytes, sha256 {item.sha256[:12]}…)")
        table = next(pulled.glob("profiler_out_*.txt"), None)
        traces = sorted(pulled.glob("*.pt.trace.json*"), key=lambda p: "async_llm" in p.name)
        trace = traces[0] if traces else None
        print(f"\n==> trace (open in Perfetto or chrome://tracing): {trace}")
        print(f"==> op table: {table}")
        if table is not None:
            print("\n".join(table.read_text().splitlines()[:14]))
        return 0
    finally:
        print("==> stopping the stage")
        stage.stop()


if __name__ == "__main__":
    sys.exit(main())
