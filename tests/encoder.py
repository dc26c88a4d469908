"""A second torch stage for multi-host tests: an audio encoder after code2wav.

`build` (a torch stage factory): float audio [N] (N a multiple of HOP_LENGTH) in, one feature
row per HOP_LENGTH samples out ([N / HOP_LENGTH, FEATURES]), random seeded weights. A request
whose id starts with `slow-` holds its engine step for SLOW_S seconds, so a test can cut a link
while the request is in flight. `audio_in` is the pipeline edge from code2wav's audio chunks.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from omnistage.errors import InvalidRequestError
from omnistage.tensors import TensorSpec, tensor_from_numpy, tensor_to_numpy
from omnistage.types import GenerateInput, TensorData
from orchestrator.config import InputConfig
from orchestrator.processors import StageOutput

HOP_LENGTH = 480
FEATURES = 16
SLOW_S = 12.0
SLOW_STEP_LOG = "encoder: holding a slow step"
"""Logged when a slow step begins, so a test knows the request is in flight in the engine."""
logger = logging.getLogger(__name__)


def audio_in(output: StageOutput, original: GenerateInput, config: InputConfig) -> GenerateInput:
    """code2wav's audio chunks, joined, as the encoder's input; the request id carries over."""
    if not output.tensors:
        raise InvalidRequestError(f"stage {output.stage!r} gave no audio to encode")
    audio = np.concatenate([tensor_to_numpy(t).reshape(-1) for t in output.tensors])
    return GenerateInput(request_id=original.request_id, tensor=tensor_from_numpy(audio))


def build(options: dict[str, Any]) -> Any:
    import torch
    from torch import nn

    from omnistage.tensors import tensor_from_torch, tensor_to_torch

    class Frames(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.project = nn.Linear(HOP_LENGTH, FEATURES)
            self.slow_steps = 0

        def forward(self, audio: torch.Tensor) -> torch.Tensor:
            if self.slow_steps:  # on the engine's worker thread: health still answers
                self.slow_steps -= 1
                logger.warning("%s for %g s", SLOW_STEP_LOG, SLOW_S)
                time.sleep(SLOW_S)  # the step is slow on purpose: behaviour, not a wait
            frames = audio.reshape(audio.shape[0], -1, HOP_LENGTH)
            return torch.tanh(self.project(frames))

    class Encoder:
        input_spec = TensorSpec(dtypes=("float32",), shapes=(("N",),))

        def __init__(self) -> None:
            self.frames = Frames()
            self.module: nn.Module = self.frames

        def preprocess(self, request: GenerateInput) -> torch.Tensor:
            assert request.tensor is not None  # input_spec requires it
            audio = tensor_to_torch(request.tensor).reshape(1, -1)
            if audio.shape[1] % HOP_LENGTH:
                raise InvalidRequestError(f"audio length must be a multiple of {HOP_LENGTH}")
            if request.request_id.startswith("slow-"):
                self.frames.slow_steps += 1
            return audio

        def postprocess(self, output: torch.Tensor) -> list[TensorData]:
            return [tensor_from_torch(output[0].contiguous())]

    torch.manual_seed(int(options.get("seed", 0)))
    return Encoder()
