"""Collect one stage replica's session: stop it, pull every file it lists, check each sha256,
and say how far it got as it goes."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from omnistage.errors import (
    InvalidRequestError,
    OmnistageError,
    StageUnavailableError,
    reworded,
)
from omnistage.profile_files import check_file_name, sha256_file
from omnistage.types import ProfileManifest, StageProfileResult, StopProgress
from orchestrator.pool import StageReplica

logger = logging.getLogger(__name__)

Progress = Callable[[StopProgress], None]
PULL_REPORT_BYTES = 8 << 20  # a "pulling" event at most this often, and at each file's end
PULL_RETRY_S = 30.0  # how long a file's pull is retried while its stage is unavailable
PULL_BACKOFF_S = (0.25, 4.0)  # the first wait before a retry, and the longest


def _ignore(event: StopProgress) -> None:
    pass


class StageCollector:
    """Stops one replica and pulls its files into `local_dir`, reporting to `progress`."""

    def __init__(
        self, replica: StageReplica, stage_session: str, local_dir: Path, progress: Progress | None
    ) -> None:
        self.replica = replica
        self.stage_session = stage_session
        self.local_dir = local_dir
        self._progress = progress or _ignore
        self._started = time.monotonic()

    def _say(
        self,
        phase: str,
        message: str,
        *,
        file: str = "",
        bytes_done: int = 0,
        bytes_total: int = 0,
        seconds: float = 0.0,
    ) -> None:
        self._progress(
            StopProgress(
                phase=phase,
                stage=self.replica.stage,
                replica=self.replica.address,
                file=file,
                bytes_done=bytes_done,
                bytes_total=bytes_total,
                seconds=seconds,
                message=f"{self.replica.stage}: {message}",
            )
        )

    async def collect(self) -> StageProfileResult:
        replica = self.replica
        try:
            self._say("flushing", "flushing its trace (the engine writes it now)")
            manifest = await replica.client.stop_profile()
            total = sum(f.size_bytes for f in manifest.files)
            flushed = manifest.stop_seconds or time.monotonic() - self._started
            self._say(
                "flushed",
                f"flushed in {flushed:.1f} s: {len(manifest.files)} files, {_mb(total)}",
                bytes_total=total,
                seconds=flushed,
            )
            await self._pull(manifest, total)
        except OmnistageError as exc:
            logger.warning("stage %s (%s) failed to stop: %s", replica.stage, replica.address, exc)
            error = f"{type(exc).__name__}: {exc}"
            self._say("failed", error, seconds=time.monotonic() - self._started)
            return StageProfileResult(
                stage=replica.stage,
                replica=replica.address,
                ok=False,
                error=error,
                stage_session_id=self.stage_session,
                local_dir=str(self.local_dir),
                stop_seconds=time.monotonic() - self._started,
            )
        return StageProfileResult(
            stage=replica.stage,
            replica=replica.address,
            ok=True,
            files=manifest.files,
            stage_session_id=manifest.session_id,
            local_dir=str(self.local_dir),
            stop_seconds=time.monotonic() - self._started,
        )

    async def _pull(self, manifest: ProfileManifest, total: int) -> None:
        unsafe = [item.name for item in manifest.files if not _is_plain_file_name(item.name)]
        if unsafe:
            raise OmnistageError(
                f"the stage's manifest names files outside its folder {unsafe}: a profile "
                "file must be a plain file name, without folders or '..'; no file of this "
                "stage was pulled"
            )
        pulled_before = time.monotonic()
        done = 0
        for item in manifest.files:
            target = await asyncio.to_thread(self._target, item.name, manifest.session_id)
            reported = done

            def on_bytes(count: int, name: str = item.name) -> None:
                nonlocal done, reported
                done += count
                if done - reported >= PULL_REPORT_BYTES:
                    reported = done
                    self._pulling(name, done, total)

            try:
                done = await self._fetch(manifest.session_id, item.name, target, on_bytes, done)
            except OSError as exc:
                raise OmnistageError(
                    f"could not write {target}: {exc}; free space there, or pass another "
                    f"output_dir (the stage keeps its copy in session {manifest.session_id})"
                ) from exc
            digest = await asyncio.to_thread(sha256_file, target)
            if digest != item.sha256:
                target.unlink()
                raise OmnistageError(
                    f"{item.name} arrived corrupted and was deleted: its sha256 is "
                    f"{digest}, the stage's manifest says {item.sha256}; the stage keeps "
                    f"its copy in session {manifest.session_id}"
                )
            self._pulling(item.name, done, total)
        seconds = time.monotonic() - pulled_before
        self._say(
            "pulled",
            f"pulled {_mb(total)} in {seconds:.1f} s",
            bytes_done=done,
            bytes_total=total,
            seconds=seconds,
        )

    def _target(self, name: str, stage_session: str) -> Path:
        """Where a pulled file goes: a new regular file in `local_dir`, a real folder (the
        session folder is a real path, so no symlink may lie on the way down to it)."""
        self.local_dir.mkdir(parents=True, exist_ok=True)
        target = self.local_dir / name
        if os.path.realpath(self.local_dir) != str(self.local_dir) or target.is_symlink():
            link = target if target.is_symlink() else self.local_dir
            raise OmnistageError(
                f"the orchestrator did not write {name}: {link} is a symlink on its own disk, "
                "and pulled files are written only as regular files inside the session folder; "
                f"the stage keeps its copy in session {stage_session}"
            )
        return target

    async def _fetch(
        self, session_id: str, name: str, target: Path, on_bytes: Callable[[int], None], done: int
    ) -> int:
        """Pull one file, retrying while the stage is unavailable (draining after SIGTERM, or
        a link that dropped) with a growing backoff, for up to PULL_RETRY_S after the first
        failure, each retry resuming after the bytes already written; return the bytes done
        of the session, this file included."""
        before, first_failure, backoff = done, 0.0, PULL_BACKOFF_S[0]
        offset = 0
        while True:
            try:
                written = await self.replica.client.fetch_file(
                    session_id, name, target, offset=offset, on_bytes=on_bytes
                )
                return before + offset + written
            except StageUnavailableError as exc:
                now = time.monotonic()
                first_failure = first_failure or now
                if now + backoff - first_failure > PULL_RETRY_S:
                    raise reworded(exc, f"{exc}; retried for {now - first_failure:.0f} s") from exc
                logger.info("pulling %s from %s: %s; retrying", name, self.replica.address, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, PULL_BACKOFF_S[1])
                offset = target.stat().st_size if target.is_file() else 0

    def _pulling(self, name: str, done: int, total: int) -> None:
        self._say(
            "pulling",
            f"pulled {_mb(done)} of {_mb(total)} ({name})",
            file=name,
            bytes_done=done,
            bytes_total=total,
        )


def _mb(size: int) -> str:
    """A size for a progress line: kB below 1 MB, so a small session does not read 0.0 MB."""
    return f"{size / 1e6:.1f} MB" if size >= 1_000_000 else f"{size / 1e3:.1f} kB"


def _is_plain_file_name(name: str) -> bool:
    """Whether `name` is a file name the stage could serve (profile_files' one rule)."""
    try:
        check_file_name(name, nested=False)
    except InvalidRequestError:
        return False
    return True


def replica_dir(session_dir: Path, replica: StageReplica, per_replica: bool) -> Path:
    folder = session_dir / replica.stage
    if per_replica:
        folder = folder / re.sub(r"[^A-Za-z0-9._-]+", "_", replica.address)
    return folder
