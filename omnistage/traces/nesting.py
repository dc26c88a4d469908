"""The one nesting walk: which slice of a thread encloses which.

Slices on one thread nest by time. Sorted by ``(ts, -dur)`` they are walked with a stack, as
torch's ``EventList._populate_cpu_children`` does: a slice is a child of the innermost open
slice that contains it entirely; one that starts at or after the end of the open slice, or
ends after it, closes it. Boundaries are compared with a tolerance of a few nanoseconds (more
for traces with huge absolute timestamps, whose floats cannot hold nanoseconds), so that a
child ending exactly where its parent ends stays a child.

The op table (:mod:`omnistage.traces.optable`) and slimming (:mod:`omnistage.traces.slimming`)
both nest with :func:`parents`; :func:`union` measures busy time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

MIN_EPS_US = 5e-4
"""Half a nanosecond: traces are written with nanosecond resolution."""


def tolerance(max_abs_ts: float) -> float:
    """The boundary tolerance for timestamps up to ``max_abs_ts`` µs."""
    return max(MIN_EPS_US, 4 * math.ulp(max_abs_ts))


def sort_order(
    thread: npt.NDArray[np.int64], ts: npt.NDArray[np.float64], dur: npt.NDArray[np.float64]
) -> npt.NDArray[np.intp]:
    """The order that groups slices by thread, then sorts them by start, longest first."""
    order: npt.NDArray[np.intp] = np.lexsort((-dur, ts, thread))
    return order


class Nester:
    """:func:`parents`, fed block by block: open slices carry over from one block to the next."""

    def __init__(self, eps: float) -> None:
        self.eps = eps
        self._end: list[float] = []
        self._pos: list[int] = []
        self._thread: int | None = None

    def feed(
        self,
        thread: Sequence[int],
        ts: Sequence[float],
        dur: Sequence[float],
        leaf: Sequence[bool] | None = None,
        *,
        offset: int = 0,
    ) -> list[int]:
        """The parents (positions counted from the first block) of the next block's slices."""
        eps = self.eps
        stack_end, stack_pos = self._end, self._pos
        current = self._thread
        out = [-1] * len(ts)
        for i, (th, start, length) in enumerate(zip(thread, ts, dur, strict=True)):
            if th != current:
                current = th
                stack_end.clear()
                stack_pos.clear()
            end = start + length
            while stack_end:
                top = stack_end[-1]
                if start >= top - eps or end > top + eps:
                    stack_end.pop()
                    stack_pos.pop()
                else:
                    out[i] = stack_pos[-1]
                    break
            if leaf is None or not leaf[i]:
                stack_end.append(end)
                stack_pos.append(offset + i)
        self._thread = current
        return out


BLOCK = 1 << 18


def parents(
    thread: npt.NDArray[np.int64],
    ts: npt.NDArray[np.float64],
    dur: npt.NDArray[np.float64],
    leaf: npt.NDArray[np.bool_] | None = None,
    *,
    eps: float,
) -> npt.NDArray[np.int64]:
    """For slices sorted by :func:`sort_order`: each one's enclosing slice (position), or -1.

    A slice marked ``leaf`` can have a parent but is never one (runtime calls: nothing nests
    in them). The arrays are walked in blocks, so that only a block's worth of Python
    numbers exists at a time.
    """
    nester = Nester(eps)
    out = np.empty(ts.size, dtype=np.int64)
    for lo in range(0, ts.size, BLOCK):
        hi = lo + BLOCK
        out[lo:hi] = nester.feed(
            thread[lo:hi].tolist(),
            ts[lo:hi].tolist(),
            dur[lo:hi].tolist(),
            None if leaf is None else leaf[lo:hi].tolist(),
            offset=lo,
        )
    return out


def union(
    starts: npt.NDArray[np.float64], ends: npt.NDArray[np.float64]
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The union of intervals, as sorted, disjoint ``(starts, ends)``."""
    if starts.size == 0:
        return starts, ends
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    reach = np.maximum.accumulate(e)
    new = np.empty(s.size, dtype=bool)
    new[0] = True
    new[1:] = s[1:] > reach[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, s.size - 1)
    return s[first], reach[last]
