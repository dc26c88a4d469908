"""Large tensors through a stage's gRPC path against a plain memcpy on the same machine.

A torch stage serving an identity module (`bench/tensor_stage.py`) gets a float32 tensor in its
`Generate` request and streams it back in the chunks a stage sends (3 MiB each). One round
trip moves the tensor over two hops (client → stage, stage → client), each one the path a
stage-to-stage hand-off takes through the orchestrator; GB/s = 2 × size / round-trip time
(median of the repeats, after one warm-up). memcpy: `numpy.copyto` of the same bytes,
GB/s = size / time (median).

    .venv/bin/python bench/tensor_transfer.py [--quick] [--out bench/results/tensor.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from bench_machine import machine_info
from stage_overhead import progress

from omnistage.client import AsyncStageClient
from omnistage.launch import ServerProcess, stage_args
from omnistage.tensors import tensor_from_numpy
from omnistage.types import GenerateInput

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "tensor.json"
SIZES_MIB = (1, 8, 32)  # a GenerateRequest is one message: it stays under the 64 MiB limit
ENGINE_OPTIONS = {"max_batch_size": 1, "max_wait_ms": 0, "num_threads": 1}
COLUMNS = 1024  # float32 rows of 4 KiB


def memcpy_seconds(size: int, repeats: int) -> list[float]:
    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages first
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - started)
    return times


async def round_trip(client: AsyncStageClient, request: GenerateInput, size: int) -> float:
    started = time.perf_counter()
    received = 0
    async for delta in client.generate(request, timeout=120):
        if delta.tensor is not None:
            received += len(delta.tensor.data)
    elapsed = time.perf_counter() - started
    if received != size:
        raise RuntimeError(f"sent {size} bytes but received {received}")
    return elapsed


def summarize_size(size: int, grpc_s: list[float], memcpy_s: list[float]) -> dict[str, Any]:
    grpc_median = statistics.median(grpc_s)
    memcpy_median = statistics.median(memcpy_s)
    grpc_gb_s = 2 * size / grpc_median / 1e9
    memcpy_gb_s = size / memcpy_median / 1e9
    return {
        "bytes": size,
        "repeats": len(grpc_s),
        "roundtrip_s": grpc_s,
        "roundtrip_s_median": grpc_median,
        "grpc_gb_s": grpc_gb_s,
        "memcpy_s_median": memcpy_median,
        "memcpy_gb_s": memcpy_gb_s,
        "grpc_over_memcpy": grpc_gb_s / memcpy_gb_s,
    }


async def run_tensor_transfer(out: dict[str, Any], *, quick: bool = False) -> None:
    repeats = 3 if quick else 7
    out["settings"] = {
        "sizes_mib": list(SIZES_MIB),
        "repeats": repeats,
        "dtype": "float32",
        "engine_options": ENGINE_OPTIONS,
        "chunk_bytes": 3 << 20,
    }
    out["sizes"] = []
    with tempfile.TemporaryDirectory(prefix="omnistage-tensor-") as tmp:
        args = stage_args(
            name="identity",
            engine="torch",
            model="bench.tensor_stage:build",
            extra=["--engine-options", json.dumps(ENGINE_OPTIONS)],
        )
        progress("tensor: starting the identity torch stage")
        server = ServerProcess("stage identity", args, log_path=Path(tmp) / "identity.log")
        try:
            address = await asyncio.to_thread(server.wait_serving, 300)
            async with AsyncStageClient(address) as client:
                for mib in SIZES_MIB:
                    size = mib << 20
                    data = np.random.default_rng(0).random(size // 4, dtype=np.float32)
                    tensor = tensor_from_numpy(data.reshape(-1, COLUMNS))
                    request = GenerateInput(request_id="", tensor=tensor)
                    await round_trip(client, request, size)  # warm-up
                    grpc_s = [await round_trip(client, request, size) for _ in range(repeats)]
                    summary = summarize_size(size, grpc_s, memcpy_seconds(size, repeats * 3))
                    out["sizes"].append(summary)
                    progress(
                        f"tensor: {mib} MiB: gRPC {summary['grpc_gb_s']:.2f} GB/s, "
                        f"memcpy {summary['memcpy_gb_s']:.2f} GB/s"
                    )
        finally:
            await asyncio.to_thread(server.stop)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    result: dict[str, Any] = {}
    asyncio.run(run_tensor_transfer(result, quick=args.quick))
    report = {"benchmark": "tensor_transfer", "machine": machine_info(), "tensor": result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
