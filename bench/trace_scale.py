"""`omnistage profile report` on a full-size CUDA session: time, memory, and the floor.

    .venv/bin/python bench/trace_scale.py [--scale 1] [--seed 7] [--keep DIR] [--slim-too]
    .venv/bin/python bench/trace_scale.py --scale 0.05            # a quick run, about a minute
    .venv/bin/python bench/trace_scale.py --generate --keep DIR   # only write the session

First it generates a seeded session of three stages in pipeline order, shaped like what
vLLM's torch profiler writes on a CUDA machine: `thinker` (about 50 MB of gzip), `talker`
(about 100 MB) and `code2wav` (about 5 MB), times `--scale`; about 3 GB of JSON at scale 1.
Each trace is written the way Kineto writes one: the header keys (`schemaVersion`,
`deviceProperties`, `distributedInfo`, `displayTimeUnit`, `baseTimeNanoseconds`) before
`traceEvents`, every event an indented multi-line object, `ts` in µs with 3 decimals from a
base that is the host's boot time rounded to the second (so `ts` is about 1e12), the CPU side
(`cpu_op` trees, `user_annotation`s, `python_function` frames) first and the CUPTI side
(`cuda_runtime` calls, `kernel`s and `gpu_memcpy`s on the GPU's pid 0, stream 7, and their
`ac2g` flows) after it, as Kineto does. Each request is a `record_function` around engine
steps; between steps and between requests the worker polls like vLLM's shared-memory queue
(`acquire_read` frames around `sched_yield`). Slices nest on every thread. The text comes
from f-string templates in integer nanoseconds, chunk by chunk in a process pool, each chunk
deflated on its own and the pieces joined into one gzip member (as pigz does). `report.json`
gets a span per request and stage from the same layout, and small clock offsets.

Then, each in its own subprocess, one after the other:

1. the floor: `gzip -dc FILE > /dev/null` per trace (summed), and Python's `zlib` streaming
   every trace in one child process (its own timer, without the interpreter's start); the
   JSON bytes come from the latter;
2. `omnistage profile report DIR` (full), then the same with `--slim`: wall time and the peak
   RSS of the whole process tree (psutil every 50 ms, the RSS of the process and all its
   children summed; a run over `--rss-limit-gb` is killed and reported as aborted);
3. memory growth: the full report on sessions of `--growth` fractions of `--scale` (default
   0.25 and 1; the 1 is the run above), to show whether peak RSS grows with the trace;
4. with `--ui`, when `tests/browser/perfetto_ui.py` is there and its `available()` says
   None: the time to open each timeline the report wrote (`timeline.json.gz`,
   `timeline.pftrace*`) in the Perfetto UI, and its error and data-loss stats.

Goals: report ≤ 6× `gzip -dc`; peak RSS ≤ 1.5 GB (10^9 bytes); the protobuf timeline opens in
≤ 1/3 of the JSON one's time with no error stats. Results go to
`bench/results/trace_scale.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_machine import align_table, machine_info

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "trace_scale.json"
OMNISTAGE = Path(sys.executable).parent / "omnistage"
MB = 1e6
GB = 1e9
SEED = 7
LEVEL = 6  # zlib's default; torch writes level 9, which is slower to write, not to read
CHUNK_STEPS = 12  # engine steps per chunk: about 3 MB of JSON
SESSION_START_NS = 1_796_083_200_000_000_000  # 2026-12-01T00:00:00Z, the orchestrator's clock
GOAL_REPORT_X = 6.0
GOAL_RSS_GB = 1.5
GOAL_UI_FRACTION = 1 / 3

GPU_PID = 0  # Kineto puts device 0's streams in pid 0
STREAM = 7
IDLE_OUTER = "vllm/distributed/device_communicators/shm_broadcast.py(500): acquire_read"
IDLE_YIELD = "vllm/distributed/utils.py(186): sched_yield"
IDLE_BUILTIN = "<built-in function sched_yield>"
STEP_PY_IDS = 1000  # python ids, external ids and correlations reserved per engine step


@dataclass(frozen=True)
class StageSpec:
    name: str
    gzip_bytes: float
    """The target size of the stage's trace at scale 1."""
    layers: int
    """Decoder layers per engine step: each is ~90 host and device events."""


STAGES = (
    StageSpec("thinker", 50 * MB, 8),
    StageSpec("talker", 100 * MB, 6),
    StageSpec("code2wav", 5 * MB, 4),
)


# --- the generator -------------------------------------------------------------------------

# An op: (name, self ns, children, launch). A launch: (runtime call, cbid, device category or
# "" for a runtime call without device work, device op, device ns).
Launch = tuple[str, int, str, str, int]
Op = tuple[str, int, tuple["Op", ...], Launch | None]

GEMM = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas"  # noqa: E501
ELEMENTWISE = "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<c10::BFloat16>, std::array<char*, 3ul>)"  # noqa: E501
NORM = "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>(int, float, c10::BFloat16 const*, c10::BFloat16 const*, c10::BFloat16 const*, float*, float*, c10::BFloat16*)"  # noqa: E501
ATTENTION = "void flash_fwd_splitkv_kernel<Flash_fwd_kernel_traits<128, 64, 128, 4, false, false, cutlass::bfloat16_t, Flash_kernel_traits<128, 64, 128, 4, cutlass::bfloat16_t> >, true, false, false, false, false, false, false, false>(flash::Flash_fwd_params)"  # noqa: E501
SILU = "void vllm::act_and_mul_kernel<c10::BFloat16, &(c10::BFloat16 vllm::silu_kernel<c10::BFloat16>(c10::BFloat16 const&)), true>(c10::BFloat16*, c10::BFloat16 const*, int)"  # noqa: E501


def _launch(kernel: str, ns: int) -> Launch:
    return ("cudaLaunchKernel", 211, "kernel", kernel, ns)


def _linear(kernel_ns: int) -> Op:
    transpose = ("aten::transpose", 3000, (("aten::as_strided", 1500, (), None),), None)
    return (
        "aten::linear",
        6000,
        (
            ("aten::t", 3000, (transpose,), None),
            ("aten::addmm", 9000, (), _launch(GEMM, kernel_ns)),
        ),
        None,
    )


def _norm() -> Op:
    inner = ("aten::native_layer_norm", 7000, (), _launch(NORM, 9000))
    return ("aten::layer_norm", 3000, (inner,), None)


def _simple(name: str, kernel: str, kernel_ns: int) -> Op:
    return (name, 5000, (), _launch(kernel, kernel_ns))


CAPTURING: Launch = ("cudaStreamIsCapturing", 317, "", "", 0)
LAYER: tuple[Op, ...] = (
    _norm(),
    _linear(42000),
    ("aten::view", 2500, (), None),
    ("aten::view", 2500, (), None),
    (
        "aten::_scaled_dot_product_flash_attention",
        6000,
        (
            (
                "aten::_flash_attention_forward",
                9000,
                (
                    ("aten::empty", 2500, (), CAPTURING),
                    ("aten::empty", 2500, (), CAPTURING),
                    ("aten::empty", 2500, (), None),
                ),
                ("cudaLaunchKernel", 211, "kernel", ATTENTION, 61000),
            ),
        ),
        ("cudaFuncSetAttribute", 238, "", "", 0),
    ),
    ("aten::view", 2500, (), None),
    _linear(21000),
    _simple("aten::add", ELEMENTWISE, 6000),
    _norm(),
    _linear(78000),
    ("aten::silu_and_mul", 6000, (("aten::empty", 2500, (), None),), _launch(SILU, 19000)),
    _linear(39000),
    _simple("aten::add", ELEMENTWISE, 6000),
    (
        "aten::copy_",
        6000,
        (),
        ("cudaMemcpyAsync", 41, "gpu_memcpy", "Memcpy DtoD (Device -> Device)", 4000),
    ),
)
STEP_END: Op = (
    "aten::to",
    3000,
    (
        (
            "aten::_to_copy",
            5000,
            (
                ("aten::empty_strided", 3000, (), None),
                (
                    "aten::copy_",
                    6000,
                    (),
                    ("cudaMemcpyAsync", 41, "gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 2500),
                ),
            ),
            None,
        ),
    ),
    None,
)


def _op_ns(op: Op) -> tuple[int, int]:
    """The nominal host and device ns of an op's tree (runtime calls take ~6 µs each)."""
    _name, self_ns, children, launch = op
    host, device = self_ns + 200 * len(children), 0
    for child in children:
        h, d = _op_ns(child)
        host, device = host + h, device + d
    if launch:
        host, device = host + 6000 + 4000, device + launch[4]
    return host, device


def _poll_turns(layers: int) -> int:
    return 5 * layers  # ~10% of the events are Python frames, as in a vLLM run


def step_period_ns(layers: int) -> int:
    """An engine step's slot: everything in it, at most 1.2× nominal, ends before the next."""
    host = device = 0
    for op in (*LAYER * layers, STEP_END):
        h, d = _op_ns(op)
        host, device = host + h, device + d
    poll = _poll_turns(layers) * 4000 + 4000
    return int(1.3 * (poll + host + device + 20_000)) // 1000 * 1000


@dataclass(frozen=True)
class Step:
    index: int
    start_ns: int
    """On the trace's clock, from baseTimeNanoseconds."""
    request: tuple[str, int, int, int] | None = None
    """On a request's first step: (annotation name, its end, idle gap start, gap end)."""


@dataclass(frozen=True)
class Chunk:
    stage: int
    layers: int
    period_ns: int
    pid: int
    seed: int
    level: int
    steps: tuple[Step, ...]


@dataclass
class Piece:
    """A chunk's CPU and CUPTI text, each as a raw deflate block that ends on a byte."""

    stage: int
    cpu: bytes
    cpu_crc: int
    cpu_len: int
    cupti: bytes
    cupti_crc: int
    cupti_len: int
    counts: dict[str, int]


def _us(ns: int) -> str:
    q, r = divmod(ns, 1000)
    return f"{q}.{r:03d}"


def render_chunk(chunk: Chunk) -> tuple[str, str, dict[str, int]]:
    """The chunk's events as Kineto prints them: the CPU side, the CUPTI side, and counts."""
    rng = random.Random(f"{chunk.seed}-{chunk.stage}-{chunk.steps[0].index}")
    rand = rng.random
    pid = tid = chunk.pid
    cpu: list[str] = []
    cupti: list[str] = []
    counts = {"cpu_op": 0, "user_annotation": 0, "python_function": 0, "cuda_runtime": 0}
    counts |= {"kernel": 0, "gpu_memcpy": 0, "flow": 0}
    ext = corr = py = gpu_t = 0

    def jit(ns: int) -> int:
        return int(ns * (0.8 + 0.4 * rand()))

    def host_x(cat: str, name: str, start: int, end: int, ext_id: int) -> None:
        cpu.append(
            f'  {{\n    "ph": "X", "cat": "{cat}", "name": "{name}", "pid": {pid}, "tid": {tid},\n'
            f'    "ts": {_us(start)}, "dur": {_us(end - start)},\n    "args": {{\n'
            f'      "External id": {ext_id},"Record function id": 0, "Ev Idx": {ext_id - 1}\n'
            "    }\n  }"
        )

    def frame(name: str, start: int, end: int, parent: int) -> int:
        nonlocal py
        py += 1
        cpu.append(
            f'  {{\n    "ph": "X", "cat": "python_function", "name": "{name}", "pid": {pid}, '
            f'"tid": {tid},\n    "ts": {_us(start)}, "dur": {_us(end - start)},\n'
            f'    "args": {{\n      "Python parent id": {parent}, "Python id": {py}, '
            '"Python thread": 0\n    }\n  }'
        )
        return py

    def poll(start: int, end: int, turns: int) -> None:
        """vLLM's worker waiting on its queue: acquire_read around sched_yield calls."""
        outer = frame(IDLE_OUTER, start, end, 0)
        slot = (end - start - 2000) // turns
        t = start + 1000
        for _ in range(turns):
            inner = frame(IDLE_YIELD, t + 200, t + slot - 200, outer)
            frame(IDLE_BUILTIN, t + 600, t + slot - 600, inner)
            t += slot
        counts["python_function"] += 1 + 2 * turns

    def launch(spec: Launch, t: int, ext_id: int) -> int:
        nonlocal corr, gpu_t
        runtime, cbid, device_cat, device_op, device_ns = spec
        corr += 1
        end = t + jit(6000)
        cupti.append(
            f'  {{\n    "ph": "X", "cat": "cuda_runtime", "name": "{runtime}", "pid": {pid}, '
            f'"tid": {tid},\n    "ts": {_us(t)}, "dur": {_us(end - t)},\n    "args": {{\n'
            f'      "External id": {ext_id},\n      "cbid": {cbid}, "correlation": {corr}\n'
            "    }\n  }"
        )
        counts["cuda_runtime"] += 1
        if not device_cat:
            return end
        start = max(gpu_t, t + jit(4000))
        gpu_t = start + jit(device_ns)
        cupti.append(
            f'  {{\n    "ph": "s", "id": {corr}, "pid": {pid}, "tid": {tid}, "ts": {_us(t)},\n'
            '    "cat": "ac2g", "name": "ac2g"\n  }'
        )
        cupti.append(
            f'  {{\n    "ph": "X", "cat": "{device_cat}", "name": "{device_op}", "pid": {GPU_PID}, '
            f'"tid": {STREAM},\n    "ts": {_us(start)}, "dur": {_us(gpu_t - start)},\n'
            f'    "args": {{\n      "External id": {ext_id},\n      "queued": 0, "device": 0, '
            f'"context": 1,\n      "stream": {STREAM}, "correlation": {corr},\n'
            '      "registers per thread": 128,\n      "shared memory": 49152,\n'
            '      "blocks per SM": 0.5,\n      "warps per SM": 4.0,\n'
            '      "grid": [66, 1, 1],\n      "block": [256, 1, 1],\n'
            '      "est. achieved occupancy %": 6\n    }\n  }'
        )
        cupti.append(
            f'  {{\n    "ph": "f", "id": {corr}, "pid": {GPU_PID}, "tid": {STREAM}, '
            f'"ts": {_us(start)},\n    "cat": "ac2g", "name": "ac2g", "bp": "e"\n  }}'
        )
        counts[device_cat] += 1
        counts["flow"] += 2
        return end

    def run(op: Op, t: int) -> int:
        nonlocal ext
        name, self_ns, children, spec = op
        ext += 1
        mine = ext
        start = t
        t += jit(self_ns // 2)
        for child in children:
            t = run(child, t) + 200
        if spec:
            t = launch(spec, t, mine)
        end = t + jit(self_ns - self_ns // 2)
        host_x("cpu_op", name, start, end, mine)
        counts["cpu_op"] += 1
        return end

    turns = _poll_turns(chunk.layers)
    for step in chunk.steps:
        ext = corr = py = step.index * STEP_PY_IDS
        if step.request:
            name, annotation_end, gap_start, gap_end = step.request
            if gap_end - gap_start > 4 * turns * 1000:
                poll(gap_start, gap_end, 2 * turns)
            ext += 1
            host_x("user_annotation", name, step.start_ns, annotation_end, ext)
            counts["user_annotation"] += 1
        t = step.start_ns + 1000
        poll_end = t + jit(turns * 4000)
        poll(t, poll_end, turns)
        t = gpu_t = poll_end + 2000
        for op in LAYER * chunk.layers:
            t = run(op, t) + 300
        t = run(STEP_END, t)
        start = max(t, gpu_t) + 1000  # the host waits for the device's last copy
        ext += 1
        host_x("cpu_op", "aten::_local_scalar_dense", t + 200, start + 2000, ext)
        counts["cpu_op"] += 1
        corr += 1
        cupti.append(
            f'  {{\n    "ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", '
            f'"pid": {pid}, "tid": {tid},\n    "ts": {_us(t + 500)}, '
            f'"dur": {_us(start - t)},\n    "args": {{\n      "External id": {ext},\n'
            f'      "cbid": 131, "correlation": {corr}\n    }}\n  }}'
        )
        counts["cuda_runtime"] += 1
    return ",\n".join(cpu), ",\n".join(cupti), counts


def _deflate(text: str, level: int) -> tuple[bytes, int, int]:
    data = (",\n" + text).encode() if text else b""
    packer = zlib.compressobj(level, zlib.DEFLATED, -15)
    return packer.compress(data) + packer.flush(zlib.Z_SYNC_FLUSH), zlib.crc32(data), len(data)


def make_piece(chunk: Chunk) -> Piece:
    cpu_text, cupti_text, counts = render_chunk(chunk)
    cpu, cpu_crc, cpu_len = _deflate(cpu_text, chunk.level)
    cupti, cupti_crc, cupti_len = _deflate(cupti_text, chunk.level)
    return Piece(chunk.stage, cpu, cpu_crc, cpu_len, cupti, cupti_crc, cupti_len, counts)


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, index = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[index]
        vector >>= 1
        index += 1
    return total


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib's crc32_combine: the CRC-32 of A + B from those of A and B and B's length."""
    if len2 <= 0:
        return crc1
    odd = [0xEDB88320] + [1 << n for n in range(31)]
    even = [_gf2_times(odd, odd[n]) for n in range(32)]
    odd = [_gf2_times(even, even[n]) for n in range(32)]
    while True:
        even = [_gf2_times(odd, odd[n]) for n in range(32)]
        if len2 & 1:
            crc1 = _gf2_times(even, crc1)
        len2 >>= 1
        if not len2:
            break
        odd = [_gf2_times(even, even[n]) for n in range(32)]
        if len2 & 1:
            crc1 = _gf2_times(odd, crc1)
        len2 >>= 1
        if not len2:
            break
    return crc1 ^ crc2


class GzipParts:
    """One gzip member written from raw deflate pieces, each flushed to a byte boundary."""

    def __init__(self, path: Path, level: int) -> None:
        self.fh = path.open("wb")
        self.fh.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03")
        self.level, self.crc, self.size = level, 0, 0

    def add(self, block: bytes, crc: int, length: int) -> None:
        self.fh.write(block)
        self.crc = crc32_combine(self.crc, crc, length)
        self.size += length

    def text(self, text: str, final: bool = False) -> None:
        data = text.encode()
        packer = zlib.compressobj(self.level, zlib.DEFLATED, -15)
        block = packer.compress(data) + packer.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)
        self.add(block, zlib.crc32(data), len(data))

    def close(self) -> None:
        self.text("", final=True)
        self.fh.write(struct.pack("<II", self.crc, self.size & 0xFFFFFFFF))
        self.fh.close()


def trace_header(stage: str, pid: int, base_ns: int) -> str:
    head = f"""{{
  "schemaVersion": 1,
  "deviceProperties": [
    {{
      "id": 0, "name": "NVIDIA H100 80GB HBM3", "totalGlobalMem": 85045870592,
      "computeMajor": 9, "computeMinor": 0,
      "maxThreadsPerBlock": 1024, "maxThreadsPerMultiprocessor": 2048,
      "regsPerBlock": 65536, "warpSize": 32,
      "sharedMemPerBlock": 49152, "numSms": 132
    , "regsPerMultiprocessor": 65536, "sharedMemPerBlockOptin": 232448, "sharedMemPerMultiprocessor": 233472
    }}
  ],
  "cupti_version": 24,
  "cuda_runtime_version": 12080,
  "cuda_driver_version": 12080,
  "with_stack": 1,
  "distributedInfo": {{"backend": "nccl", "rank": 0, "world_size": 1, "pg_count": 1, "pg_config": [{{"pg_name": "0", "pg_desc": "default_pg", "backend_config": "cuda:nccl", "pg_size": 1, "ranks": [0]}}], "nccl_version": "2.26.2"}},
  "record_shapes": 0,
  "profile_memory": 0,
  "trace_id": "{stage.upper()}{pid:012d}",
  "displayTimeUnit": "ms",
  "baseTimeNanoseconds": {base_ns},
  "traceEvents": [
"""  # noqa: E501
    meta = []
    for where, name, key, value in (
        ((pid, 0), "process_name", "name", "python3"),
        ((pid, 0), "process_labels", "labels", "CPU"),
        ((pid, tid_of(pid)), "thread_name", "name", f"thread {pid} (VLLM::Worker)"),
        ((GPU_PID, 0), "process_name", "name", "python3"),
        ((GPU_PID, 0), "process_labels", "labels", "GPU 0"),
        ((GPU_PID, STREAM), "thread_name", "name", f"stream {STREAM}"),
    ):
        meta.append(
            f'  {{\n    "name": "{name}", "ph": "M", "ts": 0.000, "pid": {where[0]}, '
            f'"tid": {where[1]},\n    "args": {{\n      "{key}": "{value}"\n    }}\n  }}'
        )
    return head + ",\n".join(meta)


def tid_of(pid: int) -> int:
    return pid  # the worker's main thread


@dataclass
class StagePlan:
    spec: StageSpec
    index: int
    pid: int
    base_ns: int
    offset_ns: int
    period_ns: int
    steps_per_request: list[int]
    starts: list[int] = field(default_factory=list)
    """Each request's first step, on the orchestrator's clock."""
    handoffs: list[int] = field(default_factory=list)
    """Each request's hand-off from the previous stage (ns); any wait beyond it is queueing."""

    def end(self, request: int) -> int:
        return self.starts[request] + self.steps_per_request[request] * self.period_ns


def plan_session(
    scale: float, seed: int, requests: int, step_bytes: dict[str, float]
) -> list[StagePlan]:
    """Steps per stage from the probed gzip bytes per step; then when each request runs."""
    rng = random.Random(seed)
    plans = []
    for index, spec in enumerate(STAGES):
        steps = max(requests, round(spec.gzip_bytes * scale / step_bytes[spec.name]))
        per_request = [steps // requests + (r < steps % requests) for r in range(requests)]
        boot_ns = SESSION_START_NS - rng.randrange(400_000, 2_000_000) * 1_000_000_000
        plans.append(
            StagePlan(
                spec,
                index,
                pid=rng.randrange(2000, 60000),
                base_ns=boot_ns // 1_000_000_000 * 1_000_000_000,
                offset_ns=rng.randrange(-2_000_000, 2_000_000),
                period_ns=step_period_ns(spec.layers),
                steps_per_request=per_request,
            )
        )
    for r in range(requests):  # pipeline order: a request leaves one stage for the next
        for s, plan in enumerate(plans):
            if s == 0:
                ready = SESSION_START_NS + 50_000_000 if r == 0 else plan.end(r - 1)
                ready += rng.randrange(2_000_000, 20_000_000)
            else:
                plan.handoffs.append(rng.randrange(2_000_000, 5_000_000))
                ready = plans[s - 1].end(r) + plan.handoffs[r]
                if r:
                    ready = max(ready, plan.end(r - 1) + 1_000_000)
            plan.starts.append(ready)
    return plans


def chunks_of(plan: StagePlan, seed: int, level: int) -> Iterator[Chunk]:
    """The stage's steps in chunks, on its trace's clock (its host's clock minus its base)."""
    shift = plan.offset_ns - plan.base_ns
    steps: list[Step] = []
    index = 0
    window_start = SESSION_START_NS + shift
    for r, first in enumerate(plan.starts):
        start = first + shift
        gap_start = (plan.end(r - 1) + shift if r else window_start) + 100_000
        for k in range(plan.steps_per_request[r]):
            request = None
            if k == 0:
                name = f"{plan.spec.name}:req-{r:04d}"
                end = start + plan.steps_per_request[r] * plan.period_ns
                request = (name, end, gap_start, start - 100_000)
            steps.append(Step(index, start + k * plan.period_ns, request))
            index += 1
            if len(steps) == CHUNK_STEPS:
                yield Chunk(
                    plan.index,
                    plan.spec.layers,
                    plan.period_ns,
                    plan.pid,
                    seed,
                    level,
                    tuple(steps),
                )
                steps = []
    if steps:
        yield Chunk(
            plan.index, plan.spec.layers, plan.period_ns, plan.pid, seed, level, tuple(steps)
        )


def probe_step_bytes(spec: StageSpec, seed: int, level: int) -> float:
    """Gzip bytes per engine step of this stage, from two steps."""
    period = step_period_ns(spec.layers)
    steps = tuple(Step(i, 10**12 + i * period) for i in range(2))
    piece = make_piece(Chunk(0, spec.layers, period, 1000, seed, level, steps))
    return (len(piece.cpu) + len(piece.cupti)) / len(steps)


def report_json(session_id: str, plans: list[StagePlan], requests: int) -> dict[str, Any]:
    spans = []
    for plan in plans:
        for r in range(requests):
            start = plan.starts[r] - 150_000
            handoff = plan.handoffs[r] / 1e9 if plan.index else 0.0
            waited = (
                plan.starts[r] - plans[plan.index - 1].end(r) - plan.handoffs[r]
                if plan.index
                else 0
            )
            spans.append(
                {
                    "request_id": f"req-{r:04d}",
                    "stage": plan.spec.name,
                    "stage_index": plan.index,
                    "replica": "",
                    "start_unix_ns": start,
                    "first_output_unix_ns": plan.starts[r] + plan.period_ns,
                    "end_unix_ns": plan.end(r) + 200_000,
                    "handoff_s": round(handoff, 6),
                    "queue_time_s": round(0.0001 + waited / 1e9, 6),
                }
            )
    return {
        "session_id": session_id,
        "stages": [
            {
                "stage": p.spec.name,
                "replica": f"10.0.0.{p.index + 5}:5006{p.index + 1}",
                "ok": True,
                "error": "",
            }
            for p in plans
        ],
        "clocks": {
            p.spec.name: {
                "offset_ns": p.offset_ns,
                "error_ns": 40_000,
                "rtt_ns": 180_000,
                "samples": 8,
            }
            for p in plans
        },
        "spans": spans,
    }


def generate_session(
    root: Path,
    scale: float,
    *,
    seed: int = SEED,
    requests: int = 24,
    workers: int | None = None,
    level: int = LEVEL,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write a session folder under `root`; returns what was written (sizes, event counts)."""
    started = time.perf_counter()
    workers = workers or len(os.sched_getaffinity(0))
    session_id = f"20261201T000000Z-trace-scale-s{seed}"
    session = root / session_id
    session.mkdir(parents=True, exist_ok=True)
    step_bytes = {spec.name: probe_step_bytes(spec, seed, level) for spec in STAGES}
    plans = plan_session(scale, seed, requests, step_bytes)
    writers: dict[int, GzipParts] = {}
    paths: dict[int, Path] = {}
    held: dict[int, list[tuple[bytes, int, int]]] = {}
    for plan in plans:
        folder = session / plan.spec.name
        folder.mkdir(exist_ok=True)
        paths[plan.index] = folder / f"rank0.{plan.base_ns + 10**15}.pt.trace.json.gz"
    counts: dict[str, dict[str, int]] = {p.spec.name: {} for p in plans}
    tasks = [chunk for plan in plans for chunk in chunks_of(plan, seed, level)]
    written = [0, 0]  # JSON bytes, gzip bytes
    next_note = 200 * MB

    def finish(stage: int) -> None:
        writer = writers.pop(stage)
        for block in held.pop(stage):
            writer.add(*block)
        writer.text(f'\n],\n  "traceName": "{paths[stage].name[:-3]}"\n}}\n')
        writer.close()

    def consume(pieces: Iterable[Piece]) -> None:
        nonlocal next_note
        for piece in pieces:
            stage = piece.stage
            if stage not in writers:
                for done in list(writers):
                    finish(done)
                plan = plans[stage]
                writers[stage] = GzipParts(paths[stage], level)
                writers[stage].text(trace_header(plan.spec.name, plan.pid, plan.base_ns))
                held[stage] = []
            writers[stage].add(piece.cpu, piece.cpu_crc, piece.cpu_len)
            held[stage].append((piece.cupti, piece.cupti_crc, piece.cupti_len))
            total = counts[plans[stage].spec.name]
            for key, value in piece.counts.items():
                total[key] = total.get(key, 0) + value
            written[0] += piece.cpu_len + piece.cupti_len
            written[1] += len(piece.cpu) + len(piece.cupti)
            if progress and written[0] >= next_note:
                progress(
                    f"generated {written[0] / MB:,.0f} MB of JSON, {written[1] / MB:.1f} MB gz"
                )
                next_note += 200 * MB
        for done in list(writers):
            finish(done)

    if workers > 1 and len(tasks) > 1:
        with multiprocessing.Pool(workers) as pool:
            consume(pool.imap(make_piece, tasks))
    else:
        consume(map(make_piece, tasks))
    (session / "report.json").write_text(
        json.dumps(report_json(session_id, plans, requests), indent=2)
    )
    stages = {}
    for plan in plans:
        path = paths[plan.index]
        events = counts[plan.spec.name]
        stages[plan.spec.name] = {
            "file": str(path.relative_to(session)),
            "gzip_bytes": path.stat().st_size,
            "steps": sum(plan.steps_per_request),
            "step_ms": plan.period_ns / 1e6,
            "events": sum(events.values()),
            "mix": events,
        }
    return {
        "dir": session,
        "scale": scale,
        "seed": seed,
        "requests": requests,
        "level": level,
        "seconds": time.perf_counter() - started,
        "json_bytes": written[0],
        "gzip_bytes": sum(s["gzip_bytes"] for s in stages.values()),
        "stages": stages,
    }


# --- the measurements ----------------------------------------------------------------------

ZLIB_FLOOR = """
import json, sys, time, zlib
started = time.perf_counter()
total = 0
for name in sys.argv[1:]:
    unpack = zlib.decompressobj(31)
    with open(name, 'rb') as fh:
        while block := fh.read(1 << 20):
            total += len(unpack.decompress(block))
    total += len(unpack.flush())
print(json.dumps({"seconds": time.perf_counter() - started, "json_bytes": total}))
"""


def say(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def traces_of(session: Path) -> list[Path]:
    return sorted(p for p in session.glob("*/*.pt.trace.json.gz") if ".slim." not in p.name)


def floor(session: Path) -> dict[str, Any]:
    files = traces_of(session)
    gzip_s = 0.0
    for path in files:
        started = time.perf_counter()
        with open(os.devnull, "wb") as sink:
            subprocess.run(["gzip", "-dc", str(path)], stdout=sink, check=True)
        gzip_s += time.perf_counter() - started
    run = subprocess.run(
        [sys.executable, "-c", ZLIB_FLOOR, *map(str, files)],
        capture_output=True,
        check=True,
        text=True,
    )
    result = json.loads(run.stdout)
    return {
        "files": len(files),
        "gzip_bytes": sum(p.stat().st_size for p in files),
        "json_bytes": result["json_bytes"],
        "gzip_dc_s": gzip_s,
        "zlib_s": result["seconds"],
    }


def tree_rss(process: Any) -> int:
    import psutil

    total = 0
    for proc in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += proc.memory_info().rss
    return total


def kill_tree(process: Any) -> None:
    import psutil

    procs = [process, *process.children(recursive=True)]
    for proc in reversed(procs):
        with contextlib.suppress(psutil.Error):
            proc.kill()


CLI_MAIN = "import sys; from omnistage.cli import main; sys.exit(main())"


@dataclass(frozen=True)
class Limits:
    rss_bytes: float
    timeout_s: float
    code: Path | None = None
    """Another checkout whose `omnistage` CLI runs the report (its folder first on the path)."""


def run_report(session: Path, slim: bool, limits: Limits) -> dict[str, Any]:
    """`omnistage profile report` in a child; its wall time and its tree's peak RSS."""
    import psutil

    args = ["profile", "report", str(session)] + (["--slim"] if slim else [])
    cwd, env = ROOT, None
    if limits.code:
        args = [sys.executable, "-c", CLI_MAIN, *args]
        cwd, env = limits.code, os.environ | {"PYTHONPATH": str(limits.code)}
    else:
        args = [str(OMNISTAGE), *args]
    rss_limit, timeout_s = limits.rss_bytes, limits.timeout_s
    log = session.parent / f"report-{'slim' if slim else 'full'}.log"
    started = time.perf_counter()
    with log.open("wb") as out:
        child = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        process = psutil.Process(child.pid)
        peak, aborted = 0, ""
        while child.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, tree_rss(process))
            if peak > rss_limit:
                aborted = f"peak RSS passed {rss_limit / GB:.1f} GB"
            elif time.perf_counter() - started > timeout_s:
                aborted = f"ran past {timeout_s:.0f} s"
            if aborted:
                kill_tree(process)
                child.wait()
                break
            time.sleep(0.05)
    wall = time.perf_counter() - started
    outputs = {
        p.name: p.stat().st_size
        for p in session.iterdir()
        if p.is_file() and p.name.startswith(("timeline", "summary"))
    }
    return {
        "slim": slim,
        "wall_s": wall,
        "peak_rss_bytes": peak,
        "returncode": child.returncode,
        "aborted": aborted,
        "outputs": outputs,
        "log_tail": log.read_text(errors="replace")[-2000:],
    }


STATS_QUERY = (
    "select name, idx, severity, source, value from stats "
    "where severity in ('error', 'data_loss') and value > 0"
)
UI_OPEN = """
import json, sys
from pathlib import Path
from tests.browser import perfetto_ui
opened = perfetto_ui.open_trace(Path(sys.argv[1]), {"errors": sys.argv[2]}, timeout_s=600)
rows = opened.results.get("errors", [])
print(json.dumps({"load_ms": opened.load_ms, "error_stats": len(rows), "rows": rows}, default=str))
"""


def ui_unavailable() -> str | None:
    """Why the Perfetto UI can't be driven here, or None."""
    if not (ROOT / "tests" / "browser" / "perfetto_ui.py").exists():
        return "tests/browser/perfetto_ui.py is not there"
    check = "from tests.browser import perfetto_ui; print(perfetto_ui.available() or '')"
    run = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=ROOT)
    if run.returncode:
        return f"perfetto_ui did not load: {run.stderr.strip()[-300:]}"
    return run.stdout.strip() or None


def ui_open(session: Path) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for path in sorted(session.glob("timeline.*")):
        if not (path.name == "timeline.json.gz" or path.name.startswith("timeline.pftrace")):
            continue
        run = subprocess.run(
            [sys.executable, "-c", UI_OPEN, str(path), STATS_QUERY],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        )
        if run.returncode:
            results[path.name] = {"error": run.stderr.strip()[-500:]}
        else:
            results[path.name] = json.loads(run.stdout.strip().splitlines()[-1])
    return results


# --- the run -------------------------------------------------------------------------------


def fmt_s(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds < 100 else f"{seconds:.0f} s"


def verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("pass" if ok else "FAIL")


def summarize(result: dict[str, Any]) -> None:
    base = result["floor"]
    json_mb = base["json_bytes"] / MB
    rows = [["run", "wall", "JSON MB/s", "× gzip -dc", "peak RSS", "goals"]]
    rows.append(
        [
            "gzip -dc (floor)",
            fmt_s(base["gzip_dc_s"]),
            f"{json_mb / base['gzip_dc_s']:.0f}",
            "1.00",
            "–",
            "–",
        ]
    )
    rows.append(
        [
            "python zlib (floor)",
            fmt_s(base["zlib_s"]),
            f"{json_mb / base['zlib_s']:.0f}",
            f"{base['zlib_s'] / base['gzip_dc_s']:.2f}",
            "–",
            "–",
        ]
    )
    for key in ("report", "report_slim"):
        run = result.get(key)
        if not run:
            continue
        label = "profile report" + (" --slim" if run["slim"] else "")
        if run["aborted"]:
            label += f" (aborted: {run['aborted']})"
        elif run["returncode"]:
            label += f" (exit {run['returncode']})"
        goals = result["goals"][key]
        rows.append(
            [
                label,
                fmt_s(run["wall_s"]),
                f"{json_mb / run['wall_s']:.1f}",
                f"{run['wall_s'] / base['gzip_dc_s']:.1f}",
                f"{run['peak_rss_bytes'] / GB:.2f} GB",
                f"≤{GOAL_REPORT_X:g}×: {verdict(goals['time'])}, ≤{GOAL_RSS_GB:g} GB: "
                f"{verdict(goals['rss'])}",
            ]
        )
    gen = result["session"]
    print(
        f"\nSession: scale {gen['scale']:g}, {gen['gzip_bytes'] / MB:.1f} MB gzip, "
        f"{gen['json_bytes'] / MB:,.0f} MB JSON, {base['files']} traces, generated in "
        f"{gen['seconds']:.1f} s"
    )
    print(align_table(rows))
    if result.get("growth"):
        rows = [["scale", "JSON MB", "report wall", "JSON MB/s", "peak RSS", "RSS / JSON"]]
        for row in result["growth"]:
            run = row["report"]
            note = f" ({run['aborted']})" if run["aborted"] else ""
            note = note or (f" (exit {run['returncode']})" if run["returncode"] else "")
            rows.append(
                [
                    f"{row['scale']:g}{note}",
                    f"{row['json_bytes'] / MB:,.0f}",
                    fmt_s(run["wall_s"]),
                    f"{row['json_bytes'] / MB / run['wall_s']:.1f}",
                    f"{run['peak_rss_bytes'] / GB:.2f} GB",
                    f"{run['peak_rss_bytes'] / row['json_bytes']:.2f}",
                ]
            )
        print("\nMemory growth (full report):")
        print(align_table(rows))
    ui = result.get("ui")
    if isinstance(ui, dict) and ui.get("files"):
        rows = [["timeline in the Perfetto UI", "open", "error stats"]]
        for name, opened in ui["files"].items():
            if "error" in opened:
                rows.append([name, "failed", opened["error"][-60:]])
            else:
                rows.append([name, f"{opened['load_ms']:.0f} ms", str(opened["error_stats"])])
        print(
            f"\n{align_table(rows)}\nprotobuf ≤ 1/3 of JSON, 0 error stats: "
            f"{verdict(result['goals'].get('ui'))}"
        )
    elif ui:
        print(f"\nPerfetto UI: skipped ({ui.get('skipped')})")


def goals_of(result: dict[str, Any]) -> dict[str, Any]:
    goals: dict[str, Any] = {}
    base = result["floor"]["gzip_dc_s"]
    for key in ("report", "report_slim"):
        run = result.get(key)
        if run:
            done = not run["aborted"] and run["returncode"] == 0
            goals[key] = {
                "time": done and run["wall_s"] <= GOAL_REPORT_X * base,
                "rss": done and run["peak_rss_bytes"] <= GOAL_RSS_GB * GB,
            }
    files = (result.get("ui") or {}).get("files") or {}
    json_open = files.get("timeline.json.gz", {})
    proto = [v for k, v in files.items() if k.startswith("timeline.pftrace")]
    if "load_ms" in json_open and proto:
        goals["ui"] = all(
            "load_ms" in p
            and p["load_ms"] <= GOAL_UI_FRACTION * json_open["load_ms"]
            and p["error_stats"] == 0
            for p in proto
        )
    return goals


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="size multiplier (1: ~155 MB gz)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--requests", type=int, default=24, help="requests through each stage")
    parser.add_argument("--level", type=int, default=LEVEL, help="gzip level of the traces")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="generate into DIR and keep it")
    parser.add_argument("--generate", action="store_true", help="only generate (with --keep)")
    parser.add_argument("--no-slim", action="store_true", help="skip the --slim report")
    parser.add_argument(
        "--growth", default="0.25,1", help="fractions of --scale for the memory growth ('': none)"
    )
    parser.add_argument("--ui", action="store_true", help="open the timelines in the Perfetto UI")
    parser.add_argument("--rss-limit-gb", type=float, default=12.0, help="kill a report above this")
    parser.add_argument("--report-timeout", type=float, default=3600.0, help="seconds per report")
    parser.add_argument(
        "--code", type=Path, metavar="DIR", help="run the report of the checkout in DIR instead"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.generate and not args.keep:
        parser.error("--generate needs --keep DIR")
    root = args.keep or Path(tempfile.mkdtemp(prefix="trace-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    limits = Limits(args.rss_limit_gb * GB, args.report_timeout, args.code)
    try:

        def generate(scale: float) -> dict[str, Any]:
            say(f"generating a session at scale {scale:g}")
            info = generate_session(
                root / f"scale-{scale:g}",
                scale,
                seed=args.seed,
                requests=args.requests,
                level=args.level,
                progress=say,
            )
            say(
                f"wrote {info['gzip_bytes'] / MB:.1f} MB gz "
                f"({info['json_bytes'] / MB:,.0f} MB JSON) in {info['seconds']:.1f} s: "
                f"{info['dir']}"
            )
            return info

        session = generate(args.scale)
        if args.generate:
            print(session["dir"])
            return 0
        result: dict[str, Any] = {
            "machine": machine_info(),
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        }
        result["session"] = session
        say("floor: gzip -dc and zlib")
        result["floor"] = floor(session["dir"])
        say("omnistage profile report (full)")
        result["report"] = run_report(session["dir"], False, limits)
        say(
            f"  {fmt_s(result['report']['wall_s'])}, "
            f"{result['report']['peak_rss_bytes'] / GB:.2f} GB peak"
        )
        if not args.no_slim:
            say("omnistage profile report --slim")
            result["report_slim"] = run_report(session["dir"], True, limits)
            say(
                f"  {fmt_s(result['report_slim']['wall_s'])}, "
                f"{result['report_slim']['peak_rss_bytes'] / GB:.2f} GB peak"
            )
        growth = []
        for fraction in [float(f) for f in args.growth.split(",") if f.strip()]:
            if fraction == 1:
                info, run = session, result["report"]
            else:
                info = generate(args.scale * fraction)
                say(f"omnistage profile report at scale {args.scale * fraction:g}")
                run = run_report(info["dir"], False, limits)
                if not args.keep:
                    shutil.rmtree(info["dir"].parent)
            growth.append({"scale": info["scale"], "json_bytes": info["json_bytes"], "report": run})
        result["growth"] = sorted(growth, key=lambda row: row["scale"])
        if args.ui:
            why = ui_unavailable()
            result["ui"] = {"skipped": why} if why else {"files": ui_open(session["dir"])}
        result["goals"] = goals_of(result)
        summarize(result)
        session["dir"] = str(session["dir"])
        for row in result["growth"]:
            row.pop("dir", None)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))
        say(f"wrote {args.out}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
