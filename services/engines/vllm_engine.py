"""The vLLM engine adapter: an `AsyncLLM` behind the `Engine` protocol."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from omnistage.errors import EngineDeadError, InvalidRequestError, ProfilerStateError
from omnistage.models import resolve_model
from omnistage.types import (
    EngineInfo,
    GenerateInput,
    OutputDelta,
    ProfileOptions,
    RequestMetrics,
    SamplingOptions,
)
from services.config import StageConfig
from services.engines.vllm_plugin import BUSY_POLL_ENV, DEFAULT_BUSY_POLL_S

logger = logging.getLogger(__name__)

STAGING_DIRNAME = ".vllm-staging"


class VllmEngine:
    """Serves one model with vLLM's `AsyncLLM`, which batches concurrent requests."""

    def __init__(self, config: StageConfig) -> None:
        self._config = config
        self._llm: Any = None
        self._tokenizer: Any = None
        self._model_dir: Path | None = None
        self._max_model_len = 0
        self._vocab_size = 0
        self._running: set[str] = set()
        self._engine_version = ""
        # The stage's own file work (moving a session's traces across file systems can take
        # a while): never on the default executor, which start() makes vLLM's one thread.
        self._io = ThreadPoolExecutor(1, thread_name_prefix=f"vllm-io-{config.name}")
        # Tokenizing (and the chat template) runs here, off the event loop, so a long prompt
        # never stalls health checks and other requests. One thread: a tokenizer shared
        # between threads can fail ("Already borrowed"), and the prompt's size is bounded.
        self._tokenize = ThreadPoolExecutor(1, thread_name_prefix=f"vllm-tokenize-{config.name}")

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        # vLLM starts and stops its front-end torch profiler with asyncio.to_thread. torch's
        # profiler is bound to the thread that started it: stopped from another thread of the
        # default pool, it segfaults while saving the trace. One thread makes them the same.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-frontend")
        )
        self._model_dir = await asyncio.to_thread(resolve_model, self._config.model)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{self._config.kv_cache_gib:g}")
        # vLLM's processes inherit it: its plugin (vllm_plugin) stops their queues spinning, and
        # refuses a bad value here already, when vLLM loads it while it reads its engine args.
        os.environ.setdefault(BUSY_POLL_ENV, DEFAULT_BUSY_POLL_S)
        started = time.monotonic()
        logger.info("starting vLLM on %s (about 25 s on a CPU)", self._model_dir)
        self._llm = await asyncio.to_thread(self._create_llm)
        self._tokenizer = self._llm.get_tokenizer()
        model_config = self._llm.model_config
        self._max_model_len = int(model_config.max_model_len)
        self._vocab_size = int(model_config.get_vocab_size())
        logger.info("vLLM ready in %.1f s", time.monotonic() - started)

    def _create_llm(self) -> Any:
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._engine_version = str(vllm.__version__)
        options: dict[str, Any] = {
            "model": str(self._model_dir),
            "dtype": self._config.dtype,
            "max_model_len": self._config.max_model_len,
            "max_num_seqs": self._config.max_num_seqs,
            "disable_log_stats": False,
            "enforce_eager": self._config.enforce_eager,
        }
        if self._config.profiler.enabled:
            options["profiler_config"] = self._vllm_profiler_config()
        options.update(self._config.engine_options)
        return AsyncLLM.from_engine_args(AsyncEngineArgs(**options))

    def _vllm_profiler_config(self) -> Any:
        from vllm.config import ProfilerConfig

        settings = self._config.profiler
        staging = settings.directory / STAGING_DIRNAME
        staging.mkdir(parents=True, exist_ok=True)
        return ProfilerConfig(**settings.vllm_options(torch_profiler_dir=staging))

    async def close(self) -> None:
        if self._llm is not None:
            llm, self._llm = self._llm, None
            await asyncio.to_thread(llm.shutdown)
        self._io.shutdown(wait=False)
        self._tokenize.shutdown(wait=False)

    def info(self) -> EngineInfo:
        running, dead = 0, ""
        if self._llm is not None:
            running = int(self._llm.get_num_unfinished_requests())
            if self._llm.errored:  # vLLM's monitor thread sees its engine core process die
                dead = f"the vLLM engine has died: {self._llm.dead_error!r}"
        return EngineInfo(
            engine="vllm",
            model=self._config.model,
            running_requests=max(running, len(self._running)),
            engine_version=self._engine_version,
            max_model_len=self._max_model_len,
            device=_device_name(),
            dead_reason=dead,
        )

    # -- generation --------------------------------------------------------------------------

    async def generate(self, request: GenerateInput) -> AsyncIterator[OutputDelta]:
        arrived = time.monotonic()
        llm = self._require_llm()
        from vllm.inputs import TokensPrompt

        loop = asyncio.get_running_loop()
        prompt_ids = await loop.run_in_executor(self._tokenize, self._prompt_token_ids, request)
        params = self._sampling_params(
            request.sampling, prompt_len=len(prompt_ids), final_only=request.final_only
        )
        first_token_at = 0.0
        generated = 0
        admitted = False  # whether vLLM has sent anything: before that, its errors are ours
        self._running.add(request.request_id)
        try:
            submitted = time.monotonic()
            stream = llm.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), params, request.request_id
            )
            async for output in stream:
                admitted = True
                completion = output.outputs[0]
                token_ids = tuple(completion.token_ids)
                if token_ids and not first_token_at:
                    first_token_at = time.monotonic()
                    if request.final_only:  # one output at the end: vLLM timed the first token
                        first_token_at = _first_token_at(output, submitted, first_token_at)
                generated += len(token_ids)
                finished = bool(output.finished)
                metrics = None
                if finished:
                    metrics = _metrics(output, arrived, first_token_at, len(prompt_ids), generated)
                yield OutputDelta(
                    request_id=request.request_id,
                    token_ids=token_ids,
                    text=completion.text,
                    finished=finished,
                    finish_reason=(completion.finish_reason or "stop") if finished else "",
                    metrics=metrics,
                )
        except Exception as exc:
            translated = _translate(exc, admitted=admitted)
            if translated is exc:
                raise
            raise translated from exc
        finally:
            self._running.discard(request.request_id)

    async def abort(self, request_id: str) -> None:
        if self._llm is not None:
            await self._llm.abort(request_id)
        self._running.discard(request_id)

    def _prompt_token_ids(self, request: GenerateInput) -> list[int]:
        """Token ids of the prompt; the servicer has already checked the input's shape and its
        size in bytes. It runs on the tokenizing thread, never on the event loop."""
        if request.tensor is not None:
            raise InvalidRequestError(
                "a vllm stage takes prompt, messages or token_ids, not a tensor"
            )
        if request.messages:
            ids = self._chat_token_ids(request)
        elif request.prompt:
            ids = list(self._tokenizer.encode(request.prompt))
        else:
            ids = list(request.token_ids)
            bad = [t for t in ids if not 0 <= t < self._vocab_size]
            if bad:
                raise InvalidRequestError(
                    f"token_ids must lie in [0, {self._vocab_size}), the model's vocabulary; "
                    f"got {bad[:5]}"
                )
        if not ids:
            raise InvalidRequestError("the input tokenizes to no tokens: give a longer input")
        limit = self._config.max_prompt_tokens
        if limit is not None and limit < self._max_model_len and len(ids) > limit:
            raise InvalidRequestError(
                f"the prompt is {len(ids)} tokens, over the limit of {limit} tokens of stage "
                f"{self._config.name!r} (--max-prompt-tokens); shorten it, or raise "
                "--max-prompt-tokens"
            )
        if len(ids) >= self._max_model_len:
            raise InvalidRequestError(
                f"the prompt is {len(ids)} tokens but the model's context is "
                f"{self._max_model_len} tokens; shorten the prompt to at most "
                f"{self._max_model_len - 1} tokens"
            )
        return ids

    def _chat_token_ids(self, request: GenerateInput) -> list[int]:
        conversation = [{"role": t.role, "content": t.content} for t in request.messages]
        try:
            ids = self._tokenizer.apply_chat_template(
                conversation, add_generation_prompt=True, tokenize=True
            )
        except Exception as exc:
            raise InvalidRequestError(f"the chat template rejected the messages: {exc}") from exc
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def _sampling_params(
        self, options: SamplingOptions, *, prompt_len: int, final_only: bool = False
    ) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        room = self._max_model_len - prompt_len
        max_tokens = options.max_tokens if options.max_tokens is not None else min(256, room)
        if max_tokens > room:
            raise InvalidRequestError(
                f"max_tokens {max_tokens} does not fit: the prompt is {prompt_len} tokens and "
                f"the model's context is {self._max_model_len}; use max_tokens ≤ {room}"
            )
        kwargs: dict[str, Any] = {
            "max_tokens": max_tokens,
            # FINAL_ONLY: vLLM makes no output per step, only the whole one at the end.
            "output_kind": RequestOutputKind.FINAL_ONLY if final_only else RequestOutputKind.DELTA,
            "stop": list(options.stop) or None,
            "ignore_eos": bool(options.ignore_eos),
            "seed": options.seed,
        }
        if options.temperature is not None:
            kwargs["temperature"] = options.temperature
        if options.top_p is not None:
            kwargs["top_p"] = options.top_p
        if options.top_k is not None:
            kwargs["top_k"] = -1 if options.top_k == 0 else options.top_k
        try:
            return SamplingParams(**kwargs)
        except Exception as exc:
            translated = _translate(exc, admitted=False)
            if translated is exc:
                raise
            raise translated from exc

    def check_sampling(self, options: SamplingOptions) -> None:
        """Build the request's `SamplingParams` as `generate` would, for a prompt of one token
        (the shortest there is: a later stage's prompt is not known yet), and run nothing."""
        self._require_llm()
        self._sampling_params(options, prompt_len=1)

    def _require_llm(self) -> Any:
        if self._llm is None:
            raise EngineDeadError(
                f"stage {self._config.name!r} is not serving yet: its engine is still loading "
                "or has stopped; wait until its health check reports SERVING"
            )
        if self._llm.errored:
            raise EngineDeadError(f"the vLLM engine has died: {self._llm.dead_error}")
        return self._llm

    # -- profiling ---------------------------------------------------------------------------

    async def start_profile(self, session_dir: Path, options: ProfileOptions) -> None:
        llm = self._require_llm()
        from vllm.exceptions import ProfilerAlreadyActiveError

        try:
            await llm.start_profile(
                session_dir.name,
                delay_iterations=options.delay_iterations,
                max_iterations=options.max_iterations,
            )
        except ProfilerAlreadyActiveError as exc:
            raise ProfilerStateError("the vLLM profiler is already running") from exc

    async def stop_profile(self, session_dir: Path) -> list[Path]:
        llm = self._require_llm()
        await llm.stop_profile()
        staging = self._config.profiler.directory / STAGING_DIRNAME
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, _move_session_files, staging, session_dir)


def _move_session_files(staging: Path, session_dir: Path) -> list[Path]:
    """Move the files vLLM wrote for this session out of the staging folder into it."""
    moved = []
    prefix = f"{session_dir.name}_"
    for path in sorted(staging.glob(f"{prefix}*")):
        target = session_dir / path.name[len(prefix) :]
        shutil.move(str(path), target)
        moved.append(target)
    return moved


def _first_token_at(output: Any, submitted: float, fallback: float) -> float:
    """When the first token came, on this process's monotonic clock, for an output that vLLM
    sent whole at the end: its front end's first-token latency counts from its arrival,
    which is when `generate` was called (`submitted`)."""
    stats = getattr(output, "metrics", None)
    latency = float(getattr(stats, "first_token_latency", 0.0) or 0.0)
    return submitted + latency if latency > 0 else fallback


def _metrics(
    output: Any, arrived: float, first_token_at: float, prompt_len: int, generated: int
) -> RequestMetrics:
    now = time.monotonic()
    queue_time = 0.0
    stats = getattr(output, "metrics", None)
    if stats is not None and stats.scheduled_ts and stats.queued_ts:
        queue_time = max(0.0, float(stats.scheduled_ts - stats.queued_ts))
    return RequestMetrics(
        queue_time_s=queue_time,
        time_to_first_token_s=(first_token_at - arrived) if first_token_at else 0.0,
        prompt_tokens=prompt_len,
        generated_tokens=generated,
        duration_s=now - arrived,
    )


def _translate(exc: Exception, *, admitted: bool) -> Exception:
    """vLLM's errors as omnistage's, so the servicer maps them to the right status.

    Before vLLM has admitted a request (`admitted` False: nothing came back yet), a
    `ValueError` or `TypeError` is vLLM's input and sampling validation speaking (its
    `SamplingParams` and input processor raise those beside `VLLMValidationError`; `generate`
    wraps them in `EngineGenerateError`): the caller's to fix. Afterwards it is vLLM's own
    failure, and stays an internal error.
    """
    from vllm.exceptions import VLLMClientError, VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError as VllmDeadError
    from vllm.v1.engine.exceptions import EngineGenerateError

    if isinstance(exc, VllmDeadError):
        return EngineDeadError(f"the vLLM engine has died: {exc}")
    if isinstance(exc, VLLMValidationError):
        return InvalidRequestError(_validation_message(exc, exc.parameter))
    if isinstance(exc, VLLMClientError):
        return InvalidRequestError(f"vLLM refused the request: {exc}")
    cause = exc.__cause__ if isinstance(exc, EngineGenerateError) else exc
    if not admitted and isinstance(cause, (ValueError, TypeError)):
        return InvalidRequestError(_validation_message(cause, None))
    return exc


def _validation_message(exc: Exception, parameter: str | None) -> str:
    """vLLM's own words for a value it refuses (which name the value and its bounds), with
    the sampling field they concern, e.g. "sampling.temperature: temperature must be in
    [0, 2], got 2.5; use a value within vLLM's bounds"."""
    words = str(exc.args[0]) if exc.args else str(exc)
    where = f"sampling.{parameter}: " if parameter else "sampling: "
    return f"{where}{words.rstrip('.')}; use a value within vLLM's bounds for this field"


def _device_name() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        return "cpu"
