"""Request checks shared by every engine kind."""

from __future__ import annotations

import pytest

from omnistage.errors import InvalidRequestError
from omnistage.types import ChatTurn, GenerateInput, SamplingOptions
from omnistage.validation import validate_generate_input, validate_sampling


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (SamplingOptions(max_tokens=0), ["max_tokens must be ≥ 1 (got 0)"]),
        (SamplingOptions(temperature=-1.0), ["temperature", "-1.0"]),
        (SamplingOptions(temperature=float("nan")), ["temperature"]),
        (SamplingOptions(top_p=0.0), ["top_p", "(0, 1]"]),
        (SamplingOptions(top_p=1.01), ["top_p"]),
        (SamplingOptions(top_k=-5), ["top_k", "-5"]),
        (SamplingOptions(stop=("",)), ["stop"]),
        (SamplingOptions(stop=tuple("abcdefghijklmnopq")), ["at most 16"]),
    ],
)
def test_bad_sampling(options: SamplingOptions, words: list[str]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_sampling(options)
    for word in words:
        assert word in str(info.value)


def test_good_sampling_passes() -> None:
    validate_sampling(
        SamplingOptions(max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, stop=("x",))
    )


def test_input_checks() -> None:
    with pytest.raises(InvalidRequestError, match="no input"):
        validate_generate_input(GenerateInput(request_id="r"))
    with pytest.raises(InvalidRequestError, match="exactly one input"):
        validate_generate_input(GenerateInput(request_id="r", prompt="a", token_ids=(1,)))
    with pytest.raises(InvalidRequestError, match="'bot' is unknown"):
        validate_generate_input(GenerateInput(request_id="r", messages=(ChatTurn("bot", "hi"),)))
    validate_generate_input(GenerateInput(request_id="r", messages=(ChatTurn("user", "hi"),)))


def test_merged_sampling_prefers_the_request() -> None:
    merged = SamplingOptions(max_tokens=5).merged_over(
        SamplingOptions(max_tokens=9, temperature=0.3)
    )
    assert (merged.max_tokens, merged.temperature) == (5, 0.3)
