"""The orchestrator's profile root: where StopProfile may write, and downloads that resume."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from omnistage.download import download_file, download_session, part_path
from omnistage.errors import InvalidRequestError, OmnistageError, StageUnavailableError
from omnistage.types import ProfileFileInfo, SessionSummary
from orchestrator.sessions import CollectedSessions, SessionStoreConfig


@pytest.fixture()
def store(tmp_path: Path) -> CollectedSessions:
    return CollectedSessions(SessionStoreConfig(root=tmp_path / "root"))


@pytest.mark.parametrize(
    ("output_dir", "expected"),
    [("", ""), ("runs", "runs"), ("runs/today", "runs/today"), ("./runs", "runs")],
)
def test_relative_output_dirs_land_inside_the_root(
    store: CollectedSessions, output_dir: str, expected: str
) -> None:
    assert store.parent_for(output_dir) == store.root / expected


@pytest.mark.parametrize(
    ("output_dir", "words"),
    [
        ("/etc", "lies outside"),
        ("../x", "'..'"),
        ("runs/../../x", "'..'"),
        ("~", "'~'"),
        ("~/.ssh", "'~'"),
        ("a\0b", "NUL"),
    ],
)
def test_output_dirs_that_leave_the_root_are_refused(
    store: CollectedSessions, output_dir: str, words: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        store.parent_for(output_dir)
    assert words in str(info.value) and str(store.root) in str(info.value)
    assert not store.root.exists()  # nothing was created


def test_an_absolute_output_dir_inside_the_root_is_accepted(store: CollectedSessions) -> None:
    assert store.parent_for(str(store.root / "x")) == store.root / "x"


def test_a_symlink_inside_the_root_that_leads_out_is_refused(
    store: CollectedSessions, tmp_path: Path
) -> None:
    store.root.mkdir()
    (store.root / "out").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(InvalidRequestError, match="lies outside"):
        store.parent_for("out/x")


def test_a_long_output_dir_is_echoed_cut_short(store: CollectedSessions) -> None:
    with pytest.raises(InvalidRequestError) as info:
        store.parent_for("/" + "x" * 20_000)
    assert len(str(info.value)) < 600 and "20,001 characters" in str(info.value)


DATA = bytes(range(256)) * 1000
ITEM = ProfileFileInfo("trace.json.gz", len(DATA), hashlib.sha256(DATA).hexdigest())


class FlakyFile:
    """Serves DATA in chunks; the first `cuts` streams break after `cut_after` bytes."""

    def __init__(self, *, cuts: int = 0, cut_after: int = 0, chunk: int = 10_000) -> None:
        self.cuts, self.cut_after, self.chunk = cuts, cut_after, chunk
        self.offsets: list[int] = []

    async def __call__(self, offset: int) -> AsyncIterator[tuple[int, bytes, int]]:
        self.offsets.append(offset)
        sent = 0
        while offset < len(DATA):
            if self.cuts and sent >= self.cut_after:
                self.cuts -= 1
                raise StageUnavailableError("Socket closed")
            data = DATA[offset : offset + self.chunk]
            yield offset, data, len(DATA)
            offset += len(data)
            sent += len(data)


def test_a_cut_download_resumes_where_it_stopped(tmp_path: Path) -> None:
    source = FlakyFile(cuts=2, cut_after=50_000)
    dest = tmp_path / "trace.json.gz"
    asyncio.run(download_file(source, dest, ITEM, resume_for_s=30))
    assert dest.read_bytes() == DATA and not part_path(dest).exists()
    assert source.offsets == [0, 50_000, 100_000]


def test_a_download_that_cannot_resume_keeps_its_part_and_says_so(tmp_path: Path) -> None:
    source = FlakyFile(cuts=100, cut_after=30_000)
    dest = tmp_path / "trace.json.gz"
    with pytest.raises(StageUnavailableError) as info:
        asyncio.run(download_file(source, dest, ITEM, resume_for_s=0))
    assert "run the same command again to resume" in str(info.value)
    assert not dest.exists() and part_path(dest).read_bytes() == DATA[:30_000]
    asyncio.run(download_file(FlakyFile(), dest, ITEM))  # the next run resumes
    assert dest.read_bytes() == DATA


def test_a_corrupt_download_is_deleted(tmp_path: Path) -> None:
    dest = tmp_path / "trace.json.gz"
    wrong = ProfileFileInfo(ITEM.name, ITEM.size_bytes, "0" * 64)
    with pytest.raises(OmnistageError, match="partial file was deleted"):
        asyncio.run(download_file(FlakyFile(), dest, wrong))
    assert not dest.exists() and not part_path(dest).exists()


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/../../b", "x\\y"])
def test_a_hostile_server_cannot_write_outside_the_download_folder(
    tmp_path: Path, name: str
) -> None:
    session = SessionSummary("s1", "s1", 0, 1, (ProfileFileInfo(name, 1, "0" * 64),))

    def never(session_id: str, name: str, offset: int) -> AsyncIterator[tuple[int, bytes, int]]:
        raise AssertionError("nothing may be fetched")

    with pytest.raises(InvalidRequestError):
        asyncio.run(download_session(never, session, tmp_path / "to"))
    assert not (tmp_path / "evil").exists() and not (tmp_path / "to").exists()
