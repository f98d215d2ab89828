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

/// `tickvault bench wal`'s settings.
#[derive(Clone, Debug)]
pub struct WalBench {
    pub dir: std::path::PathBuf,
    pub records: u64,
    pub payload_bytes: usize,
    pub naive_records: u64,
    pub rounds: usize,
    /// The NATS server whose JetStream is measured beside the log; `None`: not measured.
    pub nats_url: Option<String>,
    /// Seconds of live appends alone and beside the backfill.
    pub pressure_secs: u64,
}

/// JetStream used as the durable buffer, as users of such pipelines pick it: a
/// file-storage stream, `records` publishes of `payload_bytes` each with up to
/// `window` PubAcks in flight (a publish counts once acknowledged), then a replay
/// through an ordered push consumer. The stream is deleted afterwards.
async fn jetstream_round(url: &str, records: u64, payload_bytes: usize, window: usize) -> anyhow::Result<(Row, Row)> {
    use async_nats::jetstream::{self, consumer::push, stream};
    use futures_util::StreamExt as _;
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let js = jetstream::new(client.clone());
    let name = format!("tickvault-bench-{}", std::process::id());
    let subject = async_nats::Subject::from(format!("tickvault-bench.{}.x", std::process::id()));
    let _ = js.delete_stream(&name).await;
    let created = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.to_string()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await;
    let stream = created.map_err(|e| anyhow::anyhow!("creating a JetStream stream on {url}: {e}"))?;
    let mut payload = Vec::new();
    let mut pending = std::collections::VecDeque::with_capacity(window);
    let started = Instant::now();
    for n in 0..records {
        synthetic::fill(Synthetic { run: 2, producer: 0, n }, payload_bytes, &mut payload);
        if pending.len() >= window {
            let ack: jetstream::context::PublishAckFuture = pending.pop_front().expect("window");
            ack.await?;
        }
        pending.push_back(js.publish(subject.clone(), payload.clone().into()).await?);
    }
    while let Some(ack) = pending.pop_front() {
        ack.await?;
    }
    let publish = Row {
        name: format!("JetStream: acknowledged publishes, file storage ({window} PubAcks in flight)"),
        records,
        secs: started.elapsed().as_secs_f64(),
    };
    let consumer = stream
        .create_consumer(push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("creating a consumer: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow::anyhow!("consuming: {e}"))?;
    let started = Instant::now();
    let (mut seen, mut bytes) = (0u64, 0usize);
    while seen < records {
        match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
            Ok(Some(Ok(m))) => {
                seen += 1;
                bytes += m.payload.len();
            }
            Ok(Some(Err(e))) => anyhow::bail!("replaying the stream: {e}"),
            Ok(None) | Err(_) => anyhow::bail!("the stream's replay stopped after {seen} of {records} messages"),
        }
    }
    anyhow::ensure!(
        bytes == records as usize * payload_bytes,
        "replayed payloads differ in size"
    );
    let replay = Row {
        name: "JetStream: replay through an ordered push consumer".into(),
        records: seen,
        secs: started.elapsed().as_secs_f64(),
    };
    js.delete_stream(&name)
        .await
        .map_err(|e| anyhow::anyhow!("deleting {name}: {e}"))?;
    Ok((publish, replay))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// In-flight PubAcks for JetStream's publishes: the sink's own live window.
const JETSTREAM_WINDOW: usize = 4_096;
/// Targets (BENCHMARKS.md): durable appends with 4 producers, against JetStream's
/// acknowledged publishes in the same run, and replay reads.
const TARGET_APPENDS: f64 = 1_500_000.0;
const TARGET_VS_JETSTREAM: f64 = 5.0;
const TARGET_REPLAY: f64 = 3_000_000.0;

pub async fn wal(bench: WalBench) -> anyhow::Result<ExitCode> {
    let WalBench {
        dir,
        records,
        payload_bytes,
        naive_records,
        rounds,
        nats_url,
        pressure_secs,
    } = bench;
    let dir = dir.as_path();
    anyhow::ensure!(
        payload_bytes >= synthetic::MIN_PAYLOAD,
        "--payload-bytes must be at least 16"
    );
    anyhow::ensure!(rounds >= 1, "--rounds must be at least 1");
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempfile::Builder::new().prefix("wal-bench-").tempdir_in(dir)?;
    eprintln!("benchmarking in {} ...", tmp.path().display());

    let naive = naive_synced_puts(&tmp.path().join("naive"), naive_records, payload_bytes)?;
    eprintln!("  {}: {:.0} records/s", naive.name, naive.rate());
    // Per round: tickvault with 1 and 4 producers, its replay, then JetStream: the two
    // alternate, so that the machine's moods fall on both.
    let mut table: Vec<(String, Vec<f64>)> = Vec::new();
    let mut put = |name: &str, rate: f64| match table.iter_mut().find(|(n, _)| n == name) {
        Some((_, rates)) => rates.push(rate),
        None => table.push((name.to_owned(), vec![rate])),
    };
    let mut jetstream_error = None;
    for round in 1..=rounds {
        let (wal1, one) = group_commit(&tmp.path().join(format!("p1-{round}")), records, payload_bytes, 1).await?;
        wal1.shutdown().await?;
        drop(wal1);
        let (wal4, four) = group_commit(&tmp.path().join(format!("p4-{round}")), records, payload_bytes, 4).await?;
        let (read, scan) = replay(&wal4)?;
        wal4.shutdown().await?;
        drop(wal4);
        eprintln!(
            "  round {round}: tickvault 1 producer {:.0}/s, 4 producers {:.0}/s, replay {:.0}/s",
            one.rate(),
            four.rate(),
            read.rate()
        );
        put(
            "tickvault: durable appends, 1 producer (1,000-record batches)",
            one.rate(),
        );
        put("tickvault: durable appends, 4 producers", four.rate());
        put(&read.name, read.rate());
        put(&scan.name, scan.rate());
        if let (Some(url), None) = (&nats_url, &jetstream_error) {
            match jetstream_round(url, records, payload_bytes, JETSTREAM_WINDOW).await {
                Ok((publish, replayed)) => {
                    eprintln!(
                        "  round {round}: JetStream publishes {:.0}/s, replay {:.0}/s",
                        publish.rate(),
                        replayed.rate()
                    );
                    put(&publish.name, publish.rate());
                    put(&replayed.name, replayed.rate());
                }
                Err(e) => {
                    eprintln!("  JetStream not measured: {e:#}");
                    jetstream_error = Some(format!("{e:#}"));
                }
            }
        }
    }
    let (idle, loaded, backfill_rate) =
        live_under_load(&tmp.path().join("pressure"), pressure_secs, payload_bytes).await?;

    let cores = cores();
    println!(
        "## tickvault bench wal: {payload_bytes}-byte payloads, {records} records per run, {rounds} round{}, {cores} cores, log on {}",
        if rounds == 1 { "" } else { "s" },
        dir.display()
    );
    println!();
    println!(
        "| run | {} | median records/s | vs naive |",
        (1..=rounds)
            .map(|r| format!("round {r}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("| --- |{} ---: | ---: |", " ---: |".repeat(rounds));
    println!("| {} |{} {:.0} | 1x |", naive.name, " |".repeat(rounds), naive.rate());
    let mut medians = std::collections::HashMap::new();
    for (name, rates) in &table {
        let m = median(&mut rates.clone());
        medians.insert(name.as_str(), m);
        println!(
            "| {name} | {} | {m:.0} | {:.0}x |",
            rates.iter().map(|r| format!("{r:.0}")).collect::<Vec<_>>().join(" | "),
            m / naive.rate().max(1e-9)
        );
    }
    println!();
    let appends = medians["tickvault: durable appends, 4 producers"];
    let replay_rate = medians["replay: read batches of 10,000 (decoded, CRC checked, copied)"];
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    println!(
        "Targets: durable appends with 4 producers {appends:.0}/s (target {TARGET_APPENDS:.0}: {}); replay {replay_rate:.0}/s (target {TARGET_REPLAY:.0}: {}).",
        verdict(appends >= TARGET_APPENDS),
        verdict(replay_rate >= TARGET_REPLAY)
    );
    let js_name = format!("JetStream: acknowledged publishes, file storage ({JETSTREAM_WINDOW} PubAcks in flight)");
    match (medians.get(js_name.as_str()), &jetstream_error, &nats_url) {
        (Some(js), _, _) => {
            let js_replay = medians["JetStream: replay through an ordered push consumer"];
            println!(
                "Against JetStream as the buffer, medians of the same rounds: appends {:.2}x its acknowledged publishes (target {TARGET_VS_JETSTREAM}x: {}), replay {:.2}x its consumer. tickvault acknowledges after fsync; JetStream (nats-server's default `sync_interval`, 2 min) once the message is in its file store, before any fsync.",
                appends / js.max(1e-9),
                verdict(appends / js.max(1e-9) >= TARGET_VS_JETSTREAM),
                replay_rate / js_replay.max(1e-9)
            );
        }
        (None, Some(e), _) => println!("JetStream not measured: {e}"),
        (None, None, _) => println!("JetStream not measured (--nats-url none)."),
    }
    println!(
        "4 producers vs 1: {:.2}x. Every tickvault record was acknowledged only after a synced write (fsync).",
        appends / medians["tickvault: durable appends, 1 producer (1,000-record batches)"].max(1e-9)
    );
    println!();
    println!(
        "Live appends (one record every 2 ms, {pressure_secs} s each), alone and beside a backfill appending \
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
