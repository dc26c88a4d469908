"""A code2wav vocoder for the omni pipeline: codec codes in, a 24 kHz mono waveform out.

Serve it with a torch stage:

    omnistage stage serve --name code2wav --engine torch --model examples.omni.code2wav:build

The weights are random (seeded by the `seed` engine option), so the audio is noise, but the
shapes, dtypes, costs and batching behave as a real convolutional decoder's would: each code
becomes HOP_LENGTH samples through an embedding, transposed convolutions and a tanh.

The decoder is frame-local: each code's HOP_LENGTH samples depend on that code alone. So codes
decoded in chunks (the pipeline's streaming hand-off) give exactly the samples of one decode of
them all. A real vocoder looks across frames; stream it with overlapping chunks instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from omnistage.errors import InvalidRequestError
from omnistage.tensors import TensorSpec, tensor_from_torch, tensor_to_torch
from omnistage.types import GenerateInput, TensorData

SAMPLE_RATE = 24_000
"""Samples per second of the output waveform."""
HOP_LENGTH = 480
"""Samples per code: 50 codes make one second of audio."""
CODEBOOK_SIZE = 1024
"""Codes lie in [0, CODEBOOK_SIZE)."""
EMBED_DIM = 128
UPSAMPLE_STRIDES = (8, 6, 5, 2)  # their product is HOP_LENGTH
CHUNK_SAMPLES = SAMPLE_RATE
"""The waveform streams back in chunks of one second (the last one may be shorter)."""
DEFAULT_MAX_CODES = 3000
"""At most one minute of audio per request unless the `max_codes` option says otherwise."""


class Code2WavDecoder(nn.Module):
    """[B, T] int64 codes → [B, 1, T * HOP_LENGTH] float waveform in [-1, 1], frame by frame."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(CODEBOOK_SIZE, EMBED_DIM)
        self.pre = nn.Conv1d(EMBED_DIM, EMBED_DIM, kernel_size=1)
        layers: list[nn.Module] = []
        channels = EMBED_DIM
        for stride in UPSAMPLE_STRIDES:
            out = channels // 2
            layers += [
                nn.LeakyReLU(0.1),
                nn.ConvTranspose1d(channels, out, kernel_size=stride, stride=stride),
                nn.LeakyReLU(0.1),
                nn.Conv1d(out, out, kernel_size=7, padding=3),
            ]
            channels = out
        self.upsample = nn.Sequential(*layers)
        self.post = nn.Conv1d(channels, 1, kernel_size=7, padding=3)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        batch, frames = codes.shape
        hidden = self.embed(codes).reshape(batch * frames, EMBED_DIM, 1)  # one frame per row
        hidden = self.upsample(self.pre(hidden))  # [B * T, C, HOP_LENGTH]
        wave = torch.tanh(self.post(hidden))  # [B * T, 1, HOP_LENGTH]
        return wave.reshape(batch, 1, frames * HOP_LENGTH)


class Code2Wav:
    """The `TorchStageModel` of the decoder: validates codes, streams the waveform."""

    input_spec = TensorSpec(dtypes=("int64", "int32"), shapes=(("T",), (1, "T")), required=False)
    """A tensor of codes; the engine refuses any other. token_ids are codes too."""

    def __init__(self, *, max_codes: int = DEFAULT_MAX_CODES) -> None:
        self.module: nn.Module = Code2WavDecoder()
        self.max_codes = max_codes

    def preprocess(self, request: GenerateInput) -> torch.Tensor:
        if request.tensor is not None:  # it fits input_spec
            codes = tensor_to_torch(request.tensor).to(torch.int64).reshape(1, -1)
        elif request.token_ids:
            codes = torch.tensor(request.token_ids, dtype=torch.int64).unsqueeze(0)
        else:
            raise InvalidRequestError(
                f"code2wav takes codes: an int64 tensor of shape [T] or [1, T], or token_ids; "
                f"got {', '.join(request.input_kinds()) or 'no input'}"
            )
        count = codes.shape[1]
        if not 1 <= count <= self.max_codes:
            raise InvalidRequestError(
                f"code2wav takes 1 to {self.max_codes} codes per request (got {count}); "
                "split longer audio into several requests"
            )
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= CODEBOOK_SIZE:
            raise InvalidRequestError(
                f"codes must lie in [0, {CODEBOOK_SIZE}), the codebook; got values from "
                f"{low} to {high}"
            )
        return codes

    def postprocess(self, output: torch.Tensor) -> list[TensorData]:
        samples = output.reshape(-1).to(torch.float32).contiguous()
        chunks = []
        for start in range(0, samples.shape[0], CHUNK_SAMPLES):
            chunks.append(tensor_from_torch(samples[start : start + CHUNK_SAMPLES]))
        return chunks


def build(options: dict[str, Any]) -> Code2Wav:
    """The factory named by `--model examples.omni.code2wav:build`.

    Options (from `--engine-options`): `seed` (default 0) for the random weights, and
    `max_codes` (default 3000) per request.
    """
    unknown = set(options) - {"seed", "max_codes"}
    if unknown:
        raise InvalidRequestError(
            f"code2wav does not know the option(s) {', '.join(sorted(unknown))}; "
            "it takes seed and max_codes"
        )
    torch.manual_seed(int(options.get("seed", 0)))
    return Code2Wav(max_codes=int(options.get("max_codes", DEFAULT_MAX_CODES)))
