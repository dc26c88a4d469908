"""The pipeline file: validated at load, every problem reported with its file, line and key path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from omnistage.errors import InvalidRequestError
from omnistage.types import SamplingOptions
from orchestrator.config import (
    InputConfig,
    PipelineConfig,
    PipelineConfigError,
    SamplingConfig,
    StageSpec,
    load_pipeline,
    parse_pipeline,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "two-stage" / "pipeline.yaml"


def problems_of(text: str) -> list[str]:
    """The problems parse_pipeline reports for `text` (dedented), one per line."""
    with pytest.raises(PipelineConfigError) as caught:
        parse_pipeline(textwrap.dedent(text), source="pipeline.yaml")
    assert str(caught.value) == "\n".join(caught.value.problems)
    return caught.value.problems


def test_the_two_stage_example_loads() -> None:
    config = load_pipeline(EXAMPLE)
    assert config.stage_names == ["thinker", "rewriter"]
    assert [s.all_addresses for s in config.stages] == [["127.0.0.1:50061"], ["127.0.0.1:50062"]]
    assert config.source == EXAMPLE
    assert config.default_profile_dir() == EXAMPLE.parent / "profiles"
    assert config.launch is not None and config.launch.orchestrator_port == 50060
    thinker = config.launch.stages["thinker"]
    assert (thinker.engine, thinker.model, thinker.port) == ("vllm", "smollm2", 50061)
    assert thinker.profiler_config == {
        "torch_profiler_dir": "profiles/stages/thinker",
        "torch_profiler_with_stack": False,
    }
    rewriter = config.stages[1]
    assert rewriter.input.processor in ("text", "chat") and "{text}" in str(rewriter.input.template)


def test_a_bad_value_names_the_file_line_and_key_path(tmp_path: Path) -> None:
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            name: demo
            stages:
              - name: a
                address: localhost:1
              - name: b
                address: localhost:2
                sampling:
                  max_tokens: 8
                  temperature: -0.5
            """
        )
    )
    with pytest.raises(PipelineConfigError) as caught:
        load_pipeline(path)
    assert isinstance(caught.value, InvalidRequestError)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert str(caught.value) == (
        f"{path}:9: stages[1].sampling.temperature: must be ≥ 0; 0 means greedy (got -0.5)"
    )


def test_an_unknown_key_is_reported_at_its_line_with_a_suggestion() -> None:
    (problem,) = problems_of(
        """\
        stages:
          - name: a
            address: localhost:1
            sampling:
              temprature: 0.5
        """
    )
    assert problem.startswith("pipeline.yaml:5: stages[0].sampling.temprature: unknown key")
    assert "did you mean 'temperature'?" in problem


def test_every_problem_is_reported_one_per_line_in_file_order() -> None:
    problems = problems_of(
        """\
        stages:
          - name: a
            address: localhost:1
            sampling: {top_p: 0}
          - name: "bad name!"
            address: localhost:2
        outputs: some
        """
    )
    assert [p.split(": ")[0] for p in problems] == [
        "pipeline.yaml:4",
        "pipeline.yaml:5",
        "pipeline.yaml:7",
    ]
    assert "stages[0].sampling.top_p" in problems[0]
    assert "stages[1].name" in problems[1]
    assert "outputs: Input should be 'final' or 'all'" in problems[2]


def test_a_duplicate_stage_name_is_reported_at_the_second_one() -> None:
    (problem,) = problems_of(
        """\
        stages:
          - name: a
            address: localhost:1
          - name: a
            address: localhost:2
        """
    )
    assert problem == ("pipeline.yaml:4: stages[1].name: duplicate stage name 'a' (also stages[0])")


def test_address_and_addresses_together_are_refused() -> None:
    (problem,) = problems_of(
        """\
        stages:
          - name: a
            address: localhost:1
            addresses: [localhost:2]
        """
    )
    assert problem == "pipeline.yaml:4: stages[0].addresses: set address or addresses, not both"


def test_a_stage_without_any_address_is_refused() -> None:
    (problem,) = problems_of(
        """\
        stages:
          - name: a
            address: localhost:1
          - name: b
            addresses: []
        """
    )
    assert problem.startswith("pipeline.yaml:4: stages[1]: stage 'b' needs address or addresses")


def test_a_launched_stage_with_a_fixed_port_gets_its_local_address() -> None:
    config = parse_pipeline(
        textwrap.dedent(
            """\
            stages:
              - name: a
              - name: b
                addresses: [10.0.0.1:1, 10.0.0.2:1]
            launch:
              stages:
                a: {port: 50071, host: 0.0.0.0}
            """
        )
    )
    assert config.stages[0].all_addresses == ["127.0.0.1:50071"]
    assert config.stages[1].all_addresses == ["10.0.0.1:1", "10.0.0.2:1"]


def test_a_launched_stage_on_port_zero_still_needs_an_address() -> None:
    (problem,) = problems_of(
        """\
        stages:
          - name: a
        launch:
          stages:
            a: {port: 0}
        """
    )
    assert problem.startswith("pipeline.yaml:2: stages[0]: stage 'a' needs address")
    assert "launch port is 0" in problem


def test_a_launch_entry_must_name_a_stage() -> None:
    (problem,) = problems_of(
        """\
        stages:
          - name: a
            address: localhost:1
        launch:
          orchestrator_port: 50060
          stages:
            a: {port: 50061}
            b: {port: 50062}
        """
    )
    assert problem == (
        "pipeline.yaml:8: launch.stages.b: 'b' is not a stage of this pipeline; stages: a"
    )


def test_launch_profiler_config_uses_vllm_keys() -> None:
    (problem,) = problems_of(
        """\
        stages:
          - name: a
            address: localhost:1
        launch:
          stages:
            a:
              port: 50061
              profiler_config:
                torch_profiler_dir: /tmp/p
                torch_profiler_withstack: true
        """
    )
    assert problem.startswith(
        "pipeline.yaml:10: launch.stages.a.profiler_config.torch_profiler_withstack: unknown key"
    )
    assert "did you mean 'torch_profiler_with_stack'?" in problem


def test_a_yaml_syntax_error_names_its_line() -> None:
    (problem,) = problems_of(
        """\
        stages:
          - name: a
            address: localhost:1
            sampling: {max_tokens: 4
        """
    )
    assert problem.startswith("pipeline.yaml:5: invalid YAML:")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "pipeline.yaml: the pipeline file is empty"),
        ("- a\n- b\n", "pipeline.yaml:1: (top level): expected a mapping of keys, got list"),
        ("stages: []\n", "pipeline.yaml:1: stages: List should have at least 1 item"),
        ("name: x\n", "pipeline.yaml:1: stages: required key is missing"),
        ("stages: [{name: a, address: 'h:1'}]\nname: x\nname: y\n", "pipeline.yaml:3: name: dup"),
    ],
)
def test_file_level_problems(text: str, expected: str) -> None:
    assert problems_of(text)[0].startswith(expected)


def test_a_custom_processor_path_is_accepted_as_written() -> None:
    config = parse_pipeline(
        textwrap.dedent(
            """\
            stages:
              - name: a
                address: localhost:1
              - name: b
                address: localhost:2
                input:
                  processor: tests.unit.custom_processors:shout
                  template: "{anything} goes to a custom processor"
            """
        )
    )
    assert config.stages[1].input.processor == "tests.unit.custom_processors:shout"


@pytest.mark.parametrize(
    ("processor", "words"),
    [
        ("no_such_package.mod:fn", "module 'no_such_package.mod' not found"),
        ("tests.unit.custom_processors:whisper", "has no attribute 'whisper'"),
        ("tests.unit.custom_processors:takes_one", "must take (output, original, config)"),
        ("{module}:fn", "importing '{module}' failed: No module named"),
    ],
)
def test_a_custom_processor_that_does_not_resolve_fails_at_load(
    processor: str, words: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = f"broken_processor_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text("import no_such_dependency_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    processor, words = processor.format(module=module), words.format(module=module)
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            stages:
              - name: a
                address: localhost:1
              - name: b
                address: localhost:2
                input:
                  template: "{{text}}"
                  processor: {processor}
            """
        )
    )
    with pytest.raises(PipelineConfigError) as caught:
        load_pipeline(path)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}:8: stages[1].input.processor: custom processor ")
    assert words in problem


@pytest.mark.parametrize(
    ("input_yaml", "line", "words"),
    [
        ("{processor: texts}", 5, ["input.processor", "unknown processor 'texts'", "chat"]),
        ("{processor: 'pkg.mod:fn()'}", 5, ["input.processor", "'package.module:function'"]),
        (
            "{template: 'Fix {txt} for {prompt}'}",
            5,
            ["input.template", "unknown template field {txt}", "allowed: {text}, {prompt}"],
        ),
        ("{processor: chat, template: 'oops {'}", 5, ["input.template", "malformed template"]),
        ("{processor: token_ids, template: '{text}'}", 5, ["token_ids processor takes no"]),
        ("{processor: text, system: Be brief.}", 5, ["input.system", "chat processor"]),
    ],
)
def test_input_problems(input_yaml: str, line: int, words: list[str]) -> None:
    (problem,) = problems_of(
        f"""\
        stages:
          - name: a
            address: localhost:1
          - name: b
            input: {input_yaml}
            address: localhost:2
        """
    )
    assert problem.startswith(f"pipeline.yaml:{line}: stages[1].")
    for word in words:
        assert word in problem


def test_stage_index_takes_a_name_or_a_decimal_index() -> None:
    config = load_pipeline(EXAMPLE)
    assert config.stage_index("rewriter") == 1
    assert config.stage_index("0") == 0


@pytest.mark.parametrize(
    "key", ["talker", "2", "-1"], ids=["unknown-name", "past-the-end", "negative"]
)
def test_an_unknown_stage_index_lists_the_stages(key: str) -> None:
    with pytest.raises(InvalidRequestError, match=r"unknown stage .*0 'thinker', 1 'rewriter'"):
        load_pipeline(EXAMPLE).stage_index(key)


def test_models_work_without_a_file() -> None:
    config = PipelineConfig(stages=[StageSpec(name="a", address="localhost:1")])
    assert config.source is None and config.outputs == "all"
    assert config.stages[0].input == InputConfig()
    options = SamplingConfig(max_tokens=4, stop=["x"]).to_options()
    assert options == SamplingOptions(max_tokens=4, stop=("x",))


def test_an_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(PipelineConfigError, match="cannot read the pipeline file"):
        load_pipeline(tmp_path / "missing.yaml")
