#!/usr/bin/env bash
# Stage the function app as Azure Functions expects it (see `deploychain package`): host.json, one
# folder per function with its function.json, the release `handler` and the pipeline policy, in
# target/functionapp/ and target/functionapp.zip.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo run -q -p deploychain -- package --out "${1:-target}"
