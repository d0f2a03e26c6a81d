#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: installs what is missing, then runs the
# gates CI runs: formatting, clippy with warnings denied, and every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh --test

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings" >&2
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test" >&2
cargo test --workspace "$@"
