"""Edge processors: how one stage's output becomes the next stage's input."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from omnistage.errors import InvalidRequestError, OmnistageError
from omnistage.types import ChatTurn, GenerateInput, SamplingOptions
from orchestrator.config import BUILTIN_PROCESSORS, InputConfig
from orchestrator.processors import (
    BUILTIN_EDGE_PROCESSORS,
    EmptyStageOutputError,
    StageOutput,
    chat_processor,
    original_prompt_text,
    resolve_processor,
    text_processor,
    token_ids_processor,
)

OUTPUT = StageOutput(stage="thinker", text="Paris is the capital.", token_ids=(5, 6, 7))
ORIGINAL = GenerateInput(
    request_id="req-1", prompt="Capital of France?", sampling=SamplingOptions(max_tokens=3)
)
CHAT = GenerateInput(
    request_id="req-2",
    messages=(
        ChatTurn("system", "Be terse."),
        ChatTurn("user", "Hi"),
        ChatTurn("assistant", "Hello"),
        ChatTurn("user", "Capital of Italy?"),
    ),
)


def test_every_built_in_name_has_a_processor() -> None:
    assert set(BUILTIN_EDGE_PROCESSORS) == set(BUILTIN_PROCESSORS)
    for name in BUILTIN_PROCESSORS:
        assert resolve_processor(InputConfig(processor=name)) is BUILTIN_EDGE_PROCESSORS[name]


def test_text_passes_the_output_on_with_the_request_id_and_no_sampling() -> None:
    built = text_processor(OUTPUT, ORIGINAL, InputConfig())
    assert built == GenerateInput(request_id="req-1", prompt="Paris is the capital.")
    assert built.sampling == SamplingOptions()


def test_text_fills_the_template_from_the_output_and_the_original_prompt() -> None:
    config = InputConfig(template="Q: {prompt}\nA: {text}\nShorter:")
    built = text_processor(OUTPUT, ORIGINAL, config)
    assert built.prompt == "Q: Capital of France?\nA: Paris is the capital.\nShorter:"
    from_chat = text_processor(OUTPUT, CHAT, config)
    assert from_chat.prompt.startswith("Q: Capital of Italy?\n")
    assert from_chat.request_id == "req-2" and not from_chat.messages


def test_empty_stage_output_is_failed_precondition_naming_the_stage_not_the_clients_error() -> None:
    """Issue 14: a thinker that emits only an end token (a short prompt, max_tokens 8) made
    valid requests fail with INVALID_ARGUMENT; it is FAILED_PRECONDITION naming the stage."""
    empty = StageOutput(stage="thinker", text="  \n", token_ids=())
    for processor in (text_processor, chat_processor):
        with pytest.raises(EmptyStageOutputError, match="stage 'thinker' produced no text") as info:
            processor(empty, ORIGINAL, InputConfig())
        assert info.value.code == "FAILED_PRECONDITION"
        assert not isinstance(info.value, InvalidRequestError)


def test_a_template_is_filled_and_passed_on_when_the_stage_produced_no_text() -> None:
    empty = StageOutput(stage="thinker", text="", token_ids=())
    built = text_processor(empty, ORIGINAL, InputConfig(template="Again: {prompt}"))
    assert built.prompt == "Again: Capital of France?"
    built = text_processor(empty, ORIGINAL, InputConfig(template="Q: {prompt}\nA: {text}"))
    assert built.prompt == "Q: Capital of France?\nA: "
    with pytest.raises(EmptyStageOutputError, match="empty input after stage 'thinker'"):
        text_processor(
            empty, GenerateInput(request_id="r", token_ids=(1,)), InputConfig(template="{prompt}")
        )


def test_token_ids_passes_the_ids_on() -> None:
    built = token_ids_processor(OUTPUT, ORIGINAL, InputConfig(processor="token_ids"))
    assert built == GenerateInput(request_id="req-1", token_ids=(5, 6, 7))
    with pytest.raises(EmptyStageOutputError, match="stage 'thinker' produced no token ids"):
        token_ids_processor(
            StageOutput(stage="thinker", text="x", token_ids=()), ORIGINAL, InputConfig()
        )


def test_chat_builds_an_optional_system_message_and_the_user_message() -> None:
    config = InputConfig(processor="chat", system="You edit.", template="Rewrite: {text}")
    built = chat_processor(OUTPUT, ORIGINAL, config)
    assert built.messages == (
        ChatTurn("system", "You edit."),
        ChatTurn("user", "Rewrite: Paris is the capital."),
    )
    assert built.request_id == "req-1" and built.sampling == SamplingOptions()
    plain = chat_processor(OUTPUT, ORIGINAL, InputConfig(processor="chat"))
    assert plain.messages == (ChatTurn("user", "Paris is the capital."),)


def test_original_prompt_text() -> None:
    assert original_prompt_text(ORIGINAL) == "Capital of France?"
    assert original_prompt_text(CHAT) == "Capital of Italy?"
    assert original_prompt_text(GenerateInput(request_id="r", token_ids=(1, 2))) == ""


@pytest.mark.parametrize(
    "path", ["tests.unit.custom_processors:shout", "tests.unit.custom_processors.shout"]
)
def test_a_custom_processor_is_imported_by_path(path: str) -> None:
    processor = resolve_processor(InputConfig(processor=path))
    assert processor(OUTPUT, ORIGINAL, InputConfig(processor=path)) == GenerateInput(
        request_id="req-1", prompt="PARIS IS THE CAPITAL.!"
    )


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("returns_a_string", "returned str, not a GenerateInput"),
        ("returns_nothing", "built an empty input from stage 'thinker'"),
    ],
)
def test_a_custom_processor_result_is_checked(name: str, words: str) -> None:
    path = f"tests.unit.custom_processors:{name}"
    processor = resolve_processor(InputConfig(processor=path))
    with pytest.raises(OmnistageError, match=words):
        processor(OUTPUT, ORIGINAL, InputConfig(processor=path))


@pytest.mark.parametrize(
    ("path", "words"),
    [
        ("no_such_package.mod:fn", "module 'no_such_package.mod' not found"),
        ("tests.unit.no_such_module:fn", "module 'tests.unit.no_such_module' not found"),
        ("tests.unit.custom_processors:whisper", "has no attribute 'whisper'"),
        ("tests.unit.custom_processors.whisper", "has no attribute 'whisper'"),
        ("tests.unit.custom_processors:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not callable"),
        ("tests.unit.custom_processors:takes_one", "must take (output, original, config)"),
    ],
)
def test_resolve_errors_name_the_path_and_what_failed(path: str, words: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        resolve_processor(InputConfig(processor=path))
    message = str(caught.value)
    assert f"custom processor {path!r}" in message
    assert words in message


def test_a_module_that_fails_to_import_is_reported_as_such(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = f"broken_processor_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text("import no_such_dependency_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(InvalidRequestError, match=f"importing '{name}' failed: No module named"):
        resolve_processor(InputConfig(processor=f"{name}:fn"))
