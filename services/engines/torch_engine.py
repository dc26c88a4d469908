"""The torch engine: a `TorchStageModel` behind the `Engine` protocol, with dynamic batching.

Requests are preprocessed on the event loop into one row each and put on an asyncio queue of
`max_inflight` (the stage's in-flight limit) places: the stage's servicer admits no more
requests than that, so the queue is never full for an admitted one; should it be (aborted
requests wait there until the batcher drops them), the request is refused with
RESOURCE_EXHAUSTED rather than wait, so nothing ever blocks on it. A batcher task takes up
to `max_batch_size` of them, waiting at most `max_wait_ms` after the first, concatenates
rows that share shape[1:] and dtype, and runs each such group as one engine step. When a
group's step fails, its requests run again one per step, so one bad request fails alone.
Every step, and every start and stop of torch.profiler, runs on one dedicated worker thread:
torch.profiler records only the thread that started it. Trace exports run on a thread of
their own, never the event loop's default executor.

A request's tensor is checked against the model's `input_spec` before `preprocess`. Each
output chunk is split along dim 0 below `DEFAULT_MAX_CHUNK_BYTES`, so every response message
stays under gRPC's default 4 MiB limit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.profiler import record_function

from omnistage.errors import (
    AlreadyExistsError,
    EngineDeadError,
    InvalidRequestError,
    OmnistageError,
    OverloadedError,
    echo,
)
from omnistage.tensors import DEFAULT_MAX_CHUNK_BYTES, split_tensor, validate_tensor
from omnistage.types import (
    EngineInfo,
    GenerateInput,
    OutputDelta,
    ProfileOptions,
    RequestMetrics,
    SamplingOptions,
    TensorData,
)
from services.config import StageConfig
from services.engines.torch_model import (
    TorchStageModel,
    input_spec,
    load_model,
    resolve_device,
    split_engine_options,
)
from services.engines.torch_profiler import StepProfiler, warm_up_profiler

logger = logging.getLogger(__name__)

T = TypeVar("T")
STEP_SPAN = "omnistage.step"
"""Each engine step is a `record_function` span named `omnistage.step batch=<n>`."""


@dataclass(eq=False)
class _Request:
    request_id: str
    row: torch.Tensor
    arrived: float
    result: asyncio.Future[list[TensorData] | None]  # None: aborted
    started: float = 0.0
    taken: bool = False
    cancelled: bool = False
    key: tuple[Any, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.key = (tuple(self.row.shape[1:]), self.row.dtype)


class TorchEngine:
    """Serves a `TorchStageModel` on one device, batching concurrent requests."""

    def __init__(self, config: StageConfig) -> None:
        self._config = config
        self._options, self._model_options = split_engine_options(
            config.engine_options, default_dtype=config.dtype
        )
        self._dtype: torch.dtype = getattr(torch, self._options.dtype)
        self._device = resolve_device(self._options.device, self._options.dtype)
        self._model: TorchStageModel | None = None
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(config.max_inflight)
        self._requests: dict[str, _Request] = {}
        self._batcher: asyncio.Task[None] | None = None
        self._dead: BaseException | None = None
        self._closed = False
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"torch-{config.name}")
        self._io = ThreadPoolExecutor(1, thread_name_prefix=f"torch-io-{config.name}")
        self._profiler = StepProfiler(
            config.profiler, stage=config.name, cuda=self._device.type == "cuda"
        )
        self.steps = 0
        """Engine steps (batched forwards) run so far."""
        self._on_step: Callable[[int, float], None] | None = None

    def observe_steps(self, observer: Callable[[int, float], None]) -> None:
        """Call `observer(batch_size, seconds)` after each step, on the event loop."""
        self._on_step = observer

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        started = time.monotonic()
        self._model = await self._on_worker(self._load)
        if self._config.profiler.enabled:
            await warm_up_profiler()
        self._batcher = asyncio.create_task(self._batch_loop(), name="torch-batcher")
        self._batcher.add_done_callback(self._on_batcher_done)
        logger.info(
            "torch model %s ready on %s (%s) in %.1f s; batches of up to %d, waiting %g ms",
            self._config.model,
            self._device,
            self._options.dtype,
            time.monotonic() - started,
            self._options.max_batch_size,
            self._options.max_wait_ms,
        )

    def _load(self) -> TorchStageModel:
        if self._options.num_threads is not None:
            torch.set_num_threads(self._options.num_threads)
        model = load_model(self._config.model, self._model_options)
        model.module.to(device=self._device, dtype=self._dtype).eval()
        return model

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._batcher is not None:
            self._batcher.cancel()
        self._fail_all(EngineDeadError(f"stage {self._config.name!r} is shutting down"))
        await self._on_worker(self._profiler.stop)
        await asyncio.to_thread(self._worker.shutdown, wait=True, cancel_futures=True)
        self._io.shutdown(wait=False)
        self._model = None

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="torch",
            model=self._config.model,
            running_requests=len(self._requests),
            engine_version=str(torch.__version__),
            device=str(self._device),
            dead_reason=f"the torch engine has died: {self._dead!r}" if self._dead else "",
        )

    # -- generation --------------------------------------------------------------------------

    async def generate(self, request: GenerateInput) -> AsyncIterator[OutputDelta]:
        arrived = time.monotonic()
        model = self._require_model()
        if request.request_id in self._requests:
            raise AlreadyExistsError(
                f"request_id {echo(request.request_id)} is already running; use a new id"
            )
        if request.tensor is not None:
            validate_tensor(request.tensor)
        spec = input_spec(model)
        if spec is not None:
            spec.check(request.tensor, other_inputs=request.input_kinds())
        row = model.preprocess(request)
        _check_row(row, self._config.model)
        item = _Request(
            request.request_id, row, arrived, asyncio.get_running_loop().create_future()
        )
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            raise OverloadedError(
                f"stage {self._config.name!r}: its request queue holds {self._queue.maxsize} "
                "requests (--max-inflight), aborted ones included until the batcher drops "
                "them; retry shortly",
                retry_after_ms=max(1, round(self._options.max_wait_ms)),
            ) from None
        self._requests[item.request_id] = item
        try:
            chunks = await item.result
            ready = time.monotonic()
            for chunk in chunks or ():
                yield OutputDelta(request_id=item.request_id, tensor=chunk)
            now = time.monotonic()
            yield OutputDelta(
                request_id=item.request_id,
                finished=True,
                finish_reason="stop" if chunks is not None else "abort",
                metrics=RequestMetrics(
                    queue_time_s=max(0.0, (item.started or ready) - arrived),
                    time_to_first_token_s=ready - arrived,
                    duration_s=now - arrived,
                ),
            )
        finally:
            item.cancelled = item.cancelled or not item.taken
            if self._requests.get(item.request_id) is item:
                del self._requests[item.request_id]

    def check_sampling(self, options: SamplingOptions) -> None:
        """A torch module has no sampling: the shared rules (`omnistage.validation`), which
        the servicer applies, are all there is to check."""
        self._require_model()

    async def abort(self, request_id: str) -> None:
        item = self._requests.get(request_id)
        if item is None:
            return
        item.cancelled = True
        if not item.result.done():
            item.result.set_result(None)

    def _require_model(self) -> TorchStageModel:
        if self._dead is not None:
            raise EngineDeadError(f"the torch engine has died: {self._dead!r}")
        if self._model is None:
            raise EngineDeadError(
                f"stage {self._config.name!r} is not serving yet: its model is still loading "
                "or has stopped; wait until its health check reports SERVING"
            )
        return self._model

    async def _batch_loop(self) -> None:
        while True:
            batch = await self._collect()
            groups: dict[tuple[Any, ...], list[_Request]] = {}
            for item in batch:
                groups.setdefault(item.key, []).append(item)
            for group in groups.values():
                await self._run_group(group)

    async def _collect(self) -> list[_Request]:
        """Up to max_batch_size live requests, waiting max_wait_ms after the first."""
        batch: list[_Request] = []
        while not batch:
            item = await self._queue.get()
            if not item.cancelled:
                batch.append(item)
        deadline = time.monotonic() + self._options.max_wait_ms / 1000
        while len(batch) < self._options.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                if remaining > 0:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                else:
                    item = self._queue.get_nowait()
            except (TimeoutError, asyncio.QueueEmpty):
                break
            if not item.cancelled:
                batch.append(item)
        return batch

    async def _run_group(self, group: list[_Request]) -> None:
        live = [item for item in group if not item.cancelled and not item.result.done()]
        if not live:
            return
        started = time.monotonic()
        for item in live:
            item.taken, item.started = True, started
        try:
            results = await self._on_worker(self._step, [item.row for item in live])
        except Exception as exc:  # noqa: BLE001 - each request gets it; its RPC logs and maps it
            if len(live) > 1:
                logger.warning(
                    "a batch of %d failed in the model (%r); running its requests one by one",
                    len(live),
                    exc,
                )
                for item in live:
                    await self._run_group([item])
                return
            if not live[0].result.done():  # the servicer logs it and answers its status
                live[0].result.set_exception(exc)
            return
        if self._on_step is not None:
            self._on_step(len(live), time.monotonic() - started)
        for item, result in zip(live, results, strict=True):
            if item.result.done():
                continue
            if isinstance(result, OmnistageError):
                item.result.set_exception(result)
            else:
                item.result.set_result(result)

    def _step(self, rows: list[torch.Tensor]) -> list[list[TensorData] | OmnistageError]:
        """One batched forward and the postprocessing of its items, on the worker thread."""
        model = self._require_model()
        self._profiler.before_step()
        try:
            with torch.inference_mode(), record_function(f"{STEP_SPAN} batch={len(rows)}"):
                with record_function("omnistage.collate"):
                    batch = torch.cat(rows).to(self._device)
                    if batch.is_floating_point():
                        batch = batch.to(self._dtype)
                with record_function("omnistage.forward"):
                    output = model.module(batch)
                if not isinstance(output, torch.Tensor) or output.shape[:1] != (len(rows),):
                    raise TypeError(
                        f"{self._config.model}: the module must return a tensor with one row "
                        f"per input row ({len(rows)}); got {_describe(output)}"
                    )
                with record_function("omnistage.postprocess"):
                    host = output.cpu()
                    results: list[list[TensorData] | OmnistageError] = []
                    for index in range(len(rows)):
                        try:
                            chunks = model.postprocess(host[index : index + 1])
                            results.append(_split_chunks(chunks, self._config.model))
                        except OmnistageError as exc:
                            results.append(exc)
            self.steps += 1
            return results
        finally:
            self._profiler.after_step()

    def _on_batcher_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        self._dead = task.exception()
        logger.error("the torch batcher stopped: %r", self._dead, exc_info=self._dead)
        self._fail_all(EngineDeadError(f"the torch engine has died: {self._dead!r}"))

    def _fail_all(self, error: OmnistageError) -> None:
        for item in self._requests.values():
            if not item.result.done():
                item.result.set_exception(error)

    async def _on_worker(self, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    # -- profiling ---------------------------------------------------------------------------

    async def start_profile(self, session_dir: Path, options: ProfileOptions) -> None:
        self._require_model()
        await self._on_worker(self._profiler.start, options)

    async def stop_profile(self, session_dir: Path) -> list[Path]:
        recorded = await self._on_worker(self._profiler.stop)
        if recorded is None:
            logger.warning("the profiler recorded no step: no trace for %s", session_dir.name)
            return []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._io, self._profiler.export, recorded, session_dir)


def _check_row(row: object, model: str) -> None:
    if not isinstance(row, torch.Tensor) or row.dim() < 1 or row.shape[0] != 1:
        raise TypeError(
            f"{model}: preprocess must return a torch.Tensor with a leading batch dim of 1; "
            f"got {_describe(row)}"
        )


def _split_chunks(chunks: list[TensorData], model: str) -> list[TensorData]:
    """Every chunk of `postprocess`, split along dim 0 below DEFAULT_MAX_CHUNK_BYTES."""
    pieces: list[TensorData] = []
    for number, chunk in enumerate(chunks):
        if not isinstance(chunk, TensorData):
            raise TypeError(
                f"{model}: postprocess must return a list of TensorData (see "
                f"omnistage.tensors.tensor_from_torch); chunk {number} is {_describe(chunk)}"
            )
        try:
            pieces.extend(split_tensor(chunk, DEFAULT_MAX_CHUNK_BYTES))
        except InvalidRequestError as exc:  # the model's output, not the caller's input
            raise OmnistageError(
                f"{model}: postprocess chunk {number} cannot be sent: {exc}. Return chunks "
                f"whose rows along dim 0 are at most {DEFAULT_MAX_CHUNK_BYTES} bytes"
            ) from exc
    return pieces


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {list(value.shape)}"
    return type(value).__name__
