#!/usr/bin/env bash
# The test command: every test of the workspace. Needs the Rust toolchain; installs Chromium and
# ChromeDriver (Debian packages) for the browser test when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# The browser test drives Debian's Chromium through ChromeDriver; install them when missing.
bash scripts/install-browser.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  # nextest does not run doctests
  cargo test --workspace --doc
else
  cargo test --workspace --no-fail-fast
fi
