# Sourced by every script that builds. A fresh clone compiles RocksDB's C++ and every
# dependency again (11-35 minutes here); sccache, as RUSTC_WRAPPER, serves them from a
# cache shared by all clones on the machine (the `cc` crate that builds RocksDB honours
# it too). A wrapper the caller set, even an empty one (`RUSTC_WRAPPER=` turns the
# cache off), is kept; without sccache the build is exactly as before.
if [ -z "${RUSTC_WRAPPER+set}" ] && command -v sccache >/dev/null 2>&1; then
    export RUSTC_WRAPPER=sccache
fi
