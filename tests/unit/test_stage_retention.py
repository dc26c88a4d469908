"""A stage keeps at most `profile_max_sessions` past sessions and `profile_max_bytes` of them:
after every stop and once at start it deletes the oldest, never the newest or the active one,
and never a folder that is not a session's."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from omnistage import cli
from omnistage.errors import OmnistageError
from omnistage.profile_files import RetentionPolicy
from omnistage.types import EngineInfo, GenerateInput, ProfileOptions
from services.config import ProfilerSettings, StageConfig
from services.profiling.sessions import ProfileSessionStore
from services.server import StageServer


class TableEngine:
    """An engine whose profiler writes an op table of `table_bytes` bytes on stop."""

    def __init__(self, table_bytes: int = 100) -> None:
        self.table_bytes = table_bytes

    async def start(self) -> None:
        pass

    def generate(self, request: GenerateInput) -> Any:
        raise NotImplementedError

    async def abort(self, request_id: str) -> None:
        pass

    async def start_profile(self, session_dir: Path, options: ProfileOptions) -> None:
        pass

    async def stop_profile(self, session_dir: Path) -> list[Path]:
        table = session_dir / "rank0.profiler_out.txt"
        table.write_text("x" * (self.table_bytes - 1) + "\n")
        return [table]

    def info(self) -> EngineInfo:
        return EngineInfo(engine="fake", model="none")

    async def close(self) -> None:
        pass


def _store(root: Path, retention: RetentionPolicy, table_bytes: int = 100) -> ProfileSessionStore:
    engine: Any = TableEngine(table_bytes)
    return ProfileSessionStore(stage_name="s", engine=engine, root=root, retention=retention)


async def _record(store: ProfileSessionStore, label: str) -> str:
    await store.start(ProfileOptions(label=label))
    return (await store.stop()).session_id


def _past_session(root: Path, session_id: str, mtime: int, size: int = 100) -> Path:
    folder = root / session_id
    folder.mkdir(parents=True)
    (folder / "profiler_out_s.txt").write_bytes(b"x" * size)
    os.utime(folder, (mtime, mtime))
    return folder


def _left(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def test_only_the_newest_sessions_remain_and_each_deletion_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _store(tmp_path, RetentionPolicy(max_sessions=2))

    async def three() -> list[str]:
        # Labels in creation order: within one second, the ids sort as they were made.
        return [await _record(store, label) for label in ("s1", "s2", "s3")]

    with caplog.at_level(logging.INFO, logger="omnistage.profile_files"):
        first, second, third = asyncio.run(three())
    assert _left(tmp_path) == {second, third}
    deletions = [r.getMessage() for r in caplog.records if "retention: deleted" in r.getMessage()]
    assert len(deletions) == 1
    assert f"deleted profile session {first} " in deletions[0]
    assert "keeping at most 2 sessions" in deletions[0]


def test_the_newest_session_is_kept_even_alone_over_max_bytes(tmp_path: Path) -> None:
    store = _store(tmp_path, RetentionPolicy(max_total_bytes=50), table_bytes=1000)

    async def two() -> tuple[str, set[str], str, set[str]]:
        first = await _record(store, "s1")
        after_first = _left(tmp_path)
        second = await _record(store, "s2")
        return first, after_first, second, _left(tmp_path)

    first, after_first, second, after_second = asyncio.run(two())
    assert after_first == {first}  # alone over the limit, and kept
    assert after_second == {second}


def test_the_active_session_is_never_deleted(tmp_path: Path) -> None:
    for index, mtime in enumerate((1_000, 2_000, 3_000)):
        _past_session(tmp_path, f"20200101T00000{index}Z-old-abc123", mtime)
    store = _store(tmp_path, RetentionPolicy(max_sessions=1))

    async def prune_while_recording() -> tuple[str, list[Path], set[str]]:
        active = await store.start(ProfileOptions(label="active"))
        os.utime(active, (10, 10))  # the oldest of all: only its being active keeps it
        deleted = await store.prune()
        left = _left(tmp_path)
        await store.stop()
        return active.name, deleted, left

    active, deleted, left = asyncio.run(prune_while_recording())
    assert sorted(p.name for p in deleted) == [
        "20200101T000000Z-old-abc123",
        "20200101T000001Z-old-abc123",
    ]
    assert left == {active, "20200101T000002Z-old-abc123"}
    assert _left(tmp_path) == {active}  # once stopped it is the newest, and one is kept


def test_folders_that_are_not_sessions_are_left_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "profiles"
    _past_session(root, "20200101T000000Z-old-abc123", 1_000)
    (root / ".cache").mkdir()
    (root / "my notes").mkdir()
    (root / "README.txt").write_text("not a session\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("outside the root\n")
    os.utime(elsewhere, (10, 10))
    (root / "20200101T000000Z-link-abc123").symlink_to(elsewhere, target_is_directory=True)
    store = _store(root, RetentionPolicy(max_sessions=1))

    with caplog.at_level(logging.INFO, logger="omnistage.profile_files"):
        session = asyncio.run(_record(store, "new"))
    deletions = [r.getMessage() for r in caplog.records if "retention: deleted" in r.getMessage()]
    # The symlink is no session: counted as one it would be "deleted" (rmtree skips links).
    assert len(deletions) == 1 and "20200101T000000Z-old-abc123" in deletions[0]
    assert _left(root) == {
        session,
        ".cache",
        "my notes",
        "README.txt",
        "20200101T000000Z-link-abc123",
    }
    assert (elsewhere / "keep.txt").read_text() == "outside the root\n"


def test_the_stage_server_prunes_at_start(tmp_path: Path) -> None:
    for index in range(4):
        _past_session(tmp_path, f"20200101T00000{index}Z-old-abc123", 1_000 * (index + 1))
    config = StageConfig(
        name="thinker",
        model="none",
        host="127.0.0.1",
        profiler=ProfilerSettings(torch_profiler_dir=str(tmp_path)),
        profile_max_sessions=2,
    )
    engine: Any = TableEngine()

    async def start_and_stop() -> set[str]:
        stage = StageServer(config, engine)
        await stage.start()
        try:
            return _left(tmp_path)
        finally:
            await stage.stop(grace=0)

    assert asyncio.run(start_and_stop()) == {
        "20200101T000002Z-old-abc123",
        "20200101T000003Z-old-abc123",
    }


def _serve_config(monkeypatch: pytest.MonkeyPatch, *flags: str) -> StageConfig:
    """The StageConfig `omnistage stage serve FLAGS` would serve, without serving it."""
    seen: list[StageConfig] = []

    async def fake_serve(config: StageConfig, **_: object) -> None:
        seen.append(config)

    monkeypatch.setattr("services.server.serve", fake_serve)
    args = cli.build_parser().parse_args(["stage", "serve", "--name", "s", "--model", "m", *flags])
    assert args.func(args) == 0
    (config,) = seen
    return config


def test_serve_flags_default_to_the_config_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _serve_config(monkeypatch)
    fields = StageConfig.model_fields
    assert config.profile_max_sessions == fields["profile_max_sessions"].default == 10
    assert config.profile_max_bytes == fields["profile_max_bytes"].default == 10 * 2**30


def test_serve_flags_set_the_retention(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _serve_config(monkeypatch, "--profile-max-sessions", "3", "--profile-max-bytes", "0")
    assert config.profile_retention == RetentionPolicy(max_sessions=3, max_total_bytes=0)


@pytest.mark.parametrize("flag", ["--profile-max-sessions", "--profile-max-bytes"])
def test_a_negative_limit_says_which_flag(monkeypatch: pytest.MonkeyPatch, flag: str) -> None:
    with pytest.raises(OmnistageError) as info:
        _serve_config(monkeypatch, flag, "-1")
    key = flag.removeprefix("--").replace("-", "_")
    assert f"{key}: Input should be greater than or equal to 0" in str(info.value)
