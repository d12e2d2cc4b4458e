# syntax=docker/dockerfile:1
# normserve: the model repository, built reproducibly in an image.
#
#   docker build -t normserve-models .
#
# This stage trains, folds, exports and verifies the default models exactly as `make models`
# does, and leaves the verified repository in /models. The serving stage (onnxruntime, no torch)
# copies /models from it; it lands with the service.
FROM python:3.11.7-slim-bookworm AS models

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /src

# Dependencies in their own layer, before the code, so a code change does not reinstall them.
# torch comes from PyTorch's CPU index (the PyPI build of the same version pulls in CUDA).
COPY requirements.lock ./
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu --requirement requirements.lock

COPY models/ models/
COPY export/ export/
COPY service/ service/
RUN python -m export.build --artifacts /artifacts --repository /models
