"""Work on many traces at once: one worker process per trace, as many as there are cores.

Traces are parsed in Python, so threads would share one core; each trace goes to a
``spawn`` ed worker process instead (``spawn``, not ``fork``: the orchestrator calls this from
a gRPC server's thread). Starting a worker costs about a second, so small batches run in the
calling process. The largest traces start first, so that the last one to finish is small.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import TypeVar

PARALLEL_BYTES = 16 << 20
"""Batches with fewer trace bytes than this run in-process."""

J = TypeVar("J")
R = TypeVar("R")


def run_all(
    fn: Callable[[J], R],
    jobs: Sequence[J],
    paths: Sequence[Path],
    *,
    workers: int | None = None,
    done: Callable[[J, R], None] | None = None,
) -> list[R]:
    """``fn(job)`` for every job (``paths[i]`` is job i's trace, for its size), in job order.

    ``fn`` must be a module-level function and the jobs plain data: they cross processes.
    ``done`` is called (in this process) as each job finishes.
    """
    sizes = [_size(p) for p in paths]
    count = min(workers or os.cpu_count() or 1, len(jobs))
    results: dict[int, R] = {}
    if not in_workers(paths, workers) or count <= 1:
        for i, job in enumerate(jobs):
            results[i] = fn(job)
            if done is not None:
                done(job, results[i])
        return [results[i] for i in range(len(jobs))]
    order = sorted(range(len(jobs)), key=lambda i: -sizes[i])
    with ProcessPoolExecutor(count, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(fn, jobs[i]): i for i in order}
        for future in as_completed(futures):
            i = futures[future]
            results[i] = future.result()
            if done is not None:
                done(jobs[i], results[i])
    return [results[i] for i in range(len(jobs))]


def in_workers(paths: Sequence[Path], workers: int | None = None) -> bool:
    """Whether :func:`run_all` would use worker processes for these traces."""
    return (workers or os.cpu_count() or 1) > 1 and total_bytes(paths) >= PARALLEL_BYTES


def total_bytes(paths: Sequence[Path]) -> int:
    return sum(_size(p) for p in paths)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0
