# syntax=docker/dockerfile:1
# The machine image: `machine` as PID 1 on a CUDA runtime base, with what its installers need
# (Python and git for ComfyUI, Node for the Playwright render service, Chromium's libraries,
# redis-server for local mode). Services themselves are installed at start (idempotently, into
# the /workspace volume) or baked with `machine install` in a derived image.

# ---- build: the release binary ----
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin machine && cp target/release/machine /usr/local/bin/machine

# ---- node: a current Node.js for the Playwright render service ----
FROM node:20-bookworm-slim AS node

# ---- runtime ----
FROM nvidia/cuda:12.4.1-runtime-ubuntu22.04 AS runtime
ENV DEBIAN_FRONTEND=noninteractive \
    MACHINE_WORKSPACE=/workspace \
    LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
# redis-server is local mode's private Redis; Ubuntu 22.04 ships 6.0, where the broker runs the
# same Lua through EVALSHA (with a warning). In production point HUB_REDIS_URL at Redis 7+.
RUN apt-get update && apt-get install -y --no-install-recommends \
        ca-certificates curl git python3 python3-venv python3-pip redis-server \
        libnss3 libatk1.0-0 libatk-bridge2.0-0 libcups2 libdrm2 libgbm1 libxkbcommon0 \
        libxcomposite1 libxdamage1 libxfixes3 libxrandr2 libpango-1.0-0 libcairo2 libasound2 \
        fonts-liberation \
    && rm -rf /var/lib/apt/lists/*
COPY --from=node /usr/local/bin/node /usr/local/bin/node
COPY --from=node /usr/local/lib/node_modules /usr/local/lib/node_modules
RUN ln -s ../lib/node_modules/npm/bin/npm-cli.js /usr/local/bin/npm \
    && ln -s ../lib/node_modules/npm/bin/npx-cli.js /usr/local/bin/npx
COPY --from=build /usr/local/bin/machine /usr/local/bin/machine
VOLUME ["/workspace"]
EXPOSE 9092
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=10m --retries=3 CMD ["machine", "status", "--check"]
ENTRYPOINT ["machine"]
