"""Bounded work in process: the stage's file I/O does not need the event loop's default
executor (a real torch engine and stage server, the default executor held busy throughout),
and the in-flight limiter's refusals and hint."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from omnistage.errors import OverloadedError
from omnistage.v1 import common_pb2, stage_pb2, stage_pb2_grpc
from services.admission import DEFAULT_RETRY_MS, MIN_RETRY_MS, InflightLimiter
from services.config import ProfilerSettings, StageConfig
from services.server import build_server


def test_profile_files_do_not_queue_behind_the_default_executor(tmp_path: Path) -> None:
    """As on a vLLM stage whose one default thread is busy with vLLM's profiler: a whole
    profile session, its op table, checksums and download still complete."""
    config = StageConfig(
        name="io",
        engine="torch",
        model="tests.gate_model:build",
        host="127.0.0.1",
        engine_options={"num_threads": 1, "max_wait_ms": 0},
        profiler=ProfilerSettings(
            torch_profiler_dir=str(tmp_path), torch_profiler_with_stack=False
        ),
    )
    release = threading.Event()

    async def scenario() -> dict[str, bytes]:
        stage, port = await build_server(config)
        await stage.start()
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(1, thread_name_prefix="busy-default"))
        busy = loop.run_in_executor(None, release.wait)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = stage_pb2_grpc.StageStub(channel)
                await stub.StartProfile(stage_pb2.StartProfileRequest(label="io"), timeout=60)
                request = stage_pb2.GenerateRequest(token_ids=[1, 2, 3])
                _ = [reply async for reply in stub.Generate(request, timeout=60)]
                stop = await stub.StopProfile(stage_pb2.StopProfileRequest(), timeout=120)
                files = {}
                for item in stop.files:
                    fetch = stage_pb2.FetchProfileFileRequest(
                        session_id=stop.session_id, name=item.name
                    )
                    chunks: list[common_pb2.FileChunk] = [
                        c async for c in stub.FetchProfileFile(fetch, timeout=60)
                    ]
                    files[item.name] = b"".join(c.data for c in chunks)
                assert not busy.done()  # it was busy the whole time
                return files
        finally:
            release.set()
            await busy
            await stage.stop(grace=1)

    files = asyncio.run(asyncio.wait_for(scenario(), timeout=240))
    assert "profiler_out_io.txt" in files and any(n.endswith(".pt.trace.json.gz") for n in files)


def test_the_limiter_refuses_past_its_limit_with_a_hint_and_frees_slots() -> None:
    limiter = InflightLimiter("s", 2)
    with limiter.admit(), limiter.admit():
        with pytest.raises(OverloadedError) as refused, limiter.admit():
            pass
        assert refused.value.retry_after_ms == DEFAULT_RETRY_MS  # nothing finished yet
        assert "limit of 2 requests in flight" in str(refused.value)
    assert limiter.inflight == 0
    with limiter.admit():
        pass
    assert MIN_RETRY_MS <= limiter.retry_after_ms() <= DEFAULT_RETRY_MS


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_inflight must be ≥ 1"):
        InflightLimiter("s", 0)
