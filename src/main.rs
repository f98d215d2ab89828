use std::process::ExitCode;

/// mimalloc, not glibc's malloc: the sink runners allocate and free small buffers for
/// every row (the row, its JSON, its key, the client's own), and glibc's `malloc`/`free`
/// took about a quarter of the backfill runner's CPU while it forwarded to JetStream
/// (perf). With mimalloc the daemon spent 5-27% less CPU per row forwarded, per sink
/// (BENCHMARKS.md, "CPU per row").
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tickvault::cli::main()
}
