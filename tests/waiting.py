"""Waiting for a condition in tests, never for a fixed time.

`wait_until` (threads) and `eventually` (asyncio) poll a predicate until it holds and return
its value, or fail naming what they waited for and the last value seen. `wait_for_log` waits
for a line in servers' log files. Their short poll interval is the only sleep: a test that
passes does not wait longer than its condition takes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")
POLL_S = 0.02


def _timed_out(what: str, timeout: float, last: object) -> None:
    pytest.fail(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def wait_until(predicate: Callable[[], T], *, timeout: float, what: str) -> T:
    """`predicate()`'s first truthy value, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            _timed_out(what, timeout, value)
        time.sleep(POLL_S)  # the poll interval, not a wait for the condition


async def eventually(predicate: Callable[[], T], *, timeout: float, what: str) -> T:
    """`wait_until` inside an event loop: other tasks run between polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            _timed_out(what, timeout, value)
        await asyncio.sleep(POLL_S)  # the poll interval, not a wait for the condition


def wait_for_log(paths: list[Path], text: str, *, timeout: float) -> str:
    """The first line that contains `text` in any of the logs at `paths`, once it is written."""

    def line() -> str:
        for path in paths:
            if path.exists():
                for found in path.read_text(errors="replace").splitlines():
                    if text in found:
                        return found
        return ""

    return wait_until(line, timeout=timeout, what=f"{text!r} in {[str(p) for p in paths]}")
