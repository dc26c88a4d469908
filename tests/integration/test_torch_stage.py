"""Real torch stages: the code2wav vocoder and docs/stages.md's custom latent decoder in
subprocesses, plus the engine in process.

The code2wav stage batches up to 4 requests, waiting 100 ms after the first, so that
concurrent requests from test threads reliably share a batch. Engine steps are
`omnistage.step batch=<n>` spans in the trace, which is how the tests see the batches.
In process, test models record every forward's batch size, so tests see batches directly.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from examples.custom_torch.decoder import SCALE
from examples.custom_torch.decoder import build as build_decoder
from examples.omni.code2wav import CHUNK_SAMPLES, HOP_LENGTH, SAMPLE_RATE
from omnistage.convert import tensor_from_pb, tensor_to_pb
from omnistage.errors import InvalidRequestError, OmnistageError
from omnistage.launch import ServerProcess, stage_args
from omnistage.tensors import (
    DEFAULT_MAX_CHUNK_BYTES,
    join_tensors,
    tensor_from_numpy,
    tensor_to_numpy,
)
from omnistage.types import GenerateInput, OutputDelta, ProfileOptions
from omnistage.v1 import common_pb2, stage_pb2
from services.config import ProfilerSettings, StageConfig
from services.engines.torch_engine import STEP_SPAN, TorchEngine
from tests.servers import ROOT, RunningStage
from tests.torch_models import ENTERED, FORWARDS, GATE
from tests.waiting import eventually, wait_until

CODE2WAV = "examples.omni.code2wav:build"
GATED = "tests.torch_models:build_gated"
RECORDING = "tests.torch_models:build_recording"
DECODER = "examples.custom_torch.decoder:build"
DECODER_OPTIONS = {"seed": 3, "num_threads": 1, "max_wait_ms": 0}
GRPC_DEFAULT_LIMIT = 4 << 20
STAGE_OPTIONS = {"max_batch_size": 4, "max_wait_ms": 100, "num_threads": 1}


def codes(count: int, seed: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).integers(0, 1024, size=count, dtype=np.int64)


def code_request(values: np.ndarray[Any, Any]) -> stage_pb2.GenerateRequest:
    return stage_pb2.GenerateRequest(tensor=tensor_to_pb(tensor_from_numpy(values)))


def synthesize(
    stage: RunningStage, request: stage_pb2.GenerateRequest
) -> tuple[np.ndarray[Any, Any], list[stage_pb2.GenerateResponse]]:
    replies = list(stage.stub.Generate(request, timeout=120))
    pieces = [tensor_to_numpy(tensor_from_pb(r.tensor)) for r in replies if r.HasField("tensor")]
    return np.concatenate(pieces), replies


def fetch(stage: RunningStage, session_id: str, name: str) -> bytes:
    request = stage_pb2.FetchProfileFileRequest(session_id=session_id, name=name)
    return b"".join(c.data for c in stage.stub.FetchProfileFile(request, timeout=60))


def trace_events(files: dict[str, bytes]) -> list[dict[str, Any]]:
    names = [n for n in files if n.endswith(".pt.trace.json.gz")]
    assert len(names) == 1, f"expected one trace, got {sorted(files)}"
    trace = json.loads(gzip.decompress(files[names[0]]))
    assert "baseTimeNanoseconds" in trace
    events: list[dict[str, Any]] = trace["traceEvents"]
    return events


def step_batches(events: list[dict[str, Any]]) -> list[int]:
    """The batch size of every engine step in a trace, in order."""
    steps = [e for e in events if e.get("ph") == "X" and e["name"].startswith(STEP_SPAN)]
    return [int(e["name"].rsplit("=", 1)[1]) for e in sorted(steps, key=lambda e: e["ts"])]


def running(stage: RunningStage) -> int:
    return int(stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5).running_requests)


def profiled(
    stage: RunningStage, run: Any, **start: int
) -> tuple[stage_pb2.StopProfileResponse, dict[str, bytes]]:
    """Start a session, call `run()`, stop it and fetch every file of it."""
    stage.stub.StartProfile(stage_pb2.StartProfileRequest(label="torch", **start), timeout=60)
    try:
        run()
    finally:
        stop = stage.stub.StopProfile(stage_pb2.StopProfileRequest(), timeout=300)
    return stop, {f.name: fetch(stage, stop.session_id, f.name) for f in stop.files}


@pytest.fixture(scope="module")
def torch_stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStage]:
    profiler_dir = tmp_path_factory.mktemp("torch-profiles")
    process = ServerProcess(
        "stage 'code2wav'",
        stage_args(
            name="code2wav",
            engine="torch",
            model=CODE2WAV,
            profiler_config={"torch_profiler_dir": str(profiler_dir)},
            extra=["--engine-options", json.dumps(STAGE_OPTIONS), "--grace-seconds", "5"],
        ),
        log_path=tmp_path_factory.mktemp("torch-logs") / "code2wav.log",
    )
    try:
        stage = RunningStage(process, process.wait_serving(timeout=300), profiler_dir)
        yield stage
        if stage.channel is not None:
            stage.channel.close()
    finally:
        process.stop()


@pytest.fixture(scope="module")
def decoder_stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStage]:
    """docs/stages.md's own-stage example: a model with an input_spec and no checks of its own."""
    process = ServerProcess(
        "stage 'decoder'",
        stage_args(
            name="decoder",
            engine="torch",
            model=DECODER,
            extra=["--engine-options", json.dumps(DECODER_OPTIONS), "--grace-seconds", "5"],
        ),
        log_path=tmp_path_factory.mktemp("decoder-logs") / "decoder.log",
    )
    try:
        stage = RunningStage(process, process.wait_serving(timeout=300), None)
        yield stage
        if stage.channel is not None:
            stage.channel.close()
    finally:
        process.stop()


# -- the stage over gRPC ------------------------------------------------------------------------


def test_get_info_names_the_torch_engine(torch_stage: RunningStage) -> None:
    info = torch_stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5)
    assert (info.engine, info.model, info.device) == ("torch", CODE2WAV, "cpu")
    assert info.running_requests == 0 and info.profiling_enabled


def test_waveform_has_hop_length_samples_per_code(torch_stage: RunningStage) -> None:
    wave, replies = synthesize(torch_stage, code_request(codes(60, seed=1)))
    assert wave.dtype == np.float32 and wave.shape == (60 * HOP_LENGTH,)
    assert SAMPLE_RATE == 50 * HOP_LENGTH
    chunks = [r.tensor for r in replies if r.HasField("tensor")]
    assert [list(c.shape) for c in chunks] == [[CHUNK_SAMPLES], [60 * HOP_LENGTH - CHUNK_SAMPLES]]
    assert all(c.dtype == "float32" for c in chunks)
    assert np.abs(wave).max() <= 1.0 and wave.std() > 0
    final = replies[-1]
    assert final.finished and final.finish_reason == "stop" and not final.HasField("tensor")
    assert 0 < final.metrics.time_to_first_token_s <= final.metrics.duration_s


def test_int32_rows_and_token_ids_give_the_same_waveform(torch_stage: RunningStage) -> None:
    values = codes(20, seed=2)
    reference, _ = synthesize(torch_stage, code_request(values))
    as_int32_row = code_request(values.astype(np.int32).reshape(1, -1))
    as_token_ids = stage_pb2.GenerateRequest(token_ids=values.tolist())
    for request in (as_int32_row, as_token_ids):
        np.testing.assert_array_equal(synthesize(torch_stage, request)[0], reference)


def test_concurrent_requests_batch_and_match_sequential_ones(torch_stage: RunningStage) -> None:
    inputs = [codes(30, seed=10 + i) for i in range(6)]
    sequential = [synthesize(torch_stage, code_request(v))[0] for v in inputs]
    batched: list[np.ndarray[Any, Any] | None] = [None] * 6
    barrier = threading.Barrier(6)

    def send(index: int) -> None:
        barrier.wait()
        batched[index] = synthesize(torch_stage, code_request(inputs[index]))[0]

    def run_concurrently() -> None:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    _, files = profiled(torch_stage, run_concurrently)
    for alone, together in zip(sequential, batched, strict=True):
        assert together is not None
        np.testing.assert_allclose(together, alone, atol=1e-5)
    batches = step_batches(trace_events(files))
    assert sum(batches) == 6 and max(batches) <= 4
    assert max(batches) > 1, f"no two requests shared a batch: {batches}"


def test_profile_session_files(torch_stage: RunningStage) -> None:
    def two_requests() -> None:
        synthesize(torch_stage, code_request(codes(25, seed=3)))
        synthesize(torch_stage, code_request(codes(25, seed=4)))

    stop, files = profiled(torch_stage, two_requests)
    assert torch_stage.profiler_dir is not None
    assert Path(stop.profile_dir) == torch_stage.profiler_dir / stop.session_id
    events = trace_events(files)
    names = {e["name"] for e in events if e.get("ph") == "X"}
    assert names & {"aten::convolution", "aten::conv1d", "aten::conv_transpose1d"}
    assert step_batches(events) == [1, 1]
    op_threads = {e["tid"] for e in events if e.get("cat") in ("cpu_op", "user_annotation")}
    frames = {e["tid"] for e in events if e.get("cat") == "python_function"}
    assert frames and frames <= op_threads, "Python frames of idle threads were kept"
    table = files["profiler_out_code2wav.txt"].decode()
    assert "Self CPU" in table and "aten::" in table and "conv" in table
    for item in stop.files:
        assert hashlib.sha256(files[item.name]).hexdigest() == item.sha256
        assert len(files[item.name]) == item.size_bytes


def test_profile_state_errors_on_a_torch_stage(torch_stage: RunningStage) -> None:
    """The torch stage keeps the vLLM stage's session rules: one session at a time."""
    with pytest.raises(grpc.RpcError) as idle:
        torch_stage.stub.StopProfile(stage_pb2.StopProfileRequest(), timeout=60)
    assert idle.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "no profile session is active" in (idle.value.details() or "")
    first = torch_stage.stub.StartProfile(stage_pb2.StartProfileRequest(label="one"), timeout=60)
    try:
        with pytest.raises(grpc.RpcError) as info:
            torch_stage.stub.StartProfile(stage_pb2.StartProfileRequest(label="two"), timeout=60)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        details = info.value.details() or ""
        assert "already active" in details and first.session_id in details
    finally:
        stop = torch_stage.stub.StopProfile(stage_pb2.StopProfileRequest(), timeout=120)
    assert stop.session_id == first.session_id  # the first session was not disturbed


def test_max_iterations_records_one_step(torch_stage: RunningStage) -> None:
    def three_requests() -> None:
        for seed in range(3):
            synthesize(torch_stage, code_request(codes(10, seed=seed)))

    _, files = profiled(torch_stage, three_requests, max_iterations=1)
    assert step_batches(trace_events(files)) == [1]


def test_delay_iterations_skips_steps(torch_stage: RunningStage) -> None:
    def three_requests() -> None:
        for seed in range(3):
            synthesize(torch_stage, code_request(codes(10 + seed, seed=seed)))

    _, files = profiled(torch_stage, three_requests, delay_iterations=2)
    assert step_batches(trace_events(files)) == [1]


def bad_tensor(dtype: str, shape: list[int], data: bytes) -> stage_pb2.GenerateRequest:
    return stage_pb2.GenerateRequest(tensor=common_pb2.Tensor(dtype=dtype, shape=shape, data=data))


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        pytest.param(bad_tensor("float32", [4], b"\0" * 16), ["int64", "float32"], id="float"),
        pytest.param(bad_tensor("int64", [10], b"\0" * 79), ["79", "80"], id="byte-count"),
        pytest.param(bad_tensor("complex64", [1], b"\0" * 8), ["complex64", "int64"], id="dtype"),
        pytest.param(
            code_request(np.array([5, 1024], dtype=np.int64)), ["[0, 1024)", "1024"], id="range"
        ),
        pytest.param(bad_tensor("int64", [2, 3], b"\0" * 48), ["[1, T]", "[2, 3]"], id="shape"),
        pytest.param(
            stage_pb2.GenerateRequest(token_ids=[1] * 3001), ["3000", "3001"], id="too-long"
        ),
        pytest.param(stage_pb2.GenerateRequest(prompt="hi"), ["token_ids", "prompt"], id="text"),
    ],
)
def test_bad_input_is_invalid_argument(
    torch_stage: RunningStage, request_: stage_pb2.GenerateRequest, words: list[str]
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(torch_stage.stub.Generate(request_, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    for word in words:
        assert word in info.value.details()
    assert running(torch_stage) == 0


def latents(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray[Any, Any]:
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def test_custom_stage_streams_a_large_output_in_chunks_below_the_limit(
    decoder_stage: RunningStage,
) -> None:
    values = latents((4, 96, 96))
    # The test's channel keeps gRPC's default 4 MiB receive limit: a larger message fails.
    replies = list(decoder_stage.stub.Generate(code_request(values), timeout=120))
    chunks = [tensor_from_pb(r.tensor) for r in replies if r.HasField("tensor")]
    image = join_tensors(chunks)
    assert image.shape == (96 * SCALE, 96 * SCALE, 3) and len(image.data) > GRPC_DEFAULT_LIMIT
    assert len(chunks) == -(-len(image.data) // DEFAULT_MAX_CHUNK_BYTES)
    assert all(len(c.data) <= DEFAULT_MAX_CHUNK_BYTES for c in chunks)
    assert all(r.ByteSize() < GRPC_DEFAULT_LIMIT for r in replies)
    with torch.inference_mode():
        expected = build_decoder({"seed": 3}).module(torch.from_numpy(values)[None])
    np.testing.assert_allclose(
        tensor_to_numpy(image), expected[0].permute(1, 2, 0).numpy(), atol=1e-5
    )
    assert replies[-1].finished and replies[-1].finish_reason == "stop"


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        pytest.param(
            code_request(latents((4, 8, 8), np.float64)),
            ["dtype not accepted", "expected float32, shape [4, H, W]", "got float64"],
            id="dtype",
        ),
        pytest.param(
            code_request(latents((4, 8))),
            ["shape not accepted", "[4, H, W]", "got float32, shape [4, 8]"],
            id="rank",
        ),
        pytest.param(
            code_request(latents((3, 8, 8))),
            ["shape not accepted", "[4, H, W]", "shape [3, 8, 8]"],
            id="channels",
        ),
        pytest.param(
            stage_pb2.GenerateRequest(prompt="a cat"), ["tensor input", "got prompt"], id="prompt"
        ),
    ],
)
def test_custom_stage_input_spec_refuses_what_the_model_does_not_accept(
    decoder_stage: RunningStage, request_: stage_pb2.GenerateRequest, words: list[str]
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(decoder_stage.stub.Generate(request_, timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    for word in words:
        assert word in info.value.details()
    small = list(decoder_stage.stub.Generate(code_request(latents((4, 2, 3))), timeout=30))
    assert list(small[0].tensor.shape) == [2 * SCALE, 3 * SCALE, 3] and small[-1].finished


def test_cancelling_a_queued_request_leaves_the_others_intact(torch_stage: RunningStage) -> None:
    long_codes, short_codes = codes(1500, seed=5), codes(20, seed=6)
    expected_short, _ = synthesize(torch_stage, code_request(short_codes))
    results: dict[str, Any] = {}

    def consume(name: str, call: Any) -> None:
        try:
            results[name] = list(call)
        except grpc.RpcError as exc:
            results[name] = exc.code()

    def in_engine(count: int) -> bool:
        return running(torch_stage) == count

    def run() -> None:
        # Requests of other lengths never share a step: "long" takes the worker first, and
        # "doomed" and "kept" queue behind it, to run in one step unless "doomed" is cancelled.
        long_call = torch_stage.stub.Generate(code_request(long_codes), timeout=120)
        threads = [threading.Thread(target=consume, args=("long", long_call))]
        threads[0].start()
        wait_until(lambda: in_engine(1), timeout=30, what="the long request in the engine")
        doomed = torch_stage.stub.Generate(code_request(short_codes), timeout=120)
        kept = torch_stage.stub.Generate(code_request(short_codes), timeout=120)
        for name, call in (("doomed", doomed), ("kept", kept)):
            threads.append(threading.Thread(target=consume, args=(name, call)))
            threads[-1].start()
        wait_until(lambda: in_engine(3), timeout=30, what="both short requests queued")
        doomed.cancel()
        for thread in threads:
            thread.join()

    _, files = profiled(torch_stage, run)
    assert results["doomed"] == grpc.StatusCode.CANCELLED
    assert results["long"][-1].finished
    kept_wave = np.concatenate(
        [tensor_to_numpy(tensor_from_pb(r.tensor)) for r in results["kept"] if r.HasField("tensor")]
    )
    np.testing.assert_allclose(kept_wave, expected_short, atol=1e-5)
    # Had the cancelled request stayed queued, it would have shared a batch with "kept".
    assert step_batches(trace_events(files)) == [1, 1]
    assert running(torch_stage) == 0


def test_engine_options_must_be_a_json_object() -> None:
    args = stage_args(name="x", engine="torch", model=CODE2WAV, extra=["--engine-options", "[1]"])
    result = subprocess.run(
        [sys.executable, "-m", "omnistage.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "--engine-options must be a JSON object" in result.stderr


# -- the engine in process ----------------------------------------------------------------------


def make_engine(model: str, profiler_dir: Path | None = None, **options: Any) -> TorchEngine:
    profiler = ProfilerSettings()
    if profiler_dir is not None:
        profiler = ProfilerSettings(
            torch_profiler_dir=str(profiler_dir), torch_profiler_with_stack=False
        )
    return TorchEngine(
        StageConfig(
            name="inproc", engine="torch", model=model, engine_options=options, profiler=profiler
        )
    )


async def collect(engine: TorchEngine, request: GenerateInput) -> list[OutputDelta]:
    return [delta async for delta in engine.generate(request)]


def joined(deltas: list[OutputDelta]) -> np.ndarray[Any, Any]:
    return np.concatenate([tensor_to_numpy(d.tensor) for d in deltas if d.tensor is not None])


def test_abort_and_cancel_take_queued_requests_out_of_the_engine() -> None:
    async def scenario() -> None:
        engine = make_engine(GATED, max_wait_ms=0)
        await engine.start()
        GATE.clear()
        ENTERED.clear()
        try:
            running = asyncio.create_task(collect(engine, GenerateInput("a", token_ids=(1, 2))))
            await asyncio.to_thread(ENTERED.wait, 30)
            assert ENTERED.is_set(), '"a" never reached the worker'
            cancelled = asyncio.create_task(collect(engine, GenerateInput("b", token_ids=(3, 4))))
            aborted = asyncio.create_task(collect(engine, GenerateInput("c", token_ids=(5, 6))))
            await eventually(
                lambda: engine.info().running_requests == 3, timeout=10, what='"b" and "c" queued'
            )
            cancelled.cancel()
            await engine.abort("c")
            assert (await aborted)[-1].finish_reason == "abort"
            GATE.set()
            assert (await running)[-1].finish_reason == "stop"
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            after = await collect(engine, GenerateInput("d", token_ids=(7, 8)))
            assert joined(after).tolist() == [14.0, 16.0]
            assert engine.steps == 2, "a cancelled or aborted request ran"
            assert engine.info().running_requests == 0
        finally:
            GATE.set()
            await engine.close()

    asyncio.run(scenario())


def test_in_process_profile_without_stack_writes_torchs_op_table(tmp_path: Path) -> None:
    async def scenario() -> list[Path]:
        engine = make_engine(CODE2WAV, tmp_path, max_wait_ms=50)
        await engine.start()
        try:
            await engine.start_profile(tmp_path, ProfileOptions())
            tensor = tensor_from_numpy(codes(10, seed=0))
            await asyncio.gather(
                *(collect(engine, GenerateInput(f"r{i}", tensor=tensor)) for i in range(2))
            )
            return await engine.stop_profile(tmp_path)
        finally:
            await engine.close()

    files = asyncio.run(scenario())
    assert [p.name.endswith(".pt.trace.json.gz") for p in files] == [True, False]
    table = (tmp_path / "profiler_out.txt").read_text()
    assert "Self CPU" in table and "aten::conv" in table
    assert step_batches(json.loads(gzip.decompress(files[0].read_bytes()))["traceEvents"]) == [2]


@pytest.mark.parametrize(
    ("model", "options", "words"),
    [
        (CODE2WAV, {"max_batch_size": 0}, ["engine_options.max_batch_size"]),
        (CODE2WAV, {"device": "cpu", "dtype": "float16"}, ["float16", "float32"]),
        (CODE2WAV, {"device": "tpu"}, ["tpu", "cuda"]),
    ],
)
def test_bad_engine_options_are_refused(
    model: str, options: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        make_engine(model, **options)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("model", "words"),
    [
        ("smollm2", ["package.module:factory"]),
        ("examples.omni.nope:build", ["examples.omni.nope"]),
        ("examples.omni.code2wav:nope", ["nope"]),
        ("tests.torch_models:build_wrong", ["Linear", "TorchStageModel"]),
    ],
)
def test_bad_model_paths_are_refused_at_start(model: str, words: list[str]) -> None:
    async def scenario() -> None:
        engine = make_engine(model)
        try:
            await engine.start()
        finally:
            await engine.close()

    with pytest.raises(InvalidRequestError) as info:
        asyncio.run(scenario())
    for word in words:
        assert word in str(info.value)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_traces_kernels(tmp_path: Path) -> None:
    tensor = tensor_from_numpy(codes(40, seed=7))

    async def waveform(device: str, profile_dir: Path | None) -> np.ndarray[Any, Any]:
        engine = make_engine(CODE2WAV, profile_dir, device=device)
        await engine.start()
        try:
            if profile_dir is not None:
                await engine.start_profile(profile_dir, ProfileOptions())
            deltas = await collect(engine, GenerateInput("g", tensor=tensor))
            if profile_dir is not None:
                await engine.stop_profile(profile_dir)
            return joined(deltas)
        finally:
            await engine.close()

    on_cpu = asyncio.run(waveform("cpu", None))
    on_cuda = asyncio.run(waveform("cuda", tmp_path))
    np.testing.assert_allclose(on_cuda, on_cpu, atol=1e-3)
    trace_path = next(tmp_path.glob("*.pt.trace.json.gz"))
    events = json.loads(gzip.decompress(trace_path.read_bytes()))["traceEvents"]
    assert any(e.get("cat") == "kernel" for e in events), "no CUDA kernel in the trace"
    assert "Self CUDA" in (tmp_path / "profiler_out.txt").read_text()


def test_forward_runs_in_inference_mode_without_grad() -> None:
    async def scenario() -> list[OutputDelta]:
        engine = make_engine(RECORDING, max_wait_ms=0)
        await engine.start()
        try:
            FORWARDS.clear()
            return await collect(engine, GenerateInput("r", token_ids=(1, 2)))
        finally:
            await engine.close()

    deltas = asyncio.run(scenario())
    assert joined(deltas).tolist() == [2.0, 4.0]
    assert FORWARDS == [(1, True, False)]


def test_max_wait_ms_bounds_a_lone_request_and_never_merges_later_ones() -> None:
    max_wait_s = 0.2

    async def scenario() -> tuple[float, list[int]]:
        engine = make_engine(RECORDING, max_wait_ms=max_wait_s * 1000, max_batch_size=8)
        await engine.start()
        try:
            started = time.monotonic()
            await collect(engine, GenerateInput("lone", token_ids=(1,)))
            lone_s = time.monotonic() - started
            FORWARDS.clear()
            early = asyncio.create_task(collect(engine, GenerateInput("a", token_ids=(1,))))
            await eventually(lambda: FORWARDS, timeout=10, what="a's window to close and a to run")
            late = [collect(engine, GenerateInput(f"b{i}", token_ids=(i,))) for i in range(2)]
            await asyncio.gather(early, *late)
            return lone_s, [size for size, _, _ in FORWARDS]
        finally:
            await engine.close()

    lone_s, batches = asyncio.run(scenario())
    # Alone, a request waits out its window for company, then runs; generous upper margin.
    assert max_wait_s * 0.95 <= lone_s < max_wait_s + 2.0, lone_s
    assert batches == [1, 2], "a request that came after the window closed joined its batch"


def test_a_failing_batch_runs_again_one_by_one_so_only_the_bad_requests_fail() -> None:
    inputs = {"ok1": (1, 2), "buggy": (-1, 2), "invalid": (13, 1), "ok2": (3, 4)}

    async def scenario() -> tuple[list[Any], int]:
        engine = make_engine(RECORDING, max_wait_ms=300, max_batch_size=8)
        await engine.start()
        try:
            FORWARDS.clear()
            calls = [collect(engine, GenerateInput(k, token_ids=v)) for k, v in inputs.items()]
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert engine.info().running_requests == 0
            return results, engine.steps
        finally:
            await engine.close()

    results, steps = asyncio.run(scenario())
    ok1, buggy, invalid, ok2 = results
    assert joined(ok1).tolist() == [2.0, 4.0] and joined(ok2).tolist() == [6.0, 8.0]
    assert isinstance(buggy, RuntimeError) and "negative row" in str(buggy)
    assert isinstance(invalid, InvalidRequestError) and "13" in str(invalid)
    assert [size for size, _, _ in FORWARDS] == [4, 1, 1, 1, 1]
    assert steps == 2, "only the two good requests' steps succeed"


def test_an_output_row_too_large_to_send_fails_its_request_with_a_fix() -> None:
    async def scenario() -> None:
        engine = make_engine(RECORDING, max_wait_ms=0, wide=True)
        await engine.start()
        try:
            await collect(engine, GenerateInput("w", token_ids=(1,)))
        finally:
            await engine.close()

    with pytest.raises(OmnistageError) as info:
        asyncio.run(scenario())
    assert info.value.code == "INTERNAL"
    assert "postprocess chunk 0" in str(info.value) and str(DEFAULT_MAX_CHUNK_BYTES) in str(
        info.value
    )
