#!/usr/bin/env bash
# Azurite (the Azure Storage emulator, from npm) for the Table store's tests, into target/azurite.
set -euo pipefail
cd "$(dirname "$0")/.."
dir=target/azurite
if [ -x "$dir/node_modules/.bin/azurite-table" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "npm is needed to install Azurite (Node 20 is on the CI image)" >&2
  exit 1
fi
mkdir -p "$dir"
(cd "$dir" && npm install --silent --no-audit --no-fund --prefix . azurite@3 >/dev/null)
echo "installed Azurite into $dir"
