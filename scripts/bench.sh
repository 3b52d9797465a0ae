#!/usr/bin/env bash
# Every benchmark, in release: each prints its figures next to a floor measured in the same run
# (docs/benchmarks.md records them). Arguments go to `cargo bench` after `--` for one benchmark:
#   bash scripts/bench.sh                          # all of them
#   bash scripts/bench.sh stack chain 1000         # one benchmark, its own arguments
# The stack benchmark runs the handler `deploychain package` ships; it is built first
# (DEPLOYCHAIN_BENCH_HANDLER=PATH runs another build instead, to compare).
set -euo pipefail
cd "$(dirname "$0")/.."
# What ships: the static musl handler `deploychain package` builds (the stack benchmark runs it).
bash scripts/install-musl.sh
cargo build --release --quiet --target x86_64-unknown-linux-musl -p deploychain-functions --bin handler
if [ $# -gt 0 ]; then
  bench="$1"; shift
  case "$bench" in
    stack) pkg=deploychain ;;
    throughput) pkg=deploychain-bus ;;
    *) pkg=deploychain-functions ;;
  esac
  exec cargo bench --quiet -p "$pkg" --bench "$bench" -- "$@"
fi
for b in handler approval_links telemetry; do
  echo "== $b"; cargo bench --quiet -p deploychain-functions --bench "$b"
done
echo "== bus throughput"; cargo bench --quiet -p deploychain-bus --bench throughput
echo "== stack"; cargo bench --quiet -p deploychain --bench stack
