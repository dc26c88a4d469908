"""Torch stage models for tests of the torch engine in process, loaded by their
`module:factory` path as a user's model would be (tests/integration/test_torch_stage.py)."""

from __future__ import annotations

import threading
from typing import Any

import torch

from omnistage.errors import InvalidRequestError
from omnistage.tensors import tensor_from_torch
from omnistage.types import GenerateInput, TensorData

GATE = threading.Event()
"""Each forward of GatedModel waits for it, so tests decide when steps finish."""
ENTERED = threading.Event()
"""Set by GatedModel's forward once it runs, so tests know a step is under way."""


class _GatedDouble(torch.nn.Module):
    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        ENTERED.set()
        GATE.wait(30)
        return rows * 2


class GatedModel:
    """Doubles token_ids; each forward waits for GATE, so tests decide when steps finish."""

    def __init__(self) -> None:
        self.module: torch.nn.Module = _GatedDouble()

    def preprocess(self, request: GenerateInput) -> torch.Tensor:
        return torch.tensor([list(request.token_ids)], dtype=torch.float32)

    def postprocess(self, output: torch.Tensor) -> list[TensorData]:
        return [tensor_from_torch(output[0])]


def build_gated(options: dict[str, Any]) -> GatedModel:
    return GatedModel()


FORWARDS: list[tuple[int, bool, bool]] = []
"""Each forward of RecordingModel: (batch size, inference mode on, grad on)."""


class _Recording(torch.nn.Module):
    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        FORWARDS.append((rows.shape[0], torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
        if (rows < 0).any():
            raise RuntimeError("a negative row broke the forward")
        if (rows == 13).any():
            raise InvalidRequestError("13 is not a valid value")
        return rows * 2


class RecordingModel:
    """Doubles token_ids and records every forward in FORWARDS. A row with a negative value
    fails the forward (a bug), one with 13 fails it with InvalidRequestError. With `wide`,
    postprocess returns one 4 MiB row, too large a chunk to send."""

    def __init__(self, *, wide: bool) -> None:
        self.module: torch.nn.Module = _Recording()
        self.wide = wide

    def preprocess(self, request: GenerateInput) -> torch.Tensor:
        return torch.tensor([list(request.token_ids)], dtype=torch.float32)

    def postprocess(self, output: torch.Tensor) -> list[TensorData]:
        if self.wide:
            return [tensor_from_torch(torch.zeros(1, 1 << 20))]
        return [tensor_from_torch(output[0])]


def build_recording(options: dict[str, Any]) -> RecordingModel:
    return RecordingModel(wide=bool(options.get("wide", False)))


def build_wrong(options: dict[str, Any]) -> torch.nn.Module:
    return torch.nn.Linear(1, 1)  # a module, not a TorchStageModel
