"""Stage configuration: vLLM's profiler keys, validated once with messages that say what to fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from omnistage.errors import InvalidRequestError
from services.config import StageConfig, parse_profiler_config


def test_empty_profiler_config_means_profiling_off() -> None:
    assert not parse_profiler_config("").enabled


def test_profiler_dir_alone_enables_the_torch_profiler(tmp_path: object) -> None:
    settings = parse_profiler_config(f'{{"torch_profiler_dir": "{tmp_path}"}}')
    assert settings.enabled and settings.profiler == "torch"


def test_vllm_keys_are_accepted() -> None:
    settings = parse_profiler_config(
        '{"profiler": "torch", "torch_profiler_dir": "/x", "torch_profiler_with_stack": false,'
        ' "torch_profiler_record_shapes": true, "torch_profiler_with_memory": true,'
        ' "torch_profiler_with_flops": true, "torch_profiler_use_gzip": false,'
        ' "delay_iterations": 2, "max_iterations": 5, "ignore_frontend": true}'
    )
    assert settings.max_iterations == 5 and not settings.torch_profiler_with_stack


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", ["not valid JSON"]),
        ("[1, 2]", ["JSON object"]),
        ('{"profiler": "torch"}', ["torch_profiler_dir"]),
        ('{"torch_profiler_dir": "/x", "max_iterations": -1}', ["max_iterations"]),
        (
            '{"torch_profiler_dir": "/x", "torch_profiler_withstack": true}',
            ["torch_profiler_withstack"],
        ),
        ('{"profiler": "nsys", "torch_profiler_dir": "/x"}', ["profiler", "torch"]),
    ],
    ids=[
        "bad-json",
        "not-object",
        "no-dir",
        "negative-iterations",
        "misspelt-key",
        "unknown-profiler",
    ],
)
def test_bad_profiler_config_says_what_to_fix(text: str, words: list[str]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_profiler_config(text)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("name", ["", "has space", "a/b", "-dash-first", "x" * 70])
def test_bad_stage_names_are_rejected(name: str) -> None:
    with pytest.raises(ValidationError):
        StageConfig(name=name, model="smollm2")


def test_stage_config_forbids_unknown_keys() -> None:
    with pytest.raises(ValidationError) as info:
        StageConfig.model_validate({"name": "a", "model": "m", "gpu": True})
    assert "gpu" in str(info.value)
