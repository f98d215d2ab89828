//! `tickvault replay`: a range of a log pushed into one configured sink without the
//! daemon, through the sink's own code and natural keys, then `verify` of that range and
//! sink. The log is opened read-only (beside a running daemon, or a copy from another
//! box) and nothing in it changes: no cursor moves, and PostgreSQL's cursor rows are
//! left as they are (a range is not "everything up to a position").
//!
//! Replaying twice, or over what a daemon sent, leaves each key once: ClickHouse and
//! PostgreSQL keep one row per key by themselves; JetStream would store a copy again
//! beyond its duplicate window, so the ids the stream holds on the lane are read first
//! and only the rows it lacks are published. A write the sink keeps failing ends the
//! replay (exit 1, naming the sink); running it again sends the range again.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use tickvault_wal::{Lane, LogReader, Wal};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::daemon::FORWARDED_LANES;
use crate::sink::clickhouse::ClickHouseSink;
use crate::sink::nats::NatsSink;
use crate::sink::postgres::PostgresSink;
use crate::sink::{Batch, Pushed, Sink, SinkError};
use crate::verify::{self, Replayed};

/// What to replay.
#[derive(Clone, Debug, clap::Args)]
pub struct ReplaySpec {
    #[arg(long)]
    pub config: PathBuf,
    /// The log (opened read-only); default the config's `log.data_dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The sink, one the config enables.
    #[arg(long, value_parser = ["clickhouse", "postgres", "nats"])]
    pub sink: String,
    /// One lane (default: live and backfill).
    #[arg(long)]
    pub lane: Option<Lane>,
    /// Events at or after this market time (`2025-03-01` in UTC, or RFC 3339).
    #[arg(long, value_parser = super::export::parse_instant)]
    pub from: Option<i64>,
    /// Events before this market time.
    #[arg(long, value_parser = super::export::parse_instant)]
    pub to: Option<i64>,
    /// How long a write may keep failing before the replay gives up.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub give_up_after: Duration,
}

/// Records read from the log at a time, and so rows per write at most.
const BATCH_RECORDS: usize = 20_000;

/// Figures of one lane's replay.
#[derive(Default)]
struct Sent {
    rows: u64,
    /// In the range, already in the stream (JetStream only): not published again.
    already_there: u64,
    outside_range: u64,
    not_events: u64,
    undecodable: u64,
    /// Failed their CRC (`tickvault wal check` lists them).
    corrupt: u64,
    up_to: u64,
}

pub async fn run(spec: &ReplaySpec) -> anyhow::Result<ExitCode> {
    let config = super::run::load_config(&spec.config, spec.data_dir.clone())?;
    let name: &'static str = match spec.sink.as_str() {
        "clickhouse" => "clickhouse",
        "postgres" => "postgres",
        _ => "nats",
    };
    if !config.sinks.enabled().contains(&name) {
        return Err(crate::settings::ConfigError::field(
            &spec.config.display().to_string(),
            &format!("sinks.{name}.enabled"),
            "replay needs the sink enabled (its connection settings come from this section)",
        )
        .into());
    }
    let lanes: Vec<Lane> = match spec.lane {
        None => FORWARDED_LANES.to_vec(),
        Some(lane) if FORWARDED_LANES.contains(&lane) => vec![lane],
        Some(lane) => {
            return Err(super::BadInput(format!("--lane {lane}: only live, backfill and derived are forwarded")).into())
        }
    };
    let data_dir = config.log.data_dir.clone();
    let reader = Wal::open_read_only(&data_dir)?;
    let (from_ms, to_ms) = (spec.from.unwrap_or(i64::MIN), spec.to.unwrap_or(i64::MAX));
    let range = Range {
        lanes,
        from_ms,
        to_ms,
        give_up_after: spec.give_up_after,
    };
    let started = Instant::now();
    let sent = send(&config, name, &reader, &range).await;
    drop(reader);
    let sent = match sent {
        Ok(sent) => sent,
        Err(e) => return failed(name, &e),
    };
    let elapsed = started.elapsed().as_secs_f64();

    let mut out = std::io::stdout().lock();
    let mut sent_up_to = [0u64; FORWARDED_LANES.len()];
    let mut rows = 0;
    for (lane, s) in range.lanes.iter().zip(&sent) {
        sent_up_to[FORWARDED_LANES.iter().position(|l| l == lane).unwrap_or(0)] = s.up_to;
        rows += s.rows;
        let mut notes = Vec::new();
        for (n, what) in [
            (s.already_there, "already in the stream"),
            (s.outside_range, "outside the range"),
            (s.not_events, "not events"),
            (s.undecodable, "undecodable"),
            (s.corrupt, "corrupt (`tickvault wal check` lists them)"),
        ] {
            if n > 0 {
                notes.push(format!("{n} {what}"));
            }
        }
        let notes = if notes.is_empty() {
            String::new()
        } else {
            format!(" ({})", notes.join(", "))
        };
        writeln!(
            out,
            "{name} {:<8} {} rows sent, the lane read up to seq {}{notes}",
            lane.name(),
            s.rows,
            s.up_to
        )?;
    }
    writeln!(
        out,
        "replayed {rows} rows into {name} in {elapsed:.1} s ({:.0} rows/s)",
        rows as f64 / elapsed.max(1e-9)
    )?;

    let report = verify::verify_replay(
        &config,
        &data_dir,
        &Replayed {
            sink: name,
            sent_up_to,
            from_ms,
            to_ms,
        },
    )
    .await?;
    let verdict = if report.matches() { "MATCH" } else { "DIFFERS" };
    writeln!(
        out,
        "verify {name}: {verdict}: {} keys replayed, {} keys held in the range, {} groups x days",
        report.passed, report.in_sink, report.groups_checked
    )?;
    if let Some(e) = &report.error {
        writeln!(out, "  cannot read the sink: {e}")?;
    }
    for d in report.differences.iter().take(20) {
        writeln!(
            out,
            "  {} {} {} {} {}: missing {}, extra {}, duplicates {}",
            d.group.feed, d.group.symbol, d.group.kind, d.group.timeframe, d.date, d.missing, d.extra, d.duplicates
        )?;
    }
    Ok(if report.matches() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn failed(name: &str, e: &SinkError) -> anyhow::Result<ExitCode> {
    eprintln!("replay: sink {name} failed: {e}; run the replay again when it is back (each key is sent once)");
    Ok(ExitCode::FAILURE)
}

/// Replays `range` of the log `reader` reads into the sink `name` of `config`.
async fn send(config: &Config, name: &'static str, reader: &LogReader, range: &Range) -> Result<Vec<Sent>, SinkError> {
    match name {
        "clickhouse" => replay(ClickHouseSink::new(&config.sinks.clickhouse), reader, range, None).await,
        "postgres" => {
            let log_id = reader.log_id().map_err(|e| SinkError::fatal("log", "read", e))?;
            replay(
                PostgresSink::new(&config.sinks.postgres, &log_id).for_replay(),
                reader,
                range,
                None,
            )
            .await
        }
        _ => {
            let mut sink = NatsSink::new(&config.sinks.nats);
            let mut stored = HashSet::new();
            for &lane in &range.lanes {
                let mut retry = Retry::new(range.give_up_after);
                while let Err(e) = sink
                    .stored_ids(lane, |id| {
                        stored.insert(id.to_owned());
                    })
                    .await
                {
                    retry.after(e).await?;
                }
            }
            replay(sink, reader, range, Some(&stored)).await
        }
    }
}

/// The whole of `data_dir`'s forwarded lanes into sink `name` (for `bench sinks`): the
/// rows sent.
pub async fn replay_all(config: &Config, data_dir: &Path, name: &'static str) -> anyhow::Result<u64> {
    let reader = Wal::open_read_only(data_dir)?;
    let range = Range {
        lanes: FORWARDED_LANES.to_vec(),
        from_ms: i64::MIN,
        to_ms: i64::MAX,
        give_up_after: Duration::from_secs(30),
    };
    let sent = send(config, name, &reader, &range).await?;
    Ok(sent.iter().map(|s| s.rows).sum())
}

struct Range {
    lanes: Vec<Lane>,
    from_ms: i64,
    to_ms: i64,
    give_up_after: Duration,
}

/// Tries again while a sink's error is retriable, for up to `give_up_after`.
struct Retry {
    started: Instant,
    backoff: Backoff,
    give_up_after: Duration,
}

impl Retry {
    fn new(give_up_after: Duration) -> Retry {
        Retry {
            started: Instant::now(),
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
            give_up_after,
        }
    }

    /// Waits before the next try, or gives `e` back when there is to be none.
    async fn after(&mut self, e: SinkError) -> Result<(), SinkError> {
        if !e.retriable || self.started.elapsed() >= self.give_up_after {
            return Err(e);
        }
        tracing::warn!(error = %e, "sink failed; retrying");
        tokio::time::sleep(self.backoff.next_delay()).await;
        Ok(())
    }
}

async fn replay<S: Sink>(
    mut sink: S,
    reader: &LogReader,
    range: &Range,
    stored: Option<&HashSet<String>>,
) -> Result<Vec<Sent>, SinkError> {
    let mut heads = Vec::new();
    for &lane in &range.lanes {
        let head = reader.last_seq(lane).map_err(|e| SinkError::fatal("log", "read", e))?;
        heads.push((lane, reader.first_retained(lane).unwrap_or(1), head.unwrap_or(0)));
    }
    let total: u64 = heads
        .iter()
        .map(|(_, first, last)| (last + 1).saturating_sub(*first))
        .sum();
    let bar = super::export::records_bar("replay", total);
    let mut out = Vec::new();
    for (lane, _, head) in heads {
        let mut sent = Sent::default();
        let mut after = 0;
        while after < head {
            let read = reader
                .read(lane, after, BATCH_RECORDS)
                .map_err(|e| SinkError::fatal("log", "read", e))?;
            if read.last_seq <= after {
                break;
            }
            let mut batch = Batch::new(lane, after);
            for record in read.records.iter().filter(|r| r.seq <= head) {
                match batch.push(record) {
                    Pushed::Row => {}
                    Pushed::Skipped => sent.not_events += 1,
                    Pushed::Undecodable => sent.undecodable += 1,
                }
            }
            let before = batch.rows.len();
            batch
                .rows
                .retain(|row| (range.from_ms..range.to_ms).contains(&row.ts_ms));
            sent.outside_range += (before - batch.rows.len()) as u64;
            if let Some(stored) = stored {
                let before = batch.rows.len();
                batch.rows.retain(|row| !stored.contains(&row.key_string()));
                sent.already_there += (before - batch.rows.len()) as u64;
            }
            if !batch.rows.is_empty() {
                let mut retry = Retry::new(range.give_up_after);
                while let Err(e) = sink.write(&batch).await {
                    retry.after(e).await?;
                }
                sent.rows += batch.rows.len() as u64;
            }
            sent.corrupt += read.corrupt.len() as u64;
            let next = read.last_seq.min(head);
            bar.inc(next - after);
            after = next;
        }
        sent.up_to = after;
        out.push(sent);
    }
    bar.finish_and_clear();
    Ok(out)
}
