"""The omni pipeline's pieces that need no server: stream_chunk, the codes edge, WAV files,
and the random-weight model marker."""

from __future__ import annotations

import json
import wave
from pathlib import Path

import numpy as np
import pytest

from examples.omni import processors
from omnistage.audio import write_wav
from omnistage.errors import InvalidRequestError
from omnistage.models import random_model_dir, resolve_model
from omnistage.tensors import tensor_from_numpy, tensor_to_numpy
from omnistage.types import GenerateInput
from orchestrator.config import InputConfig, PipelineConfigError, load_pipeline, parse_pipeline
from orchestrator.processors import EmptyStageOutputError, StageOutput, resolve_processor

ROOT = Path(__file__).resolve().parents[2]
OMNI = ROOT / "examples" / "omni" / "pipeline.yaml"


def test_the_omni_example_loads() -> None:
    config = load_pipeline(OMNI)
    assert config.stage_names == ["thinker", "talker", "code2wav"]
    assert [s.input.stream_chunk for s in config.stages] == [None, None, 24]
    assert config.stages[2].input.processor == "examples.omni.processors:tokens_to_codes"
    assert config.launch is not None and config.launch.stages["code2wav"].engine == "torch"
    assert config.resolve_path(config.launch.stages["talker"].model).is_dir()


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("0", ["stages[1].input.stream_chunk", "greater than or equal to 1"]),
        ("-3", ["stages[1].input.stream_chunk", "greater than or equal to 1"]),
        ("two", ["stages[1].input.stream_chunk", "valid integer"]),
    ],
)
def test_stream_chunk_must_be_a_positive_token_count(value: str, words: list[str]) -> None:
    text = (
        "stages:\n  - {name: a, address: 'h:1'}\n"
        f"  - {{name: b, address: 'h:2', input: {{processor: token_ids, stream_chunk: {value}}}}}\n"
    )
    with pytest.raises(PipelineConfigError) as caught:
        parse_pipeline(text, source="p.yaml")
    assert all(w in str(caught.value) for w in words), caught.value
    assert str(caught.value).startswith("p.yaml:3:")


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        ("stream_first_chunk: 4", ["stages[1].input.stream_first_chunk", "needs stream_chunk"]),
        ("stream_chunk: 8, stream_first_chunk: 0", ["stream_first_chunk", "greater than or"]),
    ],
)
def test_stream_first_chunk_needs_stream_chunk_and_a_count(keys: str, words: list[str]) -> None:
    text = (
        "stages:\n  - {name: a, address: 'h:1'}\n"
        f"  - {{name: b, address: 'h:2', input: {{processor: token_ids, {keys}}}}}\n"
    )
    with pytest.raises(PipelineConfigError) as caught:
        parse_pipeline(text, source="p.yaml")
    assert all(w in str(caught.value) for w in words), caught.value


def test_stream_chunk_is_refused_on_stage_zero() -> None:
    text = "stages:\n  - {name: a, address: 'h:1', input: {stream_chunk: 8}}\n"
    with pytest.raises(PipelineConfigError, match=r"stages\[0\]\.input\.stream_chunk: stage 0"):
        parse_pipeline(text, source="p.yaml")


def test_stream_chunk_defaults_to_waiting() -> None:
    assert InputConfig().stream_chunk is None
    assert InputConfig(stream_chunk=24).stream_chunk == 24


def test_tokens_become_codes_modulo_the_codebook() -> None:
    config = InputConfig(processor="examples.omni.processors:tokens_to_codes")
    built = resolve_processor(config)(
        StageOutput("talker", "", (5, 1024, 49151)), GenerateInput("r"), config
    )
    assert built.tensor is not None and built.tensor.dtype == "int64"
    assert tensor_to_numpy(built.tensor).tolist() == [5, 0, 49151 % 1024]
    as_ids = processors.tokens_to_code_ids(StageOutput("talker", "", (1025,)), built, config)
    assert as_ids.token_ids == (1,)
    with pytest.raises(EmptyStageOutputError, match="produced no tokens"):
        processors.tokens_to_codes(StageOutput("talker", "", ()), built, config)


def test_the_codebook_matches_code2wav() -> None:
    from examples.omni.code2wav import CODEBOOK_SIZE

    assert processors.CODEBOOK_SIZE == CODEBOOK_SIZE


def test_write_wav_joins_chunks_as_16_bit_mono(tmp_path: Path) -> None:
    first = tensor_from_numpy(np.array([0.0, 0.5, -0.5, 1.0], dtype=np.float32))
    second = np.array([[2.0, -2.0, 0.25]], dtype=np.float32)  # [1, T], clipped to [-1, 1]
    info = write_wav(tmp_path / "out" / "a.wav", [first, second], sample_rate=24_000)
    assert info.samples == 7 and info.duration_s == pytest.approx(7 / 24_000)
    with wave.open(str(info.path), "rb") as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) == (1, 2, 24_000)
        pcm = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2")
    assert pcm.tolist() == [0, 16384, -16384, 32767, 32767, -32767, 8192]


def test_write_wav_says_what_it_takes(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequestError, match="float samples"):
        write_wav(tmp_path / "a.wav", [np.array([1, 2], dtype=np.int64)])
    with pytest.raises(InvalidRequestError, match="mono"):
        write_wav(tmp_path / "a.wav", [np.zeros((2, 5), dtype=np.float32)])
    with pytest.raises(InvalidRequestError, match="sample_rate"):
        write_wav(tmp_path / "a.wav", [], sample_rate=0)


def test_a_random_init_marker_is_checked(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "omnistage.json").write_text(json.dumps({"random_init": True, "tokenizer": "x"}))
    with pytest.raises(InvalidRequestError, match="tokenizer 'x' is not a bundled model"):
        resolve_model(str(tmp_path))
    (tmp_path / "omnistage.json").write_text(json.dumps({"random_init": True, "sede": 1}))
    with pytest.raises(InvalidRequestError, match=r"unknown keys \['sede'\]"):
        resolve_model(str(tmp_path))


def test_the_random_model_cache_is_keyed_by_content(tmp_path: Path) -> None:
    talker = ROOT / "examples" / "omni" / "talker"
    copy = tmp_path / "talker"
    copy.mkdir()
    for name in ("config.json", "omnistage.json"):
        (copy / name).write_text((talker / name).read_text())
    assert random_model_dir(copy) == random_model_dir(talker)
    marker = json.loads((copy / "omnistage.json").read_text())
    (copy / "omnistage.json").write_text(json.dumps({**marker, "seed": 7}))
    assert random_model_dir(copy) != random_model_dir(talker)
