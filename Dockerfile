# syntax=docker/dockerfile:1
#
# The sds image: one command, `sds`, for every role (`run`, `workload-api`,
# `wait`, `inspect`). Two stages: the first builds wheels, the second installs
# only those wheels into a slim Python, runs as a numeric non-root user and
# carries no compiler or build tool.
#
#   docker build -t spiffe-envoy-sds:0.1.0 .
#   docker run --rm spiffe-envoy-sds:0.1.0 --help
#
# See docs/deploy.md for docker compose, Kubernetes and Istio.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY sds ./sds

# Our wheel plus a wheel of every dependency. --only-binary keeps compilers
# out of the picture: every dependency ships manylinux wheels for CPython 3.11.
RUN pip wheel --no-cache-dir --wheel-dir /wheels --only-binary=:all: --no-binary=spiffe-envoy-sds .

# --------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG APP_UID=10001
ARG APP_GID=10001

LABEL org.opencontainers.image.title="spiffe-envoy-sds" \
      org.opencontainers.image.description="SPIFFE Workload API to Envoy SDS v3 bridge: mTLS for unmodified apps, keys in memory only." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# A fixed numeric user, so Kubernetes `runAsNonRoot` can verify it and other
# containers can name it (allowed_uids, identity rules). /run/sds (SDS socket)
# and /run/spiffe (Workload API socket) exist and belong to it, so a fresh
# named volume mounted there is created with that owner and mode 0755.
RUN groupadd --system --gid "${APP_GID}" sds \
    && useradd --system --uid "${APP_UID}" --gid "${APP_GID}" --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin sds \
    && install -d -o "${APP_UID}" -g "${APP_GID}" -m 0755 /run/sds /run/spiffe

# Install from the build stage's wheels only (no index, nothing compiled); the
# wheels are bind-mounted, so they never become a layer of this image.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels "spiffe-envoy-sds==${VERSION}" \
    && sds --help > /dev/null

USER ${APP_UID}:${APP_GID}

# Meaningful for `sds run` (admin on its default 127.0.0.1:8181); services
# running another subcommand override it (see docker-compose.yml).
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["sds", "wait", "--admin", "127.0.0.1:8181", "--timeout", "2"]

ENTRYPOINT ["sds"]
CMD ["--help"]
