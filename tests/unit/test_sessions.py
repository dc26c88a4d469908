"""Session folders: which op table becomes profiler_out_<stage>.txt, the manifest StopProfile
returns, and file names refused before any filesystem access."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from omnistage.errors import InvalidRequestError
from omnistage.types import EngineInfo, GenerateInput, ProfileOptions
from omnistage.v1 import common_pb2, stage_pb2, stage_pb2_grpc
from services.config import ProfilerSettings, StageConfig
from services.profiling.sessions import ProfileSessionStore, ensure_op_table
from services.server import StageServer


def test_engine_table_wins_over_front_end_table_whatever_the_host_name(tmp_path: Path) -> None:
    # A pod name that sorts before "rank0" must not make the front end's table the stage's.
    (tmp_path / "a-pod_12.async_llm.profiler_out.txt").write_text("front end ops\n")
    (tmp_path / "rank0.profiler_out.txt").write_text("engine ops\n")
    table = ensure_op_table(tmp_path, "thinker")
    assert table == tmp_path / "profiler_out_thinker.txt"
    assert table.read_text() == "engine ops\n"
    kept = tmp_path / "profiler_out_thinker.a-pod_12.async_llm.profiler_out.txt"
    assert kept.read_text() == "front end ops\n"


def test_empty_tables_are_dropped_and_none_without_a_trace(tmp_path: Path) -> None:
    (tmp_path / "rank0.profiler_out.txt").write_text("\n")
    assert ensure_op_table(tmp_path, "s") is None
    assert not list(tmp_path.iterdir())


class TraceOnlyEngine:
    """An engine whose profiler writes a real torch trace (`.pt.trace.json.gz`) and no op
    table. Between start and stop it multiplies matrices, so the trace holds `aten::mm`."""

    def __init__(self) -> None:
        self._profile: Any = None

    async def start(self) -> None:
        pass

    def generate(self, request: GenerateInput) -> Any:
        raise NotImplementedError

    async def abort(self, request_id: str) -> None:
        pass

    async def start_profile(self, session_dir: Path, options: ProfileOptions) -> None:
        self._profile = profile(activities=[ProfilerActivity.CPU])
        self._profile.__enter__()
        x = torch.randn(32, 32)
        for _ in range(5):
            x = torch.mm(x, x).tanh()

    async def stop_profile(self, session_dir: Path) -> list[Path]:
        self._profile.__exit__(None, None, None)
        plain = session_dir / "rank0.pt.trace.json"
        self._profile.export_chrome_trace(str(plain))
        trace = session_dir / "rank0.pt.trace.json.gz"
        with plain.open("rb") as src, gzip.open(trace, "wb") as dst:
            shutil.copyfileobj(src, dst)
        plain.unlink()
        return [trace]

    def info(self) -> EngineInfo:
        return EngineInfo(engine="fake", model="none")

    async def close(self) -> None:
        pass


def _stage_config(root: Path) -> StageConfig:
    return StageConfig(
        name="thinker",
        model="none",
        host="127.0.0.1",
        profiler=ProfilerSettings(torch_profiler_dir=str(root)),
    )


def test_stop_profile_builds_the_op_table_when_the_engine_wrote_none(tmp_path: Path) -> None:
    """Start, stop and fetch over real gRPC, in process, on an engine that writes only a trace."""

    async def scenario() -> tuple[stage_pb2.StopProfileResponse, dict[str, bytes]]:
        engine: Any = TraceOnlyEngine()
        stage = StageServer(_stage_config(tmp_path), engine)
        await stage.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{stage.port}") as channel:
                stub = stage_pb2_grpc.StageStub(channel)
                await stub.StartProfile(stage_pb2.StartProfileRequest(label="t"), timeout=30)
                stop = await stub.StopProfile(stage_pb2.StopProfileRequest(), timeout=60)
                fetched = {}
                for item in stop.files:
                    request = stage_pb2.FetchProfileFileRequest(
                        session_id=stop.session_id, name=item.name
                    )
                    chunks: list[common_pb2.FileChunk] = [
                        c async for c in stub.FetchProfileFile(request, timeout=30)
                    ]
                    fetched[item.name] = b"".join(c.data for c in chunks)
                return stop, fetched
        finally:
            await stage.stop(grace=1)

    stop, fetched = asyncio.run(scenario())
    session_dir = tmp_path / stop.session_id
    assert Path(stop.profile_dir) == session_dir
    assert {f.name for f in stop.files} == {"rank0.pt.trace.json.gz", "profiler_out_thinker.txt"}
    for item in stop.files:
        on_disk = (session_dir / item.name).read_bytes()
        assert item.size_bytes == len(on_disk) > 0
        assert item.sha256 == hashlib.sha256(on_disk).hexdigest()
        assert fetched[item.name] == on_disk
    table = fetched["profiler_out_thinker.txt"].decode()
    assert "aten::mm" in table and len(table.splitlines()) > 3


class FilesystemTouched(AssertionError):
    pass


@pytest.fixture
def no_filesystem(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way `session_file` could reach the disk fails the test."""

    def touched(*args: object, **kwargs: object) -> Any:
        raise FilesystemTouched(f"the filesystem was accessed with {args}")

    for name in ("is_dir", "is_file", "exists", "open", "stat", "resolve", "iterdir"):
        monkeypatch.setattr(Path, name, touched)
    for name in ("stat", "lstat", "open", "listdir", "scandir"):
        monkeypatch.setattr(os, name, touched)


SESSION = "20260101T000000Z-s-abc123"


def _store() -> ProfileSessionStore:
    engine: Any = TraceOnlyEngine()
    return ProfileSessionStore(stage_name="s", engine=engine, root=Path("/profiles"))


@pytest.mark.parametrize(
    ("session_id", "name", "words"),
    [
        (SESSION, "../x", "without '/', '..' or an absolute path"),
        (SESSION, "a/b", "without '/', '..' or an absolute path"),
        (SESSION, "/etc/x", "without '/', '..' or an absolute path"),
        (SESSION, "..\\x", "without '/', '..' or an absolute path"),
        (SESSION, "..", "without '/', '..' or an absolute path"),
        ("..", "x", "is not a session id"),
        (f"../{SESSION}", "x", "is not a session id"),
        ("/etc", "x", "is not a session id"),
    ],
)
def test_names_outside_the_session_are_refused_without_reading_anything(
    no_filesystem: None, session_id: str, name: str, words: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        _store().session_file(session_id, name)
    assert words in str(info.value)


def test_the_filesystem_guard_does_catch_a_read(no_filesystem: None) -> None:
    """The guard above is real: a plain name does reach the disk, and is caught."""
    with pytest.raises(FilesystemTouched):
        _store().session_file(SESSION, "x.txt")


def test_fetch_reads_nothing_for_a_refused_name(no_filesystem: None) -> None:
    async def first_chunk() -> None:
        async for _ in _store().read_chunks(SESSION, "../x"):
            pass

    with pytest.raises(InvalidRequestError):
        asyncio.run(first_chunk())
