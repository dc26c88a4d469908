"""Stage.Generate against a real vLLM stage on the bundled model."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from omnistage.launch import health_status
from omnistage.v1 import common_pb2, stage_pb2
from tests.conftest import REFERENCE_MAX_TOKENS, REFERENCE_PROMPTS, RunningStage


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
            time.sleep(0.05)

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
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5).running_requests == 0:
            break
        time.sleep(0.1)
    assert stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5).running_requests == 0


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
    """SIGTERM: health NOT_SERVING, an in-flight stream still finishes, then the process exits."""
    call = plain_stage.stub.Generate(
        chat("Write a story.", max_tokens=48, ignore_eos=True), timeout=120
    )
    first = next(call)
    plain_stage.process.process.terminate()
    time.sleep(0.5)
    assert health_status(plain_stage.address) != "SERVING"
    rest = list(call)
    assert rest[-1].finished and rest[-1].finish_reason == "length"
    assert len(first.token_ids) + sum(len(r.token_ids) for r in rest) == 48
    assert plain_stage.process.process.wait(timeout=60) == 0
