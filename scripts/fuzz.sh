#!/usr/bin/env bash
# The fuzz targets (fuzz/, cargo-fuzz + libFuzzer with AddressSanitizer): installs cargo-fuzz
# when missing, writes the seed corpora from the real fixtures, and runs every target for a fixed
# time (FUZZ_SECONDS each, default 60; CI runs a short one). A crash stops the script; libFuzzer
# leaves the input in target/fuzz/artifacts/<target>/.
#   bash scripts/fuzz.sh              # every target
#   bash scripts/fuzz.sh webhook 600  # one target, ten minutes
# The toolchain is stable: RUSTC_BOOTSTRAP lets cargo-fuzz pass its -Z flags (sanitizer, coverage).
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
tools="$root/target/tools"
if ! [ -x "$tools/bin/cargo-fuzz" ]; then
  echo "installing cargo-fuzz into $tools"
  cargo install --quiet --locked cargo-fuzz --version 0.13.1 --root "$tools"
fi
export PATH="$tools/bin:$PATH" RUSTC_BOOTSTRAP=1
targets=(webhook envelope cloudevent approval_token policy)
seconds="${FUZZ_SECONDS:-60}"
if [ $# -gt 0 ]; then targets=("$1"); seconds="${2:-$seconds}"; fi

cd fuzz
# The fuzz crate resolves to the same versions as the workspace.
[ -f Cargo.lock ] || cp ../Cargo.lock Cargo.lock
out="$root/target/fuzz"
cargo fuzz build --target-dir "$out/build" -O
bin="$out/build/x86_64-unknown-linux-gnu/release"
rm -rf "$out/seeds"
"$bin/seeds" "$root" "$out/seeds"
for t in "${targets[@]}"; do
  echo "== fuzz $t (${seconds}s)"
  mkdir -p "$out/corpus/$t" "$out/artifacts/$t"
  log="$out/$t.log"
  # -rss_limit_mb and -malloc_limit_mb make unbounded allocation a finding, not a slow machine.
  status=0
  "$bin/$t" "$out/corpus/$t" "$out/seeds/$t" \
    -max_total_time="$seconds" -rss_limit_mb=1024 -malloc_limit_mb=256 -timeout=10 \
    -artifact_prefix="$out/artifacts/$t/" -print_final_stats=1 >"$log" 2>&1 || status=$?
  grep -E "^(INFO: seed corpus|#[0-9]+ +DONE|stat::number_of_executed_units|stat::peak_rss_mb)" "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 40 "$log" >&2
    echo "fuzz $t failed (exit $status); the input is in $out/artifacts/$t/" >&2
    exit 1
  fi
done
