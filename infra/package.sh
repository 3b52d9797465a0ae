#!/usr/bin/env bash
# Stage the function app as Azure Functions expects it: host.json, one folder per function with its
# function.json, the `handler` executable and the pipeline policy, in one folder (and a zip for
# `az functionapp deployment source config-zip` / Flex Consumption one-deploy).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/functionapp}
cargo build --release -p deploychain-functions --bin handler
rm -rf "$out" && mkdir -p "$out"
cp host.json policy.toml "$out/"
for f in functions/*/function.json; do
  name=$(basename "$(dirname "$f")")
  mkdir -p "$out/$name" && cp "$f" "$out/$name/"
done
cp target/release/handler "$out/handler"
(cd "$out" && rm -f ../functionapp.zip && python3 -m zipfile -c ../functionapp.zip .)
echo "staged $out and $(dirname "$out")/functionapp.zip"
