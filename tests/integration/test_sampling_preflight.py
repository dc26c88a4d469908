"""Issue 14: a later stage's sampling past its engine's bound is refused before any stage runs.

Before, through the orchestrator the client first got the thinker's tokens, then the second
stage's INTERNAL. Now every stage's engine is asked (Stage.ValidateSampling) before the first
stage's Generate, over gRPC and the OpenAI HTTP API alike. One orchestrator process chains the
session's thinker and plain stages (both vLLM).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

import omnistage
from omnistage import errors
from omnistage.launch import ServerProcess
from omnistage.types import PipelineOutput
from omnistage.v1 import stage_pb2
from tests.servers import RunningStage, serve_pipeline

MODEL = "preflight"
CHAT = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture(scope="module")
def orchestrator(
    tmp_path_factory: pytest.TempPathFactory, stage: RunningStage, plain_stage: RunningStage
) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("preflight")
    text = f"""name: preflight
stages:
  - name: thinker
    address: {stage.address}
    sampling: {{max_tokens: 6, temperature: 0.0}}
  - name: plain
    address: {plain_stage.address}
    sampling: {{max_tokens: 4}}
    input: {{processor: text, template: 'Rewrite: {{text}}'}}
"""
    process = serve_pipeline(tmp, "preflight", text, extra=["--http-port", "0"])
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(orchestrator: ServerProcess) -> Iterator[omnistage.Client]:
    with omnistage.Client(orchestrator.address) as pipeline:
        yield pipeline


def running(stage: RunningStage) -> int:
    return int(stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5).running_requests)


def test_talker_temperature_past_vllms_bound_fails_before_any_token(
    client: omnistage.Client, stage: RunningStage, plain_stage: RunningStage
) -> None:
    outputs: list[PipelineOutput] = []
    with pytest.raises(errors.InvalidRequestError) as info:
        for out in client.generate(
            messages=CHAT, stage_sampling={"plain": {"temperature": 2.5}}, timeout=60
        ):
            outputs.append(out)
    assert outputs == []  # before: the thinker's tokens, then the error
    message = str(info.value)
    assert message.startswith("stage 'plain': sampling.temperature: ")
    assert "[0, 2]" in message and "2.5" in message
    assert running(stage) == 0 and running(plain_stage) == 0


def test_a_request_temperature_past_the_bound_names_the_first_stage(
    client: omnistage.Client,
) -> None:
    with pytest.raises(errors.InvalidRequestError) as info:
        list(client.generate(messages=CHAT, temperature=2.5, timeout=60))
    assert str(info.value).startswith("stage 'thinker': sampling.temperature: ")


def test_the_pipeline_serves_after_a_refusal_and_valid_sampling_still_runs(
    client: omnistage.Client,
) -> None:
    for _ in range(2):  # the second refusal comes from the cached verdict
        with pytest.raises(errors.InvalidRequestError, match="stage 'plain'"):
            list(client.generate(messages=CHAT, stage_sampling={"plain": {"temperature": 3.0}}))
    outputs = list(
        client.generate(messages=CHAT, stage_sampling={"plain": {"temperature": 2.0}}, timeout=120)
    )
    assert {o.stage for o in outputs if o.finished} == {"thinker", "plain"}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_http_api_answers_400_before_any_stage_runs(
    orchestrator: ServerProcess, stream: bool
) -> None:
    body = {
        "model": MODEL,
        "messages": CHAT,
        "stream": stream,
        "stage_sampling": {"plain": {"temperature": 2.5}},
    }
    with httpx.Client(base_url=orchestrator.http_url, timeout=60) as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["message"].startswith("stage 'plain': sampling.temperature: ")
