#!/usr/bin/env bash
# Installs the Debian packages tickvault's build needs, if they are missing.
# RocksDB's Rust bindings are generated with bindgen, which needs libclang; its C++ is
# compiled with clang (.cargo/config.toml; faster than g++, whose libstdc++ it uses); TLS
# to Polygon uses the system OpenSSL.
set -euo pipefail

need=()
for pkg in libclang-dev clang g++ pkg-config libssl-dev; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing: ${need[*]}" >&2
    $sudo apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${need[@]}" >/dev/null
fi
# The compiler cache (scripts/lib/cache.sh): a build works without it, so a failed
# install is said and not fatal.
if ! command -v sccache >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing: sccache" >&2
    [ ${#need[@]} -gt 0 ] || $sudo apt-get update -q >/dev/null || true
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q sccache >/dev/null \
        || echo "sccache could not be installed: building without a compiler cache" >&2
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }

# With --test, what the tests need besides: promtool (Debian's prometheus package) for
# the alert rules' tests, Python's prometheus_client, the real parser the metrics test
# reads /metrics with (from Debian, or from PyPI for a python3 that is not Debian's),
# pyarrow (PyPI), and tmux, the terminal the demo's screen is tested in.
if [ "${1:-}" = "--test" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    test_need=()
    command -v promtool >/dev/null 2>&1 || test_need+=(prometheus)
    command -v tmux >/dev/null 2>&1 || test_need+=(tmux)
    dpkg -s python3-prometheus-client >/dev/null 2>&1 || test_need+=(python3-prometheus-client)
    if [ ${#test_need[@]} -gt 0 ]; then
        echo "installing: ${test_need[*]}" >&2
        $sudo apt-get update -q >/dev/null
        # The prometheus package is here for promtool: no server is started by it.
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${test_need[@]}" >/dev/null
    fi
    if ! python3 -c 'import prometheus_client' 2>/dev/null; then
        echo "installing: prometheus-client (PyPI) for $(command -v python3)" >&2
        python3 -m pip install -q 'prometheus-client>=0.16,<1'
    fi
    # pyarrow: the independent reader tests/export.rs reads the Parquet export with.
    if ! python3 -c 'import pyarrow' 2>/dev/null; then
        echo "installing: pyarrow (PyPI) for $(command -v python3)" >&2
        python3 -m pip install -q 'pyarrow>=14' 2>/dev/null \
            || python3 -m pip install -q --break-system-packages 'pyarrow>=14'
    fi
fi
