#!/usr/bin/env bash
# Runs every fuzz target (fuzz/) for SECONDS each (default 20), from the seeds in
# fuzz/seeds/ and a corpus kept under target/fuzz-corpus/, and prints per target its
# executions, executions per second and whether it crashed. Installs cargo-fuzz if it is
# missing. cargo-fuzz's flags need a nightly compiler; RUSTC_BOOTSTRAP=1 lets the stable
# one take them. The targets link tickvault-core only: no RocksDB is compiled here.
# A crash leaves its input in fuzz/artifacts/TARGET/ and exits 1; make it a regression
# test (docs/testing.md#fuzzing).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-20}
. scripts/lib/cache.sh
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing: cargo-fuzz" >&2
    cargo install -q cargo-fuzz --locked --version '^0.13'
fi
export RUSTC_BOOTSTRAP=1
# Its own target directory: the instrumented build shares nothing with the release one.
fuzz=(cargo fuzz run --fuzz-dir fuzz --target-dir target/fuzz -s none)
targets=$(cargo fuzz list --fuzz-dir fuzz)
echo "== cargo fuzz build" >&2
cargo fuzz build --fuzz-dir fuzz --target-dir target/fuzz -s none >&2

printf '| target | seconds | executions | executions/s | result |\n| --- | ---: | ---: | ---: | --- |\n'
failed=0
for target in $targets; do
    corpus=target/fuzz-corpus/$target
    mkdir -p "$corpus"
    log=$(mktemp)
    seeds=()
    [ -d "fuzz/seeds/$target" ] && seeds=("fuzz/seeds/$target")
    if "${fuzz[@]}" "$target" "$corpus" "${seeds[@]}" -- \
        -max_total_time="$seconds" -print_final_stats=1 -rss_limit_mb=2048 >"$log" 2>&1; then
        result=ok
    else
        failed=1
        tail -40 "$log" >&2
        if ls "fuzz/artifacts/$target"/crash-* >/dev/null 2>&1; then
            result="CRASH (fuzz/artifacts/$target/)"
        else
            result="did not run (its output is above)"
        fi
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    printf '| %s | %s | %s | %s | %s |\n' "$target" "$seconds" "${runs:-?}" "${rate:-?}" "$result"
    rm -f "$log"
done
exit $failed
