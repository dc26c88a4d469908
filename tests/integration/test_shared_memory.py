"""Shared-memory hand-off between real torch stages behind a real orchestrator, in their own
processes (bench/tensor_stage.py's source and sink): the hand-off itself, bad handles, and
that no segment outlives a request whatever ends it (docs/shared-memory.md)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from omnistage import shm
from omnistage.launch import ServerProcess, stage_args
from omnistage.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, stage_pb2
from tests.servers import RunningStage, serve_pipeline
from tests.waiting import wait_until

MIB = 1 << 20
ROWS_PER_MIB = 256  # the source's float32 rows of 1024


def _segments() -> list[str]:
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(shm.PREFIX))


def _start_stage(tmp: Path, name: str, model: str, options: dict[str, object]) -> ServerProcess:
    engine = {"max_batch_size": 1, "max_wait_ms": 0, "num_threads": 1, **options}
    args = stage_args(
        name=name,
        engine="torch",
        model=model,
        extra=["--engine-options", json.dumps(engine), "--grace-seconds", "0"],
    )
    process = ServerProcess(f"stage {name}", args, log_path=tmp / f"{name}.log")
    process.wait_serving(timeout=120)
    return process


def _pipeline(source: str, sink: str, *, enabled: bool = True) -> str:
    return f"""
name: handoff
outputs: final
shared_memory: {{enabled: {str(enabled).lower()}}}
stages:
  - {{name: source, address: "{source}"}}
  - {{name: sink, address: "{sink}", input: {{processor: tensor}}}}
"""


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ServerProcess]]:
    tmp = tmp_path_factory.mktemp("shm")
    started: dict[str, ServerProcess] = {}
    try:
        started["source"] = _start_stage(tmp, "source", "bench.tensor_stage:build_source", {})
        started["sink"] = _start_stage(tmp, "sink", "bench.tensor_stage:build_sink", {})
        started["slow"] = _start_stage(
            tmp, "slow", "bench.tensor_stage:build_sink", {"delay_s": 3.0}
        )
        yield started
    finally:
        for process in started.values():
            process.stop()


def _request(mib: int) -> orchestrator_pb2.PipelineRequest:
    return orchestrator_pb2.PipelineRequest(token_ids=[mib])


def _sink_answer(orchestrator: ServerProcess, mib: int) -> list[int]:
    with grpc.insecure_channel(orchestrator.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        replies = list(stub.Generate(_request(mib), timeout=120))
    tensor = next(r.tensor for r in replies if r.HasField("tensor"))
    return [int(v) for v in np.frombuffer(tensor.data, dtype="<i8")]


def test_a_tensor_over_the_message_limit_goes_stage_to_stage_by_shared_memory(
    stages: dict[str, ServerProcess], tmp_path: Path
) -> None:
    source, sink = stages["source"].address, stages["sink"].address
    orchestrator = serve_pipeline(tmp_path, "shm-on", _pipeline(source, sink))
    try:
        *_, count = _sink_answer(orchestrator, 80)  # 80 MiB: over the 64 MiB of one message
        assert count == 80 * ROWS_PER_MIB * 1024
        pooled = _segments()  # the request's segment, kept for the next request to reuse
        assert len(pooled) == 1
        *_, count = _sink_answer(orchestrator, 40)  # written into the pooled segment
        assert count == 40 * ROWS_PER_MIB * 1024
        assert _segments() == pooled
    finally:
        orchestrator.stop()
    wait_until(lambda: not _segments(), timeout=10, what="no segment after the stop")
    without = serve_pipeline(tmp_path, "shm-off", _pipeline(source, sink, enabled=False))
    try:
        assert _sink_answer(without, 8)[-1] == 8 * ROWS_PER_MIB * 1024  # bytes still work
        with pytest.raises(grpc.RpcError) as failed:
            _sink_answer(without, 80)
        assert failed.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        without.stop()


def _own_segment(size: int) -> Path:
    path = shm.SHM_DIR / f"{shm.request_prefix()}-0"
    path.write_bytes(b"\0" * size)
    return path


BAD_HANDLES = {
    # case: (the handle's fields over a good one of 1 MiB, words of the message)
    "missing-segment": ({"name": "MISSING"}, "does not exist"),
    "segment-too-small": ({"nbytes": 2 * MIB, "shape": [512, 1024]}, "holds 1048576 bytes"),
    "shape-does-not-match-nbytes": ({"shape": [100, 1024]}, "needs 409600 bytes"),
    "unknown-dtype": ({"dtype": "complex64"}, "dtype 'complex64' is unknown"),
    "another-domain": ({"domain": "other-host"}, "not this stage's"),
    "not-a-segment-name": ({"name": "../../etc/passwd"}, "not an omnistage segment name"),
}


@pytest.mark.parametrize("case", BAD_HANDLES, ids=list(BAD_HANDLES))
def test_a_bad_handle_is_invalid_argument_saying_what_to_fix(
    stages: dict[str, ServerProcess], case: str
) -> None:
    overrides, words = BAD_HANDLES[case]
    segment = _own_segment(MIB)
    try:
        fields: dict[str, object] = {
            "name": segment.name,
            "offset": 0,
            "nbytes": MIB,
            "dtype": "float32",
            "shape": [256, 1024],
            "domain": shm.local_domain(),
            **overrides,
        }
        if fields["name"] == "MISSING":
            fields["name"] = f"{shm.request_prefix()}-1"
        request = stage_pb2.GenerateRequest(shared_tensor=common_pb2.SharedTensor(**fields))
        stub = RunningStage(stages["sink"], stages["sink"].address, None).stub
        with pytest.raises(grpc.RpcError) as failed:
            list(stub.Generate(request, timeout=30))
    finally:
        segment.unlink()
    assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert words in (failed.value.details() or "")


def test_both_tensor_and_shared_tensor_is_invalid_argument(
    stages: dict[str, ServerProcess],
) -> None:
    request = stage_pb2.GenerateRequest(
        tensor=common_pb2.Tensor(dtype="float32", shape=[1], data=b"\0" * 4),
        shared_tensor=common_pb2.SharedTensor(name="x", dtype="float32"),
    )
    stub = RunningStage(stages["sink"], stages["sink"].address, None).stub
    with pytest.raises(grpc.RpcError) as failed:
        list(stub.Generate(request, timeout=30))
    assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "both tensor and shared_tensor" in (failed.value.details() or "")


def _start_slow_request(orchestrator: ServerProcess) -> tuple[grpc.Channel, grpc.Future]:
    """A request held in the slow sink, once its segment is in /dev/shm."""
    channel = grpc.insecure_channel(orchestrator.address)
    stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
    call = stub.Generate(_request(4), timeout=120)
    wait_until(_segments, timeout=30, what="the request's segment in /dev/shm")
    return channel, call


def test_no_segment_outlives_a_request_the_client_cancels(
    stages: dict[str, ServerProcess], tmp_path: Path
) -> None:
    source, slow = stages["source"].address, stages["slow"].address
    orchestrator = serve_pipeline(tmp_path, "cancel", _pipeline(source, slow))
    try:
        channel, call = _start_slow_request(orchestrator)
        call.cancel()
        channel.close()
        wait_until(lambda: not _segments(), timeout=10, what="no segment after the cancel")
    finally:
        orchestrator.stop()


def test_no_segment_outlives_a_stage_killed_mid_request(
    stages: dict[str, ServerProcess], tmp_path: Path
) -> None:
    doomed = _start_stage(tmp_path, "doomed", "bench.tensor_stage:build_sink", {"delay_s": 30})
    source = stages["source"].address
    orchestrator = serve_pipeline(tmp_path, "killed-stage", _pipeline(source, doomed.address))
    try:
        channel, call = _start_slow_request(orchestrator)
        os.killpg(doomed.process.pid, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as failed:
            list(call)
        channel.close()
        assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "sink" in (failed.value.details() or "")
        wait_until(lambda: not _segments(), timeout=10, what="no segment after the kill")
    finally:
        orchestrator.stop()
        doomed.stop()


def test_no_segment_outlives_an_orchestrator_killed_and_restarted(
    stages: dict[str, ServerProcess], tmp_path: Path
) -> None:
    text = _pipeline(stages["source"].address, stages["slow"].address)
    orchestrator = serve_pipeline(tmp_path, "killed", text)
    try:
        channel, _ = _start_slow_request(orchestrator)
        left = _segments()
        os.killpg(orchestrator.process.pid, signal.SIGKILL)
        orchestrator.process.wait(timeout=30)
        channel.close()
    finally:
        orchestrator.stop()
    assert left, "the segment was there when the orchestrator died"
    restarted = serve_pipeline(tmp_path, "restarted", text)
    try:
        wait_until(lambda: not _segments(), timeout=15, what="no segment of the dead orchestrator")
        assert _sink_answer(restarted, 2)[-1] == 2 * ROWS_PER_MIB * 1024
    finally:
        restarted.stop()
