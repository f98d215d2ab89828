#!/usr/bin/env bash
# The main job (README): builds tickvault and runs the demo: the daemon on a local log
# (demo-data/), fed live and with backfill by the built-in Polygon simulator.
# Extra arguments go to `tickvault demo` (e.g. --duration 120); the default is 75 s, long
# enough that the outage the demo stages always falls in it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
. scripts/lib/cache.sh
cargo build --release --bin tickvault
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(--duration 75)
exec target/release/tickvault demo "${args[@]}"
