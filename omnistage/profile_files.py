"""Names, checksums, confinement and retention of profile files, shared by stages and the
orchestrator.

Both servers serve files of session folders to remote callers. A file is served only when its
name is a plain relative path and its real path (symlinks resolved) lies inside the session's
real folder, which itself lies inside the real profile root: a symlink that leads out, a
session folder that is a symlink elsewhere, `..`, absolute paths and NUL bytes are all refused
before anything is opened.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import shutil
import stat
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from omnistage.errors import InvalidRequestError, NotFoundError, echo

logger = logging.getLogger(__name__)

SESSION_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_NAME_CHARS = 1024  # a file's path inside its session folder

DEFAULT_CHUNK_BYTES = 1 << 20
MIN_CHUNK_BYTES = 64 << 10  # a smaller chunk only makes a download slow
MAX_CHUNK_BYTES = 3 << 20  # stays under gRPC's 4 MiB default receive limit


def new_session_id(label: str) -> str:
    """`<UTC time>-<label>-<random>`: sortable, readable, and safe as a folder name."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.")[:64]
    middle = f"-{clean}" if clean else ""
    return f"{stamp}{middle}-{secrets.token_hex(3)}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def check_session_id(session_id: str) -> None:
    """Refuse anything but a session id: letters, digits, '.', '_' and '-'."""
    if not session_id:
        raise InvalidRequestError("session_id is empty: pass the id StopProfile returned")
    if not SESSION_ID_PATTERN.match(session_id) or ".." in session_id:
        raise InvalidRequestError(
            f"session_id {echo(session_id)} is not a session id: letters, digits, '.', '_' "
            "and '-' only, at most 128 characters"
        )


def check_file_name(name: str, *, nested: bool) -> PurePosixPath:
    """A file's name inside a session folder, as a relative path; folders only when `nested`."""
    if not name:
        raise InvalidRequestError("name is empty: pass a file name from the manifest")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidRequestError(
            f"file name of {len(name):,} characters is too long (at most {MAX_NAME_CHARS}): "
            "pass a name from the manifest"
        )
    path = PurePosixPath(name)
    bad = (
        "\0" in name
        or "\\" in name
        or path.is_absolute()
        or ".." in name  # not only a '..' component: no name of ours has one
        or any(part in (".", "") for part in name.split("/"))
        or (not nested and len(path.parts) != 1)
    )
    if bad:
        shape = "a relative path inside the session folder" if nested else "a plain file name"
        raise InvalidRequestError(
            f"file name {echo(name)} must be {shape} from the manifest, without '..', "
            "'\\\\', NUL or a leading '/'"
        )
    return path


def check_chunk_size(chunk_size: int) -> int:
    """The chunk size to read with: 0 means the default; below 64 KiB is refused."""
    if chunk_size == 0:
        return DEFAULT_CHUNK_BYTES
    if chunk_size < MIN_CHUNK_BYTES:
        raise InvalidRequestError(
            f"chunk_size must be 0 (the default, 1 MiB) or at least {MIN_CHUNK_BYTES} bytes "
            f"(got {chunk_size})"
        )
    return min(chunk_size, MAX_CHUNK_BYTES)


def inside(path: Path, folder: Path) -> bool:
    """Whether the real path of `path` lies inside the real path of `folder`."""
    real, base = os.path.realpath(path), os.path.realpath(folder)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def confined_file(root: Path, session_dir: Path, name: str, *, nested: bool) -> Path:
    """The file `name` of `session_dir`, checked by real path; NotFoundError when it is not
    a regular file inside the session (a symlink out counts as not there)."""
    relative = check_file_name(name, nested=nested)
    if not session_dir.is_dir() or not inside(session_dir, root):
        raise NotFoundError(f"profile session {session_dir.name!r} does not exist here")
    path = session_dir.joinpath(*relative.parts)
    try:
        regular = path.is_file() and inside(path, session_dir)
    except OSError as exc:  # e.g. a name component over the file system's limit
        raise InvalidRequestError(
            f"file name {echo(name)} cannot be opened: {exc.strerror}"
        ) from None
    if not regular:
        raise NotFoundError(
            f"file {echo(name)} is not in profile session {session_dir.name!r}; the session's "
            "manifest lists its files"
        )
    return path


def _open_regular(path: Path, name: str, session: str) -> BinaryIO:
    """Open a confined file, refusing a symlink swapped in since the check."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        raise NotFoundError(
            f"file {echo(name)} is not in profile session {session!r}; the session's "
            "manifest lists its files"
        ) from None
    handle = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        handle.close()
        raise NotFoundError(f"{echo(name)} in profile session {session!r} is not a file")
    return handle


async def file_chunks(
    path: Path,
    name: str,
    *,
    session: str,
    chunk_size: int = 0,
    offset: int = 0,
    executor: Executor | None = None,
) -> AsyncIterator[tuple[int, bytes, int]]:
    """Yield (absolute offset, data, total size) of a confined file from byte `offset` on
    (0 to the file's size; a cut download resumes there), reading on `executor`.

    `chunk_size` 0 means 1 MiB; below 64 KiB is refused, above 3 MiB is cut to 3 MiB.
    """
    size = check_chunk_size(chunk_size)
    loop = asyncio.get_running_loop()
    with _open_regular(path, name, session) as handle:
        total = os.fstat(handle.fileno()).st_size
        if not 0 <= offset <= total:
            raise InvalidRequestError(
                f"offset {offset} is outside {echo(name)}, which holds {total} bytes: "
                f"pass an offset from 0 to {total} (the bytes you already hold)"
            )
        handle.seek(offset)
        while data := await loop.run_in_executor(executor, handle.read, size):
            yield offset, data, total
            offset += len(data)


def session_files(session_dir: Path) -> list[Path]:
    """The regular files of a session folder, recursively, sorted; symlinks are skipped."""
    found = []
    for folder, dirs, files in os.walk(session_dir, followlinks=False):
        dirs.sort()
        for name in sorted(files):
            path = Path(folder) / name
            if not path.is_symlink() and path.is_file():
                found.append(path)
    return found


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in session_files(folder))


@dataclass(frozen=True)
class RetentionPolicy:
    """How many sessions, and how many bytes in all, a server keeps; 0 means no limit.

    The newest session is always kept, even alone over `max_total_bytes`.
    """

    max_sessions: int = 0
    max_total_bytes: int = 0

    def prune(self, sessions: list[Path], *, keep: frozenset[Path] = frozenset()) -> list[Path]:
        """Delete the oldest of `sessions` (folders) until the limits hold; return those
        deleted. `keep` (such as an active session) is never deleted."""
        if not self.max_sessions and not self.max_total_bytes:
            return []
        by_age = sorted(sessions, key=lambda p: (p.stat().st_mtime_ns, p.name))
        sizes = {p: folder_bytes(p) for p in by_age}
        total, count = sum(sizes.values()), len(by_age)
        deleted = []
        for folder in by_age[:-1]:  # the newest always stays
            over_count = bool(self.max_sessions) and count > self.max_sessions
            over_bytes = bool(self.max_total_bytes) and total > self.max_total_bytes
            if not (over_count or over_bytes):
                break
            if folder in keep:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            logger.info(
                "retention: deleted profile session %s (%d bytes; keeping at most %s sessions "
                "and %s bytes)",
                folder.name,
                sizes[folder],
                self.max_sessions or "any number of",
                self.max_total_bytes or "any number of",
            )
            deleted.append(folder)
            total -= sizes[folder]
            count -= 1
        return deleted
