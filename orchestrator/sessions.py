"""The orchestrator's collected sessions: one profile root on its disk, confined.

Every session StopProfile collects lands in `<root>/<output_dir>/<session>/`, and nowhere
else: `output_dir` is relative to the root (an absolute path only when it lies inside it), and
`..`, `~`, NUL and symlinks that lead out are refused before anything is created. The store
lists the kept sessions, serves their files to remote callers by real path, deletes them, and
keeps at most `max_sessions` and `max_total_bytes` (oldest deleted first).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from omnistage.errors import InvalidRequestError, NotFoundError, ProfilerStateError, echo
from omnistage.profile_files import (
    RetentionPolicy,
    check_session_id,
    confined_file,
    file_chunks,
    inside,
    session_files,
    sha256_file,
)
from omnistage.types import ProfileFileInfo, SessionList, SessionSummary

logger = logging.getLogger(__name__)
T = TypeVar("T")

REPORT_NAME = "report.json"  # a folder that holds one is a collected session
MAX_DEPTH = 8  # of a session folder below the root
DEFAULT_MAX_SESSIONS = 20
DEFAULT_MAX_BYTES = 20 << 30


class SessionStoreConfig(BaseModel):
    """Where the orchestrator keeps collected sessions, and how many."""

    model_config = ConfigDict(extra="forbid")

    root: Path = Field(description="The profile root: every session lands below it.")
    max_sessions: int = Field(
        default=DEFAULT_MAX_SESSIONS, ge=0, description="Sessions kept; 0: no limit."
    )
    max_total_bytes: int = Field(
        default=DEFAULT_MAX_BYTES, ge=0, description="Bytes kept over all sessions; 0: no limit."
    )


class CollectedSessions:
    """The sessions under one profile root, with their files served by real path."""

    def __init__(self, config: SessionStoreConfig) -> None:
        self.root = config.root.expanduser().resolve()
        self.retention = RetentionPolicy(config.max_sessions, config.max_total_bytes)
        # Reads and checksums of large traces run here, never on the event loop, and never
        # queued behind other work on the loop's default executor.
        self._files = ThreadPoolExecutor(4, thread_name_prefix="session-files")
        self._digests: dict[tuple[str, int, int], str] = {}

    def close(self) -> None:
        self._files.shutdown(wait=False, cancel_futures=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._files, fn, *args)

    def parent_for(self, output_dir: str) -> Path:
        """The folder a session goes in for StopProfile's `output_dir`; creates nothing."""
        where = f"the profile root {str(self.root)!r}"
        if "\0" in output_dir:
            raise InvalidRequestError(
                f"output_dir must not contain NUL; pass a folder inside {where}"
            )
        if output_dir.startswith("~"):
            raise InvalidRequestError(
                f"output_dir {echo(output_dir)}: '~' is not expanded; pass a folder relative to "
                f"{where}"
            )
        path = Path(output_dir)
        if ".." in path.parts:
            raise InvalidRequestError(
                f"output_dir {echo(output_dir)} must not contain '..'; pass a folder relative "
                f"to {where}"
            )
        target = path if path.is_absolute() else self.root / path
        if not inside(target, self.root):
            raise InvalidRequestError(
                f"output_dir {echo(output_dir)} lies outside {where}: pass a relative folder, "
                "or an absolute path inside that root"
            )
        return Path(os.path.realpath(target))

    def make_session_dir(self, output_dir: str, session_id: str) -> Path:
        """Create the folder of `session_id` for StopProfile's `output_dir`, confined by real
        path: a folder in the way that is a symlink out is refused, as is one that cannot be
        made. InvalidRequestError names output_dir and says the session still profiles."""
        try:
            parent = self.parent_for(output_dir)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"{exc}; session {session_id} is still profiling") from None
        folder = parent / session_id
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidRequestError(
                f"output_dir {echo(output_dir)} cannot hold the session's files ({exc}); pass "
                f"a writable output_dir: session {session_id} is still profiling"
            ) from exc
        if os.path.realpath(folder) != str(folder):  # a symlink planted in the session's name
            raise InvalidRequestError(
                f"output_dir {echo(output_dir)}: {folder} is a symlink, and a session is "
                f"written only to a real folder inside the profile root {str(self.root)!r}; "
                f"pass another output_dir: session {session_id} is still profiling"
            )
        return folder

    def _folders(self) -> list[Path]:
        """Every collected session folder below the root (those holding a report.json)."""
        found: list[Path] = []
        if not self.root.is_dir():
            return found
        base_depth = len(self.root.parts)
        for folder, dirs, files in os.walk(self.root, followlinks=False):
            here = Path(folder)
            if REPORT_NAME in files:
                found.append(here)
                dirs.clear()  # a session's stage folders hold no sessions
            elif len(here.parts) - base_depth >= MAX_DEPTH:
                dirs.clear()
        return found

    def find(self, session_id: str) -> Path:
        check_session_id(session_id)
        for folder in self._folders():
            if folder.name == session_id:
                return folder
        raise NotFoundError(
            f"no session {session_id!r} is kept under {str(self.root)!r}; `omnistage profile "
            "list` shows the kept sessions (one still being collected appears once its "
            "report is written)"
        )

    def remember(self, path: Path, sha256: str) -> None:
        """A file's sha256, already checked (a pulled trace), so listing need not hash it."""
        stat = path.stat()
        self._digests[(str(path), stat.st_size, stat.st_mtime_ns)] = sha256

    def _digest(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        if key not in self._digests:
            self._digests[key] = sha256_file(path)
        return self._digests[key]

    def describe(self, folder: Path) -> SessionSummary:
        """One session's files (names relative to its folder), sizes and sha256."""
        files = tuple(
            ProfileFileInfo(
                name=path.relative_to(folder).as_posix(),
                size_bytes=path.stat().st_size,
                sha256=self._digest(path),
            )
            for path in session_files(folder)
        )
        return SessionSummary(
            session_id=folder.name,
            path=folder.relative_to(self.root).as_posix(),
            modified_unix_ns=folder.stat().st_mtime_ns,
            total_bytes=sum(f.size_bytes for f in files),
            files=files,
        )

    def _listing(self) -> SessionList:
        summaries = [self.describe(folder) for folder in self._folders()]
        summaries.sort(key=lambda s: (s.modified_unix_ns, s.session_id), reverse=True)
        return SessionList(
            profile_root=str(self.root),
            sessions=tuple(summaries),
            max_sessions=self.retention.max_sessions,
            max_total_bytes=self.retention.max_total_bytes,
        )

    async def listing(self) -> SessionList:
        return await self._run(self._listing)

    async def summary(self, folder: Path) -> SessionSummary:
        return await self._run(self.describe, folder)

    async def read_chunks(
        self, session_id: str, name: str, *, chunk_size: int = 0, offset: int = 0
    ) -> AsyncIterator[tuple[int, bytes, int]]:
        """Yield (offset, data, total size) of one file of a kept session, from `offset`."""
        path = confined_file(self.root, self.find(session_id), name, nested=True)
        chunks = file_chunks(
            path,
            name,
            session=session_id,
            chunk_size=chunk_size,
            offset=offset,
            executor=self._files,
        )
        async for chunk in chunks:
            yield chunk

    async def delete(self, session_id: str, *, active: str = "") -> int:
        """Delete a kept session's folder; return the bytes freed."""
        if session_id and session_id == active:
            raise ProfilerStateError(
                f"session {session_id!r} is still profiling: call StopProfile first"
            )
        folder = self.find(session_id)
        freed = sum(f.size_bytes for f in (await self.summary(folder)).files)
        await self._run(shutil.rmtree, folder)
        logger.info("deleted profile session %s (%d bytes)", session_id, freed)
        return freed

    async def prune(self, *, keep: Path | None = None) -> list[Path]:
        """Apply the retention limits; `keep` (the session just collected) stays."""
        keep_set = frozenset([keep]) if keep is not None else frozenset()
        folders = self._folders()
        return await self._run(functools.partial(self.retention.prune, folders, keep=keep_set))
