# syntax=docker/dockerfile:1
# normserve's images. Three targets (and HAProxy's, for a fleet: see the haproxy stage):
#
#   docker build -t normserve .                          # cpu (the default): onnxruntime's CPU build, no torch
#   docker build --target gpu -t normserve:gpu .         # onnxruntime-gpu with CUDA 13 and cuDNN 9 from pip wheels
#   docker build --target models -t normserve:models .   # torch: trains, folds, exports and verifies the models
#
# The runtime images hold the model repository in /models (read-only, root's). MODELS says where it
# comes from: `build` (the default) trains and exports it as `make models` does; `copy` copies the
# repository MODEL_REPOSITORY (default model_repository) from the build context, no torch needed;
# `none` leaves /models empty for a repository mounted at run time. Run as in docs/deploy.md:
#
#   docker run --rm -p 8000:8000 --read-only --stop-timeout 40 normserve
#
# Where no registry or package index is reachable, `make image` builds this same file with podman from
# a local base image and wheels downloaded on the host (docker/build-image.sh, BASE_IMAGE, PIP_INDEX).
ARG BASE_IMAGE=python:3.11-slim-bookworm
# The same Python with a C compiler and its headers, where the request path is compiled (service/compiled.py).
ARG BUILD_IMAGE=python:3.11-bookworm
ARG MODELS=build

FROM ${BASE_IMAGE} AS base
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
# One virtual environment, so the same commands work on python:3.11-slim and on Debian's own python3.
RUN python3 -m venv /opt/venv
WORKDIR /opt/normserve
# What pip installs is decided by these two files alone: a code change does not reinstall anything.
COPY pyproject.toml requirements.lock ./
COPY docker/deps.py docker/gpu.lock docker/

# The request path compiled with Cython (with the serving dependencies, some of whose modules it compiles: the
# same wheels as the runtime images, so the same sources); the runtime images take the builds alone.
FROM ${BUILD_IMAGE} AS compiled
ARG PIP_INDEX=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
WORKDIR /opt/normserve
COPY pyproject.toml requirements.lock ./
COPY docker/deps.py docker/
# hadolint ignore=SC2046
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    /opt/venv/bin/pip install $PIP_INDEX --find-links /wheels --constraint requirements.lock \
        $(python3 docker/deps.py native)
COPY service/ service/
RUN /opt/venv/bin/python -m service.compile

FROM base AS models-build
# --no-index when the build has no network: the wheels in docker/wheels/ only (mounted, never copied).
ARG PIP_INDEX=""
# hadolint ignore=SC2046
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install $PIP_INDEX --find-links /wheels --extra-index-url https://download.pytorch.org/whl/cpu \
        --constraint requirements.lock $(python3 docker/deps.py cpu train)
COPY models/ models/
COPY export/ export/
COPY repository/ repository/
COPY service/ service/
RUN python -m export.build --artifacts /tmp/artifacts --repository /models && rm -rf /tmp/artifacts

FROM base AS models-copy
ARG MODEL_REPOSITORY=model_repository
# A COPY, so that a rebuilt repository invalidates the cache by its contents.
COPY ${MODEL_REPOSITORY} /models

FROM base AS models-none
RUN mkdir /models

# hadolint ignore=DL3006
FROM models-${MODELS} AS models

FROM base AS serve
# A user of its own, written by hand: a minimal base may have no useradd.
RUN echo "normserve:x:10001:10001:normserve:/nonexistent:/usr/sbin/nologin" >>/etc/passwd \
    && echo "normserve:x:10001:" >>/etc/group
ENV NORMSERVE_REPOSITORY=/models \
    NORMSERVE_HOST=0.0.0.0 \
    NORMSERVE_PORT=8000 \
    NORMSERVE_SHUTDOWN_TIMEOUT_S=30
EXPOSE 8000 8001
# Stop with SIGTERM and a grace above NORMSERVE_SHUTDOWN_TIMEOUT_S (docker stop -t 40, compose
# stop_grace_period: 40s, Kubernetes terminationGracePeriodSeconds: 45): accepted requests finish.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 CMD ["python", "-m", "service.healthcheck"]
# Exactly what `make serve` runs.
ENTRYPOINT ["python", "-m", "service"]

FROM serve AS gpu
ARG PIP_INDEX=""
# hadolint ignore=SC2046
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install $PIP_INDEX --find-links /wheels --constraint requirements.lock --constraint docker/gpu.lock \
        $(python3 docker/deps.py gpu)
COPY repository/ repository/
COPY service/ service/
COPY --from=compiled /opt/normserve/service/_compiled/ service/_compiled/
COPY export/ export/
COPY normserve/ normserve/
COPY --from=models /models /models
# A GPU image that runs on CPU is a broken GPU deployment: say so, and stay not ready.
ENV NORMSERVE_PROVIDER=cuda \
    NORMSERVE_REQUIRE_GPU=1
USER 10001:10001

# HAProxy from Debian's package, in front of the compose file's fleet of replicas (docker/haproxy/haproxy.cfg):
#   docker build --target haproxy -t normserve-haproxy .
FROM ${BASE_IMAGE} AS haproxy
# A base that has it already (docker/build-image.sh haproxy, where no package index is reachable) skips apt-get.
# hadolint ignore=DL3008
RUN command -v haproxy >/dev/null \
    || { apt-get update && apt-get install -y --no-install-recommends haproxy && rm -rf /var/lib/apt/lists/*; }
COPY docker/haproxy/haproxy.cfg /etc/haproxy/haproxy.cfg
ENV HAPROXY_BIND=:8000 \
    HAPROXY_STATS_SOCKET=/var/lib/haproxy/admin.sock
EXPOSE 8000
# Debian's package makes the user, with whatever id is free: its name is the stable handle.
# hadolint ignore=DL3066
USER haproxy
# SIGUSR1: finish what is in flight, then stop.
STOPSIGNAL SIGUSR1
ENTRYPOINT ["haproxy", "-W", "-db", "-f", "/etc/haproxy/haproxy.cfg"]

FROM serve AS cpu
ARG PIP_INDEX=""
# hadolint ignore=SC2046
RUN --mount=type=bind,source=docker/wheels,target=/wheels \
    pip install $PIP_INDEX --find-links /wheels --constraint requirements.lock $(python3 docker/deps.py cpu)
COPY repository/ repository/
COPY service/ service/
COPY --from=compiled /opt/normserve/service/_compiled/ service/_compiled/
COPY export/ export/
COPY normserve/ normserve/
COPY --from=models /models /models
ENV NORMSERVE_PROVIDER=cpu
USER 10001:10001
