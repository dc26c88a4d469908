"""Stage-to-stage tensor hand-off behind an orchestrator: shared memory against gRPC bytes,
in the same run as a memcpy of the same bytes.

Two torch stages (`bench/tensor_stage.py`): the source makes a float32 tensor of N MiB and
stamps the wall clock into it once it is ready; the sink notes the clock when its model gets
the tensor (and again after reading every byte once). One orchestrator hands the tensor on by
shared memory (`shared_memory.enabled: true`), another by gRPC bytes (false); rounds go A B B
A. hand-off GB/s = N MiB / (sink's arrival − source's stamp), median of the repeats after one
warm-up: the source's chunking, its segment or its messages, the orchestrator's join and edge,
the sink's request. memcpy: `numpy.copyto` of the same bytes into a warm buffer. A gRPC request
is one message of at most 64 MiB, so the gRPC path cannot carry 64 MiB or more.

    python bench/shm_handoff.py [--quick] [--out bench/results/shm_handoff.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from bench_machine import machine_info
from stage_overhead import progress

from omnistage.launch import ServerProcess, stage_args
from omnistage.v1 import orchestrator_pb2, orchestrator_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "shm_handoff.json"
SIZES_MIB = (8, 32, 64, 128)
GRPC_LIMIT_MIB = 64  # one GenerateRequest: the tensor and its envelope must fit
ENGINE_OPTIONS = {"max_batch_size": 1, "max_wait_ms": 0, "num_threads": 1}
PIPELINE = """
name: handoff
outputs: final
shared_memory: {{enabled: {enabled}}}
stages:
  - {{name: source, address: "{source}"}}
  - {{name: sink, address: "{sink}", input: {{processor: tensor}}}}
"""


def memcpy_s(size: int) -> float:
    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages first
    started = time.perf_counter()
    np.copyto(dst, src)
    return time.perf_counter() - started


def hand_off(stub: Any, mib: int) -> tuple[float, float]:
    """Seconds from the source's output to the sink's input, and to its first full read."""
    request = orchestrator_pb2.PipelineRequest(token_ids=[mib])
    replies = list(stub.Generate(request, timeout=300))
    tensor = next(r.tensor for r in replies if r.HasField("tensor"))
    arrived_ns, read_ns, count = (int(v) for v in np.frombuffer(tensor.data, dtype="<i8"))
    if count != mib * 256 * 1024:
        raise RuntimeError(f"the sink got {count} floats, not {mib} MiB")
    return arrived_ns / 1e9, read_ns / 1e9


def _start(tmp: Path, name: str, model: str) -> ServerProcess:
    extra = ["--engine-options", json.dumps(ENGINE_OPTIONS)]
    args = stage_args(name=name, engine="torch", model=model, extra=extra)
    return ServerProcess(f"stage {name}", args, log_path=tmp / f"{name}.log")


def _orchestrator(tmp: Path, enabled: bool, source: str, sink: str) -> ServerProcess:
    path = tmp / f"shm-{enabled}.yaml"
    text = PIPELINE.format(enabled=str(enabled).lower(), source=source, sink=sink)
    path.write_text(text)
    args = ["orchestrator", "serve", "--pipeline", str(path), "--port", "0"]
    return ServerProcess(f"orchestrator shm={enabled}", args, log_path=tmp / f"o-{enabled}.log")


def measure(stubs: dict[str, Any], mib: int, repeats: int) -> dict[str, Any]:
    paths = [p for p in ("shm", "grpc") if p == "shm" or mib < GRPC_LIMIT_MIB]
    times: dict[str, list[tuple[float, float]]] = {p: [] for p in paths}
    for path in paths:
        hand_off(stubs[path], mib)  # warm-up
    memcpy: list[float] = []
    for round_ in range(repeats):
        order = paths if round_ % 2 == 0 else paths[::-1]  # A B, then B A
        for path in order:
            times[path].append(hand_off(stubs[path], mib))
        memcpy.append(memcpy_s(mib << 20))
    size = mib << 20
    row: dict[str, Any] = {"mib": mib, "repeats": repeats, "memcpy_s": memcpy}
    row["memcpy_gb_s"] = size / statistics.median(memcpy) / 1e9
    for path, pairs in times.items():
        handoff = statistics.median(p[0] for p in pairs)
        read = statistics.median(p[1] for p in pairs)
        row[f"{path}_s"] = [p[0] for p in pairs]
        row[f"{path}_gb_s"] = size / handoff / 1e9
        row[f"{path}_read_gb_s"] = size / read / 1e9
        row[f"{path}_over_memcpy"] = row[f"{path}_gb_s"] / row["memcpy_gb_s"]
    if "grpc" in times:
        row["shm_over_grpc"] = row["shm_gb_s"] / row["grpc_gb_s"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| tensor | shm hand-off | + read once | gRPC hand-off | memcpy | shm / memcpy "
        "| shm / gRPC |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        grpc_cell = f"{r['grpc_gb_s']:.2f} GB/s" if "grpc_gb_s" in r else "over the limit"
        ratio = f"{r['shm_over_grpc']:.1f}×" if "shm_over_grpc" in r else "–"
        lines.append(
            f"| {r['mib']} MiB | {r['shm_gb_s']:.2f} GB/s | {r['shm_read_gb_s']:.2f} GB/s "
            f"| {grpc_cell} | {r['memcpy_gb_s']:.2f} GB/s | {r['shm_over_memcpy']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def run(*, quick: bool) -> dict[str, Any]:
    repeats = 3 if quick else 7
    rows = []
    with tempfile.TemporaryDirectory(prefix="omnistage-shm-") as tmp_name:
        tmp = Path(tmp_name)
        servers = [
            _start(tmp, "source", "bench.tensor_stage:build_source"),
            _start(tmp, "sink", "bench.tensor_stage:build_sink"),
        ]
        try:
            source, sink = (s.wait_serving(300) for s in servers)
            orchestrators = {
                "shm": _orchestrator(tmp, True, source, sink),
                "grpc": _orchestrator(tmp, False, source, sink),
            }
            servers += orchestrators.values()
            channels = {
                k: grpc.insecure_channel(o.wait_serving(60)) for k, o in orchestrators.items()
            }
            stubs = {k: orchestrator_pb2_grpc.OrchestratorStub(c) for k, c in channels.items()}
            for mib in SIZES_MIB:
                rows.append(measure(stubs, mib, repeats))
                rates = {k: round(v, 3) for k, v in rows[-1].items() if k.endswith("gb_s")}
                progress(f"shm_handoff: {mib} MiB: {rates}")
        finally:
            for server in servers:
                server.stop()
    return {"settings": {"sizes_mib": list(SIZES_MIB), "repeats": repeats}, "sizes": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    result = run(quick=args.quick)
    print(table(result["sizes"]))
    report = {"benchmark": "shm_handoff", "machine": machine_info(), "handoff": result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
