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


class SharedMemorySession:
    """The segments of one request: the offer a stage writes under, the handles it sent."""

    def __init__(
        self,
        *,
        domain: str,
        min_bytes: int = shm.DEFAULT_MIN_BYTES,
        output_stages: frozenset[str] = frozenset(),
    ) -> None:
        self.domain = domain
        self.min_bytes = min_bytes
        self.prefix = shm.request_prefix()
        self._output_stages = output_stages
        _open_prefixes.add(self.prefix)

    def wants_output(self, stage: str) -> bool:
        """Whether `stage`'s output tensors may come back as handles (it feeds a next stage
        only, so nothing but this process and that stage reads them)."""
        return bool(self.domain) and stage in self._output_stages

    def receive(self, ref: shm.SharedTensorRef) -> TensorData:
        """A handle a stage sent: its tensor mapped in place (the segment is this session's)."""
        return shm.read_segment(ref, domain=self.domain)

    def close(self) -> None:
        """Unlink every segment of the request."""
        _open_prefixes.discard(self.prefix)
        removed = shm.unlink_prefix(self.prefix)
        if removed:
            logger.debug("request segments removed: %s", ", ".join(removed))


def current() -> SharedMemorySession | None:
    """The session of the request being run in this context, if it hands tensors over so."""
    return _current.get()


@contextlib.contextmanager
def request_session(
    *, domain: str, min_bytes: int, output_stages: frozenset[str]
) -> Iterator[SharedMemorySession | None]:
    """A session for one request, current inside the block, closed at its end; None (and no
    session) when `domain` is empty."""
    if not domain:
        yield None
        return
    session = SharedMemorySession(domain=domain, min_bytes=min_bytes, output_stages=output_stages)
    token = _current.set(session)
    try:
        yield session
    finally:
        session.close()
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
