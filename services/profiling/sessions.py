"""Profile sessions of one stage: a folder per session, a manifest, and safe file access.

Session semantics are the same for every engine: the store creates `<dir>/<session_id>/`,
asks the engine to profile into it, makes sure an op table exists on stop, and serves the
folder's files and nothing outside it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

from omnistage.errors import InvalidRequestError, NotFoundError, ProfilerStateError
from omnistage.profile_files import SESSION_ID_PATTERN, new_session_id, sha256_file
from omnistage.types import ProfileFileInfo, ProfileManifest, ProfileOptions
from services.engines.base import Engine
from services.profiling.optable import build_op_table
from services.validation import validate_profile_options

logger = logging.getLogger(__name__)

TRACE_SUFFIXES = (".pt.trace.json.gz", ".pt.trace.json")
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 3 << 20  # stays under gRPC's 4 MiB default receive limit
PROFILER_FLAG = '--profiler-config \'{"torch_profiler_dir": "DIR"}\''


class ProfileSessionStore:
    """Owns the active profile session of one stage and the folders of past ones."""

    def __init__(self, *, stage_name: str, engine: Engine, root: Path | None) -> None:
        self._stage_name = stage_name
        self._engine = engine
        self._root = root
        self._active: Path | None = None
        self._lock = asyncio.Lock()

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
            await asyncio.to_thread(ensure_op_table, session_dir, self._stage_name)
            files = await asyncio.to_thread(_manifest, session_dir)
            logger.info(
                "profile session %s stopped in %.1f s: %d files",
                session_dir.name,
                stop_seconds,
                len(files),
            )
            return ProfileManifest(
                session_id=session_dir.name,
                profile_dir=str(session_dir),
                files=tuple(files),
                stop_seconds=stop_seconds,
            )

    def session_file(self, session_id: str, name: str) -> Path:
        """Resolve a file of a session, refusing anything outside its folder before any I/O."""
        root = self._require_root()
        if not session_id:
            raise InvalidRequestError("session_id is empty: pass the id StopProfile returned")
        if not name:
            raise InvalidRequestError("name is empty: pass a file name from the manifest")
        if name.startswith("/") or "/" in name or "\\" in name or ".." in name or "\0" in name:
            raise InvalidRequestError(
                f"file name {name!r} must be a plain name from the manifest, without "
                "'/', '..' or an absolute path"
            )
        if not SESSION_ID_PATTERN.match(session_id) or ".." in session_id:
            raise InvalidRequestError(
                f"session_id {session_id!r} is not a session id: letters, digits, '.', '_' "
                "and '-' only"
            )
        session_dir = root / session_id
        if not session_dir.is_dir():
            raise NotFoundError(f"profile session {session_id!r} does not exist on this stage")
        if self._active is not None and self._active.name == session_id:
            raise ProfilerStateError(
                f"profile session {session_id!r} is still recording; call StopProfile first"
            )
        path = session_dir / name
        if not path.is_file():
            raise NotFoundError(f"file {name!r} is not in profile session {session_id!r}")
        return path

    async def read_chunks(
        self, session_id: str, name: str, chunk_size: int = 0
    ) -> AsyncIterator[tuple[int, bytes, int]]:
        """Yield (offset, data, total size) for one file of a session."""
        if chunk_size < 0:
            raise InvalidRequestError(f"chunk_size must be ≥ 0 (got {chunk_size})")
        size = min(chunk_size or DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES)
        path = self.session_file(session_id, name)
        total = path.stat().st_size
        with path.open("rb") as handle:
            offset = 0
            while True:
                data = await asyncio.to_thread(handle.read, size)
                if not data:
                    break
                yield offset, data, total
                offset += len(data)

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
    files = []
    for path in sorted(session_dir.iterdir()):
        if not path.is_file():
            continue
        files.append(ProfileFileInfo(path.name, path.stat().st_size, sha256_file(path)))
    return files
