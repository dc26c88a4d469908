"""A torch stage model that tests can hold in flight: `tests.gate_model:build`.

With the engine option `gate` (a FIFO's path), every forward reads one byte from that FIFO
before it runs, so while a test holds the FIFO open for writing, each byte it writes lets one
forward through. With no writer, reads see end-of-file at once and forwards run freely.
The output is the request's token_ids, doubled, as float32.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch

from omnistage.tensors import tensor_from_torch
from omnistage.types import GenerateInput, TensorData


class _Gated(torch.nn.Module):
    def __init__(self, gate_fd: int | None) -> None:
        super().__init__()
        self.gate_fd = gate_fd

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        if self.gate_fd is not None:
            os.read(self.gate_fd, 1)  # blocks while a writer holds the FIFO and sent nothing
        return rows * 2


class GatedModel:
    def __init__(self, gate_fd: int | None) -> None:
        self.module: torch.nn.Module = _Gated(gate_fd)

    def preprocess(self, request: GenerateInput) -> torch.Tensor:
        return torch.tensor([list(request.token_ids)], dtype=torch.float32)

    def postprocess(self, output: torch.Tensor) -> list[TensorData]:
        return [tensor_from_torch(output[0])]


def build(options: dict[str, Any]) -> GatedModel:
    gate = options.get("gate")
    if not gate:
        return GatedModel(None)
    fd = os.open(str(gate), os.O_RDONLY | os.O_NONBLOCK)  # a FIFO's open waits for a writer
    os.set_blocking(fd, True)
    return GatedModel(fd)


class Gate:
    """The test's end of a gate FIFO: `hold()` stops forwards, `release(n)` lets n through,
    `free()` lets every forward run."""

    def __init__(self, path: str) -> None:
        os.mkfifo(path)
        self.path = path
        self._fd: int | None = None

    def hold(self) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY)  # the stage holds the read end

    def release(self, count: int) -> None:
        assert self._fd is not None, "hold() the gate first"
        os.write(self._fd, b"x" * count)

    def free(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def gated_stage_args(name: str, gate: Gate, *, max_inflight: int) -> list[str]:
    """`omnistage stage serve` arguments for a torch stage of this model, one request a step."""
    options = {"gate": gate.path, "max_batch_size": 1, "max_wait_ms": 0, "num_threads": 1}
    return [
        *("stage", "serve", "--name", name, "--engine", "torch"),
        *("--model", "tests.gate_model:build", "--port", "0", "--host", "127.0.0.1"),
        *("--engine-options", json.dumps(options), "--max-inflight", str(max_inflight)),
        *("--grace-seconds", "5"),
    ]
