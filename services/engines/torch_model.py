"""What a torch stage serves: the user's model API, its engine options, and how it is loaded.

A torch stage's `--model` is an import path `package.module:factory`. The factory takes the
stage's extra engine options and returns a `TorchStageModel`: a module plus the two functions
that turn one request into one input row and one output row into response chunks, and
optionally an `input_spec` (`omnistage.tensors.TensorSpec`) that the engine checks every
request's tensor against before `preprocess`. Batching, devices, threads, chunking of large
outputs and profiling belong to the engine, not to the model.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Literal, Protocol, cast

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from omnistage.errors import InvalidRequestError
from omnistage.tensors import TensorSpec
from omnistage.types import GenerateInput, TensorData


class TorchStageModel(Protocol):
    """A model served by a torch stage. The engine batches rows of `preprocess` along dim 0.

    It may also have `input_spec: TensorSpec | None`: the dtypes and shapes of the request
    tensor it accepts. The engine refuses any other tensor with INVALID_ARGUMENT naming what
    was expected and what was given, so `preprocess` sees only tensors that fit.
    """

    module: torch.nn.Module

    def preprocess(self, request: GenerateInput) -> torch.Tensor:
        """One request as one input tensor with a leading batch dim of 1.

        Raise `InvalidRequestError` naming the expected dtype and shape when the input is
        wrong; it reaches the caller as INVALID_ARGUMENT.
        """
        ...

    def postprocess(self, output: torch.Tensor) -> list[TensorData]:
        """One item's output (batch dim 1, on the CPU) as the response's tensor chunks."""
        ...


class TorchEngineOptions(BaseModel):
    """The engine's own keys of `--engine-options`; every other key goes to the factory."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(default=8, ge=1, description="Most requests in one forward.")
    max_wait_ms: float = Field(
        default=5.0, ge=0, description="How long a batch waits for more requests after its first."
    )
    device: str = Field(default="auto", description="'auto' (CUDA when present), 'cpu', 'cuda:N'.")
    num_threads: int | None = Field(
        default=None, ge=1, description="torch's CPU threads; default one per core."
    )
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        default="float32", description="The module's dtype; the stage's --dtype unless set here."
    )


ENGINE_KEYS = frozenset(TorchEngineOptions.model_fields)


def split_engine_options(
    raw: dict[str, Any], *, default_dtype: str
) -> tuple[TorchEngineOptions, dict[str, Any]]:
    """The engine's validated options, and the rest for the model's factory."""
    own = {k: v for k, v in raw.items() if k in ENGINE_KEYS}
    own.setdefault("dtype", default_dtype)
    try:
        options = TorchEngineOptions.model_validate(own)
    except ValidationError as exc:
        problems = "; ".join(
            f"engine_options.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise InvalidRequestError(problems) from exc
    return options, {k: v for k, v in raw.items() if k not in ENGINE_KEYS}


def resolve_device(name: str, dtype: str) -> torch.device:
    """The device for `--engine-options device`, checked against the dtype."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise InvalidRequestError(
            f"engine_options.device {name!r} is not a device; use auto, cpu, cuda or cuda:N"
        ) from exc
    if device.type not in ("cpu", "cuda"):
        raise InvalidRequestError(
            f"engine_options.device {name!r} is not supported; use auto, cpu, cuda or cuda:N"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(
            f"engine_options.device is {name!r} but torch sees no CUDA device; use cpu or auto"
        )
    if device.type == "cpu" and dtype != "float32":
        raise InvalidRequestError(
            f"dtype {dtype} is for CUDA devices; on the CPU use float32 (the device is {name!r})"
        )
    return device


def load_model(import_path: str, options: dict[str, Any]) -> TorchStageModel:
    """Call the factory `package.module:function` named by `--model` with `options`."""
    module_name, sep, attribute = import_path.partition(":")
    if not sep or not module_name or not attribute:
        raise InvalidRequestError(
            f"--model {import_path!r}: a torch stage takes an import path "
            "'package.module:factory', e.g. examples.omni.code2wav:build"
        )
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # as uvicorn does: models in the working folder import
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise InvalidRequestError(
            f"--model {import_path!r}: cannot import {module_name!r} ({exc}); run the stage "
            "from the folder that holds the package, or install it"
        ) from exc
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise InvalidRequestError(
            f"--model {import_path!r}: {module_name} has no callable {attribute!r}"
        )
    model = factory(options)
    missing = [name for name in ("module", "preprocess", "postprocess") if not hasattr(model, name)]
    if missing or not isinstance(getattr(model, "module", None), torch.nn.Module):
        raise InvalidRequestError(
            f"--model {import_path!r}: the factory returned {type(model).__name__}, which is not "
            f"a TorchStageModel (it needs module: torch.nn.Module, preprocess and postprocess; "
            f"missing: {', '.join(missing) or 'a torch.nn.Module as module'})"
        )
    spec = getattr(model, "input_spec", None)
    if spec is not None and not isinstance(spec, TensorSpec):
        raise InvalidRequestError(
            f"--model {import_path!r}: input_spec is {type(spec).__name__}; make it an "
            "omnistage.tensors.TensorSpec, or None"
        )
    return cast(TorchStageModel, model)


def input_spec(model: TorchStageModel) -> TensorSpec | None:
    """The model's `input_spec`, if it declares one."""
    spec = getattr(model, "input_spec", None)
    return spec if isinstance(spec, TensorSpec) else None
