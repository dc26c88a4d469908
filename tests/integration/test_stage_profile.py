"""Profile sessions on a real vLLM stage: the files, the manifest, the fetch and every error."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from omnistage.profile_files import MIN_CHUNK_BYTES
from omnistage.traces import load_trace, op_stats
from omnistage.v1 import common_pb2, stage_pb2
from services.profiling.sessions import ensure_op_table
from tests.servers import RunningStage

STOP_TIMEOUT = 600


@dataclass
class Session:
    start: stage_pb2.StartProfileResponse
    stop: stage_pb2.StopProfileResponse
    fetched: dict[str, bytes]
    info_while_active: stage_pb2.StageInfo


def fetch(
    stage: RunningStage, session_id: str, name: str, chunk_size: int = 0
) -> tuple[bytes, list[common_pb2.FileChunk]]:
    chunks = list(
        stage.stub.FetchProfileFile(
            stage_pb2.FetchProfileFileRequest(
                session_id=session_id, name=name, chunk_size=chunk_size
            ),
            timeout=120,
        )
    )
    return b"".join(c.data for c in chunks), chunks


def profile_two_requests(
    stage: RunningStage, start_request: stage_pb2.StartProfileRequest
) -> Session:
    """A profile session around two concurrent 16-token requests, fetched back over gRPC."""
    start = stage.stub.StartProfile(start_request, timeout=60)
    info = stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5)

    def run() -> None:
        request = stage_pb2.GenerateRequest(
            prompt="Describe a profiler.",
            sampling=common_pb2.SamplingParams(max_tokens=16, ignore_eos=True),
        )
        list(stage.stub.Generate(request, timeout=120))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop = stage.stub.StopProfile(stage_pb2.StopProfileRequest(), timeout=STOP_TIMEOUT)
    fetched = {f.name: fetch(stage, stop.session_id, f.name)[0] for f in stop.files}
    return Session(start, stop, fetched, info)


@pytest.fixture(scope="module")
def session(stage: RunningStage) -> Session:
    """One unbounded profile session around two concurrent requests."""
    return profile_two_requests(stage, stage_pb2.StartProfileRequest(label="test run"))


def trace_name(session: Session) -> str:
    names = [n for n in session.fetched if n.endswith(".pt.trace.json.gz") and "async_llm" not in n]
    assert len(names) == 1, f"expected one engine trace, got {list(session.fetched)}"
    return names[0]


def engine_steps(session: Session) -> int:
    """vLLM's worker wraps each engine step it records in `execute_context_<n>(...)...`."""
    trace = json.loads(gzip.decompress(session.fetched[trace_name(session)]))
    return sum(
        1
        for e in trace["traceEvents"]
        if e.get("ph") == "X" and e.get("name", "").startswith("execute_context_")
    )


def test_session_folder_and_id(stage: RunningStage, session: Session) -> None:
    assert session.start.session_id == session.stop.session_id
    assert "test-run" in session.start.session_id
    assert stage.profiler_dir is not None
    assert Path(session.stop.profile_dir) == stage.profiler_dir / session.start.session_id
    assert session.info_while_active.profiling_active
    assert session.info_while_active.profile_session_id == session.start.session_id
    info = stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5)
    assert not info.profiling_active and info.profile_session_id == ""


def test_trace_is_gzip_json_with_the_models_ops(session: Session) -> None:
    trace = json.loads(gzip.decompress(session.fetched[trace_name(session)]))
    names = {e.get("name", "") for e in trace["traceEvents"] if e.get("ph") == "X"}
    assert any("attention" in n for n in names), "no attention op in the trace"
    assert any(
        n in {"_C::onednn_mm", "aten::mm", "aten::addmm", "aten::linear", "aten::matmul"}
        for n in names
    )
    assert "baseTimeNanoseconds" in trace


def test_op_table_is_present_and_not_empty(session: Session) -> None:
    table = session.fetched["profiler_out_thinker.txt"].decode()
    assert "Self CPU" in table
    assert len(table.splitlines()) > 10
    assert not [n for n in session.fetched if n.endswith("profiler_out.txt")], "raw tables remain"


def test_manifest_sha256_matches_fetched_bytes(session: Session) -> None:
    assert {f.name for f in session.stop.files} == set(session.fetched)
    for item in session.stop.files:
        data = session.fetched[item.name]
        assert len(data) == item.size_bytes
        assert hashlib.sha256(data).hexdigest() == item.sha256


def test_fetch_streams_in_chunks(stage: RunningStage, session: Session) -> None:
    name = trace_name(session)
    chunk = MIN_CHUNK_BYTES  # the smallest a stage accepts
    data, chunks = fetch(stage, session.stop.session_id, name, chunk_size=chunk)
    assert len(chunks) == -(-len(data) // chunk)
    assert [c.offset for c in chunks] == [i * chunk for i in range(len(chunks))]
    assert data == session.fetched[name]
    assert chunks[0].total_size == len(data)


def test_op_table_is_built_from_the_trace_when_the_engine_wrote_none(
    session: Session, tmp_path: Path
) -> None:
    name = trace_name(session)
    (tmp_path / name).write_bytes(session.fetched[name])
    table_path = ensure_op_table(tmp_path, "thinker")
    assert table_path == tmp_path / "profiler_out_thinker.txt"
    table = table_path.read_text()
    top = op_stats(load_trace(tmp_path / name))[0]
    assert top.name[:30] in table and "Self CPU" in table


def test_max_iterations_bounds_the_engines_trace(stage: RunningStage, session: Session) -> None:
    """The same workload, with StartProfile's max_iterations=1: vLLM's CPU worker records one
    engine step and stops its profiler by itself; StopProfile still returns the session."""
    bounded = profile_two_requests(
        stage, stage_pb2.StartProfileRequest(label="one step", max_iterations=1)
    )
    unbounded_steps = engine_steps(session)
    assert unbounded_steps >= 16, "two 16-token requests take at least 16 engine steps"
    assert engine_steps(bounded) == 1
    assert "profiler_out_thinker.txt" in bounded.fetched


def test_delay_iterations_skips_the_first_engine_steps(
    stage: RunningStage, session: Session
) -> None:
    """The same workload, with StartProfile's delay_iterations=8: vLLM starts recording only
    after 8 engine steps, so the trace holds fewer steps than the undelayed session's."""
    delayed = profile_two_requests(
        stage, stage_pb2.StartProfileRequest(label="delayed", delay_iterations=8)
    )
    full, recorded = engine_steps(session), engine_steps(delayed)
    assert 0 < recorded <= full - 4, (recorded, full)
    assert "profiler_out_thinker.txt" in delayed.fetched


def test_stop_profile_with_none_active(stage: RunningStage) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stage.stub.StopProfile(stage_pb2.StopProfileRequest(), timeout=60)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no profile session is active" in info.value.details()


def test_start_profile_while_active(stage: RunningStage) -> None:
    first = stage.stub.StartProfile(stage_pb2.StartProfileRequest(label="first"), timeout=60)
    try:
        with pytest.raises(grpc.RpcError) as info:
            stage.stub.StartProfile(stage_pb2.StartProfileRequest(label="second"), timeout=60)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert first.session_id in info.value.details()
        with pytest.raises(grpc.RpcError) as recording:
            fetch(stage, first.session_id, "anything.txt")
        assert recording.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        stage.stub.StopProfile(stage_pb2.StopProfileRequest(), timeout=STOP_TIMEOUT)


def test_negative_iterations_are_invalid(stage: RunningStage) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stage.stub.StartProfile(stage_pb2.StartProfileRequest(max_iterations=-1), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_iterations" in info.value.details()
    assert not stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5).profiling_active


@pytest.mark.parametrize(
    "call",
    [
        lambda stub: stub.StartProfile(stage_pb2.StartProfileRequest(), timeout=30),
        lambda stub: stub.StopProfile(stage_pb2.StopProfileRequest(), timeout=30),
        lambda stub: list(
            stub.FetchProfileFile(
                stage_pb2.FetchProfileFileRequest(session_id="x", name="y"), timeout=30
            )
        ),
    ],
    ids=["start", "stop", "fetch"],
)
def test_profiling_rpcs_without_profiler_dir(plain_stage: RunningStage, call: object) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call(plain_stage.stub)  # type: ignore[operator]
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "--profiler-config" in info.value.details()
    assert "torch_profiler_dir" in info.value.details()


def test_fetch_unknown_session_is_not_found(stage: RunningStage, session: Session) -> None:
    with pytest.raises(grpc.RpcError) as info:
        fetch(stage, "20990101T000000Z-nope-000000", "profiler_out_thinker.txt")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "20990101T000000Z-nope-000000" in info.value.details()
    with pytest.raises(grpc.RpcError) as missing:
        fetch(stage, session.stop.session_id, "no-such-file.txt")
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("session_id", "name"),
    [
        ("SESSION", "../SECRET"),
        ("SESSION", "..%2F"),
        ("SESSION", "sub/file.txt"),
        ("SESSION", "/etc/hostname"),
        ("..", "SECRET"),
        ("../SESSION", "x"),
    ],
    ids=[
        "dotdot-name",
        "dotdot-literal",
        "slash-name",
        "absolute-name",
        "dotdot-session",
        "traversal-session",
    ],
)
def test_fetch_outside_the_session_is_refused(
    stage: RunningStage, session: Session, session_id: str, name: str
) -> None:
    assert stage.profiler_dir is not None
    secret = stage.profiler_dir / "SECRET"
    secret.write_text("must never be served")
    try:
        with pytest.raises(grpc.RpcError) as info:
            fetch(stage, session_id.replace("SESSION", session.stop.session_id), name)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "must never" not in (info.value.details() or "")
    finally:
        secret.unlink()


def test_user_files_in_profiler_dir_survive(stage: RunningStage) -> None:
    """A stage never deletes what it did not write."""
    assert stage.profiler_dir is not None
    keep = stage.profiler_dir / "notes.txt"
    keep.write_text("mine")
    started = stage.stub.StartProfile(stage_pb2.StartProfileRequest(label="keep"), timeout=60)
    stage.stub.StopProfile(stage_pb2.StopProfileRequest(), timeout=STOP_TIMEOUT)
    assert keep.read_text() == "mine"
    shutil.rmtree(stage.profiler_dir / started.session_id)
    keep.unlink()
