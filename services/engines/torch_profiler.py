"""torch.profiler over the torch engine's steps, with vLLM's knobs and file names.

torch.profiler records the ops of the thread that started it only, so the engine starts and
stops it on the same worker thread that runs its forward passes. With `with_stack`, though,
its Python tracer follows every thread, the event loop's idle polling included; those frames
are dropped from the exported trace, so it holds the engine's work and nothing else.
"""

from __future__ import annotations

import asyncio
import gzip
import importlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from omnistage.errors import ProfilerStateError
from omnistage.settings import ProfilerSettings
from omnistage.types import ProfileOptions

logger = logging.getLogger(__name__)

OP_TABLE_ROWS = 100
# vLLM profiler keys a torch stage accepts (one --profiler-config fits every stage) but has no
# use for: it picks its activities from its device, and counts steps itself.
TORCH_ENGINE_IGNORES = frozenset(
    {
        "torch_profiler_activities",
        "torch_profiler_dump_cuda_time_total",
        "warmup_iterations",
        "active_iterations",
        "wait_iterations",
        "ignore_frontend",
        "detailed_trace_annotation",
    }
)
_OP_CATEGORIES = frozenset({"cpu_op", "user_annotation"})


async def warm_up_profiler() -> None:
    """Pay torch.profiler's first-use cost before serving, so StartProfile answers at once.

    The first start imports torch._dynamo (seconds on a small CPU), done here on a thread, and
    initializes Kineto, which wants the thread that imported torch (elsewhere it logs a
    harmless ERROR line): await this on the main thread's event loop.
    """
    await asyncio.to_thread(importlib.import_module, "torch._dynamo")
    with profile(activities=[ProfilerActivity.CPU]):
        pass


class StepProfiler:
    """A profile session over engine steps: delay_iterations, then at most max_iterations.

    `start`, `stop`, `before_step` and `after_step` must all run on the engine's worker thread.
    `export` may run on any thread once `stop` has handed the recording back.
    """

    def __init__(self, settings: ProfilerSettings, *, stage: str, cuda: bool) -> None:
        ignored = sorted(settings.model_fields_set & TORCH_ENGINE_IGNORES)
        if ignored:
            logger.warning(
                "stage %s: the torch engine ignores %s (vLLM's keys); it records the CPU, and "
                "CUDA where it runs on a GPU, over the steps between delay_iterations and "
                "max_iterations",
                stage,
                ", ".join(ignored),
            )
        self._settings = settings
        self._stage = stage
        self._cuda = cuda
        self._armed = False
        self._delay = 0
        self._max_steps = 0
        self._steps_seen = 0
        self._steps_recorded = 0
        self._running: profile | None = None
        self._recording: profile | None = None

    @property
    def active(self) -> bool:
        return self._armed

    def start(self, options: ProfileOptions) -> None:
        if self._armed:
            raise ProfilerStateError("the torch profiler is already running; stop it first")
        settings = self._settings
        delay, max_steps = options.delay_iterations, options.max_iterations
        self._delay = settings.delay_iterations if delay is None else delay
        self._max_steps = settings.max_iterations if max_steps is None else max_steps
        self._steps_seen = self._steps_recorded = 0
        self._recording = None
        self._armed = True
        if self._delay == 0:
            self._begin()

    def before_step(self) -> None:
        if self._armed and self._recording is None and self._steps_seen >= self._delay:
            self._begin()

    def after_step(self) -> None:
        if not self._armed:
            return
        self._steps_seen += 1
        if self._running is not None:
            self._steps_recorded += 1
            if self._max_steps and self._steps_recorded >= self._max_steps:
                logger.info("profiled %d steps (max_iterations); pausing", self._steps_recorded)
                self._halt()

    def stop(self) -> profile | None:
        """Stop recording (a no-op when idle) and hand back what was recorded, if anything."""
        self._halt()
        recording, self._recording = self._recording, None
        if self._armed:
            logger.info(
                "torch profiler stopped: %d of %d steps recorded",
                self._steps_recorded,
                self._steps_seen,
            )
        self._armed = False
        return recording

    def _begin(self) -> None:
        activities = [ProfilerActivity.CPU]
        if self._cuda:
            activities.append(ProfilerActivity.CUDA)
        settings = self._settings
        self._recording = self._running = profile(
            activities=activities,
            record_shapes=settings.torch_profiler_record_shapes,
            profile_memory=settings.torch_profiler_with_memory,
            with_stack=settings.torch_profiler_with_stack,
            with_flops=settings.torch_profiler_with_flops,
        )
        self._running.start()
        self._running.add_metadata_json("omnistage_stage", json.dumps(self._stage))
        logger.info("torch profiler recording from step %d on", self._steps_seen)

    def _halt(self) -> None:
        if self._running is not None:
            running, self._running = self._running, None
            if self._cuda:
                torch.cuda.synchronize()
            running.stop()

    def export(self, recording: profile, session_dir: Path) -> list[Path]:
        """Write `rank0.<ns>.pt.trace.json[.gz]` and torch's op table into `session_dir`.

        With with_stack the op table is left to the session store, which builds it from the
        trace: torch's own would count the other threads' Python frames.
        """
        settings = self._settings
        suffix = ".pt.trace.json.gz" if settings.torch_profiler_use_gzip else ".pt.trace.json"
        trace = session_dir / f"rank0.{time.time_ns()}{suffix}"
        if settings.torch_profiler_with_stack:
            raw = session_dir / f".{trace.name}.raw.json"
            recording.export_chrome_trace(str(raw))
            _write_engine_frames_only(raw, trace)
            return [trace]
        recording.export_chrome_trace(str(trace))
        sort_by = "self_cuda_time_total" if self._cuda else "self_cpu_time_total"
        try:
            table = recording.key_averages().table(sort_by=sort_by, row_limit=OP_TABLE_ROWS)
        except (UnicodeDecodeError, RuntimeError, ValueError) as exc:
            logger.warning("torch could not build its op table (%r); the stage builds one", exc)
            return [trace]
        if not table.strip():
            return [trace]
        out = session_dir / "profiler_out.txt"
        out.write_text(table + "\n")
        return [trace, out]


def _write_engine_frames_only(raw: Path, target: Path) -> None:
    """Copy a trace, keeping Python frames only on threads that ran torch ops."""
    with raw.open() as handle:
        trace: dict[str, Any] = json.load(handle)
    events = trace.get("traceEvents", [])
    op_threads = {(e.get("pid"), e.get("tid")) for e in events if e.get("cat") in _OP_CATEGORIES}
    kept = [
        e
        for e in events
        if e.get("cat") != "python_function" or (e.get("pid"), e.get("tid")) in op_threads
    ]
    logger.info("dropped %d Python frames of other threads", len(events) - len(kept))
    trace["traceEvents"] = kept
    opener: Any = gzip.open if target.name.endswith(".gz") else open
    with opener(target, "wt") as out:
        json.dump(trace, out)
    raw.unlink()
