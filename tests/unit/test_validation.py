"""Request checks shared by every engine kind."""

from __future__ import annotations

import dataclasses
import re

import pytest
import yaml

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


@pytest.mark.parametrize(
    ("sampling", "problem"),
    [
        ("{max_tokens: 0}", "sampling.max_tokens: must be ≥ 1 (got 0)"),
        ("{top_k: -5}", "sampling.top_k: must be ≥ 1, or 0 or -1 to disable (got -5)"),
        ("{stop: ['']}", "sampling.stop: strings must not be empty"),
        ("{top_p: 1.5}", "sampling.top_p: must lie in (0, 1] (got 1.5)"),
    ],
    ids=["max_tokens", "top_k", "empty-stop", "top_p"],
)
def test_a_pipeline_file_and_a_request_share_the_sampling_rules(
    sampling: str, problem: str
) -> None:
    """One definition: what the RPC refuses, the pipeline file refuses, in the same words."""
    from orchestrator.config import PipelineConfigError, parse_pipeline

    with pytest.raises(PipelineConfigError) as info:
        parse_pipeline(f"stages:\n  - {{name: a, address: 'h:1', sampling: {sampling}}}\n")
    assert problem in str(info.value)
    key, words = problem.removeprefix("sampling.").split(": ", 1)
    options = (
        parse_pipeline("stages:\n  - {name: a, address: 'h:1'}\n")
        .stages[0]
        .sampling.model_copy(update={key: None})
        .to_options()
    )
    bad = dataclasses.replace(options, **{key: _bad_value(sampling)})
    with pytest.raises(InvalidRequestError, match=re.escape(f"{key} {words}")):
        validate_sampling(bad)


def _bad_value(sampling: str) -> object:
    value = yaml.safe_load(sampling)
    (item,) = value.values()
    return tuple(item) if isinstance(item, list) else item
