#!/usr/bin/env bash
# The main job (README): builds tickvault and runs the demo on a local log.
# Until capture lands, the demo drives the durable log with synthetic records: it
# appends them with synced group commits, verifies every record, and summarises the log.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --bin tickvault
tv=target/release/tickvault
dir=demo-data/log
mkdir -p demo-data

echo "== appending 2,000,000 synthetic 100-byte records to $dir (4 producers, synced group commits)"
"$tv" wal load --data-dir "$dir" --lane live --records 2000000 --producers 4 --payload-bytes 100 | tail -n 1
echo "== 200,000 more on the backfill lane"
"$tv" wal load --data-dir "$dir" --lane backfill --records 200000 --producers 2 --payload-bytes 100 | tail -n 1
echo "== verifying every record's envelope and CRC"
"$tv" wal check --data-dir "$dir"
echo "== the log"
"$tv" wal summary --data-dir "$dir"
