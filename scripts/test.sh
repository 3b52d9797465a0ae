#!/usr/bin/env bash
# The test command: every test of the workspace. Needs the Rust toolchain; installs Chromium and
# ChromeDriver (Debian packages) for the browser test, and Azurite (npm) for the Table store's
# tests, when they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# The browser test drives Debian's Chromium through ChromeDriver; install them when missing.
bash scripts/install-browser.sh
# The Table store's tests run against Azurite (the Storage emulator, from npm).
bash scripts/install-azurite.sh
# The infrastructure tests read the Bicep with pycep-parser (PyPI), as CI's infra check does.
bash scripts/install-infra-tools.sh pycep
# The package test builds the static handler that ships: the musl target and musl-gcc.
bash scripts/install-musl.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  # nextest does not run doctests
  cargo test --workspace --doc
else
  cargo test --workspace --no-fail-fast
fi
# The handler and stack benchmarks at a tiny size (they check what they measure; nothing is timed).
cargo test -p deploychain-functions --bench handler
cargo test -p deploychain --bench stack
