//! The binary's edge: parse the command line, run, turn errors into exit codes.
//!
//! Exit codes: 0 success; 1 a check found a problem or the operation failed; 2 bad
//! input (command line, config, a directory that is not a log, a newer log format).

use std::process::ExitCode;

use clap::Parser;

use super::args::{BenchCommand, Cli, Command, WalCommand};
use super::bench_sinks::Duties;
use crate::settings::ConfigError;

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo and the backfill command draw their own progress: keep logs to warnings.
    // `verify` prints a report: the same.
    let quiet = matches!(
        cli.command,
        Command::Demo { .. } | Command::Backfill { .. } | Command::Verify { .. }
    );
    // The sink clients' own info lines (server notices, connection events) are noise
    // beside ours; their warnings still show.
    init_tracing(if quiet {
        "warn"
    } else {
        "info,tokio_postgres=warn,async_nats=warn"
    });
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            if is_bad_input(&err) {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn is_bad_input(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.is::<ConfigError>()
            || cause.is::<super::BadInput>()
            || matches!(
                cause.downcast_ref::<tickvault_wal::OpenError>(),
                Some(
                    tickvault_wal::OpenError::NotALog { .. }
                        | tickvault_wal::OpenError::NotFound { .. }
                        | tickvault_wal::OpenError::NewerFormat { .. }
                        | tickvault_wal::OpenError::Damaged { .. }
                )
            )
    })
}

fn init_tracing(default: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TICKVAULT_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Every secret blanked in other crates' lines, at whatever level.
        .with_writer(crate::settings::LogWriter)
        // Colour only on a terminal: logs in files and journals stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Validate { config } => super::validate::run(&config),
        Command::Run { config, data_dir } => runtime()?.block_on(super::run::run(&config, data_dir)),
        Command::Demo {
            config,
            duration,
            data_dir,
            plain,
        } => runtime()?.block_on(super::demo::run(config, duration, data_dir, plain)),
        Command::Verify {
            config,
            data_dir,
            json,
            max_lag,
        } => runtime()?.block_on(super::verify::run(&config, data_dir, json, max_lag)),
        Command::Simulate {
            listen,
            api_key,
            seed,
            faults,
            quotes_per_minute,
            requests_per_minute,
            always_open,
        } => runtime()?.block_on(super::run::simulate(
            crate::sim::SimOptions {
                seed,
                api_key,
                faults,
                quotes_per_minute,
                requests_per_minute,
                always_open,
                ..Default::default()
            },
            listen,
        )),
        Command::Backfill {
            config,
            symbol,
            from,
            to,
            data_dir,
        } => runtime()?.block_on(super::backfill::run(&config, &symbol, from, to, data_dir)),
        Command::Export(spec) => super::export::run(&spec),
        Command::Replay(spec) => runtime()?.block_on(super::replay::run(&spec)),
        Command::Drill(spec) => runtime()?.block_on(super::drill::run(&spec)),
        Command::Gaps(spec) => super::gaps::run(&spec),
        Command::Aggregate(spec) => super::aggregate::run(&spec),
        Command::Wal { command } => match command {
            WalCommand::Summary { data_dir, json } => super::wal::summary(&data_dir, json),
            WalCommand::Dump {
                data_dir,
                lane,
                from,
                to,
            } => super::wal::dump(&data_dir, lane, from, to),
            WalCommand::Check { data_dir } => super::wal::check(&data_dir),
            WalCommand::Load(spec) => runtime()?.block_on(super::load::run(spec)),
        },
        Command::Bench { command } => match command {
            BenchCommand::Aggregate { dir, minutes, quick } => {
                super::bench_aggregate::run(&dir, if quick { 10_000 } else { minutes })
            }
            BenchCommand::Gaps { dir, years, quick } => {
                runtime()?.block_on(super::bench_gaps::run(&dir, if quick { 1 } else { years }))
            }
            BenchCommand::Repair { dir, runs } => runtime()?.block_on(super::bench_repair::run(&dir, runs.max(1))),
            BenchCommand::Capture {
                dir,
                seconds,
                backfill_years,
                quota,
                quota_seconds,
                quick,
            } => runtime()?.block_on(super::bench_capture::capture(
                &dir,
                if quick { 2 } else { seconds },
                if quick { backfill_years.min(1) } else { backfill_years },
                quota,
                if quick { 5 } else { quota_seconds },
            )),
            BenchCommand::Sinks {
                dir,
                seconds,
                backfill_years,
                rounds,
                part,
                sinks,
                backfill_duty,
                capture_duty,
                budget,
                quick,
            } => runtime()?.block_on(super::bench_sinks::sinks(
                &dir,
                if quick { 3 } else { seconds },
                backfill_years,
                if quick { 1 } else { rounds.max(1) },
                part,
                &sinks,
                Duties {
                    forwarding: backfill_duty,
                    capture: capture_duty,
                    budget,
                },
            )),
            BenchCommand::Wal {
                dir,
                records,
                payload_bytes,
                naive_records,
                rounds,
                nats_url,
                quick,
            } => runtime()?.block_on(super::bench::wal(super::bench::WalBench {
                dir,
                records: if quick { 20_000 } else { records },
                payload_bytes,
                naive_records: if quick { 200 } else { naive_records },
                rounds: if quick { 1 } else { rounds },
                nats_url: (nats_url != "none").then_some(nats_url),
                pressure_secs: if quick { 2 } else { 10 },
            })),
        },
    }
}
