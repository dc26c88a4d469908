"""An identity torch stage for the tensor-transfer benchmark: the request's tensor comes back
unchanged, in the chunks a real stage would stream (under gRPC's default message limit).

    omnistage stage serve --name identity --engine torch --model bench.tensor_stage:build
"""

from __future__ import annotations

from typing import Any

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
