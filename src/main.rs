use std::process::ExitCode;

fn main() -> ExitCode {
    tickvault::cli::main()
}
