"""A stage's watchdog: when the stage dies, however it dies (SIGKILL too), the processes it
started die with it.

vLLM runs its engine core and worker as multiprocessing children of the stage. Those do not
notice when the stage is killed, and would hold their gigabytes for good. So the stage starts
this watchdog (`python -m services.watchdog STAGE_PID`) before its engine, with the read end of
a pipe as the watchdog's stdin:

- while the stage lives, the watchdog records every descendant of the stage, every `POLL_S`;
- when the pipe reaches end of file (the kernel closes the stage's end however it exits) or
  the watchdog is orphaned, it sends SIGTERM to each recorded process still running (and to
  their children), then SIGKILL to those still there after `TERM_GRACE_S`;
- a stage that stops cleanly has closed its engine itself: it writes one byte first, and the
  watchdog just exits.

It signals recorded processes one by one (psutil checks each one's start time, so a reused pid
is never hit), never a process group: a stage may share its group with unrelated processes.
It ignores SIGINT and SIGTERM, which a terminal or a supervisor sends to the whole group: the
stage is then stopping, and the watchdog is what cleans up if that stop goes wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
from collections.abc import Iterable

import psutil

logger = logging.getLogger(__name__)

POLL_S = 0.5
"""How often the stage's descendants are recorded (and the stage's death is looked for)."""
TERM_GRACE_S = 3.0
"""How long the stage's processes get to exit on SIGTERM before they are killed."""
STAND_DOWN = b"x"
"""What a stage that stops cleanly writes before closing the pipe."""


class EngineWatchdog:
    """The stage's end: starts the watchdog process, and stands it down on a clean stop."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self._process = process

    @classmethod
    def start(cls) -> EngineWatchdog:
        """A watchdog process for this process; start it before the engine."""
        command = [sys.executable, "-m", "services.watchdog", str(os.getpid())]
        return cls(subprocess.Popen(command, stdin=subprocess.PIPE, close_fds=True))

    @property
    def pid(self) -> int:
        return self._process.pid

    async def close(self, timeout: float = 10.0) -> None:
        """Stand the watchdog down (the engine is closed) and wait for it to exit."""
        pipe = self._process.stdin
        if pipe is not None and not pipe.closed:
            with contextlib.suppress(BrokenPipeError):
                pipe.write(STAND_DOWN)
                pipe.flush()
            with contextlib.suppress(BrokenPipeError):
                pipe.close()
        try:
            await asyncio.to_thread(self._process.wait, timeout)
        except subprocess.TimeoutExpired:
            logger.warning("the engine watchdog (pid %d) did not exit; killing it", self.pid)
            self._process.kill()
            await asyncio.to_thread(self._process.wait)


def watch(stage_pid: int, death_fd: int, *, poll_s: float = POLL_S) -> set[psutil.Process]:
    """Record the stage's descendants until it dies; return them, or an empty set when the
    stage stood the watchdog down."""
    me = os.getpid()
    recorded: set[psutil.Process] = set()
    try:
        stage = psutil.Process(stage_pid)
    except psutil.NoSuchProcess:
        return recorded
    first = True
    while True:
        try:
            recorded.update(p for p in stage.children(recursive=True) if p.pid != me)
        except psutil.NoSuchProcess:
            return recorded
        if first:
            logger.info("engine watchdog (pid %d) watching stage process %d", me, stage_pid)
            first = False
        readable, _, _ = select.select([death_fd], [], [], poll_s)
        if readable:
            return set() if os.read(death_fd, 1) == STAND_DOWN else recorded
        if os.getppid() != stage_pid:  # orphaned: the stage died, a forked child holds the pipe
            return recorded


def stop_all(processes: Iterable[psutil.Process], *, grace_s: float = TERM_GRACE_S) -> list[int]:
    """SIGTERM each process still running and its children, SIGKILL what outlives `grace_s`;
    return the pids that were still running."""
    alive = {p for p in processes if p.is_running()}
    for process in list(alive):
        with contextlib.suppress(psutil.Error):
            alive.update(process.children(recursive=True))  # started after the last poll
    alive.discard(psutil.Process())
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, left = psutil.wait_procs(alive, timeout=grace_s)
    for process in left:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(left, timeout=grace_s)
    return sorted(p.pid for p in alive)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    (pid,) = argv
    stage_pid = int(pid)
    left = watch(stage_pid, sys.stdin.fileno())
    stopped = stop_all(left) if left else []
    if stopped:
        logger.warning(
            "watchdog: stage process %d is gone; stopped the %d processes it left: %s",
            stage_pid,
            len(stopped),
            stopped,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
