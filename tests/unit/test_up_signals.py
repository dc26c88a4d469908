"""`omnistage up`'s stop signals: the first stops, any later one only says so."""

from __future__ import annotations

import signal

import pytest

from omnistage.up import StopSignals


def test_the_first_signal_during_start_up_interrupts_the_launch() -> None:
    stop = StopSignals()
    with pytest.raises(KeyboardInterrupt):
        stop.handle(signal.SIGINT, None)
    assert stop.requested.is_set()


def test_a_second_ctrl_c_does_not_cut_the_stop_short(capsys: pytest.CaptureFixture[str]) -> None:
    stop = StopSignals()
    with pytest.raises(KeyboardInterrupt):
        stop.handle(signal.SIGINT, None)
    stop.handle(signal.SIGINT, None)  # while launch_pipeline stops what it started: no raise
    stop.handle(signal.SIGTERM, None)
    assert capsys.readouterr().err.count("already stopping every process") == 2


def test_once_running_a_signal_asks_the_wait_loop_to_stop() -> None:
    stop = StopSignals()
    stop.launched = True
    stop.handle(signal.SIGHUP, None)  # no raise: the loop sees the request and stops all
    assert stop.requested.is_set()
