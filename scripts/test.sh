#!/usr/bin/env bash
# The test command (README): installs what is needed, then runs every check and test.
# Everything runs on the release profile, so RocksDB's C++ is compiled once (20-45 min on
# two cores from a clean checkout, see docs/operations.md) and reused by the tests, the demo and
# the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --test
. scripts/lib/cache.sh
# The sink tests talk to real servers: PostgreSQL, NATS JetStream and ClickHouse on loopback.
scripts/services.sh up

echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
echo "== cargo clippy" >&2
cargo clippy --release --workspace --all-targets -- -D warnings
echo "== scripts/package.sh (the .deb that tests/package.rs installs)" >&2
scripts/package.sh
echo "== cargo test" >&2
cargo test --release --workspace

# Every benchmark suite, quick: each must run and print its table (its figures are not
# checked: speed is BENCHMARKS.md's, measured on a quiet machine).
quick() {
    local table=$1
    shift
    echo "== tickvault $* --quick" >&2
    local out
    out=$(target/release/tickvault "$@" --quick --dir target/bench-quick)
    echo "$out"
    grep -qF "$table" <<<"$out" || { echo "tickvault $*: no table (\"$table\") printed" >&2; exit 1; }
}
quick '| run |' bench wal
quick '| scan |' bench gaps
quick '| path |' bench aggregate
quick '| target events/s |' bench capture
quick 'live capture-to-sink-commit latency' bench sinks

echo "== scripts/fuzz.sh 15 (each fuzz target for 15 s)" >&2
scripts/fuzz.sh 15
