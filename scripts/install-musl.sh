#!/usr/bin/env bash
# What a static build of the handler needs (`deploychain package`, and so `deploychain up`): the
# x86_64-unknown-linux-musl standard library (rustup) and a C compiler for musl (Debian's
# musl-tools: musl-gcc), which builds the vendored OpenSSL and SQLite. Decision 0022.
set -euo pipefail
target=x86_64-unknown-linux-musl
if ! rustup target list --installed 2>/dev/null | grep -qx "$target"; then
  echo "installing the Rust standard library for $target (rustup)"
  rustup target add "$target"
fi
if ! command -v musl-gcc >/dev/null 2>&1; then
  echo "installing musl-tools (Debian) for musl-gcc"
  sudo=""
  if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -q musl-tools >/dev/null || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q musl-tools >/dev/null; }
fi
command -v musl-gcc >/dev/null
