"""Edge processors: how one stage's output becomes the next stage's input.

A processor is a plain callable `(output, original, config) -> GenerateInput`. The built-ins are
`text`, `token_ids`, `chat` and `tensor`; a pipeline file may name its own as
"package.module:function".
The input a processor returns carries no sampling: the runner applies the stage's sampling.

A stage that produced nothing the edge can use (no text, no token ids: a thinker that emitted
only an end token) is not the client's error. An input template is still filled, with empty
text, and passed on when the result is not blank; otherwise the request fails with
FAILED_PRECONDITION (`EmptyStageOutputError`) naming the stage that produced nothing, and no
later stage runs (docs/pipelines.md).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from omnistage.errors import InvalidRequestError, OmnistageError
from omnistage.tensors import join_tensors
from omnistage.types import ChatTurn, GenerateInput, TensorData
from orchestrator.config import InputConfig


class EmptyStageOutputError(OmnistageError):
    """A stage produced no output the next stage can take; the request was valid."""

    code = "FAILED_PRECONDITION"


def _produced_nothing(stage: str, what: str) -> EmptyStageOutputError:
    return EmptyStageOutputError(
        f"stage {stage!r} produced no {what}, so the next stage has no input (the request "
        f"itself is valid: stage {stage!r} may have ended at once, e.g. on an end token with "
        f"a small max_tokens); raise that stage's max_tokens, or give the next stage an "
        "input template that reads well without {text}"
    )


@dataclass(frozen=True)
class StageOutput:
    """What a finished stage produced."""

    stage: str
    text: str
    token_ids: tuple[int, ...]
    tensors: tuple[TensorData, ...] = ()


class EdgeProcessor(Protocol):
    def __call__(
        self, output: StageOutput, original: GenerateInput, config: InputConfig
    ) -> GenerateInput: ...


def original_prompt_text(original: GenerateInput) -> str:
    """The client's prompt, or the content of its last user message, or ""."""
    if original.prompt:
        return original.prompt
    for turn in reversed(original.messages):
        if turn.role == "user":
            return turn.content
    return ""


def _formatted_text(output: StageOutput, original: GenerateInput, config: InputConfig) -> str:
    """The upstream text, through the config's template when it has one."""
    template = config.template
    if template is None:
        if not output.text.strip():
            raise _produced_nothing(output.stage, "text")
        return output.text
    try:
        text = template.format(text=output.text, prompt=original_prompt_text(original))
    except (ValueError, KeyError, IndexError) as exc:
        raise InvalidRequestError(f"input template {template!r} failed: {exc}") from exc
    if not text.strip():
        raise EmptyStageOutputError(
            f"input template {template!r} gave an empty input after stage {output.stage!r}, "
            f"which produced {'no text' if not output.text.strip() else 'text'}"
        )
    return text


def text_processor(
    output: StageOutput, original: GenerateInput, config: InputConfig
) -> GenerateInput:
    """prompt = the template filled in, or the upstream text itself."""
    prompt = _formatted_text(output, original, config)
    return GenerateInput(request_id=original.request_id, prompt=prompt)


def token_ids_processor(
    output: StageOutput, original: GenerateInput, config: InputConfig
) -> GenerateInput:
    """token_ids = the upstream token ids, unchanged."""
    if not output.token_ids:
        raise _produced_nothing(output.stage, "token ids")
    return GenerateInput(request_id=original.request_id, token_ids=output.token_ids)


def chat_processor(
    output: StageOutput, original: GenerateInput, config: InputConfig
) -> GenerateInput:
    """messages = [the optional system message, the user message: the template filled in]."""
    user = ChatTurn(role="user", content=_formatted_text(output, original, config))
    system = (ChatTurn(role="system", content=config.system),) if config.system else ()
    return GenerateInput(request_id=original.request_id, messages=(*system, user))


def tensor_processor(
    output: StageOutput, original: GenerateInput, config: InputConfig
) -> GenerateInput:
    """tensor = the upstream tensors joined along dim 0; a single one passes on as it is (in
    shared memory too, so a co-located next stage gets its handle: docs/shared-memory.md)."""
    if not output.tensors:
        raise _produced_nothing(output.stage, "tensor")
    tensors = output.tensors
    tensor = tensors[0] if len(tensors) == 1 else join_tensors(tensors)
    return GenerateInput(request_id=original.request_id, tensor=tensor)


BUILTIN_EDGE_PROCESSORS: dict[str, EdgeProcessor] = {
    "text": text_processor,
    "token_ids": token_ids_processor,
    "chat": chat_processor,
    "tensor": tensor_processor,
}


def resolve_processor(config: InputConfig) -> EdgeProcessor:
    """The built-in named by `config.processor`, or the custom callable it names.

    A custom processor is imported from "package.module:function" (or "package.module.function")
    and checked once here; what it returns is checked on every call.
    """
    builtin = BUILTIN_EDGE_PROCESSORS.get(config.processor)
    if builtin is not None:
        return builtin
    path = config.processor
    module_name, sep, attribute = path.partition(":")
    if not sep:
        module_name, _, attribute = path.rpartition(".")
    if not module_name or not attribute:
        raise InvalidRequestError(
            f"processor {path!r} is neither a built-in ({', '.join(BUILTIN_EDGE_PROCESSORS)})"
            " nor a 'package.module:function' path"
        )
    where = f"custom processor {path!r}"
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())  # as the torch engine's models: the working folder imports
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and f"{module_name}.".startswith(f"{exc.name}."):
            raise InvalidRequestError(
                f"{where}: module {module_name!r} not found; run from the folder that holds "
                "the package, or install it"
            ) from exc
        raise InvalidRequestError(f"{where}: importing {module_name!r} failed: {exc}") from exc
    except (ImportError, SyntaxError) as exc:
        raise InvalidRequestError(f"{where}: importing {module_name!r} failed: {exc}") from exc
    found: object = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise InvalidRequestError(
                f"{where}: module {module_name!r} has no attribute {attribute!r}"
            )
        found = getattr(found, part)
    if not callable(found):
        raise InvalidRequestError(
            f"{where}: {attribute!r} is a {type(found).__name__}, not callable"
        )
    try:
        inspect.signature(found).bind(None, None, None)
    except TypeError as exc:
        raise InvalidRequestError(
            f"{where}: it must take (output, original, config) ({exc})"
        ) from exc
    except ValueError:  # no signature to check, as for some built-in callables
        pass
    return _checked(path, found)


def _checked(path: str, func: Callable[..., object]) -> EdgeProcessor:
    """`func`, with its result checked to be a usable GenerateInput."""

    def processor(
        output: StageOutput, original: GenerateInput, config: InputConfig
    ) -> GenerateInput:
        result = func(output, original, config)
        if not isinstance(result, GenerateInput):
            raise InvalidRequestError(
                f"custom processor {path!r} returned {type(result).__name__}, not a GenerateInput"
            )
        if not result.input_kinds():
            raise EmptyStageOutputError(
                f"custom processor {path!r} built an empty input from stage"
                f" {output.stage!r}'s output"
            )
        return result

    return processor
