//! `tickvault wal load`: append synthetic records as fast as the log takes them, and say
//! which are durable. Drills kill it mid-run and check every acknowledged record.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tickvault_wal::{Batch, Lane, Wal};

use crate::event::SYNTHETIC_KIND;
use crate::synthetic::{self, Synthetic};

/// `tickvault wal load`'s arguments.
#[derive(Clone, Debug, clap::Args)]
pub struct LoadSpec {
    #[arg(long)]
    pub data_dir: PathBuf,
    #[arg(long)]
    pub lane: Lane,
    #[arg(long)]
    pub records: u64,
    #[arg(long, default_value_t = 100)]
    pub payload_bytes: usize,
    #[arg(long, default_value_t = 1)]
    pub producers: usize,
    /// Records per append request.
    #[arg(long, default_value_t = 1000)]
    pub batch: usize,
    /// Also act as a sink that keeps this many records behind the head: every 10 ms, move
    /// the cursor `drill` there and truncate what it passed (retention 0), so the log
    /// reclaims space all along. Prints `cursor <lane> <seq>` once a move is durable, and
    /// `reclaims <started> <finished>`. For the crash drill of truncation.
    #[arg(long)]
    pub truncate_behind: Option<u64>,
}

/// The cursor `wal load --truncate-behind` moves.
pub const DRILL_CURSOR: &str = "drill";

/// Keeps the cursor [`DRILL_CURSOR`] `behind` records behind the head and truncates what
/// it passed, every 10 ms, until the log closes.
async fn truncate_behind(wal: Wal, lane: Lane, behind: u64) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    // Forward only, as a sink's: an earlier run may have left it further on.
    let mut cursor = wal.reader().cursor(DRILL_CURSOR, lane)?;
    loop {
        tick.tick().await;
        cursor = cursor.max(wal.head(lane).saturating_sub(behind));
        wal.move_cursor(DRILL_CURSOR, lane, cursor).await?;
        wal.truncate(Duration::ZERO).await?;
        let (started, finished) = wal.reclaims();
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "cursor {} {cursor}\nreclaims {started} {finished}", lane.name());
        let _ = out.flush();
    }
}

/// What a load achieved.
#[derive(Clone, Debug)]
pub struct LoadFigures {
    pub records: u64,
    pub payload_bytes: usize,
    pub producers: usize,
    pub elapsed: Duration,
    pub group_commits: u64,
}

impl LoadFigures {
    pub fn records_per_sec(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn mb_per_sec(&self) -> f64 {
        self.records_per_sec() * self.payload_bytes as f64 / 1e6
    }
}

/// Appends `records` synthetic records with `producers` concurrent producers. Calls
/// `on_ack(durable_head)` after each batch is durable.
pub async fn load(
    wal: &Wal,
    lane: Lane,
    records: u64,
    payload_bytes: usize,
    producers: usize,
    batch: usize,
    on_ack: Arc<dyn Fn(u64) + Send + Sync>,
) -> anyhow::Result<LoadFigures> {
    let producers = producers.max(1);
    let batch = batch.max(1) as u64;
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
        .unwrap_or(0);
    let remaining = Arc::new(AtomicU64::new(records));
    let commits_before = wal.group_commits();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for producer in 0..producers as u32 {
        let wal = wal.clone();
        let remaining = remaining.clone();
        let on_ack = on_ack.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            let mut payload = Vec::with_capacity(payload_bytes);
            loop {
                let take = remaining
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| {
                        (r > 0).then(|| r - r.min(batch))
                    })
                    .map(|r| r.min(batch))
                    .unwrap_or(0);
                if take == 0 {
                    return Ok::<_, anyhow::Error>(());
                }
                let mut records = Batch::with_capacity(take as usize, take as usize * (payload_bytes + 10));
                for _ in 0..take {
                    synthetic::fill(Synthetic { run, producer, n }, payload_bytes, &mut payload);
                    records.push(SYNTHETIC_KIND, &payload)?;
                    n += 1;
                }
                let outcome = wal.append(lane, records).await?;
                on_ack(outcome.durable_head);
            }
        }));
    }
    for task in tasks {
        task.await.context("producer task")??;
    }
    Ok(LoadFigures {
        records,
        payload_bytes,
        producers,
        elapsed: started.elapsed(),
        group_commits: wal.group_commits() - commits_before,
    })
}

pub async fn run(spec: LoadSpec) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        spec.payload_bytes >= synthetic::MIN_PAYLOAD,
        "--payload-bytes must be at least {} (the synthetic header)",
        synthetic::MIN_PAYLOAD
    );
    let wal = Wal::open(&spec.data_dir)?;
    let lane = spec.lane;
    let on_ack: Arc<dyn Fn(u64) + Send + Sync> = Arc::new(move |head| {
        let mut out = std::io::stdout().lock();
        // A drill reads these lines as they come: flush each one.
        let _ = writeln!(out, "acked {} {}", lane.name(), head);
        let _ = out.flush();
    });
    let truncating = spec.truncate_behind.map(|behind| {
        let wal = wal.clone();
        tokio::spawn(async move {
            if let Err(e) = truncate_behind(wal, lane, behind).await {
                eprintln!("wal load: the cursor and truncation stopped: {e:#}");
            }
        })
    });
    let figures = load(
        &wal,
        lane,
        spec.records,
        spec.payload_bytes,
        spec.producers,
        spec.batch,
        on_ack,
    )
    .await?;
    if let Some(task) = truncating {
        task.abort();
    }
    wal.shutdown().await?;
    println!(
        "loaded {} records into {} in {:.2} s: {:.0} records/s, {:.1} MB/s ({} producers, {}-byte payloads, {}-record batches, {} group commits)",
        figures.records,
        lane.name(),
        figures.elapsed.as_secs_f64(),
        figures.records_per_sec(),
        figures.mb_per_sec(),
        figures.producers,
        figures.payload_bytes,
        spec.batch,
        figures.group_commits
    );
    Ok(ExitCode::SUCCESS)
}
