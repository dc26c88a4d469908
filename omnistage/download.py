"""Bring a collected profile session from the orchestrator to the caller's disk.

Each file goes to `<name>.part` first and takes its final name only once its sha256 matches
the listing: a partial file never sits under its final name. A download cut by a dropped link
resumes from the bytes already on disk, within the same call (gRPC reconnects) or in the next
one (the `.part` file stays).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from omnistage.errors import DeadlineError, OmnistageError, StageUnavailableError
from omnistage.profile_files import check_file_name, sha256_file
from omnistage.types import ProfileFileInfo, SessionSummary

logger = logging.getLogger(__name__)

# (offset) -> the file's chunks from there, as (offset, data, total size)
OpenChunks = Callable[[int], AsyncIterator[tuple[int, bytes, int]]]
RESUME_FOR_S = 120.0  # how long a cut download keeps trying to resume
PART_SUFFIX = ".part"
PARALLEL_FILES = 4  # files in flight at once: small files do not wait on each other's set-up


@dataclass(frozen=True)
class FileProgress:
    """How far one file's download has got."""

    session_id: str
    name: str
    done: int
    total: int
    resumed_from: int = 0
    """Bytes that were already on disk (a resumed download), or 0."""
    finished: bool = False
    skipped: bool = False
    """The file was already there, with the right sha256."""


FileProgressFn = Callable[[FileProgress], None]


def _ignore(progress: FileProgress) -> None:
    pass


def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + PART_SUFFIX)


async def download_file(
    open_chunks: OpenChunks,
    dest: Path,
    item: ProfileFileInfo,
    *,
    session_id: str = "",
    progress: FileProgressFn | None = None,
    resume_for_s: float = RESUME_FOR_S,
) -> None:
    """Download one file to `dest`, resuming a `.part` file, and check its sha256."""
    say = progress or _ignore
    if dest.exists():
        if await asyncio.to_thread(sha256_file, dest) == item.sha256:
            say(
                FileProgress(session_id, item.name, item.size_bytes, item.size_bytes, 0, True, True)
            )
            return
        raise OmnistageError(
            f"{dest} already exists and differs from the session's {item.name}: move it away, "
            "or download into another folder (nothing was overwritten)"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    offset = part.stat().st_size if part.exists() else 0
    if offset > item.size_bytes:
        offset = 0  # not a prefix of this file
    resumed_from = offset
    give_up = time.monotonic() + resume_for_s
    while True:
        try:
            with part.open("r+b" if offset else "wb") as handle:
                handle.truncate(offset)
                handle.seek(offset)
                async for at, data, _total in open_chunks(offset):
                    if at != offset:
                        raise OmnistageError(
                            f"{item.name}: the server sent bytes at offset {at}, expected {offset}"
                        )
                    handle.write(data)
                    offset += len(data)
                    say(FileProgress(session_id, item.name, offset, item.size_bytes, resumed_from))
            break
        except (StageUnavailableError, DeadlineError) as exc:
            if time.monotonic() > give_up:
                raise type(exc)(
                    f"download of {item.name} cut at {offset:,} of {item.size_bytes:,} bytes: "
                    f"{exc}; run the same command again to resume (the part is kept in {part})"
                ) from exc
            logger.warning("download of %s cut at %d bytes (%s); resuming", item.name, offset, exc)
            resumed_from = offset
            await asyncio.sleep(0.5)  # a back-off between tries; the channel reconnects itself
    digest = await asyncio.to_thread(sha256_file, part)
    if digest != item.sha256:
        part.unlink()
        raise OmnistageError(
            f"{item.name} arrived with sha256 {digest}, the session lists {item.sha256}: the "
            "partial file was deleted; run the download again"
        )
    os.replace(part, dest)
    say(FileProgress(session_id, item.name, offset, item.size_bytes, resumed_from, True))


async def download_session(
    open_file: Callable[[str, str, int], AsyncIterator[tuple[int, bytes, int]]],
    session: SessionSummary,
    to: Path,
    *,
    progress: FileProgressFn | None = None,
    resume_for_s: float = RESUME_FOR_S,
) -> Path:
    """Every file of `session` into `to/<session_id>/`; return that folder.

    `open_file(session_id, name, offset)` streams one file. Names come from the server and
    are checked before use, so none can write outside the folder.
    """
    folder = to / session.session_id
    targets = [
        (item, folder.joinpath(*check_file_name(item.name, nested=True).parts))
        for item in session.files
    ]  # every name checked before the first byte is written
    slots = asyncio.Semaphore(PARALLEL_FILES)

    async def one(item: ProfileFileInfo, dest: Path) -> None:
        def chunks(offset: int) -> AsyncIterator[tuple[int, bytes, int]]:
            return open_file(session.session_id, item.name, offset)

        async with slots:
            await download_file(
                chunks,
                dest,
                item,
                session_id=session.session_id,
                progress=progress,
                resume_for_s=resume_for_s,
            )

    await asyncio.gather(*(one(item, dest) for item, dest in targets))
    return folder
