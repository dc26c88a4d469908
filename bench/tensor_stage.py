"""Torch stages for the tensor benchmarks and the shared-memory tests.

`build`: an identity stage for bench/tensor_transfer.py: the request's tensor comes back
unchanged, in the chunks a real stage would stream (under gRPC's default message limit).
`build_source` and `build_sink`: the two ends of a stage-to-stage hand-off
(bench/shm_handoff.py, tests/integration/test_shared_memory.py).

    omnistage stage serve --name identity --engine torch --model bench.tensor_stage:build
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from omnistage.errors import InvalidRequestError
from omnistage.tensors import split_tensor, tensor_from_torch, tensor_to_torch
from omnistage.types import GenerateInput, TensorData


class IdentityStage:
    """A `TorchStageModel` whose module returns its input."""

    def __init__(self) -> None:
        self.module: nn.Module = nn.Identity()

    def preprocess(self, request: GenerateInput) -> torch.Tensor:
        if request.tensor is None:
            raise InvalidRequestError("the identity stage takes a tensor")
        return tensor_to_torch(request.tensor).unsqueeze(0)

    def postprocess(self, output: torch.Tensor) -> list[TensorData]:
        return split_tensor(tensor_from_torch(output[0]))


def build(options: dict[str, Any]) -> IdentityStage:
    if options:
        raise InvalidRequestError(f"the identity stage takes no options (got {sorted(options)})")
    return IdentityStage()


class SourceStage:
    """Makes a float32 tensor of `token_ids[0]` MiB (rows of 1024) from nothing: stage A of a
    hand-off. Its first two floats carry the wall clock (ns, as int64) when its output is
    ready, so that the sink can time the hand-off; the rest counts up."""

    def __init__(self) -> None:
        self.module: nn.Module = nn.Identity()

    def preprocess(self, request: GenerateInput) -> torch.Tensor:
        if len(request.token_ids) != 1 or request.token_ids[0] < 1:
            raise InvalidRequestError("the source stage takes token_ids [MiB], MiB ≥ 1")
        return torch.tensor([[request.token_ids[0]]], dtype=torch.float32)

    def postprocess(self, output: torch.Tensor) -> list[TensorData]:
        rows = int(output[0, 0]) * 256
        array = np.arange(rows * 1024, dtype=np.float32).reshape(rows, 1024)
        array.view(np.int64)[0, 0] = time.time_ns()
        return [TensorData("float32", (rows, 1024), memoryview(array).cast("B"))]


class SinkStage:
    """Takes a tensor and answers int64 [arrival - the source's clock in ns, the same after
    reading every byte once, its element count]: stage B of a hand-off. With `delay_s`, its
    forward sleeps that long first (a request held in flight, for fault tests)."""

    def __init__(self, delay_s: float) -> None:
        self.module: nn.Module = _Sleep(delay_s)

    def preprocess(self, request: GenerateInput) -> torch.Tensor:
        arrived = time.time_ns()
        if request.tensor is None:
            raise InvalidRequestError("the sink stage takes a tensor")
        view = np.frombuffer(request.tensor.data, dtype=np.float32)
        sent = int(view[:2].view(np.int64)[0])
        float(view.sum())  # read every byte once
        read = time.time_ns()
        return torch.tensor([[arrived - sent, read - sent, view.size]], dtype=torch.int64)

    def postprocess(self, output: torch.Tensor) -> list[TensorData]:
        return [tensor_from_torch(output[0])]


class _Sleep(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.seconds:
            time.sleep(self.seconds)
        return rows


def build_source(options: dict[str, Any]) -> SourceStage:
    if options:
        raise InvalidRequestError(f"the source stage takes no options (got {sorted(options)})")
    return SourceStage()


def build_sink(options: dict[str, Any]) -> SinkStage:
    unknown = sorted(set(options) - {"delay_s"})
    if unknown:
        raise InvalidRequestError(f"the sink stage takes only delay_s (got {unknown})")
    return SinkStage(float(options.get("delay_s", 0.0)))
