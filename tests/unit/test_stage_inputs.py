"""Issue 14, at the stage: a prompt over --max-prompt-bytes is refused before the engine sees
it, tokenizing runs off the event loop, and a duplicate in-flight request_id is ALREADY_EXISTS,
so no caller can cut off another's request."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from omnistage.errors import InvalidRequestError
from omnistage.types import ChatTurn, GenerateInput, OutputDelta
from omnistage.v1 import common_pb2, stage_pb2
from services.config import StageConfig
from services.profiling.sessions import ProfileSessionStore
from services.servicer import StageServicer
from tests.unit.fake_grpc import Aborted, FakeContext, mapped
from tests.waiting import eventually


class HeldEngine:
    """Sends one token, then finishes ("length") once `release` is set."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.aborted: list[str] = []
        self.release = asyncio.Event()

    async def generate(self, request: GenerateInput) -> AsyncIterator[OutputDelta]:
        self.calls.append(request.request_id)
        yield OutputDelta(request.request_id, token_ids=(1,), text="a")
        await self.release.wait()
        yield OutputDelta(request.request_id, token_ids=(2,), finished=True, finish_reason="length")

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def servicer(engine: Any, tmp_path: Path, **options: Any) -> StageServicer:
    store = ProfileSessionStore(stage_name="s", engine=engine, root=None)
    return StageServicer(name="s", engine=engine, sessions=store, **options)


async def generate(
    stage: StageServicer, request: stage_pb2.GenerateRequest, replies: list[Any] | None = None
) -> tuple[grpc.StatusCode, str] | None:
    """Run Generate as the server does; the status it aborted with, None when it ended OK."""
    context = FakeContext()
    sink = [] if replies is None else replies

    async def body() -> None:
        async for reply in stage.Generate(request, context):  # type: ignore[arg-type]
            sink.append(reply)

    with contextlib.suppress(Aborted):
        await mapped(context, "Generate", body())
    return context.status


@pytest.mark.parametrize(
    ("request_", "size"),
    [
        pytest.param(stage_pb2.GenerateRequest(prompt="é" * 501), "1,002 bytes", id="multibyte"),
        pytest.param(
            stage_pb2.GenerateRequest(prompt="x" * 10_000_000), "10,000,000 characters", id="10MB"
        ),
        pytest.param(
            stage_pb2.GenerateRequest(
                messages=[common_pb2.ChatMessage(role="user", content="x" * 600)] * 2
            ),
            "1,208 characters",
            id="messages",
        ),
    ],
)
def test_a_prompt_over_max_prompt_bytes_is_refused_before_the_engine(
    request_: stage_pb2.GenerateRequest, size: str, tmp_path: Path
) -> None:
    engine = HeldEngine()
    stage = servicer(engine, tmp_path, max_prompt_bytes=1000)
    status = asyncio.run(generate(stage, request_))
    assert status is not None and status[0] is grpc.StatusCode.INVALID_ARGUMENT
    assert (
        size in status[1] and "limit of 1,000 bytes of stage 's' (--max-prompt-bytes)" in status[1]
    )
    assert engine.calls == []


def test_a_prompt_at_max_prompt_bytes_is_served(tmp_path: Path) -> None:
    engine = HeldEngine()
    engine.release.set()
    stage = servicer(engine, tmp_path, max_prompt_bytes=1000)
    assert asyncio.run(generate(stage, stage_pb2.GenerateRequest(prompt="x" * 1000))) is None
    assert len(engine.calls) == 1


def test_a_duplicate_in_flight_request_id_is_already_exists_and_the_first_runs_on(
    tmp_path: Path,
) -> None:
    """Issue 14: two callers with one request_id, one cancels, and the other got OK with
    finish_reason abort after 13 of 64 tokens. The second is now refused before the engine,
    so its cancel cannot abort the first's request."""
    engine = HeldEngine()
    stage = servicer(engine, tmp_path)

    async def main() -> None:
        first: list[Any] = []
        request = stage_pb2.GenerateRequest(request_id="same", prompt="hi")
        running = asyncio.create_task(generate(stage, request, first))
        await eventually(lambda: first, timeout=10, what="the first call's first token")
        status = await asyncio.wait_for(generate(stage, request), 10)  # not held by the first
        assert status is not None and status[0] is grpc.StatusCode.ALREADY_EXISTS
        assert "request_id 'same' is already in flight on stage 's'" in status[1]
        engine.release.set()
        assert await running is None
        assert first[-1].finished and first[-1].finish_reason == "length"
        assert engine.calls == ["same"] and engine.aborted == []
        engine.release.set()
        assert await generate(stage, request) is None  # the id is free again once done

    asyncio.run(main())


def test_a_cancelled_call_frees_its_request_id_after_aborting_it(tmp_path: Path) -> None:
    engine = HeldEngine()
    stage = servicer(engine, tmp_path)

    async def main() -> None:
        first: list[Any] = []
        request = stage_pb2.GenerateRequest(request_id="x", prompt="hi")
        running = asyncio.create_task(generate(stage, request, first))
        await eventually(lambda: first, timeout=10, what="the first token")
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        assert engine.aborted == ["x"]
        engine.release.set()
        assert await generate(stage, request) is None

    asyncio.run(main())


# --- Tokenizing off the event loop (the vLLM engine) ---


class BlockingTokenizer:
    """Holds the tokenizing thread until `release` is set, noting when it finished."""

    def __init__(self, order: list[str]) -> None:
        self.order = order
        self.entered = threading.Event()
        self.release = threading.Event()

    def _block(self) -> list[int]:
        self.entered.set()
        self.release.wait(timeout=10)  # on the loop (the bug), this stalls the loop 10 s
        self.order.append("tokenized")
        return []  # "tokenizes to no tokens": the call ends there, no engine needed

    def encode(self, text: str) -> list[int]:
        return self._block()

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> list[int]:
        return self._block()


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(GenerateInput(request_id="r", prompt="x" * 1000), id="prompt"),
        pytest.param(
            GenerateInput(request_id="r", messages=(ChatTurn("user", "x" * 1000),)),
            id="chat-template",
        ),
    ],
)
def test_tokenizing_a_large_prompt_leaves_the_event_loop_free(request_: GenerateInput) -> None:
    """Issue 14: a 10 MB prompt tokenized on the loop held a health check 10.6 s. While the
    tokenizer works, other coroutines (health checks, other requests) run: the loop notes
    "loop ran" before the tokenizer returns."""
    pytest.importorskip("vllm")
    from services.engines.vllm_engine import VllmEngine

    order: list[str] = []
    tokenizer = BlockingTokenizer(order)
    engine = VllmEngine(StageConfig(name="s", model="smollm2"))
    engine._llm = SimpleNamespace(errored=False, shutdown=lambda: None)
    engine._tokenizer = tokenizer
    engine._max_model_len = 2048

    async def main() -> None:
        async def drain() -> None:
            async for _ in engine.generate(request_):
                pass

        call = asyncio.create_task(drain())
        await eventually(tokenizer.entered.is_set, timeout=15, what="tokenizing to start")
        order.append("loop ran")
        tokenizer.release.set()
        with pytest.raises(InvalidRequestError, match="no tokens"):
            await call

    try:
        asyncio.run(main())
    finally:
        tokenizer.release.set()
        asyncio.run(engine.close())
    assert order == ["loop ran", "tokenized"]
