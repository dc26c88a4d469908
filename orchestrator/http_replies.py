"""What the HTTP front door answers: a pipeline's events folded into OpenAI's objects.

The text of the reply is one stage's (the text stage: the last stage whose engine makes text,
or the one the server was told to use). When the final stage sends float tensors, they are the
reply's audio, as vLLM-Omni's OpenAI server gives it: `message.audio` holds the whole answer as
one base64 WAV file, and each streamed `delta.audio` one piece of it as a WAV file of its own.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from omnistage.audio import mono_samples, wav_bytes
from omnistage.types import RequestMetrics, TensorData
from orchestrator.stage_call import StageEvent

AUDIO_DTYPES = frozenset({"float32", "float16", "float64"})
AUDIO_TTL_S = 3600  # OpenAI's `expires_at` of an audio answer; nothing is kept here
Kind = Literal["chat", "completion"]


@dataclass(frozen=True)
class ReplyShape:
    """What one reply is: its kind, the names it carries, and where its parts come from."""

    kind: Kind
    model: str
    request_id: str
    text_stage: str
    final_stage: str
    sample_rate: int
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def id(self) -> str:
        return f"{'chatcmpl' if self.kind == 'chat' else 'cmpl'}-{self.request_id}"

    @property
    def object(self) -> str:
        return "chat.completion" if self.kind == "chat" else "text_completion"


class PipelineReply:
    """Folds a pipeline's events into a reply; `add` returns the streamed pieces of one."""

    def __init__(self, shape: ReplyShape) -> None:
        self.shape = shape
        self._text: list[str] = []
        self._audio: list[TensorData] = []
        self._finish_reason = ""
        self._metrics: dict[str, tuple[int, RequestMetrics]] = {}

    def add(self, event: StageEvent) -> list[dict[str, Any]]:
        """Take one event; return the deltas it makes: {"content": ...} or {"audio": ...}."""
        delta, pieces = event.delta, list[dict[str, Any]]()
        if event.stage == self.shape.text_stage and delta.text:
            self._text.append(delta.text)
            pieces.append({"content": delta.text})
        tensor = delta.tensor
        audio = tensor is not None and tensor.dtype in AUDIO_DTYPES
        if event.stage == self.shape.final_stage and tensor is not None and audio:
            self._audio.append(tensor)
            pieces.append({"audio": self._audio_object([tensor])})
        if delta.finished:
            if delta.metrics is not None:
                self._metrics[event.stage] = (event.stage_index, delta.metrics)
            if event.stage == self.shape.text_stage or not self._finish_reason:
                self._finish_reason = delta.finish_reason
        return pieces

    @property
    def finish_reason(self) -> str:
        reason = self._finish_reason or "stop"
        return "stop" if reason == "abort" else reason

    def usage(self) -> dict[str, Any]:
        """Tokens from the stages' metrics: the first stage's prompt, the text stage's
        output; `stages` has every stage's own counts."""
        ordered = sorted(self._metrics.items(), key=lambda item: item[1][0])
        prompt = ordered[0][1][1].prompt_tokens if ordered else 0
        text = self._metrics.get(self.shape.text_stage)
        completion = text[1].generated_tokens if text else 0
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "stages": [
                {
                    "stage": name,
                    "prompt_tokens": metrics.prompt_tokens,
                    "completion_tokens": metrics.generated_tokens,
                }
                for name, (_, metrics) in ordered
            ],
        }

    def _audio_object(self, tensors: list[TensorData]) -> dict[str, Any]:
        data = wav_bytes(mono_samples(tensors), self.shape.sample_rate)
        return {
            "id": f"audio-{self.shape.request_id}",
            "data": base64.b64encode(data).decode("ascii"),
            "format": "wav",
            "sample_rate": self.shape.sample_rate,
            "expires_at": self.shape.created + AUDIO_TTL_S,
            "transcript": "",
        }

    def whole(self) -> dict[str, Any]:
        """The non-streamed reply: one choice with all the text (and the audio)."""
        text = "".join(self._text)
        choice: dict[str, Any] = {"index": 0, "finish_reason": self.finish_reason}
        if self.shape.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self._audio:
                message["audio"] = self._audio_object(self._audio)
            choice |= {"message": message, "logprobs": None}
        else:
            choice |= {"text": text, "logprobs": None}
        return self._envelope(self.shape.object, [choice]) | {"usage": self.usage()}

    def chunk(
        self, delta: dict[str, Any] | None = None, *, finish_reason: str | None = None
    ) -> dict[str, Any]:
        """One streamed chunk with one delta (or none: a chunk that only ends the choice)."""
        delta = delta or {}
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.shape.kind == "chat":
            choice["delta"] = delta
            body = self._envelope("chat.completion.chunk", [choice])
            body["modality"] = "audio" if "audio" in delta else "text"
            return body
        return self._envelope("text_completion", [choice | {"text": delta.get("content", "")}])

    def usage_chunk(self) -> dict[str, Any]:
        """The last chunk of a stream asked for with `stream_options.include_usage`."""
        kind = "chat.completion.chunk" if self.shape.kind == "chat" else "text_completion"
        return self._envelope(kind, []) | {"usage": self.usage()}

    def _envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.shape.id,
            "object": kind,
            "created": self.shape.created,
            "model": self.shape.model,
            "choices": choices,
        }


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()
