"""Session folders: which op table becomes profiler_out_<stage>.txt, the manifest StopProfile
returns, file names refused before any filesystem access, files confined by real path, and
FetchProfileFile's chunk sizes and resume offsets, with the status codes a caller sees."""

from __future__ import annotations

import asyncio
import contextlib
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
from services.servicer import StageServicer
from tests.unit.fake_grpc import Aborted, FakeContext, mapped


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
        (SESSION, "../x", "must be a plain file name from the manifest"),
        (SESSION, "a/b", "must be a plain file name from the manifest"),
        (SESSION, "/etc/x", "must be a plain file name from the manifest"),
        (SESSION, "..\\x", "must be a plain file name from the manifest"),
        (SESSION, "..", "must be a plain file name from the manifest"),
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


# --- Files confined by real path, chunk sizes and offsets, seen through FetchProfileFile ---

MiB = 1 << 20


def _fetch(
    store: ProfileSessionStore, session_id: str, name: str, **fields: int
) -> tuple[list[common_pb2.FileChunk], tuple[grpc.StatusCode, str] | None]:
    """Run the servicer's FetchProfileFile: the chunks sent, and the status it aborted with."""
    engine: Any = TraceOnlyEngine()
    servicer = StageServicer(name="s", engine=engine, sessions=store)
    request = stage_pb2.FetchProfileFileRequest(session_id=session_id, name=name, **fields)

    async def run() -> tuple[list[common_pb2.FileChunk], tuple[grpc.StatusCode, str] | None]:
        context = FakeContext()
        chunks = []

        async def serve() -> None:
            async for chunk in servicer.FetchProfileFile(request, context):  # type: ignore[arg-type]
                chunks.append(chunk)

        with contextlib.suppress(Aborted):
            await mapped(context, "FetchProfileFile", serve())
        return chunks, context.status

    return asyncio.run(run())


@pytest.fixture
def served(tmp_path: Path) -> tuple[ProfileSessionStore, bytes]:
    """A store whose root holds SESSION with `data.bin` (2.5 MiB + 7 bytes, all distinct
    positions), and a secret file just outside the root."""
    root = tmp_path / "profiles"
    (root / SESSION).mkdir(parents=True)
    content = os.urandom(5 * MiB // 2 + 7)
    (root / SESSION / "data.bin").write_bytes(content)
    (tmp_path / "secret.txt").write_text("outside the profile root\n")
    engine: Any = TraceOnlyEngine()
    return ProfileSessionStore(stage_name="s", engine=engine, root=root), content


class LinkingEngine(TraceOnlyEngine):
    """Writes an op table and, beside it, a symlink to a file outside the session."""

    def __init__(self, target: Path) -> None:
        super().__init__()
        self._target = target

    async def start_profile(self, session_dir: Path, options: ProfileOptions) -> None:
        pass

    async def stop_profile(self, session_dir: Path) -> list[Path]:
        table = session_dir / "rank0.profiler_out.txt"
        table.write_text("aten::mm  1\n")
        (session_dir / "passwd").symlink_to(self._target)
        return [table]


def test_a_symlink_out_of_a_session_is_neither_listed_nor_served(tmp_path: Path) -> None:
    outside = tmp_path / "passwd"
    outside.write_text("root:x:0:0\n")
    engine: Any = LinkingEngine(outside)
    store = ProfileSessionStore(stage_name="s", engine=engine, root=tmp_path / "profiles")

    async def record() -> list[str]:
        await store.start(ProfileOptions(label="link"))
        return [f.name for f in (await store.stop()).files]

    names = asyncio.run(record())
    (session_dir,) = (tmp_path / "profiles").iterdir()
    session_id = session_dir.name
    assert (session_dir / "passwd").is_symlink()  # the link is there, and still not listed
    assert names == ["profiler_out_s.txt"]
    chunks, status = _fetch(store, session_id, "passwd")
    assert chunks == []
    assert status is not None and status[0] is grpc.StatusCode.NOT_FOUND
    assert "'passwd' is not in profile session" in status[1] and session_id in status[1]
    chunks, status = _fetch(store, session_id, "profiler_out_s.txt")
    assert status is None and b"".join(c.data for c in chunks) == b"aten::mm  1\n"


def test_a_session_folder_that_is_a_symlink_elsewhere_is_not_found(
    served: tuple[ProfileSessionStore, bytes], tmp_path: Path
) -> None:
    store, _ = served
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.txt").write_text("not a session's\n")
    linked = "20260101T000000Z-linked-abc123"
    assert store.root is not None
    (store.root / linked).symlink_to(elsewhere, target_is_directory=True)
    chunks, status = _fetch(store, linked, "x.txt")
    assert chunks == []
    assert status == (
        grpc.StatusCode.NOT_FOUND,
        f"profile session {linked!r} does not exist here",
    )


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("../secret.txt", "must be a plain file name"),
        ("data.bin/../../secret.txt", "must be a plain file name"),
        ("sub/data.bin", "must be a plain file name"),
        ("/etc/passwd", "must be a plain file name"),
        ("data.bin\0", "must be a plain file name"),
        ("n" * 10_000, "file name of 10,000 characters is too long (at most 1024)"),
        ("n" * 300, "cannot be opened: File name too long"),  # over NAME_MAX, under 1024
    ],
)
def test_names_outside_a_session_are_invalid_argument(
    served: tuple[ProfileSessionStore, bytes], name: str, words: str
) -> None:
    store, _ = served
    chunks, status = _fetch(store, SESSION, name)
    assert chunks == []
    assert status is not None
    code, message = status
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert words in message
    assert len(message) < 500  # a long name is echoed cut, not whole


@pytest.mark.parametrize(
    ("chunk_size", "sizes"),
    [
        (0, [MiB, MiB, MiB // 2 + 7]),  # the default
        (64 << 10, [64 << 10] * 40 + [7]),  # the smallest allowed
        (2 * MiB, [2 * MiB, MiB // 2 + 7]),
    ],
)
def test_chunk_sizes(
    served: tuple[ProfileSessionStore, bytes], chunk_size: int, sizes: list[int]
) -> None:
    store, content = served
    chunks, status = _fetch(store, SESSION, "data.bin", chunk_size=chunk_size)
    assert status is None
    assert [len(c.data) for c in chunks] == sizes
    assert b"".join(c.data for c in chunks) == content


def test_a_chunk_size_above_three_mib_is_cut_to_three(tmp_path: Path) -> None:
    root = tmp_path / "profiles"
    (root / SESSION).mkdir(parents=True)
    (root / SESSION / "big.bin").write_bytes(b"x" * (4 * MiB))
    engine: Any = TraceOnlyEngine()
    store = ProfileSessionStore(stage_name="s", engine=engine, root=root)
    chunks, status = _fetch(store, SESSION, "big.bin", chunk_size=64 * MiB)
    assert status is None
    assert [len(c.data) for c in chunks] == [3 * MiB, MiB]


@pytest.mark.parametrize("chunk_size", [1, (64 << 10) - 1, -1])
def test_a_chunk_size_below_64_kib_is_invalid_argument(
    served: tuple[ProfileSessionStore, bytes], chunk_size: int
) -> None:
    store, _ = served
    chunks, status = _fetch(store, SESSION, "data.bin", chunk_size=chunk_size)
    assert chunks == []
    assert status is not None and status[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert f"at least 65536 bytes (got {chunk_size})" in status[1]


@pytest.mark.parametrize("offset", [0, 1, MiB, MiB + 1, 5 * MiB // 2 + 6, 5 * MiB // 2 + 7])
def test_an_offset_resumes_exactly_there(
    served: tuple[ProfileSessionStore, bytes], offset: int
) -> None:
    store, content = served
    chunks, status = _fetch(store, SESSION, "data.bin", offset=offset)
    assert status is None
    assert b"".join(c.data for c in chunks) == content[offset:]
    # Offsets are absolute and contiguous, and every chunk names the whole file's size.
    expected = offset
    for chunk in chunks:
        assert chunk.offset == expected and chunk.total_size == len(content)
        expected += len(chunk.data)


@pytest.mark.parametrize("offset", [-1, 5 * MiB // 2 + 8, 1 << 62])
def test_an_offset_outside_the_file_is_invalid_argument(
    served: tuple[ProfileSessionStore, bytes], offset: int
) -> None:
    store, content = served
    chunks, status = _fetch(store, SESSION, "data.bin", offset=offset)
    assert chunks == []
    assert status is not None and status[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert f"offset {offset} is outside 'data.bin', which holds {len(content)} bytes" in status[1]
