"""Profile results reach a remote caller: the orchestrator, in its own process, serves,
lists and deletes the sessions it collected, streams StopProfile's progress, and keeps its
disk its own (output_dir confined to the profile root, files confined by real path).

The pipeline is the omni example's code2wav alone, a real torch stage: its profile stops in
about a second, so every case here runs a real session end to end.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

import omnistage
from omnistage import errors
from omnistage.launch import ServerProcess
from omnistage.types import ProfileReport, StopProgress
from omnistage.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from tests.servers import RunningStage

CODES = list(range(0, 1000, 40))


@dataclass
class Orchestrator:
    process: ServerProcess
    root: Path
    client: omnistage.Client

    @property
    def address(self) -> str:
        return self.process.address


def serve(tmp: Path, code2wav: RunningStage, *extra: str) -> ServerProcess:
    pipeline = tmp / "pipeline.yaml"
    pipeline.write_text(
        f"name: vocoder\nstages:\n  - name: code2wav\n    address: {code2wav.address}\n"
    )
    args = ["orchestrator", "serve", "--pipeline", str(pipeline), "--port", "0"]
    args += ["--host", "127.0.0.1", "--profile-dir", str(tmp / "root"), *extra]
    process = ServerProcess("orchestrator vocoder", args, log_path=tmp / "orchestrator.log")
    process.wait_serving(timeout=60)
    return process


@pytest.fixture(scope="module")
def orch(
    tmp_path_factory: pytest.TempPathFactory, code2wav_stage: RunningStage
) -> Iterator[Orchestrator]:
    tmp = tmp_path_factory.mktemp("sessions")
    process = serve(tmp, code2wav_stage)
    with omnistage.Client(process.address) as client:
        yield Orchestrator(process, tmp / "root", client)
    process.stop()


@pytest.fixture(scope="module")
def stub(orch: Orchestrator) -> Iterator[orchestrator_pb2_grpc.OrchestratorStub]:
    with grpc.insecure_channel(orch.address) as channel:
        yield orchestrator_pb2_grpc.OrchestratorStub(channel)


def profile_once(client: omnistage.Client, output_dir: str = "", **kwargs: object) -> ProfileReport:
    client.start_profile(label="files")
    list(client.generate(token_ids=CODES, timeout=60))
    return client.stop_profile(output_dir, **kwargs)  # type: ignore[arg-type]


def tree(folder: Path) -> dict[str, bytes]:
    """Every regular file below `folder`, by relative path."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


@pytest.fixture(scope="module")
def kept(orch: Orchestrator) -> ProfileReport:
    """One session collected under the profile root's folder `kept/`."""
    return profile_once(orch.client, "kept")


def test_stop_streams_progress_then_downloads_the_whole_session(
    orch: Orchestrator, tmp_path: Path
) -> None:
    events: list[StopProgress] = []
    report = profile_once(orch.client, "", progress=events.append, download_to=tmp_path)
    phases = [e.phase for e in events]
    # per stage: flushing, flushed, pulling..., pulled; then the whole session's steps
    assert phases[:2] == ["flushing", "flushed"] and "pulled" in phases
    assert phases[-3:] == ["merging", "report", "done"]
    flushed = events[1]
    assert flushed.stage == "code2wav" and flushed.bytes_total > 0 and flushed.seconds > 0
    pulled = next(e for e in events if e.phase == "pulled")
    assert pulled.bytes_done == pulled.bytes_total == flushed.bytes_total
    assert "flushed in" in flushed.message and "pulled" in pulled.message
    assert events[-1].report is not None and events[-1].report.session_id == report.session_id
    # The local copy is the orchestrator's folder, byte for byte, and nothing else.
    local = Path(report.downloaded_to)
    assert local == tmp_path / report.session_id
    remote = Path(report.output_dir)
    assert remote.parent == orch.root  # empty output_dir: the profile root itself
    assert tree(local) == tree(remote)
    names = set(tree(local))
    assert {"report.json", "timeline.json.gz", "summary.md"} <= names
    assert any(n.startswith("code2wav/") and n.endswith(".pt.trace.json.gz") for n in names)
    assert "code2wav/profiler_out_code2wav.txt" in names
    assert {f.name for f in report.session_files} == names
    assert not list(local.rglob("*.part"))


@pytest.mark.parametrize(
    "output_dir",
    ["/etc", "../escape", "~/.ssh", "kept/../../escape", "nul\0byte", "/tmp/elsewhere"],
)
def test_an_output_dir_outside_the_root_is_refused_and_the_session_stays_active(
    orch: Orchestrator, output_dir: str
) -> None:
    orch.client.start_profile(label="confined")
    try:
        with pytest.raises(errors.InvalidRequestError) as info:
            orch.client.stop_profile(output_dir)
        message = str(info.value)
        assert str(orch.root) in message and "still profiling" in message
        assert orch.client.pipeline().profiling_active
    finally:
        report = orch.client.stop_profile("confined")
    assert Path(report.output_dir).parent == orch.root / "confined"
    assert not (Path("/etc") / report.session_id).exists()
    assert not (orch.root.parent / "escape").exists()


def test_an_absolute_output_dir_inside_the_root_is_accepted(orch: Orchestrator) -> None:
    report = profile_once(orch.client, str(orch.root / "absolute" / "inside"))
    assert Path(report.output_dir).parent == orch.root / "absolute" / "inside"


def test_list_shows_each_kept_session_with_checksums(
    orch: Orchestrator, kept: ProfileReport
) -> None:
    listing = orch.client.sessions()
    assert listing.profile_root == str(orch.root)
    found = next(s for s in listing.sessions if s.session_id == kept.session_id)
    assert found.path == f"kept/{kept.session_id}"
    on_disk = tree(Path(kept.output_dir))
    assert {f.name: f.sha256 for f in found.files} == {
        name: hashlib.sha256(data).hexdigest() for name, data in on_disk.items()
    }
    assert found.total_bytes == sum(len(d) for d in on_disk.values())
    stamps = [s.modified_unix_ns for s in listing.sessions]
    assert stamps == sorted(stamps, reverse=True)  # newest first


def test_fetch_resumes_a_partial_file_and_rejects_a_wrong_prefix(
    orch: Orchestrator, kept: ProfileReport, tmp_path: Path
) -> None:
    remote = tree(Path(kept.output_dir))
    trace = next(n for n in remote if n.endswith(".pt.trace.json.gz"))
    dest = tmp_path / kept.session_id / trace
    dest.parent.mkdir(parents=True)
    part = dest.with_name(dest.name + ".part")
    half = len(remote[trace]) // 2
    part.write_bytes(remote[trace][:half])  # a download cut half-way
    folder = orch.client.fetch_session(kept.session_id, tmp_path)
    assert tree(folder) == remote and not part.exists()
    # A part whose bytes are not the file's prefix ends in a sha256 mismatch: the resumed
    # bytes are checked, the bad part is deleted, and the final name never holds it.
    other = tmp_path / "other"
    bad = other / kept.session_id / trace
    bad.parent.mkdir(parents=True)
    bad_part = bad.with_name(bad.name + ".part")
    bad_part.write_bytes(b"\0" * half)
    with pytest.raises(errors.OmnistageError, match="sha256") as info:
        orch.client.fetch_session(kept.session_id, other)
    assert "partial file was deleted" in str(info.value)
    assert not bad_part.exists() and not bad.exists()
    # Run again: it starts over and succeeds.
    assert tree(orch.client.fetch_session(kept.session_id, other)) == remote


def test_fetch_never_overwrites_a_different_local_file(
    orch: Orchestrator, kept: ProfileReport, tmp_path: Path
) -> None:
    mine = tmp_path / kept.session_id / "summary.md"
    mine.parent.mkdir(parents=True)
    mine.write_text("my notes")
    with pytest.raises(errors.OmnistageError, match="already exists and differs"):
        orch.client.fetch_session(kept.session_id, tmp_path)
    assert mine.read_text() == "my notes"


def _fetch(
    stub: orchestrator_pb2_grpc.OrchestratorStub, session: str, name: str, **fields: int
) -> grpc.RpcError:
    request = orchestrator_pb2.FetchSessionFileRequest(session_id=session, name=name, **fields)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.FetchSessionFile(request, timeout=30))
    return info.value


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("/etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
        ("../../pipeline.yaml", grpc.StatusCode.INVALID_ARGUMENT),
        ("code2wav/../report.json", grpc.StatusCode.INVALID_ARGUMENT),
        ("report.json\0.txt", grpc.StatusCode.INVALID_ARGUMENT),
        ("x" * 10_000, grpc.StatusCode.INVALID_ARGUMENT),
        ("escape-link", grpc.StatusCode.NOT_FOUND),
        ("code2wav", grpc.StatusCode.NOT_FOUND),  # a folder, not a file
        ("no-such-file", grpc.StatusCode.NOT_FOUND),
    ],
)
def test_fetch_is_confined_to_the_session_folder(
    orch: Orchestrator,
    kept: ProfileReport,
    stub: orchestrator_pb2_grpc.OrchestratorStub,
    name: str,
    code: grpc.StatusCode,
) -> None:
    link = Path(kept.output_dir) / "escape-link"
    if not link.is_symlink():
        link.symlink_to(orch.root.parent / "pipeline.yaml")  # a symlink that leads out
    error = _fetch(stub, kept.session_id, name)
    assert error.code() == code, error.details()
    assert len(error.details()) < 1000  # a long name is not echoed back whole
    listed = next(s for s in orch.client.sessions().sessions if s.session_id == kept.session_id)
    assert "escape-link" not in {f.name for f in listed.files}


def test_a_session_folder_that_is_a_symlink_out_is_not_served(
    orch: Orchestrator, stub: orchestrator_pb2_grpc.OrchestratorStub, tmp_path: Path
) -> None:
    outside = tmp_path / "20260101T000000Z-planted-abcdef"
    outside.mkdir()
    (outside / "report.json").write_text("{}")
    (orch.root / "planted").mkdir(exist_ok=True)
    (orch.root / "planted" / outside.name).symlink_to(outside, target_is_directory=True)
    assert outside.name not in {s.session_id for s in orch.client.sessions().sessions}
    assert _fetch(stub, outside.name, "report.json").code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("fields", "code", "words"),
    [
        ({"chunk_size": 1}, grpc.StatusCode.INVALID_ARGUMENT, "chunk_size"),
        ({"offset": -1}, grpc.StatusCode.INVALID_ARGUMENT, "offset"),
        ({"offset": 1 << 40}, grpc.StatusCode.INVALID_ARGUMENT, "offset"),
    ],
)
def test_bad_chunk_sizes_and_offsets_are_invalid_argument(
    kept: ProfileReport,
    stub: orchestrator_pb2_grpc.OrchestratorStub,
    fields: dict[str, int],
    code: grpc.StatusCode,
    words: str,
) -> None:
    error = _fetch(stub, kept.session_id, "report.json", **fields)
    assert error.code() == code and words in error.details()


def test_unknown_and_malformed_session_ids(
    stub: orchestrator_pb2_grpc.OrchestratorStub, orch: Orchestrator
) -> None:
    assert _fetch(stub, "20990101T000000Z-none-000000", "report.json").code() == (
        grpc.StatusCode.NOT_FOUND
    )
    assert _fetch(stub, "../etc", "passwd").code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(errors.NotFoundError, match="profile list"):
        orch.client.delete_session("20990101T000000Z-none-000000")


def test_delete_removes_a_session_and_only_it(orch: Orchestrator) -> None:
    first, second = profile_once(orch.client, "deleting"), profile_once(orch.client, "deleting")
    freed = orch.client.delete_session(first.session_id)
    assert freed == sum(f.size_bytes for f in first.session_files) > 0
    assert not Path(first.output_dir).exists() and Path(second.output_dir).is_dir()
    kept_ids = {s.session_id for s in orch.client.sessions().sessions}
    assert first.session_id not in kept_ids and second.session_id in kept_ids


def test_delete_refuses_the_session_still_profiling(orch: Orchestrator) -> None:
    session = orch.client.start_profile(label="busy")
    try:
        with pytest.raises(errors.ProfilerStateError, match="still profiling"):
            orch.client.delete_session(session)
    finally:
        orch.client.stop_profile("busy")


def test_retention_keeps_the_newest_sessions_and_logs_the_rest(
    tmp_path: Path, code2wav_stage: RunningStage
) -> None:
    process = serve(tmp_path, code2wav_stage, "--profile-max-sessions", "2")
    try:
        with omnistage.Client(process.address) as client:
            reports = [profile_once(client, f"r{i}") for i in range(3)]
            kept_ids = [s.session_id for s in client.sessions().sessions]
        assert kept_ids == [reports[2].session_id, reports[1].session_id]
        assert not Path(reports[0].output_dir).exists()
    finally:
        process.stop()
    log = (tmp_path / "orchestrator.log").read_text()
    assert f"retention: deleted profile session {reports[0].session_id}" in log


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "omnistage.cli", "profile", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "120"},
    )


def test_cli_stop_download_list_fetch_delete(orch: Orchestrator, tmp_path: Path) -> None:
    address = ("--address", orch.address)
    assert cli("start", *address, "--label", "cli").returncode == 0
    list(orch.client.generate(token_ids=CODES, timeout=60))
    stopped = cli("stop", *address, "--download", str(tmp_path / "a"))
    assert stopped.returncode == 0, stopped.stderr
    out = stopped.stdout
    for words in ("code2wav: flushing", "code2wav: flushed in", "code2wav: pulled", "merging"):
        assert words in out, out
    assert "downloaded" in out and "sha256 checked" in out
    session = next(line.split()[1] for line in out.splitlines() if line.startswith("session "))
    session = session.rstrip(":")
    assert "timeline.json.gz" in stopped.stderr  # a progress bar per file
    listed = cli("list", *address)
    assert listed.returncode == 0 and session in listed.stdout
    assert str(orch.root) in listed.stdout
    fetched = cli("fetch", session, *address, "--to", str(tmp_path / "b"))
    assert fetched.returncode == 0, fetched.stderr
    assert tree(tmp_path / "a" / session) == tree(tmp_path / "b" / session)
    again = cli("fetch", session, *address, "--to", str(tmp_path / "b"))
    assert again.returncode == 0 and "already here" in again.stderr
    deleted = cli("delete", session, *address)
    assert deleted.returncode == 0 and "bytes freed" in deleted.stdout
    gone = cli("fetch", session, *address, "--to", str(tmp_path / "c"))
    assert gone.returncode == 2 and "keeps no session" in gone.stderr
