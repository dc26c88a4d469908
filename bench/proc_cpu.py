"""CPU time per process role, from /proc: how much CPU a system spends outside its engines.

Method. Each system names its root processes and their roles (the benchmark's own process, an
orchestrator, a stage's or an API server's front end). A sample reads every process's
`utime + stime` from `/proc/<pid>/stat` (all its threads; clock ticks, 10 ms at 100 Hz) and its
title from `/proc/<pid>/cmdline`. A process counts when one of the roots is among its
ancestors: as the role "engine" when its title starts with `VLLM::` (vLLM's EngineCore and
Worker processes name themselves so), else as the nearest root (vLLM's resource tracker counts
with its front end). So the engines of another system that is up at the same time
(`front_doors.py`) are not charged to the one measured. The
CPU seconds of a role over a window are the difference of two samples, per process, summed.
A process that exits within the window loses its last share (none should: engines are started
before and stopped after every window).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENGINE_ROLE = "engine"
ENGINE_TITLE_PREFIX = "VLLM::"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    cpu_ticks: int  # utime + stime
    title: str


def parse_stat(text: str) -> tuple[int, int, int]:
    """(pid, ppid, utime + stime) from the text of /proc/<pid>/stat.

    The command name sits in parentheses and may hold spaces and parentheses itself, so the
    fields are counted from the last ')'.
    """
    head, _, tail = text.rpartition(")")
    pid = int(head.split("(", 1)[0])
    fields = tail.split()
    # tail starts at field 3 (state): ppid is field 4, utime 14 and stime 15 (1-based)
    ppid = int(fields[1])
    utime, stime = int(fields[11]), int(fields[12])
    return pid, ppid, utime + stime


def read_processes(proc: Path = Path("/proc")) -> dict[int, ProcStat]:
    """Every readable process of the machine."""
    found: dict[int, ProcStat] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            pid, ppid, ticks = parse_stat((entry / "stat").read_text())
            raw = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue  # it exited while we read
        title = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        found[pid] = ProcStat(pid, ppid, ticks, title)
    return found


def role_of(pid: int, processes: Mapping[int, ProcStat], roots: Mapping[int, str]) -> str | None:
    """The role of `pid`: "engine" for vLLM's engine processes, else its nearest root's role;
    None when no root is among its ancestors (another user's process, or the engines of a
    system that is up but not measured)."""
    stat = processes.get(pid)
    engine = stat is not None and stat.title.startswith(ENGINE_TITLE_PREFIX)
    seen = set()
    current = pid
    while current not in seen:
        if current in roots:
            return ENGINE_ROLE if engine else roots[current]
        seen.add(current)
        parent = processes.get(current)
        if parent is None:
            return None
        current = parent.ppid
    return None


def sample(roots: Mapping[int, str], proc: Path = Path("/proc")) -> dict[int, tuple[str, int]]:
    """pid -> (role, CPU ticks) for every process of the roots' trees."""
    processes = read_processes(proc)
    out: dict[int, tuple[str, int]] = {}
    for pid, stat in processes.items():
        role = role_of(pid, processes, roots)
        if role is not None:
            out[pid] = (role, stat.cpu_ticks)
    return out


def cpu_seconds_by_role(
    before: Mapping[int, tuple[str, int]],
    after: Mapping[int, tuple[str, int]],
    *,
    ticks_per_second: int = CLOCK_TICKS,
) -> dict[str, float]:
    """CPU seconds per role between two samples. A process born in between counts from 0."""
    totals: dict[str, float] = {}
    for pid, (role, ticks) in after.items():
        start = before.get(pid, (role, 0))[1]
        totals[role] = totals.get(role, 0.0) + max(0, ticks - start) / ticks_per_second
    return totals


def outside_engines(by_role: Mapping[str, float]) -> float:
    """The CPU seconds of every role but the engines'."""
    return sum(seconds for role, seconds in by_role.items() if role != ENGINE_ROLE)
