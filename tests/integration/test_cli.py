"""The command line, as a user runs it: `omnistage up`, then generate, status and profile."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import free_port
from tests.waiting import wait_until


def omnistage(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omnistage.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        children = {child for child, parent in parents.items() if parent in frontier}
        frontier = children - found
        found |= children
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and ") Z " not in stat.read_text()


def wait_gone(pids: set[int], timeout: float = 10) -> None:
    """Every process in `pids` exits soon: none is left behind as an orphan."""
    wait_until(
        lambda: not any(alive(pid) for pid in pids),
        timeout=timeout,
        what=f"no orphan process left of {sorted(pids)}",
    )


def test_bad_pipeline_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("stages:\n  - name: a\n    address: h:1\n    sampling: {temperature: -1}\n")
    result = omnistage("orchestrator", "serve", "--pipeline", str(path), "--port", "0")
    assert result.returncode == 2
    assert "bad.yaml:4" in result.stderr and "temperature" in result.stderr


def test_up_without_launch_section_says_what_to_add(tmp_path: Path) -> None:
    path = tmp_path / "nolaunch.yaml"
    path.write_text("stages:\n  - name: a\n    address: h:1\n")
    result = omnistage("up", str(path))
    assert result.returncode == 2 and "launch" in result.stderr


@pytest.mark.stops_shared_stage  # runs last: it starts one more engine of its own
def test_up_serves_and_ctrl_c_leaves_no_process(tmp_path: Path) -> None:
    stage_port, orchestrator_port = free_port(), free_port()
    pipeline = tmp_path / "solo.yaml"
    pipeline.write_text(
        "name: solo\n"
        "stages:\n"
        "  - name: solo\n"
        "    sampling: {max_tokens: 8, temperature: 0}\n"
        "launch:\n"
        f"  orchestrator_port: {orchestrator_port}\n"
        "  stages:\n"
        f"    solo: {{model: smollm2, port: {stage_port},"
        " profiler_config: {torch_profiler_dir: traces, torch_profiler_with_stack: false}}\n"
    )
    up = subprocess.Popen(
        [sys.executable, "-m", "omnistage.cli", "up", str(pipeline)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + 900
        for line in up.stdout:
            lines.append(line)
            if "SERVING: orchestrator at" in line or time.monotonic() > deadline:
                break
        assert any("SERVING: orchestrator" in line for line in lines), "".join(lines)
        assert any("..." in line and "NOT_SERVING" in line for line in lines)  # progress shown
        address = f"127.0.0.1:{orchestrator_port}"

        status = omnistage("status", "--address", address)
        assert status.returncode == 0 and "solo" in status.stdout and "SERVING" in status.stdout
        started = omnistage("profile", "start", "--address", address, "--stages", "solo")
        assert started.returncode == 0, started.stderr
        answer = omnistage("generate", "--address", address, "--chat", "Say hi.")
        assert answer.returncode == 0 and "[0:solo]" in answer.stdout
        stopped = omnistage("profile", "stop", "--address", address)
        assert stopped.returncode == 0, stopped.stderr
        assert "solo" in stopped.stdout and "ok" in stopped.stdout
        assert list((tmp_path / "profiles").glob("*/solo/profiler_out_solo.txt"))

        children = descendants(up.pid)
        assert len(children) >= 4  # the stage, its vLLM processes, the orchestrator
        up.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert up.wait(timeout=120) == 0
        wait_gone(children)
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        if up.stdout is not None:
            up.stdout.close()


ROOT = Path(__file__).resolve().parents[2]


def start_torch_solo(tmp_path: Path) -> subprocess.Popen[str]:
    """`omnistage up` on a one-stage pipeline of the torch vocoder, output on one pipe."""
    stage_port, orchestrator_port = free_port(), free_port()
    pipeline = tmp_path / "torch-solo.yaml"
    pipeline.write_text(
        "name: torch-solo\n"
        "stages:\n"
        "  - name: code2wav\n"
        "launch:\n"
        f"  orchestrator_port: {orchestrator_port}\n"
        "  stages:\n"
        "    code2wav:\n"
        "      engine: torch\n"
        "      model: 'examples.omni.code2wav:build'\n"
        f"      port: {stage_port}\n"
    )
    return subprocess.Popen(
        [sys.executable, "-m", "omnistage.cli", "up", str(pipeline)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        cwd=ROOT,
    )


def kill_leftovers(up: subprocess.Popen[str], children: set[int]) -> None:
    """After a test of `up`, whatever it failed at: kill what is still alive, close the pipe."""
    for pid in children:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    if up.poll() is None:
        os.killpg(up.pid, signal.SIGKILL)
        up.wait()
    if up.stdout is not None:
        up.stdout.close()


def test_ctrl_c_during_start_up_stops_what_has_started(tmp_path: Path) -> None:
    """Ctrl-C while the stage still loads: `up` stops it, exits 130, and leaves nothing."""
    up = start_torch_solo(tmp_path)
    children: set[int] = set()
    try:
        assert up.stdout is not None
        for line in up.stdout:
            if "==> starting stage 'code2wav'" in line:
                break
        children = wait_until(
            lambda: descendants(up.pid), timeout=30, what="the stage process to start"
        )
        up.send_signal(signal.SIGINT)
        rest = up.stdout.read()
        assert up.wait(timeout=60) == 130, rest
        assert "SERVING: orchestrator" not in rest
        # the stage's engine watchdog exits once the stage has gone: soon, not at once
        wait_gone(children)
    finally:
        kill_leftovers(up, children)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGHUP])
def test_up_dying_or_hung_up_leaves_no_process(tmp_path: Path, sig: signal.Signals) -> None:
    """SIGKILL gives `up` no chance to stop its servers: the kernel sends them SIGTERM. SIGHUP
    (a closed terminal) stops them as Ctrl-C does. A torch stage keeps this cheap."""
    up = start_torch_solo(tmp_path)
    lines: list[str] = []
    children: set[int] = set()
    try:
        assert up.stdout is not None
        for line in up.stdout:
            lines.append(line)
            if "SERVING: orchestrator at" in line:
                break
        assert any("SERVING: orchestrator" in line for line in lines), "".join(lines)
        children = descendants(up.pid)
        assert len(children) >= 2  # the stage and the orchestrator
        up.send_signal(sig)
        code = up.wait(timeout=60)
        assert code == (-signal.SIGKILL if sig is signal.SIGKILL else 0)
        wait_gone(children)
    finally:
        kill_leftovers(up, children)
