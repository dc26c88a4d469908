"""The profiler's environment variables of older vLLM releases, as a profiler config.

vLLM-Omni's profiling guide tells users to `export VLLM_TORCH_PROFILER_DIR=...` (with
`VLLM_TORCH_PROFILER_WITH_STACK` and the like); vLLM 0.32 reads none of them any more and
takes a `--profiler-config` instead. A stage started without `--profiler-config` (also by
`omnistage up`, whose stages inherit its environment) takes them as its config, so those
instructions keep working. It logs once which keys they became; a bad value is refused with a
message that names the variable.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from pydantic import ValidationError

from omnistage.errors import InvalidRequestError
from omnistage.settings import ProfilerSettings, describe_validation_error

logger = logging.getLogger(__name__)

DIR_VARIABLE = "VLLM_TORCH_PROFILER_DIR"
PROFILER_VARIABLES = {
    DIR_VARIABLE: "torch_profiler_dir",
    "VLLM_TORCH_PROFILER_WITH_STACK": "torch_profiler_with_stack",
    "VLLM_TORCH_PROFILER_RECORD_SHAPES": "torch_profiler_record_shapes",
    "VLLM_TORCH_PROFILER_WITH_PROFILE_MEMORY": "torch_profiler_with_memory",
    "VLLM_TORCH_PROFILER_WITH_FLOPS": "torch_profiler_with_flops",
    "VLLM_TORCH_PROFILER_USE_GZIP": "torch_profiler_use_gzip",
    "VLLM_TORCH_PROFILER_DUMP_CUDA_TIME_TOTAL": "torch_profiler_dump_cuda_time_total",
    "VLLM_PROFILER_MAX_ITERS": "max_iterations",
}
"""Each variable and the `ProfilerSettings` key it becomes (vLLM's own names for both)."""
_TRUE, _FALSE = frozenset({"1", "true", "yes", "on"}), frozenset({"0", "false", "no", "off"})


def profiler_config_from_env(environ: Mapping[str, str]) -> ProfilerSettings | None:
    """The profiler config the variables in `environ` stand for; None when none is set.

    Raises:
        InvalidRequestError: a variable holds a value its key does not take, or the other
            variables are set without `VLLM_TORCH_PROFILER_DIR`.
    """
    given = {var: environ[var] for var in PROFILER_VARIABLES if environ.get(var, "").strip()}
    if not given:
        return None
    if DIR_VARIABLE not in given:
        raise InvalidRequestError(
            f"{', '.join(sorted(given))} set without {DIR_VARIABLE}: set {DIR_VARIABLE} to the "
            "folder for the traces to turn profiling on, or unset them"
        )
    values = {PROFILER_VARIABLES[var]: _value(var, text) for var, text in given.items()}
    try:
        settings = ProfilerSettings.model_validate(values)
    except ValidationError as exc:
        names = {key: var for var, key in PROFILER_VARIABLES.items()}
        problem = describe_validation_error(exc)
        for key, var in names.items():
            problem = problem.replace(f"{key}:", f"{var} ({key}):")
        raise InvalidRequestError(f"the profiler's environment variables: {problem}") from exc
    became = ", ".join(f"{var} → {PROFILER_VARIABLES[var]}" for var in sorted(given))
    logger.info("no --profiler-config: the profiler config comes from %s", became)
    return settings


def _value(var: str, text: str) -> str | bool | int:
    key = PROFILER_VARIABLES[var]
    if key == "torch_profiler_dir":
        return text
    if key == "max_iterations":
        try:
            return int(text)
        except ValueError:
            raise InvalidRequestError(f"{var} must be a whole number (got {text!r})") from None
    word = text.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise InvalidRequestError(f"{var} must be 1 or 0 (got {text!r})")
