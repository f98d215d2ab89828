//! Command-line shapes. Drills, tests and the packaging rely on these exact forms.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tickvault_wal::Lane;

#[derive(Debug, Parser)]
#[command(
    name = "tickvault",
    version,
    about = "Market-data ingestion appliance: capture into a durable log, forward exactly once"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check a config file; exit 0 when valid, 2 naming the offending field otherwise.
    Validate {
        #[arg(long)]
        config: PathBuf,
    },
    /// Inspect and exercise the durable log.
    Wal {
        #[command(subcommand)]
        command: WalCommand,
    },
    /// Benchmarks that report figures side by side.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum WalCommand {
    /// Per lane first and last sequence, records and bytes; every cursor; quarantine count.
    Summary {
        #[arg(long)]
        data_dir: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// One JSON object per record, one per line.
    Dump {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        lane: Lane,
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[arg(long, default_value_t = u64::MAX)]
        to: u64,
    },
    /// Verify every record's envelope and CRC; exit 1 if anything is corrupt.
    Check {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Append synthetic records; print `acked LANE SEQ` whenever a batch is durable.
    Load {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        lane: Lane,
        #[arg(long)]
        records: u64,
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
        #[arg(long, default_value_t = 1)]
        producers: usize,
        /// Records per append request.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Durable appends (1 and 4 producers) against naive synced single puts, and replay reads.
    Wal {
        /// Where the benchmark's logs go (a fresh temporary directory inside it).
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// Records per group-commit run.
        #[arg(long, default_value_t = 2_000_000)]
        records: u64,
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
        /// Records for the naive loop of single synced puts (it is slow).
        #[arg(long, default_value_t = 2_000)]
        naive_records: u64,
    },
}
