//! `tickvault drill`: the crash-recovery drill an operator runs after an install or an
//! upgrade. The simulator runs in this process and records every live frame it sends;
//! the daemon runs as a child process, with the sinks the config enables, and is
//! SIGKILLed `--cycles` times at moments chosen toward the dangerous ones (read from
//! its own /metrics: right after a live append, a backfill page, a sink's batch and so
//! its cursor move, a truncation's reclaim; or at start-up, or at random), restarted
//! each time, then stopped with SIGTERM once its backfill is done and its sinks have
//! caught up. Then:
//!
//! - the log against the simulator's ground truth: every minute bar of the backfill's
//!   range, and every live event the simulator sent, each once (a live event sent in
//!   the [`IN_FLIGHT`] before a SIGKILL may have died in the kernel's buffers, never
//!   acknowledged: counted apart, not as lost); an event truncated from the log counts
//!   as kept when every sink holds it;
//! - every sink against the log, key by key (`verify`).
//!
//! It never touches the config's own sinks: it writes to databases `<name>_drill`, the
//! stream `<STREAM>_DRILL` and subjects `<prefix>_drill.>`, emptied before it starts and
//! dropped after a drill that passed. Its log is a directory of its own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tickvault_wal::{Lane, Wal};

use crate::config::Config;
use crate::event::identity::Uids;
use crate::event::{Capture, Event, EVENT_KIND, MINUTE_MS};
use crate::polygon::wire::{parse_frame, WireItem};
use crate::sim::{Market, SimOptions};

/// A live event sent this long before a SIGKILL may not have reached the daemon.
pub const IN_FLIGHT: Duration = Duration::from_millis(500);
/// The backfill's lookback in a drill, at most: enough pages to be killed in the middle
/// of over several cycles.
const LOOKBACK_MAX: Duration = Duration::from_secs(30 * 86_400);
/// Bars of the first and last minutes of the lookback move with the clock between
/// restarts: they are checked for duplicates, not required.
const EDGE: Duration = Duration::from_secs(10 * 60);

#[derive(Clone, Debug, clap::Args)]
pub struct DrillSpec {
    /// The config whose capture and sinks are drilled (its sinks are not written to:
    /// see above).
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long, default_value_t = 10)]
    pub cycles: u32,
    /// The seed of the kill schedule and of the simulator (default: from the clock,
    /// printed).
    #[arg(long)]
    pub seed: Option<u64>,
    /// The drill's log: a directory that is missing or empty (default: a new one under
    /// the system's temporary directory, removed after a drill that passed).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Synthetic records appended to the log before the first start (the backlog a
    /// restart opens with).
    #[arg(long, default_value_t = 0)]
    pub backlog: u64,
    /// The negative control: deletes one acknowledged record from the log before the
    /// check, which must then fail naming it.
    #[arg(long, hide = true)]
    pub sabotage: bool,
}

/// The moments a kill is aimed at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    /// Within 400 ms of the start: the log's opening, the first connections.
    Startup,
    /// Right after a live append.
    LiveAppend,
    /// Right after a backfill page, while its bars are appended.
    BackfillPage,
    /// Right after a sink acknowledged a batch: its cursor moves.
    CursorMove,
    /// Right after a truncation removed records (the daemon's "log truncated").
    Truncation,
    /// Right after a truncation started a space reclaim.
    Reclaim,
    /// Anywhere in the first 3 s.
    Random,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Startup => "startup",
            Phase::LiveAppend => "live_append",
            Phase::BackfillPage => "backfill_page",
            Phase::CursorMove => "cursor_move",
            Phase::Truncation => "truncation",
            Phase::Reclaim => "reclaim",
            Phase::Random => "random",
        }
    }

    /// The counter whose move marks the moment, as (family, label filter).
    fn counter(self) -> Option<(&'static str, &'static str)> {
        match self {
            Phase::LiveAppend => Some(("tickvault_events_captured", "lane=\"live\"")),
            Phase::BackfillPage => Some(("tickvault_backfill_pages", "")),
            Phase::CursorMove => Some(("tickvault_sink_batches_written", "")),
            Phase::Reclaim => Some(("tickvault_log_reclaims", "state=\"started\"")),
            Phase::Startup | Phase::Random | Phase::Truncation => None,
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct DrillReport {
    pub seed: u64,
    pub cycles: u32,
    pub data_dir: PathBuf,
    pub sinks: Vec<&'static str>,
    /// Kills by the moment they were aimed at; `missed_*`: the moment did not come
    /// within 5 s and the kill was at that point instead.
    pub kills: BTreeMap<String, u32>,
    /// Live events the simulator sent, those that had to be in the log, those sent in
    /// the moments before a SIGKILL, and of those how many are in the log.
    pub live_sent: u64,
    pub live_required: u64,
    pub live_in_flight_at_kill: u64,
    pub live_in_flight_kept: u64,
    /// Minute bars the backfill's range holds at the simulator, all required.
    pub backfill_bars_required: u64,
    /// Records in the log when checked, per lane.
    pub log_records: BTreeMap<String, u64>,
    pub lost: u64,
    pub duplicated: u64,
    /// The first lost and duplicated keys, with their lane.
    pub lost_examples: Vec<String>,
    pub duplicated_examples: Vec<String>,
    /// Per restart, SIGKILL to the next durable append, milliseconds.
    pub recovery_ms: Vec<f64>,
    /// Per sink, `verify`'s verdict against the log.
    pub sinks_match: BTreeMap<String, bool>,
    pub sink_differences: Vec<String>,
    pub passed: bool,
}

pub async fn run(spec: &DrillSpec) -> anyhow::Result<ExitCode> {
    let config = super::run::load_config(&spec.config, None)?;
    let seed = spec
        .seed
        .unwrap_or_else(|| jiff::Timestamp::now().as_nanosecond() as u64 % 1_000_000);
    let (dir, temporary) = match &spec.data_dir {
        Some(dir) => {
            if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
                return Err(super::BadInput(format!(
                    "--data-dir {}: must be missing or empty (the drill checks a log only it wrote)",
                    dir.display()
                ))
                .into());
            }
            (dir.clone(), false)
        }
        None => (
            tempfile::Builder::new().prefix("tickvault-drill-").tempdir()?.keep(),
            true,
        ),
    };
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("log");
    let (drill_config_path, drill_config) = drill_config(&spec.config, &config, &dir)?;
    let sinks = drill_config.sinks.enabled();
    let quiet = spec.json;
    let say = |line: String| {
        if !quiet {
            println!("{line}");
        }
    };
    say(format!(
        "tickvault drill: {} cycles, seed {seed}, log {}, sinks: {}",
        spec.cycles,
        log.display(),
        if sinks.is_empty() {
            "none (the log alone)".to_owned()
        } else {
            sinks.join(", ")
        }
    ));
    if !sinks.is_empty() {
        crate::sink::admin::drop_targets(&drill_config.sinks)
            .await
            .context("emptying the drill's databases and stream")?;
    }
    if spec.backlog > 0 {
        say(format!("appending a backlog of {} synthetic records", spec.backlog));
        append_backlog(&log, spec.backlog).await?;
    }

    let sim_options = SimOptions {
        seed,
        always_open: true,
        record_sent: true,
        quotes_per_minute: 600,
        faults: "interleave=7".parse().map_err(anyhow::Error::msg)?,
        ..Default::default()
    };
    let market = {
        let mut m = Market::new(seed, sim_options.quotes_per_minute, sim_options.faults.hole_every);
        m.always_open = true;
        m
    };
    let sim = crate::sim::spawn("127.0.0.1:0".parse()?, sim_options).await?;
    let daemon_log = dir.join("daemon.log");
    let daemon = DaemonSpec {
        exe: std::env::current_exe()?,
        config: drill_config_path,
        log: log.clone(),
        sim_addr: sim.addr.to_string(),
        output: daemon_log.clone(),
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut report = DrillReport {
        seed,
        cycles: spec.cycles,
        data_dir: log.clone(),
        sinks: sinks.clone(),
        ..Default::default()
    };
    let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
    let started_ms = crate::event::now_ms();
    // When each connection the daemon had may have stopped reading: each SIGKILL, and
    // the final stop.
    let mut ends_ms = Vec::new();
    let mut killed_at: Option<Instant> = None;
    let mut phases = vec![Phase::Startup, Phase::LiveAppend, Phase::BackfillPage, Phase::Random];
    if !sinks.is_empty() {
        phases.extend([Phase::CursorMove, Phase::CursorMove, Phase::Truncation, Phase::Reclaim]);
    }
    let mut backfill_done = !drill_config.backfill.enabled;
    for cycle in 1..=spec.cycles + 1 {
        let mut child = daemon.start()?;
        let started = Instant::now();
        if let Some(at) = killed_at.take() {
            let ms = until_first_append(&http, &child, at).await?;
            report.recovery_ms.push(ms);
        }
        if cycle > spec.cycles {
            // The last start: the backfill done and the sinks caught up, then SIGTERM.
            wait_until_settled(&http, &child, &daemon_log, drill_config.backfill.enabled).await?;
            // A last stretch of live capture that no kill follows.
            tokio::time::sleep(Duration::from_secs(2)).await;
            ends_ms.push(crate::event::now_ms());
            signal(&child.process, libc::SIGTERM);
            let status = child.process.wait()?;
            anyhow::ensure!(
                status.success(),
                "the daemon's last run ended with {status}; see {}",
                daemon_log.display()
            );
            break;
        }
        let open: Vec<Phase> = phases
            .iter()
            .copied()
            .filter(|p| *p != Phase::BackfillPage || !backfill_done)
            .collect();
        let phase = open[rng.random_range(0..open.len())];
        let aimed = aim(&http, &child, phase, started, &mut rng).await;
        backfill_done = !drill_config.backfill.enabled || backfill_finished(scrape(&http, &child).await.as_deref());
        ends_ms.push(crate::event::now_ms());
        signal(&child.process, libc::SIGKILL);
        killed_at = Some(Instant::now());
        child.process.wait()?;
        let name = if aimed {
            phase.name().to_owned()
        } else {
            format!("missed_{}", phase.name())
        };
        say(format!(
            "cycle {cycle:>3}: SIGKILL at {name} ({:.2} s after the start)",
            started.elapsed().as_secs_f64()
        ));
        *report.kills.entry(name).or_default() += 1;
    }
    let sent = sim.take_sent();
    sim.stop().await?;

    if spec.sabotage {
        sabotage(&log)?;
    }
    say("checking the log against the simulator, and the sinks against the log".to_owned());
    check(&mut report, &drill_config, &log, &sent, &ends_ms, &market, started_ms).await?;
    report.passed = report.lost == 0 && report.duplicated == 0 && report.sinks_match.values().all(|m| *m);

    if spec.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report)?;
    }
    if report.passed {
        if !sinks.is_empty() {
            let _ = crate::sink::admin::drop_targets(&drill_config.sinks).await;
        }
        if temporary {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "the drill FAILED; its log, config and the daemon's output are kept in {}",
            dir.display()
        );
        Ok(ExitCode::FAILURE)
    }
}

/// The config the daemon runs with in the drill: the operator's, with its sinks moved
/// to the drill's own databases and stream, a backfill of at most [`LOOKBACK_MAX`] in
/// day-long periods, and (with sinks) a short retention, so that truncation runs.
fn drill_config(path: &Path, config: &Config, dir: &Path) -> anyhow::Result<(PathBuf, Config)> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut table: toml::Table = text.parse().with_context(|| format!("parsing {}", path.display()))?;
    fn section<'a>(table: &'a mut toml::Table, path: &[&str]) -> &'a mut toml::Table {
        let mut at = table;
        for key in path {
            at = at
                .entry(key.to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                .as_table_mut()
                .expect("a section is a table");
        }
        at
    }
    let s = &config.sinks;
    section(&mut table, &["sinks", "clickhouse"])
        .insert("database".into(), format!("{}_drill", s.clickhouse.database).into());
    section(&mut table, &["sinks", "postgres"])
        .insert("database".into(), format!("{}_drill", s.postgres.database).into());
    let nats = section(&mut table, &["sinks", "nats"]);
    nats.insert("stream".into(), format!("{}_DRILL", s.nats.stream).into());
    nats.insert(
        "subject_prefix".into(),
        format!("{}_drill", s.nats.subject_prefix).into(),
    );
    if config.backfill.enabled {
        let backfill = section(&mut table, &["backfill"]);
        let lookback = config.backfill.lookback.min(LOOKBACK_MAX);
        backfill.insert(
            "lookback".into(),
            humantime::format_duration(lookback).to_string().into(),
        );
        backfill.insert("chunk".into(), "1day".into());
    }
    let log = section(&mut table, &["log"]);
    log.insert("data_dir".into(), dir.join("log").display().to_string().into());
    if !s.enabled().is_empty() {
        log.insert("retention".into(), "3s".into());
        log.insert("truncate_every".into(), "1s".into());
    }
    let drill_path = dir.join("drill.toml");
    let text = toml::to_string(&table)?;
    std::fs::write(&drill_path, &text)?;
    // Its secrets are read as the operator's config reads them (files, or the environment).
    let drill = Config::load(&drill_path)?;
    Ok((drill_path, drill))
}

struct DaemonSpec {
    exe: PathBuf,
    config: PathBuf,
    log: PathBuf,
    sim_addr: String,
    output: PathBuf,
}

struct Running {
    process: Child,
    metrics: String,
    /// The daemon's output file, and where this run's output starts in it.
    output: PathBuf,
    from: usize,
}

impl Running {
    /// What this run has written to its output so far.
    /// Read from where this run began: the file holds every earlier run's output too,
    /// and the truncation phase asks every 2 ms.
    fn said(&self) -> String {
        use std::io::{Read, Seek, SeekFrom};
        let mut text = Vec::new();
        if let Ok(mut file) = std::fs::File::open(&self.output) {
            if file.seek(SeekFrom::Start(self.from as u64)).is_ok() {
                let _ = file.read_to_end(&mut text);
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    }
}

impl DaemonSpec {
    fn start(&self) -> anyhow::Result<Running> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let output = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.output)?;
        let from = output.metadata()?.len() as usize;
        let process = Command::new(&self.exe)
            .args(["run", "--config"])
            .arg(&self.config)
            .arg("--data-dir")
            .arg(&self.log)
            .env("TICKVAULT_POLYGON_WS_URL", format!("ws://{}", self.sim_addr))
            .env("TICKVAULT_POLYGON_REST_URL", format!("http://{}", self.sim_addr))
            .env("TICKVAULT_POLYGON_API_KEY", "drill")
            .env("TICKVAULT_METRICS_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(output)
            .spawn()
            .context("starting the daemon")?;
        Ok(Running {
            process,
            metrics: format!("http://127.0.0.1:{port}/metrics"),
            output: self.output.clone(),
            from,
        })
    }
}

fn signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, signal) };
}

/// The sum of a family's samples whose labels contain `filter`, in /metrics' text.
fn metric(text: &str, family: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let name = series.split('{').next()?;
            let matches = name == family || name.strip_suffix("_total") == Some(family);
            (matches && series.contains(filter)).then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

async fn scrape(http: &reqwest::Client, child: &Running) -> Option<String> {
    http.get(&child.metrics).send().await.ok()?.text().await.ok()
}

/// Milliseconds from `killed_at` to the first event the restarted daemon made durable.
async fn until_first_append(http: &reqwest::Client, child: &Running, killed_at: Instant) -> anyhow::Result<f64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(text) = scrape(http, child).await {
            if metric(&text, "tickvault_events_captured", "") > 0.0 {
                return Ok(killed_at.elapsed().as_secs_f64() * 1000.0);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    anyhow::bail!("the restarted daemon made nothing durable within 60 s")
}

/// Waits for `phase`'s moment (at most 5 s); false when it did not come.
async fn aim(http: &reqwest::Client, child: &Running, phase: Phase, started: Instant, rng: &mut impl Rng) -> bool {
    let within = |ms: u64| started + Duration::from_millis(ms);
    match phase.counter() {
        None if phase == Phase::Truncation => {
            let truncations = || child.said().matches("log truncated").count();
            let (before, deadline) = (truncations(), within(5_000));
            while Instant::now() < deadline {
                if truncations() > before {
                    tokio::time::sleep(Duration::from_micros(rng.random_range(0..3000))).await;
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            false
        }
        None => {
            let at = match phase {
                Phase::Startup => within(rng.random_range(0..400)),
                _ => within(rng.random_range(0..3000)),
            };
            tokio::time::sleep_until(at.into()).await;
            true
        }
        Some((family, filter)) => {
            // Not always the first such moment: up to 1.5 s in (0.2 s for the backfill's
            // pages, which a drill's short backfill soon runs out of).
            let skip = if phase == Phase::BackfillPage { 200 } else { 1500 };
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..skip))).await;
            let jitter = Duration::from_micros(rng.random_range(0..3000));
            let mut before = None;
            let deadline = within(5_000);
            while Instant::now() < deadline {
                if let Some(text) = scrape(http, child).await {
                    let now = metric(&text, family, filter);
                    match before {
                        Some(b) if now > b => {
                            tokio::time::sleep(jitter).await;
                            return true;
                        }
                        _ => before = Some(now),
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            false
        }
    }
}

/// Whether /metrics says the backfill's pass is done.
fn backfill_finished(text: Option<&str>) -> bool {
    text.is_some_and(|text| {
        metric(text, "tickvault_backfill_periods", "") > 0.0
            && metric(text, "tickvault_backfill_periods", "state=\"pending\"") == 0.0
    })
}

/// Waits until the backfill's pass is done and every sink's backlog is empty.
async fn wait_until_settled(
    http: &reqwest::Client,
    child: &Running,
    output: &Path,
    backfill: bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        if let Some(text) = scrape(http, child).await {
            let backlog = metric(&text, "tickvault_sink_backlog_records", "");
            let captured = metric(&text, "tickvault_events_captured", "");
            if (!backfill || backfill_finished(Some(&text))) && backlog == 0.0 && captured > 0.0 {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!(
        "the daemon's backfill and sinks did not settle within 5 minutes; see {}",
        output.display()
    )
}

async fn append_backlog(log: &Path, records: u64) -> anyhow::Result<()> {
    let wal = Wal::open(log)?;
    let mut appended = 0;
    while appended < records {
        let n = (records - appended).min(10_000);
        let mut batch = tickvault_wal::Batch::with_capacity(n as usize, n as usize * 64);
        let mut payload = Vec::with_capacity(64);
        for i in 0..n {
            let id = crate::synthetic::Synthetic {
                run: 0,
                producer: 0,
                n: appended + i,
            };
            crate::synthetic::fill(id, 64, &mut payload);
            batch.push(crate::event::SYNTHETIC_KIND, &payload)?;
        }
        wal.append(Lane::Backfill, batch).await?;
        appended += n;
    }
    wal.shutdown().await?;
    Ok(())
}

/// The negative control: one acknowledged record deleted, as a build that lost it: the
/// one a quarter into the backfill lane (away from the range's moving edges: every bar
/// there is required), or into the live lane.
fn sabotage(log: &Path) -> anyhow::Result<()> {
    let reader = Wal::open_read_only(log)?;
    let mut target = None;
    for lane in [Lane::Backfill, Lane::Live] {
        if let (Some(first), Some(last)) = (reader.first_seq(lane)?, reader.last_seq(lane)?) {
            target = Some((lane, first + (last - first) / 4));
            break;
        }
    }
    drop(reader);
    let (lane, seq) = target.context("no record to delete")?;
    tickvault_wal::delete_record_for_test(log, lane, seq)?;
    eprintln!("sabotage: deleted {lane} record {seq} from the log");
    Ok(())
}

/// Fills in the report's findings.
async fn check(
    report: &mut DrillReport,
    config: &Config,
    log: &Path,
    sent: &[crate::sim::SentFrame],
    ends_ms: &[i64],
    market: &Market,
    started_ms: i64,
) -> anyhow::Result<()> {
    // The truth: every live event sent (with the uid the collector gives it: one `Uids`
    // per connection, the frames in the order sent), and whether it had to be kept.
    let in_flight_ms = IN_FLIGHT.as_millis() as i64;
    let mut required: HashMap<String, bool> = HashMap::new();
    let mut uids: HashMap<u64, Uids> = HashMap::new();
    // A connection ends at the first kill (or the stop) after its first frame: frames
    // sent on it after that went to a process that was gone.
    let mut ends: HashMap<u64, i64> = HashMap::new();
    for frame in sent {
        ends.entry(frame.connection)
            .or_insert_with(|| ends_ms.iter().copied().find(|&e| e >= frame.at_ms).unwrap_or(i64::MAX));
    }
    for frame in sent {
        let Ok(items) = parse_frame(frame.feed, &frame.text) else {
            continue;
        };
        let must = frame.at_ms < ends[&frame.connection] - in_flight_ms;
        let ids = uids.entry(frame.connection).or_default();
        for item in items.into_iter().flatten() {
            let WireItem::Event(mut body) = item else { continue };
            ids.assign(&mut body);
            let event = Event {
                capture: Capture {
                    feed: frame.feed,
                    lane: Lane::Live,
                    captured_at_ns: 0,
                },
                body,
            };
            if event.problem().is_some() {
                continue;
            }
            report.live_sent += 1;
            let key = format!("live {}", event.natural_key());
            *required.entry(key).or_default() |= must;
        }
    }
    report.live_required = required.values().filter(|m| **m).count() as u64;
    report.live_in_flight_at_kill = required.values().filter(|m| !**m).count() as u64;
    // Every bar of the backfill's range, away from its moving edges.
    if config.backfill.enabled {
        let lookback = config.backfill.lookback.as_millis() as i64;
        let edge = EDGE.as_millis() as i64;
        let now_ms = crate::event::now_ms();
        let from = (now_ms - lookback + edge).div_euclid(MINUTE_MS) * MINUTE_MS;
        let to = (started_ms - edge).div_euclid(MINUTE_MS) * MINUTE_MS;
        for job in crate::daemon::backfill_jobs(config, now_ms) {
            let mut m = from;
            while m < to {
                if market.bar(job.feed, &job.symbol, m).is_some() {
                    report.backfill_bars_required += 1;
                    required.insert(
                        format!("backfill {}:{}:bar:1m:{m}:0", job.feed.name(), job.symbol),
                        true,
                    );
                }
                m += MINUTE_MS;
            }
        }
    }

    // The log: each key's copies per lane.
    let reader = Wal::open_read_only(log)?;
    let mut in_log: HashMap<String, u32> = HashMap::new();
    let mut truncated = HashMap::new();
    for lane in crate::daemon::FORWARDED_LANES {
        let mut records = 0u64;
        reader.scan(lane, 0, u64::MAX, |_, record| {
            records += 1;
            if let Ok(record) = record {
                if record.kind == EVENT_KIND {
                    if let Ok(event) = Event::from_payload(record.payload) {
                        // A derived bar's versions share its natural key: each is kept once.
                        let version = match &event.body {
                            crate::event::Body::Derived(d) => format!(":v{}", d.version),
                            _ => String::new(),
                        };
                        *in_log
                            .entry(format!("{} {}{version}", lane.name(), event.natural_key()))
                            .or_default() += 1;
                    }
                }
            }
            true
        })?;
        report.log_records.insert(lane.name().to_owned(), records);
        truncated.insert(lane.name(), reader.first_retained(lane)? > 1);
    }
    let log_id = reader.log_id()?;
    drop(reader);
    // What the sinks hold, for events truncated from the log.
    let held = if truncated.values().any(|t| *t) {
        Some(sink_keys(config, &log_id).await?)
    } else {
        None
    };
    let mut lost: Vec<String> = Vec::new();
    for (key, must) in &required {
        let copies = in_log.get(key).copied().unwrap_or(0);
        if !must {
            report.live_in_flight_kept += u64::from(copies > 0);
            continue;
        }
        if copies > 0 {
            continue;
        }
        let (lane, natural) = key.split_once(' ').unwrap_or_default();
        let kept_by_sinks = truncated.get(lane).copied().unwrap_or(false)
            && held
                .as_ref()
                .is_some_and(|h| h.iter().all(|keys| keys.contains(natural)));
        if !kept_by_sinks {
            lost.push(key.clone());
        }
    }
    lost.sort();
    report.lost = lost.len() as u64;
    report.lost_examples = lost.into_iter().take(10).collect();
    let mut duplicated: Vec<String> = in_log
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, n)| format!("{k} x{n}"))
        .collect();
    duplicated.sort();
    report.duplicated = duplicated.len() as u64;
    report.duplicated_examples = duplicated.into_iter().take(10).collect();

    // The sinks against the log.
    if !config.sinks.enabled().is_empty() {
        let verified = crate::verify::verify(config, log, None).await?;
        for s in &verified.sinks {
            report.sinks_match.insert(s.sink.to_owned(), s.matches());
            for d in s.differences.iter().take(5) {
                report.sink_differences.push(format!(
                    "{} {} {} {} {} {}: missing {}, extra {}, duplicates {}",
                    s.sink,
                    d.group.feed,
                    d.group.symbol,
                    d.group.kind,
                    d.group.timeframe,
                    d.date,
                    d.missing,
                    d.extra,
                    d.duplicates
                ));
            }
            if let Some(e) = &s.error {
                report.sink_differences.push(format!("{}: {e}", s.sink));
            }
        }
    }
    Ok(())
}

/// Every natural key each enabled sink holds.
async fn sink_keys(config: &Config, log_id: &str) -> anyhow::Result<Vec<HashSet<String>>> {
    let mut out = Vec::new();
    for sink in config.sinks.enabled() {
        let mut keys = HashSet::new();
        crate::verify::scan_sink(config, sink, log_id, |k| {
            keys.insert(k.key_string());
        })
        .await?;
        out.push(keys);
    }
    Ok(out)
}

fn print_report(r: &DrillReport) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let kills: Vec<String> = r.kills.iter().map(|(p, n)| format!("{p} {n}")).collect();
    writeln!(out, "\ndrill report (seed {})", r.seed)?;
    writeln!(out, "  cycles      {} SIGKILLs: {}", r.cycles, kills.join(", "))?;
    let mut recovery = r.recovery_ms.clone();
    recovery.sort_by(f64::total_cmp);
    if let (Some(min), Some(max)) = (recovery.first(), recovery.last()) {
        writeln!(
            out,
            "  recovery    SIGKILL to the next durable append: min {min:.0} ms, median {:.0} ms, max {max:.0} ms",
            recovery[recovery.len() / 2]
        )?;
    }
    let records: Vec<String> = r.log_records.iter().map(|(l, n)| format!("{l} {n}")).collect();
    writeln!(
        out,
        "  log         {} records ({})",
        r.log_records.values().sum::<u64>(),
        records.join(", ")
    )?;
    writeln!(
        out,
        "  live        {} events sent, {} required; {} sent in the {} ms before a SIGKILL ({} of them kept)",
        r.live_sent,
        r.live_required,
        r.live_in_flight_at_kill,
        IN_FLIGHT.as_millis(),
        r.live_in_flight_kept
    )?;
    writeln!(out, "  backfill    {} minute bars required", r.backfill_bars_required)?;
    writeln!(out, "  lost        {}", r.lost)?;
    for k in &r.lost_examples {
        writeln!(out, "    lost {k}")?;
    }
    writeln!(out, "  duplicated  {}", r.duplicated)?;
    for k in &r.duplicated_examples {
        writeln!(out, "    duplicated {k}")?;
    }
    for (sink, matches) in &r.sinks_match {
        writeln!(
            out,
            "  {sink:<11} {}",
            if *matches {
                "matches the log (verify)"
            } else {
                "DIFFERS from the log"
            }
        )?;
    }
    for d in &r.sink_differences {
        writeln!(out, "    {d}")?;
    }
    writeln!(out, "  {}", if r.passed { "PASSED" } else { "FAILED" })?;
    Ok(())
}
