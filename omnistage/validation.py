"""Checks on a request that do not depend on the engine kind, or on the front door it came
through (a pipeline file, gRPC, HTTP). Each message says what to fix."""

from __future__ import annotations

import dataclasses
import math

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from omnistage.errors import InvalidRequestError, echo
from omnistage.tensors import validate_tensor
from omnistage.types import CHAT_ROLES, GenerateInput, ProfileOptions, SamplingOptions

MAX_STOP_STRINGS = 16
DEFAULT_MAX_PROMPT_BYTES = 1 << 20
"""The default limit on a request's text (prompt, or all messages), in UTF-8 bytes: 1 MiB."""


class Sampling(BaseModel):
    """The sampling rules, defined once: for a pipeline file's `sampling:` (extra keys are
    errors there), a Generate request's, and the HTTP API's. Unset keys use defaults."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(default=None, description="Most tokens generated.")
    temperature: float | None = Field(default=None, description="0 is greedy.")
    top_p: float | None = Field(default=None, description="Nucleus sampling mass.")
    top_k: int | None = Field(default=None, description="-1 considers every token.")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    stop: list[str] | None = Field(default=None, description="Strings that end generation.")
    ignore_eos: bool | None = Field(default=None, description="Keep going past end-of-text.")

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be ≥ 1 (got {value})")
        return value

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f"must be ≥ 0; 0 means greedy (got {value})")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, value: float | None) -> float | None:
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"must lie in (0, 1] (got {value})")
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, value: int | None) -> int | None:
        if value is not None and value < -1:
            raise ValueError(f"must be ≥ 1, or 0 or -1 to disable (got {value})")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: list[str] | None) -> list[str] | None:
        if value and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"holds at most {MAX_STOP_STRINGS} strings (got {len(value)})")
        if value and not all(value):
            raise ValueError("strings must not be empty")
        return value

    def to_options(self) -> SamplingOptions:
        return SamplingOptions(**self.model_dump(exclude={"stop"}), stop=tuple(self.stop or ()))


def validate_sampling(options: SamplingOptions) -> None:
    """A request's sampling, by the rules of `Sampling`; the message names each bad key."""
    try:
        Sampling.model_validate(dataclasses.asdict(options))
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc'])} {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors(include_url=False)
        ]
        raise InvalidRequestError("; ".join(problems)) from None


def validate_generate_input(request: GenerateInput) -> None:
    """Shape checks every engine shares: one input, known roles, a valid tensor, sane sampling."""
    kinds = request.input_kinds()
    if not kinds:
        raise InvalidRequestError(
            "the request has no input: set one of prompt, messages, token_ids or tensor"
        )
    if len(kinds) > 1:
        raise InvalidRequestError(f"set exactly one input, got {len(kinds)}: {', '.join(kinds)}")
    for index, turn in enumerate(request.messages):
        if turn.role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"messages[{index}].role {echo(turn.role)} is unknown; use one of "
                f"{', '.join(sorted(CHAT_ROLES))}"
            )
    if request.messages and not any(t.content for t in request.messages):
        raise InvalidRequestError("every message is empty: give at least one message content")
    if any(t < 0 for t in request.token_ids):
        raise InvalidRequestError("token_ids must be ≥ 0")
    if request.tensor is not None:
        validate_tensor(request.tensor)
    validate_sampling(request.sampling)


def check_prompt_bytes(request: GenerateInput, *, max_bytes: int, where: str, flag: str) -> None:
    """Refuse a request whose text (its prompt, or its messages' roles and contents) is over
    `max_bytes` UTF-8 bytes (0: no limit), before anything tokenizes it; the message names the
    limit and the `flag` that sets it. A text of more characters than the limit is over it
    without being encoded (every character is at least one byte)."""
    if max_bytes <= 0:
        return
    texts = [request.prompt, *(t.role for t in request.messages)]
    texts += [t.content for t in request.messages]
    size = sum(len(t) for t in texts)
    unit = "characters"
    if size <= max_bytes:
        size, unit = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts), "bytes"
    if size > max_bytes:
        kind = "messages are" if request.messages else "prompt is"
        raise InvalidRequestError(
            f"the {kind} {size:,} {unit}, over the limit of {max_bytes:,} bytes of {where} "
            f"({flag}); shorten the input, or raise {flag}"
        )


def validate_profile_options(options: ProfileOptions) -> None:
    for key in ("delay_iterations", "max_iterations"):
        value = getattr(options, key)
        if value is not None and value < 0:
            raise InvalidRequestError(f"{key} must be ≥ 0 (got {value})")
        if value and options.timing_only:
            raise InvalidRequestError(
                f"timing_only starts no profiler, so {key} (which counts a profiler's engine "
                f"steps) does not apply (got {key}={value}); drop {key}, or timing_only to "
                "profile the stages"
            )
