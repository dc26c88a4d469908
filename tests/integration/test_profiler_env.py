"""A stage started without --profiler-config takes older vLLM's VLLM_TORCH_PROFILER_*
variables as its profiler config, as vLLM-Omni's profiling guide tells users to set them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from omnistage import StageClient
from omnistage.launch import ServerProcess, stage_args
from tests.servers import CODE2WAV_MODEL, ROOT

pytestmark = pytest.mark.slow


def stage_serve(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """`omnistage stage serve ARGS` with `env` added, for a stage that should not start."""
    return subprocess.run(
        [sys.executable, "-m", "omnistage.cli", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_stage_takes_the_profiler_variables(tmp_path: Path) -> None:
    traces = tmp_path / "traces"
    process = ServerProcess(
        "stage 'env'",
        stage_args(name="env", engine="torch", model=CODE2WAV_MODEL),
        log_path=tmp_path / "env.log",
        env={"VLLM_TORCH_PROFILER_DIR": str(traces), "VLLM_TORCH_PROFILER_WITH_STACK": "0"},
    )
    try:
        process.wait_serving(timeout=120)
        with StageClient(process.address) as client:
            info = client.info()
            assert info.profiling_enabled and Path(info.profiler_dir) == traces
            session = client.start_profile(label="env")
            manifest = client.stop_profile()
        assert manifest.session_id == session and manifest.files
        assert (traces / session).is_dir()
    finally:
        process.stop()
    log = (tmp_path / "env.log").read_text()
    assert "the profiler config comes from VLLM_TORCH_PROFILER_DIR → torch_profiler_dir" in log


def test_a_bad_profiler_variable_stops_the_stage_with_its_name(tmp_path: Path) -> None:
    env = {"VLLM_TORCH_PROFILER_DIR": str(tmp_path), "VLLM_PROFILER_MAX_ITERS": "ten"}
    done = stage_serve(stage_args(name="env", engine="torch", model=CODE2WAV_MODEL), env)
    assert done.returncode != 0
    assert "VLLM_PROFILER_MAX_ITERS must be a whole number (got 'ten')" in done.stderr


def test_a_bad_busy_poll_setting_stops_a_vllm_stage_before_vllm_starts() -> None:
    done = stage_serve(stage_args(name="spin"), {"OMNISTAGE_VLLM_BUSY_POLL_S": "fast"})
    assert done.returncode != 0
    assert "OMNISTAGE_VLLM_BUSY_POLL_S='fast' is not a number of seconds >= 0" in done.stderr
    assert "starting vLLM" not in done.stderr
