"""Issue 14: every engine validation error is INVALID_ARGUMENT, never INTERNAL, and a stage's
ValidateSampling checks sampling as its engine would, running nothing.

The vLLM cases use vLLM's real exception classes and `SamplingParams` (no engine is started);
the servicer's cases a fake engine behind the real servicer and error mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import grpc
import pytest

from omnistage.errors import EngineDeadError, InvalidRequestError
from omnistage.types import SamplingOptions
from omnistage.v1 import common_pb2, stage_pb2
from services.config import StageConfig
from services.profiling.sessions import ProfileSessionStore
from services.servicer import StageServicer
from tests.unit.fake_grpc import Aborted, FakeContext, mapped

pytest.importorskip("vllm")
# Importing vLLM's sampling code imports torch's, which warns of its own deprecated API.
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)

CONTEXT = 2048


class _LiveLLM:
    errored = False


def vllm_engine() -> Any:
    """A VllmEngine as `start` leaves it, without a model: enough to build SamplingParams."""
    from services.engines.vllm_engine import VllmEngine

    engine = VllmEngine(StageConfig(name="t", model="smollm2"))
    engine._llm = _LiveLLM()
    engine._max_model_len = CONTEXT
    return engine


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (SamplingOptions(temperature=2.5), ["sampling.temperature", "[0, 2]", "2.5"]),
        (SamplingOptions(temperature=float("inf")), ["temperature", "finite"]),
        (SamplingOptions(top_p=1.5), ["sampling.top_p", "(0, 1]", "1.5"]),
        (SamplingOptions(max_tokens=-3), ["max_tokens", "at least 1", "-3"]),
        (SamplingOptions(top_k=-7), ["top_k", "-7"]),
        (SamplingOptions(stop=("",)), ["stop", "empty string"]),
    ],
    ids=["temperature-2.5", "temperature-inf", "top-p", "max-tokens", "top-k", "empty-stop"],
)
def test_vllm_sampling_bounds_are_invalid_argument_not_internal(
    options: SamplingOptions, words: list[str]
) -> None:
    """Before the fix vLLM's VLLMValidationError (not a ValueError) escaped: INTERNAL."""
    engine = vllm_engine()
    for call in (
        lambda: engine._sampling_params(options, prompt_len=5),  # Generate's path
        lambda: engine.check_sampling(options),  # ValidateSampling's
    ):
        with pytest.raises(InvalidRequestError) as caught:
            call()
        for word in words:
            assert word in str(caught.value)
        assert "within vLLM's bounds" in str(caught.value)


def test_vllm_check_sampling_accepts_its_bounds_and_assumes_a_one_token_prompt() -> None:
    engine = vllm_engine()
    engine.check_sampling(SamplingOptions(temperature=2.0, top_p=1.0, top_k=0, seed=-5))
    engine.check_sampling(SamplingOptions(max_tokens=CONTEXT - 1))
    with pytest.raises(InvalidRequestError, match=f"max_tokens {CONTEXT} does not fit"):
        engine.check_sampling(SamplingOptions(max_tokens=CONTEXT))


def test_vllm_check_sampling_before_the_engine_is_up_is_unavailable() -> None:
    from services.engines.vllm_engine import VllmEngine

    with pytest.raises(EngineDeadError, match="not serving yet"):
        VllmEngine(StageConfig(name="t", model="smollm2")).check_sampling(SamplingOptions())


def _generate_error(cause: Exception) -> Exception:
    from vllm.v1.engine.exceptions import EngineGenerateError

    wrapped = EngineGenerateError()
    wrapped.__cause__ = cause
    return wrapped


def test_vllm_input_validation_errors_before_admission_are_the_callers() -> None:
    """vLLM's input processor raises ValueError/TypeError, which `generate` wraps in
    EngineGenerateError: before vLLM sent anything, those are the request's fault."""
    from vllm.exceptions import VLLMValidationError

    from services.engines.vllm_engine import _translate

    for error in (
        VLLMValidationError("The decoder prompt cannot be empty"),
        _generate_error(ValueError("sampling distribution replay requires temperature > 0")),
        _generate_error(TypeError("params must be either SamplingParams or PoolingParams")),
        ValueError("bad value"),
    ):
        translated = _translate(error, admitted=False)
        assert isinstance(translated, InvalidRequestError), error
        assert str(translated).startswith("sampling: ")
    # Once vLLM has sent output, a ValueError is vLLM's own failure, not the caller's.
    late = _generate_error(ValueError("boom"))
    assert _translate(late, admitted=True) is late


def test_vllm_engine_dead_stays_unavailable() -> None:
    from vllm.v1.engine.exceptions import EngineDeadError as VllmDeadError

    from services.engines.vllm_engine import _translate

    assert isinstance(_translate(VllmDeadError(), admitted=False), EngineDeadError)


# --- the stage's ValidateSampling RPC, through the servicer and the error mapping ---


class CheckingEngine:
    """An engine whose check refuses temperature above 2, as vLLM's does."""

    def __init__(self) -> None:
        self.checked: list[SamplingOptions] = []

    def check_sampling(self, options: SamplingOptions) -> None:
        self.checked.append(options)
        if options.temperature is not None and options.temperature > 2:
            raise InvalidRequestError("sampling.temperature: must be in [0, 2]")


def validate(
    sampling: common_pb2.SamplingParams, tmp_path: Path
) -> tuple[CheckingEngine, tuple[grpc.StatusCode, str] | None]:
    engine = CheckingEngine()
    store = ProfileSessionStore(stage_name="s", engine=engine, root=None)  # type: ignore[arg-type]
    servicer = StageServicer(name="s", engine=engine, sessions=store)  # type: ignore[arg-type]
    request = stage_pb2.ValidateSamplingRequest(sampling=sampling)

    async def run() -> tuple[grpc.StatusCode, str] | None:
        context = FakeContext()
        with contextlib.suppress(Aborted):
            await mapped(context, "ValidateSampling", servicer.ValidateSampling(request, context))  # type: ignore[arg-type]
        return context.status

    return engine, asyncio.run(run())


def test_validate_sampling_rpc_answers_ok_for_good_sampling(tmp_path: Path) -> None:
    engine, status = validate(common_pb2.SamplingParams(temperature=0.7, max_tokens=8), tmp_path)
    assert status is None
    assert engine.checked == [SamplingOptions(temperature=pytest.approx(0.7), max_tokens=8)]


@pytest.mark.parametrize(
    ("sampling", "words", "asked"),
    [
        (common_pb2.SamplingParams(temperature=2.5), "sampling.temperature", True),
        (common_pb2.SamplingParams(top_p=0.0), "top_p must lie in (0, 1]", False),
        (common_pb2.SamplingParams(max_tokens=0), "max_tokens must be ≥ 1", False),
    ],
    ids=["engine-bound", "shared-rule-top-p", "shared-rule-max-tokens"],
)
def test_validate_sampling_rpc_refuses_with_invalid_argument(
    sampling: common_pb2.SamplingParams, words: str, asked: bool, tmp_path: Path
) -> None:
    engine, status = validate(sampling, tmp_path)
    assert status is not None
    assert status[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert words in status[1]
    assert bool(engine.checked) == asked  # the shared rules come first, the engine's next
