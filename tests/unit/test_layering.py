"""The layering the design asks for, checked on the source: each server in its own package,
neither importing the other, the shared parts in `omnistage`, which loads grpc only when a
client or server is used; and the size limits of package modules and their functions."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from omnistage.convert import (
    pipeline_status_from_pb,
    pipeline_status_to_pb,
    stage_description_from_pb,
    stage_description_to_pb,
)
from omnistage.types import EngineInfo, PipelineStatus, StageDescription, StageStatus

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("omnistage", "services", "orchestrator")
# The CLI's `stage serve`, `orchestrator serve` and `up` start the servers, so they may import
# them (lazily).
LAUNCHERS = {"omnistage/cli_serve.py", "omnistage/up.py"}
MAX_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_TYPE_IGNORES = 3


def _modules(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "v1" not in p.parts)


def _imported(path: Path) -> set[str]:
    """The top-level packages a module imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("services", {"orchestrator"}),
        ("orchestrator", {"services"}),
        ("omnistage", {"services", "orchestrator"}),
    ],
)
def test_packages_import_only_their_own_layer(package: str, forbidden: set[str]) -> None:
    crossing = {
        str(path.relative_to(ROOT)): sorted(_imported(path) & forbidden)
        for path in _modules(package)
        if str(path.relative_to(ROOT)) not in LAUNCHERS and _imported(path) & forbidden
    }
    assert crossing == {}


def test_importing_the_shared_types_and_traces_loads_no_grpc() -> None:
    code = (
        "import sys, omnistage, omnistage.types, omnistage.traces, omnistage.errors\n"
        "print(sorted(m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')))\n"
        "omnistage.Client\n"  # the lazy attribute still resolves
        "print('grpc' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True"


def test_package_modules_stay_small() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for package in PACKAGES
        for p in _modules(package)
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_package_functions_stay_short() -> None:
    # From `def` to the last line, docstring and comments included; nested functions count
    # on their own too. No exemptions: long flat declarations (argparse, the tables of a
    # config) are split into one function per group as well.
    long = {
        f"{p.relative_to(ROOT)}:{node.lineno} {node.name}": length
        for package in PACKAGES
        for p in _modules(package)
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (length := (node.end_lineno or node.lineno) - node.lineno + 1) > MAX_FUNCTION_LINES
    }
    assert long == {}


def test_few_type_ignores_in_package_code() -> None:
    ignores = [
        f"{p.relative_to(ROOT)}:{i}"
        for package in PACKAGES
        for p in _modules(package)
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "# type: ignore" in line
    ]
    assert len(ignores) <= MAX_TYPE_IGNORES, ignores


def test_clients_plain_types_survive_the_wire() -> None:
    stage = StageDescription(
        name="talker",
        engine=EngineInfo("torch", "tiny", 2, "2.6", 512, "cuda"),
        profiling_enabled=True,
        profiling_active=False,
        profile_session_id="",
        server_time_unix_ns=1_796_000_000_123_456_789,
        version="0.1.0",
        profiler_dir="profiles",
    )
    assert stage_description_from_pb(stage_description_to_pb(stage)) == stage
    pipeline = PipelineStatus(
        name="omni",
        stages=(
            StageStatus("thinker", 0, ("h:1", "h:2"), "SERVING,UNAVAILABLE", True, "vllm", "m"),
            StageStatus("talker", 1, (), "", False, error="no replica resolved"),
        ),
        profiling_active=True,
        profile_session_id="20261202T000000Z-x",
    )
    assert pipeline_status_from_pb(pipeline_status_to_pb(pipeline)) == pipeline


def test_a_profile_report_survives_the_wire_but_for_the_local_copy() -> None:
    from omnistage.convert import report_from_pb, report_to_pb
    from omnistage.types import (
        CriticalSegment,
        ProfileFileInfo,
        ProfileReport,
        ProfileSlimming,
        RequestCriticalPath,
        StageProfileResult,
        StageStepTime,
    )

    files = (ProfileFileInfo("trace.json.gz", 123, "ab" * 32),)
    wait = CriticalSegment(
        "code2wav", "waiting_for_upstream", 1_796_000_000_000_000_000, 1_796_000_000_100_000_007
    )
    compute = CriticalSegment("code2wav", "compute", wait.end_unix_ns, wait.end_unix_ns + 5)
    path = RequestCriticalPath(
        "r1",
        wait.start_unix_ns,
        wait.end_unix_ns,
        compute.end_unix_ns,
        (wait,),
        (wait, compute),
        steps=(StageStepTime("code2wav", 5, 4, 2),),
    )
    report = ProfileReport(
        session_id="s1",
        output_dir="out/s1",
        stages=(
            StageProfileResult("thinker", "h:1", True, files=files, stop_seconds=1.5),
            StageProfileResult("talker", "h:2", False, error="gone"),
        ),
        timeline="out/s1/timeline.json.gz",
        slimming=ProfileSlimming(10, 5, 100, 50, 2, 1),
        session_files=files,
        timelines=("a.json.gz", "a.pftrace.gz"),
        warnings=("one trace was cut",),
        downloaded_to="here",
        summary_html="out/s1/summary.html",
        critical_paths=(path,),
        timing_only=True,
    )
    back = report_from_pb(report_to_pb(report))
    assert back.downloaded_to == ""
    assert back == dataclasses.replace(report, downloaded_to="")
    no_slim = dataclasses.replace(report, slimming=None, downloaded_to="")
    assert report_from_pb(report_to_pb(no_slim)) == no_slim
