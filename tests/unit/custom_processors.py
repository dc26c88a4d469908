"""Custom edge processors that tests load by their import path, as a user's would be:
one that works and some that break the processor contract."""

from __future__ import annotations

from omnistage.types import GenerateInput
from orchestrator.config import InputConfig
from orchestrator.processors import StageOutput


def shout(output: StageOutput, original: GenerateInput, config: InputConfig) -> GenerateInput:
    """Upper-cases the text and adds "!"."""
    return GenerateInput(request_id=original.request_id, prompt=output.text.upper() + "!")


def returns_a_string(output: StageOutput, original: GenerateInput, config: InputConfig) -> str:
    return output.text


def returns_nothing(output: StageOutput, original: GenerateInput, config: InputConfig) -> object:
    return GenerateInput(request_id=original.request_id)


def takes_one(output: StageOutput) -> GenerateInput:
    return GenerateInput(request_id="x", prompt=output.text)


NOT_CALLABLE = 42


def tensor_to_token_ids(
    output: StageOutput, original: GenerateInput, config: InputConfig
) -> GenerateInput:
    """The previous (torch) stage's tensors, their values as the next stage's token_ids."""
    from omnistage.tensors import tensor_to_numpy

    values = [int(v) for t in output.tensors for v in tensor_to_numpy(t).reshape(-1)]
    return GenerateInput(request_id=original.request_id, token_ids=tuple(values))
