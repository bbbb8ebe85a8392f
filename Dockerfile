# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target worker -t acestep-worker .                       GPU worker (CUDA torch)
#   docker build --target worker --build-arg WITH_VLLM=true -t acestep-worker:vllm .
#   docker build --target lambda -t acestep-api-lambda .                   API for AWS Lambda (no torch)
# Model weights are never baked in: the worker reads ACESTEP_CHECKPOINT_DIR (a mounted volume) and,
# with ACESTEP_ALLOW_DOWNLOAD=true, downloads missing weights there on first start.

ARG TORCH_CUDA_IMAGE=pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime
# The same Python as the zip deployment (LAMBDA_PYTHON in infra/package_lambda.py).
ARG LAMBDA_IMAGE=public.ecr.aws/lambda/python:3.13

# ---- source: only what the package needs (see .dockerignore) -----------------------------------
FROM scratch AS source
COPY pyproject.toml README.m[d] /src/
COPY engine /src/engine
COPY service /src/service
COPY handlers /src/handlers
COPY entrypoints /src/entrypoints

# ---- worker: acestep-worker on a CUDA build of torch ------------------------------------------
FROM ${TORCH_CUDA_IMAGE} AS worker
ARG WITH_VLLM=false
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ACESTEP_DEVICE=cuda \
    ACESTEP_CHECKPOINT_DIR=/checkpoints \
    HF_HOME=/checkpoints/.hf-cache
WORKDIR /opt/acestep
COPY --from=source /src /opt/acestep
# The base image's torch satisfies the engine extra, so pip keeps that CUDA build. vLLM (the `gpu` extra:
# the 5 Hz LM's vLLM backend, chosen by ACESTEP_LM_BACKEND=auto|vllm) pins its own torch and transformers:
# it is opt-in, and the build fails loudly if it cannot install.
RUN pip install ".[engine]" \
    && if [ "$WITH_VLLM" = "true" ]; then pip install ".[gpu]"; fi \
    && python -c "import torch, engine.request, service.worker; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
RUN useradd --uid 1000 --create-home acestep \
    && mkdir -p /checkpoints && chown acestep:acestep /checkpoints
USER acestep
VOLUME ["/checkpoints"]
# SIGTERM stops intake and finishes or releases the running task (see entrypoints/worker.py).
STOPSIGNAL SIGTERM
ENTRYPOINT ["acestep-worker"]
CMD ["--backend", "aws"]

# ---- lambda: the FastAPI app behind Mangum, base dependencies only ---------------------------
FROM ${LAMBDA_IMAGE} AS lambda
COPY --from=source /src /tmp/src
# Base dependencies only: torch/diffusers are in the `engine` extra and must not be in this image.
RUN pip install --no-cache-dir --target "${LAMBDA_TASK_ROOT}" /tmp/src \
    && rm -rf /tmp/src \
    && python -c "import importlib.util, sys; sys.path.insert(0, '${LAMBDA_TASK_ROOT}'); assert importlib.util.find_spec('torch') is None, 'torch leaked into the Lambda image'"
CMD ["entrypoints.lambda_api.handler"]
