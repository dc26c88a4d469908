"""AsyncStageClient.fetch_file: it resumes from an offset, reports each chunk's bytes, and
leaves no half-written file behind when the RPC, the disk or the progress callback fails;
a resumed file keeps the bytes it had."""

from __future__ import annotations

import asyncio
import errno
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from omnistage.errors import InvalidRequestError, OmnistageError
from omnistage.stage_client import AsyncStageClient, StageClient
from omnistage.v1 import common_pb2, stage_pb2

_OPEN = Path.open  # the real one, before a test patches it
CONTENT = bytes(range(48))  # distinct bytes: a chunk written at the wrong place shows
CHUNK = 10


class _Unavailable(grpc.RpcError):  # type: ignore[misc]
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the stage went away"


class _Call:
    """A FetchProfileFile call as grpc.aio's: chunks of CONTENT from the request's offset,
    at absolute offsets; with `fail_after`, the RPC fails after that many chunks."""

    def __init__(self, request: stage_pb2.FetchProfileFileRequest, fail_after: int | None):
        self._request = request
        self._fail_after = fail_after
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    async def _chunks(self) -> AsyncIterator[common_pb2.FileChunk]:
        for index, start in enumerate(range(self._request.offset, len(CONTENT), CHUNK)):
            if index == self._fail_after:
                raise _Unavailable()
            data = CONTENT[start : start + CHUNK]
            yield common_pb2.FileChunk(data=data, offset=start, total_size=len(CONTENT))

    def __aiter__(self) -> AsyncIterator[common_pb2.FileChunk]:
        return self._chunks()


class _Stage:
    def __init__(self, fail_after: int | None = None) -> None:
        self.fail_after = fail_after
        self.calls: list[_Call] = []

    def FetchProfileFile(self, request: Any, timeout: float) -> _Call:
        self.calls.append(_Call(request, self.fail_after))
        return self.calls[-1]


def _fetch(stage: _Stage, dest: Path, **options: Any) -> int:
    async def scenario() -> int:
        client = AsyncStageClient("127.0.0.1:1")
        client._stub = stage  # type: ignore[assignment]
        try:
            return await client.fetch_file("s", dest.name, dest, **options)
        finally:
            await client.close()

    return asyncio.run(scenario())


@pytest.mark.parametrize("offset", [0, 1, CHUNK, 25, len(CONTENT)])
def test_a_resumed_fetch_writes_exactly_the_rest(tmp_path: Path, offset: int) -> None:
    dest = tmp_path / "trace.json.gz"
    # What a cut download left: the right first bytes, then a half chunk of junk.
    dest.write_bytes(CONTENT[:offset] + b"\xff" * 7 if offset else b"old file, replaced")
    stage = _Stage()
    written = _fetch(stage, dest, offset=offset)
    assert dest.read_bytes() == CONTENT
    assert written == len(CONTENT) - offset
    assert [call._request.offset for call in stage.calls] == [offset]


@pytest.mark.parametrize("offset", [0, 15])
def test_on_bytes_hears_each_chunk_once_written(tmp_path: Path, offset: int) -> None:
    dest = tmp_path / "trace.json.gz"
    dest.write_bytes(CONTENT[:offset])
    heard: list[int] = []
    written = _fetch(_Stage(), dest, offset=offset, on_bytes=heard.append)
    assert heard == [min(CHUNK, len(CONTENT) - s) for s in range(offset, len(CONTENT), CHUNK)]
    assert sum(heard) == written == len(CONTENT) - offset


@pytest.mark.parametrize(
    ("offset", "left"),
    [
        (0, None),  # created by the fetch: deleted
        (5, CONTENT[: 5 + 2 * CHUNK]),  # resumed: keeps what it had and the chunks that came
    ],
    ids=["new", "resumed"],
)
def test_a_failed_rpc_deletes_a_new_file_and_keeps_a_resumed_one(
    tmp_path: Path, offset: int, left: bytes | None
) -> None:
    dest = tmp_path / "pulled" / "trace.json.gz"
    if offset:
        dest.parent.mkdir()
        dest.write_bytes(CONTENT[:offset])
    stage = _Stage(fail_after=2)
    with pytest.raises(OmnistageError, match="the stage went away") as info:
        _fetch(stage, dest, offset=offset)
    assert info.value.code == "UNAVAILABLE"
    assert (dest.read_bytes() if dest.exists() else None) == left
    assert stage.calls[0].cancelled


def test_a_failing_progress_callback_deletes_the_new_file(tmp_path: Path) -> None:
    dest = tmp_path / "trace.json.gz"
    stage = _Stage()

    def fails(count: int) -> None:
        raise RuntimeError("progress display broke")

    with pytest.raises(RuntimeError, match="progress display broke"):
        _fetch(stage, dest, on_bytes=fails)
    assert not dest.exists()
    assert stage.calls[0].cancelled  # the stage stops sending


@pytest.mark.parametrize(
    ("held", "offset", "words"),
    [
        (None, 10, "it does not exist"),
        (CONTENT[:5], 10, "it holds only 5 bytes"),
        (CONTENT, -1, "offset must be ≥ 0 (got -1)"),
    ],
    ids=["missing", "shorter", "negative"],
)
def test_a_resume_needs_the_bytes_it_skips(
    tmp_path: Path, held: bytes | None, offset: int, words: str
) -> None:
    dest = tmp_path / "trace.json.gz"
    if held is not None:
        dest.write_bytes(held)
    stage = _Stage()
    with pytest.raises(InvalidRequestError, match=re.escape(words)):
        _fetch(stage, dest, offset=offset)
    assert stage.calls == []  # refused before any RPC
    assert (dest.read_bytes() if dest.exists() else None) == held


def test_the_sync_client_passes_offset_and_on_bytes(tmp_path: Path) -> None:
    dest = tmp_path / "trace.json.gz"
    dest.write_bytes(CONTENT[:20])
    heard: list[int] = []
    client = StageClient("127.0.0.1:1")
    try:
        client._async._stub = _Stage()  # type: ignore[assignment]
        written = client.fetch_file("s", dest.name, dest, offset=20, on_bytes=heard.append)
    finally:
        client.close()
    assert written == sum(heard) == len(CONTENT) - 20
    assert dest.read_bytes() == CONTENT


class _FillsUp:
    """A file whose second write finds the disk full."""

    def __init__(self, path: Path) -> None:
        self._handle = _OPEN(path, "wb")
        self._writes = 0

    def __enter__(self) -> _FillsUp:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def seek(self, offset: int) -> None:
        self._handle.seek(offset)

    def write(self, data: bytes) -> None:
        self._writes += 1
        if self._writes == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._handle.write(data)


def test_a_full_disk_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = tmp_path / "pulled" / "rank0.pt.trace.json.gz"
    opener: Callable[..., Any] = lambda self, *a, **k: (  # noqa: E731
        _FillsUp(self) if self == dest else _OPEN(self, *a, **k)
    )
    stage = _Stage()

    async def scenario() -> None:
        client = AsyncStageClient("127.0.0.1:1")
        client._stub = stage  # type: ignore[assignment]
        monkeypatch.setattr(Path, "open", opener)
        try:
            with pytest.raises(OSError, match="No space left"):
                await client.fetch_file("s", dest.name, dest)
        finally:
            monkeypatch.undo()
            await client.close()

    asyncio.run(scenario())
    assert not dest.exists()
    assert stage.calls[0].cancelled
