#!/usr/bin/env bash
# Installs what `machine` needs on a fresh Debian 12 machine, only what is missing.
#   scripts/install-deps.sh          what running the machine locally needs
#   scripts/install-deps.sh --test   plus what the test suite needs
set -euo pipefail

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

missing=()
need() { # need COMMAND DEBIAN-PACKAGE
    command -v "$1" >/dev/null 2>&1 || missing+=("$2")
}
need redis-server redis-server
need git git
need cc gcc
need python3 python3
need unshare util-linux
need curl curl
if [ "$want_test" = 1 ]; then
    need pkg-config pkg-config
    need nsenter util-linux
    need ps procps
fi
# python3 -m venv needs Debian's python3-venv when python3 is Debian's own.
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi

if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: installing ${missing[*]}" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-deps: need root to apt-get install ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found: install Rust 1.85 or newer (https://rustup.rs), then run this again" >&2
    exit 1
fi

# Subsystems add their own prerequisites (chromium, npm packages, ...) here.
if [ "$want_test" = 1 ] && [ -x scripts/test-deps.sh ]; then
    scripts/test-deps.sh
fi
