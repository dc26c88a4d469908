"""`omnistage up`'s stop signals: the first stops, any later one only says so."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from omnistage import up
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


class QuietProcess:
    """Stands in for a server process: it is SERVING as soon as it is asked."""

    def __init__(self, name: str, *args: object, **kwargs: object) -> None:
        self.name, self.address, self.http_port = name, "127.0.0.1:1", 0

    def wait_serving(self, **kwargs: object) -> None:
        return None

    def stop(self) -> None:
        return None


def test_up_is_past_start_up_before_it_prints_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A caller who reads the SERVING line and then signals must get a clean stop (exit 0), not
    the start-up interrupt (130): the launch is marked done before the line is printed."""
    monkeypatch.setattr(up, "ServerProcess", QuietProcess)
    monkeypatch.setattr(up, "_start_stage", lambda pipeline, name, spec, logs: QuietProcess(name))
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        "name: p\nstages:\n  - name: code2wav\nlaunch:\n  stages:\n    code2wav:\n"
        "      engine: torch\n      model: 'examples.omni.code2wav:build'\n      port: 1\n"
    )
    stop = StopSignals()
    seen: list[bool] = []

    def mark() -> None:
        stop.mark_launched()
        seen.append("SERVING: orchestrator" in capsys.readouterr().out)

    up.launch_pipeline(pipeline, on_serving=mark, log_dir=tmp_path)
    assert seen == [False]
    assert "SERVING: orchestrator" in capsys.readouterr().out
    stop.handle(signal.SIGHUP, None)  # no KeyboardInterrupt: the wait loop stops all, exit 0
    assert stop.requested.is_set()
