"""A torch stage takes the vLLM profiler config unchanged, and says which keys it ignores."""

from __future__ import annotations

import logging

import pytest

from services.config import ProfilerSettings
from services.engines.torch_profiler import StepProfiler


def test_keys_the_torch_engine_ignores_are_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = ProfilerSettings(
        torch_profiler_dir="traces", warmup_iterations=2, torch_profiler_activities=["CPU"]
    )
    with caplog.at_level(logging.WARNING, logger="services.engines.torch_profiler"):
        StepProfiler(settings, stage="code2wav", cuda=False)
    (record,) = caplog.records
    message = record.getMessage()
    assert "stage code2wav" in message
    assert "torch_profiler_activities, warmup_iterations" in message


def test_keys_it_honours_raise_no_warning(caplog: pytest.LogCaptureFixture) -> None:
    settings = ProfilerSettings(
        torch_profiler_dir="traces",
        torch_profiler_with_stack=False,
        torch_profiler_record_shapes=True,
        max_iterations=3,
    )
    with caplog.at_level(logging.WARNING, logger="services.engines.torch_profiler"):
        StepProfiler(settings, stage="code2wav", cuda=False)
    assert caplog.records == []
