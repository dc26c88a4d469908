"""Session-wide real servers: vLLM stages on the bundled model, the omni pipeline's talker
(vLLM, random weights) and code2wav (torch), in their own processes (tests/servers.py).

Only the stages that the selected tests use are started: once per session, concurrently, when
the first of those tests runs. Fixtures wait on the gRPC health check, never on log lines;
finalizers SIGTERM, then kill the process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.servers import (
    REFERENCE_MAX_TOKENS,
    REFERENCE_PROMPTS,
    ROOT,
    SESSION_STAGES,
    RunningStage,
    SessionStages,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that stop a shared stage run last, and those that destroy one after them."""

    def rank(item: pytest.Item) -> int:
        if item.get_closest_marker("destroys_stage") is not None:
            return 2
        return 1 if item.get_closest_marker("stops_shared_stage") is not None else 0

    items.sort(key=rank)


def _used_fixtures(session: pytest.Session) -> set[str]:
    """Every fixture name that a selected test uses, directly or through other fixtures."""
    return {name for item in session.items for name in getattr(item, "fixturenames", ())}


@pytest.fixture(scope="session")
def reference_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[subprocess.Popen[str]]:
    """vLLM's own offline greedy output, computed in a separate process while stages start."""
    out = tmp_path_factory.mktemp("reference") / "reference.json"
    payload = json.dumps({"prompts": REFERENCE_PROMPTS, "max_tokens": REFERENCE_MAX_TOKENS})
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "vllm_reference.py"), payload, str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    process.out_path = out  # type: ignore[attr-defined]
    yield process
    if process.poll() is None:
        os.killpg(process.pid, 9)
        process.wait()


@pytest.fixture(scope="session")
def _session_stages(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SessionStages]:
    used = _used_fixtures(request.session)
    if "reference_process" in used:
        request.getfixturevalue("reference_process")  # it runs while the stages start
    stages = SessionStages(tmp_path_factory.mktemp, used & SESSION_STAGES.keys())
    try:
        yield stages
    finally:
        stages.close()


@pytest.fixture(scope="session")
def stage(_session_stages: SessionStages) -> RunningStage:
    """A vLLM stage named 'thinker' with profiling configured."""
    return _session_stages.get("stage")


@pytest.fixture(scope="session")
def rewriter_stage(_session_stages: SessionStages) -> RunningStage:
    """A second profiled vLLM stage, named 'rewriter', for pipelines."""
    return _session_stages.get("rewriter_stage")


@pytest.fixture(scope="session")
def plain_stage(_session_stages: SessionStages) -> RunningStage:
    """A vLLM stage started without a profiler dir."""
    return _session_stages.get("plain_stage")


@pytest.fixture(scope="session")
def talker_stage(_session_stages: SessionStages) -> RunningStage:
    """The omni pipeline's talker: vLLM on the random-weight codec LM, profiler configured."""
    return _session_stages.get("talker_stage")


@pytest.fixture(scope="session")
def code2wav_stage(_session_stages: SessionStages) -> RunningStage:
    """The omni pipeline's code2wav: the torch engine on the vocoder, profiler configured."""
    return _session_stages.get("code2wav_stage")
