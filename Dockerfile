# syntax=docker/dockerfile:1.7
# Three images from one file, all installed with the lock (constraints.txt, `make lock`):
#   docker build --target worker -t acestep-worker .                       GPU worker (torch 2.13.0, CUDA 13.0)
#   docker build --target worker --build-arg WITH_VLLM=true -t acestep-worker:vllm .
#   docker build --target api -t acestep-api .                             API for one machine (docker-compose.yml)
#   docker build --target lambda -t acestep-api-lambda .                   API for AWS Lambda (no torch)
# Model weights are never baked in: the worker reads ACESTEP_CHECKPOINT_DIR (a mounted volume) and,
# with ACESTEP_ALLOW_DOWNLOAD=true, downloads missing weights there on first start.

# torch 2.13.0 is the version the project is tested with (TORCH_VERSION); its CUDA wheels are built for
# CUDA 13.0 (cu130), so the base is the CUDA 13.0 runtime. Change the three together.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu130
# The Python the lock is resolved for (constraints.txt: --python-version 3.11), for the worker and the API.
ARG PYTHON_VERSION=3.11
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8
# The same Python as the zip deployment (LAMBDA_PYTHON in infra/package_lambda.py).
ARG LAMBDA_IMAGE=public.ecr.aws/lambda/python:3.13

# ---- source: only what the package needs (see .dockerignore) -----------------------------------
FROM scratch AS source
COPY pyproject.toml README.md constraints.txt /src/
COPY engine /src/engine
COPY service /src/service
COPY handlers /src/handlers
COPY entrypoints /src/entrypoints

FROM ${UV_IMAGE} AS uv

# ---- worker: acestep-worker on the CUDA build of torch -----------------------------------------
FROM ${CUDA_IMAGE} AS worker
ARG TORCH_VERSION
ARG TORCH_INDEX
ARG PYTHON_VERSION
ARG WITH_VLLM=false
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    UV_NO_CACHE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    ACESTEP_DEVICE=cuda \
    ACESTEP_CHECKPOINT_DIR=/checkpoints \
    HF_HOME=/checkpoints/.hf-cache
COPY --from=uv /uv /usr/local/bin/uv
WORKDIR /opt/acestep
COPY --from=source /src /opt/acestep
# The CUDA image's Python is Ubuntu's 3.12; uv brings the 3.11 the lock is for. torch comes from the
# PyTorch index of the base image's CUDA (no deps there), its dependencies and ours from PyPI under the lock.
# vLLM (the `gpu` extra: the 5 Hz LM's vLLM backend, ACESTEP_LM_BACKEND=auto|vllm) pins its own torch and
# transformers, outside the lock: it is opt-in, and the build fails loudly if it cannot install.
RUN uv venv --python "${PYTHON_VERSION}" /opt/venv \
    && uv pip install --no-deps --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
    && uv pip install --constraint constraints.txt ".[engine]" \
    && if [ "$WITH_VLLM" = "true" ]; then uv pip install ".[gpu]"; fi \
    && python -c "import os, torch, engine.request, service.worker; \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__; \
assert os.environ['CUDA_VERSION'].startswith(torch.version.cuda + '.'), (torch.version.cuda, os.environ['CUDA_VERSION']); \
print('torch', torch.__version__, 'cuda', torch.version.cuda)"
# uid 1000 in both images, so the worker and the api containers can write the same data volume (compose);
# Ubuntu 24.04 images hold that uid for their `ubuntu` user.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --uid 1000 --create-home acestep \
    && mkdir -p /checkpoints /data && chown acestep:acestep /checkpoints /data
USER acestep
VOLUME ["/checkpoints"]
# SIGTERM stops intake and finishes or releases the running task (see entrypoints/worker.py).
STOPSIGNAL SIGTERM
# The worker writes a heartbeat to this file; the health check fails when it stops or a task stalls
# (ACESTEP_STALL_TIMEOUT). The same file as the ECS task's health check (HEARTBEAT_FILE in infra/acestep_stack.py).
HEALTHCHECK --interval=30s --timeout=10s --start-period=300s --retries=3 \
    CMD ["acestep-worker", "--healthcheck", "--heartbeat-file", "/tmp/acestep-heartbeat.json"]
ENTRYPOINT ["acestep-worker"]
CMD ["--backend", "aws", "--heartbeat-file", "/tmp/acestep-heartbeat.json"]

# ---- api: the REST + OpenAI-style API for one machine, base dependencies only (no torch) -------
FROM ${PYTHON_IMAGE} AS api
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ACESTEP_API_HOST=0.0.0.0 \
    ACESTEP_API_PORT=8001 \
    OPENROUTER_HOST=0.0.0.0 \
    ACESTEP_DATA_DIR=/data \
    ACESTEP_QUEUE_WORKERS=0
WORKDIR /opt/acestep
COPY --from=source /src /opt/acestep
RUN pip install --constraint constraints.txt . \
    && python -c "import importlib.util; assert importlib.util.find_spec('torch') is None, 'torch leaked into the API image'" \
    && useradd --uid 1000 --create-home acestep \
    && mkdir -p /data && chown acestep:acestep /data
USER acestep
EXPOSE 8001 8002
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('ACESTEP_API_PORT', '8001'), timeout=4)"]
ENTRYPOINT ["acestep-api"]

# ---- lambda: the FastAPI app behind Mangum, base dependencies only ---------------------------
FROM ${LAMBDA_IMAGE} AS lambda
COPY --from=source /src /tmp/src
# Base dependencies only: torch/diffusers are in the `engine` extra and must not be in this image.
RUN pip install --no-cache-dir --no-compile --constraint /tmp/src/constraints.txt --target "${LAMBDA_TASK_ROOT}" /tmp/src \
    && rm -rf /tmp/src \
    && python -c "import importlib.util, sys; sys.path.insert(0, '${LAMBDA_TASK_ROOT}'); assert importlib.util.find_spec('torch') is None, 'torch leaked into the Lambda image'"
CMD ["entrypoints.lambda_api.handler"]
