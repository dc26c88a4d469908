"""The engine watchdog (services/watchdog.py) on a stand-in stage: a process that starts a
child, which starts a grandchild (as vLLM's engine core starts its worker), then the watchdog.

`kill -9` of the stage leaves none of them; a stage that stands the watchdog down on a clean
stop leaves its other processes alone (an in-process stage in a test runner must not stop the
runner's other children). The real thing, on a vLLM stage: tests/integration/test_engine_death.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.servers import ROOT

STAND_IN = """
import asyncio, subprocess, sys, time
from services.watchdog import EngineWatchdog

sleeper = "import subprocess, sys, time; "
sleeper += "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
sleeper += "time.sleep(600)"
child = subprocess.Popen([sys.executable, "-c", sleeper])
while not __import__("psutil").Process(child.pid).children():
    time.sleep(0.01)
dog = EngineWatchdog.start()
print("watchdog", dog.pid, flush=True)
if sys.argv[1] == "clean":
    input()  # the test says when
    asyncio.run(dog.close())
    print("stood down", flush=True)
time.sleep(600)
"""


class StandIns:
    """Stand-in stages, each in its own process group, with one stderr log."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.processes: list[subprocess.Popen[str]] = []

    def start(self, mode: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-c", STAND_IN, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("w"),
            text=True,
            cwd=ROOT,
            start_new_session=True,  # so that the teardown can stop whatever is left
        )
        self.processes.append(process)
        return process


@pytest.fixture
def stand_ins(tmp_path: Path) -> Iterator[StandIns]:
    stand_ins = StandIns(tmp_path / "stage.log")
    yield stand_ins
    for process in stand_ins.processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _watching(process: subprocess.Popen[str], log: Path) -> tuple[psutil.Process, list[int]]:
    """Wait until the watchdog has recorded the stand-in's processes (its first poll)."""
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line.startswith("watchdog "), line
    dog = psutil.Process(int(line.split()[1]))
    while "watching stage process" not in log.read_text():
        assert dog.is_running(), log.read_text()
        psutil.wait_procs([dog], timeout=0.05)  # a poll's period, not a synchronisation
    others = [p.pid for p in psutil.Process(process.pid).children(recursive=True) if p != dog]
    assert len(others) == 2, others  # the child and the grandchild
    return dog, others


def test_kill_9_of_a_stage_leaves_none_of_its_processes(stand_ins: StandIns) -> None:
    log = stand_ins.log
    stage = stand_ins.start("kill")
    dog, others = _watching(stage, log)
    left = [psutil.Process(pid) for pid in others] + [dog]
    os.kill(stage.pid, signal.SIGKILL)
    stage.wait()
    _, alive = psutil.wait_procs(left, timeout=10)
    assert alive == [], f"still running after the stage was killed: {alive}"
    assert "stopped the 2 processes it left" in log.read_text()


def test_a_clean_stop_stands_the_watchdog_down(stand_ins: StandIns) -> None:
    log = stand_ins.log
    stage = stand_ins.start("clean")
    dog, others = _watching(stage, log)
    assert stage.stdin is not None and stage.stdout is not None
    stage.stdin.write("\n")
    stage.stdin.flush()
    assert stage.stdout.readline().strip() == "stood down"
    assert not dog.is_running()
    assert all(psutil.Process(pid).is_running() for pid in others)
    assert "stopped the" not in log.read_text()
