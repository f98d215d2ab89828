//! One runner per (sink, lane): follows the lane from the sink's cursor, cuts batches at
//! log positions, writes each until the sink acknowledges it, then moves the cursor.
//!
//! - The cursor moves only after the acknowledgement, so a crash at any point resends
//!   at most the batches past the cursor; the sinks' idempotent writes absorb them.
//! - A retry resends the identical batch (same rows, same range).
//! - A failing sink holds its own cursor and nothing else: the other runners have their
//!   own connections, and the backfill lane's backpressure (high-water mark) stops the
//!   downloader before the log grows without bound.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tickvault_wal::{Lane, ReadBatch, Tail, Wal};
use tokio::sync::watch;

use super::breaker::{Breaker, State, Transition};
use super::priority::Priority;
use super::{Batch, Pushed, SinkError};

/// A destination. Each runner owns one (and so one connection); connections are made
/// lazily by `write` and dropped on error, so the next attempt reconnects.
pub trait Sink: Send + 'static {
    /// The sink's name: its cursor in the log, and its label in logs.
    fn name(&self) -> &'static str;

    /// What the destination holds of this log's `lane`, by its own record: where the
    /// runner starts. Called at the start, after [`Sink::restore`] and before any write,
    /// and retried like a write until it succeeds (a sink may connect here to learn its
    /// first note); then again after every write that needed a retry and every
    /// [`RECHECK_EVERY`], once each, while the runner goes on (see [`Holds`]).
    fn holds(&mut self, _lane: Lane) -> impl Future<Output = Result<Holds, SinkError>> + Send {
        async { Ok(Holds::Unknown) }
    }

    /// Writes a batch and returns once the sink has acknowledged all of it.
    fn write(&mut self, batch: &Batch) -> impl Future<Output = Result<(), SinkError>> + Send;

    /// What the sink wants kept with its cursor once the batches so far were
    /// acknowledged, written in the same durable write as the cursor's move and given
    /// back to [`Sink::restore`] at the next start. JetStream keeps the stream's
    /// sequence there, to find what it published past the cursor before a crash. When
    /// the log holds no note at the start, the runner keeps this one (as it is after
    /// [`Sink::holds`]) with the cursor before the first write.
    fn note(&self) -> Option<Vec<u8>> {
        None
    }

    /// The note kept with the cursor by the last run, before its first write.
    fn restore(&mut self, _note: &[u8]) {}
}

/// What a destination holds of one lane of this log, as [`Sink::holds`] finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holds {
    /// It keeps no record of its own: the log's cursor stands.
    Unknown,
    /// Every record of the lane up to this sequence (0: none), by a record it commits
    /// with its data (PostgreSQL's cursor row). The runner starts there, forward when
    /// a crash came between that commit and the log's cursor move, back when the
    /// destination lost what the log's cursor says it was sent (restored from a backup,
    /// emptied, or a new one).
    UpTo(u64),
    /// None of this log's records: the destination is not the one the cursor's note
    /// was written for (made anew since, or another one), said why.
    Nothing(String),
}

/// Which destination a sink's rows went to (a table's oid, a stream's creation time,
/// as the sink tells one from another), kept in the cursor's note, so that the sink can
/// tell a destination made anew, or another one, from the one they went to.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct WentTo(Option<String>);

impl WentTo {
    /// As a cursor's note kept it (`None`: not noted).
    pub fn noted(went_to: Option<String>) -> WentTo {
        WentTo(went_to)
    }

    pub fn get(&self) -> Option<&str> {
        self.0.as_deref()
    }

    /// The destination as found now: [`Holds::Nothing`] when it is not the one the rows
    /// went to (from now on they go to it), [`Holds::Unknown`] when it is, or when none
    /// was noted (it is taken as theirs).
    pub fn found(&mut self, found: &str) -> Holds {
        match self.0.replace(found.to_owned()) {
            Some(went) if went != found => Holds::Nothing(format!("its rows went to {went}, and it now is {found}")),
            _ => Holds::Unknown,
        }
    }
}

/// How one runner works.
#[derive(Clone, Debug)]
pub struct RunnerSpec {
    pub lane: Lane,
    /// Records per batch at most.
    pub batch_rows: usize,
    /// How long a batch waits to fill once it has a record (zero: send what is there).
    pub flush_interval: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub breaker_threshold: u32,
    /// One attempt that takes longer than this counts as failed (and is retried).
    pub attempt_timeout: Duration,
    /// Shared by every runner of a daemon: live runners report acknowledged batches to
    /// it; a backfill attempt holds one of its permits while it runs (never while it
    /// waits to retry) and, while live rows flow, keeps it idle for a pause after (see
    /// [`Priority`]). `None`: no limit and no pause.
    pub priority: Option<Arc<Priority>>,
    /// When told to stop: how long the runner may go on forwarding what the lane holds at
    /// that moment (the sources have stopped by then). Zero: stop between batches.
    pub drain_on_stop: Duration,
}

/// What a runner did, for the demo, the benchmarks and the tests.
pub struct RunnerStats {
    pub sink: &'static str,
    pub lane: Lane,
    pub rows: AtomicU64,
    pub batches: AtomicU64,
    /// The cursor: the last log position the sink acknowledged.
    pub acked_seq: AtomicU64,
    pub failures: AtomicU64,
    /// Time this backfill runner held its permit idle so that live writes ran alone, ms.
    pub yielded_ms: AtomicU64,
    /// Non-event records in the lane (drill records), covered but not sent.
    pub skipped: AtomicU64,
    pub undecodable: AtomicU64,
    pub corrupt: AtomicU64,
    /// Records the cursor was moved back over because the destination lacked them (see
    /// [`Holds`]), to be forwarded again (those the log still holds).
    pub rewound: AtomicU64,
    /// Records the sink refused for their content, set aside (see [`super::refused`]).
    pub refused: AtomicU64,
    /// The furthest position the cursor was moved back from: rows up to it are sent
    /// again, and their time since capture is not the pipeline's, so the latency
    /// histograms leave them out.
    resent_to: AtomicU64,
    /// The breaker's state: 0 closed, 1 open, 2 half-open.
    state: AtomicU8,
    /// Capture (the appliance received the event) to the sink's acknowledgement, in µs.
    pub latency_us: Mutex<hdrhistogram::Histogram<u64>>,
    /// A successful write attempt, sent to acknowledged, in µs: the sink's share of
    /// `latency_us`.
    pub write_us: Mutex<hdrhistogram::Histogram<u64>>,
    /// Capture to the start of the attempt that the sink acknowledged, per row, in µs:
    /// `latency_us` less the sink's write (the log's share and the wait for the runner).
    pub queued_us: Mutex<hdrhistogram::Histogram<u64>>,
    /// The last failed attempt's error, kept after the sink recovers (the breaker's
    /// state says whether it is failing now).
    last_error: Mutex<Option<String>>,
}

impl RunnerStats {
    pub fn new(sink: &'static str, lane: Lane) -> RunnerStats {
        RunnerStats {
            sink,
            lane,
            rows: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            acked_seq: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            yielded_ms: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            undecodable: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            rewound: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            resent_to: AtomicU64::new(0),
            state: AtomicU8::new(0),
            latency_us: Mutex::new(histogram()),
            write_us: Mutex::new(histogram()),
            queued_us: Mutex::new(histogram()),
            last_error: Mutex::new(None),
        }
    }

    /// The last failed attempt's error, if any attempt failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("last error").clone()
    }

    fn failed(&self, e: &SinkError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        *self.last_error.lock().expect("last error") = Some(e.to_string());
    }

    pub fn state(&self) -> State {
        match self.state.load(Ordering::Relaxed) {
            1 => State::Open,
            2 => State::HalfOpen,
            _ => State::Closed,
        }
    }

    /// The latency at quantile `q` (0..=1), in milliseconds; 0 with no rows yet.
    pub fn latency_ms(&self, q: f64) -> f64 {
        quantile_ms(&self.latency_us, q)
    }

    /// Empties the latency histograms (capture to commit, the write, the wait before
    /// it): figures from now on, for a measurement that leaves a warm-up out.
    pub fn reset_latency(&self) {
        for h in [&self.latency_us, &self.write_us, &self.queued_us] {
            h.lock().unwrap_or_else(|p| p.into_inner()).reset();
        }
    }

    /// Whether any row's capture-to-commit latency was recorded (rows sent again are
    /// not: see `resent_to`).
    pub fn latency_measured(&self) -> bool {
        !self.latency_us.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }

    /// A write's time at quantile `q` (0..=1), in milliseconds; 0 with no write yet.
    pub fn write_ms(&self, q: f64) -> f64 {
        quantile_ms(&self.write_us, q)
    }

    /// Capture to the acknowledged attempt's start at quantile `q` (0..=1), in
    /// milliseconds; 0 with no rows yet.
    pub fn queued_ms(&self, q: f64) -> f64 {
        quantile_ms(&self.queued_us, q)
    }

    fn note(&self, transition: Option<Transition>) {
        let Some(t) = transition else { return };
        let code = match t.to {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        };
        self.state.store(code, Ordering::Relaxed);
        // One line per change: the outage drill reads these.
        tracing::warn!(sink = self.sink, lane = %self.lane, from = t.from.name(), to = t.to.name(), "sink breaker");
    }

    /// Records each new row's capture-to-commit latency; returns the longest (`None`
    /// when every row was sent again).
    fn record_latency(&self, batch: &Batch) -> Option<Duration> {
        self.record_since_capture(&self.latency_us, jiff::Timestamp::now().as_nanosecond(), batch)
    }

    /// Records in `h`, per row of `batch` sent for the first time, the time from its
    /// capture to `at_ns`; returns the longest.
    fn record_since_capture(
        &self,
        h: &Mutex<hdrhistogram::Histogram<u64>>,
        at_ns: i128,
        batch: &Batch,
    ) -> Option<Duration> {
        let resent_to = self.resent_to.load(Ordering::Relaxed);
        if batch.last_seq <= resent_to {
            return None;
        }
        let mut h = h.lock().unwrap_or_else(|p| p.into_inner());
        let mut longest = None;
        for row in batch.rows.iter().filter(|r| r.seq > resent_to) {
            let us = u64::try_from((at_ns - i128::from(row.captured_at_ns)) / 1000)
                .unwrap_or(1)
                .max(1);
            let _ = h.record(us);
            longest = longest.max(Some(us));
        }
        longest.map(Duration::from_micros)
    }
}

fn histogram() -> hdrhistogram::Histogram<u64> {
    // 1 µs to an hour, 3 significant digits.
    hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds")
}

fn quantile_ms(h: &Mutex<hdrhistogram::Histogram<u64>>, q: f64) -> f64 {
    let h = h.lock().unwrap_or_else(|p| p.into_inner());
    if h.is_empty() {
        0.0
    } else {
        h.value_at_quantile(q) as f64 / 1000.0
    }
}

/// Where a runner whose cursor is at `position` starts, given what the destination
/// holds; `None` to start at the cursor.
fn start_from(holds: &Holds, position: u64) -> Option<u64> {
    match *holds {
        Holds::Unknown => None,
        Holds::UpTo(seq) => (seq != position).then_some(seq),
        Holds::Nothing(_) => (position > 0).then_some(0),
    }
}

/// Where a runner that has written up to `written` goes back to, mid-run, given what
/// the destination now holds; `None` while it holds all of it. Compared with what was
/// written rather than the cursor, which also passes records with nothing to send.
fn lost_since(holds: &Holds, written: u64) -> Option<u64> {
    match *holds {
        Holds::Unknown => None,
        Holds::UpTo(seq) => (seq < written).then_some(seq),
        Holds::Nothing(_) => (written > 0).then_some(0),
    }
}

/// Moves the cursor from `position` to `start`, with the sink's `note` of now (the
/// destination it was taken from), saying so when it goes back. Returns `start`.
async fn go_back(
    wal: &Wal,
    stats: &RunnerStats,
    note: Option<Vec<u8>>,
    position: u64,
    start: u64,
    holds: &Holds,
) -> anyhow::Result<u64> {
    let (name, lane) = (stats.sink, stats.lane);
    if start < position {
        let why = match holds {
            Holds::Nothing(why) => why.clone(),
            _ => format!("its own record of this log's {lane} lane ends at {start}"),
        };
        tracing::warn!(
            sink = name,
            %lane,
            cursor = position,
            from = start,
            "the destination lacks what the cursor passed ({why}): forwarding it again from the log"
        );
        let gone = wal.reader().first_retained(lane)?.saturating_sub(start + 1);
        if gone > 0 {
            tracing::warn!(sink = name, %lane, records = gone,
                "of those, records truncated from the log cannot be forwarded again");
        }
        stats
            .rewound
            .fetch_add((position - start).saturating_sub(gone), Ordering::Relaxed);
        stats.resent_to.fetch_max(position, Ordering::Relaxed);
    }
    wal.move_cursor_noted(name, lane, start, note).await?;
    stats.acked_seq.store(start, Ordering::Relaxed);
    Ok(start)
}

/// Forwards the lane from `position` until told to stop or the log shuts down (`None`),
/// or until the destination is found to lack what it was sent (where to start again,
/// and what it holds). Returns the last acknowledged position with it.
async fn forward<S: Sink>(
    sink: &mut S,
    wal: &Wal,
    spec: &RunnerSpec,
    stats: &Arc<RunnerStats>,
    breaker: &mut Breaker,
    shutdown: &mut watch::Receiver<bool>,
    mut position: u64,
) -> anyhow::Result<(u64, Option<(u64, Holds)>)> {
    let (name, lane) = (sink.name(), spec.lane);
    let tail = wal.tail(lane, position);
    // Live: a batch is cut when the previous one is acknowledged, taking everything that
    // arrived meanwhile (cutting ahead would only make live rows wait longer). Backfill:
    // the next batch is cut (read and decoded) by its own task while this one is written.
    let mut batches = Batches::new(tail, spec, stats.clone(), shutdown.clone(), lane != Lane::Live);
    let mut cursor = CursorMover::start(wal.clone(), name, lane, position, stats.clone());
    let mut written = position;
    let mut recheck_at = tokio::time::Instant::now() + RECHECK_EVERY;
    // After a failed recheck the next comes sooner (a destination made anew under a
    // runner with nothing to send is found within seconds of the server's answering
    // again): exponential from 1 s with full jitter, up to the usual interval.
    let mut recheck_retry = crate::backoff::Backoff::new(Duration::from_secs(1), RECHECK_EVERY);
    let mut lost = None;
    let outcome = async {
        loop {
            let next = tokio::select! {
                // Stop between batches, never in the middle of one.
                biased;
                _ = shutdown.changed() => {
                    if !spec.drain_on_stop.is_zero() && breaker.state() == State::Closed {
                        position = drain(sink, wal, &mut cursor, spec, breaker, stats, position).await?;
                    }
                    break;
                }
                // The mover ends only when a move failed (reading the next batch is
                // abandoned, which is fine: the runner stops).
                error = cursor.failed() => return Err(error),
                next = batches.next(recheck_at) => next?,
            };
            match next {
                Next::Batch(None) => break,
                Next::Batch(Some(batch)) => {
                    if !batch.rows.is_empty() {
                        let failures = stats.failures.load(Ordering::Relaxed);
                        if !write(sink, wal, &batch, spec, breaker, stats, shutdown).await? {
                            break;
                        }
                        written = batch.last_seq;
                        if stats.failures.load(Ordering::Relaxed) != failures {
                            // The sink failed and prepared its destination again: it may
                            // have made it anew (a server that came back empty).
                            recheck_at = tokio::time::Instant::now();
                        }
                    }
                    position = commit(&mut cursor, spec, stats, &batch, sink.note())?;
                }
                Next::Recheck => {}
            }
            if tokio::time::Instant::now() >= recheck_at {
                recheck_at = tokio::time::Instant::now() + RECHECK_EVERY;
                // One attempt: a failure here is left to the next write and its retries,
                // and to the next recheck, sooner than the usual interval.
                match attempt(sink, &Op::Resume, spec.attempt_timeout, stats).await {
                    Ok(holds) => {
                        recheck_retry.reset();
                        if let Some(start) = lost_since(&holds, written) {
                            lost = Some((start, holds));
                            break;
                        }
                    }
                    Err(e) => {
                        recheck_at = tokio::time::Instant::now() + recheck_retry.next_delay();
                        tracing::debug!(sink = name, %lane, error = %e.message, "rechecking the destination failed")
                    }
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    batches.close().await;
    // The last acknowledged position reaches the log before the runner ends, even when
    // the loop ended on an error.
    cursor.finish().await?;
    outcome?;
    Ok((position, lost))
}

enum Op<'a> {
    Resume,
    Write(&'a Batch),
}

/// What became of an operation tried until the sink acknowledged it.
enum Acked {
    Done(Holds),
    /// Told to stop while waiting.
    Stopped,
    /// A write refused for the content of a row (see [`SinkError::content`]).
    Refused(SinkError),
}

/// Writes `batch` until the sink acknowledges it (false: told to stop first). A row
/// the sink refuses for its content is found by halving the batch, writing each half
/// in order, and is set aside for this sink alone ([`super::refused`]); the rest of
/// the batch is written as usual. Writing halves again is safe: the sinks keep each
/// key once, and the halves go in log order, so what a sink's own cursor says it
/// holds stays true.
async fn write<S: Sink>(
    sink: &mut S,
    wal: &Wal,
    batch: &Batch,
    spec: &RunnerSpec,
    breaker: &mut Breaker,
    stats: &RunnerStats,
    shutdown: &mut watch::Receiver<bool>,
) -> anyhow::Result<bool> {
    let error = match until_acked(sink, Op::Write(batch), spec, breaker, stats, shutdown).await {
        Acked::Done(_) => return Ok(true),
        Acked::Stopped => return Ok(false),
        Acked::Refused(e) => e,
    };
    // Parts still to write, the next one last, the first with the refusal it had.
    let mut todo = vec![(Some(error), batch.clone())];
    // Whether the part written last (the one that ends where the batch does) was refused.
    let mut ended_refused = false;
    while let Some((refusal, part)) = todo.pop() {
        let refusal = match refusal {
            Some(e) => e,
            None => match until_acked(sink, Op::Write(&part), spec, breaker, stats, shutdown).await {
                Acked::Done(_) => {
                    ended_refused = false;
                    continue;
                }
                Acked::Stopped => return Ok(false),
                Acked::Refused(e) => e,
            },
        };
        if part.rows.len() > 1 {
            let (head, tail) = halves(&part);
            todo.push((None, tail));
            todo.push((None, head));
            continue;
        }
        let seq = part.rows[0].seq;
        super::refused::set_aside(wal, stats.sink, stats.lane, seq, &refusal).await?;
        stats.refused.fetch_add(1, Ordering::Relaxed);
        ended_refused = true;
        tracing::error!(sink = stats.sink, lane = %stats.lane, seq, code = refusal.code, error = %refusal.message,
            "the sink refused a record for its content: set aside for this sink (verify lists it), the lane moves on");
    }
    if ended_refused {
        // The batch ended in a refused row: an empty write brings what the sink
        // records of its own progress (PostgreSQL's cursor row) up to the batch's end, so
        // a later look does not take the refused row for one the sink lost.
        let end = Batch::new(batch.lane, batch.last_seq);
        if let Acked::Stopped = until_acked(sink, Op::Write(&end), spec, breaker, stats, shutdown).await {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `batch`'s rows in two batches: the first ends at its last row, the second where
/// `batch` ends.
fn halves(batch: &Batch) -> (Batch, Batch) {
    let mid = batch.rows.len() / 2;
    let first = Batch {
        lane: batch.lane,
        last_seq: batch.rows[mid - 1].seq,
        rows: batch.rows[..mid].to_vec(),
    };
    let second = Batch {
        lane: batch.lane,
        last_seq: batch.last_seq,
        rows: batch.rows[mid..].to_vec(),
    };
    (first, second)
}

/// How often a runner asks its destination again whether it still holds what it was
/// sent, besides at its start and after every write that needed a retry: a runner with
/// nothing to send (a backfill done, a market closed) finds a destination made anew
/// under it within this.
const RECHECK_EVERY: Duration = Duration::from_secs(30);

/// Runs until `shutdown` says stop (between batches) or the log shuts down.
pub async fn run<S: Sink>(
    mut sink: S,
    wal: Wal,
    spec: RunnerSpec,
    stats: Arc<RunnerStats>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let name = sink.name();
    let lane = spec.lane;
    let mut breaker = Breaker::new(spec.breaker_threshold, spec.retry_min, spec.retry_max);
    let mut position = wal.reader().cursor(name, lane)?;
    let noted = wal.reader().cursor_note(name, lane)?;
    if let Some(note) = &noted {
        sink.restore(note);
    }
    // Where the destination itself says it is: past the log's cursor if we crashed
    // between its commit and the cursor move, behind it if it lost what it was sent.
    let Acked::Done(holds) = until_acked(&mut sink, Op::Resume, &spec, &mut breaker, &stats, &mut shutdown).await
    else {
        return Ok(());
    };
    match start_from(&holds, position) {
        Some(start) => {
            position = go_back(&wal, &stats, sink.note(), position, start, &holds).await?;
        }
        // A sink that keeps notes has one in the log before its first write: otherwise a
        // crash after that write was acknowledged and before the first cursor move would
        // leave the next start nothing to look from (JetStream: what the killed run
        // published past the cursor would be published again, and stored twice once
        // the stream's duplicate window has passed).
        None if noted.is_none() => {
            if let Some(note) = sink.note() {
                wal.move_cursor_noted(name, lane, position, Some(note)).await?;
            }
        }
        None => {}
    }
    stats.acked_seq.store(position, Ordering::Relaxed);
    tracing::info!(sink = name, %lane, cursor = position, "sink runner started");
    loop {
        let (at, lost) = forward(&mut sink, &wal, &spec, &stats, &mut breaker, &mut shutdown, position).await?;
        position = at;
        let Some((start, holds)) = lost else { break };
        position = go_back(&wal, &stats, sink.note(), position, start, &holds).await?;
    }
    tracing::info!(
        sink = name,
        %lane,
        cursor = position,
        rows = stats.rows.load(Ordering::Relaxed),
        batches = stats.batches.load(Ordering::Relaxed),
        failures = stats.failures.load(Ordering::Relaxed),
        skipped = stats.skipped.load(Ordering::Relaxed),
        undecodable = stats.undecodable.load(Ordering::Relaxed),
        corrupt = stats.corrupt.load(Ordering::Relaxed),
        latency_p50_ms = stats.latency_ms(0.5),
        latency_p99_ms = stats.latency_ms(0.99),
        "sink runner stopped"
    );
    Ok(())
}

/// A batch the sink acknowledged (or one with no row to send): its latency is recorded,
/// the cursor is moved to its end (with the sink's `note`), and it is counted. Returns
/// the new position.
fn commit(
    cursor: &mut CursorMover,
    spec: &RunnerSpec,
    stats: &RunnerStats,
    batch: &Batch,
    note: Option<Vec<u8>>,
) -> anyhow::Result<u64> {
    if !batch.rows.is_empty() {
        let longest = stats.record_latency(batch);
        if let (Lane::Live, Some(priority)) = (spec.lane, &spec.priority) {
            priority.live_acknowledged(longest);
        }
    }
    cursor.acknowledged(batch.last_seq, note)?;
    stats.rows.fetch_add(batch.rows.len() as u64, Ordering::Relaxed);
    stats.batches.fetch_add(1, Ordering::Relaxed);
    Ok(batch.last_seq)
}

/// Forwards what the lane holds now, until the runner is at the lane's head or
/// `spec.drain_on_stop` has passed: one attempt per batch, and the first failure ends it
/// (the batch stays in the log for the next start). Returns the new position.
async fn drain<S: Sink>(
    sink: &mut S,
    wal: &Wal,
    cursor: &mut CursorMover,
    spec: &RunnerSpec,
    breaker: &mut Breaker,
    stats: &Arc<RunnerStats>,
    mut position: u64,
) -> anyhow::Result<u64> {
    let (name, lane) = (stats.sink, spec.lane);
    let head = wal.head(lane);
    let started = Instant::now();
    let deadline = started + spec.drain_on_stop;
    let from = position;
    // Cut afresh from the last acknowledged position: the batch being cut when the stop
    // came was abandoned part way, with what it had read. Nothing more is coming, so a
    // batch takes what there is without waiting to fill.
    let mut cutter = Cutter {
        tail: wal.tail(lane, position),
        lane,
        position,
        batch_rows: spec.batch_rows,
        flush_interval: Duration::ZERO,
        stats: stats.clone(),
    };
    while position < head {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Ok(next) = tokio::time::timeout(remaining, cutter.cut()).await else {
            break;
        };
        let Some(batch) = next? else { break };
        if !batch.rows.is_empty() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            match attempt(sink, &Op::Write(&batch), spec.attempt_timeout.min(remaining), stats).await {
                Ok(_) => stats.note(breaker.on_success()),
                Err(e) => {
                    stats.failed(&e);
                    stats.note(breaker.on_failure(Instant::now(), e.retriable));
                    tracing::warn!(sink = e.sink, %lane, code = e.code, error = %e.message, "sink write failed while draining at stop");
                    break;
                }
            }
        }
        position = commit(cursor, spec, stats, &batch, sink.note())?;
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    if position >= head {
        tracing::info!(sink = name, %lane, records = position - from, elapsed_ms, "drained the lane at stop");
    } else {
        tracing::warn!(
            sink = name,
            %lane,
            left = head - position,
            elapsed_ms,
            "stopped before the lane was drained; the next start sends the rest"
        );
    }
    Ok(position)
}

/// Moves a runner's cursor in the log behind the runner, so that the next batch is
/// written while the last one's cursor move is synced: a live batch never waits for the
/// log's fsync of the previous cursor. At most one move is in flight; positions
/// acknowledged meanwhile collapse into the newest (with the sink's note of that
/// moment). The cursor still moves only to positions the sink acknowledged, in order,
/// each move a synced write; a crash can only leave it behind (the batches past it are
/// sent again, and the sinks ignore copies).
struct CursorMover {
    acked: watch::Sender<(u64, Option<Vec<u8>>)>,
    /// `None` once its failure was taken by [`CursorMover::failed`].
    task: Option<tokio::task::JoinHandle<Result<(), tickvault_wal::WriteError>>>,
}

impl CursorMover {
    fn start(wal: Wal, sink: &'static str, lane: Lane, from: u64, stats: Arc<RunnerStats>) -> CursorMover {
        let (acked, mut latest) = watch::channel((from, None));
        let task = tokio::spawn(async move {
            let mut moved = from;
            loop {
                // An error here means the runner is done: make its last move, then end.
                let done = latest.changed().await.is_err();
                let (seq, note) = latest.borrow_and_update().clone();
                if seq > moved {
                    wal.move_cursor_noted(sink, lane, seq, note).await?;
                    moved = seq;
                    stats.acked_seq.store(seq, Ordering::Relaxed);
                }
                if done {
                    return Ok(());
                }
            }
        });
        CursorMover {
            acked,
            task: Some(task),
        }
    }

    /// The sink acknowledged everything up to `seq`; `note` goes with the move.
    fn acknowledged(&mut self, seq: u64, note: Option<Vec<u8>>) -> anyhow::Result<()> {
        if self.acked.send((seq, note)).is_err() {
            // The mover ended, which it does only on an error: `failed` has it.
            anyhow::bail!("moving the cursor in the log failed");
        }
        Ok(())
    }

    /// Resolves only when a move failed (the log refuses writes), with its error.
    async fn failed(&mut self) -> anyhow::Error {
        let Some(task) = self.task.as_mut() else {
            return std::future::pending().await;
        };
        let outcome = task.await;
        self.task = None;
        match outcome {
            Ok(Err(e)) => anyhow::Error::new(e).context("moving the cursor in the log"),
            Ok(Ok(())) => anyhow::anyhow!("the cursor mover stopped early"),
            Err(e) => anyhow::Error::new(e).context("the cursor mover"),
        }
    }

    /// Waits until the last acknowledged position is in the log.
    async fn finish(self) -> anyhow::Result<()> {
        let CursorMover { acked, task } = self;
        drop(acked);
        match task {
            Some(task) => Ok(task.await??),
            None => Ok(()),
        }
    }
}

/// Where a runner's batches come from: cut on demand, or one ahead by a task of its own.
enum Batches {
    Inline(Cutter),
    Ahead {
        rx: tokio::sync::mpsc::Receiver<anyhow::Result<Batch>>,
        task: tokio::task::JoinHandle<()>,
    },
}

impl Batches {
    fn new(
        tail: Tail,
        spec: &RunnerSpec,
        stats: Arc<RunnerStats>,
        shutdown: watch::Receiver<bool>,
        ahead: bool,
    ) -> Batches {
        let cutter = Cutter {
            position: tail.position(),
            tail,
            lane: spec.lane,
            batch_rows: spec.batch_rows,
            flush_interval: spec.flush_interval,
            stats,
        };
        if !ahead {
            return Batches::Inline(cutter);
        }
        // Capacity 1: one batch waits while one is written; memory stays at two batches.
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(async move {
            let mut cutter = cutter;
            let mut shutdown = shutdown;
            loop {
                let next = tokio::select! {
                    biased;
                    _ = shutdown.changed() => return,
                    next = cutter.cut() => next,
                };
                match next {
                    Ok(Some(batch)) => {
                        if tx.send(Ok(batch)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Batches::Ahead { rx, task }
    }

    /// Stops the cutting task and waits until it is gone, with its reader of the log: no
    /// handle on the log may outlive the runner (a process that exits while a RocksDB
    /// handle is still open on another thread can abort in RocksDB's static destructors).
    async fn close(self) {
        if let Batches::Ahead { rx, task } = self {
            drop(rx);
            task.abort();
            let _ = task.await;
        }
    }

    /// The next batch (`None` once the log has shut down or the cutter stopped), or
    /// [`Next::Recheck`] at `recheck_at` if no record came before. Cancel-safe until a
    /// first record came.
    async fn next(&mut self, recheck_at: tokio::time::Instant) -> anyhow::Result<Next> {
        match self {
            Batches::Inline(cutter) => {
                let first = tokio::select! {
                    first = cutter.tail.next_batch(cutter.batch_rows) => first?,
                    _ = tokio::time::sleep_until(recheck_at) => return Ok(Next::Recheck),
                };
                match first {
                    Some(first) => Ok(Next::Batch(Some(cutter.fill(first).await?))),
                    None => Ok(Next::Batch(None)),
                }
            }
            Batches::Ahead { rx, .. } => tokio::select! {
                next = rx.recv() => Ok(Next::Batch(next.transpose()?)),
                _ = tokio::time::sleep_until(recheck_at) => Ok(Next::Recheck),
            },
        }
    }
}

/// What [`Batches::next`] gives.
enum Next {
    Batch(Option<Batch>),
    /// Time to ask the destination whether it still holds what it was sent.
    Recheck,
}

/// Cuts a lane into batches at log positions.
struct Cutter {
    tail: Tail,
    lane: Lane,
    position: u64,
    batch_rows: usize,
    flush_interval: Duration,
    stats: Arc<RunnerStats>,
}

impl Cutter {
    /// Waits for at least one record, then takes what there is (up to `batch_rows`),
    /// waiting up to `flush_interval` for the batch to fill.
    async fn cut(&mut self) -> anyhow::Result<Option<Batch>> {
        let Some(first) = self.tail.next_batch(self.batch_rows).await? else {
            return Ok(None);
        };
        self.fill(first).await.map(Some)
    }

    /// A batch from its `first` records, filled as [`Cutter::cut`] says.
    async fn fill(&mut self, first: ReadBatch) -> anyhow::Result<Batch> {
        let mut batch = Batch::new(self.lane, self.position);
        let mut records = add(&mut batch, &first, &self.stats);
        if !self.flush_interval.is_zero() {
            let deadline = tokio::time::Instant::now() + self.flush_interval;
            while records < self.batch_rows {
                match tokio::time::timeout_at(deadline, self.tail.next_batch(self.batch_rows - records)).await {
                    Ok(Ok(Some(more))) => records += add(&mut batch, &more, &self.stats),
                    Ok(Ok(None)) | Err(_) => break,
                    Ok(Err(e)) => return Err(e.into()),
                }
            }
        }
        self.position = batch.last_seq;
        Ok(batch)
    }
}

fn add(batch: &mut Batch, read: &ReadBatch, stats: &RunnerStats) -> usize {
    // One allocation of the right size where one read fills the batch (a backlog),
    // rather than a vector of large rows doubled and copied over and over.
    batch.rows.reserve(read.records.len());
    for record in &read.records {
        match batch.push(record) {
            Pushed::Row => {}
            Pushed::Skipped => _ = stats.skipped.fetch_add(1, Ordering::Relaxed),
            Pushed::Undecodable => _ = stats.undecodable.fetch_add(1, Ordering::Relaxed),
        }
    }
    batch.last_seq = batch.last_seq.max(read.last_seq);
    stats.corrupt.fetch_add(read.corrupt.len() as u64, Ordering::Relaxed);
    read.records.len() + read.corrupt.len()
}

/// Tries `op` until the sink acknowledges it, pacing retries with the breaker.
/// `Stopped` when told to stop while waiting (an attempt in flight is finished first, so that a
/// write is never abandoned half way by us).
async fn until_acked<S: Sink>(
    sink: &mut S,
    op: Op<'_>,
    spec: &RunnerSpec,
    breaker: &mut Breaker,
    stats: &RunnerStats,
    shutdown: &mut watch::Receiver<bool>,
) -> Acked {
    loop {
        if *shutdown.borrow() {
            return Acked::Stopped;
        }
        let (wait, transition) = breaker.wait(Instant::now());
        stats.note(transition);
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => continue,
                _ = shutdown.changed() => return Acked::Stopped,
            }
        }
        let priority = spec.priority.as_deref().filter(|_| spec.lane != Lane::Live);
        let permit = match priority {
            Some(priority) => tokio::select! {
                permit = priority.acquire() => Some(permit),
                _ = shutdown.changed() => return Acked::Stopped,
            },
            None => None,
        };
        let started = Instant::now();
        // A stop interrupts the write in flight (a sink that never answers would hold the
        // stop for the whole attempt timeout): the cursor has not moved, so it is sent
        // again at the next start, as after a crash, and the sinks' keys absorb it. A
        // runner that drains at a stop (live) gives the write its drain time first.
        let write = attempt(sink, &op, spec.attempt_timeout, stats);
        tokio::pin!(write);
        // A clone: the stop stays unseen for the caller, which drains after this write.
        let mut stop = shutdown.clone();
        let outcome = tokio::select! {
            outcome = &mut write => outcome,
            _ = stop.changed() => {
                if spec.drain_on_stop.is_zero() {
                    return Acked::Stopped;
                }
                match tokio::time::timeout(spec.drain_on_stop, &mut write).await {
                    Ok(outcome) => outcome,
                    Err(_) => return Acked::Stopped,
                }
            }
        };
        if let (Some(priority), Some(_), Ok(_)) = (priority, &permit, &outcome) {
            // Live rows are flowing: leave the servers to them for a while, holding the
            // permit so that no other sink's backfill write starts meanwhile. Only after
            // an acknowledged write: a failing sink waits out its backoff without the
            // permit, and a timed-out attempt must not hold back the other sinks.
            let pause = priority.pause_after(started.elapsed());
            if !pause.is_zero() && !*shutdown.borrow() {
                let (mut stop, paused) = (shutdown.clone(), Instant::now());
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
                stats
                    .yielded_ms
                    .fetch_add(paused.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
        }
        drop(permit);
        match outcome {
            Ok(value) => {
                stats.note(breaker.on_success());
                return Acked::Done(value);
            }
            Err(e) if e.content && matches!(op, Op::Write(b) if !b.rows.is_empty()) => {
                // The sink answered: no failure of the sink for the breaker.
                stats.failed(&e);
                return Acked::Refused(e);
            }
            Err(e) => {
                stats.failed(&e);
                if e.retriable {
                    tracing::warn!(sink = e.sink, lane = %stats.lane, code = e.code, error = %e.message, "sink write failed; will retry");
                } else {
                    tracing::error!(sink = e.sink, lane = %stats.lane, code = e.code, error = %e.message, "sink refused the write; holding the cursor and retrying slowly");
                }
                stats.note(breaker.on_failure(Instant::now(), e.retriable));
            }
        }
    }
}

/// One attempt at `op`, which fails if the sink does not answer within `timeout`.
async fn attempt<S: Sink>(
    sink: &mut S,
    op: &Op<'_>,
    timeout: Duration,
    stats: &RunnerStats,
) -> Result<Holds, SinkError> {
    let attempt = async {
        match op {
            Op::Resume => sink.holds(stats.lane).await,
            Op::Write(batch) => sink.write(batch).await.map(|()| Holds::Unknown),
        }
    };
    let (started, started_ns) = (Instant::now(), jiff::Timestamp::now().as_nanosecond());
    let value = match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result?,
        Err(_) => {
            return Err(SinkError::retriable(
                stats.sink,
                "timeout",
                format!("no acknowledgement within {timeout:?}"),
            ))
        }
    };
    let elapsed_us = started.elapsed().as_micros() as u64;
    if let Op::Write(batch) = op {
        let _ = stats
            .write_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(elapsed_us.max(1));
        stats.record_since_capture(&stats.queued_us, started_ns, batch);
    }
    tracing::debug!(sink = stats.sink, lane = %stats.lane, elapsed_us, "acknowledged");
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Body, Capture, Event, Feed, Quote, EVENT_KIND};

    /// Records what it was sent; each write takes `delay`.
    struct Recorder {
        seqs: Arc<Mutex<Vec<u64>>>,
        delay: Duration,
    }

    impl Sink for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }

        async fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
            tokio::time::sleep(self.delay).await;
            let mut seqs = self.seqs.lock().unwrap();
            seqs.extend(batch.rows.iter().map(|r| r.seq));
            Ok(())
        }
    }

    fn spec() -> RunnerSpec {
        RunnerSpec {
            lane: Lane::Live,
            batch_rows: 7,
            flush_interval: Duration::ZERO,
            retry_min: Duration::from_millis(1),
            retry_max: Duration::from_millis(10),
            breaker_threshold: 3,
            attempt_timeout: Duration::from_secs(10),
            priority: None,
            drain_on_stop: Duration::ZERO,
        }
    }

    /// A log in a temporary directory, what a recording sink on it was sent, and the
    /// runner's stats.
    struct Fixture {
        wal: Wal,
        seqs: Arc<Mutex<Vec<u64>>>,
        stats: Arc<RunnerStats>,
        _dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            Fixture {
                wal: Wal::open(dir.path()).unwrap(),
                seqs: Arc::new(Mutex::new(Vec::new())),
                stats: Arc::new(RunnerStats::new("recorder", Lane::Live)),
                _dir: dir,
            }
        }

        /// A recording sink whose writes take `delay`.
        fn sink(&self, delay: Duration) -> Recorder {
            Recorder {
                seqs: self.seqs.clone(),
                delay,
            }
        }

        /// Runs a runner over a recording sink whose writes take `delay` while 3 quotes
        /// per round of `rounds` are appended, until it has acknowledged them all, then
        /// stops it; returns the lane's head.
        async fn forward(&self, delay: Duration, rounds: std::ops::Range<usize>) -> u64 {
            let (stop, shutdown) = watch::channel(false);
            let runner = tokio::spawn(run(
                self.sink(delay),
                self.wal.clone(),
                spec(),
                self.stats.clone(),
                shutdown,
            ));
            let head = append_while_running(&self.wal, &self.stats, rounds).await;
            stop.send(true).unwrap();
            runner.await.unwrap().unwrap();
            head
        }

        /// What the sink was sent, in order.
        fn written(&self) -> Vec<u64> {
            self.seqs.lock().unwrap().clone()
        }

        /// The runner's cursor in the log.
        fn cursor(&self) -> u64 {
            self.wal.reader().cursor("recorder", Lane::Live).unwrap()
        }
    }

    async fn append_quotes(wal: &Wal, n: usize, from: usize) {
        append_to(wal, Lane::Live, n, from).await;
    }

    /// Appends 3 quotes per round of `rounds`, 1 ms apart, while a runner forwards them,
    /// then waits (up to 20 s) until it has acknowledged the lane's head; returns it.
    async fn append_while_running(wal: &Wal, stats: &RunnerStats, rounds: std::ops::Range<usize>) -> u64 {
        for round in rounds {
            append_quotes(wal, 3, round * 3).await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let head = wal.head(Lane::Live);
        wait_until_acked(stats, head, Duration::from_secs(20)).await;
        head
    }

    /// Waits (up to `within`) until the runner has acknowledged `head`.
    async fn wait_until_acked(stats: &RunnerStats, head: u64, within: Duration) {
        let started = Instant::now();
        while stats.acked_seq.load(Ordering::Relaxed) < head {
            assert!(started.elapsed() < within, "the runner did not catch up with {head}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn append_to(wal: &Wal, lane: Lane, n: usize, from: usize) {
        let mut batch = tickvault_wal::Batch::new();
        for i in from..from + n {
            let event = Event {
                capture: Capture {
                    feed: Feed::Crypto,
                    lane: Lane::Live,
                    captured_at_ns: jiff::Timestamp::now().as_nanosecond() as i64,
                },
                body: Body::Quote(Quote {
                    symbol: "BTC-USD".into(),
                    ts_ms: 1_700_000_000_000 + i as i64,
                    uid: 0,
                    bid: 1.0,
                    ask: 2.0,
                    bid_size: None,
                    ask_size: None,
                    exchange: None,
                }),
            };
            batch.push(EVENT_KIND, &event.to_payload().unwrap()).unwrap();
        }
        wal.append(lane, batch).await.unwrap();
    }

    /// Refuses, for its content, every write holding one of `poison`; records the rest.
    struct Picky {
        poison: Vec<u64>,
        seqs: Arc<Mutex<Vec<u64>>>,
        writes: Arc<AtomicU64>,
    }

    impl Sink for Picky {
        fn name(&self) -> &'static str {
            "recorder"
        }

        async fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            if let Some(r) = batch.rows.iter().find(|r| self.poison.contains(&r.seq)) {
                return Err(SinkError::content(
                    "recorder",
                    "value",
                    format!("cannot store {}", r.seq),
                ));
            }
            self.seqs.lock().unwrap().extend(batch.rows.iter().map(|r| r.seq));
            Ok(())
        }
    }

    #[tokio::test]
    async fn rows_a_sink_refuses_for_their_content_are_set_aside_and_the_rest_is_written() {
        let f = Fixture::new();
        // 40 records in one batch: the first, two in the middle side by side, the last.
        append_quotes(&f.wal, 40, 0).await;
        let poison = vec![1, 20, 21, 40];
        let writes = Arc::new(AtomicU64::new(0));
        let sink = Picky {
            poison: poison.clone(),
            seqs: f.seqs.clone(),
            writes: writes.clone(),
        };
        let (stop, shutdown) = watch::channel(false);
        let spec = RunnerSpec {
            batch_rows: 100,
            ..spec()
        };
        let runner = tokio::spawn(run(sink, f.wal.clone(), spec, f.stats.clone(), shutdown));
        wait_until_acked(&f.stats, 40, Duration::from_secs(10)).await;
        stop.send(true).unwrap();
        runner.await.unwrap().unwrap();

        let mut written = f.written();
        written.sort_unstable();
        let expected: Vec<u64> = (1..=40).filter(|s| !poison.contains(s)).collect();
        assert_eq!(written, expected, "every other row written, each once");
        assert_eq!(f.cursor(), 40);
        assert_eq!(f.stats.refused.load(Ordering::Relaxed), 4);
        let refused = crate::sink::refused::list(f.wal.reader()).unwrap();
        let seqs: Vec<u64> = refused.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, poison);
        assert!(refused
            .iter()
            .all(|r| r.sink == "recorder" && r.reason.starts_with("cannot store")));
        assert!(
            refused.iter().all(|r| Event::from_payload(&r.payload).is_ok()),
            "a copy of each record"
        );
        // Halving finds 4 rows of 40 in well under one write per row.
        assert!(
            writes.load(Ordering::Relaxed) < 40,
            "{} writes",
            writes.load(Ordering::Relaxed)
        );
        f.wal.shutdown().await.unwrap();
    }

    /// Records when each of its writes ran; each takes `delay`.
    struct Timed {
        name: &'static str,
        writes: Arc<Mutex<Vec<(Instant, Instant)>>>,
        delay: Duration,
    }

    impl Sink for Timed {
        fn name(&self) -> &'static str {
            self.name
        }

        async fn write(&mut self, _batch: &Batch) -> Result<(), SinkError> {
            let started = Instant::now();
            tokio::time::sleep(self.delay).await;
            self.writes.lock().unwrap().push((started, Instant::now()));
            Ok(())
        }
    }

    /// Two backfill runners (two sinks) forward 100 records each in batches of 10, each
    /// write taking 20 ms, sharing one priority of 1 permit and a duty of 0.5; a task
    /// says live rows flow when `live` is set. Returns every write's time span, sorted,
    /// and the time both runners yielded, ms.
    async fn two_backfill_runners(live: bool) -> (Vec<(Instant, Instant)>, u64) {
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        append_to(&wal, Lane::Backfill, 100, 0).await;
        let priority = Arc::new(Priority::new(1, 0.5, Duration::ZERO));
        let writes = Arc::new(Mutex::new(Vec::new()));
        let (stop, shutdown) = watch::channel(false);
        let spec = RunnerSpec {
            lane: Lane::Backfill,
            batch_rows: 10,
            priority: Some(priority.clone()),
            ..spec()
        };
        let flowing = {
            let priority = priority.clone();
            tokio::spawn(async move {
                if live {
                    loop {
                        priority.live_acknowledged(None);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            })
        };
        let mut runners = Vec::new();
        let mut all = Vec::new();
        for name in ["first", "second"] {
            let stats = Arc::new(RunnerStats::new(name, Lane::Backfill));
            let sink = Timed {
                name,
                writes: writes.clone(),
                delay: Duration::from_millis(20),
            };
            runners.push(tokio::spawn(run(
                sink,
                wal.clone(),
                spec.clone(),
                stats.clone(),
                shutdown.clone(),
            )));
            all.push(stats);
        }
        let started = Instant::now();
        while all.iter().any(|s| s.acked_seq.load(Ordering::Relaxed) < 100) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the runners did not finish"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        stop.send(true).unwrap();
        for runner in runners {
            runner.await.unwrap().unwrap();
        }
        flowing.abort();
        let mut spans = writes.lock().unwrap().clone();
        spans.sort();
        let yielded = all.iter().map(|s| s.yielded_ms.load(Ordering::Relaxed)).sum();
        scenario.teardown();
        (spans, yielded)
    }

    #[tokio::test]
    async fn while_live_rows_flow_backfill_writes_of_all_sinks_leave_idle_time_after_each() {
        let (spans, yielded) = two_backfill_runners(true).await;
        assert_eq!(spans.len(), 20, "10 batches per runner");
        // One permit: no two backfill writes overlap, and after each comes a pause at
        // least as long as the write (duty 0.5) in which no backfill write of any sink runs.
        for pair in spans.windows(2) {
            let gap = pair[1].0.saturating_duration_since(pair[0].1);
            assert!(gap >= Duration::from_millis(20), "gap {gap:?} after a 20 ms write");
        }
        assert!(yielded >= 19 * 20, "yielded {yielded} ms");
    }

    /// A live runner reports each batch's oldest row's latency to the priority: writes
    /// slower than the live latency budget (150 ms) halve the backfill's share of its
    /// duties; fast ones leave it whole.
    #[tokio::test]
    async fn live_batches_over_the_latency_budget_cut_the_backfills_share() {
        for (delay, over) in [(Duration::from_millis(200), true), (Duration::from_millis(1), false)] {
            let f = Fixture::new();
            let priority = Arc::new(Priority::new(1, 0.5, Duration::from_millis(150)));
            let (stop, shutdown) = watch::channel(false);
            let spec = RunnerSpec {
                batch_rows: 1_000,
                priority: Some(priority.clone()),
                ..spec()
            };
            let runner = tokio::spawn(run(f.sink(delay), f.wal.clone(), spec, f.stats.clone(), shutdown));
            // Over a second of appends: two half-second periods at least.
            append_while_running(&f.wal, &f.stats, 0..1_000).await;
            stop.send(true).unwrap();
            runner.await.unwrap().unwrap();
            let seen = priority.budget();
            let (cuts, share) = (seen.cuts, seen.share);
            assert_eq!(
                (cuts > 0, share < 1.0),
                (over, over),
                "writes of {delay:?}: {cuts} cuts, share {share}"
            );
        }
    }

    #[tokio::test]
    async fn with_no_live_rows_flowing_backfill_goes_at_full_speed() {
        let (spans, yielded) = two_backfill_runners(false).await;
        assert_eq!(spans.len(), 20);
        assert_eq!(yielded, 0);
        // Still one write at a time.
        for pair in spans.windows(2) {
            assert!(pair[1].0 >= pair[0].1, "backfill writes overlapped");
        }
    }

    #[tokio::test]
    async fn the_cursor_ends_at_the_last_acknowledged_position_and_every_record_is_written_once_in_order() {
        // Fail points are global: hold the lock that keeps the other test's out.
        let scenario = fail::FailScenario::setup();
        let f = Fixture::new();
        // Appends arrive while batches are written and cursors moved.
        let head = f.forward(Duration::from_millis(2), 0..40).await;
        assert_eq!(f.cursor(), head);
        assert_eq!(f.written(), (1..=head).collect::<Vec<_>>());
        assert!(f.stats.batches.load(Ordering::Relaxed) >= head.div_ceil(7));
        scenario.teardown();
    }

    #[tokio::test]
    async fn a_rows_latency_is_its_wait_for_the_write_plus_the_write() {
        // Fail points are global: hold the lock that keeps the other test's out.
        let scenario = fail::FailScenario::setup();
        let f = Fixture::new();
        let write = Duration::from_millis(30);
        f.forward(write, 0..20).await;
        let stats = &f.stats;
        assert!(stats.latency_measured());
        // Each row's latency is its time to its write's start plus that write, which
        // takes at least 30 ms; so at every quantile.
        let ms = write.as_secs_f64() * 1000.0;
        for q in [0.0, 0.5, 0.99, 1.0] {
            let (queued, latency) = (stats.queued_ms(q), stats.latency_ms(q));
            assert!(queued > 0.0, "q {q}: nothing recorded");
            assert!(
                latency >= queued + ms * 0.99,
                "q {q}: latency {latency} ms, queued {queued} ms"
            );
        }
        assert!(stats.write_ms(0.0) >= ms * 0.99);
        scenario.teardown();
    }

    /// Notes the last position it wrote, and keeps the note it was restored with.
    struct Noting {
        last: u64,
        restored: Arc<Mutex<Option<Vec<u8>>>>,
    }

    impl Sink for Noting {
        fn name(&self) -> &'static str {
            "recorder"
        }

        async fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
            tokio::time::sleep(Duration::from_millis(1)).await;
            self.last = batch.last_seq;
            Ok(())
        }

        fn note(&self) -> Option<Vec<u8>> {
            Some(self.last.to_le_bytes().to_vec())
        }

        fn restore(&mut self, note: &[u8]) {
            *self.restored.lock().unwrap() = Some(note.to_vec());
        }
    }

    #[tokio::test]
    async fn the_note_kept_with_the_cursor_is_the_sinks_note_at_that_position_and_the_next_start_gets_it() {
        // Fail points are global: hold the lock that keeps the other tests' out.
        let scenario = fail::FailScenario::setup();
        let f = Fixture::new();
        let restored = Arc::new(Mutex::new(None));
        for life in 0..2 {
            let sink = Noting {
                last: 0,
                restored: restored.clone(),
            };
            let (stop, shutdown) = watch::channel(false);
            let runner = tokio::spawn(run(sink, f.wal.clone(), spec(), f.stats.clone(), shutdown));
            // Appends arrive while batches are written: moves collapse, notes with them.
            let head = append_while_running(&f.wal, &f.stats, life * 30..(life + 1) * 30).await;
            stop.send(true).unwrap();
            runner.await.unwrap().unwrap();
            let note = f.wal.reader().cursor_note("recorder", Lane::Live).unwrap();
            assert_eq!(note, Some(head.to_le_bytes().to_vec()), "life {life}");
            assert_eq!(f.cursor(), head);
            let expected = (life == 1).then(|| 90u64.to_le_bytes().to_vec());
            assert_eq!(
                *restored.lock().unwrap(),
                expected,
                "life {life}: what the start restored"
            );
        }
        scenario.teardown();
    }

    #[test]
    fn a_runner_starts_where_the_destination_says_it_is() {
        assert_eq!(start_from(&Holds::Unknown, 7), None);
        assert_eq!(start_from(&Holds::UpTo(7), 7), None);
        assert_eq!(start_from(&Holds::UpTo(9), 7), Some(9), "a crash after its commit");
        assert_eq!(start_from(&Holds::UpTo(3), 7), Some(3), "it lost 4..=7");
        assert_eq!(start_from(&Holds::UpTo(0), 7), Some(0), "it has nothing of this log");
        assert_eq!(start_from(&Holds::Nothing("new".into()), 7), Some(0));
        assert_eq!(start_from(&Holds::Nothing("new".into()), 0), None);
        // While running, against what was written: the cursor also passes records with
        // nothing to send, which a destination's own record does not.
        assert_eq!(lost_since(&Holds::UpTo(7), 7), None);
        assert_eq!(lost_since(&Holds::UpTo(9), 7), None);
        assert_eq!(lost_since(&Holds::UpTo(5), 7), Some(5));
        assert_eq!(lost_since(&Holds::Unknown, 7), None);
        assert_eq!(lost_since(&Holds::Nothing("new".into()), 7), Some(0));
        assert_eq!(lost_since(&Holds::Nothing("new".into()), 0), None);
    }

    #[test]
    fn a_destination_other_than_the_one_the_rows_went_to_holds_nothing_of_them() {
        let mut went_to = WentTo::default();
        assert_eq!(went_to.found("a"), Holds::Unknown, "none noted: taken as theirs");
        assert_eq!(went_to.found("a"), Holds::Unknown);
        assert!(matches!(went_to.found("b"), Holds::Nothing(_)));
        assert_eq!(went_to.get(), Some("b"), "from now on the rows go to b");
        assert_eq!(WentTo::noted(Some("b".into())).found("b"), Holds::Unknown);
    }

    /// Says at the start that it holds the lane up to `holds`, and records writes.
    struct Holding {
        holds: Holds,
        inner: Recorder,
    }

    impl Sink for Holding {
        fn name(&self) -> &'static str {
            "recorder"
        }

        async fn holds(&mut self, _lane: Lane) -> Result<Holds, SinkError> {
            Ok(self.holds.clone())
        }

        async fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
            self.inner.write(batch).await
        }
    }

    #[tokio::test]
    async fn what_the_destination_lost_is_sent_again_and_nothing_it_holds_is_skipped() {
        let f = Fixture::new();
        let head = f.forward(Duration::ZERO, 0..4).await;
        assert_eq!((head, f.cursor()), (12, 12));
        for (holds, resent) in [
            (Holds::UpTo(12), vec![]),
            (Holds::Unknown, vec![]),
            (Holds::UpTo(5), (6..=12).collect::<Vec<u64>>()),
            (Holds::Nothing("made anew".into()), (1..=12).collect()),
        ] {
            f.seqs.lock().unwrap().clear();
            let stats = Arc::new(RunnerStats::new("recorder", Lane::Live));
            let sink = Holding {
                holds: holds.clone(),
                inner: f.sink(Duration::ZERO),
            };
            let (stop, shutdown) = watch::channel(false);
            let runner = tokio::spawn(run(sink, f.wal.clone(), spec(), stats.clone(), shutdown));
            wait_until_acked(&stats, head, Duration::from_secs(10)).await;
            stop.send(true).unwrap();
            runner.await.unwrap().unwrap();
            assert_eq!(f.written(), resent, "{holds:?}");
            assert_eq!(stats.rewound.load(Ordering::Relaxed), resent.len() as u64, "{holds:?}");
            assert_eq!(f.cursor(), head, "{holds:?}");
            assert!(
                !stats.latency_measured(),
                "rows sent again are not the pipeline's latency"
            );
        }
    }

    /// Answers `holds` from a script (the start's call first, then each recheck's; past
    /// its end, `Unknown`), recording when each call came.
    struct Rechecked {
        script: Vec<Result<Holds, ()>>,
        calls: Arc<Mutex<Vec<tokio::time::Instant>>>,
    }

    impl Sink for Rechecked {
        fn name(&self) -> &'static str {
            "recorder"
        }

        async fn holds(&mut self, _lane: Lane) -> Result<Holds, SinkError> {
            let mut calls = self.calls.lock().unwrap();
            let answer = self.script.get(calls.len()).cloned().unwrap_or(Ok(Holds::Unknown));
            calls.push(tokio::time::Instant::now());
            answer.map_err(|()| SinkError::retriable("recorder", "down", "not answering"))
        }

        async fn write(&mut self, _batch: &Batch) -> Result<(), SinkError> {
            Ok(())
        }
    }

    /// A runner with nothing to send asks its destination every 30 s whether it still
    /// holds what it was sent; after a recheck that failed it asks again within
    /// seconds (exponential from 1 s, full jitter), and after one that succeeded, 30 s
    /// later again.
    #[tokio::test(start_paused = true)]
    async fn a_failed_recheck_is_tried_again_within_seconds_not_at_the_next_interval() {
        let f = Fixture::new();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let sink = Rechecked {
            script: vec![Ok(Holds::Unknown), Err(()), Err(()), Err(()), Ok(Holds::Unknown)],
            calls: calls.clone(),
        };
        let (stop, shutdown) = watch::channel(false);
        let runner = tokio::spawn(run(sink, f.wal.clone(), spec(), f.stats.clone(), shutdown));
        let started = tokio::time::Instant::now();
        while calls.lock().unwrap().len() < 6 {
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "{:?}",
                calls.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.send(true).unwrap();
        runner.await.unwrap().unwrap();
        let calls = calls.lock().unwrap().clone();
        let gaps: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps[0] >= RECHECK_EVERY, "the first recheck, {gaps:?}");
        // After the failures: at most 1 s, 2 s, 4 s.
        for (i, gap) in gaps[1..4].iter().enumerate() {
            assert!(
                *gap <= Duration::from_secs(1 << i) + Duration::from_millis(10),
                "{gaps:?}"
            );
        }
        assert!(gaps[4] >= RECHECK_EVERY, "after a recheck that succeeded, {gaps:?}");
    }

    /// Learns its note when it connects at the start (as JetStream reads the stream's
    /// last sequence), and records at each write the note the log held for it then.
    struct Connecting {
        wal: Wal,
        connected: bool,
        seen: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
    }

    impl Sink for Connecting {
        fn name(&self) -> &'static str {
            "recorder"
        }

        async fn holds(&mut self, _lane: Lane) -> Result<Holds, SinkError> {
            self.connected = true;
            Ok(Holds::Unknown)
        }

        async fn write(&mut self, _batch: &Batch) -> Result<(), SinkError> {
            let held = self.wal.reader().cursor_note("recorder", Lane::Live).unwrap();
            self.seen.lock().unwrap().push(held);
            Ok(())
        }

        fn note(&self) -> Option<Vec<u8>> {
            self.connected.then(|| b"connected".to_vec())
        }
    }

    #[tokio::test]
    async fn a_sink_that_keeps_notes_has_one_in_the_log_before_its_first_write_on_a_new_log() {
        // Fail points are global: hold the lock that keeps the other tests' (a refused
        // cursor write) out of this runner's cursor moves.
        let scenario = fail::FailScenario::setup();
        let f = Fixture::new();
        append_quotes(&f.wal, 5, 0).await;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Connecting {
            wal: f.wal.clone(),
            connected: false,
            seen: seen.clone(),
        };
        let (stop, shutdown) = watch::channel(false);
        let runner = tokio::spawn(run(sink, f.wal.clone(), spec(), f.stats.clone(), shutdown));
        wait_until_acked(&f.stats, 5, Duration::from_secs(10)).await;
        stop.send(true).unwrap();
        runner.await.unwrap().unwrap();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(
            seen.first(),
            Some(&Some(b"connected".to_vec())),
            "the note the log held at the first write"
        );
        scenario.teardown();
    }

    #[tokio::test]
    async fn a_cursor_move_the_log_refuses_ends_the_runner_with_that_error() {
        let scenario = fail::FailScenario::setup();
        let f = Fixture::new();
        append_quotes(&f.wal, 5, 0).await;
        fail::cfg("wal::cursor_write", "return").unwrap();
        let (_stop, shutdown) = watch::channel(false);
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            run(f.sink(Duration::ZERO), f.wal.clone(), spec(), f.stats.clone(), shutdown),
        )
        .await
        .expect("the runner ended");
        let error = outcome.expect_err("a failed cursor move is an error");
        assert!(
            format!("{error:#}").contains("injected cursor write failure"),
            "{error:#}"
        );
        assert_eq!(f.stats.acked_seq.load(Ordering::Relaxed), 0);
        scenario.teardown();
    }

    /// Starts a live runner on a log holding 70 records, each write taking 20 ms, and
    /// tells it to stop once its first batch is acknowledged. Returns the sequences it
    /// wrote, in order, and its cursor in the log afterwards.
    async fn stop_after_the_first_batch(drain_on_stop: Duration) -> (Vec<u64>, u64) {
        let scenario = fail::FailScenario::setup();
        let f = Fixture::new();
        append_quotes(&f.wal, 70, 0).await;
        let (stop, shutdown) = watch::channel(false);
        let spec = RunnerSpec {
            drain_on_stop,
            ..spec()
        };
        let sink = f.sink(Duration::from_millis(20));
        let runner = tokio::spawn(run(sink, f.wal.clone(), spec, f.stats.clone(), shutdown));
        while f.stats.batches.load(Ordering::Relaxed) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(20), runner)
            .await
            .expect("the runner stopped")
            .unwrap()
            .unwrap();
        let written = (f.written(), f.cursor());
        scenario.teardown();
        written
    }

    #[tokio::test]
    async fn a_stop_with_a_drain_forwards_everything_the_lane_holds_first() {
        let (seqs, cursor) = stop_after_the_first_batch(Duration::from_secs(10)).await;
        assert_eq!(seqs, (1..=70).collect::<Vec<_>>());
        assert_eq!(cursor, 70);
    }

    #[tokio::test]
    async fn a_stop_without_a_drain_ends_between_batches() {
        let (seqs, cursor) = stop_after_the_first_batch(Duration::ZERO).await;
        assert!(seqs.len() < 70, "{seqs:?}");
        assert_eq!(seqs, (1..=cursor).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_drain_that_runs_out_of_time_leaves_the_rest_in_the_log_for_the_next_start() {
        // Time for two or three of the nine batches left; the write in flight at the
        // deadline is abandoned, and the cursor stays at the last acknowledged one.
        let (seqs, cursor) = stop_after_the_first_batch(Duration::from_millis(50)).await;
        assert!(seqs.len() >= 7 && seqs.len() < 70, "{seqs:?}");
        assert_eq!(seqs, (1..=cursor).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_drain_sends_the_batch_that_was_filling_when_the_stop_came() {
        let scenario = fail::FailScenario::setup();
        let f = Fixture::new();
        let (stop, shutdown) = watch::channel(false);
        // A batch waits up to 10 s to fill to 100 rows: the 5 records below are read into
        // one, which is still filling when the stop comes.
        let spec = RunnerSpec {
            batch_rows: 100,
            flush_interval: Duration::from_secs(10),
            drain_on_stop: Duration::from_secs(5),
            ..spec()
        };
        let runner = tokio::spawn(run(
            f.sink(Duration::ZERO),
            f.wal.clone(),
            spec,
            f.stats.clone(),
            shutdown,
        ));
        append_quotes(&f.wal, 5, 0).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(f.written().is_empty(), "the batch was sent before it filled");
        stop.send(true).unwrap();
        runner.await.unwrap().unwrap();
        assert_eq!(f.written(), vec![1, 2, 3, 4, 5]);
        assert_eq!(f.cursor(), 5);
        scenario.teardown();
    }
}
