"""omnistage's vLLM plugin: how long vLLM's processes busy-poll their shared-memory queues.

vLLM's multiprocess executor hands each engine step from its engine core to its worker, and the
step's output back, through a shared-memory ring (`MessageQueue`). A reader that finds the ring
empty spins on `sched_yield` for a whole second after its last read (`SpinCondition.busy_loop_s`,
fixed at 1 s in vLLM 0.32, with no setting) before it sleeps on a socket the writer pings on
every write. On a GPU host a core per process is cheap. On a CPU host each vLLM stage's engine
core spins through every step its worker computes, and a stage that has just answered keeps its
worker spinning for a second: on two cores, a thinker that has just finished starved the talker
after it (its stream stalled for up to a second, then came in a burst).

`register` is vLLM's general-plugin entry point (`vllm.general_plugins` in pyproject.toml), which
vLLM calls in each of its processes (the stage's, the engine core's, each worker's) before it
makes any queue. Only where `OMNISTAGE_VLLM_BUSY_POLL_S` is set (a vLLM stage sets it, to
`DEFAULT_BUSY_POLL_S` unless the user has) does it change anything: a plain `vllm serve` from
the same venv keeps vLLM's own behaviour. A reader then spins that long after its last read
before it sleeps on the writer's ping. Those pings can be lost (vLLM looks at the ring again
only every 5 s for that), so a sleeping reader here looks every `RECHECK_MS` as well.

2 ms spans the hand-offs inside a step and not the step itself: it keeps most of the spin's
speed at a quarter less CPU, and 0 is a little slower per step (`bench/vllm_busy_poll.py`;
its numbers are in docs/performance.md).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

# Under vLLM's logger, so that its engine core and workers print it with their own prefix.
logger = logging.getLogger("vllm.omnistage")

BUSY_POLL_ENV = "OMNISTAGE_VLLM_BUSY_POLL_S"
"""Seconds a vLLM queue reader spins before it sleeps, in this stage's vLLM processes."""
DEFAULT_BUSY_POLL_S = "0.002"
"""What a vLLM stage sets it to, where the user has not."""
RECHECK_MS = 1
"""The longest a sleeping reader goes without looking at the ring itself."""


def busy_poll_seconds(text: str) -> float:
    """The value of `BUSY_POLL_ENV`; a ValueError says what to fix."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(
            f"{BUSY_POLL_ENV}={text!r} is not a number of seconds >= 0; set it to, e.g., 0 "
            "(sleep at once) or 1 (vLLM's own spin), or unset it"
        )
    return seconds


_spin_s: float | None = None
"""The spin the readers of this process get, once `register` has patched vLLM."""


def register() -> None:
    """Set how long vLLM's queue readers spin, where the stage asked (idempotent)."""
    global _spin_s
    text = os.environ.get(BUSY_POLL_ENV)
    if text is None:
        return
    patched, _spin_s = _spin_s is not None, busy_poll_seconds(text)
    if patched:
        return
    from vllm.distributed.device_communicators import shm_broadcast

    spin_condition: Any = shm_broadcast.SpinCondition  # patched in place, for this process
    original_init, original_wait = spin_condition.__init__, spin_condition.wait

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        if self.is_reader:
            self.busy_loop_s = _spin_s

    def wait(self: Any, timeout_ms: int | None = None) -> None:
        # A ping can be lost (vLLM re-checks the ring every 5 s for that): look every RECHECK_MS.
        capped = RECHECK_MS if timeout_ms is None else min(timeout_ms, RECHECK_MS)
        original_wait(self, timeout_ms=capped)

    spin_condition.__init__ = __init__
    spin_condition.wait = wait
    logger.info("queue readers spin %g s after a read, then sleep (%s)", _spin_s, BUSY_POLL_ENV)
