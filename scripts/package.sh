#!/usr/bin/env bash
# Builds the Debian package (cargo-deb, metadata in Cargo.toml, assets in packaging/)
# and prints its path. Installs what it needs; the release build it makes reuses the
# one the other scripts made (RocksDB is not compiled again).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
. scripts/lib/cache.sh
CARGO_DEB_VERSION=3.8.0
if [ "$(cargo deb --version 2>/dev/null | awk '{print $2}')" != "$CARGO_DEB_VERSION" ]; then
    echo "== installing cargo-deb $CARGO_DEB_VERSION" >&2
    cargo install cargo-deb --locked --version "$CARGO_DEB_VERSION" >&2
fi
# cargo-deb builds the binary (the same build as the tests', so nothing is compiled twice)
# and prints the package's path.
cargo deb --locked
