"""The same two-stage chain run four ways: vLLM engines in this process, omnistage's gRPC
stages and orchestrator (driven over gRPC, or over its OpenAI-compatible HTTP API), and two
chained `vllm serve` OpenAI servers.

Each system is an async context manager that starts its engines (and stops them on exit) and
yields a `Chain`: `one(i)` sends request `i` through both stages and returns what its caller
saw; `roots` names the processes whose CPU time the benchmark accounts (`proc_cpu`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import yaml
from compare_stats import RequestRecord
from stage_overhead import BenchSettings, stage_cli_flags

import omnistage
from omnistage.launch import ServerProcess, stage_args
from omnistage.types import ChatTurn, GenerateInput
from orchestrator.config import PipelineConfig, StageSpec, load_pipeline
from orchestrator.processors import StageOutput, resolve_processor

ROOT = Path(__file__).resolve().parent.parent
PIPELINE = ROOT / "examples" / "two-stage" / "pipeline.yaml"
SYSTEMS = ("inprocess", "omnistage", "omnistage-http", "openai")
HTTP_MODEL = "bench-chain"
PROMPTS = (
    "Explain how a hash map handles collisions.",
    "Write a short poem about the sea at night.",
    "What are the main causes of inflation?",
    "Describe the water cycle to a ten-year-old.",
    "List three tips for writing clear documentation.",
    "How does a CPU cache improve performance?",
    "Summarize the plot of a detective story in a few lines.",
    "What is the difference between a process and a thread?",
    "Give a recipe for a simple tomato soup.",
    "Why is the sky blue?",
    "Describe a walk through a busy market.",
    "What makes a good unit test?",
    "Explain gradient descent in plain words.",
    "Tell me about the history of the printing press.",
    "How do vaccines train the immune system?",
    "Plan a one-day trip to a mountain village.",
)
Progress = Callable[[str], None]
LOCAL_PORT_0 = ("--port", "0", "--host", "127.0.0.1")


@dataclass(frozen=True)
class ChainSettings:
    """The engines' settings (omnistage's `stage serve` defaults) and the workload."""

    model: str = "smollm2"
    dtype: str = "float32"
    max_model_len: int = 2048
    max_num_seqs: int = 64
    kv_cache_gib: float = 1.0
    enforce_eager: bool = True
    engine_seed: int = 0
    max_tokens: int = 32  # per stage
    temperature: float = 0.0
    ignore_eos: bool = True
    pipeline: str = str(PIPELINE.relative_to(ROOT))
    stage_names: tuple[str, ...] = field(default=("thinker", "rewriter"))


def engine_kwargs(s: ChainSettings, model_dir: Path) -> dict[str, Any]:
    """AsyncEngineArgs for the in-process engines: what `VllmEngine` builds from `StageConfig`."""
    return {
        "model": str(model_dir),
        "dtype": s.dtype,
        "max_model_len": s.max_model_len,
        "max_num_seqs": s.max_num_seqs,
        "disable_log_stats": False,
        "enforce_eager": s.enforce_eager,
        "seed": s.engine_seed,
    }


def omnistage_stage_flags(s: ChainSettings) -> list[str]:
    """The same settings as `omnistage stage serve` flags (stage_overhead's rendering)."""
    flags = stage_cli_flags(
        BenchSettings(
            quick=False,
            dtype=s.dtype,
            max_model_len=s.max_model_len,
            max_num_seqs=s.max_num_seqs,
            kv_cache_gib=s.kv_cache_gib,
            enforce_eager=s.enforce_eager,
        )
    )
    return [*flags, "--engine-options", json.dumps({"seed": s.engine_seed})]


def vllm_serve_flags(s: ChainSettings, model_dir: Path, name: str, port: int) -> list[str]:
    """The same settings as `vllm serve` flags; the KV cache size goes in the environment."""
    flags = ["--model", str(model_dir), "--served-model-name", name, "--dtype", s.dtype]
    flags += ["--max-model-len", str(s.max_model_len), "--max-num-seqs", str(s.max_num_seqs)]
    flags += ["--seed", str(s.engine_seed), "--host", "127.0.0.1", "--port", str(port)]
    flags += ["--no-enable-log-requests", "--disable-uvicorn-access-log"]
    return [*flags, "--enforce-eager"] if s.enforce_eager else flags


def kv_cache_env(s: ChainSettings) -> dict[str, str]:
    return {"VLLM_CPU_KVCACHE_SPACE": f"{s.kv_cache_gib:g}"}


class Chain(Protocol):
    roots: dict[int, str]

    async def one(self, index: int) -> RequestRecord: ...


# -- the edge, shared by the in-process and OpenAI chains ---------------------------------------


class Edge:
    """Stage 2's input from stage 1's text: the pipeline file's own edge processor."""

    def __init__(self, pipeline: PipelineConfig) -> None:
        self.spec: StageSpec = pipeline.stages[1]
        self._processor = resolve_processor(self.spec.input)

    def __call__(self, text: str, token_ids: tuple[int, ...], original: GenerateInput) -> Any:
        output = StageOutput(stage="thinker", text=text, token_ids=token_ids)
        return self._processor(output, original, self.spec.input)


def first_request(index: int) -> GenerateInput:
    prompt = PROMPTS[index % len(PROMPTS)]
    return GenerateInput(request_id=f"r{index}", messages=(ChatTurn("user", prompt),))


# -- in process ---------------------------------------------------------------------------------


class InProcessChain:
    """Two AsyncLLM engines in this process; stage 2 starts on stage 1's finished text."""

    def __init__(self, llms: list[Any], s: ChainSettings, edge: Edge) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        self._llms = llms  # shared with inprocess_system, which empties it on shutdown
        self._tokenizers = [llm.get_tokenizer() for llm in llms]
        self._params = SamplingParams(
            max_tokens=s.max_tokens,
            temperature=s.temperature,
            ignore_eos=s.ignore_eos,
            output_kind=RequestOutputKind.DELTA,
        )
        self._edge = edge
        self._serial = 0
        self.roots = {os.getpid(): "driver"}

    def _token_ids(self, stage: int, request: GenerateInput) -> list[int]:
        tokenizer = self._tokenizers[stage]
        if request.messages:
            turns = [{"role": t.role, "content": t.content} for t in request.messages]
            ids = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(t) for t in ids]
        if request.prompt:
            return list(tokenizer.encode(request.prompt))
        return list(request.token_ids)

    async def _stage(
        self, stage: int, request: GenerateInput, on_first: Callable[[], None] | None = None
    ) -> tuple[str, tuple[int, ...]]:
        from vllm.inputs import TokensPrompt

        self._serial += 1
        prompt = TokensPrompt(prompt_token_ids=self._token_ids(stage, request))
        text, ids = "", list[int]()
        stream = self._llms[stage].generate(prompt, self._params, f"c{self._serial}")
        async for output in stream:
            completion = output.outputs[0]
            if completion.token_ids and not ids and on_first is not None:
                on_first()
            ids.extend(completion.token_ids)
            text += completion.text
        return text, tuple(ids)

    async def one(self, index: int) -> RequestRecord:
        first: list[float] = []
        sent = time.perf_counter()
        request = first_request(index)
        text, ids = await self._stage(0, request)
        second = self._edge(text, ids, request)
        _, final = await self._stage(1, second, lambda: first.append(time.perf_counter()))
        done = time.perf_counter()
        return RequestRecord(sent, first[0] if first else math.nan, done, (len(ids), len(final)))


@contextlib.asynccontextmanager
async def inprocess_system(
    s: ChainSettings, workdir: Path, say: Progress
) -> AsyncIterator[InProcessChain]:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from omnistage.models import resolve_model

    os.environ.update(kv_cache_env(s))
    model_dir = await asyncio.to_thread(resolve_model, s.model)
    kwargs = engine_kwargs(s, model_dir)

    def create() -> Any:
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))

    say("inprocess: starting two AsyncLLM engines in this process (about 40 s)")
    started = time.perf_counter()
    llms = list(await asyncio.gather(*(asyncio.to_thread(create) for _ in s.stage_names)))
    say(f"inprocess: engines ready after {time.perf_counter() - started:.1f} s")
    try:
        yield InProcessChain(llms, s, Edge(load_pipeline(ROOT / s.pipeline)))
    finally:
        say("inprocess: shutting the engines down")
        for llm in llms:
            await asyncio.to_thread(llm.shutdown)
        llms.clear()  # the chain keeps the list: no engine is left to a finalizer at exit
        gc.collect()


# -- omnistage ------------------------------------------------------------------------------------


def bench_pipeline_file(
    s: ChainSettings,
    addresses: dict[str, str],
    folder: Path,
    extra: Sequence[dict[str, Any]] = (),
) -> Path:
    """The example pipeline with the stages at `addresses`, without launch, its stages'
    sampling defaults and timeouts (the request's sampling is the workload's, for every system).
    `extra` stages (already dicts) are appended."""
    data = yaml.safe_load((ROOT / s.pipeline).read_text())
    data.pop("launch", None)
    data["name"] = "bench-" + data["name"]
    for stage in data["stages"]:
        stage.pop("sampling", None)
        stage.pop("timeout_s", None)
        stage["address"] = addresses[stage["name"]]
    data["stages"] += list(extra)
    path = folder / f"{data['name']}-{len(data['stages'])}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def start_servers(servers: list[ServerProcess], say: Progress, label: str) -> None:
    """Wait until every server is SERVING, reporting progress every 5 s."""

    def wait(server: ServerProcess) -> str:
        def report(status: str, seconds: float) -> None:
            say(f"{label}: {server.name} {status} after {seconds:.0f} s")

        return server.wait_serving(timeout=900, progress=report)

    await asyncio.gather(*(asyncio.to_thread(wait, server) for server in servers))


class OmnistageChain:
    def __init__(self, client: omnistage.AsyncClient, s: ChainSettings, roots: dict[int, str]):
        self._client = client
        self._s = s
        self.roots = roots

    async def one(self, index: int) -> RequestRecord:
        request = first_request(index)
        tokens = [0, 0]
        first = math.nan
        sent = time.perf_counter()
        async for out in self._client.generate(
            messages=request.messages,
            max_tokens=self._s.max_tokens,
            temperature=self._s.temperature,
            ignore_eos=self._s.ignore_eos,
        ):
            tokens[out.stage_index] += len(out.token_ids)
            if out.final and out.token_ids and math.isnan(first):
                first = time.perf_counter()
        return RequestRecord(sent, first, time.perf_counter(), (tokens[0], tokens[1]))


class OmnistageHttpChain:
    """The same servers, driven through the orchestrator's OpenAI API: one streamed chat
    completion per request, as an OpenAI client sends it to a vLLM server."""

    def __init__(self, session: Any, url: str, s: ChainSettings, roots: dict[int, str]):
        self._session = session
        self._url = url
        self._s = s
        self.roots = roots

    async def one(self, index: int) -> RequestRecord:
        request = first_request(index)
        path, body = chat_body(request, self._s, HTTP_MODEL)
        first, tokens = math.nan, (0, 0)
        sent = time.perf_counter()
        async for payload in sse_events(self._session, self._url + path, body, "orchestrator"):
            piece, _ = sse_piece(payload)
            if piece and math.isnan(first):
                first = time.perf_counter()
            if payload.get("usage"):
                counts = [u["completion_tokens"] for u in payload["usage"]["stages"]]
                tokens = (counts[0], counts[-1])
        return RequestRecord(sent, first, time.perf_counter(), tokens)


@contextlib.asynccontextmanager
async def omnistage_http_system(
    s: ChainSettings, workdir: Path, say: Progress
) -> AsyncIterator[OmnistageHttpChain]:
    async with (
        omnistage_servers(s, workdir, say, http=True) as (orchestrator, roots),
        http_session() as session,
    ):
        yield OmnistageHttpChain(session, orchestrator.http_url, s, roots)


def http_session() -> Any:
    """The benchmarks' HTTP client session (aiohttp): no overall timeout (a level may run for
    minutes) and no cap on connections (every concurrent request has its own)."""
    import aiohttp

    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None), connector=aiohttp.TCPConnector(limit=0)
    )


@contextlib.asynccontextmanager
async def omnistage_system(
    s: ChainSettings, workdir: Path, say: Progress
) -> AsyncIterator[OmnistageChain]:
    async with (
        omnistage_servers(s, workdir, say) as (orchestrator, roots),
        omnistage.AsyncClient(orchestrator.address) as client,
    ):
        yield OmnistageChain(client, s, roots)


@contextlib.asynccontextmanager
async def omnistage_servers(
    s: ChainSettings, workdir: Path, say: Progress, *, http: bool = False
) -> AsyncIterator[tuple[ServerProcess, dict[int, str]]]:
    """Two stages and an orchestrator over them (with its HTTP API when `http`), SERVING."""
    os.environ.update(kv_cache_env(s))
    flags = omnistage_stage_flags(s)
    stages = [
        ServerProcess(
            f"stage {name}",
            stage_args(name=name, model=s.model, extra=flags),
            log_path=workdir / f"omnistage-{name}.log",
        )
        for name in s.stage_names
    ]
    servers = list(stages)
    try:
        say("omnistage: starting two `omnistage stage serve` processes (about 40 s)")
        started = time.perf_counter()
        await start_servers(stages, say, "omnistage")
        say(f"omnistage: stages SERVING after {time.perf_counter() - started:.1f} s")
        addresses = {name: p.address for name, p in zip(s.stage_names, stages, strict=True)}
        pipeline = bench_pipeline_file(s, addresses, workdir)
        http_flags = ["--http-port", "0", "--served-model-name", HTTP_MODEL] if http else []
        orchestrator = ServerProcess(
            "orchestrator",
            ["orchestrator", "serve", "--pipeline", str(pipeline), *LOCAL_PORT_0, *http_flags],
            log_path=workdir / "omnistage-orchestrator.log",
        )
        servers.append(orchestrator)
        await start_servers([orchestrator], say, "omnistage")
        roots = {os.getpid(): "client", orchestrator.process.pid: "orchestrator"}
        roots |= {
            p.process.pid: f"frontend:{n}" for n, p in zip(s.stage_names, stages, strict=True)
        }
        yield orchestrator, roots
    finally:
        say("omnistage: stopping the orchestrator and the stages (SIGTERM)")
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in reversed(servers)))


# -- two chained vLLM OpenAI servers --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def vllm_command() -> list[str]:
    """vLLM's OpenAI server. Not the `vllm serve` CLI: with the `vllm-cpu` package it exits at
    once (it asks for the version of a distribution named `vllm`, which is not installed);
    the module takes the same flags."""
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


class VllmServeProcess:
    """One `vllm serve` in its own process group, its log in a file."""

    def __init__(self, name: str, args: list[str], *, log_path: Path, env: dict[str, str]):
        self.name = name
        self.log_path = log_path
        self.port = int(args[args.index("--port") + 1])
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("w") as log:
            self.process = subprocess.Popen(
                [*vllm_command(), *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **env},
            )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, say: Progress, timeout: float = 900.0) -> None:
        started = time.monotonic()
        last = 0.0
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            elapsed = time.monotonic() - started
            if self.process.poll() is not None or elapsed > timeout:
                tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-30:])
                raise RuntimeError(
                    f"vllm serve {self.name} is not ready after {elapsed:.0f} s (exit code "
                    f"{self.process.poll()}); its log {self.log_path} ends with:\n{tail}"
                )
            if elapsed - last >= 5:
                say(f"openai: vllm serve {self.name} loading after {elapsed:.0f} s")
                last = elapsed
            time.sleep(0.5)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()


def chat_body(
    request: GenerateInput, s: ChainSettings, model: str, *, stream: bool = True
) -> tuple[str, dict[str, Any]]:
    """The endpoint and body for one stage: chat completions for messages, else completions."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": s.max_tokens,
        "temperature": s.temperature,
        "ignore_eos": s.ignore_eos,
        "stream": stream,
        "stream_options": {"include_usage": True},
    }
    if request.messages:
        body["messages"] = [{"role": t.role, "content": t.content} for t in request.messages]
        return "/v1/chat/completions", body
    body["prompt"] = request.prompt or list(request.token_ids)
    return "/v1/completions", body


async def sse_events(
    session: Any, url: str, body: dict[str, Any], who: str
) -> AsyncIterator[dict[str, Any]]:
    """Each event of a streamed OpenAI reply (SSE `data:` lines up to `[DONE]`), decoded."""
    async with session.post(url, json=body) as reply:
        if reply.status != 200:
            raise RuntimeError(f"{who}: HTTP {reply.status}: {await reply.text()}")
        async for line in reply.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            yield json.loads(data)


def sse_piece(payload: dict[str, Any]) -> tuple[str, int | None]:
    """(text, completion tokens or None) from one streamed chunk of either endpoint."""
    usage = payload.get("usage")
    tokens = int(usage["completion_tokens"]) if usage else None
    text = ""
    for choice in payload.get("choices") or ():
        delta = choice.get("delta")
        if delta is not None:  # chat completions
            text += delta.get("content") or ""
        else:  # completions
            text += choice.get("text") or ""
    return text, tokens


class OpenAIChain:
    """Stream stage 1's chat completion, then send its text to stage 2, as a user script would."""

    def __init__(self, session: Any, servers: list[VllmServeProcess], s: ChainSettings, edge: Edge):
        self._session = session
        self._servers = servers
        self._s = s
        self._edge = edge
        self.roots = {os.getpid(): "client"}
        self.roots |= {p.process.pid: f"frontend:{p.name}" for p in servers}

    async def _stage(
        self, stage: int, request: GenerateInput, on_first: Callable[[], None] | None = None
    ) -> tuple[str, int]:
        server = self._servers[stage]
        path, body = chat_body(request, self._s, server.name)
        text, tokens = "", 0
        async for payload in sse_events(self._session, server.url + path, body, server.name):
            piece, usage = sse_piece(payload)
            if piece and not text and on_first is not None:
                on_first()
            text += piece
            tokens = usage if usage is not None else tokens
        return text, tokens

    async def one(self, index: int) -> RequestRecord:
        first: list[float] = []
        sent = time.perf_counter()
        request = first_request(index)
        text, count = await self._stage(0, request)
        second = replace(self._edge(text, (), request), request_id=request.request_id)
        _, final = await self._stage(1, second, lambda: first.append(time.perf_counter()))
        done = time.perf_counter()
        return RequestRecord(sent, first[0] if first else math.nan, done, (count, final))


@contextlib.asynccontextmanager
async def openai_system(
    s: ChainSettings, workdir: Path, say: Progress
) -> AsyncIterator[OpenAIChain]:
    from omnistage.models import resolve_model

    model_dir = await asyncio.to_thread(resolve_model, s.model)
    servers = [
        VllmServeProcess(
            name,
            vllm_serve_flags(s, model_dir, name, free_port()),
            log_path=workdir / f"openai-{name}.log",
            env=kv_cache_env(s),
        )
        for name in s.stage_names
    ]
    try:
        say("openai: starting two `vllm serve` processes (about 40 s)")
        started = time.perf_counter()
        await asyncio.gather(*(asyncio.to_thread(p.wait_ready, say) for p in servers))
        say(f"openai: servers ready after {time.perf_counter() - started:.1f} s")
        async with http_session() as session:
            yield OpenAIChain(session, servers, s, Edge(load_pipeline(ROOT / s.pipeline)))
    finally:
        say("openai: stopping the servers (SIGTERM)")
        await asyncio.gather(*(asyncio.to_thread(p.stop) for p in servers))


SYSTEM_STARTERS: dict[
    str, Callable[[ChainSettings, Path, Progress], AbstractAsyncContextManager[Chain]]
] = {
    "inprocess": inprocess_system,
    "omnistage": omnistage_system,
    "omnistage-http": omnistage_http_system,
    "openai": openai_system,
}
