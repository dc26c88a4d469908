"""docs/stages.md's "Your own PyTorch stage" shows examples/custom_torch/decoder.py verbatim,
and its pipeline snippet loads; tests/integration/test_torch_stage.py serves the example."""

from __future__ import annotations

import re

from examples.custom_torch.decoder import LatentDecoder, build
from omnistage.tensors import TensorSpec
from orchestrator.config import parse_pipeline
from tests.servers import ROOT

SECTION = "## Your own PyTorch stage"


def docs_section() -> str:
    text = (ROOT / "docs" / "stages.md").read_text(encoding="utf-8")
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start : end if end != -1 else len(text)]


def test_the_docs_shows_the_example_file_verbatim() -> None:
    python = re.findall(r"```python\n(.*?)```", docs_section(), flags=re.S)
    source = (ROOT / "examples" / "custom_torch" / "decoder.py").read_text(encoding="utf-8")
    assert python == [source[source.index("class LatentDecoder") :]]


def test_the_docs_pipeline_snippet_loads() -> None:
    (snippet,) = re.findall(r"```yaml\n(.*?)```", docs_section(), flags=re.S)
    config = parse_pipeline(snippet, source="docs/stages.md")
    assert config.launch is not None
    launch = config.launch.stages["decoder"]
    assert (launch.engine, launch.model) == ("torch", "examples.custom_torch.decoder:build")


def test_the_docs_lists_every_engine_option() -> None:
    from services.engines.torch_model import ENGINE_KEYS

    section = docs_section()
    assert all(f"| `{key}` |" in section for key in ENGINE_KEYS)


def test_the_example_declares_its_input() -> None:
    model = build({"seed": 1})
    assert isinstance(model, LatentDecoder) and isinstance(model.input_spec, TensorSpec)
    assert model.input_spec.describe() == "float32, shape [4, H, W]"
