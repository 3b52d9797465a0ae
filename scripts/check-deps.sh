#!/usr/bin/env bash
# Dependency checks with cargo-deny (deny.toml): licenses, bans (wildcard versions; duplicate
# versions are listed), sources (crates.io only). Installs cargo-deny into target/tools when it
# is missing. Runs offline: the crates are the ones the build already fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$PWD/target/tools"
if ! [ -x "$tools/bin/cargo-deny" ]; then
  echo "installing cargo-deny into $tools"
  cargo install --quiet --locked cargo-deny --version 0.20.2 --root "$tools"
fi
status=0
out=$("$tools/bin/cargo-deny" --offline check licenses bans sources 2>&1) || status=$?
if [ "$status" -ne 0 ]; then
  echo "$out"
  exit "$status"
fi
dupes=$(grep -c '^warning\[duplicate\]' <<<"$out" || true)
echo "cargo-deny: $(tail -n 1 <<<"$out"); $dupes crates in two versions (\`cargo deny check bans\` lists them)"
