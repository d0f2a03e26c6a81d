#!/usr/bin/env bash
# The whole test suite on a fresh Debian 12 machine: installs what is missing, then runs the
# gates CI runs: formatting, clippy with warnings denied, every test of the workspace, then the
# container checks (scripts/image.sh test) on the debug binary the tests built.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh --test

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings" >&2
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test" >&2
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
echo "== scripts/image.sh test" >&2
# Its own closing line: `container: N passed, N failed` (or `container: skipped: <why>`).
scripts/image.sh test --binary "${CARGO_TARGET_DIR:-target}/debug/machine" || status=1
exit "$status"
