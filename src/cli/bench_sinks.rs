//! `tickvault bench sinks`: live capture-to-commit latency per sink, idle and during a
//! full-speed backfill, side by side in one run; and backfill rows/s per sink, one sink
//! at a time, forwarding a log captured beforehand, and `tickvault replay` of the same
//! log into the same sink emptied. Against the real servers of
//! `scripts/services.sh up` (databases `tv_bench_*`, streams `TV_BENCH_*`), with the simulator
//! in its own process at the lowest CPU priority (Polygon does not run on the appliance).

use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use tickvault_wal::Lane;

use super::args::SinkBenchPart;
use crate::config::{Config, Secret};
use crate::daemon;

const TARGET: &str = "tv_bench";
const STREAM: &str = "TV_BENCH";

struct Sim(std::process::Child);

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn simulator() -> anyhow::Result<(Sim, String)> {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string();
    let exe = std::env::current_exe()?;
    let child = Command::new("nice")
        .args(["-n", "19"])
        .arg(exe)
        .args([
            "simulate",
            "--listen",
            &addr,
            "--always-open",
            "--quotes-per-minute",
            "6000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the simulator")?;
    let sim = Sim(child);
    for _ in 0..200 {
        if std::net::TcpStream::connect(&addr).is_ok() {
            return Ok((sim, addr));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    anyhow::bail!("the simulator did not start")
}

/// Drops a window's databases in ClickHouse and PostgreSQL and deletes its stream: a
/// leftover of an interrupted run before the window, everything at the end. Never between
/// windows: deleting thousands of ClickHouse part files slows file creation for minutes
/// on some filesystems (ext4 without a journal skips recently freed inodes when it
/// allocates one), and that would fall on the next window.
async fn reset(config: &Config) -> anyhow::Result<()> {
    crate::sink::admin::drop_targets(&config.sinks)
        .await
        .context("the sink servers (scripts/services.sh up)")
}

/// The config of one window: its own log, and its own databases (`tv_bench_<window>`) and
/// stream (`TV_BENCH_<WINDOW>`). Without the aggregator: the captured lanes' forwarding
/// alone, as measured before it came (its own cost: `bench aggregate`).
fn base_config(log: &Path, sim: &str, window: &str) -> anyhow::Result<Config> {
    let mut config = Config::parse(
        "(bench sinks)",
        "[live.crypto]\nsymbols = [\"BTC-USD\", \"ETH-USD\"]\nchannels = [\"XQ\", \"XT\"]\n\
         [backfill]\nenabled = false\n[aggregate]\nenabled = false\n",
    )?;
    config.log.data_dir = log.to_owned();
    config.polygon.ws_url = format!("ws://{sim}");
    config.polygon.rest_url = format!("http://{sim}");
    config.polygon.api_key = Some(Secret::new("bench"));
    let sinks = &mut config.sinks;
    sinks.clickhouse.enabled = true;
    let target = format!("{TARGET}_{window}");
    sinks.clickhouse.database = target.clone();
    sinks.postgres.enabled = true;
    sinks.postgres.database = target.clone();
    sinks.postgres.password = Some(Secret::new(
        std::env::var("TICKVAULT_POSTGRES_PASSWORD").unwrap_or_else(|_| "tickvault".into()),
    ));
    sinks.nats.enabled = true;
    sinks.nats.stream = format!("{STREAM}_{}", window.to_uppercase());
    sinks.nats.subject_prefix = target;
    Ok(config)
}

fn big_backfill(config: &mut Config, years: u32) {
    config.backfill.enabled = true;
    config.backfill.crypto = vec!["BTC-USD".into(), "ETH-USD".into(), "SOL-USD".into()];
    config.backfill.forex = vec!["EUR/USD".into(), "GBP/USD".into()];
    config.backfill.lookback = Duration::from_secs(u64::from(years) * 365 * 86_400);
    config.backfill.chunk = Duration::from_secs(90 * 86_400);
}

/// Waits (up to a minute) until ClickHouse merges nothing, so that the next sink's
/// figure does not pay for the merging of the last one's rows.
async fn settle(config: &Config) {
    let clickhouse = crate::sink::clickhouse::ClickHouseSink::new(&config.sinks.clickhouse);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        match clickhouse.merges_running().await {
            Ok(0) | Err(_) => return,
            Ok(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// One live runner's figures over one window.
struct Window {
    sink: &'static str,
    /// Capture to acknowledged, ms.
    p50: f64,
    p99: f64,
    /// The sink's write alone, ms.
    write_p99: f64,
    /// Capture to the start of the acknowledged write, per row, ms.
    queued_p99: f64,
    /// Backfill rows not yet forwarded to this sink at the end.
    behind: u64,
    /// Backfill rows this sink was sent during the window.
    forwarded: u64,
    /// Time its backfill runner held the backfill permit idle for live, ms.
    yielded_ms: u64,
}

/// The log's side of one window.
struct LogWindow {
    /// Frame received to durable, ms.
    p50: f64,
    p99: f64,
    /// Backfill bars captured.
    captured: u64,
    /// Time the capture paused for live, ms.
    paused_ms: u64,
    /// The backfill's share of its duties (the live latency budget's), sampled every
    /// 100 ms over the window: its mean.
    share: f64,
    /// Periods that found live over its budget during the window.
    cuts: u64,
}

/// Live figures per sink over one window, and the log's.
async fn live_window(config: &Config, seconds: u64) -> anyhow::Result<(Vec<Window>, LogWindow)> {
    reset(config).await?;
    settle(config).await;
    let running = daemon::start(config).await?;
    // The window is measured from the moment every live runner's first write was
    // acknowledged: before it, rows wait for what a first start does once (the
    // window's database, tables and stream made, sessions opened), which is not the
    // steady state either window is about.
    let started = Instant::now();
    let live_runners = || running.sinks.iter().filter(|s| s.lane == Lane::Live);
    while live_runners().any(|s| s.batches.load(Ordering::Relaxed) == 0) {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(60),
            "a live runner wrote nothing in 60 s (are the sink servers up?)"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for s in live_runners() {
        s.reset_latency();
    }
    for (_, live) in &running.live {
        live.reset_latency();
    }
    let (cuts, mut shares) = (running.priority.budget().cuts, Vec::new());
    let until = Instant::now() + Duration::from_secs(seconds);
    while Instant::now() < until {
        shares.push(running.priority.backfill_share());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let backlog = running.wal.head(Lane::Backfill);
    let (p50, p99) = running
        .live
        .first()
        .map_or((0.0, 0.0), |(_, live)| (live.latency_ms(0.5), live.latency_ms(0.99)));
    let log = LogWindow {
        p50,
        p99,
        captured: backlog,
        paused_ms: running
            .backfill
            .as_ref()
            .map_or(0, |b| b.paused_ms.load(Ordering::Relaxed)),
        share: shares.iter().sum::<f64>() / shares.len().max(1) as f64,
        cuts: running.priority.budget().cuts - cuts,
    };
    let mut out = Vec::new();
    for s in running.sinks.iter().filter(|s| s.lane == Lane::Live) {
        let backfill = running
            .sinks
            .iter()
            .find(|b| b.sink == s.sink && b.lane == Lane::Backfill);
        let acked = backfill.map_or(0, |b| b.acked_seq.load(Ordering::Relaxed));
        out.push(Window {
            sink: s.sink,
            p50: s.latency_ms(0.5),
            p99: s.latency_ms(0.99),
            write_p99: s.write_ms(0.99),
            queued_p99: s.queued_ms(0.99),
            behind: backlog.saturating_sub(acked),
            forwarded: backfill.map_or(0, |b| b.rows.load(Ordering::Relaxed)),
            yielded_ms: backfill.map_or(0, |b| b.yielded_ms.load(Ordering::Relaxed)),
        });
    }
    running.shutdown().await?;
    Ok((out, log))
}

fn median(values: &[f64]) -> f64 {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// The duties the windows run with (`None`: the config's default).
pub struct Duties {
    /// `sinks.backfill_duty`.
    pub forwarding: Option<f64>,
    /// `backfill.live_duty`.
    pub capture: Option<f64>,
    /// `sinks.live_latency_budget`.
    pub budget: Option<Duration>,
}

pub async fn sinks(
    dir: &Path,
    seconds: u64,
    years: u32,
    rounds: u32,
    part: SinkBenchPart,
    measured: &[String],
    duties: Duties,
) -> anyhow::Result<ExitCode> {
    let range = crate::sink::config::BACKFILL_DUTY;
    for (flag, duty) in [
        ("--backfill-duty", duties.forwarding),
        ("--capture-duty", duties.capture),
    ] {
        if let Some(duty) = duty.filter(|d| !range.contains(d)) {
            eprintln!(
                "bench sinks: {flag} {duty}: must be between {} and {}",
                range.start(),
                range.end()
            );
            return Ok(ExitCode::from(2));
        }
    }
    if duties
        .budget
        .is_some_and(|b| b > crate::sink::config::LIVE_LATENCY_BUDGET_MAX)
    {
        eprintln!("bench sinks: --budget: must be at most 10s (0ms: no budget)");
        return Ok(ExitCode::from(2));
    }
    let _ = std::fs::remove_dir_all(dir.join("sinks"));
    let dir = dir.join("sinks");
    std::fs::create_dir_all(&dir)?;
    let (_sim, addr) = simulator()?;
    let mut used = Vec::new();
    let only = |config: &mut Config| {
        let on = |name: &str| measured.iter().any(|m| m == name);
        config.sinks.clickhouse.enabled &= on("clickhouse");
        config.sinks.postgres.enabled &= on("postgres");
        config.sinks.nats.enabled &= on("nats");
        if let Some(duty) = duties.forwarding {
            config.sinks.backfill_duty = duty;
        }
        if let Some(duty) = duties.capture {
            config.backfill.live_duty = duty;
        }
        if let Some(budget) = duties.budget {
            config.sinks.live_latency_budget = budget;
        }
    };
    if part != SinkBenchPart::Throughput {
        println!(
            "bench sinks: live crypto BTC-USD, ETH-USD quotes and trades (~400 events/s); \
             {rounds} rounds of an idle then a backfill window, {seconds} s each; sinks.backfill_duty {}, \
             backfill.live_duty {}, sinks.live_latency_budget {:?}",
            duties
                .forwarding
                .unwrap_or(crate::sink::SinksConfig::default().backfill_duty),
            duties
                .capture
                .unwrap_or(crate::config::BackfillConfig::default().live_duty),
            duties
                .budget
                .unwrap_or(crate::sink::SinksConfig::default().live_latency_budget)
        );
        let (mut idle, mut busy) = (Vec::new(), Vec::new());
        let (mut idle_log, mut busy_log) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            let mut idle_config = base_config(&dir.join(format!("idle{round}")), &addr, &format!("idle{round}"))?;
            only(&mut idle_config);
            let (windows, durable) = live_window(&idle_config, seconds).await?;
            idle.push(windows);
            idle_log.push(durable);
            used.push(idle_config);
            let mut busy_config = base_config(&dir.join(format!("busy{round}")), &addr, &format!("busy{round}"))?;
            big_backfill(&mut busy_config, years);
            only(&mut busy_config);
            let (windows, durable) = live_window(&busy_config, seconds).await?;
            busy.push(windows);
            busy_log.push(durable);
            used.push(busy_config);
        }
        println!("\nlive capture-to-sink-commit latency (ms), median of the rounds; (q) capture to the write's start, (w) the sink's write alone");
        println!(
            "  sink         idle p50   idle p99 (q p99 w p99) | backfill p50  backfill p99 (q p99 w p99) | p99 ratio | ratio per round | backfill rows forwarded, yielded s, queued at the end"
        );
        let sinks: Vec<&'static str> = idle
            .first()
            .map(|w| w.iter().map(|w| w.sink).collect())
            .unwrap_or_default();
        // Per sink: live p99 with the backfill, and capture-to-write-start p99 with it
        // against idle (the appliance's own share of a live event's time).
        let mut live_first: Vec<(&'static str, f64, f64)> = Vec::new();
        for sink in sinks {
            let of = |windows: &[Vec<Window>], f: fn(&Window) -> f64| -> Vec<f64> {
                windows
                    .iter()
                    .filter_map(|r| r.iter().find(|w| w.sink == sink))
                    .map(f)
                    .collect()
            };
            let (ip50, ip99, iw99) = (of(&idle, |w| w.p50), of(&idle, |w| w.p99), of(&idle, |w| w.write_p99));
            let (bp50, bp99, bw99) = (of(&busy, |w| w.p50), of(&busy, |w| w.p99), of(&busy, |w| w.write_p99));
            let (iq99, bq99) = (of(&idle, |w| w.queued_p99), of(&busy, |w| w.queued_p99));
            let ratios: Vec<String> = ip99.iter().zip(&bp99).map(|(i, b)| format!("{:.1}x", b / i)).collect();
            let behind = of(&busy, |w| w.behind as f64);
            let forwarded = of(&busy, |w| w.forwarded as f64);
            let yielded = of(&busy, |w| w.yielded_ms as f64 / 1000.0);
            println!(
                "  {sink:<10} {:>10.1} {:>10.1} {:>7.1} {:>5.1} | {:>12.1} {:>13.1} {:>7.1} {:>5.1} | {:>8.2}x | {:<15} | {:.0}, {:.1} s, {:.0}",
                median(&ip50),
                median(&ip99),
                median(&iq99),
                median(&iw99),
                median(&bp50),
                median(&bp99),
                median(&bq99),
                median(&bw99),
                median(&bp99) / median(&ip99),
                ratios.join(" "),
                median(&forwarded),
                median(&yielded),
                median(&behind)
            );
            live_first.push((sink, median(&bp99), median(&bq99) / median(&iq99).max(1e-9)));
        }
        let log = |d: &[LogWindow]| {
            let p50: Vec<f64> = d.iter().map(|w| w.p50).collect();
            let p99: Vec<f64> = d.iter().map(|w| w.p99).collect();
            format!("p50 {:.1} / p99 {:.1}", median(&p50), median(&p99))
        };
        let captured: Vec<f64> = busy_log.iter().map(|w| w.captured as f64).collect();
        let paused: Vec<f64> = busy_log.iter().map(|w| w.paused_ms as f64 / 1000.0).collect();
        println!(
            "  the log's share (frame received to durable): idle {}, backfill {}; \
             backfill bars captured {:.0}, the capture paused for live {:.1} s",
            log(&idle_log),
            log(&busy_log),
            median(&captured),
            median(&paused)
        );
        let budget = duties
            .budget
            .unwrap_or(crate::sink::SinksConfig::default().live_latency_budget)
            .as_secs_f64()
            * 1000.0;
        let p99 = |d: &[LogWindow]| median(&d.iter().map(|w| w.p99).collect::<Vec<_>>());
        let against_budget: Vec<String> = live_first
            .iter()
            .map(|(sink, p99, _)| {
                let verdict = if budget > 0.0 && *p99 <= budget {
                    "within"
                } else {
                    "over"
                };
                format!("{sink} {p99:.1} ({verdict})")
            })
            .collect();
        let queued: Vec<String> = live_first
            .iter()
            .map(|(sink, _, q)| format!("{sink} {q:.2}x"))
            .collect();
        println!(
            "  live first, with the backfill: live p99 (ms) against sinks.live_latency_budget {budget:.0} ms: {}; \
             the appliance's own share against idle (target 1.5x): received to durable {:.2}x, queued before the write: {}",
            against_budget.join(", "),
            p99(&busy_log) / p99(&idle_log).max(1e-9),
            queued.join(", ")
        );
        let shares: Vec<String> = busy_log.iter().map(|w| format!("{:.2}", w.share)).collect();
        let cuts: Vec<String> = busy_log.iter().map(|w| w.cuts.to_string()).collect();
        println!(
            "  the backfill's share of its duties under the live latency budget, mean per round: {}; \
             periods with live over the budget: {}",
            shares.join(" "),
            cuts.join(" ")
        );
    }
    if part == SinkBenchPart::Latency {
        return clean_up(&used).await;
    }

    // Throughput: capture the backfill once with no sink, then forward it to one sink at a time.
    let log = dir.join("throughput");
    let mut capture = base_config(&log, &addr, "capture")?;
    big_backfill(&mut capture, years);
    capture.live.enabled = false;
    capture.sinks.clickhouse.enabled = false;
    capture.sinks.postgres.enabled = false;
    capture.sinks.nats.enabled = false;
    let running = daemon::start(&capture).await?;
    // The backfill passes again every few minutes: its first pass is the capture.
    let stats = running.backfill.clone().context("no backfill configured")?;
    while stats.passes.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let rows = running.wal.head(Lane::Backfill);
    running.shutdown().await?;
    println!("\nbackfill forwarding, one sink at a time ({rows} rows from the log, batches as configured)");
    for sink in ["clickhouse", "postgres", "nats"] {
        if !measured.iter().any(|m| m == sink) {
            continue;
        }
        let mut config = base_config(&log, &addr, &format!("tp_{sink}"))?;
        config.live.enabled = false;
        config.sinks.clickhouse.enabled = sink == "clickhouse";
        config.sinks.postgres.enabled = sink == "postgres";
        config.sinks.nats.enabled = sink == "nats";
        reset(&config).await?;
        let running = daemon::start(&config).await?;
        let (started, cpu, server_cpu) = (Instant::now(), process_cpu(), server_ticks(sink));
        let stats = running
            .sinks
            .iter()
            .find(|s| s.lane == Lane::Backfill)
            .context("no backfill runner")?
            .clone();
        while stats.acked_seq.load(Ordering::Relaxed) < rows && started.elapsed() < Duration::from_secs(600) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = process_cpu().saturating_sub(cpu).as_secs_f64();
        let now = server_ticks(sink);
        let server_cpu = now
            .iter()
            .map(|(pid, ticks)| ticks.saturating_sub(server_cpu.get(pid).copied().unwrap_or(0)))
            .sum::<u64>() as f64
            / clock_ticks();
        let done = stats.rows.load(Ordering::Relaxed);
        let per_row = |seconds: f64| seconds * 1e6 / done.max(1) as f64;
        let (ours, theirs) = (per_row(cpu), per_row(server_cpu));
        let cores = super::bench::cores() as f64;
        let server = if now.is_empty() {
            "the server is not on this machine".to_owned()
        } else {
            format!(
                "the server's {theirs:.2}; {cores} cores fully used by both: at most {:.0} rows/s",
                cores * 1e6 / (ours + theirs)
            )
        };
        println!(
            "  {sink:<10} {done} rows in {secs:.2} s = {:.0} rows/s ({} batches); CPU per row (us): tickvault's {ours:.2}, {server}",
            done as f64 / secs,
            stats.batches.load(Ordering::Relaxed),
        );
        running.shutdown().await?;
        settle(&config).await;
        // The same log into the same sink emptied, by `tickvault replay` instead.
        reset(&config).await?;
        let started = Instant::now();
        let replayed = super::replay::replay_all(&config, &log, sink).await?;
        let replay_secs = started.elapsed().as_secs_f64();
        println!(
            "  {:<10} replay: {replayed} rows in {replay_secs:.2} s = {:.0} rows/s, {:.2}x the daemon's forwarding",
            "",
            replayed as f64 / replay_secs,
            (replayed as f64 / replay_secs) / (done as f64 / secs).max(1e-9)
        );
        settle(&config).await;
        used.push(config);
    }
    clean_up(&used).await
}

/// CPU time (user and system) this process has used so far: a figure per row that the
/// servers' share of the cores and the machine's other tenants do not move as much as
/// they move rows/s.
fn process_cpu() -> Duration {
    // SAFETY: getrusage writes into the struct it is given and reads nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// CPU time (user and system, in clock ticks) of each process of a sink's server on this
/// machine (none when it runs elsewhere), found by command name (Linux keeps 15 bytes of
/// one), with what its ended children used: a PostgreSQL backend that started after a
/// first reading counts whole, one that ended counts in the postmaster's children.
fn server_ticks(sink: &str) -> std::collections::HashMap<u32, u64> {
    let name = match sink {
        "clickhouse" => "clickhouse-serv",
        "postgres" => "postgres",
        _ => "nats-server",
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Default::default();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // The command name is in parentheses and may hold spaces; after it, from the
            // state (field 3): utime, stime, cutime, cstime are fields 14 to 17.
            let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(')')?;
            if comm != name {
                return None;
            }
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks = (11..15).filter_map(|i| fields.get(i)?.parse::<u64>().ok()).sum();
            Some((pid, ticks))
        })
        .collect()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a system setting and nothing else.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// Drops every window's databases and streams.
async fn clean_up(used: &[Config]) -> anyhow::Result<ExitCode> {
    for config in used {
        reset(config).await?;
    }
    Ok(ExitCode::SUCCESS)
}
