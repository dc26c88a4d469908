"""Profile sessions of one stage: a folder per session, a manifest, and safe file access.

Session semantics are the same for every engine: the store creates `<dir>/<session_id>/`,
asks the engine to profile into it, makes sure an op table exists on stop, and serves the
folder's regular files and nothing outside it (checked by real path, so a symlink that leads
out is not there). After each stop, and once at server start, it deletes the oldest session
folders beyond its `RetentionPolicy`.

Its file work (op tables, checksums, pruning, file reads) runs on a thread pool of its own,
`IO_THREADS` wide, never on the event loop's default executor: a vLLM stage makes that one
thread, which vLLM's front-end profiler holds for the whole of a stop.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from omnistage.errors import ProfilerStateError
from omnistage.profile_files import (
    SESSION_ID_PATTERN,
    RetentionPolicy,
    check_file_name,
    check_session_id,
    confined_file,
    file_chunks,
    new_session_id,
    sha256_file,
)
from omnistage.traces.optable import build_op_table
from omnistage.types import ProfileFileInfo, ProfileManifest, ProfileOptions
from omnistage.validation import validate_profile_options
from services.engines.base import Engine

logger = logging.getLogger(__name__)

TRACE_SUFFIXES = (".pt.trace.json.gz", ".pt.trace.json")
T = TypeVar("T")
IO_THREADS = 2
"""One for a download while another builds an op table or checksums a session."""
PROFILER_FLAG = '--profiler-config \'{"torch_profiler_dir": "DIR"}\''


class ProfileSessionStore:
    """Owns the active profile session of one stage and the folders of past ones.

    `retention` bounds the past sessions kept under `root`; the default keeps them all (the
    stage server passes `StageConfig`'s limits: 10 sessions and 10 GiB unless set).
    """

    def __init__(
        self,
        *,
        stage_name: str,
        engine: Engine,
        root: Path | None,
        retention: RetentionPolicy | None = None,
    ) -> None:
        self._stage_name = stage_name
        self._engine = engine
        self._root = root
        self._retention = retention or RetentionPolicy()
        self._active: Path | None = None
        self._lock = asyncio.Lock()
        self._fetching = 0  # FetchProfileFile streams under way
        # The last stop's manifest: (session id, names not yet fetched whole, when it was made)
        self._handed_out: tuple[str, set[str], float] | None = None
        self._io = ThreadPoolExecutor(IO_THREADS, thread_name_prefix=f"stage-io-{stage_name}")

    async def _on_io(self, function: Callable[..., T], *args: Any) -> T:
        call = functools.partial(function, *args)
        return await asyncio.get_running_loop().run_in_executor(self._io, call)

    def close(self) -> None:
        """Release the I/O threads (idle ones exit at once; running work finishes first)."""
        self._io.shutdown(wait=False, cancel_futures=True)

    @property
    def enabled(self) -> bool:
        return self._root is not None

    @property
    def root(self) -> Path | None:
        return self._root

    @property
    def active_session_id(self) -> str:
        return self._active.name if self._active is not None else ""

    def _require_root(self) -> Path:
        if self._root is None:
            raise ProfilerStateError(
                f"profiling is off on stage {self._stage_name!r}: start it with {PROFILER_FLAG}"
            )
        return self._root

    async def start(self, options: ProfileOptions) -> Path:
        """Create the session folder and start the engine's profiler."""
        root = self._require_root()
        validate_profile_options(options)
        async with self._lock:
            if self._active is not None:
                raise ProfilerStateError(
                    f"a profile session is already active on stage {self._stage_name!r} "
                    f"({self._active.name}); call StopProfile first"
                )
            session_dir = root / new_session_id(options.label)
            session_dir.mkdir(parents=True)
            try:
                await self._engine.start_profile(session_dir, options)
            except BaseException:
                session_dir.rmdir()
                raise
            self._active = session_dir
            logger.info("profile session %s started", session_dir.name)
            return session_dir

    async def stop(self) -> ProfileManifest:
        """Stop the active session, flush its files and return the manifest."""
        self._require_root()
        async with self._lock:
            session_dir = self._active
            if session_dir is None:
                raise ProfilerStateError(
                    f"no profile session is active on stage {self._stage_name!r}; "
                    "call StartProfile first"
                )
            started = time.monotonic()
            logger.info(
                "stopping profile session %s (the engine flushes its trace)", session_dir.name
            )
            try:
                await self._engine.stop_profile(session_dir)
            finally:
                # The engine's profiler is stopped or dead either way; a new session may start.
                self._active = None
            stop_seconds = time.monotonic() - started
            await self._on_io(ensure_op_table, session_dir, self._stage_name)
            files = await self._on_io(_manifest, session_dir)
            logger.info(
                "profile session %s stopped in %.1f s: %d files",
                session_dir.name,
                stop_seconds,
                len(files),
            )
            await self._prune(keep=frozenset({session_dir}))
            names = {f.name for f in files}
            self._handed_out = (session_dir.name, names, time.monotonic())
            return ProfileManifest(
                session_id=session_dir.name,
                profile_dir=str(session_dir),
                files=tuple(files),
                stop_seconds=stop_seconds,
            )

    async def prune(self) -> list[Path]:
        """Delete the oldest past session folders beyond the retention limits; return them.

        The server calls it once at start; `stop` prunes after every session. Only folders
        named like a session id count; the active session and the newest are never deleted.
        """
        async with self._lock:
            return await self._prune(keep=frozenset())

    async def _prune(self, *, keep: frozenset[Path]) -> list[Path]:
        """`prune` with the lock held. A failure is logged, never raised: the sessions stay,
        and the next stop tries again."""
        root = self._root
        if root is None:
            return []
        if self._active is not None:
            keep = keep | {self._active}
        try:
            return await self._on_io(
                lambda: self._retention.prune(_session_folders(root), keep=keep)
            )
        except OSError as exc:
            logger.warning("retention: could not prune profile sessions in %s: %s", root, exc)
            return []

    def session_file(self, session_id: str, name: str) -> Path:
        """Resolve a regular file of a past session, refusing bad names before any I/O and,
        by real path, anything outside the session's folder."""
        root = self._require_root()
        check_session_id(session_id)
        check_file_name(name, nested=False)
        if self._active is not None and self._active.name == session_id:
            raise ProfilerStateError(
                f"profile session {session_id!r} is still recording; call StopProfile first"
            )
        return confined_file(root, root / session_id, name, nested=False)

    async def read_chunks(
        self, session_id: str, name: str, *, chunk_size: int = 0, offset: int = 0
    ) -> AsyncIterator[tuple[int, bytes, int]]:
        """Yield (absolute offset, data, total size) for one file of a session, from byte
        `offset` on (0 to the file's size; a cut download resumes there).

        `chunk_size` 0 means 1 MiB; below 64 KiB is refused, above 3 MiB is cut to 3 MiB.
        """
        path = self.session_file(session_id, name)
        chunks = file_chunks(
            path, name, session=session_id, chunk_size=chunk_size, offset=offset, executor=self._io
        )
        self._fetching += 1
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self._fetching -= 1
        handed_out = self._handed_out
        if handed_out is not None and handed_out[0] == session_id:
            handed_out[1].discard(name)  # served to its end

    def busy(self, *, since: float) -> bool:
        """Whether profiling work is under way: a start or stop, a file being served, or a
        file of a manifest handed out at `since` (time.monotonic) or later that nobody has
        fetched yet. A draining stage keeps serving until this is False."""
        if self._lock.locked() or self._fetching:
            return True
        handed_out = self._handed_out
        return handed_out is not None and handed_out[2] >= since and bool(handed_out[1])

    async def abandon(self) -> None:
        """Stop a session left active at shutdown, keeping whatever the engine flushed."""
        if self._active is not None:
            try:
                await self.stop()
            except Exception:
                logger.exception("could not stop profile session at shutdown")


def ensure_op_table(session_dir: Path, stage_name: str) -> Path | None:
    """Name the engine's op table profiler_out_<stage>.txt, or build one from the trace.

    Returns the table's path, or None when the session holds no trace at all.
    """
    target = session_dir / f"profiler_out_{stage_name}.txt"
    # The engine's own table first, the front end's (vLLM's async_llm) after it.
    engine_tables = sorted(
        session_dir.glob("*profiler_out.txt"), key=lambda p: ("async_llm" in p.name, p.name)
    )
    usable = [p for p in engine_tables if p.read_text(errors="replace").strip()]
    for empty in set(engine_tables) - set(usable):
        empty.unlink()  # an empty table says nothing: vLLM's front end writes one at times
    if usable:
        usable[0].rename(target)
        for extra in usable[1:]:
            extra.rename(session_dir / f"profiler_out_{stage_name}.{extra.name}")
        return target
    traces = sorted(
        (p for p in session_dir.iterdir() if p.name.endswith(TRACE_SUFFIXES)),
        key=lambda p: ("async_llm" in p.name, p.name),  # the engine's trace before the front end's
    )
    if not traces:
        logger.warning("session %s has no trace to build an op table from", session_dir.name)
        return None
    logger.info("the engine wrote no op table; building one from %s", traces[0].name)
    target.write_text(build_op_table(traces[0], title=f"stage {stage_name}: {traces[0].name}"))
    return target


def _manifest(session_dir: Path) -> list[ProfileFileInfo]:
    """The session's regular files, symlinks left out: the files `session_file` serves."""
    files = []
    for path in sorted(session_dir.iterdir()):
        if path.is_symlink() or not path.is_file():
            continue
        files.append(ProfileFileInfo(path.name, path.stat().st_size, sha256_file(path)))
    return files


def _session_folders(root: Path) -> list[Path]:
    """The real folders under `root` named like a session id; anything else is not ours."""
    if not root.is_dir():
        return []
    return [
        path
        for path in root.iterdir()
        if SESSION_ID_PATTERN.match(path.name) and not path.is_symlink() and path.is_dir()
    ]
