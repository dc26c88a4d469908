"""The README's "Your own PyTorch stage" shows examples/custom_torch/decoder.py verbatim, and
its pipeline snippet loads; tests/integration/test_torch_stage.py serves the example."""

from __future__ import annotations

import re

from examples.custom_torch.decoder import LatentDecoder, build
from omnistage.tensors import TensorSpec
from orchestrator.config import parse_pipeline
from tests.servers import ROOT

SECTION = "## Your own PyTorch stage"


def readme_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    return text[start : text.index("\n## ", start + len(SECTION))]


def test_the_readme_shows_the_example_file_verbatim() -> None:
    python = re.findall(r"```python\n(.*?)```", readme_section(), flags=re.S)
    source = (ROOT / "examples" / "custom_torch" / "decoder.py").read_text(encoding="utf-8")
    assert python == [source[source.index("class LatentDecoder") :]]


def test_the_readme_pipeline_snippet_loads() -> None:
    (snippet,) = re.findall(r"```yaml\n(.*?)```", readme_section(), flags=re.S)
    config = parse_pipeline(snippet, source="README.md")
    assert config.launch is not None
    launch = config.launch.stages["decoder"]
    assert (launch.engine, launch.model) == ("torch", "examples.custom_torch.decoder:build")


def test_the_readme_lists_every_engine_option() -> None:
    from services.engines.torch_model import ENGINE_KEYS

    section = readme_section()
    assert all(f"| `{key}` |" in section for key in ENGINE_KEYS)


def test_the_example_declares_its_input() -> None:
    model = build({"seed": 1})
    assert isinstance(model, LatentDecoder) and isinstance(model.input_spec, TensorSpec)
    assert model.input_spec.describe() == "float32, shape [4, H, W]"
