# rnnserve server image: the base install plus the grpc extra (onnxruntime, FastAPI, grpcio), no torch, no training code.
#
#   docker build -t rnnserve:0.1.0 .
#   docker run --rm -p 8000:8000 -p 8001:8001 rnnserve:0.1.0    # 8001: gRPC
#   docker run --rm -p 8000:8000 -v "$PWD/my-models:/models:ro" rnnserve:0.1.0
#
# /models is the model repository (<name>/<version>/model.onnx + card.json). The image ships
# the demo models there; mount your own repository over it, read-only.
# Settings are environment variables (RNNSERVE_*): see deploy/README.md.

############################ builder: a self-contained venv ############################
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/rnnserve

WORKDIR /src
# Only what the wheel needs: the server package. training/ (torch) stays out of the image.
COPY pyproject.toml README.md ./
COPY service/ service/

# `pip install '.[grpc]'` resolves the base dependencies and the gRPC server's (grpcio,
# health, reflection, tritonclient's message classes); the [train] and [dev] extras are not
# requested. Versions stay within the ranges pinned in pyproject.toml. rnn-train is the
# console script of the training extra and cannot run without torch, so it is removed.
RUN /opt/rnnserve/bin/pip install --no-cache-dir '.[grpc]' \
    && rm -f /opt/rnnserve/bin/rnn-train \
    && /opt/rnnserve/bin/pip check

############################ runtime ############################
FROM python:3.11-slim

LABEL org.opencontainers.image.title="rnnserve" \
      org.opencontainers.image.description="Stateful serving of RNN/LSTM/GRU models exported to ONNX" \
      org.opencontainers.image.version="0.1.0"

ENV PATH=/opt/rnnserve/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RNNSERVE_MODEL_REPO=/models \
    RNNSERVE_HOST=0.0.0.0 \
    RNNSERVE_PORT=8000 \
    RNNSERVE_GRPC_PORT=8001

# Fixed numeric UID/GID so Kubernetes can check runAsNonRoot and volumes can be chowned to it.
RUN groupadd --system --gid 10001 rnnserve \
    && useradd --system --no-log-init --uid 10001 --gid 10001 \
        --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin rnnserve

COPY --from=builder /opt/rnnserve /opt/rnnserve
# Demo models, owned by root and not writable by the server user.
COPY models/ /models/

WORKDIR /tmp
USER 10001:10001
# 8000: HTTP (REST, WebSocket, v2); 8001: the Open Inference Protocol over gRPC.
EXPOSE 8000 8001

# Liveness only (/healthz answers as soon as the process is up); readiness is /readyz.
# python:*-slim has no curl, so the check uses the standard library.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

CMD ["rnn-serve", "--model-repo", "/models", "--host", "0.0.0.0", "--port", "8000"]
