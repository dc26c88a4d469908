"""Audio out of a pipeline: waveform chunks (float tensors in [-1, 1]) into a WAV file.

from omnistage.audio import write_wav
chunks = [out.tensor for out in client.generate(...) if out.final and out.tensor]
info = write_wav("answer.wav", chunks, sample_rate=24_000)
print(f"{info.duration_s:.2f} s")
"""

from __future__ import annotations

import io
import wave
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omnistage.errors import InvalidRequestError
from omnistage.tensors import tensor_to_numpy
from omnistage.types import TensorData

DEFAULT_SAMPLE_RATE = 24_000


@dataclass(frozen=True)
class WavInfo:
    """What `write_wav` wrote."""

    path: Path
    sample_rate: int
    samples: int

    @property
    def duration_s(self) -> float:
        return self.samples / self.sample_rate


def mono_samples(chunks: Iterable[TensorData | np.ndarray[Any, Any]]) -> np.ndarray[Any, Any]:
    """The chunks joined in order as one float32 mono waveform."""
    pieces: list[np.ndarray[Any, Any]] = []
    for number, chunk in enumerate(chunks):
        array = tensor_to_numpy(chunk) if isinstance(chunk, TensorData) else np.asarray(chunk)
        if not np.issubdtype(array.dtype, np.floating):
            raise InvalidRequestError(
                f"audio chunk {number} is {array.dtype}; write_wav takes float samples in [-1, 1]"
            )
        if sum(1 for d in array.shape if d != 1) > 1:
            raise InvalidRequestError(
                f"audio chunk {number} has shape {list(array.shape)}; write_wav takes mono "
                "audio: one axis of samples, e.g. [T] or [1, T]"
            )
        pieces.append(array.reshape(-1).astype(np.float32))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)


def write_wav(
    path: str | Path,
    chunks: Iterable[TensorData | np.ndarray[Any, Any]],
    sample_rate: int = DEFAULT_SAMPLE_RATE,
) -> WavInfo:
    """Write float chunks, in order, as a 16-bit PCM mono WAV file (clipped to [-1, 1])."""
    samples = mono_samples(chunks)
    data = wav_bytes(samples, sample_rate)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return WavInfo(path=target, sample_rate=sample_rate, samples=int(samples.shape[0]))


def wav_bytes(samples: np.ndarray[Any, Any], sample_rate: int = DEFAULT_SAMPLE_RATE) -> bytes:
    """A mono float waveform as the bytes of a 16-bit PCM WAV file (clipped to [-1, 1])."""
    if sample_rate < 1:
        raise InvalidRequestError(f"sample_rate must be ≥ 1 Hz (got {sample_rate})")
    pcm = np.round(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.tobytes())
    return buffer.getvalue()
