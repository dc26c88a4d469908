"""Real torch.profiler traces for the profile-report tests, made on the CPU in a tmp folder.

Two "stages" are profiled one after the other, as a pipeline would run them: each request goes
through `thinker` (light work), then `talker` (heavier work and a sleep, so it dominates).
Every request's work in a stage is wrapped in a `record_function("<stage>:<request>")`, and the
span around it is recorded with `time.time_ns()`, as the orchestrator records its spans. Before
each request the stage "waits" in `idle_wait`, a Python polling loop like vLLM's, for the
slimming tests. Each stage also gets a front-end trace (`*.async_llm.*`), an op table file and
one flow pair with the same id in every stage (`ac2g`, id 7), so that merged ids could collide.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from omnistage.traces import RequestSpan

REQUESTS = ("r0", "r1", "r2")
IDLE_PATTERN = "*trace_factory.py(*): idle_wait"
FLOW_ID = 7


@dataclass(frozen=True)
class StageRun:
    name: str
    index: int
    trace: Path
    frontend: Path
    spans: tuple[RequestSpan, ...]


@dataclass
class Session:
    dir: Path
    stages: dict[str, StageRun] = field(default_factory=dict)

    @property
    def spans(self) -> list[RequestSpan]:
        return [s for run in self.stages.values() for s in run.spans]

    def torch_clock_error_us(self) -> float:
        """How far torch's own clock put a request's annotation outside the span
        `time.time_ns()` measured around it, in µs, before any merging (0 where none is).

        Torch converts its TSC readings to the wall clock with a fitted rate; on some virtual
        machines that fit is off by about 0.1 %, which moves a 100 ms annotation by 100 µs or
        more. Tests of the merge's placement add this to their slack, so they judge omnistage's
        shifting and not torch's clock."""
        error_ns = 0
        for run in self.stages.values():
            data = read_json(run.trace)
            base = data.get("baseTimeNanoseconds", 0)
            annotations = {
                e["name"]: e for e in data["traceEvents"] if e.get("cat") == "user_annotation"
            }
            for span in run.spans:
                ann = annotations[f"{run.name}:{span.request_id}"]
                start = base + round(ann["ts"] * 1000)
                end = start + round(ann["dur"] * 1000)
                error_ns = max(error_ns, span.start_unix_ns - start, end - span.end_unix_ns)
        return error_ns / 1000

    def write_report(self, **extra: Any) -> Path:
        stages = [
            {"stage": r.name, "replica": f"127.0.0.1:5006{r.index + 1}", "ok": True, "error": ""}
            for r in self.stages.values()
        ]
        report = {"session_id": self.dir.name, "output_dir": str(self.dir), "stages": stages}
        path = self.dir / "report.json"
        path.write_text(json.dumps(report | extra, indent=2))
        return path


def idle_check() -> None:
    os.sched_yield()


def idle_wait(turns: int) -> None:
    """Poll like vLLM's worker does while it waits for work: many tiny Python frames."""
    for _ in range(turns):
        idle_check()


def profile_stage(
    folder: Path, name: str, index: int, *, iterations: int, sleep_s: float, hidden: int
) -> StageRun:
    """Profile one stage running every request; its files land in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(index)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 32)
    )
    x = torch.randn(8, 32)
    spans = []
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        for request_id in REQUESTS:
            idle_wait(150)
            start = time.time_ns()
            first = 0
            with record_function(f"{name}:{request_id}"):
                for _ in range(iterations):
                    x = torch.tanh(model(x))
                    first = first or time.time_ns()
                time.sleep(sleep_s)  # a request's host-side time in the trace: not a wait
            end = time.time_ns()
            spans.append(
                RequestSpan(
                    request_id=request_id,
                    stage=name,
                    stage_index=index,
                    replica="",
                    start_unix_ns=start,
                    first_output_unix_ns=first,
                    end_unix_ns=end,
                    handoff_s=0.0005 * index,
                    queue_time_s=0.0001,
                )
            )
            time.sleep(0.002)  # a gap between requests in the trace: not a wait
    try:
        prof_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
    except UnicodeDecodeError:  # torch's own bug with stacks (pytorch/pytorch#64345)
        prof_table = "torch could not build its table: a frame's name was not UTF-8\n"
    trace = _export(prof, folder / f"rank0.{time.time_ns()}.pt.trace.json")
    _add_flow(trace, FLOW_ID)
    frontend = _frontend_trace(folder)
    (folder / f"profiler_out_{name}.txt").write_text(prof_table)
    return StageRun(name, index, trace, frontend, tuple(spans))


def make_session(root: Path, name: str = "20260101T000000Z-test-abc123") -> Session:
    """A session folder with two profiled stages: `thinker` (index 0) and `talker` (index 1)."""
    session = Session(root / name)
    session.stages["thinker"] = profile_stage(
        session.dir / "thinker", "thinker", 0, iterations=3, sleep_s=0.0, hidden=64
    )
    session.stages["talker"] = profile_stage(
        session.dir / "talker", "talker", 1, iterations=6, sleep_s=0.1, hidden=128
    )
    return session


def shared_session(tmp_path_factory: pytest.TempPathFactory) -> Session:
    """One session per test run (profiling is slow on a busy CPU); copy it before changing it."""
    root = tmp_path_factory.getbasetemp() / "profile-report"
    index = root / "session.json"
    if index.exists():
        saved = json.loads(index.read_text())
        stages = {
            name: StageRun(
                name,
                run["index"],
                Path(run["trace"]),
                Path(run["frontend"]),
                tuple(RequestSpan(**span) for span in run["spans"]),
            )
            for name, run in saved["stages"].items()
        }
        return Session(Path(saved["dir"]), stages)
    session = make_session(root)
    saved = {
        "dir": str(session.dir),
        "stages": {
            name: {
                "index": run.index,
                "trace": str(run.trace),
                "frontend": str(run.frontend),
                "spans": [asdict(span) for span in run.spans],
            }
            for name, run in session.stages.items()
        },
    }
    index.write_text(json.dumps(saved))
    return session


def shift_base_time(trace: Path, delta_ns: int) -> None:
    """Pretend the trace was written on a host whose clock is `delta_ns` ahead."""
    data = read_json(trace)
    data["baseTimeNanoseconds"] += delta_ns
    write_json(trace, data)


def read_json(path: Path) -> Any:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as fh:
        return json.load(fh)


def write_json(path: Path, data: Any) -> None:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wt") as fh:
        json.dump(data, fh)


def copy_session(session: Session, target: Path) -> Session:
    shutil.copytree(session.dir, target)
    stages = {
        name: StageRun(
            run.name,
            run.index,
            target / run.trace.relative_to(session.dir),
            target / run.frontend.relative_to(session.dir),
            run.spans,
        )
        for name, run in session.stages.items()
    }
    return Session(target, stages)


def _export(prof: profile, json_path: Path) -> Path:
    prof.export_chrome_trace(str(json_path))
    gz_path = json_path.with_name(json_path.name + ".gz")
    with json_path.open("rb") as src, gzip.open(gz_path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    json_path.unlink()
    return gz_path


def _add_flow(trace: Path, flow_id: int) -> None:
    """A Kineto-style flow (`ac2g`) from the first aten::linear to the first aten::relu."""
    data = read_json(trace)
    events = data["traceEvents"]
    first = {}
    for ev in events:
        if ev.get("cat") == "cpu_op" and ev["name"] in ("aten::linear", "aten::relu"):
            first.setdefault(ev["name"], ev)
    src, dst = first["aten::linear"], first["aten::relu"]
    common = {"cat": "ac2g", "name": "ac2g", "id": flow_id}
    events.append({"ph": "s", "pid": src["pid"], "tid": src["tid"], "ts": src["ts"], **common})
    events.append(
        {"ph": "f", "bp": "e", "pid": dst["pid"], "tid": dst["tid"], "ts": dst["ts"], **common}
    )
    write_json(trace, data)


def _frontend_trace(folder: Path) -> Path:
    """A small front-end trace: Python frames only, like vLLM's AsyncLLM trace."""
    with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
        idle_wait(20)
    return _export(prof, folder / f"host_{os.getpid()}.async_llm.{time.time_ns()}.pt.trace.json")


CUDA_HOST_PID = 4242
CUDA_GPU_PID = 0  # Kineto puts device 0's streams in pid 0
CUDA_STREAM = 7
CUDA_IDLE = "vllm/worker.py(12): busy_loop"


def make_cuda_stage(
    folder: Path, name: str, index: int, *, start_ns: int
) -> tuple[Path, tuple[RequestSpan, ...]]:
    """A synthetic Kineto trace of a CUDA run, in the shape torch writes one.

    Per request: a ``user_annotation`` ``<stage>:<request>`` around ``aten::mm`` (which
    launches a ``kernel`` through ``cudaLaunchKernel``) and ``aten::copy_`` (a ``gpu_memcpy``
    through ``cudaMemcpyAsync``); the device work sits on the GPU's own pid, linked to the
    runtime calls by ``ac2g`` flows and to the ops by ``External id``. Between requests the
    host spins in Python frames (``CUDA_IDLE``), as vLLM's worker does, for slimming.
    """
    folder.mkdir(parents=True, exist_ok=True)
    host = {"pid": CUDA_HOST_PID, "tid": CUDA_HOST_PID}
    gpu = {"pid": CUDA_GPU_PID, "tid": CUDA_STREAM}
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "ts": 0, "args": {"name": "python3"}, **host},
        {"ph": "M", "name": "process_name", "ts": 0, "args": {"name": "python3"}} | gpu,
        {"ph": "M", "name": "process_labels", "ts": 0, "args": {"labels": "GPU 0"}} | gpu,
        {"ph": "M", "name": "thread_name", "ts": 0, "args": {"name": "stream 7"}} | gpu,
    ]
    ext = corr = 0

    def x(where: dict[str, int], cat: str, op: str, ts: float, dur: float, **args: Any) -> None:
        events.append(
            {"ph": "X", "cat": cat, "name": op, "ts": ts, "dur": dur, **where} | {"args": args}
        )

    def launch(op: str, runtime: str, device_cat: str, device_op: str, ts: float) -> None:
        nonlocal ext, corr
        ext, corr = ext + 1, corr + 1
        x(host, "cpu_op", op, ts, 40.0, **{"External id": ext, "Record function id": 0})
        x(host, "cuda_runtime", runtime, ts + 10.0, 8.0, correlation=corr, **{"External id": ext})
        device_ts = ts + 30.0
        x(gpu, device_cat, device_op, device_ts, 120.0, correlation=corr, **{"External id": ext})
        flow = {"cat": "ac2g", "name": "ac2g", "id": corr}
        events.append({"ph": "s", "ts": ts + 10.0, **host, **flow})
        events.append({"ph": "f", "bp": "e", "ts": device_ts, **gpu, **flow})

    spans = []
    t = 0.0
    for request_id in REQUESTS:
        for turn in range(50):  # idle polling: many tiny Python frames
            x(host, "python_function", CUDA_IDLE, t + 4.0 * turn, 3.0, **{"Ev Idx": turn})
        t += 250.0
        span_start = start_ns + int(t * 1000)
        x(host, "user_annotation", f"{name}:{request_id}", t, 400.0, **{"External id": 0})
        launch("aten::mm", "cudaLaunchKernel", "kernel", "sm90_gemm", t + 20.0)
        launch("aten::copy_", "cudaMemcpyAsync", "gpu_memcpy", "Memcpy HtoD", t + 200.0)
        t += 600.0
        end = start_ns + int(t * 1000)
        spans.append(
            RequestSpan(request_id, name, index, "", span_start, span_start + 100_000, end, 0, 0)
        )
    trace = {
        "schemaVersion": 1,
        "deviceProperties": [{"id": 0, "name": "NVIDIA H100 80GB HBM3"}],
        "traceEvents": events,
        "baseTimeNanoseconds": start_ns,
    }
    path = folder / f"rank0.{start_ns}.pt.trace.json.gz"
    write_json(path, trace)
    return path, tuple(spans)
