"""Your own PyTorch stage in one file: a latent decoder, latents [4, H, W] in, an RGB image out.

    omnistage stage serve --name decoder --engine torch \\
        --model examples.custom_torch.decoder:build --engine-options '{"seed": 1}'

The factory returns a `TorchStageModel`: the module, `preprocess` (one request → one input row
with a leading batch dim of 1), `postprocess` (one output row → response tensors) and an
`input_spec` that the engine checks every request's tensor against, so `preprocess` needs no
checks of its own. Weights are random (seeded); load a checkpoint in `build` for real ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from omnistage.tensors import TensorSpec, tensor_from_torch, tensor_to_torch
from omnistage.types import GenerateInput, TensorData

SCALE = 8
"""Image pixels per latent along each axis."""


class LatentDecoder:
    input_spec = TensorSpec(dtypes=("float32",), shapes=((4, "H", "W"),))

    def __init__(self) -> None:
        self.module = nn.Sequential(
            nn.Conv2d(4, 32, kernel_size=3, padding=1),
            nn.SiLU(),
            nn.Upsample(scale_factor=SCALE),
            nn.Conv2d(32, 3, kernel_size=3, padding=1),
            nn.Sigmoid(),
        )

    def preprocess(self, request: GenerateInput) -> torch.Tensor:
        assert request.tensor is not None  # input_spec requires one: float32 [4, H, W]
        return tensor_to_torch(request.tensor).unsqueeze(0)  # [1, 4, H, W]

    def postprocess(self, output: torch.Tensor) -> list[TensorData]:
        return [tensor_from_torch(output[0].permute(1, 2, 0))]  # [8H, 8W, 3] in [0, 1]


def build(options: dict[str, Any]) -> LatentDecoder:
    """The factory; `options` are the `--engine-options` keys the engine does not use."""
    torch.manual_seed(int(options.get("seed", 0)))
    return LatentDecoder()
