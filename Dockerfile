# diffusion-cluster images (docs/deployment.md). Three targets from one file:
#
#   docker build --target broker   -t diffusion-cluster-broker .
#   docker build --target frontend -t diffusion-cluster-frontend .
#   docker build --target worker   -t diffusion-cluster-worker .
#
# The broker and the frontend never import torch: they run on a slim Python image with only
# the packages they import (deploy/docker/control-requirements.txt). Workers run on NVIDIA's
# CUDA base image with torch from PyPI, whose wheels carry the CUDA libraries themselves; the
# host needs the NVIDIA driver and the NVIDIA Container Toolkit.
# Every image runs as the unprivileged user `dc` (uid 10001) and keeps what must outlive a
# container in a volume: the frontend's data directory (SQLite job records and images, unless
# --db and --image-store name PostgreSQL and S3), the worker's model cache.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

# --- the project as a wheel, built once for every target ----------------------------------
FROM ${PYTHON_IMAGE} AS wheel
WORKDIR /src
COPY pyproject.toml setup.cfg README.md launch.py ./
COPY broker/ broker/
COPY gpu_worker/ gpu_worker/
COPY http_frontend/ http_frontend/
COPY launcher/ launcher/
COPY static/ static/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- broker and frontend: slim Python, no torch --------------------------------------------
FROM ${PYTHON_IMAGE} AS control
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/diffusion-cluster/bin:$PATH \
    DC_DATA_DIR=/var/lib/diffusion-cluster
RUN groupadd --system --gid 10001 dc \
 && useradd --system --uid 10001 --gid dc --home-dir /var/lib/diffusion-cluster \
        --shell /usr/sbin/nologin dc \
 && install -d -o dc -g dc -m 0700 /var/lib/diffusion-cluster \
 && install -d -o dc -g dc -m 0700 /etc/diffusion-cluster/curve
COPY deploy/docker/control-requirements.txt /tmp/control-requirements.txt
COPY --from=wheel /wheels/ /tmp/wheels/
RUN python -m venv /opt/diffusion-cluster \
 && pip install -r /tmp/control-requirements.txt \
 && pip install --no-deps /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels /tmp/control-requirements.txt
WORKDIR /var/lib/diffusion-cluster
USER 10001:10001

FROM control AS broker
# Frontends on 5555 (--clients), workers on 5556 (--workers). The broker keeps only soft
# state: no volume. No health check: it serves no HTTP, and with CURVE a bare TCP probe would
# be logged as a refused handshake every time; it exits when it cannot serve, and the
# frontends' /readyz says whether they reach it.
EXPOSE 5555 5556
HEALTHCHECK NONE
# Defaults as variables, so that an orchestrator's environment can change them (flags would
# win over it). Both endpoints take CURVE keys only: mount `launch.py keys` output there.
ENV DC_BROKER_CLIENTS=tcp://0.0.0.0:5555 \
    DC_BROKER_WORKERS=tcp://0.0.0.0:5556 \
    DC_BROKER_CURVE=/etc/diffusion-cluster/curve
CMD ["dc-broker"]

FROM control AS frontend
VOLUME ["/var/lib/diffusion-cluster"]
EXPOSE 8000
# /healthz: the process serves HTTP (/readyz also wants the broker and a worker: that is
# for load balancers, not for restarting the container).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('DC_FRONTEND_PORT', '8000'), timeout=4)"]
ENV DC_FRONTEND_HOST=0.0.0.0 \
    DC_FRONTEND_PORT=8000
CMD ["dc-frontend"]

# --- workers: NVIDIA's CUDA base, torch from PyPI ------------------------------------------
FROM ${CUDA_IMAGE} AS worker
# Extras to install with the project (setup.cfg), e.g. --build-arg WORKER_EXTRAS=marking
# (--watermark, --c2pa-*; adds the libraries OpenCV needs), or marking,quantize.
ARG WORKER_EXTRAS=
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/diffusion-cluster/bin:$PATH \
    HF_HOME=/var/cache/diffusion-cluster/huggingface \
    DC_CACHE_DIR=/var/cache/diffusion-cluster
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv ca-certificates \
        ${WORKER_EXTRAS:+libgl1 libglib2.0-0} \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 dc \
 && useradd --system --uid 10001 --gid dc --home-dir /var/cache/diffusion-cluster \
        --shell /usr/sbin/nologin dc \
 && install -d -o dc -g dc -m 0700 /var/cache/diffusion-cluster \
        /var/cache/diffusion-cluster/huggingface /etc/diffusion-cluster/curve
COPY --from=wheel /wheels/ /tmp/wheels/
RUN python3 -m venv /opt/diffusion-cluster \
 && wheel=$(ls /tmp/wheels/*.whl) \
 && pip install "${wheel}${WORKER_EXTRAS:+[$WORKER_EXTRAS]}" \
 && rm -rf /tmp/wheels
VOLUME ["/var/cache/diffusion-cluster"]
WORKDIR /var/cache/diffusion-cluster
USER 10001:10001
# A worker serves no HTTP: the broker judges it by its heartbeats, and a worker that cannot
# work exits (status 78 when its configuration is wrong), which the orchestrator sees.
HEALTHCHECK NONE
CMD ["dc-worker"]
