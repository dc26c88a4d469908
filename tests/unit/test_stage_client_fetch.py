"""AsyncStageClient.fetch_file leaves no half-written file behind when the disk fails."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from omnistage.stage_client import AsyncStageClient
from omnistage.v1 import common_pb2

_OPEN = Path.open  # the real one, before the test patches it


class _TwoChunks:
    def FetchProfileFile(self, request: Any, timeout: float) -> AsyncIterator[Any]:
        async def chunks() -> AsyncIterator[Any]:
            yield common_pb2.FileChunk(data=b"a" * 10, offset=0)
            yield common_pb2.FileChunk(data=b"b" * 10, offset=10)

        return chunks()


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

    async def scenario() -> None:
        client = AsyncStageClient("127.0.0.1:1")
        client._stub = _TwoChunks()  # type: ignore[assignment]
        monkeypatch.setattr(
            Path,
            "open",
            lambda self, *a, **k: _FillsUp(self) if self == dest else _OPEN(self, *a, **k),
        )
        try:
            with pytest.raises(OSError, match="No space left"):
                await client.fetch_file("s", dest.name, dest)
        finally:
            monkeypatch.undo()
            await client.close()

    asyncio.run(scenario())
    assert not dest.exists()
