"""Stage.Generate against a real vLLM stage on the bundled model."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from omnistage.v1 import common_pb2, stage_pb2
from services.engines.vllm_plugin import DEFAULT_BUSY_POLL_S
from tests.servers import PLAIN_GRACE_S, REFERENCE_MAX_TOKENS, REFERENCE_PROMPTS, RunningStage
from tests.waiting import wait_until


def chat(content: str, **sampling: object) -> stage_pb2.GenerateRequest:
    return stage_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content=content)],
        sampling=common_pb2.SamplingParams(**sampling),
    )


def collect(
    stage: RunningStage, request: stage_pb2.GenerateRequest
) -> list[stage_pb2.GenerateResponse]:
    return list(stage.stub.Generate(request, timeout=120))


def test_health_went_from_not_serving_to_serving(stage: RunningStage) -> None:
    assert "NOT_SERVING" in stage.health_seen  # seen while the engine loaded
    with grpc.insecure_channel(stage.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stage_reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="omnistage.v1.Stage"), timeout=5
        )
        assert stage_reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_stage_service(stage: RunningStage) -> None:
    with grpc.insecure_channel(stage.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in reply.list_services_response.service}
    assert {"omnistage.v1.Stage", "grpc.health.v1.Health"} <= names


def test_reflection_serves_the_stage_descriptors(stage: RunningStage) -> None:
    """What grpcurl asks for: the file that defines omnistage.v1.Stage and every file it
    imports, enough to build each RPC's request and response types with no .proto at hand."""
    with grpc.insecure_channel(stage.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="omnistage.v1.Stage"
        )
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    assert reply.WhichOneof("message_response") == "file_descriptor_response"
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in reply.file_descriptor_response.file_descriptor_proto
    ]
    pool = descriptor_pool.DescriptorPool()
    pending = list(files)
    while pending:  # add each file after the files it imports
        added = {f.name for f in files} - {f.name for f in pending}
        ready = [f for f in pending if set(f.dependency) <= added]
        assert ready, f"reflection left out imports of {[f.name for f in pending]}"
        for f in ready:
            pool.Add(f)
            pending.remove(f)
    service = pool.FindServiceByName("omnistage.v1.Stage")
    methods = {m.name: m for m in service.methods}
    assert {"Generate", "StartProfile", "StopProfile", "FetchProfileFile", "GetInfo"} <= set(
        methods
    )
    assert methods["Generate"].server_streaming and methods["FetchProfileFile"].server_streaming
    generate_fields = set(methods["Generate"].input_type.fields_by_name)
    assert {"prompt", "messages", "token_ids", "sampling"} <= generate_fields
    assert "data" in methods["FetchProfileFile"].output_type.fields_by_name


def test_streams_deltas_then_finished_with_metrics(stage: RunningStage) -> None:
    replies = collect(stage, chat("Count from one to ten.", max_tokens=16, temperature=0.0))
    assert len(replies) > 1, "the answer must stream as several deltas"
    assert all(not r.finished for r in replies[:-1])
    last = replies[-1]
    assert last.finished and last.finish_reason in {"stop", "length"}
    tokens = [t for r in replies for t in r.token_ids]
    assert last.metrics.generated_tokens == len(tokens)
    assert last.metrics.prompt_tokens > 5
    assert 0 < last.metrics.time_to_first_token_s <= last.metrics.duration_s
    assert last.metrics.queue_time_s >= 0
    assert len({r.request_id for r in replies}) == 1 and replies[0].request_id


def test_final_only_sends_the_whole_output_in_one_message(stage: RunningStage) -> None:
    request = chat("Count from one to ten.", max_tokens=16, temperature=0.0, ignore_eos=True)
    streamed = collect(stage, request)
    request.final_only = True
    whole = collect(stage, request)
    assert len(streamed) > 1 and len(whole) == 1, "final_only: one message, the finished one"
    (last,) = whole
    assert last.finished and last.finish_reason == streamed[-1].finish_reason == "length"
    assert list(last.token_ids) == [t for r in streamed for t in r.token_ids]
    assert last.text == "".join(r.text for r in streamed)
    assert last.metrics.generated_tokens == 16
    # The first token is still timed: vLLM's own first-token latency, not the finish.
    assert 0 < last.metrics.time_to_first_token_s < 0.8 * last.metrics.duration_s


def test_greedy_output_equals_vllm_offline(
    stage: RunningStage, reference_process: subprocess.Popen[str]
) -> None:
    output, _ = reference_process.communicate(timeout=900)
    assert reference_process.returncode == 0, output[-3000:]
    reference = json.loads(reference_process.out_path.read_text())  # type: ignore[attr-defined]
    for prompt, expected in zip(REFERENCE_PROMPTS, reference, strict=True):
        replies = collect(stage, chat(prompt, max_tokens=REFERENCE_MAX_TOKENS, temperature=0.0))
        assert [t for r in replies for t in r.token_ids] == expected["token_ids"]
        assert "".join(r.text for r in replies) == expected["text"]
    # The model is real: the classic check from the bundled model's conversion.
    assert "Paris" in reference[0]["text"]


def test_prompt_and_token_ids_inputs_agree(stage: RunningStage) -> None:
    by_prompt = collect(
        stage,
        stage_pb2.GenerateRequest(
            prompt="The sky is", sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0)
        ),
    )
    prompt_ids = [504, 6376, 314]  # what the tokenizer makes of "The sky is"
    by_ids = collect(
        stage,
        stage_pb2.GenerateRequest(
            token_ids=prompt_ids, sampling=common_pb2.SamplingParams(max_tokens=8, temperature=0)
        ),
    )
    assert by_prompt[-1].metrics.prompt_tokens == len(prompt_ids)
    assert [t for r in by_prompt for t in r.token_ids] == [t for r in by_ids for t in r.token_ids]


def test_sampling_options_take_effect(stage: RunningStage) -> None:
    capped = collect(stage, chat("Tell me a long story.", max_tokens=5, ignore_eos=True))
    assert capped[-1].finish_reason == "length"
    assert sum(len(r.token_ids) for r in capped) == 5
    seeded = [
        "".join(
            r.text
            for r in collect(
                stage,
                chat("Name a colour.", max_tokens=12, temperature=1.0, top_p=0.9, top_k=20, seed=7),
            )
        )
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]
    # top_k=1, or a top_p so small that only the likeliest token is left, makes sampling at
    # temperature 1 greedy: both must reach the engine for the texts to match.
    prompt = "Write a short poem about the moon."
    greedy = "".join(r.text for r in collect(stage, chat(prompt, max_tokens=16, temperature=0.0)))
    wide = collect(stage, chat(prompt, max_tokens=16, temperature=1.0, seed=3))
    assert "".join(r.text for r in wide) != greedy  # the control: this seed samples off greedy
    for narrow in ({"top_k": 1}, {"top_p": 1e-6}):
        replies = collect(stage, chat(prompt, max_tokens=16, temperature=1.0, seed=3, **narrow))
        assert "".join(r.text for r in replies) == greedy, narrow
    stopped = collect(stage, chat("Count from one to ten.", max_tokens=60, temperature=0.0))
    full = "".join(r.text for r in stopped)
    assert "4" in full, full
    stopped = collect(
        stage, chat("Count from one to ten.", max_tokens=60, temperature=0.0, stop=["4"])
    )
    text = "".join(r.text for r in stopped)
    assert text == full[: full.index("4")] and stopped[-1].finish_reason == "stop"


def test_concurrent_streams_are_batched(stage: RunningStage) -> None:
    results: dict[int, list[stage_pb2.GenerateResponse]] = {}
    peak = 0
    done = threading.Event()

    def run(i: int) -> None:
        results[i] = collect(
            stage, chat(f"Say something about the number {i}.", max_tokens=32, ignore_eos=True)
        )

    def watch() -> None:
        nonlocal peak
        while not done.is_set():
            info = stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5)
            peak = max(peak, info.running_requests)
            done.wait(0.05)  # the sampling interval; returns at once when the streams end

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    done.set()
    watcher.join()
    assert len(results) == 16
    assert all(sum(len(r.token_ids) for r in replies) == 32 for replies in results.values())
    assert peak >= 4, f"the engine never held more than {peak} requests at once"
    # Queue time comes from vLLM's own request stats: 16 requests at once, some wait their turn.
    queued = [replies[-1].metrics.queue_time_s for replies in results.values()]
    assert max(queued) > 0, queued


def test_cancelled_stream_is_aborted_in_the_engine(stage: RunningStage) -> None:
    call = stage.stub.Generate(
        chat("Write a very long essay.", max_tokens=1500, ignore_eos=True), timeout=120
    )
    for received, _reply in enumerate(call, start=1):
        if received == 3:
            break
    info = stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5)
    assert info.running_requests >= 1
    call.cancel()
    wait_until(
        lambda: stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5).running_requests == 0,
        timeout=10,
        what="the engine to drop the cancelled request",
    )


def test_every_vllm_process_of_a_stage_gets_the_short_spin(stage: RunningStage) -> None:
    """omnistage's vLLM plugin ran in the engine core and in the worker, each of which says
    so in the stage's log (tests/unit/test_vllm_plugin.py checks what it does there)."""
    said = f"queue readers spin {float(DEFAULT_BUSY_POLL_S):g} s after a read, then sleep"
    log = stage.process.log_path.read_text(errors="replace")
    lines = [line for line in log.splitlines() if said in line]
    # vLLM prefixes its processes' lines: "(EngineCore pid=...)", "(VllmWorker-0 pid=...)"
    processes = {line.split(" pid=")[0] for line in lines if line.startswith("(")}
    assert "(EngineCore" in processes, lines
    assert any("Worker" in process for process in processes), lines


def test_get_info_describes_the_stage(stage: RunningStage, plain_stage: RunningStage) -> None:
    before = time.time_ns()
    info = stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5)
    after = time.time_ns()
    assert (info.name, info.engine, info.model) == ("thinker", "vllm", "smollm2")
    assert info.profiling_enabled and not info.profiling_active
    assert info.max_model_len == 2048 and info.device == "cpu"
    assert info.engine_version and info.version
    assert before <= info.server_time_unix_ns <= after
    plain = plain_stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5)
    assert not plain.profiling_enabled and plain.profiler_dir == ""


@pytest.mark.stops_shared_stage
def test_sigterm_drains_in_flight_streams(plain_stage: RunningStage) -> None:
    """SIGTERM: a health Watch opened before it receives NOT_SERVING while streams are still
    in flight; a stream that ends within the grace period finishes whole, one that outlasts it
    is cut when the grace period ends, and the process exits soon after, with code 0."""
    short_tokens, long_tokens = 32, 1900  # the long one needs far more than PLAIN_GRACE_S
    channel = grpc.insecure_channel(plain_stage.address)
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="omnistage.v1.Stage"), timeout=120
    )
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    short = plain_stage.stub.Generate(
        chat("Write a story.", max_tokens=short_tokens, ignore_eos=True), timeout=120
    )
    long = plain_stage.stub.Generate(
        chat("Write a very long essay.", max_tokens=long_tokens, ignore_eos=True), timeout=120
    )
    replies: dict[str, list[stage_pb2.GenerateResponse]] = {"short": [next(short)], "long": []}
    replies["long"].append(next(long))
    at: dict[str, float] = {}
    errors: dict[str, grpc.RpcError] = {}

    def follow_health() -> None:
        for reply in watch:
            if reply.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                at["not_serving"] = time.monotonic()
                break
        watch.cancel()

    def drain(name: str, call: Any) -> None:
        try:
            replies[name].extend(call)
        except grpc.RpcError as exc:
            errors[name] = exc
        at[name] = time.monotonic()

    threads = [
        threading.Thread(target=follow_health),
        threading.Thread(target=drain, args=("short", short)),
        threading.Thread(target=drain, args=("long", long)),
    ]
    for thread in threads:
        thread.start()
    sigterm_at = time.monotonic()
    plain_stage.process.process.terminate()
    code = plain_stage.process.process.wait(timeout=PLAIN_GRACE_S + 120)
    exited = time.monotonic() - sigterm_at
    for thread in threads:
        thread.join(timeout=30)
    channel.close()

    assert "not_serving" in at, "the health Watch never reported NOT_SERVING"
    assert at["not_serving"] - sigterm_at < 2.0
    assert at["not_serving"] < at["short"], "NOT_SERVING came only after the streams ended"
    assert "short" not in errors, f"cut {at['short'] - sigterm_at:.1f} s after SIGTERM: {errors}"
    assert replies["short"][-1].finished and replies["short"][-1].finish_reason == "length"
    assert sum(len(r.token_ids) for r in replies["short"]) == short_tokens

    assert errors["long"].code() in {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}
    assert not any(r.finished for r in replies["long"])
    assert 0 < sum(len(r.token_ids) for r in replies["long"]) < long_tokens
    cut_after = at["long"] - sigterm_at
    assert PLAIN_GRACE_S - 0.5 <= cut_after <= PLAIN_GRACE_S + 5, cut_after
    assert code == 0
    assert exited <= PLAIN_GRACE_S + 20, f"exited {exited:.1f} s after SIGTERM"
