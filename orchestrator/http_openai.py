"""The OpenAI side of the HTTP front door: request bodies and their mapping onto one pipeline
request. The fields' types are checked here; their values by omnistage.validation, the rules
every front door shares, so a bad temperature reads the same over HTTP as over gRPC."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omnistage.errors import InvalidRequestError, echo
from omnistage.types import ChatTurn, GenerateInput, SamplingOptions
from omnistage.validation import Sampling, validate_generate_input

SAMPLING_KEYS = tuple(Sampling.model_fields)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = Field(default=False, description="End with a chunk of usage.")


class _OpenAIRequest(BaseModel):
    """What chat and completions share. Fields this server does not know are accepted and
    ignored, as OpenAI's SDKs send some by default; those that would change the answer and
    are not supported are refused by `check_supported`."""

    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    logprobs: bool | int | None = None
    # Not OpenAI's: vLLM's extra sampling fields, and omnistage's per-stage overrides.
    top_k: int | None = None
    ignore_eos: bool | None = None
    stage_sampling: dict[str, dict[str, Any]] | None = None

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise InvalidRequestError(f"n must be 1: one choice per request (got {self.n})")
        if self.logprobs:
            raise InvalidRequestError("logprobs are not supported yet; leave logprobs unset")

    def max_new_tokens(self) -> int | None:
        return self.max_tokens

    def sampling(self) -> SamplingOptions:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingOptions(
            max_tokens=self.max_new_tokens(),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
        )

    def stage_overrides(self) -> dict[str, SamplingOptions]:
        """`stage_sampling` as options; each stage's values are checked by the runner."""
        overrides = {}
        for stage, raw in (self.stage_sampling or {}).items():
            unknown = sorted(set(raw) - set(SAMPLING_KEYS))
            if unknown:
                raise InvalidRequestError(
                    f"stage_sampling[{stage!r}] has unknown keys {unknown}; the keys are "
                    f"{list(SAMPLING_KEYS)}"
                )
            if isinstance(raw.get("stop"), str):
                raw = {**raw, "stop": [raw["stop"]]}
            try:
                typed = _SamplingTypes.model_validate(raw)
            except ValidationError as exc:
                raise InvalidRequestError(
                    f"stage_sampling[{stage!r}]: {describe_errors(exc.errors(include_url=False))}"
                ) from None
            overrides[stage] = SamplingOptions(
                **typed.model_dump(exclude={"stop"}), stop=tuple(typed.stop or ())
            )
        return overrides


class _SamplingTypes(BaseModel):
    """The types of a `stage_sampling` entry (its values follow `Sampling`'s rules)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self, index: int) -> str:
        """The content as text; of a list of parts, the text parts joined."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequestError(
                    f"messages[{index}].content: only text parts are supported "
                    f"(got a part of type {echo(part.get('type'))})"
                )
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise InvalidRequestError("tools are not supported yet; leave tools unset")

    def max_new_tokens(self) -> int | None:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return self.max_tokens

    def to_input(self, request_id: str) -> GenerateInput:
        turns = tuple(ChatTurn(role=m.role, content=m.text(i)) for i, m in enumerate(self.messages))
        return GenerateInput(request_id=request_id, messages=turns, sampling=self.sampling())


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] | list[int]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo or self.suffix or self.best_of not in (None, 1):
            raise InvalidRequestError("echo, suffix and best_of are not supported yet")

    def to_input(self, request_id: str) -> GenerateInput:
        prompt, token_ids = self.prompt, tuple[int, ...]()
        if isinstance(prompt, list):
            if prompt and all(isinstance(p, int) for p in prompt):
                prompt, token_ids = "", tuple(int(p) for p in prompt)
            elif len(prompt) == 1:
                prompt = str(prompt[0])
            else:
                raise InvalidRequestError(
                    f"prompt: one prompt per request (got a list of {len(prompt)})"
                )
        return GenerateInput(
            request_id=request_id,
            prompt=str(prompt),
            token_ids=token_ids,
            sampling=self.sampling(),
        )


def pipeline_request(
    body: ChatCompletionRequest | CompletionRequest,
) -> tuple[GenerateInput, dict[str, SamplingOptions]]:
    """The pipeline request for an OpenAI body, checked by the shared rules."""
    body.check_supported()
    request = body.to_input(uuid.uuid4().hex)
    validate_generate_input(request)
    return request, body.stage_overrides()


def describe_errors(errors: Sequence[Any]) -> str:
    """Pydantic's errors of a body, each with its key path: 'temperature: Input should ...'."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'the body'}: {e['msg']}"
        for e in errors
    )
