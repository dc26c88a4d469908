"""What every benchmark records about the machine, and how it aligns its table."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def proc_field(path: str, key: str) -> str:
    """A `key: value` field of a /proc file, or "unknown"."""
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    except OSError:
        pass
    return "unknown"


def meminfo_gib(key: str) -> float:
    value = proc_field("/proc/meminfo", key)  # "24596172 kB"
    return round(int(value.split()[0]) / (1 << 20), 2) if value != "unknown" else math.nan


def machine_info() -> dict[str, Any]:
    """The machine and the versions of what the benchmark measured."""
    versions: dict[str, str] = {}
    for module in ("vllm", "torch", "grpc", "omnistage"):
        try:
            versions[module] = str(__import__(module).__version__)
        except ImportError:
            versions[module] = "not installed"
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": proc_field("/proc/cpuinfo", "model name"),
        "ram_total_gib": meminfo_gib("MemTotal"),
        "ram_available_gib": meminfo_gib("MemAvailable"),
        "python": platform.python_version(),
        "loadavg": list(os.getloadavg()),
        "versions": versions,
    }


def align_table(lines: Sequence[Sequence[str]]) -> str:
    """The first row as a header over a rule; the first column left-aligned, the rest right."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for index, line in enumerate(lines):
        cells = [line[0].ljust(widths[0])]
        cells += [cell.rjust(width) for cell, width in zip(line[1:], widths[1:], strict=True)]
        out.append("  ".join(cells))
        if index == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)
