#!/usr/bin/env bash
# Runs the machine locally on a fresh Debian 12 machine: installs what is missing, builds the
# release binary and starts `machine run` with its workspace under ./.workspace. Without
# HUB_REDIS_URL it runs in local mode, and with the default connectors (simulation) it needs
# no GPU. Extra arguments go to `machine`, e.g. `scripts/run-local.sh config check`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh
cargo build --release
export MACHINE_WORKSPACE="${MACHINE_WORKSPACE:-$PWD/.workspace}"
mkdir -p "$MACHINE_WORKSPACE"
exec target/release/machine "$@"
