# syntax=docker/dockerfile:1
# The machine image: `machine` as PID 1 (it reaps orphans itself: no tini) on Debian 12 slim,
# with what its installers and local mode need: Python 3.11 + venv and git for ComfyUI,
# redis-server 7 for local mode, ca-certificates for HTTPS, procps for `ps` in a shell. Services
# are installed at start (idempotently, into the /workspace volume) or baked with
# `machine install` in a derived image.
#
# Build with `scripts/image.sh build` (podman, or docker where its daemon answers). The bases
# are build arguments, so CI builds from a base it makes with debootstrap where no registry can
# be reached:
#   BASE        runtime base: debian:bookworm-slim (PyTorch's wheels bring their own CUDA
#               libraries; NVML comes from the driver through the NVIDIA container toolkit), or
#               a CUDA base such as nvidia/cuda:12.4.1-runtime-ubuntu22.04 (Ubuntu 22.04: Redis
#               6, Python 3.10)
#   BUILD_BASE  where the release binary is built: rust:1-bookworm
#   BINARY      a prebuilt binary instead, its path under SOURCE (scripts/image.sh --binary)
#   SOURCE      what the build stage copies from the context: `.` (the repository), or the
#               folder holding the prebuilt binary, so the repository is not copied for nothing
#   PLAYWRIGHT  1 (default): Chromium's libraries and Node 20 for the Playwright render service

ARG BASE=debian:bookworm-slim
ARG BUILD_BASE=rust:1-bookworm

# ---- build: the release binary, or the prebuilt one from the context ----
FROM ${BUILD_BASE} AS build
ARG BINARY=
ARG SOURCE=.
WORKDIR /src
COPY ${SOURCE} /src/
RUN if [ -n "$BINARY" ]; then \
        install -m 0755 "$BINARY" /usr/local/bin/machine; \
    else \
        cargo build --release --locked --bin machine && install -m 0755 target/release/machine /usr/local/bin/machine; \
    fi

# ---- runtime ----
FROM ${BASE} AS runtime
ARG PLAYWRIGHT=1
# Debian's Node is 18; playwright-core needs 20, which the npm registry carries.
ENV DEBIAN_FRONTEND=noninteractive \
    MACHINE_WORKSPACE=/workspace \
    LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends \
        ca-certificates git procps python3 python3-venv python3-pip redis-server \
    && if [ "$PLAYWRIGHT" = 1 ]; then \
        apt-get install -y --no-install-recommends nodejs npm \
            libnss3 libatk1.0-0 libatk-bridge2.0-0 libcups2 libdrm2 libgbm1 libxkbcommon0 \
            libxcomposite1 libxdamage1 libxfixes3 libxrandr2 libpango-1.0-0 libcairo2 libasound2 \
            fonts-liberation \
        && npm install --global --prefix /usr/local node@20 && npm cache clean --force; \
    fi \
    && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/machine /usr/local/bin/machine
# No VOLUME: what a derived image's `RUN machine install` writes under a declared volume is
# thrown away, and the baked image would install again at every start. Mount a volume on
# /workspace for an image that installs at start; a baked one keeps its install in the image (or
# in a named volume, which docker seeds from it).
EXPOSE 9092
# SIGTERM drains: run with a stop timeout of at least worker.drain (30 s) + 10 s
# (`docker run --stop-timeout 40`, `podman stop -t 40`, Compose `stop_grace_period: 40s`).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 CMD ["machine", "status", "--check"]
ENTRYPOINT ["machine"]
