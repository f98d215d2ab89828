//! The daemon: the log, the live collectors, the backfill downloader, one sink runner per
//! (enabled sink, lane) and truncation, started together and stopped by one signal.
//!
//! Shutdown, in two steps:
//! 1. one `watch` flag stops the sources, truncation and the backfill runners; each
//!    source finishes what it holds (the live appender drains its queue, the downloader
//!    saves its period);
//! 2. once all of them have ended, a second flag stops the live runners, which first
//!    forward what the live lane still holds (for up to `sinks.stop_drain`).
//!
//! Then the log's writer commits everything queued and syncs before the process exits.

use std::sync::Arc;

use anyhow::Context;
use tickvault_wal::{Lane, Wal};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::event::{Feed, MINUTE_MS};
use crate::polygon::symbol;
use crate::sink::clickhouse::ClickHouseSink;
use crate::sink::nats::NatsSink;
use crate::sink::postgres::PostgresSink;
use crate::sink::priority::Priority;
use crate::sink::runner::{self, RunnerSpec, RunnerStats, Sink};
use crate::sink::{config::Batching, SinksConfig};
use crate::source::backfill::{BackfillSpec, BackfillStats, Downloader, Job};
use crate::source::live::{self, LiveSpec, LiveStats};

/// A running daemon.
pub struct Running {
    pub wal: Wal,
    pub live: Vec<(Feed, Arc<LiveStats>)>,
    pub backfill: Option<Arc<BackfillStats>>,
    pub aggregate: Option<Arc<crate::aggregate::AggregateStats>>,
    /// The check of the backfill's periods against the sinks (when any is enabled).
    pub verifier: Option<Arc<crate::verify::periods::VerifierStats>>,
    /// One per sink runner: (sink, lane).
    pub sinks: Vec<Arc<RunnerStats>>,
    /// How the backfill gives way to live (its share of the duties under the budget).
    pub priority: Arc<Priority>,
    /// Where `/metrics`, `/healthz` and `/readyz` are served, when they are.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Everything but the live sink runners.
    tasks: JoinSet<anyhow::Result<&'static str>>,
    /// The live sink runners: stopped last, so that they can forward what the sources
    /// put in the log before stopping.
    live_runners: JoinSet<anyhow::Result<&'static str>>,
    stop: watch::Sender<bool>,
    stop_live_runners: watch::Sender<bool>,
    // Last: dropped after everything that runs on it has been joined.
    _background: BackgroundRuntime,
}

/// The live specs a config asks for.
pub fn live_specs(config: &Config) -> anyhow::Result<Vec<LiveSpec>> {
    let live = &config.live;
    if !live.enabled {
        return Ok(Vec::new());
    }
    let mut specs = Vec::new();
    for (feed, market) in [
        (Feed::Forex, &live.forex),
        (Feed::Crypto, &live.crypto),
        (Feed::Stocks, &live.stocks),
    ] {
        let Some(market) = market else { continue };
        let api_key = config.polygon.api_key.clone().context(crate::config::NO_API_KEY)?;
        specs.push(LiveSpec {
            feed,
            ws_url: config.polygon.ws_url.clone(),
            api_key,
            // Two spellings of one symbol subscribe once.
            symbols: market.symbols.iter().fold(Vec::new(), |mut symbols, s| {
                if let Some(s) = symbol::canonical(feed, s) {
                    if !symbols.contains(&s) {
                        symbols.push(s);
                    }
                }
                symbols
            }),
            channels: market.channels.clone(),
            stale_after: live.stale_after,
            reconnect_min: live.reconnect_min,
            reconnect_max: live.reconnect_max,
        });
    }
    Ok(specs)
}

/// The backfill jobs a config asks for, ending at `now_ms`.
pub fn backfill_jobs(config: &Config, now_ms: i64) -> Vec<Job> {
    let b = &config.backfill;
    if !b.enabled {
        return Vec::new();
    }
    // Whole minutes: the minute in progress is live's.
    let to_ms = now_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
    let from_ms = to_ms - i64::try_from(b.lookback.as_millis()).unwrap_or(i64::MAX);
    let mut jobs = Vec::new();
    for (feed, symbols) in [
        (Feed::Forex, &b.forex),
        (Feed::Crypto, &b.crypto),
        (Feed::Stocks, &b.stocks),
    ] {
        for s in symbols {
            if let Some(symbol) = symbol::canonical(feed, s) {
                jobs.push(Job {
                    feed,
                    symbol,
                    from_ms,
                    to_ms,
                });
            }
        }
    }
    jobs
}

pub fn backfill_spec(config: &Config) -> anyhow::Result<BackfillSpec> {
    Ok(BackfillSpec {
        rest_url: config.polygon.rest_url.clone(),
        api_key: config.polygon.api_key.clone().context(crate::config::NO_API_KEY)?,
        chunk: config.backfill.chunk,
        page_limit: config.backfill.page_limit,
        max_attempts: config.backfill.max_attempts,
        concurrency: config.backfill.concurrency,
        requests_per_minute: config.polygon.requests_per_minute,
        high_water: config.log.backfill_high_water,
        live_duty: config.backfill.live_duty,
        retry_min: std::time::Duration::from_millis(500),
        retry_max: std::time::Duration::from_secs(60),
        calendar: tickvault_core::calendar::Calendar::new(&config.calendar),
    })
}

/// The lanes sinks forward, each with its own runner per sink.
pub const FORWARDED_LANES: [Lane; 3] = [Lane::Live, Lane::Backfill, Lane::Derived];

fn runner_spec(sinks: &SinksConfig, batching: Batching, lane: Lane, priority: &Arc<Priority>) -> RunnerSpec {
    let (batch_rows, flush_interval) = match lane {
        Lane::Live => (batching.live_batch_rows, batching.live_flush_interval),
        _ => (batching.backfill_batch_rows, batching.backfill_flush_interval),
    };
    RunnerSpec {
        lane,
        batch_rows,
        flush_interval,
        retry_min: sinks.retry_min,
        retry_max: sinks.retry_max,
        breaker_threshold: sinks.breaker_threshold,
        attempt_timeout: std::time::Duration::from_secs(60),
        priority: Some(priority.clone()),
        drain_on_stop: match lane {
            Lane::Live => sinks.stop_drain,
            _ => std::time::Duration::ZERO,
        },
    }
}

/// Starts one runner per (enabled sink, forwarded lane), each with its own connection.
async fn start_sinks(
    config: &Config,
    wal: &Wal,
    priority: &Arc<Priority>,
    parts: &mut Parts,
) -> anyhow::Result<Vec<Arc<RunnerStats>>> {
    fn spawn<S: Sink>(sink: S, spec: RunnerSpec, wal: &Wal, parts: &mut Parts) -> Arc<RunnerStats> {
        let stats = Arc::new(RunnerStats::new(sink.name(), spec.lane));
        let lane = spec.lane;
        let shutdown = match lane {
            Lane::Live => parts.live_shutdown.clone(),
            _ => parts.shutdown.clone(),
        };
        let (wal, out) = (wal.clone(), stats.clone());
        let run = async move {
            runner::run(sink, wal, spec, stats, shutdown).await?;
            Ok("sink runner")
        };
        // Backfill runners (and their connections' tasks) run on the low-priority
        // runtime; live runners on the main one, and are stopped last.
        match lane {
            Lane::Live => parts.live_runners.spawn(run),
            _ => parts.tasks.spawn_on(run, &parts.background),
        };
        out
    }
    let sinks = &config.sinks;
    let log_id = wal.reader().log_id()?;
    let enabled = sinks.enabled();
    for cursor in wal.reader().cursors()? {
        if !enabled.contains(&cursor.sink.as_str()) && cursor.sink != crate::aggregate::CURSOR {
            // Truncation keeps everything a cursor has not passed: an abandoned cursor
            // holds the log forever. Said at every start, never removed on our own.
            tracing::warn!(
                sink = %cursor.sink,
                lane = %cursor.lane,
                seq = cursor.seq,
                "a cursor of a sink that is not enabled holds back log truncation"
            );
        }
    }
    // A runner writes its cursor only after its first contact with its sink: until then
    // an enabled sink unreachable from its first start would hold nothing back, and
    // truncation would remove what it was never sent. A cursor at 0 (passed nothing)
    // makes every enabled sink hold back truncation, and count toward the backfill's
    // high-water mark, from its first start.
    let held: Vec<(String, Lane)> = wal.reader().cursors()?.into_iter().map(|c| (c.sink, c.lane)).collect();
    for lane in FORWARDED_LANES {
        for &sink in &enabled {
            if !held.iter().any(|(s, l)| s == sink && *l == lane) {
                wal.move_cursor(sink, lane, 0).await?;
            }
        }
    }
    let mut stats = Vec::new();
    for lane in FORWARDED_LANES {
        if sinks.clickhouse.enabled {
            let spec = runner_spec(sinks, sinks.clickhouse.batching(), lane, priority);
            stats.push(spawn(ClickHouseSink::new(&sinks.clickhouse), spec, wal, parts));
        }
        if sinks.postgres.enabled {
            let spec = runner_spec(sinks, sinks.postgres.batching(), lane, priority);
            let sink = PostgresSink::new(&sinks.postgres, &log_id);
            stats.push(spawn(sink, spec, wal, parts));
        }
        if sinks.nats.enabled {
            let spec = runner_spec(sinks, sinks.nats.batching(), lane, priority);
            stats.push(spawn(NatsSink::new(&sinks.nats), spec, wal, parts));
        }
    }
    Ok(stats)
}

/// Where the parts run, and the flags that stop them.
struct Parts {
    /// Everything but the live sink runners.
    tasks: JoinSet<anyhow::Result<&'static str>>,
    live_runners: JoinSet<anyhow::Result<&'static str>>,
    shutdown: watch::Receiver<bool>,
    live_shutdown: watch::Receiver<bool>,
    /// The low-priority runtime.
    background: tokio::runtime::Handle,
}

/// A runtime for the backfill: the downloader and the backfill sink runners. Its threads
/// run at a lower CPU priority (nice 10), so that on a busy box the scheduler gives the
/// live path (collectors, the log's writer, live runners) the CPU first: live data is
/// never held up by backfill, not even by its parsing and encoding.
pub struct BackgroundRuntime(Option<tokio::runtime::Runtime>);

impl BackgroundRuntime {
    pub fn new() -> anyhow::Result<BackgroundRuntime> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("tickvault-backfill")
            .on_thread_start(lower_priority)
            .enable_all()
            .build()?;
        Ok(BackgroundRuntime(Some(runtime)))
    }

    pub fn handle(&self) -> tokio::runtime::Handle {
        self.0.as_ref().expect("present until dropped").handle().clone()
    }
}

impl Drop for BackgroundRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which an async context forbids: let it wind down.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Raises the soft limit of open files to the hard one. RocksDB keeps every table file
/// it has opened open (faster reads; `max_open_files` unset), and a log of months takes
/// thousands, past the usual soft limit of 1024; the sinks' connections need some too.
/// Returns the limit in force.
pub fn raise_open_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return None;
            }
            let before = limit.rlim_cur;
            if limit.rlim_cur < limit.rlim_max {
                limit.rlim_cur = limit.rlim_max;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    tracing::warn!(limit = before, "could not raise the open-file limit");
                    return Some(before);
                }
                tracing::info!(
                    from = before,
                    to = limit.rlim_cur,
                    "open-file limit raised for the log's files"
                );
            }
            Some(limit.rlim_cur)
        }
    }
    #[cfg(not(unix))]
    None
}

/// Lowers the calling thread's CPU priority (Linux: nice applies per thread).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only reads its integer arguments; `who` 0 is the calling thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

/// How often the backfill passes over its periods again while the daemon runs: the
/// ones that failed, and the newest, which time has grown.
pub const BACKFILL_PASS_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Opens the log and starts every configured part.
pub async fn start(config: &Config) -> anyhow::Result<Running> {
    raise_open_file_limit();
    let background = BackgroundRuntime::new()?;
    crate::disk::before_open(&config.log.data_dir, config.log.disk_reserve);
    let wal = Wal::open_with(&config.log.data_dir, wal_options(config))?;
    let (stop, shutdown) = watch::channel(false);
    let (stop_live_runners, live_shutdown) = watch::channel(false);
    let mut parts = Parts {
        tasks: JoinSet::new(),
        live_runners: JoinSet::new(),
        shutdown: shutdown.clone(),
        live_shutdown,
        background: background.handle(),
    };
    let (room, disk_watch) = crate::disk::watch(
        config.log.data_dir.clone(),
        config.log.disk_reserve,
        wal.clone(),
        shutdown.clone(),
    );
    parts.tasks.spawn(async move {
        disk_watch.await;
        Ok("disk watch")
    });
    let mut live_stats = Vec::new();
    for spec in live_specs(config)? {
        let stats = Arc::new(LiveStats::default());
        live_stats.push((spec.feed, stats.clone()));
        let (wal, shutdown, room) = (wal.clone(), shutdown.clone(), room.clone());
        parts.tasks.spawn(async move {
            live::run_guarded(spec, wal, stats, shutdown, room).await?;
            Ok("live collector")
        });
    }
    // Shared by the sink runners and the backfill's capture: live's latency budget
    // scales both duties.
    let s = &config.sinks;
    let priority = Arc::new(Priority::new(s.backfill_writes, s.backfill_duty, s.live_latency_budget));
    let sinks = start_sinks(config, &wal, &priority, &mut parts).await?;
    let jobs = backfill_jobs(config, crate::event::now_ms());
    // The downloader fetches the backfill's periods and, between its passes, the gaps of
    // every symbol whose minute bars are captured (live-only ones too).
    let watched = crate::gaps::watched(config);
    let backfill = if jobs.is_empty() && watched.is_empty() {
        None
    } else {
        let stats = Arc::new(BackfillStats::default());
        let repair = crate::source::backfill::Repair {
            watched,
            lookback: config.gaps.lookback,
            interval: config.gaps.interval,
            live: live_stats.iter().map(|(_, s)| s.clone()).collect(),
        };
        let downloader = Downloader::new(backfill_spec(config)?, wal.clone(), stats.clone())?
            .yielding_to(priority.clone())
            .guarded_by(room.clone())
            .repairing(repair);
        let (shutdown, config) = (shutdown.clone(), config.clone());
        parts.tasks.spawn_on(
            async move {
                // A fault in backfill never stops live capture or forwarding.
                let jobs = || backfill_jobs(&config, crate::event::now_ms());
                if let Err(e) = downloader.run_every(jobs, BACKFILL_PASS_EVERY, shutdown).await {
                    tracing::error!(error = %format!("{e:#}"), "backfill stopped; live capture and forwarding go on");
                }
                Ok("backfill")
            },
            &background.handle(),
        );
        Some(stats)
    };
    // The aggregator runs beside the backfill, at its lower CPU priority.
    let aggregate = config.aggregate.enabled.then(|| {
        let stats = Arc::new(crate::aggregate::AggregateStats::default());
        let (wal, config, shutdown, out) = (wal.clone(), config.aggregate.clone(), shutdown.clone(), stats.clone());
        let room = room.clone();
        parts.tasks.spawn_on(
            async move {
                crate::aggregate::run(wal, config, out, room, shutdown).await?;
                Ok("aggregator")
            },
            &background.handle(),
        );
        stats
    });
    // Backfill periods checked against the sinks, at the backfill's priority.
    let verifier_stats = Arc::new(crate::verify::periods::VerifierStats::default());
    let log_id = wal.reader().log_id()?;
    let verifier = match crate::verify::periods::Verifier::new(config, wal.clone(), &log_id, verifier_stats.clone()) {
        Some(verifier) => {
            let (every, recheck, shutdown) = (config.gaps.interval, config.gaps.recheck, shutdown.clone());
            parts.tasks.spawn_on(
                async move {
                    verifier.run(every, recheck, shutdown).await;
                    Ok("period verifier")
                },
                &background.handle(),
            );
            Some(verifier_stats)
        }
        None => None,
    };
    {
        let (wal, mut shutdown, room) = (wal.clone(), shutdown.clone(), room.clone());
        let (every, retention) = (config.log.truncate_every, config.log.retention);
        parts.tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            let mut ignoring = false;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        // Live capture stopped for the disk: the aggregator (waiting for
                        // room too) must not keep the log from giving space back, or
                        // capture would never resume. What it had not taken is lost to
                        // the derived lane, not to the log's sinks.
                        let ignored: &[&str] = match room.borrow().capture_stopped {
                            true => &[crate::aggregate::CURSOR],
                            false => &[],
                        };
                        if ignoring == ignored.is_empty() {
                            ignoring = !ignored.is_empty();
                            match ignoring {
                                true => tracing::warn!("live capture is stopped for the disk: truncation no longer waits for the aggregator"),
                                false => tracing::info!("truncation waits for the aggregator again"),
                            }
                        }
                        match wal.truncate_ignoring(retention, ignored).await {
                            Ok(out) => {
                                let removed: u64 = out.iter().map(|t| t.removed).sum();
                                if removed > 0 {
                                    tracing::info!(removed, "log truncated");
                                }
                            }
                            Err(e) => tracing::error!(error = %e, "truncation failed"),
                        }
                    }
                    _ = shutdown.changed() => return Ok("truncation"),
                }
            }
        });
    }
    let metrics_addr = if config.metrics.enabled {
        let sources = crate::metrics::Sources {
            wal: wal.clone(),
            data_dir: config.log.data_dir.clone(),
            live: live_stats.clone(),
            backfill: backfill.clone(),
            aggregate: aggregate.clone(),
            verifier: verifier.clone(),
            sinks: sinks.clone(),
            priority: priority.clone(),
            calendar: tickvault_core::calendar::Calendar::new(&config.calendar),
            retention: config.log.retention,
            reserve: config.log.disk_reserve,
            room: room.clone(),
        };
        // Capture outranks being watched: an address in use is an error line, not a stop.
        match crate::metrics::serve(config.metrics.listen, sources, shutdown.clone()).await {
            Ok((addr, server)) => {
                tracing::info!(%addr, "metrics on http://{addr}/metrics (health: /healthz, /readyz)");
                parts.tasks.spawn(async move {
                    server.await;
                    Ok("metrics server")
                });
                Some(addr)
            }
            Err(e) => {
                tracing::error!(listen = %config.metrics.listen, error = %e, "cannot serve metrics; capturing without them");
                None
            }
        }
    } else {
        None
    };
    Ok(Running {
        wal,
        live: live_stats,
        backfill,
        aggregate,
        verifier,
        sinks,
        priority,
        metrics_addr,
        tasks: parts.tasks,
        live_runners: parts.live_runners,
        _background: background,
        stop,
        stop_live_runners,
    })
}

/// How a part's task ended.
type Joined = Result<anyhow::Result<&'static str>, tokio::task::JoinError>;

/// A part's result; a panic is an error.
fn outcome(joined: Joined) -> anyhow::Result<&'static str> {
    joined.unwrap_or_else(|e| Err(anyhow::anyhow!("task panicked: {e}")))
}

impl Running {
    /// Waits for a part to end; `None` once every part has ended.
    pub async fn join_next(&mut self) -> Option<anyhow::Result<&'static str>> {
        let joined = tokio::select! {
            Some(joined) = self.tasks.join_next() => joined,
            Some(joined) = self.live_runners.join_next() => joined,
            else => return None,
        };
        Some(outcome(joined))
    }

    /// Stops everything (the live runners last, after they forwarded what the sources
    /// left in the live lane), waits for every part, and syncs the log. The first error
    /// of a part is returned, after the rest have stopped.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        fn note(joined: Joined, first: &mut Option<anyhow::Error>) {
            if let Err(e) = outcome(joined) {
                tracing::error!(error = %format!("{e:#}"), "part failed");
                first.get_or_insert(e);
            }
        }
        let mut first_error = None;
        let _ = self.stop.send(true);
        while let Some(joined) = self.tasks.join_next().await {
            note(joined, &mut first_error);
        }
        // The sources have stopped: what the live lane holds now is all there will be.
        let _ = self.stop_live_runners.send(true);
        while let Some(joined) = self.live_runners.join_next().await {
            note(joined, &mut first_error);
        }
        self.wal.shutdown().await?;
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// The log's options from the config's `[log]`.
pub fn wal_options(config: &Config) -> tickvault_wal::WalOptions {
    tickvault_wal::WalOptions {
        channel_capacity: config.log.channel_capacity,
        max_group_records: config.log.max_group_records,
        ..Default::default()
    }
}
