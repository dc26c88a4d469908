"""Every bad input gets a precise status, and nothing is left behind in the engine."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from omnistage.v1 import common_pb2, stage_pb2
from tests.servers import RunningStage
from tests.waiting import wait_until

VOCAB = 49152
CONTEXT = 2048


def expect_error(stage: RunningStage, request: stage_pb2.GenerateRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stage.stub.Generate(request, timeout=60))
    return info.value


def assert_engine_empty(stage: RunningStage) -> None:
    assert stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5).running_requests == 0


def sampling(**kwargs: object) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**kwargs)


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        pytest.param(stage_pb2.GenerateRequest(), ["no input"], id="no-input"),
        pytest.param(
            stage_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="user", content="")]),
            ["empty"],
            id="empty-messages",
        ),
        pytest.param(
            stage_pb2.GenerateRequest(prompt="hi", token_ids=[1, 2]),
            ["exactly one input", "prompt", "token_ids"],
            id="two-inputs",
        ),
        pytest.param(
            stage_pb2.GenerateRequest(prompt="hi", sampling=sampling(temperature=-0.5)),
            ["temperature", "-0.5"],
            id="negative-temperature",
        ),
        pytest.param(
            stage_pb2.GenerateRequest(prompt="hi", sampling=sampling(max_tokens=0)),
            ["max_tokens must be ≥ 1", "got 0"],
            id="max-tokens-zero",
        ),
        pytest.param(
            stage_pb2.GenerateRequest(prompt="hi", sampling=sampling(top_p=0.0)),
            ["top_p", "(0, 1]"],
            id="top-p-zero",
        ),
        pytest.param(
            stage_pb2.GenerateRequest(prompt="hi", sampling=sampling(top_p=1.5)),
            ["top_p", "1.5"],
            id="top-p-above-one",
        ),
        pytest.param(
            stage_pb2.GenerateRequest(token_ids=[1, VOCAB + 7]),
            ["vocabulary", str(VOCAB), str(VOCAB + 7)],
            id="token-id-outside-vocab",
        ),
        pytest.param(
            stage_pb2.GenerateRequest(token_ids=[-3]),
            ["token_ids", "≥ 0"],
            id="negative-token-id",
        ),
        pytest.param(
            stage_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(role="wizard", content="hi")]
            ),
            ["role", "wizard", "user"],
            id="unknown-chat-role",
        ),
        pytest.param(
            stage_pb2.GenerateRequest(token_ids=[1] * 3000),
            ["3000", str(CONTEXT), "context"],
            id="token-prompt-longer-than-context",
        ),
        pytest.param(
            stage_pb2.GenerateRequest(prompt="word " * 2500),
            ["2501", str(CONTEXT), "context"],
            id="text-prompt-longer-than-context",
        ),
        pytest.param(
            stage_pb2.GenerateRequest(token_ids=[1] * 2000, sampling=sampling(max_tokens=100)),
            ["max_tokens", "2000", str(CONTEXT)],
            id="max-tokens-past-context",
        ),
        pytest.param(
            stage_pb2.GenerateRequest(
                tensor=common_pb2.Tensor(dtype="float32", shape=[1], data=b"\0\0\0\0")
            ),
            ["tensor", "prompt"],
            id="tensor-to-vllm-stage",
        ),
    ],
)
def test_bad_generate_input_is_invalid_argument(
    stage: RunningStage, request_: stage_pb2.GenerateRequest, words: list[str]
) -> None:
    error = expect_error(stage, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    for word in words:
        assert word in error.details()
    assert_engine_empty(stage)


def test_stage_keeps_serving_after_bad_input(stage: RunningStage) -> None:
    expect_error(stage, stage_pb2.GenerateRequest())
    replies = list(
        stage.stub.Generate(
            stage_pb2.GenerateRequest(prompt="Hello", sampling=sampling(max_tokens=3)), timeout=60
        )
    )
    assert replies[-1].finished


def test_client_deadline_aborts_the_request(stage: RunningStage) -> None:
    request = stage_pb2.GenerateRequest(
        prompt="Write an essay.", sampling=sampling(max_tokens=1500, ignore_eos=True)
    )
    with pytest.raises(grpc.RpcError) as info:
        list(stage.stub.Generate(request, timeout=1.5))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(
        lambda: not stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5).running_requests,
        timeout=10,
        what="the engine to drop the request past its deadline",
    )
    assert_engine_empty(stage)


# Issue 14: sampling values past the engine's bounds (vLLM's `VLLMValidationError`, which is
# no ValueError, came back INTERNAL "Generate failed inside the stage") or the shared rules.
BAD_SAMPLING = [
    pytest.param({"temperature": 2.5}, ["sampling.temperature", "[0, 2]", "2.5"], id="temp-2.5"),
    pytest.param({"temperature": 2.01}, ["sampling.temperature", "[0, 2]"], id="temp-2.01"),
    pytest.param({"temperature": 1e30}, ["sampling.temperature", "[0, 2]"], id="temp-huge"),
    pytest.param({"temperature": float("nan")}, ["temperature"], id="temp-nan"),
    pytest.param({"temperature": float("inf")}, ["temperature"], id="temp-inf"),
    pytest.param({"top_p": 1.5}, ["top_p", "(0, 1]"], id="top-p-1.5"),
    pytest.param({"top_p": -0.1}, ["top_p", "(0, 1]"], id="top-p-negative"),
    pytest.param({"top_k": -2}, ["top_k", "-2"], id="top-k-negative"),
    pytest.param({"max_tokens": -1}, ["max_tokens", "≥ 1"], id="max-tokens-negative"),
    pytest.param({"max_tokens": CONTEXT}, ["max_tokens", "does not fit"], id="max-tokens-ctx"),
    pytest.param({"stop": [""]}, ["stop", "empty"], id="stop-empty-string"),
    pytest.param({"stop": ["x"] * 17}, ["stop", "at most 16"], id="stop-too-many"),
]  # fmt: skip


@pytest.mark.parametrize(("values", "words"), BAD_SAMPLING)
def test_bad_sampling_is_invalid_argument_never_internal(
    stage: RunningStage, values: dict[str, object], words: list[str]
) -> None:
    error = expect_error(stage, stage_pb2.GenerateRequest(prompt="hi", sampling=sampling(**values)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    for word in words:
        assert word in error.details()
    # ValidateSampling gives the same verdict without running anything.
    with pytest.raises(grpc.RpcError) as info:
        stage.stub.ValidateSampling(
            stage_pb2.ValidateSamplingRequest(sampling=sampling(**values)), timeout=30
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == error.details()
    assert_engine_empty(stage)


@pytest.mark.parametrize(
    "values",
    [
        {"temperature": 2.0, "top_p": 1.0, "top_k": 0},
        {"seed": -5},
        {"seed": 2**63 - 1},
        {"top_k": 10**9},
    ],
    ids=["at-the-bounds", "negative-seed", "largest-seed", "top-k-past-vocab"],
)
def test_odd_but_valid_sampling_serves(stage: RunningStage, values: dict[str, object]) -> None:
    stage.stub.ValidateSampling(
        stage_pb2.ValidateSamplingRequest(sampling=sampling(**values)), timeout=30
    )
    request = stage_pb2.GenerateRequest(prompt="Hello", sampling=sampling(max_tokens=2, **values))
    replies = list(stage.stub.Generate(request, timeout=60))
    assert replies[-1].finished


def test_stage_serves_after_every_bad_sampling(stage: RunningStage) -> None:
    for case in BAD_SAMPLING:
        values = case.values[0]
        assert isinstance(values, dict)
        expect_error(stage, stage_pb2.GenerateRequest(prompt="hi", sampling=sampling(**values)))
    replies = list(
        stage.stub.Generate(
            stage_pb2.GenerateRequest(prompt="Hello", sampling=sampling(max_tokens=3)), timeout=60
        )
    )
    assert replies[-1].finished and replies[-1].finish_reason in ("stop", "length")


# --- Issue 14: what an adversarial run broke, on a real stage over real gRPC ---

HUGE = "x" * 20_000


@pytest.mark.parametrize(
    ("request_", "words"),
    [
        pytest.param(
            stage_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role=HUGE, content="hi")]),
            ["messages[0].role", "20,000 characters", "use one of"],
            id="20000-character-role",
        ),
        pytest.param(
            stage_pb2.GenerateRequest(tensor=common_pb2.Tensor(dtype=HUGE, shape=[1], data=b"")),
            ["tensor dtype", "20,000 characters"],
            id="20000-character-dtype",
        ),
    ],
)
def test_a_20000_character_value_is_invalid_argument_with_a_short_message(
    stage: RunningStage, request_: stage_pb2.GenerateRequest, words: list[str]
) -> None:
    """It was RESOURCE_EXHAUSTED "received metadata size exceeds hard limit": the message
    repeated the whole value."""
    error = expect_error(stage, request_)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert len(error.details()) < 500
    for word in words:
        assert word in error.details()


def test_a_prompt_over_max_prompt_bytes_is_refused_before_tokenizing(stage: RunningStage) -> None:
    error = expect_error(stage, stage_pb2.GenerateRequest(prompt="word " * 600_000))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "3,000,000 characters" in error.details()
    assert "limit of 1,048,576 bytes of stage 'thinker' (--max-prompt-bytes)" in error.details()
    assert_engine_empty(stage)


def test_health_answers_while_a_large_prompt_is_tokenized(stage: RunningStage) -> None:
    """A prompt just under --max-prompt-bytes takes a while to tokenize (then it is refused:
    far more tokens than the context). Health checks sent meanwhile are answered while the
    Generate call is still pending, since tokenizing runs off the event loop."""
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(stage.address))
    done = threading.Event()
    answered_while_pending: list[int] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            expect_error(stage, stage_pb2.GenerateRequest(prompt="word " * 200_000))
        except BaseException as exc:  # the assertion below reports it
            errors.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=call)
    thread.start()
    while not done.is_set():
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=60)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        if not done.is_set():
            answered_while_pending.append(1)
    thread.join()
    assert not errors
    assert len(answered_while_pending) >= 3


def test_a_duplicate_in_flight_request_id_cannot_cut_off_the_first_caller(
    stage: RunningStage,
) -> None:
    """Two callers with one request_id, one cancels: the other got OK with finish_reason abort
    after 13 of 64 tokens. The second is now ALREADY_EXISTS, and the first gets all 64."""
    request = stage_pb2.GenerateRequest(
        request_id="issue14-shared-id",
        prompt="Count to one hundred.",
        sampling=sampling(max_tokens=64, ignore_eos=True, temperature=0.0),
    )
    first = stage.stub.Generate(request, timeout=120)
    replies = [next(first)]  # in flight now
    second = stage.stub.Generate(request, timeout=60)
    with pytest.raises(grpc.RpcError) as info:
        next(second)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS, info.value.details()
    assert "issue14-shared-id" in info.value.details()
    second.cancel()
    replies += list(first)
    assert replies[-1].finished and replies[-1].finish_reason == "length"
    assert sum(len(r.token_ids) for r in replies) == 64
    assert_engine_empty(stage)
