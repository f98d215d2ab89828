#!/usr/bin/env bash
# The figures of the offline commands (BENCHMARKS.md): export of a log of about
# MILLIONS million minute bars (default 10) to Parquet, CSV and JSONL, with rows/s and
# peak RSS; and recovery after SIGKILL (`tickvault drill`, the log alone) with a backlog
# of 1 and of MILLIONS million records. Builds nothing: run after `scripts/demo.sh` or
# `cargo build --release`. Work files in target/bench-offline/ (several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
millions=${1:-10}
bin=target/release/tickvault
work=target/bench-offline
rm -rf "$work" && mkdir -p "$work"

addr=127.0.0.1:$((20000 + RANDOM % 20000))
$bin simulate --listen "$addr" --always-open >/dev/null 2>&1 &
sim=$!
trap 'kill $sim 2>/dev/null' EXIT
sleep 1
printf '[polygon]\nrest_url = "http://%s"\n' "$addr" >"$work/c.toml"
# Ten forex pairs, 1,440 bars a day each: the days that make MILLIONS million bars.
days=$(( (millions * 1000000 + 14399) / 14400 ))
from=$(date -u -d "2025-12-31 - $((days - 1)) days" +%F)
echo "== a log of $((days * 14400)) bars: ten pairs from $from to 2025-12-31" >&2
TICKVAULT_POLYGON_API_KEY=bench $bin backfill --config "$work/c.toml" --data-dir "$work/log" \
    --symbol C:EURUSD,C:GBPUSD,C:USDJPY,C:AUDUSD,C:USDCAD,C:USDCHF,C:NZDUSD,C:EURGBP,C:EURJPY,C:GBPJPY \
    --from "$from" --to 2025-12-31 >/dev/null
rows=$($bin wal summary --data-dir "$work/log" --json | python3 -c 'import json,sys; print(sum(l["records"] for l in json.load(sys.stdin)["lanes"]))')

echo
echo "| export to | rows | seconds | rows/s | peak RSS (MB) | file (MB) |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
for format in parquet csv jsonl; do
    /usr/bin/time -f "%e %M" -o "$work/time" $bin export --data-dir "$work/log" --format $format --out "$work/$format" >/dev/null
    read -r secs kb <"$work/time"
    size=$(du -sm "$work/$format" | cut -f1)
    python3 -c "print(f'| {\"$format\"} | {$rows:,} | {$secs:.1f} | {$rows/$secs:,.0f} | {$kb/1024:.0f} | {$size} |')"
    rm -rf "${work:?}/$format"
done

echo
echo "| backlog (records) | restarts | recovery min / median / max (ms) |"
echo "| ---: | ---: | --- |"
for backlog in 1000000 $((millions * 1000000)); do
    out=$($bin drill --config config/demo.toml --cycles 5 --seed 1 --backlog $backlog --data-dir "$work/drill-$backlog" --json)
    python3 -c "
import json,sys
r = json.loads(sys.stdin.read())
ms = sorted(r['recovery_ms'])
assert r['passed'], 'the drill failed'
print(f'| {$backlog:,} | {len(ms)} | {ms[0]:.0f} / {ms[len(ms)//2]:.0f} / {ms[-1]:.0f} |')" <<<"$out"
    rm -rf "${work:?}/drill-$backlog"
done
