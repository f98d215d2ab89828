//! Command-line shapes. Drills, tests and the packaging rely on these exact forms.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};
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
    /// The daemon: live capture and backfill into the log, until SIGTERM or SIGINT.
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Overrides the config's `log.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// The daemon against an in-process simulator, with live progress and a summary.
    Demo {
        /// Default: config/demo.toml (or the copy built into the binary).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Stop by itself after this many seconds.
        #[arg(long)]
        duration: Option<u64>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// A line a second, as through a pipe, instead of the screen redrawn in place.
        #[arg(long)]
        plain: bool,
    },
    /// The log against every enabled sink, per symbol, timeframe and day; exit 0 only
    /// when every sink matches exactly, 1 listing each difference otherwise.
    Verify {
        #[arg(long)]
        config: PathBuf,
        /// Overrides the config's `log.data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        /// A sink whose oldest unsent event was captured longer ago than this (e.g.
        /// `5m`) does not match: exit 1.
        #[arg(long, value_parser = humantime::parse_duration)]
        max_lag: Option<std::time::Duration>,
    },
    /// A Polygon-compatible server (WebSocket and REST) on one address.
    Simulate {
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: std::net::SocketAddr,
        /// Accept only this key (default: any non-empty key).
        #[arg(long)]
        api_key: Option<String>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Faults, comma-separated: disconnect=DUR, kick=DUR, 429=N, slow=DUR, holes=N, 5xx=N,
        /// malformed=N, interleave=N, delayed=DUR, error200=N, badnext=N, retrydate=1
        /// (see `tickvault::sim::Faults`).
        #[arg(long, default_value = "")]
        faults: crate::sim::Faults,
        /// Average quotes per minute per symbol on the live feed.
        #[arg(long, default_value_t = 120)]
        quotes_per_minute: u32,
        /// REST requests per minute per key before 429 (0: no quota).
        #[arg(long, default_value_t = 0)]
        requests_per_minute: u32,
        /// Serve every market around the clock (no forex weekend, no stock session).
        #[arg(long)]
        always_open: bool,
    },
    /// One backfill from the command line, with a progress bar.
    Backfill {
        #[arg(long)]
        config: PathBuf,
        /// `C:EURUSD`, `EUR/USD`, `X:BTCUSD`, `BTC-USD`, `AAPL`; several, comma-separated.
        #[arg(long)]
        symbol: String,
        /// First day (YYYY-MM-DD, UTC), inclusive.
        #[arg(long)]
        from: jiff::civil::Date,
        /// Last day (YYYY-MM-DD, UTC), inclusive.
        #[arg(long)]
        to: jiff::civil::Date,
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// A range of the log as Parquet, CSV or JSONL files (one per kind of event), from
    /// the log opened read-only: beside a running daemon or on a copy.
    Export(super::export::ExportSpec),
    /// A range of a log pushed into one configured sink without the daemon, then
    /// `verify` of that range and sink (exit 0 only when it matches).
    Replay(super::replay::ReplaySpec),
    /// The crash-recovery drill: the daemon SIGKILLed and restarted against the
    /// simulator, then the log checked against what was sent and the sinks against the
    /// log; exit 1 naming any loss or duplicate.
    Drill(super::drill::DrillSpec),
    /// Per symbol, the minutes in market hours the log has no bar for (from its
    /// coverage index); exit 0 when there is none, 1 otherwise.
    Gaps(super::gaps::GapsSpec),
    /// The derived lane made again from the aggregator's journal and compared with the
    /// log's, record for record; exit 0 when identical, 1 otherwise.
    Aggregate(super::aggregate::AggregateSpec),
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
    Load(super::load::LoadSpec),
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Live frame-to-durable latency at 1,000 and 10,000 events/s, backfill bars/s and
    /// peak RSS, and use of a REST quota, all against the simulator on loopback.
    Capture {
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// Seconds measured per live rate.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Years of minute bars for 14 forex symbols (0 skips the backfill run).
        #[arg(long, default_value_t = 10)]
        backfill_years: u32,
        /// Requests per minute for the quota run (0 skips it).
        #[arg(long, default_value_t = 120)]
        quota: u32,
        /// Seconds the quota run lasts (covering at least two clock minutes is wise).
        #[arg(long, default_value_t = 150)]
        quota_seconds: u64,
        /// A run that checks the suite works, not its speed: 2 s per live rate, one year
        /// of backfill, 5 s of quota.
        #[arg(long)]
        quick: bool,
    },
    /// Live capture-to-sink-commit latency per sink, idle and during a full-speed backfill,
    /// and backfill rows/s per sink, against the servers of `scripts/services.sh up`.
    Sinks {
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// Seconds per live window.
        #[arg(long, default_value_t = 15)]
        seconds: u64,
        /// Years of minute bars for the backfill (3 crypto and 2 forex symbols).
        #[arg(long, default_value_t = 1)]
        backfill_years: u32,
        /// Rounds of an idle and a backfill window (figures are their medians).
        #[arg(long, default_value_t = 3)]
        rounds: u32,
        /// Which part to run: latency, throughput, or both.
        #[arg(long, value_enum, default_value_t = SinkBenchPart::All)]
        part: SinkBenchPart,
        /// The sinks measured (a comma-separated list); the others stay off.
        #[arg(
            long,
            value_delimiter = ',',
            value_parser = ["clickhouse", "postgres", "nats"],
            default_values_t = ["clickhouse".to_owned(), "postgres".to_owned(), "nats".to_owned()]
        )]
        sinks: Vec<String>,
        /// `sinks.backfill_duty` for every window (default: the config's default, 0.5),
        /// e.g. 1 to measure backfill that never pauses for live.
        #[arg(long)]
        backfill_duty: Option<f64>,
        /// `backfill.live_duty` for every window (default: the config's default, 0.5), e.g.
        /// 1 for a capture that never pauses for live.
        #[arg(long)]
        capture_duty: Option<f64>,
        /// `sinks.live_latency_budget` for every window (default: the config's default,
        /// 40ms), e.g. 0ms for the duties as they are, with no budget.
        #[arg(long, value_parser = humantime::parse_duration)]
        budget: Option<std::time::Duration>,
        /// A run that checks the suite works, not its speed: one round of 3 s windows.
        #[arg(long)]
        quick: bool,
    },
    /// Aggregation: one-minute bars of 14 symbols into the 7 default timeframes with
    /// the 6 indicators on one core, the engine alone and the daemon's whole round.
    Aggregate {
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// Minutes per symbol.
        #[arg(long, default_value_t = 100_000)]
        minutes: usize,
        /// 10,000 minutes per symbol, to check the suite works.
        #[arg(long)]
        quick: bool,
    },
    /// The gap scan: a coverage index of 14 forex symbols over `--years` of minutes (a
    /// gap and a source hole a day each), scanned by `tickvault gaps`'s code, against
    /// the same scan a minute at a time.
    Gaps {
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        #[arg(long, default_value_t = 10)]
        years: u32,
        /// One year, to check the suite works.
        #[arg(long)]
        quick: bool,
    },
    /// Gap repair: the time from a live feed's reconnect to the minute it missed being
    /// in the log, the feed cut for 8 s across a minute's close behind a relay, against
    /// the simulator (a run a minute).
    Repair {
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// Durable appends (1 and 4 producers) and replay reads against naive synced single
    /// puts and against NATS JetStream as the buffer, in alternating rounds; live append
    /// latency beside a backfill.
    Wal {
        /// Where the benchmark's logs go (a fresh temporary directory inside it).
        #[arg(long, default_value = "target/bench")]
        dir: PathBuf,
        /// Records per run (tickvault's and JetStream's alike).
        #[arg(long, default_value_t = 2_000_000)]
        records: u64,
        #[arg(long, default_value_t = 100)]
        payload_bytes: usize,
        /// Records for the naive loop of single synced puts (it is slow).
        #[arg(long, default_value_t = 2_000)]
        naive_records: u64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// The NATS server (JetStream enabled) to measure beside the log, as
        /// `scripts/services.sh up` starts it; `none` to leave JetStream out.
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        /// A run that checks the suite works, not its speed: 20,000 records, one round,
        /// 2 s of live appends per part.
        #[arg(long)]
        quick: bool,
    },
}

/// The parts of `bench sinks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SinkBenchPart {
    All,
    Latency,
    Throughput,
}
