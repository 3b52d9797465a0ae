#!/usr/bin/env bash
# Installs what the browser test (tests/tests/browser.rs) drives: Debian's Chromium and its
# ChromeDriver. A no-op when both are on the PATH already. Needs root or sudo (apt-get).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != "0" ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-browser: need root or sudo to apt-get install chromium chromium-driver" >&2
    exit 1
  fi
fi
echo "install-browser: installing chromium and chromium-driver (Debian packages) for the browser test"
export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; then
  $SUDO apt-get update -q >/dev/null
  $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null
fi
command -v chromium >/dev/null && command -v chromedriver >/dev/null
