"""Times, sizes, shares and percentiles as summary.md prints them, for every section."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ms(us: float | None) -> str:
    """µs as ms (s from a second on); "–" for NaN or None."""
    if us is None or math.isnan(us):
        return "–"
    if abs(us) >= 1e6:
        return f"{us / 1e6:.3f} s"
    return f"{us / 1e3:.3f} ms"


def share(value: float | None) -> str:
    """A fraction as a percentage; "–" for None."""
    return "–" if value is None else f"{100 * value:.1f}%"


def mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole > 0 else "–"
