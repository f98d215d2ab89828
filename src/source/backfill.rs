//! The backfill downloader: minute bars from Polygon's aggregates endpoint into the
//! `backfill` lane.
//!
//! The range of each symbol is cut into periods (`backfill.chunk`, three months by
//! default). A period is fetched as one chain of requests following `next_url` (with the
//! key sent again as a Bearer header, since `next_url` never carries it), each page
//! appended to the log as it arrives, so memory is bounded by one page whatever the
//! range. The period tracker lives in the log's state space, and each append carries
//! the period's progress in the same durable write as its bars: a finished period is
//! never fetched again, and an unfinished one resumes at the first bar the log does not
//! hold, wherever a crash came (mid-page too), so no bar is appended twice. Requests
//! are paced to the plan's quota; 429 and 5xx answers are retried with exponential
//! backoff and full jitter, honouring `Retry-After`. While the backfill lane's backlog
//! (head minus the slowest cursor) is above the high-water mark, the downloader waits;
//! live capture never does.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use tickvault_wal::{Batch, Lane, Space, Wal};
use tokio::sync::watch;
// tokio's clock, so that tests with paused time drive it.
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::coverage::Marks;
use crate::event::{Body, Capture, Event, Feed, EVENT_KIND, MINUTE_MS};
use crate::polygon::rest::AggsPage;
use crate::polygon::symbol;
use crate::settings::Secret;
use crate::sink::priority::{pause_for, Priority, LIVE_FLOWING};
use tickvault_core::calendar::Calendar;

/// One symbol's backfill over `from_ms..to_ms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub feed: Feed,
    pub symbol: String,
    pub from_ms: i64,
    pub to_ms: i64,
}

/// Settings of the downloader.
#[derive(Clone, Debug)]
pub struct BackfillSpec {
    pub rest_url: String,
    pub api_key: Secret,
    pub chunk: Duration,
    pub page_limit: u32,
    pub max_attempts: u32,
    pub concurrency: usize,
    pub requests_per_minute: u32,
    pub high_water: u64,
    /// `backfill.live_duty`.
    pub live_duty: f64,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Market hours: a minute in session that a finished period has no bar for is a
    /// source hole.
    pub calendar: Calendar,
}

/// Counters for progress and metrics.
#[derive(Debug, Default)]
pub struct BackfillStats {
    pub periods_total: AtomicU64,
    pub periods_done: AtomicU64,
    pub periods_skipped: AtomicU64,
    pub periods_failed: AtomicU64,
    /// Periods downloaded as far as the source has them, the rest not there yet (the
    /// present, a delayed plan's last minutes): resumed by a later pass.
    pub periods_ahead: AtomicU64,
    /// Bars refused as malformed (see `Event::problem`).
    pub malformed: AtomicU64,
    pub requests: AtomicU64,
    pub pages: AtomicU64,
    /// Bars appended per feed, in [`Feed::ALL`]'s order (their sum: [`BackfillStats::bars`]).
    pub bars_by_feed: [AtomicU64; 3],
    pub retries: AtomicU64,
    pub rate_limited: AtomicU64,
    pub server_errors: AtomicU64,
    pub waiting_for_backlog: AtomicBool,
    /// Waiting for free space on the log's disk (`log.disk_reserve`).
    pub waiting_for_disk: AtomicBool,
    /// Milliseconds the appends paused for live (`backfill.live_duty`).
    pub paused_ms: AtomicU64,
    /// Milliseconds of market time covered by finished pages (for progress bars).
    pub covered_ms: AtomicU64,
    /// Gaps fetched (see `Repair`).
    pub repairs: AtomicU64,
    /// Passes over the periods finished (see `Downloader::run_every`).
    pub passes: AtomicU64,
}

impl BackfillStats {
    /// Bars appended.
    pub fn bars(&self) -> u64 {
        self.bars_by_feed.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Zeroes the counters of one pass over the periods (see `Downloader::run_every`).
    pub fn begin_pass(&self) {
        for counter in [
            &self.periods_total,
            &self.periods_done,
            &self.periods_skipped,
            &self.periods_failed,
            &self.periods_ahead,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }
}

/// A period of the tracker, as stored: one chunk of a symbol's time line, aligned to
/// whole multiples of `backfill.chunk` since the epoch, so that runs at different times
/// find the same periods. A period's downloaded range is `[from_ms, resume_from_ms)`:
/// the first and the last period of a lookback are only partly wanted, and the last one
/// grows run after run as time passes (only its new minutes are fetched).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Period {
    pub feed: Feed,
    pub symbol: String,
    /// The chunk's start (the tracker's key).
    pub start_ms: i64,
    /// The chunk's end (exclusive).
    pub end_ms: i64,
    pub state: PeriodState,
    /// Where the downloaded range begins (absent in trackers written before it was
    /// recorded: the chunk's start).
    #[serde(default)]
    pub from_ms: Option<i64>,
    /// Where the downloaded range ends: the `from` of the next page to fetch.
    pub resume_from_ms: i64,
    pub bars: u64,
    /// A gap's repair, not a period of the tracker: its progress is kept apart.
    #[serde(default)]
    pub repair: bool,
}

impl Period {
    /// Where the downloaded range begins.
    pub fn from_ms(&self) -> i64 {
        self.from_ms.unwrap_or(self.start_ms)
    }

    /// The tracker's key (a repair's under its own prefix, so the tracker never lists it).
    fn key(&self) -> Vec<u8> {
        match self.repair {
            false => period_key(self.feed, &self.symbol, self.start_ms),
            true => {
                let mut key = format!("{REPAIR_PREFIX}{}/{}/", self.feed, self.symbol).into_bytes();
                key.extend_from_slice(&self.start_ms.to_be_bytes());
                key
            }
        }
    }

    /// Everything before `resume_from_ms` is in the log; `done`: the period too.
    fn advance_to(&mut self, resume_from_ms: i64, done: bool) {
        self.resume_from_ms = resume_from_ms;
        if done {
            self.state = PeriodState::Downloaded;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeriodState {
    /// A chain of requests was interrupted at `resume_from_ms`.
    Pending,
    /// Everything from `from_ms` to `resume_from_ms` is in the log.
    Downloaded,
    /// Downloaded, and every enabled sink held every key of it when last checked
    /// ([`crate::verify::periods`]). Never stored in a period: told by its
    /// [`Verification`] (see [`periods_as_they_stand`]).
    Verified,
}

impl PeriodState {
    pub const ALL: [PeriodState; 3] = [PeriodState::Pending, PeriodState::Downloaded, PeriodState::Verified];

    /// As stored and reported: `pending`, `downloaded`, `verified`.
    pub fn name(self) -> &'static str {
        match self {
            PeriodState::Pending => "pending",
            PeriodState::Downloaded => "downloaded",
            PeriodState::Verified => "verified",
        }
    }
}

/// What the period verifier found of one period: every enabled sink held every key of
/// its downloaded range `[from_ms, resume_from_ms)` at `at_ms`. Kept apart from the
/// period (the downloader rewrites that as it goes; two writers of one key would race),
/// and speaking only for that range: a period downloaded further since is not verified.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub from_ms: i64,
    pub resume_from_ms: i64,
    pub at_ms: i64,
}

const VERIFIED_PREFIX: &str = "backfill/verified/";

/// The key of a period's [`Verification`].
pub fn verification_key(period: &Period) -> Vec<u8> {
    let mut key = format!("{VERIFIED_PREFIX}{}/{}/", period.feed, period.symbol).into_bytes();
    key.extend_from_slice(&period.start_ms.to_be_bytes());
    key
}

/// Every [`Verification`], by its key.
pub fn verifications(
    reader: &tickvault_wal::LogReader,
) -> Result<std::collections::HashMap<Vec<u8>, Verification>, tickvault_wal::ReadError> {
    Ok(reader
        .scan_state(Space::State, VERIFIED_PREFIX.as_bytes())?
        .into_iter()
        .filter_map(|(k, v)| Some((k, serde_json::from_slice(&v).ok()?)))
        .collect())
}

/// Whether `verification` speaks for `period` as it is now.
pub fn verifies(verification: Option<&Verification>, period: &Period) -> bool {
    period.state == PeriodState::Downloaded
        && verification.is_some_and(|v| v.from_ms == period.from_ms() && v.resume_from_ms == period.resume_from_ms)
}

/// Every period the tracker holds, [`PeriodState::Verified`] where its verification
/// speaks for it.
pub fn periods_as_they_stand(reader: &tickvault_wal::LogReader) -> Result<Vec<Period>, tickvault_wal::ReadError> {
    let checked = verifications(reader)?;
    let mut tracked = periods(reader)?;
    for p in &mut tracked {
        if verifies(checked.get(&verification_key(p)), p) {
            p.state = PeriodState::Verified;
        }
    }
    Ok(tracked)
}

/// Bars per append to the log: as many as a group commit that carries a live append
/// takes beside it, so that such a group takes exactly one of these.
const APPEND_BARS: usize = tickvault_wal::BACKFILL_WITH_LIVE;

const PERIOD_PREFIX: &str = "backfill/period/";
const REPAIR_PREFIX: &str = "backfill/repair/";

fn period_key(feed: Feed, symbol: &str, start_ms: i64) -> Vec<u8> {
    let mut key = format!("{PERIOD_PREFIX}{feed}/{symbol}/").into_bytes();
    key.extend_from_slice(&start_ms.to_be_bytes());
    key
}

/// Every period the tracker holds.
pub fn periods(reader: &tickvault_wal::LogReader) -> Result<Vec<Period>, tickvault_wal::ReadError> {
    recorded(reader, PERIOD_PREFIX)
}

/// How far the backfill of `symbol` has downloaded: the furthest point of its periods
/// (`None` before its first).
pub fn frontier(periods: &[Period], feed: Feed, symbol: &str) -> Option<i64> {
    periods
        .iter()
        .filter(|p| p.feed == feed && p.symbol == symbol)
        .map(|p| p.resume_from_ms)
        .max()
}

fn recorded(reader: &tickvault_wal::LogReader, prefix: &str) -> Result<Vec<Period>, tickvault_wal::ReadError> {
    Ok(reader
        .scan_state(Space::State, prefix.as_bytes())?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect())
}

/// The daemon's gap repairs, as recorded (pending ones were cut short).
pub fn repairs(reader: &tickvault_wal::LogReader) -> Result<Vec<Period>, tickvault_wal::ReadError> {
    recorded(reader, REPAIR_PREFIX)
}

/// A job's part of one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// The chunk, aligned to whole multiples of `backfill.chunk` since the epoch.
    pub chunk: (i64, i64),
    /// The part of it the job wants.
    pub from_ms: i64,
    pub to_ms: i64,
}

/// Splits a job into the chunks it touches, aligned to whole multiples of `chunk` since
/// the epoch, so that any range yields the same chunks (and a later run, whose lookback
/// has moved on, finds them again).
pub fn split(job: &Job, chunk: Duration) -> Vec<Span> {
    let chunk = i64::try_from(chunk.as_millis()).unwrap_or(i64::MAX).max(MINUTE_MS);
    let mut out = Vec::new();
    let mut start = job.from_ms.div_euclid(chunk) * chunk;
    while start < job.to_ms {
        let end = start.saturating_add(chunk);
        out.push(Span {
            chunk: (start, end),
            from_ms: start.max(job.from_ms),
            to_ms: end.min(job.to_ms),
        });
        start = end;
    }
    out
}

/// What a request came to.
enum Fetch {
    Page(AggsPage),
    /// Permanent: a 4xx other than 429.
    Refused(String),
}

/// What the downloader last saw of the live lane, for pacing its appends while live
/// events are captured (`backfill.live_duty`): live is flowing when the live lane's head
/// moved within the last [`LIVE_FLOWING`].
struct LiveSeen {
    head: u64,
    moved_at: Option<Instant>,
}

impl LiveSeen {
    /// Whether live events were captured within the last [`LIVE_FLOWING`] (as of `now`).
    fn flowing(&mut self, head: u64, now: Instant) -> bool {
        if head != self.head {
            self.head = head;
            self.moved_at = Some(now);
        }
        self.moved_at.is_some_and(|at| now.duration_since(at) <= LIVE_FLOWING)
    }
}

pub struct Downloader {
    spec: BackfillSpec,
    wal: Wal,
    /// Held for one page's appends (and its pause), so pages are appended one at a time
    /// across the downloader's requests.
    live: tokio::sync::Mutex<LiveSeen>,
    http: reqwest::Client,
    limiter: DefaultDirectRateLimiter,
    pub stats: Arc<BackfillStats>,
    /// The sinks' priority: its live latency budget scales `live_duty` too.
    priority: Option<Arc<Priority>>,
    /// What the log's disk allows: pages wait while it is under twice its reserve.
    room: Option<watch::Receiver<crate::disk::Room>>,
    /// Gaps to look for and fetch between passes.
    repair: Option<Repair>,
}

/// The gap repair: every `interval`, and right after a live feed reconnects, the gaps
/// of `watched` over `lookback` (`crate::gaps::scan`) are fetched like periods.
pub struct Repair {
    pub watched: Vec<crate::gaps::Watched>,
    pub lookback: Duration,
    pub interval: Duration,
    /// The live feeds, whose connections are counted: a new one means a reconnect.
    pub live: Vec<Arc<crate::source::live::LiveStats>>,
}

impl Downloader {
    pub fn new(spec: BackfillSpec, wal: Wal, stats: Arc<BackfillStats>) -> anyhow::Result<Downloader> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("tickvault/", env!("CARGO_PKG_VERSION")))
            .build()?;
        // Evenly spaced, no burst: Polygon counts requests per clock minute, and a burst
        // at the start of a minute would draw a 429 later in it. 1% of headroom absorbs
        // timer jitter.
        let quota = match NonZeroU32::new(spec.requests_per_minute) {
            Some(n) => {
                let period = Duration::from_secs_f64(60.0 / f64::from(n.get()) * 1.01);
                Quota::with_period(period)
                    .context("quota")?
                    .allow_burst(NonZeroU32::MIN)
            }
            None => Quota::per_second(NonZeroU32::new(100).unwrap_or(NonZeroU32::MIN)),
        };
        let live = tokio::sync::Mutex::new(LiveSeen {
            head: wal.head(Lane::Live),
            moved_at: None,
        });
        Ok(Downloader {
            spec,
            live,
            wal,
            http,
            limiter: RateLimiter::direct(quota),
            stats,
            priority: None,
            room: None,
            repair: None,
        })
    }

    /// Paces the appends by `priority`'s share of `live_duty` (the sinks' live latency
    /// budget) instead of `live_duty` alone.
    pub fn yielding_to(mut self, priority: Arc<Priority>) -> Downloader {
        self.priority = Some(priority);
        self
    }

    /// Waits before each page while `room` says the disk is under twice its reserve.
    pub fn guarded_by(mut self, room: watch::Receiver<crate::disk::Room>) -> Downloader {
        self.room = Some(room);
        self
    }

    /// Looks for gaps and fetches them between passes (see [`Repair`]).
    pub fn repairing(mut self, repair: Repair) -> Downloader {
        self.repair = Some(repair);
        self
    }

    /// The ranges of a gap of `symbol` that are safe to fetch: none that a later pass
    /// will fetch too (which would put its bars in the log twice). For a backfill symbol,
    /// what a tracker period has downloaded already (`[from_ms, resume_from_ms)`), and
    /// what lies before its first period (older than `backfill.lookback` reached when
    /// the backfill began, within `gaps.lookback`: no pass goes there); for a live-only
    /// one, all of it.
    fn repairable(known: &[Period], w: &crate::gaps::Watched, from: i64, to: i64) -> Vec<(i64, i64)> {
        if !w.backfilled {
            return vec![(from, to)];
        }
        let own: Vec<&Period> = known
            .iter()
            .filter(|p| p.feed == w.feed && p.symbol == w.symbol)
            .collect();
        let mut out: Vec<(i64, i64)> = own
            .iter()
            .map(|p| (from.max(p.from_ms()), to.min(p.resume_from_ms)))
            .filter(|(a, b)| a < b)
            .collect();
        if let Some(first) = own.iter().map(|p| p.from_ms()).min() {
            if from < first.min(to) {
                out.push((from, first.min(to)));
            }
        }
        // Captured live too: what a live disconnect left missing after the backfill's
        // frontier is fetched now, not at the next pass (which then skips it, see
        // `period`).
        if w.live {
            let frontier = frontier(known, w.feed, &w.symbol).unwrap_or(i64::MAX);
            if from.max(frontier) < to {
                out.push((from.max(frontier), to));
            }
        }
        out.sort();
        out
    }

    /// Fetches the gaps found now. Returns the ranges fetched.
    pub async fn repair_gaps(&self, shutdown: &watch::Receiver<bool>, reconnected: bool) -> anyhow::Result<u64> {
        let Some(repair) = &self.repair else { return Ok(0) };
        let (from_ms, mut to_ms) = crate::gaps::window(repair.lookback);
        if reconnected {
            // The minutes that closed while a feed was down will never come from it:
            // fetched now, not once they are older than the settling time.
            let now_ms = crate::event::now_ms();
            to_ms = to_ms.max(now_ms.div_euclid(MINUTE_MS) * MINUTE_MS);
        }
        let (found, known) = {
            let reader = self.wal.reader();
            let found = crate::gaps::scan(reader, &self.spec.calendar, &repair.watched, from_ms, to_ms)?;
            (found, periods(reader)?)
        };
        let mut fetched = 0;
        for (symbol, w) in found.iter().zip(&repair.watched) {
            for gap in &symbol.gaps {
                for (from, to) in Self::repairable(&known, w, gap.from_ms, gap.to_ms) {
                    if *shutdown.borrow() {
                        return Ok(fetched);
                    }
                    tracing::info!(feed = %w.feed, symbol = %w.symbol, from_ms = from, to_ms = to, why = %gap.why, "fetching a gap");
                    let period = Period {
                        feed: w.feed,
                        symbol: w.symbol.clone(),
                        start_ms: from,
                        end_ms: to,
                        state: PeriodState::Pending,
                        from_ms: Some(from),
                        resume_from_ms: from,
                        bars: 0,
                        repair: true,
                    };
                    let span = Span {
                        chunk: (from, to),
                        from_ms: from,
                        to_ms: to,
                    };
                    self.period(period, span, shutdown.clone()).await?;
                    self.stats.repairs.fetch_add(1, Ordering::Relaxed);
                    fetched += 1;
                }
            }
        }
        Ok(fetched)
    }

    /// Waits `every`, fetching gaps every repair interval and right after a live
    /// reconnect meanwhile. False when stopped.
    async fn wait_repairing(&self, every: Duration, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<bool> {
        let until = Instant::now() + every;
        let Some(repair) = &self.repair else {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return Ok(true),
                _ = shutdown.changed() => return Ok(!*shutdown.borrow()),
            }
        };
        let connects = || {
            repair
                .live
                .iter()
                .map(|s| s.connects.load(Ordering::Relaxed))
                .sum::<u64>()
        };
        let mut seen = connects();
        let mut next_repair = Instant::now() + repair.interval;
        loop {
            // A reconnect is looked for every 100 ms: its missed minutes are fetched at once.
            let wake = until.min(next_repair).min(Instant::now() + Duration::from_millis(100));
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {}
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                return Ok(false);
            }
            if Instant::now() >= until {
                return Ok(true);
            }
            let now_connects = connects();
            if now_connects > seen || Instant::now() >= next_repair {
                let reconnected = now_connects > seen;
                seen = now_connects;
                if let Err(e) = self.repair_gaps(shutdown, reconnected).await {
                    tracing::warn!(error = %format!("{e:#}"), "gap repair failed; tried again at the next interval");
                }
                next_repair = Instant::now() + repair.interval;
            }
        }
    }

    /// Runs every job to completion (or until `shutdown`). Finished periods are skipped.
    /// Passes over `jobs()` (made anew each time: the range ends at the present) until
    /// `shutdown`, `every` apart: a period that failed, or was downloaded only as far as
    /// the source had it, is tried again by the next pass, not only at a restart. A
    /// finished period costs a later pass nothing. The per-pass counters (periods) start
    /// again with each pass; bars, requests and retries add up.
    pub async fn run_every(
        &self,
        jobs: impl Fn() -> Vec<Job>,
        every: Duration,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<()> {
        loop {
            self.stats.begin_pass();
            self.run(&jobs(), shutdown.clone()).await?;
            self.stats.passes.fetch_add(1, Ordering::Relaxed);
            let again =
                self.stats.periods_failed.load(Ordering::Relaxed) + self.stats.periods_ahead.load(Ordering::Relaxed);
            tracing::info!(periods_left = again, next_in = ?every, "backfill pass done");
            // After each pass (and so at start-up): what the pass leaves missing.
            if let Err(e) = self.repair_gaps(&shutdown, false).await {
                tracing::warn!(error = %format!("{e:#}"), "gap repair failed; tried again at the next interval");
            }
            if !self.wait_repairing(every, &mut shutdown).await? {
                return Ok(());
            }
        }
    }

    pub async fn run(&self, jobs: &[Job], shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let known = periods(self.wal.reader())?;
        let mut todo = Vec::new();
        for job in &merged(jobs) {
            for span in split(job, self.spec.chunk) {
                let (start, end) = span.chunk;
                self.stats.periods_total.fetch_add(1, Ordering::Relaxed);
                let existing = known
                    .iter()
                    .find(|p| p.feed == job.feed && p.symbol == job.symbol && p.start_ms == start && p.end_ms == end)
                    // Usable when it downloaded from the span's start or earlier (a
                    // longer lookback than before fetches the chunk again).
                    .filter(|p| p.from_ms() <= span.from_ms);
                match existing {
                    Some(p) if p.resume_from_ms >= span.to_ms => {
                        self.stats.periods_skipped.fetch_add(1, Ordering::Relaxed);
                        self.stats.periods_done.fetch_add(1, Ordering::Relaxed);
                        self.stats
                            .covered_ms
                            .fetch_add((span.to_ms - span.from_ms) as u64, Ordering::Relaxed);
                    }
                    // Resumes where it stopped: an interrupted chain, or the newest chunk
                    // that time has grown since the last run.
                    Some(p) => todo.push((p.clone(), span)),
                    None => todo.push((
                        Period {
                            feed: job.feed,
                            symbol: job.symbol.clone(),
                            start_ms: start,
                            end_ms: end,
                            state: PeriodState::Pending,
                            from_ms: Some(span.from_ms),
                            resume_from_ms: span.from_ms,
                            bars: 0,
                            repair: false,
                        },
                        span,
                    )),
                }
            }
        }
        let results: Vec<anyhow::Result<()>> = futures_util::stream::iter(todo)
            .map(|(period, span)| {
                let shutdown = shutdown.clone();
                async move { self.period(period, span, shutdown).await }
            })
            .buffer_unordered(self.spec.concurrency.max(1))
            .collect()
            .await;
        for r in results {
            r?;
        }
        Ok(())
    }

    /// The minutes of `period`'s downloaded range, up to `until` where `page` ends it,
    /// that are in market hours and have no bar: not in the log (the coverage index, for
    /// the pages before) and not in `page`.
    fn source_holes(&self, period: &Period, until: i64, page: &AggsPage) -> anyhow::Result<Marks> {
        let in_page: std::collections::HashSet<i64> = page.results.iter().map(|b| b.t).collect();
        let now_ms = crate::event::now_ms();
        let (holes, _) = crate::coverage::source_holes(
            self.wal.reader(),
            &self.spec.calendar,
            period.feed,
            &period.symbol,
            (period.from_ms(), until.min(now_ms)),
            |minute| in_page.contains(&minute),
        )?;
        Ok(holes)
    }

    /// Downloads `span` of `period`, from where the period's downloaded range ends.
    async fn period(&self, mut period: Period, span: Span, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let ticker = symbol::rest_ticker(period.feed, &period.symbol);
        let until = span.to_ms;
        self.stats
            .covered_ms
            .fetch_add((period.resume_from_ms - span.from_ms).max(0) as u64, Ordering::Relaxed);
        period.state = PeriodState::Pending;
        // A tracker period leaves out the minutes a finished repair already appended
        // (a live symbol's gap past the backfill's frontier): no bar twice in the lane.
        let repaired: Vec<(i64, i64)> = match period.repair {
            true => Vec::new(),
            false => repairs(self.wal.reader())?
                .into_iter()
                .filter(|r| r.feed == period.feed && r.symbol == period.symbol && r.state != PeriodState::Pending)
                .map(|r| (r.from_ms(), r.resume_from_ms))
                .filter(|(a, b)| *a < until && *b > period.resume_from_ms)
                .collect(),
        };
        let base = self.spec.rest_url.trim_end_matches('/');
        // `to` is inclusive at Polygon: stop one millisecond before the span's end.
        let mut url = format!(
            "{base}/v2/aggs/ticker/{ticker}/range/1/minute/{}/{}?adjusted=true&sort=asc&limit={}",
            period.resume_from_ms,
            until - 1,
            self.spec.page_limit
        );
        loop {
            if *shutdown.borrow() {
                return Ok(());
            }
            self.wait_for_backlog(&mut shutdown).await;
            if let Some(room) = &self.room {
                let mut room = room.clone();
                if room.borrow().backfill_paused {
                    self.stats.waiting_for_disk.store(true, Ordering::Relaxed);
                    crate::disk::until(&mut room, |r| !r.backfill_paused, &mut shutdown).await;
                    self.stats.waiting_for_disk.store(false, Ordering::Relaxed);
                }
            }
            let page = match self.fetch(&url, &mut shutdown).await? {
                Some(Fetch::Page(page)) => page,
                Some(Fetch::Refused(why)) => {
                    self.stats.periods_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(%ticker, start_ms = period.start_ms, %why, "backfill period refused; left pending");
                    return Ok(());
                }
                // Stopped, not failed: the period resumes at the next start.
                None if *shutdown.borrow() => return Ok(()),
                None => {
                    self.stats.periods_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%ticker, start_ms = period.start_ms, "backfill period gave up after retries; left pending for the next pass");
                    return Ok(());
                }
            };
            let count = page.results.len() as u64;
            let captured_at_ns = crate::event::now_ns();
            let resumed_at = period.resume_from_ms;
            // Where the page leaves the period: what the answer covered, and no further.
            let last_t = page.results.iter().map(|bar| bar.t).max();
            let page_end = covered_until(&page, last_t, resumed_at, until, crate::event::now_ms());
            let finished = page.next_url.is_none() && page_end >= until;
            // One page's appends at a time, and while live flows a pause after them.
            let mut seen = self.live.lock().await;
            let started = Instant::now();
            // Small appends: a group commit that carries a live append takes one of them at
            // most, so live records never share an fsync with more than ~200 KB of bars.
            // Each carries the period's progress up to its last bar in the same durable
            // write, so a crash anywhere leaves the tracker saying exactly which bars are
            // in the log, and the restart fetches from the next one: none twice.
            // The earliest bar of each append: mid-page, the progress is the earliest bar
            // still to append (pages come sorted; one that is not would have bars fetched
            // twice, never skipped).
            let earliest: Vec<Option<i64>> = page
                .results
                .chunks(APPEND_BARS)
                .map(|chunk| chunk.iter().map(|bar| bar.t).min())
                .collect();
            // A period that ends here marks, with its last append, the minutes in market
            // hours it got no bar for: the source has none.
            let mut holes = match finished {
                true => self.source_holes(&period, until, &page)?,
                false => Marks::default(),
            };
            let chunks = page.results.chunks(APPEND_BARS).count();
            for (i, chunk) in page.results.chunks(APPEND_BARS).enumerate() {
                let mut batch = Batch::with_capacity(chunk.len(), chunk.len() * 96);
                let mut marks = Marks::default();
                for bar in chunk {
                    let event = Event {
                        capture: Capture {
                            feed: period.feed,
                            lane: Lane::Backfill,
                            captured_at_ns,
                        },
                        body: Body::Bar(bar.to_bar(&period.symbol)),
                    };
                    // A bar a sink would refuse is counted and left out: the minute is
                    // covered, by a bar the source sent wrong.
                    if let Some(problem) = event.problem() {
                        self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%ticker, t = bar.t, problem, "malformed bar skipped");
                        continue;
                    }
                    if repaired.iter().any(|(a, b)| (*a..*b).contains(&bar.t)) {
                        continue;
                    }
                    batch.push(EVENT_KIND, &event.to_payload()?)?;
                    marks.add_event(&event);
                }
                marks.into_batch(&mut batch);
                if i + 1 == chunks {
                    std::mem::take(&mut holes).into_batch(&mut batch);
                }
                period.bars += chunk.len() as u64;
                match earliest[i + 1..].iter().flatten().min() {
                    Some(&t) => period.advance_to(t, false),
                    None => period.advance_to(page_end, finished),
                }
                let (key, value) = (period.key(), serde_json::to_vec(&period)?);
                self.wal
                    .append_with_state(Lane::Backfill, batch, Space::State, key, value)
                    .await
                    .context("appending backfill bars")?;
            }
            if page.results.is_empty() && page_end > resumed_at {
                period.advance_to(page_end, finished);
                let mut batch = Batch::new();
                holes.into_batch(&mut batch);
                let (key, value) = (period.key(), serde_json::to_vec(&period)?);
                self.wal
                    .append_with_state(Lane::Backfill, batch, Space::State, key, value)
                    .await
                    .context("saving a backfill period")?;
            }
            if seen.flowing(self.wal.head(Lane::Live), Instant::now()) {
                let duty = match &self.priority {
                    Some(p) => p.scaled(self.spec.live_duty),
                    None => self.spec.live_duty,
                };
                let pause = pause_for(started.elapsed(), duty);
                if !pause.is_zero() {
                    self.stats
                        .paused_ms
                        .fetch_add(pause.as_millis() as u64, Ordering::Relaxed);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.changed() => {}
                    }
                }
            }
            drop(seen);
            self.stats.pages.fetch_add(1, Ordering::Relaxed);
            self.stats.bars_by_feed[period.feed.index()].fetch_add(count, Ordering::Relaxed);
            self.stats
                .covered_ms
                .fetch_add((period.resume_from_ms - resumed_at).max(0) as u64, Ordering::Relaxed);
            match page.next_url {
                Some(next) => match self.rebase(&next) {
                    Ok(next) => url = next,
                    // One bad answer costs this period, not the downloader (and never
                    // live capture): it is left pending where the log's bars end.
                    Err(e) => {
                        self.stats.periods_failed.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(%ticker, start_ms = period.start_ms, error = %format!("{e:#}"), "backfill period left pending");
                        return Ok(());
                    }
                },
                None if finished => {
                    // A repair is not one of the pass's periods (it has its own count).
                    if !period.repair {
                        self.stats.periods_done.fetch_add(1, Ordering::Relaxed);
                    }
                    return Ok(());
                }
                None => {
                    // The rest is not at the source yet (the present, or a delayed
                    // plan's last minutes): fetched by a later pass, from here.
                    if !period.repair {
                        self.stats.periods_ahead.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::info!(%ticker, start_ms = period.start_ms, downloaded_to_ms = period.resume_from_ms, status = %page.status, "backfill period downloaded as far as the source has it");
                    return Ok(());
                }
            }
        }
    }

    /// `next_url` re-based onto the configured base URL (its path and query kept).
    fn rebase(&self, next: &str) -> anyhow::Result<String> {
        let parsed = reqwest::Url::parse(next).with_context(|| format!("bad next_url {next:?}"))?;
        let mut url = format!("{}{}", self.spec.rest_url.trim_end_matches('/'), parsed.path());
        if let Some(q) = parsed.query() {
            url.push('?');
            url.push_str(q);
        }
        Ok(url)
    }

    async fn wait_for_backlog(&self, shutdown: &mut watch::Receiver<bool>) {
        loop {
            let head = self.wal.head(Lane::Backfill);
            let slowest = self
                .wal
                .reader()
                .cursors()
                .ok()
                .and_then(|cs| cs.iter().filter(|c| c.lane == Lane::Backfill).map(|c| c.seq).min());
            let backlog = slowest.map_or(0, |s| head.saturating_sub(s));
            if backlog <= self.spec.high_water || *shutdown.borrow() {
                self.stats.waiting_for_backlog.store(false, Ordering::Relaxed);
                return;
            }
            if !self.stats.waiting_for_backlog.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    backlog,
                    high_water = self.spec.high_water,
                    "backfill waiting for sinks to drain"
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = shutdown.changed() => {}
            }
        }
    }

    /// One request with retries. `None` when the attempts ran out or shutdown came.
    async fn fetch(&self, url: &str, shutdown: &mut watch::Receiver<bool>) -> anyhow::Result<Option<Fetch>> {
        let mut backoff = Backoff::new(self.spec.retry_min, self.spec.retry_max);
        loop {
            if backoff.attempts() >= self.spec.max_attempts || *shutdown.borrow() {
                return Ok(None);
            }
            // The quota's wait ends at a stop too: with a small quota and many periods at
            // once, the last in line waits minutes for its turn.
            tokio::select! {
                _ = self.limiter.until_ready() => {}
                _ = shutdown.changed() => return Ok(None),
            }
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            let request = self
                .http
                .get(url)
                .bearer_auth(self.spec.api_key.expose())
                .header(reqwest::header::ACCEPT_ENCODING, "gzip")
                .send();
            // A stop does not wait for a slow answer: the period resumes at the next start.
            let response = tokio::select! {
                response = request => response,
                _ = shutdown.changed() => return Ok(None),
            };
            let mut delay = backoff.next_delay();
            match response {
                Ok(r) if r.status().is_success() => {
                    // A 50,000-bar page is megabytes of JSON: parse it off the async
                    // workers, so live capture on the same runtime is not held up.
                    let parsed = match r.bytes().await {
                        Ok(body) => tokio::task::spawn_blocking(move || AggsPage::parse(&body))
                            .await
                            .map_err(|e| e.to_string())
                            .and_then(|r| r.map_err(|e| e.to_string())),
                        Err(e) => Err(without_url(&e)),
                    };
                    match parsed {
                        Ok(page) if page.has_data() => return Ok(Some(Fetch::Page(page))),
                        // A 200 whose body is an error (`"status":"ERROR"`, or `{}`) is no
                        // answer: claiming it would mark the period done with no bars.
                        Ok(page) => {
                            self.stats.server_errors.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(status = %page.status, error = %page.error.as_deref().map(crate::polygon::wire::cut).unwrap_or_default(), "answer without data (HTTP 200); retrying");
                        }
                        Err(e) => tracing::warn!(error = %e, "unreadable page; retrying"),
                    }
                }
                Ok(r) => {
                    let status = r.status();
                    let retry_after = r
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| retry_after(v, jiff::Timestamp::now()));
                    let body = r.text().await.unwrap_or_default();
                    if status.as_u16() == 429 {
                        self.stats.rate_limited.fetch_add(1, Ordering::Relaxed);
                        // Without Retry-After, a 429 means "wait out the minute".
                        delay = delay.max(retry_after.unwrap_or(Duration::from_secs(60)));
                    } else if status.is_server_error() {
                        self.stats.server_errors.fetch_add(1, Ordering::Relaxed);
                        if let Some(ra) = retry_after {
                            delay = delay.max(ra);
                        }
                    } else {
                        return Ok(Some(Fetch::Refused(format!(
                            "HTTP {status}: {}",
                            crate::polygon::wire::cut(&body)
                        ))));
                    }
                    tracing::debug!(%status, ?delay, "retrying request");
                }
                Err(e) => tracing::warn!(error = %without_url(&e), "request failed; retrying"),
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return Ok(None),
            }
        }
    }
}

/// A reqwest error without its URL (which may carry query parameters worth keeping out
/// of logs).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<url>");
    }
    s
}

/// How far the period is downloaded once `page` (the answer to a request from
/// `resumed_at`) is in the log: only what the answer covered. With a `next_url`, up to
/// where it continues; on the last page of an `OK` answer, up to `until` but never past
/// the start of the present minute (`now_ms`'s; later minutes are not over, or not yet
/// there); on the last page of a `DELAYED` answer (a plan that serves recent data late),
/// up to the end of its last bar. Never before `resumed_at`.
fn covered_until(page: &AggsPage, last_t: Option<i64>, resumed_at: i64, until: i64, now_ms: i64) -> i64 {
    let after_last_bar = last_t.map(|t| t.saturating_add(MINUTE_MS));
    let claim = match &page.next_url {
        Some(next) => next_from(next).or(after_last_bar).unwrap_or(until),
        None if page.status == "DELAYED" => after_last_bar.unwrap_or(resumed_at),
        None => {
            let present = now_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
            until.min(present.max(after_last_bar.unwrap_or(i64::MIN)))
        }
    };
    claim.min(until).max(resumed_at)
}

/// One job per symbol: two spellings of one (`EUR/USD`, `C:EURUSD`) are one canonical
/// symbol, and two chains over it would write the same bars twice. Their ranges merge.
pub fn merged(jobs: &[Job]) -> Vec<Job> {
    let mut out: Vec<Job> = Vec::with_capacity(jobs.len());
    for job in jobs {
        let symbol = symbol::canonical(job.feed, &job.symbol).unwrap_or_else(|| job.symbol.clone());
        match out.iter_mut().find(|j| j.feed == job.feed && j.symbol == symbol) {
            Some(j) => {
                j.from_ms = j.from_ms.min(job.from_ms);
                j.to_ms = j.to_ms.max(job.to_ms);
            }
            None => out.push(Job { symbol, ..job.clone() }),
        }
    }
    out
}

/// A `Retry-After` value: seconds, or an HTTP date (RFC 9110), as the wait from `now`;
/// at most an hour, whatever the server says.
fn retry_after(value: &str, now: jiff::Timestamp) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => {
            let when = jiff::fmt::rfc2822::DateTimeParser::new().parse_timestamp(value).ok()?;
            let ms = when.as_millisecond().saturating_sub(now.as_millisecond());
            Duration::from_millis(u64::try_from(ms).unwrap_or(0))
        }
    };
    Some(wait.min(Duration::from_secs(3_600)))
}

/// The `from` path segment of a `next_url` (the next page's first bar, ms).
fn next_from(next: &str) -> Option<i64> {
    let path = next.split('?').next()?;
    let segments: Vec<&str> = path.rsplit('/').collect();
    segments.get(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_spellings_of_one_symbol_are_one_job_over_both_ranges() {
        let job = |symbol: &str, from_ms, to_ms| Job {
            feed: Feed::Forex,
            symbol: symbol.into(),
            from_ms,
            to_ms,
        };
        let jobs = merged(&[job("EUR/USD", 10, 20), job("C:EURUSD", 5, 15), job("GBP/USD", 1, 2)]);
        assert_eq!(jobs, vec![job("EUR/USD", 5, 20), job("GBP/USD", 1, 2)]);
    }

    #[test]
    fn a_gap_is_repaired_where_no_pass_will_fetch_it() {
        let period = |start_ms, resume_from_ms, state| Period {
            feed: Feed::Crypto,
            symbol: "BTC-USD".into(),
            start_ms,
            end_ms: start_ms + 100,
            state,
            from_ms: Some(start_ms),
            resume_from_ms,
            bars: 0,
            repair: false,
        };
        let known = [
            period(100, 200, PeriodState::Downloaded),
            period(200, 250, PeriodState::Pending),
        ];
        let watched = |live| crate::gaps::Watched {
            feed: Feed::Crypto,
            symbol: "BTC-USD".into(),
            backfilled: true,
            live,
        };
        // Before the first period (older than the backfill reached), and what the
        // periods downloaded; not what the pending period's next pass fetches.
        assert_eq!(
            Downloader::repairable(&known, &watched(false), 50, 280),
            [(50, 100), (100, 200), (200, 250)]
        );
        // Captured live too: past the frontier as well.
        assert_eq!(
            Downloader::repairable(&known, &watched(true), 50, 280),
            [(50, 100), (100, 200), (200, 250), (250, 280)]
        );
        // A live-only symbol: all of it.
        let live_only = crate::gaps::Watched {
            backfilled: false,
            ..watched(true)
        };
        assert_eq!(Downloader::repairable(&known, &live_only, 50, 280), [(50, 280)]);
    }

    #[test]
    fn retry_after_is_read_in_seconds_and_as_an_http_date() {
        let now = jiff::Timestamp::from_second(1).unwrap();
        assert_eq!(retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        assert_eq!(
            retry_after("Thu, 01 Jan 1970 00:00:04 GMT", now),
            Some(Duration::from_secs(3))
        );
        // A date passed: no wait; far ahead: an hour at most.
        assert_eq!(retry_after("Thu, 01 Jan 1970 00:00:00 GMT", now), Some(Duration::ZERO));
        assert_eq!(retry_after("99999999999", now), Some(Duration::from_secs(3_600)));
        assert_eq!(retry_after("soon", now), None);
    }

    #[test]
    fn live_flows_for_a_second_after_the_live_head_last_moved() {
        let t0 = Instant::now();
        let mut seen = LiveSeen {
            head: 7,
            moved_at: None,
        };
        assert!(
            !seen.flowing(7, t0),
            "the head the downloader started with is not live flowing"
        );
        assert!(seen.flowing(8, t0));
        assert!(seen.flowing(8, t0 + LIVE_FLOWING));
        assert!(!seen.flowing(8, t0 + LIVE_FLOWING + Duration::from_millis(1)));
        assert!(seen.flowing(9, t0 + Duration::from_secs(5)));
    }

    #[test]
    fn periods_are_aligned_so_the_same_range_splits_the_same_way() {
        let day = 86_400_000;
        let job = Job {
            feed: Feed::Forex,
            symbol: "EUR/USD".into(),
            from_ms: 10 * day + 5,
            to_ms: 40 * day,
        };
        let week = 7 * day;
        let spans = split(&job, Duration::from_secs(7 * 86_400));
        assert_eq!(spans.first().unwrap().from_ms, 10 * day + 5);
        assert_eq!(spans.last().unwrap().to_ms, 40 * day);
        assert!(spans.windows(2).all(|w| w[0].to_ms == w[1].from_ms));
        assert!(spans.windows(2).all(|w| w[0].chunk.1 == w[1].chunk.0));
        assert!(spans
            .iter()
            .all(|s| s.chunk.0 % week == 0 && s.chunk.1 - s.chunk.0 == week));
        assert!(spans.iter().all(|s| s.chunk.0 <= s.from_ms && s.to_ms <= s.chunk.1));
        // The same lookback a day later: the same chunks, the first and last cut elsewhere.
        let later = Job {
            from_ms: job.from_ms + day,
            to_ms: job.to_ms + day,
            ..job.clone()
        };
        let chunks = |spans: &[Span]| spans.iter().map(|s| s.chunk).collect::<Vec<_>>();
        let later = split(&later, Duration::from_secs(7 * 86_400));
        assert_eq!(chunks(&later), chunks(&spans));
    }

    #[test]
    fn next_from_reads_the_from_segment() {
        assert_eq!(
            next_from("http://h/v2/aggs/ticker/C:EURUSD/range/1/minute/1700000060000/1700999999999?cursor=x"),
            Some(1_700_000_060_000)
        );
    }
}
