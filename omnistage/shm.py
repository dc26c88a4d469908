"""Shared-memory tensor hand-off between processes of one host (docs/shared-memory.md).

A segment is a file in the host's shared-memory folder (`/dev/shm`, where POSIX `shm_open`
puts them), written and read through `mmap`; only a `SharedTensorRef` travels over gRPC.

- The *domain* says which processes see the same segments: the kernel's boot id and the
  device and inode of `/dev/shm` (a container with a /dev/shm of its own differs). Two
  processes hand tensors over this way only when their domains are equal.
- Every segment is named `omnistage-<owner>-<request>-<n>`, where the owner is the process
  that owns it (the caller that asked for it: the orchestrator), as `<pid namespace>.<pid>.
  <start time>`, so that a sweeper can tell a live owner from a dead one, even after its pid
  is reused. `sweep_dead_owners` unlinks the segments whose owner has died.
- A segment is written with write(2), not through a mapping, so a full /dev/shm is an
  ENOSPC error (the tensor then goes as bytes), never a SIGBUS; it also costs the writer
  no page faults.

The stdlib's `multiprocessing.shared_memory` is not used: on Python 3.11 and 3.12 its
resource tracker unlinks a segment when the process that opened it exits, and it maps the
segment to write it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import mmap
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from omnistage.errors import InvalidRequestError, OmnistageError, echo
from omnistage.tensors import itemsize
from omnistage.types import TensorData

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "omnistage-"
SWEEP_INTERVAL_S = 10.0
"""How often a server removes the segments of owners that have died."""
DEFAULT_MIN_BYTES = 1 << 20
"""Tensors smaller than this travel as bytes: below it a handle saves little."""
_OWNER = r"\d+\.\d+\.\d+"
_NAME = re.compile(rf"{PREFIX}(?P<owner>{_OWNER})-[0-9a-f]{{1,32}}-[0-9a-f]{{1,32}}")
_PREFIX = re.compile(rf"{PREFIX}{_OWNER}-[0-9a-f]{{1,32}}")


@dataclass(frozen=True)
class SharedTensorRef:
    """Where a tensor lies in a shared-memory segment on this host (`omnistage.shm`)."""

    name: str
    offset: int
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    domain: str


class SharedMemoryFullError(OmnistageError):
    """The shared-memory folder has no room for a segment; the tensor goes as bytes."""

    code = "RESOURCE_EXHAUSTED"


@cache
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def local_domain(shm_dir: Path = SHM_DIR) -> str:
    """This process's shared-memory domain, or "" where it has none (no /dev/shm)."""
    boot = _boot_id()
    try:
        found = os.stat(shm_dir)
    except OSError:
        return ""
    if not boot or not shm_dir.is_dir() or not os.access(shm_dir, os.W_OK):
        return ""
    return f"{boot}/{found.st_dev}:{found.st_ino}"


def _start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (/proc/PID/stat), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def owner_token() -> str:
    """This process as segment names carry it: `<pid namespace>.<pid>.<start time>`."""
    return _owner_token(os.getpid())


@cache
def _owner_token(pid: int) -> str:
    """Read from /proc once per process (a forked child has a pid of its own), not once per
    request."""
    return f"{_pid_namespace()}.{pid}.{_start_time(pid) or 0}"


def request_prefix(owner: str | None = None) -> str:
    """A fresh name prefix for one request's segments, owned by `owner` (this process)."""
    return f"{PREFIX}{owner or owner_token()}-{secrets.token_hex(8)}"


def owner_alive(owner: str) -> bool | None:
    """Whether the owner of a segment still runs; None when it is in another pid namespace
    (this process cannot tell, so it leaves such segments alone)."""
    namespace, pid, start = (int(part) for part in owner.split("."))
    if namespace != _pid_namespace():
        return None
    return _start_time(pid) == start


def sweep_dead_owners(shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink every omnistage segment whose owner has died; return their names."""
    removed = []
    for name in _segment_names(shm_dir):
        match = _NAME.fullmatch(name)
        if match is None or owner_alive(match["owner"]) is not False:
            continue
        with contextlib.suppress(FileNotFoundError):
            (shm_dir / name).unlink()
            removed.append(name)
    if removed:
        logger.info("removed %d shared-memory segments of dead processes", len(removed))
    return removed


async def sweep_forever(interval: float = SWEEP_INTERVAL_S) -> None:
    """`sweep_dead_owners` now and then every `interval` seconds (a server's background task)."""
    while True:
        await asyncio.to_thread(sweep_dead_owners)
        await asyncio.sleep(interval)


def unlink_prefix(prefix: str, shm_dir: Path = SHM_DIR) -> list[str]:
    """Unlink every segment whose name starts with `prefix` + "-"; return their names."""
    removed = []
    for name in _segment_names(shm_dir):
        if name.startswith(f"{prefix}-"):
            with contextlib.suppress(FileNotFoundError):
                (shm_dir / name).unlink()
                removed.append(name)
    return removed


def _segment_names(shm_dir: Path) -> Iterable[str]:
    try:
        return [n for n in os.listdir(shm_dir) if n.startswith(PREFIX)]
    except OSError:
        return []


def check_prefix(prefix: str) -> None:
    """InvalidRequestError unless `prefix` is a request prefix of `request_prefix`'s form."""
    if not _PREFIX.fullmatch(prefix):
        raise InvalidRequestError(
            f"shared_output.name_prefix {echo(prefix)} is not of the form "
            "omnistage-<pidns>.<pid>.<start>-<hex>; make it with omnistage.shm.request_prefix"
        )


def write_segment(
    prefix: str, chunks: list[TensorData], *, domain: str, reuse: str = ""
) -> SharedTensorRef:
    """A segment holding `chunks` joined along dim 0 (each one copy, no join first): `reuse`,
    an existing segment of the prefix's owner large enough for them, or else a new one.

    The chunks must share dtype and shape[1:] (or be a single tensor). Raises
    SharedMemoryFullError when /dev/shm has no room; nothing is left behind then."""
    first = chunks[0]
    nbytes = sum(len(c.data) for c in chunks)
    shape = first.shape
    if len(chunks) > 1:
        shape = (sum(c.shape[0] for c in chunks), *first.shape[1:])
    fd, name = _open_reused(prefix, reuse) if reuse else (-1, "")
    if fd < 0:
        name = f"{prefix}-{secrets.token_hex(4)}"
        fd = os.open(SHM_DIR / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    path = SHM_DIR / name
    try:
        for chunk in chunks:  # write(2): the kernel copies once, and a full /dev/shm is ENOSPC
            view = memoryview(chunk.data).cast("B")
            while view:
                view = view[_write(fd, view, nbytes) :]
    except BaseException:
        if not reuse:
            path.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    return SharedTensorRef(name, 0, nbytes, first.dtype, tuple(shape), domain)


def _open_reused(prefix: str, name: str) -> tuple[int, str]:
    """A caller's free segment opened for writing from offset 0, or (-1, "") when it is not
    one of the owner's segments or is gone."""
    match = _NAME.fullmatch(name)
    if match is None or not prefix.startswith(f"{PREFIX}{match['owner']}-"):
        return -1, ""
    try:
        return os.open(SHM_DIR / name, os.O_WRONLY), name
    except FileNotFoundError:
        return -1, ""


def _write(fd: int, view: memoryview, nbytes: int) -> int:
    try:
        return os.write(fd, view)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EFBIG):
            raise
        raise SharedMemoryFullError(
            f"{SHM_DIR} has no room for {nbytes} bytes; the tensor goes as bytes"
        ) from exc


def read_segment(ref: SharedTensorRef, *, domain: str) -> TensorData:
    """The tensor a handle names, its bytes mapped in place (no copy); InvalidRequestError
    naming what to fix for a handle that cannot be right."""
    where = f"shared_tensor {echo(ref.name)}"
    if not domain or ref.domain != domain:
        raise InvalidRequestError(
            f"{where} lives in shared-memory domain {echo(ref.domain)}, not this stage's "
            f"({echo(domain) if domain else 'none: it runs with --no-shm or has no /dev/shm'}); "
            "send the tensor as bytes (the `tensor` field) to a stage on another host"
        )
    if not _NAME.fullmatch(ref.name):
        raise InvalidRequestError(
            f"{where} is not an omnistage segment name (omnistage-<owner>-<request>-<n>, a "
            f"file of {SHM_DIR}); pass the name a SharedTensor handle gave"
        )
    count = math.prod(ref.shape)
    size = itemsize(ref.dtype)
    if any(dim < 0 for dim in ref.shape) or ref.offset < 0 or count * size != ref.nbytes:
        raise InvalidRequestError(
            f"{where}: shape {list(ref.shape)} of {ref.dtype} needs {count * size} bytes but "
            f"nbytes is {ref.nbytes} (offset {ref.offset}); make nbytes prod(shape) × "
            "itemsize and every dim and the offset ≥ 0"
        )
    try:
        fd = os.open(SHM_DIR / ref.name, os.O_RDWR)
    except FileNotFoundError:
        raise InvalidRequestError(
            f"{where} does not exist in {SHM_DIR}: its owner removed it (its request ended) "
            "or it was never made; keep the segment until this call ends, or send bytes"
        ) from None
    try:
        held = os.fstat(fd).st_size
        if ref.offset + ref.nbytes > held:
            raise InvalidRequestError(
                f"{where} holds {held} bytes, fewer than offset {ref.offset} + nbytes "
                f"{ref.nbytes}; send the handle of the segment that holds the tensor"
            )
        if ref.nbytes == 0:
            return TensorData(ref.dtype, ref.shape, b"", shared=ref)
        mapped = mmap.mmap(fd, ref.offset + ref.nbytes)
    finally:
        os.close(fd)
    view = memoryview(mapped)[ref.offset : ref.offset + ref.nbytes]
    return TensorData(ref.dtype, ref.shape, view, shared=ref)
