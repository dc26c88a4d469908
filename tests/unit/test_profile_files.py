"""The shared profile-file rules: which names a session may hold, and which session folders
a `RetentionPolicy` deletes."""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath

import pytest

from omnistage.errors import InvalidRequestError
from omnistage.profile_files import RetentionPolicy, check_file_name


@pytest.mark.parametrize(
    "name", ["x.txt", "thinker/x.txt", "thinker/rank0/trace.json.gz", ".hidden"]
)
def test_nested_names_inside_a_session_are_accepted(name: str) -> None:
    assert check_file_name(name, nested=True) == PurePosixPath(name)


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "thinker/../../x",
        "..%2F",
        "a..b/c.d",
        "/etc/passwd",
        "a//b",
        "a/./b",
        "a\\b",
        "a/",
        "x\0y",
        ".",
    ],
)
def test_nested_names_that_could_leave_the_session_are_refused(name: str) -> None:
    with pytest.raises(InvalidRequestError, match="must be a relative path inside the session"):
        check_file_name(name, nested=True)


@pytest.mark.parametrize("name", ["thinker/x.txt", "a/b"])
def test_folders_are_refused_unless_nested(name: str) -> None:
    with pytest.raises(InvalidRequestError, match="must be a plain file name"):
        check_file_name(name, nested=False)


def _sessions(root: Path, sizes: list[int]) -> list[Path]:
    """Session folders, oldest first (mtimes 1000, 2000, ...), each with `size` bytes."""
    folders = []
    for index, size in enumerate(sizes):
        folder = root / f"session-{index}"
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "trace.bin").write_bytes(b"x" * size)
        os.utime(folder, (1_000 * (index + 1),) * 2)
        folders.append(folder)
    return folders


@pytest.mark.parametrize(
    ("max_sessions", "max_bytes", "sizes", "left"),
    [
        (0, 0, [10, 10, 10], [0, 1, 2]),  # no limits
        (2, 0, [10, 10, 10], [1, 2]),
        (3, 0, [10, 10, 10], [0, 1, 2]),  # at the limit, not over it
        (0, 25, [10, 10, 10], [1, 2]),
        (0, 30, [10, 10, 10], [0, 1, 2]),
        (0, 5, [10, 10, 10], [2]),  # the newest stays, alone over the limit
        (5, 15, [1, 1, 20], [2]),
        (2, 15, [1, 10, 4], [1, 2]),  # count and bytes hold once the oldest goes
        (1, 0, [10], [0]),
    ],
)
def test_retention_deletes_the_oldest_until_the_limits_hold(
    tmp_path: Path, max_sessions: int, max_bytes: int, sizes: list[int], left: list[int]
) -> None:
    folders = _sessions(tmp_path, sizes)
    policy = RetentionPolicy(max_sessions=max_sessions, max_total_bytes=max_bytes)
    deleted = policy.prune(list(reversed(folders)))  # the order passed in does not matter
    assert [f for f in folders if f.exists()] == [folders[i] for i in left]
    assert deleted == [f for i, f in enumerate(folders) if i not in left]


def test_retention_skips_kept_folders_and_logs_each_deletion(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folders = _sessions(tmp_path, [10, 10, 10, 10])
    with caplog.at_level(logging.INFO, logger="omnistage.profile_files"):
        deleted = RetentionPolicy(max_sessions=2).prune(folders, keep=frozenset({folders[0]}))
    assert deleted == [folders[1], folders[2]]
    assert [f.exists() for f in folders] == [True, False, False, True]
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if m.startswith("retention: deleted")] == [
        "retention: deleted profile session session-1 (10 bytes; keeping at most 2 sessions "
        "and any number of bytes)",
        "retention: deleted profile session session-2 (10 bytes; keeping at most 2 sessions "
        "and any number of bytes)",
    ]
