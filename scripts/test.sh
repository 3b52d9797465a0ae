#!/usr/bin/env bash
# The test command: every test of the workspace. Needs only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  # nextest does not run doctests
  cargo test --workspace --doc
else
  cargo test --workspace --no-fail-fast
fi
