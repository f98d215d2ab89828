//! `tickvault bench wal`: the log's figures, measured side by side in one run.

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tickvault_wal::{Lane, RecordKind, Wal};

use super::load::load;
use crate::synthetic::{self, Synthetic};

struct Row {
    name: String,
    records: u64,
    secs: f64,
}

impl Row {
    fn rate(&self) -> f64 {
        self.records as f64 / self.secs.max(1e-9)
    }
}

/// The cores this process may run on, as every benchmark reports them.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The baseline: what a plain loop of single synced RocksDB puts achieves.
fn naive_synced_puts(path: &Path, records: u64, payload_bytes: usize) -> anyhow::Result<Row> {
    let db = rocksdb::DB::open_default(path)?;
    let mut opts = rocksdb::WriteOptions::default();
    opts.set_sync(true);
    let mut payload = Vec::new();
    let started = Instant::now();
    for n in 0..records {
        synthetic::fill(Synthetic { run: 0, producer: 0, n }, payload_bytes, &mut payload);
        let value = tickvault_wal::record::encode(RecordKind(200), &payload)?;
        db.put_opt((n + 1).to_be_bytes(), value, &opts)?;
    }
    Ok(Row {
        name: "naive loop: one synced put per record".into(),
        records,
        secs: started.elapsed().as_secs_f64(),
    })
}

async fn group_commit(path: &Path, records: u64, payload_bytes: usize, producers: usize) -> anyhow::Result<(Wal, Row)> {
    let wal = Wal::open(path)?;
    let figures = load(
        &wal,
        Lane::Live,
        records,
        payload_bytes,
        producers,
        1000,
        Arc::new(|_| {}),
    )
    .await?;
    Ok((
        wal,
        Row {
            name: format!(
                "group commit, {producers} producer{} ({:.0} records/fsync)",
                if producers == 1 { "" } else { "s" },
                figures.records as f64 / figures.group_commits.max(1) as f64
            ),
            records,
            secs: figures.elapsed.as_secs_f64(),
        },
    ))
}

fn replay(wal: &Wal) -> anyhow::Result<(Row, Row)> {
    let reader = wal.reader();
    let started = Instant::now();
    let mut after = 0;
    let mut copied = 0u64;
    loop {
        let batch = reader.read(Lane::Live, after, 10_000)?;
        if batch.last_seq == after {
            break;
        }
        anyhow::ensure!(batch.corrupt.is_empty(), "corruption during the benchmark");
        copied += batch.records.len() as u64;
        after = batch.last_seq;
    }
    let read = Row {
        name: "replay: read batches of 10,000 (decoded, CRC checked, copied)".into(),
        records: copied,
        secs: started.elapsed().as_secs_f64(),
    };
    let started = Instant::now();
    let mut verified = 0u64;
    let mut bad = 0u64;
    reader.scan(Lane::Live, 0, u64::MAX, |_, decoded| {
        match decoded {
            Ok(_) => verified += 1,
            Err(_) => bad += 1,
        }
        true
    })?;
    anyhow::ensure!(bad == 0, "corruption during the benchmark");
    let scan = Row {
        name: "replay: scan in place (decoded, CRC checked)".into(),
        records: verified,
        secs: started.elapsed().as_secs_f64(),
    };
    Ok((read, scan))
}

/// Live append latency, µs: one record every 2 ms for `secs`, alone, then while a
/// backfill producer appends batches of 8,192 as fast as the log takes them and a
/// cursor and a truncation every second delete what it wrote (range deletions, space
/// reclaims and the compactions they bring: the pressure under which RocksDB slows
/// writes). Returns (idle, under load, backfill records/s under load).
async fn live_under_load(
    path: &Path,
    secs: u64,
    payload_bytes: usize,
) -> anyhow::Result<(hdrhistogram::Histogram<u64>, hdrhistogram::Histogram<u64>, f64)> {
    let wal = Wal::open(path)?;
    let record = |n: u64| -> anyhow::Result<tickvault_wal::Batch> {
        let mut payload = Vec::new();
        synthetic::fill(Synthetic { run: 0, producer: 9, n }, payload_bytes, &mut payload);
        let mut batch = tickvault_wal::Batch::new();
        batch.push(RecordKind(200), &payload)?;
        Ok(batch)
    };
    let live = async |duration: Duration| -> anyhow::Result<hdrhistogram::Histogram<u64>> {
        let mut h = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
        let mut tick = tokio::time::interval(Duration::from_millis(2));
        let started = Instant::now();
        let mut n = 0;
        while started.elapsed() < duration {
            tick.tick().await;
            let batch = record(n)?;
            n += 1;
            let sent = Instant::now();
            wal.append(Lane::Live, batch).await?;
            h.record(sent.elapsed().as_micros().max(1) as u64)?;
        }
        Ok(h)
    };
    let idle = live(Duration::from_secs(secs)).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let appended = Arc::new(AtomicU64::new(0));
    let backfill = {
        let (wal, stop, appended) = (wal.clone(), stop.clone(), appended.clone());
        tokio::spawn(async move {
            let mut payload = Vec::new();
            let mut n = 0u64;
            let mut truncated_at = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                let mut batch = tickvault_wal::Batch::new();
                for _ in 0..8_192 {
                    synthetic::fill(Synthetic { run: 1, producer: 0, n }, payload_bytes, &mut payload);
                    batch.push(RecordKind(200), &payload)?;
                    n += 1;
                }
                wal.append(Lane::Backfill, batch).await?;
                appended.fetch_add(8_192, Ordering::Relaxed);
                if truncated_at.elapsed() >= Duration::from_secs(1) {
                    wal.move_cursor("bench", Lane::Backfill, wal.head(Lane::Backfill))
                        .await?;
                    wal.move_cursor("bench", Lane::Live, wal.head(Lane::Live)).await?;
                    wal.truncate(Duration::ZERO).await?;
                    truncated_at = Instant::now();
                }
            }
            anyhow::Ok(())
        })
    };
    // Let the backfill fill the memtables first: flushes and compactions under way.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = (appended.load(Ordering::Relaxed), Instant::now());
    let loaded = live(Duration::from_secs(secs)).await?;
    let rate = (appended.load(Ordering::Relaxed) - before.0) as f64 / before.1.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    backfill.await??;
    wal.shutdown().await?;
    Ok((idle, loaded, rate))
}

pub async fn wal(dir: &Path, records: u64, payload_bytes: usize, naive_records: u64) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        payload_bytes >= synthetic::MIN_PAYLOAD,
        "--payload-bytes must be at least 16"
    );
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempfile::Builder::new().prefix("wal-bench-").tempdir_in(dir)?;
    eprintln!("benchmarking in {} ...", tmp.path().display());

    let naive = naive_synced_puts(&tmp.path().join("naive"), naive_records, payload_bytes)?;
    eprintln!("  {}: {:.0} records/s", naive.name, naive.rate());
    let (wal1, one) = group_commit(&tmp.path().join("p1"), records, payload_bytes, 1).await?;
    wal1.shutdown().await?;
    drop(wal1);
    eprintln!("  {}: {:.0} records/s", one.name, one.rate());
    let (wal4, four) = group_commit(&tmp.path().join("p4"), records, payload_bytes, 4).await?;
    eprintln!("  {}: {:.0} records/s", four.name, four.rate());
    let (read, scan) = replay(&wal4)?;
    wal4.shutdown().await?;
    drop(wal4);
    const PRESSURE_SECS: u64 = 10;
    let (idle, loaded, backfill_rate) =
        live_under_load(&tmp.path().join("pressure"), PRESSURE_SECS, payload_bytes).await?;
    eprintln!(
        "  live appends under a backfill load: p99 {} µs idle, {} µs loaded",
        idle.value_at_quantile(0.99),
        loaded.value_at_quantile(0.99)
    );

    let cores = cores();
    println!(
        "## tickvault bench wal: {payload_bytes}-byte payloads, {records} records per group-commit run, {cores} cores, log on {}",
        dir.display()
    );
    println!();
    println!("| run | records | seconds | records/s | vs naive |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for row in [&naive, &one, &four, &read, &scan] {
        println!(
            "| {} | {} | {:.3} | {:.0} | {:.0}x |",
            row.name,
            row.records,
            row.secs,
            row.rate(),
            row.rate() / naive.rate().max(1e-9)
        );
    }
    println!();
    println!(
        "4 producers vs 1: {:.2}x. Every group-commit record was acknowledged only after a synced write (fsync).",
        four.rate() / one.rate().max(1e-9)
    );
    println!();
    println!(
        "Live appends (one record every 2 ms, {PRESSURE_SECS} s each), alone and beside a backfill appending \
         batches of 8,192 at full speed ({backfill_rate:.0} records/s) with a truncation every second:"
    );
    println!();
    println!("| live append, µs | p50 | p99 | p99.9 | max |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (name, h) in [("alone", &idle), ("beside the backfill", &loaded)] {
        println!(
            "| {name} | {} | {} | {} | {} |",
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
    }
    Ok(ExitCode::SUCCESS)
}
