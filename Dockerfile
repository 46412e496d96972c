# slipstream on an NVIDIA GPU: the native engine and the vllm backend in one image.
#
#   docker build -t slipstream .
#   docker run --gpus all -p 8000:8000 -v /path/to/hf-model:/models/model:ro slipstream \
#       --host 0.0.0.0 --model /models/model [--backend vllm --tensor-parallel-size 2]
#
# Weights are mounted at run time (never baked into the image). Build without vLLM:
# --build-arg EXTRAS=  (the native engine only; a much smaller image).
# No Docker engine runs on the development machines: tests/test_dockerfile.py lints this file.

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# ---------------------------------------------------------------- builder: a venv in /opt
FROM ${CUDA_IMAGE} AS builder
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the CUDA index matching the base image; vLLM 0.32 pins the same 2.13.0.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX}
WORKDIR /src
COPY pyproject.toml README.md ./
COPY slipstream ./slipstream
ARG EXTRAS=vllm
# This project, with its pinned extras (DL3013 takes the local path for an unpinned package).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".${EXTRAS:+[${EXTRAS}]}"

# ---------------------------------------------------------------- runtime
FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin slipstream \
    && mkdir -p /models /cache \
    && chown 10001:10001 /cache
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    SLIPSTREAM_CACHE_DIR=/cache \
    HF_HOME=/cache/huggingface \
    HF_HUB_OFFLINE=1
USER 10001:10001
WORKDIR /home/slipstream
# Mount the model folder here (read-only is fine) and a writable cache at /cache.
VOLUME ["/models", "/cache"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["slipstream", "serve"]
CMD ["--host", "0.0.0.0", "--port", "8000", "--model", "/models/model"]
