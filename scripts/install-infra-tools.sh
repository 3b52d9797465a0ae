#!/usr/bin/env bash
# The Bicep tools, from PyPI into a virtualenv under target/infra-tools: pycep-parser (the tests read
# the function app's settings with it) and, with `all`, checkov (CI's infrastructure check).
#   bash scripts/install-infra-tools.sh pycep|all
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/infra-tools
want=(); [ "${1:-all}" = all ] && want+=("checkov>=3.2,<4")
want+=("pycep-parser>=0.5")
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import pycep' 2>/dev/null || { [ "${1:-all}" = all ] && [ ! -x "$venv/bin/checkov" ]; }; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${want[@]}"
fi
