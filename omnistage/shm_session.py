"""One request's shared-memory segments, owned by the process that runs the request.

The orchestrator opens a `SharedMemorySession` per pipeline request (`PipelineRunner.run`).
Every segment a stage writes for that request is named with the session's prefix, so the
session can remove all of them when the request ends, whether it finished, failed or was
cancelled, including those whose handle never reached it. `sweep_finished` catches the last
race (a stage that wrote a segment after the request had ended): it removes this process's
segments whose request is no longer open.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from pathlib import Path

from omnistage import shm
from omnistage.types import TensorData

logger = logging.getLogger(__name__)

_current: contextvars.ContextVar[SharedMemorySession | None] = contextvars.ContextVar(
    "omnistage_shm_session", default=None
)
_open_prefixes: set[str] = set()
POOL_SEGMENTS = 8
"""Free segments an orchestrator keeps for reuse; more are removed."""
POOL_BYTES = 1 << 30
"""Bytes of free segments it keeps (1 GiB); more are removed."""
OFFERED = 2
"""Free segments offered to one stage call."""


class SegmentPool:
    """Segments of finished requests, kept to be written again: their pages exist already,
    so a stage that reuses one skips the kernel's allocating and zeroing of new pages. They
    are named with the pool's own prefix (always open) and removed by `close`, or by a
    sweeper once this process has died."""

    def __init__(self, *, max_segments: int = POOL_SEGMENTS, max_bytes: int = POOL_BYTES) -> None:
        self.prefix = shm.request_prefix()
        self._max_segments, self._max_bytes = max_segments, max_bytes
        self._free: dict[str, int] = {}
        _open_prefixes.add(self.prefix)

    def take(self, count: int = OFFERED) -> list[tuple[str, int]]:
        """Up to `count` free segments, the largest first, no longer free."""
        taken = sorted(self._free.items(), key=lambda item: -item[1])[:count]
        for name, _ in taken:
            del self._free[name]
        return taken

    def give_back(self, name: str, capacity: int) -> None:
        """Keep a segment of a request that ended well, or remove it beyond the bounds."""
        path = shm.SHM_DIR / name
        held = sum(self._free.values())
        if len(self._free) >= self._max_segments or held + capacity > self._max_bytes:
            path.unlink(missing_ok=True)
            return
        if not name.startswith(f"{self.prefix}-"):
            pooled = f"{self.prefix}-{name.rsplit('-', 1)[1]}"
            try:
                path.rename(shm.SHM_DIR / pooled)
            except FileNotFoundError:
                return
            name = pooled
        self._free[name] = capacity

    def close(self) -> None:
        _open_prefixes.discard(self.prefix)
        self._free.clear()
        shm.unlink_prefix(self.prefix)


class SharedMemorySession:
    """The segments of one request: the offer a stage writes under, the handles it sent."""

    def __init__(
        self,
        *,
        domain: str,
        min_bytes: int = shm.DEFAULT_MIN_BYTES,
        output_stages: frozenset[str] = frozenset(),
        pool: SegmentPool | None = None,
    ) -> None:
        self.domain = domain
        self.min_bytes = min_bytes
        self.prefix = shm.request_prefix()
        self._output_stages = output_stages
        self._pool = pool
        self._segments: dict[str, int] = {}  # offered or received: name → capacity
        self._prefix_out = False  # a stage was told to write under the prefix
        _open_prefixes.add(self.prefix)

    def wants_output(self, stage: str) -> bool:
        """Whether `stage`'s output tensors may come back as handles (it feeds a next stage
        only, so nothing but this process and that stage reads them)."""
        return bool(self.domain) and stage in self._output_stages

    def offer(self) -> list[tuple[str, int]]:
        """Free segments of the pool for one stage call to write into, now the request's; the
        call also names the request's prefix, under which the stage may create more."""
        self._prefix_out = True
        taken = self._pool.take() if self._pool is not None else []
        self._segments.update(taken)
        return taken

    def receive(self, ref: shm.SharedTensorRef) -> TensorData:
        """A handle a stage sent: its tensor mapped in place (the segment is this session's)."""
        tensor = shm.read_segment(ref, domain=self.domain)
        self._segments.setdefault(ref.name, ref.offset + ref.nbytes)
        return tensor

    def close(self, *, ok: bool = False) -> None:
        """Unlink every segment of the request; when it ended `ok`, keep its segments in the
        pool instead (a stage may still write into those of a failed or cancelled one)."""
        _open_prefixes.discard(self.prefix)
        for name, capacity in self._segments.items():
            if ok and self._pool is not None:
                self._pool.give_back(name, capacity)
            else:
                (shm.SHM_DIR / name).unlink(missing_ok=True)
        if not self._prefix_out:  # no stage could have made a segment the session does not know
            return
        removed = shm.unlink_prefix(self.prefix)  # one listing of the folder
        if removed:
            logger.debug("request segments removed: %s", ", ".join(removed))


def current() -> SharedMemorySession | None:
    """The session of the request being run in this context, if it hands tensors over so."""
    return _current.get()


@contextlib.contextmanager
def request_session(
    *,
    domain: str,
    min_bytes: int,
    output_stages: frozenset[str],
    pool: SegmentPool | None = None,
) -> Iterator[SharedMemorySession | None]:
    """A session for one request, current inside the block, closed at its end; None (and no
    session) when `domain` is empty."""
    if not domain:
        yield None
        return
    session = SharedMemorySession(
        domain=domain, min_bytes=min_bytes, output_stages=output_stages, pool=pool
    )
    token = _current.set(session)
    ok = False
    try:
        yield session
        ok = True
    finally:
        session.close(ok=ok)
        with contextlib.suppress(ValueError):  # reset from another context: nothing to undo
            _current.reset(token)


def sweep_finished(shm_dir: Path = shm.SHM_DIR) -> list[str]:
    """Unlink this process's segments whose request is no longer open; return their names."""
    mine = f"{shm.PREFIX}{shm.owner_token()}-"
    removed = []
    for path in shm_dir.glob(f"{mine}*"):
        if path.name.rsplit("-", 1)[0] not in _open_prefixes:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
    return removed
