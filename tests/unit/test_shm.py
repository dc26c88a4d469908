"""Segments in the real /dev/shm: owners, sweeps, reuse and the per-request session."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from omnistage import shm, shm_session
from omnistage.types import TensorData

pytestmark = pytest.mark.skipif(not shm.local_domain(), reason="no writable /dev/shm")


def _tensor(floats: int) -> TensorData:
    array = np.arange(floats, dtype=np.float32)
    return TensorData("float32", (floats,), memoryview(array).cast("B"))


def _plant(owner: str) -> Path:
    path = shm.SHM_DIR / f"{shm.PREFIX}{owner}-{os.urandom(4).hex()}-0"
    path.write_bytes(b"x")
    return path


@pytest.fixture
def planted() -> Iterator[list[Path]]:
    paths: list[Path] = []
    yield paths
    for path in paths:
        path.unlink(missing_ok=True)


def test_the_owner_token_is_read_once_per_process_and_a_forked_child_has_its_own() -> None:
    mine = shm.owner_token()
    assert shm.owner_token() == mine
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its token must name its own pid, not the parent's cached one
        os.write(write, shm.owner_token().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 200).decode()
    os.close(read)
    assert child.split(".")[1] == str(pid) and child != mine


def test_the_sweep_removes_dead_owners_segments_only(planted: list[Path]) -> None:
    namespace, pid, start = shm.owner_token().split(".")
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = child.stdout.strip()
    cases = {
        "dead": f"{namespace}.{dead_pid}.1",
        "pid-reused": f"{namespace}.{pid}.{int(start) + 1}",  # this pid, another start time
        "alive": shm.owner_token(),
        "another-namespace": f"1.{dead_pid}.1",  # cannot be told: left alone
    }
    paths = {case: _plant(owner) for case, owner in cases.items()}
    planted.extend(paths.values())
    removed = set(shm.sweep_dead_owners())
    assert {p.name for p in (paths["dead"], paths["pid-reused"])} <= removed
    assert paths["alive"].exists() and paths["another-namespace"].exists()


def test_a_segment_round_trips_in_place() -> None:
    domain = shm.local_domain()
    ref = shm.write_segment(shm.request_prefix(), [_tensor(1000), _tensor(24)], domain=domain)
    try:
        assert ref.shape == (1024,) and ref.nbytes == 4096
        read = shm.read_segment(ref, domain=domain)
        assert isinstance(read.data, memoryview)
        values = np.frombuffer(read.data, dtype=np.float32)
        assert values[999] == 999 and values[1000] == 0
    finally:
        (shm.SHM_DIR / ref.name).unlink()


def test_a_stage_writes_into_an_offered_segment_of_the_same_owner_only() -> None:
    domain, prefix = shm.local_domain(), shm.request_prefix()
    first = shm.write_segment(prefix, [_tensor(2048)], domain=domain)
    other = _plant("1.1.1")
    try:
        again = shm.write_segment(prefix, [_tensor(1024)], domain=domain, reuse=first.name)
        assert again.name == first.name and again.nbytes == 4096
        foreign = shm.write_segment(prefix, [_tensor(8)], domain=domain, reuse=other.name)
        assert foreign.name != other.name and other.read_bytes() == b"x"
        (shm.SHM_DIR / foreign.name).unlink()
    finally:
        (shm.SHM_DIR / first.name).unlink(missing_ok=True)
        other.unlink()


def _received(session: shm_session.SharedMemorySession) -> str:
    ref = shm.write_segment(session.prefix, [_tensor(256)], domain=session.domain)
    session.receive(ref)
    return ref.name


@pytest.mark.parametrize("ends", ["well", "badly"])
def test_a_request_pools_its_segments_when_it_ends_well_and_removes_them_otherwise(
    ends: str,
) -> None:
    pool = shm_session.SegmentPool(max_segments=1)
    try:
        session = shm_session.SharedMemorySession(domain=shm.local_domain(), pool=pool)
        names = [_received(session), _received(session)]
        session.close(ok=ends == "well")
        assert not any((shm.SHM_DIR / n).exists() for n in names)
        pooled = list(shm.SHM_DIR.glob(f"{pool.prefix}-*"))
        assert len(pooled) == (1 if ends == "well" else 0)  # one kept: the pool's bound
        assert [name for name, _ in pool.take()] == [p.name for p in pooled]
    finally:
        pool.close()
    assert not list(shm.SHM_DIR.glob(f"{pool.prefix}-*"))


def test_the_finished_sweep_keeps_open_requests_and_the_pool() -> None:
    pool = shm_session.SegmentPool()
    open_one = shm_session.SharedMemorySession(domain=shm.local_domain(), pool=pool)
    ended = shm_session.SharedMemorySession(domain=shm.local_domain())
    ended.close()
    late = shm.write_segment(ended.prefix, [_tensor(4)], domain=open_one.domain)  # after its end
    kept = _received(open_one)
    try:
        assert shm_session.sweep_finished() == [late.name]
        assert (shm.SHM_DIR / kept).exists()
    finally:
        open_one.close()
        pool.close()


def test_a_segment_a_stage_made_under_the_offer_but_never_sent_is_removed_at_the_end() -> None:
    session = shm_session.SharedMemorySession(domain=shm.local_domain())
    session.offer()  # the stage call names the prefix: the stage may create segments under it
    lost = shm.write_segment(session.prefix, [_tensor(64)], domain=session.domain)
    session.close(ok=True)
    assert not (shm.SHM_DIR / lost.name).exists()


def test_a_request_that_offered_no_stage_a_prefix_does_not_list_the_folder(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listed: list[str] = []
    monkeypatch.setattr(shm, "unlink_prefix", lambda prefix: listed.append(prefix) or [])
    shm_session.SharedMemorySession(domain=shm.local_domain()).close(ok=True)
    assert listed == []  # a text pipeline's request: no listing of /dev/shm per request
    offered = shm_session.SharedMemorySession(domain=shm.local_domain())
    offered.offer()
    offered.close(ok=True)
    assert listed == [offered.prefix]
