"""The HTTP front door on fake stages, in process: the error mapping (statuses, the retry
hint), an error in the middle of a stream, and the token under scope "all". The real thing,
on real stages, is tests/integration/test_http_api.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from omnistage import errors
from omnistage.security import ServerSecurity
from omnistage.types import GenerateInput, OutputDelta
from omnistage.up import _orchestrator_args
from orchestrator.config import PipelineConfigError, parse_pipeline
from orchestrator.http_api import FrontDoor, build_app
from orchestrator.http_errors import error_response
from orchestrator.http_server import HttpApiConfig
from orchestrator.runner import PipelineRunner
from tests.unit.fake_stages import FakePool, FakeReplica, FakeStage

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (errors.InvalidRequestError("x"), 400, "invalid_request_error"),
        (errors.UnauthenticatedError("x"), 401, "authentication_error"),
        (errors.NotFoundError("x"), 404, "not_found_error"),
        (errors.ProfilerStateError("x"), 409, "conflict_error"),
        (errors.OverloadedError("x"), 429, "rate_limit_error"),
        (errors.StageUnavailableError("x"), 503, "service_unavailable_error"),
        (errors.EngineDeadError("x"), 503, "service_unavailable_error"),
        (errors.DeadlineError("x"), 504, "timeout_error"),
        (errors.CancelledError("x"), 500, "server_error"),
        (errors.OmnistageError("x", code="PERMISSION_DENIED"), 500, "server_error"),
    ],
)
def test_each_grpc_code_has_its_http_status(
    error: errors.OmnistageError, status: int, kind: str
) -> None:
    response = error_response(error)
    assert response.status_code == status
    body = json.loads(bytes(response.body))
    assert body == {"error": {"message": "x", "type": kind, "param": None, "code": error.code}}
    assert "retry-after" not in response.headers


def test_the_retry_hint_becomes_retry_after() -> None:
    response = error_response(errors.OverloadedError("full", retry_after_ms=1500))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "2"  # whole seconds, rounded up
    assert response.headers["retry-after-ms"] == "1500"


class OverloadedStage(FakeStage):
    async def generate(
        self, request: GenerateInput, *, timeout: float | None = None, **options: object
    ) -> AsyncIterator[OutputDelta]:
        raise errors.OverloadedError("at its in-flight limit", retry_after_ms=250)
        yield  # an async generator, as a stage client's generate is


class BreakingStage(FakeStage):
    """Two tokens, then the stage fails."""

    async def generate(
        self, request: GenerateInput, *, timeout: float | None = None, **options: object
    ) -> AsyncIterator[OutputDelta]:
        for text in ("one ", "two "):
            yield OutputDelta(request_id=request.request_id, token_ids=(1,), text=text)
        raise errors.EngineDeadError("the engine died")


class Replicas(FakePool):
    def replicas(self, stage: str) -> list[FakeReplica]:
        return [FakeReplica(self.stages[stage], f"fake/{stage}")]

    def mark(self, replica: FakeReplica, health: str) -> None:
        pass


def client_for(stage: FakeStage, *, scope: str = "profiling") -> TestClient:
    pipeline = parse_pipeline("name: fake\nstages:\n  - {name: talker, address: fake:1}\n")
    pool = Replicas(talker=stage)
    door = FrontDoor(
        pipeline=pipeline,
        pool=pool,  # type: ignore[arg-type]
        runner=PipelineRunner(pipeline, pool),  # type: ignore[arg-type]
        profiler=None,  # type: ignore[arg-type]
        sessions=None,  # type: ignore[arg-type]
        config=HttpApiConfig(port=0, text_stage="talker"),
        security=ServerSecurity(token="tok", auth_scope=scope),  # type: ignore[arg-type]
        is_serving=lambda: True,
    )
    return TestClient(build_app(door), raise_server_exceptions=False)


@pytest.fixture
def http(tmp_path: Path) -> Iterator[TestClient]:
    with client_for(FakeStage("talker", tokens=3)) as client:
        yield client


def test_a_fake_pipeline_answers(http: TestClient) -> None:
    reply = http.post("/v1/chat/completions", json=CHAT).json()
    assert reply["choices"][0]["message"]["content"] == "0 1 2 "
    assert reply["usage"]["completion_tokens"] == 3


def test_an_overloaded_stage_is_429_with_retry_after() -> None:
    with client_for(OverloadedStage("talker")) as http:
        response = http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.headers["retry-after-ms"] == "250"
    assert response.json()["error"]["code"] == "RESOURCE_EXHAUSTED"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_sampling_past_a_stage_engines_bound_is_400_before_the_stage_runs(stream: bool) -> None:
    """Issue 14: the stage's ValidateSampling refuses; nothing runs and nothing streams."""
    refusal = "sampling.temperature: temperature must be in [0, 2], got 2.5"
    stage = FakeStage("talker", refuse_sampling=refusal)
    with client_for(stage) as http:
        body = CHAT | {"stream": stream, "temperature": 2.5}
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT"
    assert error["message"] == f"stage 'talker': {refusal}"
    assert stage.calls == [] and len(stage.validated) == 1


def test_a_failure_mid_stream_is_the_last_event() -> None:
    with client_for(BreakingStage("talker")) as http:
        response = http.post("/v1/chat/completions", json=CHAT | {"stream": True})
    assert response.status_code == 200
    payloads = [b.removeprefix("data: ") for b in response.text.split("\n\n") if b]
    assert payloads[-1] == "[DONE]"
    error: dict[str, Any] = json.loads(payloads[-2])["error"]
    assert error["code"] == "UNAVAILABLE" and "the engine died" in error["message"]
    texts = [json.loads(p)["choices"][0]["delta"].get("content") for p in payloads[:-2]]
    assert texts == ["", "one ", "two "]


def test_scope_all_guards_every_endpoint_but_health() -> None:
    with client_for(FakeStage("talker", tokens=1), scope="all") as http:
        assert http.get("/health").status_code == 200
        refused = http.get("/v1/models")
        assert refused.status_code == 401
        assert refused.json()["error"]["type"] == "authentication_error"
        assert http.get("/v1/models", headers={"Authorization": "Bearer tok"}).status_code == 200
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 401
        unknown = http.get("/v2/nothing", headers={"Authorization": "Bearer tok"})
        assert unknown.status_code == 404 and "error" in unknown.json()


LAUNCHED = """name: p
stages:
  - {name: thinker, address: "127.0.0.1:1"}
launch:
  http_port: 8000
  http_text_stage: %s
"""


def test_up_passes_the_launch_sections_http_settings(tmp_path: Path) -> None:
    pipeline = parse_pipeline(LAUNCHED % "thinker")
    args = _orchestrator_args(pipeline, tmp_path / "p.yaml", port=None, http_port=None)
    assert args[-4:] == ["--http-port", "8000", "--text-stage", "thinker"]
    args = _orchestrator_args(pipeline, tmp_path / "p.yaml", port=None, http_port=0)
    assert args[-4:-2] == ["--http-port", "0"]


def test_the_text_stage_must_be_a_stage() -> None:
    with pytest.raises(PipelineConfigError) as failed:
        parse_pipeline(LAUNCHED % "talker")
    assert "launch.http_text_stage" in str(failed.value) and "'talker'" in str(failed.value)
