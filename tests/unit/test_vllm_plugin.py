"""omnistage's vLLM plugin (services/engines/vllm_plugin.py), loaded the way vLLM loads it:
through the `vllm.general_plugins` entry point, in a fresh interpreter each time, since it
patches vLLM's queue class for the whole process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from services.engines.vllm_plugin import BUSY_POLL_ENV, busy_poll_seconds

# Loads vLLM's general plugins as its engine core and workers do, then makes a reader of a real
# zmq notification socket, idle (its last read long ago), and waits once on it with no timeout,
# which in vLLM alone sleeps until a writer pings it.
PROBE = """
import json, os, sys, threading, zmq
from vllm.plugins import load_general_plugins
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
load_general_plugins()
context = zmq.Context()
writer = SpinCondition(is_reader=False, context=context, notify_address="inproc://probe")
reader = SpinCondition(is_reader=True, context=context, notify_address="inproc://probe")
reader.last_read = 0.0
waiter = threading.Thread(target=reader.wait, daemon=True)
waiter.start()
waiter.join(timeout=2)  # patched, it wakes within RECHECK_MS
print(json.dumps({"busy_loop_s": reader.busy_loop_s, "woke": not waiter.is_alive()}))
sys.stdout.flush()
os._exit(0)  # a reader still asleep would hold the zmq context's exit
"""


def probe(env: dict[str, str]) -> dict[str, object]:
    environ = {k: v for k, v in os.environ.items() if k != BUSY_POLL_ENV} | env
    result = subprocess.run(
        [sys.executable, "-c", PROBE], env=environ, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def test_the_plugin_is_registered_with_vllm() -> None:
    plugins = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert plugins.get("omnistage_busy_poll") == "services.engines.vllm_plugin:register"


def test_a_stage_setting_makes_readers_spin_that_long_and_recheck_while_asleep() -> None:
    assert probe({BUSY_POLL_ENV: "0.002"}) == {"busy_loop_s": 0.002, "woke": True}


def test_without_the_setting_vllm_keeps_its_own_spin() -> None:
    # what a plain `vllm serve` from the same venv gets: the 1 s spin, and a sleep until pinged
    assert probe({}) == {"busy_loop_s": 1, "woke": False}


@pytest.mark.parametrize("text", ["abc", "-1", "nan", "inf", ""])
def test_a_bad_setting_says_what_to_fix(text: str) -> None:
    with pytest.raises(ValueError, match=f"{BUSY_POLL_ENV}=.* is not a number of seconds >= 0"):
        busy_poll_seconds(text)


def test_good_settings() -> None:
    assert busy_poll_seconds("0") == 0.0
    assert busy_poll_seconds("0.002") == 0.002
