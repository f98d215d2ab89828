//! `tickvault bench capture`: capture's figures against the simulator on loopback.

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tickvault_wal::Wal;

use crate::event::Feed;
use crate::settings::Secret;
use crate::sim::{self, SimOptions};
use crate::source::live::{self, LiveSpec, LiveStats};

const FOREX_14: &str =
    "EUR/USD,GBP/USD,USD/JPY,AUD/USD,USD/CHF,USD/CAD,NZD/USD,EUR/GBP,EUR/JPY,GBP/JPY,EUR/CHF,AUD/JPY,EUR/AUD,GBP/CHF";

/// A simulator on its own thread and runtime, so its work is not the collector's.
fn simulator_thread(options: SimOptions) -> anyhow::Result<(String, std::sync::mpsc::Sender<()>)> {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        rt.block_on(async move {
            let Ok(handle) = sim::spawn("127.0.0.1:0".parse().expect("literal"), options).await else {
                return;
            };
            let _ = addr_tx.send(handle.ws_url());
            let _ = tokio::task::spawn_blocking(move || stop_rx.recv()).await;
            let _ = handle.stop().await;
        });
    });
    let url = addr_rx
        .recv_timeout(Duration::from_secs(10))
        .context("simulator did not start")?;
    Ok((url, stop_tx))
}

struct LiveRow {
    target: u64,
    captured_per_sec: f64,
    p50: f64,
    p99: f64,
    max: f64,
}

/// Serves `/metrics` for the collector's stats and scrapes it every 100 ms until
/// `shutdown`: metrics on, many times harder than a Prometheus scraping every 15 s.
async fn scraped(
    wal: &Wal,
    log: &Path,
    stats: &Arc<LiveStats>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (_room_tx, room) = tokio::sync::watch::channel(crate::disk::Room::default());
    let sources = crate::metrics::Sources {
        wal: wal.clone(),
        data_dir: log.to_owned(),
        live: vec![(Feed::Crypto, stats.clone())],
        backfill: None,
        aggregate: None,
        verifier: None,
        sinks: Vec::new(),
        priority: Arc::new(crate::sink::priority::Priority::new(0, 1.0, Duration::ZERO)),
        calendar: crate::calendar::Calendar::default(),
        retention: Duration::from_secs(86_400),
        reserve: crate::disk::Reserve::Bytes(crate::disk::MIN_RESERVE),
        room,
    };
    let (addr, server) = crate::metrics::serve("127.0.0.1:0".parse()?, sources, shutdown.clone()).await?;
    tokio::spawn(server);
    let mut shutdown = shutdown;
    tokio::spawn(async move {
        let _room_tx = _room_tx;
        let client = reqwest::Client::new();
        let url = format!("http://{addr}/metrics");
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Ok(r) = client.get(&url).send().await {
                        let _ = r.bytes().await;
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    });
    Ok(())
}

async fn live_latency(dir: &Path, events_per_sec: u64, seconds: u64, metrics: bool) -> anyhow::Result<LiveRow> {
    let symbols: Vec<String> = (0..10).map(|i| format!("S{i}-USD")).collect();
    let per_symbol_per_minute = u32::try_from(events_per_sec * 60 / symbols.len() as u64).unwrap_or(u32::MAX);
    let options = SimOptions {
        quotes_per_minute: per_symbol_per_minute,
        always_open: true,
        ..SimOptions::default()
    };
    let (ws_url, stop_sim) = simulator_thread(options)?;
    let log = dir.join(format!(
        "live-{events_per_sec}-{}",
        if metrics { "metrics" } else { "plain" }
    ));
    let wal = Wal::open(&log)?;
    let stats = Arc::new(LiveStats::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let spec = LiveSpec {
        feed: Feed::Crypto,
        ws_url,
        api_key: Secret::new("bench"),
        symbols,
        channels: vec!["XQ".into()],
        stale_after: Duration::from_secs(10),
        reconnect_min: Duration::from_millis(100),
        reconnect_max: Duration::from_secs(1),
    };
    if metrics {
        scraped(&wal, &log, &stats, shutdown.clone()).await?;
    }
    let task = tokio::spawn(live::run(spec, wal.clone(), stats.clone(), shutdown));
    // Let the connection settle before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stats.reset_latency();
    let before = stats.captured();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let captured = stats.captured() - before;
    let elapsed = started.elapsed().as_secs_f64();
    let row = LiveRow {
        target: events_per_sec,
        captured_per_sec: captured as f64 / elapsed,
        p50: stats.latency_ms(0.5),
        p99: stats.latency_ms(0.99),
        max: stats.latency_ms(1.0),
    };
    stop.send(true).ok();
    task.await??;
    wal.shutdown().await?;
    let _ = stop_sim.send(());
    Ok(row)
}

/// A child process killed when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn simulate_child(extra: &[&str]) -> anyhow::Result<(Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(std::env::current_exe()?)
        .args(["simulate", "--listen", &addr])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    for _ in 0..200 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    Ok((Child(child), addr))
}

fn backfill_child(
    dir: &Path,
    name: &str,
    config: &str,
    symbols: &str,
    from: &str,
    to: &str,
) -> anyhow::Result<std::process::Child> {
    let config_path = dir.join(format!("{name}.toml"));
    std::fs::write(&config_path, config)?;
    Ok(Command::new(std::env::current_exe()?)
        .args(["backfill", "--config"])
        .arg(&config_path)
        .args(["--symbol", symbols, "--from", from, "--to", to, "--data-dir"])
        .arg(dir.join(name))
        .env("TICKVAULT_POLYGON_API_KEY", "bench")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?)
}

fn figure(line: &str, after: &str) -> Option<f64> {
    let at = line.find(after)? + after.len();
    line[at..]
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

pub async fn capture(
    dir: &Path,
    seconds: u64,
    backfill_years: u32,
    quota: u32,
    quota_seconds: u64,
) -> anyhow::Result<ExitCode> {
    std::fs::create_dir_all(dir)?;
    let tmp = tempfile::Builder::new().prefix("capture-bench-").tempdir_in(dir)?;
    let cores = super::bench::cores();
    println!(
        "## tickvault bench capture: {cores} cores, simulator on loopback, log in {}",
        dir.display()
    );
    println!();
    println!("Live: frame received to durable in the log (synced group commit), crypto XQ quotes over 10 symbols, {seconds} s per rate, simulator on its own thread; each rate without metrics, then with /metrics served and scraped every 100 ms.");
    println!();
    println!("| target events/s | metrics | captured events/s | p50 ms | p99 ms | max ms |");
    println!("| ---: | --- | ---: | ---: | ---: | ---: |");
    for rate in [1_000, 10_000] {
        let mut p99 = [0.0; 2];
        for (i, metrics) in [false, true].into_iter().enumerate() {
            let row = live_latency(tmp.path(), rate, seconds, metrics).await?;
            p99[i] = row.p99;
            println!(
                "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} |",
                row.target,
                if metrics { "scraped /100 ms" } else { "off" },
                row.captured_per_sec,
                row.p50,
                row.p99,
                row.max
            );
        }
        println!(
            "| {rate} | p99 on/off | | | {:.2}x | |",
            p99[1] / p99[0].max(f64::MIN_POSITIVE)
        );
    }

    if backfill_years > 0 {
        let (_sim, addr) = simulate_child(&[])?;
        let to_year = 2025;
        let from = format!("{}-01-01", to_year - backfill_years as i32);
        let config =
            format!("[polygon]\nrest_url = \"http://{addr}\"\n[backfill]\nchunk = \"90days\"\nconcurrency = 2\n");
        let child = backfill_child(
            tmp.path(),
            "backfill",
            &config,
            FOREX_14,
            &from,
            &format!("{}-12-31", to_year - 1),
        )?;
        let out = child.wait_with_output()?;
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        println!();
        println!("Backfill: 14 forex symbols x {backfill_years} years of 1-minute bars, `tickvault backfill` and `tickvault simulate` as separate processes:");
        println!();
        println!("    {line}");
    }

    if quota > 0 {
        let (_sim, addr) = simulate_child(&["--requests-per-minute", &quota.to_string()])?;
        let config = format!(
            "[polygon]\nrest_url = \"http://{addr}\"\nrequests_per_minute = {quota}\n[backfill]\nchunk = \"1day\"\npage_limit = 50\nconcurrency = 2\n"
        );
        let child = backfill_child(tmp.path(), "quota", &config, "BTC-USD", "2020-01-01", "2024-12-31")?;
        let pid = child.id();
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(quota_seconds)).await;
        let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
        let out = child.wait_with_output()?;
        let secs = started.elapsed().as_secs_f64();
        let line = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let requests = figure(&line, " pages, ").unwrap_or(0.0);
        let limited = figure(&line, "retries (").unwrap_or(f64::NAN);
        println!();
        println!("Quota: simulator limit {quota} requests/minute per key, downloader configured with the same quota, {secs:.0} s:");
        println!();
        println!("    {line}");
        println!();
        println!(
            "    {requests:.0} requests in {secs:.0} s = {:.1} requests/minute, {:.1}% of the quota, {limited:.0} answered 429",
            requests / secs * 60.0,
            requests / secs * 60.0 / f64::from(quota) * 100.0
        );
    }
    Ok(ExitCode::SUCCESS)
}
