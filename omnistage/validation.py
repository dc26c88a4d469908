"""Checks on a request that do not depend on the engine kind. Each message says what to fix."""

from __future__ import annotations

import math

from omnistage.errors import InvalidRequestError
from omnistage.tensors import validate_tensor
from omnistage.types import CHAT_ROLES, GenerateInput, ProfileOptions, SamplingOptions

MAX_STOP_STRINGS = 16


def validate_sampling(options: SamplingOptions) -> None:
    if options.max_tokens is not None and options.max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be ≥ 1 (got {options.max_tokens})")
    if options.temperature is not None and (
        not math.isfinite(options.temperature) or options.temperature < 0
    ):
        raise InvalidRequestError(
            f"temperature must be ≥ 0; 0 means greedy (got {options.temperature})"
        )
    if options.top_p is not None and not 0 < options.top_p <= 1:
        raise InvalidRequestError(f"top_p must lie in (0, 1] (got {options.top_p})")
    if options.top_k is not None and options.top_k < -1:
        raise InvalidRequestError(f"top_k must be ≥ 1, or 0 or -1 to disable (got {options.top_k})")
    if len(options.stop) > MAX_STOP_STRINGS:
        raise InvalidRequestError(
            f"at most {MAX_STOP_STRINGS} stop strings are allowed (got {len(options.stop)})"
        )
    if any(not s for s in options.stop):
        raise InvalidRequestError("stop strings must not be empty")


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
                f"messages[{index}].role {turn.role!r} is unknown; use one of "
                f"{', '.join(sorted(CHAT_ROLES))}"
            )
    if request.messages and not any(t.content for t in request.messages):
        raise InvalidRequestError("every message is empty: give at least one message content")
    if any(t < 0 for t in request.token_ids):
        raise InvalidRequestError("token_ids must be ≥ 0")
    if request.tensor is not None:
        validate_tensor(request.tensor)
    validate_sampling(request.sampling)


def validate_profile_options(options: ProfileOptions) -> None:
    for key in ("delay_iterations", "max_iterations"):
        value = getattr(options, key)
        if value is not None and value < 0:
            raise InvalidRequestError(f"{key} must be ≥ 0 (got {value})")
