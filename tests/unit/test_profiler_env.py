"""Older vLLM's profiler environment variables, taken as a stage's profiler config."""

from __future__ import annotations

import pytest

from omnistage.errors import InvalidRequestError
from omnistage.profiler_env import PROFILER_VARIABLES, profiler_config_from_env
from omnistage.settings import ProfilerSettings


def test_no_variables_mean_no_config() -> None:
    assert profiler_config_from_env({}) is None
    assert profiler_config_from_env({"VLLM_TORCH_PROFILER_DIR": "  "}) is None


def test_every_variable_becomes_its_key(caplog: pytest.LogCaptureFixture) -> None:
    environ = {
        "VLLM_TORCH_PROFILER_DIR": "/traces",
        "VLLM_TORCH_PROFILER_WITH_STACK": "0",
        "VLLM_TORCH_PROFILER_RECORD_SHAPES": "1",
        "VLLM_TORCH_PROFILER_WITH_PROFILE_MEMORY": "true",
        "VLLM_TORCH_PROFILER_WITH_FLOPS": "yes",
        "VLLM_TORCH_PROFILER_USE_GZIP": "off",
        "VLLM_TORCH_PROFILER_DUMP_CUDA_TIME_TOTAL": "False",
        "VLLM_PROFILER_MAX_ITERS": "7",
    }
    assert set(environ) == set(PROFILER_VARIABLES)
    with caplog.at_level("INFO", logger="omnistage.profiler_env"):
        settings = profiler_config_from_env(environ)
    assert settings == ProfilerSettings(
        torch_profiler_dir="/traces",
        torch_profiler_with_stack=False,
        torch_profiler_record_shapes=True,
        torch_profiler_with_memory=True,
        torch_profiler_with_flops=True,
        torch_profiler_use_gzip=False,
        torch_profiler_dump_cuda_time_total=False,
        max_iterations=7,
    )
    assert settings.enabled
    [record] = [r for r in caplog.records if "profiler config comes from" in r.message]
    assert "VLLM_PROFILER_MAX_ITERS → max_iterations" in record.message


@pytest.mark.parametrize(
    ("environ", "words"),
    [
        ({"VLLM_TORCH_PROFILER_WITH_STACK": "1"}, "set without VLLM_TORCH_PROFILER_DIR"),
        (
            {"VLLM_TORCH_PROFILER_DIR": "/t", "VLLM_TORCH_PROFILER_WITH_STACK": "maybe"},
            "VLLM_TORCH_PROFILER_WITH_STACK must be 1 or 0 (got 'maybe')",
        ),
        (
            {"VLLM_TORCH_PROFILER_DIR": "/t", "VLLM_PROFILER_MAX_ITERS": "ten"},
            "VLLM_PROFILER_MAX_ITERS must be a whole number (got 'ten')",
        ),
        (
            {"VLLM_TORCH_PROFILER_DIR": "/t", "VLLM_PROFILER_MAX_ITERS": "-1"},
            "VLLM_PROFILER_MAX_ITERS (max_iterations):",
        ),
    ],
    ids=["no dir", "not a bool", "not a number", "negative"],
)
def test_a_bad_value_names_its_variable(environ: dict[str, str], words: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        profiler_config_from_env(environ)
    assert words in str(info.value)
