"""Fake stages for the runner's unit tests: a talker that yields tokens and a code2wav that
echoes them, picked from a pool without gRPC."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from omnistage.errors import InvalidRequestError
from omnistage.tensors import tensor_from_numpy
from omnistage.types import GenerateInput, OutputDelta, RequestMetrics, SamplingOptions


@dataclass
class FakeStage:
    """Stage 'talker' yields `tokens` one by one; 'code2wav' echoes each token id × 10."""

    name: str
    tokens: int = 10
    delay: float = 0.002
    fail_on_call: int | None = None
    tensors: bool = False  # talker: send each token as a tensor, as a torch stage would
    finish_reason: str = "stop"  # "abort": the stage ended the request early on its own
    calls: list[GenerateInput] = field(default_factory=list)
    timeouts: list[float | None] = field(default_factory=list)  # each call's gRPC deadline
    metadata: list[dict[str, str]] = field(default_factory=list)  # each call's (traceparent)
    active: int = 0
    cancelled: int = 0
    refuse_sampling: str = ""  # ValidateSampling's INVALID_ARGUMENT message, when set
    validated: list[SamplingOptions] = field(default_factory=list)  # each ValidateSampling's

    async def validate_sampling(self, options: SamplingOptions, *, timeout: float = 5.0) -> None:
        self.validated.append(options)
        if self.refuse_sampling:
            raise InvalidRequestError(self.refuse_sampling)

    async def generate(
        self,
        request: GenerateInput,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        shared: object = None,  # a request's shared-memory session: fakes share no domain
        shared_output: bool = False,
    ) -> AsyncIterator[OutputDelta]:
        self.calls.append(request)
        self.timeouts.append(timeout)
        self.metadata.append(dict(metadata))
        self.active += 1
        try:
            if self.fail_on_call == len(self.calls) - 1:
                raise InvalidRequestError("codes must lie in [0, 1024)")
            ids = list(range(self.tokens)) if self.name == "talker" else list(request.token_ids)
            for token in ids:
                await asyncio.sleep(self.delay)  # a stage's time per token: behaviour, not a wait
                out = token if self.name == "talker" else token * 10
                if self.tensors:
                    tensor = tensor_from_numpy(np.array([out], dtype=np.int64))
                    yield OutputDelta(request_id=request.request_id, tensor=tensor)
                    continue
                yield OutputDelta(request_id=request.request_id, token_ids=(out,), text=f"{out} ")
            metrics = RequestMetrics(prompt_tokens=1, generated_tokens=len(ids))
            yield OutputDelta(
                request.request_id, finished=True, finish_reason=self.finish_reason, metrics=metrics
            )
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.active -= 1


@dataclass
class FakeReplica:
    client: Any  # a FakeStage, or another fake with its `generate`
    address: str
    health: str = "SERVING"


class FakePool:
    """One replica per stage, each always picked; health marks are ignored."""

    def __init__(self, **stages: Any) -> None:
        self.stages = stages

    async def pick(self, stage: str, *, exclude: object = ()) -> FakeReplica:
        return FakeReplica(self.stages[stage], f"fake/{stage}")

    def mark(self, replica: FakeReplica, health: str) -> None:
        pass

    def replicas(self, stage: str) -> list[FakeReplica]:
        return [FakeReplica(self.stages[stage], f"fake/{stage}")]
