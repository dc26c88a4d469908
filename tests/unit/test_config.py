"""Stage configuration: vLLM's profiler keys, validated once with messages that say what to fix."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from omnistage.errors import InvalidRequestError
from omnistage.settings import ProfilerSettings, parse_profiler_config
from services.config import StageConfig

# A value other than vLLM's default for every key a stage can use, to see each one arrive.
NON_DEFAULT_KEYS: dict[str, Any] = {
    "profiler": "torch",
    "torch_profiler_activities": ["CPU"],
    "torch_profiler_with_stack": False,
    "torch_profiler_with_flops": True,
    "torch_profiler_use_gzip": False,
    "torch_profiler_dump_cuda_time_total": False,
    "torch_profiler_record_shapes": True,
    "torch_profiler_with_memory": True,
    "capture_torch_profiler": True,
    "detailed_trace_annotation": True,
    "ignore_frontend": True,
    "delay_iterations": 2,
    "max_iterations": 5,
    "warmup_iterations": 1,
    "active_iterations": 3,
    "wait_iterations": 4,
}


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


def test_every_vllm_profiler_key_is_accepted_and_reaches_vllms_config(tmp_path: Path) -> None:
    """Our keys and defaults are vLLM's own, and a vLLM stage hands every one to vLLM."""
    vllm_config = pytest.importorskip("vllm.config")
    vllm_fields = {f.name for f in dataclasses.fields(vllm_config.ProfilerConfig)}
    assert set(ProfilerSettings.model_fields) == vllm_fields
    defaults = vllm_config.ProfilerConfig()
    assert {k: getattr(defaults, k) for k in vllm_fields} == ProfilerSettings().model_dump()

    settings = parse_profiler_config(
        json.dumps({**NON_DEFAULT_KEYS, "torch_profiler_dir": str(tmp_path / "p")})
    )
    staging = tmp_path / "staging"
    passed = vllm_config.ProfilerConfig(**settings.vllm_options(torch_profiler_dir=staging))
    for key, value in NON_DEFAULT_KEYS.items():
        assert getattr(passed, key) == value, key
    assert passed.torch_profiler_dir == str(staging)


def test_unknown_key_lists_vllms_keys() -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_profiler_config('{"torch_profiler_dir": "/x", "torch_profiler_withstack": true}')
    message = str(info.value)
    assert "unknown profiler key torch_profiler_withstack" in message
    assert "did you mean 'torch_profiler_with_stack'?" in message
    for key in ("torch_profiler_dump_cuda_time_total", "warmup_iterations", "proton_mode"):
        assert key in message


@pytest.mark.parametrize(
    ("config", "words"),
    [
        ({"proton_mode": "pcsampling"}, ["proton_mode", "profiler 'proton'", "torch traces"]),
        ({"torch_profiler_activities": ["CPU", "CPU"]}, ["duplicates"]),
        ({"torch_profiler_activities": ["TPU"]}, ["torch_profiler_activities"]),
        ({"active_iterations": 0}, ["active_iterations"]),
    ],
    ids=["proton-key", "duplicate-activity", "unknown-activity", "zero-active"],
)
def test_vllm_keys_that_a_stage_cannot_honour_say_why(
    config: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_profiler_config(json.dumps({"torch_profiler_dir": "/x", **config}))
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("{not json", ["not valid JSON"]),
        ("[1, 2]", ["JSON object"]),
        ('{"profiler": "torch"}', ["torch_profiler_dir"]),
        ('{"torch_profiler_dir": "/x", "max_iterations": -1}', ["max_iterations"]),
        (
            '{"torch_profiler_dir": "/x", "torch_profiler_withstack": true}',
            ["torch_profiler_withstack", "torch_profiler_with_stack"],
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
