# Sourced by every script that builds. A fresh clone compiles RocksDB's C++ and every
# dependency again (11-35 minutes here); sccache, as RUSTC_WRAPPER, serves them from a
# cache shared by all clones on the machine (the `cc` crate that builds RocksDB honours
# it too). A wrapper the caller set, even an empty one (`RUSTC_WRAPPER=` turns the
# cache off), is kept; without sccache the build is exactly as before.
if [ -z "${RUSTC_WRAPPER+set}" ] && command -v sccache >/dev/null 2>&1; then
    export RUSTC_WRAPPER=sccache
fi
# sccache's server starts with the first compile and exits after 10 idle minutes; a
# compile that meets it exiting fails ("Timed out waiting for server startup", seen
# here). So each script wakes it before building, a few times if need be (which also
# gives the build 10 minutes of a live server), and builds without the cache rather
# than not at all.
if [ "${RUSTC_WRAPPER:-}" = sccache ]; then
    for attempt in 1 2 3 4; do
        sccache --show-stats >/dev/null 2>&1 && break
        if [ "$attempt" = 4 ]; then
            echo "warning: sccache's server does not answer: building without the compiler cache" >&2
            export RUSTC_WRAPPER=
        else
            sleep 3
        fi
    done
fi
