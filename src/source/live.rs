//! The live collector: one WebSocket connection per market, speaking Polygon's protocol.
//!
//! The socket task only reads, parses and hands events to the appender (Polygon cuts
//! off slow readers); the appender drains whatever has queued into one log append, so
//! the group commit takes everything that arrived while the previous one was syncing.
//! A dropped or stale connection is reconnected with exponential backoff and full
//! jitter, re-authenticated and re-subscribed, and the interval it was down is recorded
//! as a suspected gap.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use tickvault_wal::{Batch, Lane, Wal};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::backoff::Backoff;
use crate::disk::Room;
use crate::event::identity::Uids;
use crate::event::{now_ms, now_ns, Body, Capture, Event, Feed, EVENT_KIND};
use crate::gaps::{self, SuspectedGap};
use crate::polygon::wire::{self, WireItem};
use crate::settings::Secret;

/// What one market's collector needs.
#[derive(Clone, Debug)]
pub struct LiveSpec {
    pub feed: Feed,
    /// Base URL; the market path is appended.
    pub ws_url: String,
    pub api_key: Secret,
    /// Canonical symbols.
    pub symbols: Vec<String>,
    pub channels: Vec<String>,
    pub stale_after: Duration,
    pub reconnect_min: Duration,
    pub reconnect_max: Duration,
}

impl LiveSpec {
    /// The `params` of the subscribe message: every channel for every symbol.
    pub fn subscribe_params(&self) -> String {
        let mut items = Vec::new();
        for channel in &self.channels {
            for symbol in &self.symbols {
                items.push(format!("{channel}.{symbol}"));
            }
        }
        items.join(",")
    }
}

/// Counters of one collector, for progress display and metrics.
#[derive(Debug)]
pub struct LiveStats {
    pub frames: AtomicU64,
    pub events: AtomicU64,
    /// Events durable in the log per kind, in [`EventKind::CAPTURED`]'s order (their sum:
    /// [`LiveStats::captured`]).
    pub captured_by_kind: [AtomicU64; 3],
    /// When the last events were made durable, Unix ms (0: none yet): the feed's
    /// staleness, as metrics show it.
    pub last_captured_ms: AtomicI64,
    pub malformed: AtomicU64,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    pub gaps: AtomicU64,
    /// Times another connection with the same key took the feed (`max_connections`).
    pub evictions: AtomicU64,
    pub connected: AtomicBool,
    /// Frame received to durable in the log, microseconds, per frame.
    pub latency_us: std::sync::Mutex<hdrhistogram::Histogram<u64>>,
}

impl Default for LiveStats {
    fn default() -> Self {
        LiveStats {
            frames: AtomicU64::new(0),
            events: AtomicU64::new(0),
            captured_by_kind: Default::default(),
            last_captured_ms: AtomicI64::new(0),
            malformed: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            gaps: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            connected: AtomicBool::new(false),
            // 1 µs to 1 hour at 3 significant figures; values above are clamped.
            latency_us: std::sync::Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3)
                    .unwrap_or_else(|_| unreachable!("valid bounds")),
            ),
        }
    }
}

impl LiveStats {
    /// Events durable in the log.
    pub fn captured(&self) -> u64 {
        self.captured_by_kind.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    /// Empties the latency histogram: figures from now on, for a measurement that
    /// leaves a warm-up out.
    pub fn reset_latency(&self) {
        self.latency_us.lock().unwrap_or_else(|p| p.into_inner()).reset();
    }

    /// The latency at quantile `q` (0..=1) in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        self.latency_us
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .value_at_quantile(q) as f64
            / 1000.0
    }
}

/// Why a session ended.
enum Ended {
    Shutdown,
    /// The server refused the key: retrying will not help, but the collector keeps
    /// trying slowly so that a key fixed on the server side is picked up.
    AuthFailed(String),
    Lost(String),
    /// Another connection with this key took the feed (Polygon allows one per
    /// cluster): fighting it back would evict it in turn, forever.
    Evicted(String),
}

/// A connection that stayed subscribed this long resets the reconnect backoff; one that
/// ends sooner (evicted, cut right after auth) keeps it growing, so that two clients on
/// one key, or a feed that drops every few seconds, do not reconnect at full speed.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// One frame's events, stamped with when the frame arrived.
struct Arrival {
    received: Instant,
    events: Vec<Event>,
    /// The frame's bytes of the queue's budget, given back once appended.
    _budget: tokio::sync::OwnedSemaphorePermit,
}

/// The largest WebSocket message (and frame) read. Polygon's own Go client reads at most
/// 1 MB; tungstenite's default is 64 MiB. A larger one ends the connection (and is a
/// suspected gap): room for Polygon's biggest batches, not for a runaway peer.
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Bytes of frames that may wait for the appender: the socket task stops reading past
/// it (Polygon then cuts off a reader that falls that far behind), so memory stays
/// bounded whatever the frames' sizes.
pub const QUEUE_BYTES: usize = 256 << 20;

/// Runs the collector until `shutdown` turns true.
pub async fn run(
    spec: LiveSpec,
    wal: Wal,
    stats: Arc<LiveStats>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let (_room, room) = watch::channel(Room::default());
    run_guarded(spec, wal, stats, shutdown, room).await
}

/// As [`run`], stopping capture while `room` says the disk is under its reserve: the
/// connection is closed (the time until the next is a suspected gap, as after any
/// disconnect) and made again once the disk has room.
pub async fn run_guarded(
    spec: LiveSpec,
    wal: Wal,
    stats: Arc<LiveStats>,
    mut shutdown: watch::Receiver<bool>,
    mut room: watch::Receiver<Room>,
) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel::<Arrival>(4096);
    let budget = Arc::new(tokio::sync::Semaphore::new(QUEUE_BYTES));
    let appender = tokio::spawn(append_loop(wal.clone(), rx, stats.clone()));
    let mut backoff = Backoff::new(spec.reconnect_min, spec.reconnect_max);
    // Not reset per connection: a reconnect resends nothing, and copies of identical
    // content across it still count on.
    let mut uids = Uids::default();
    // Set when a connection was lost after subscribing: the last event timestamp seen.
    let mut open_gap: Option<(i64, String)> = None;
    let mut last_event_ms: Option<i64> = None;
    loop {
        crate::disk::until(&mut room, |r| !r.capture_stopped, &mut shutdown).await;
        if *shutdown.borrow() {
            break;
        }
        let mut subscribed_at = None;
        let ended = session(
            &spec,
            &tx,
            &stats,
            &mut uids,
            &mut open_gap,
            &mut last_event_ms,
            &wal,
            &mut subscribed_at,
            &budget,
            &mut shutdown,
            &mut room,
        )
        .await;
        stats.connected.store(false, Ordering::Relaxed);
        if subscribed_at.is_some_and(|t: Instant| t.elapsed() >= STABLE_AFTER) {
            backoff.reset();
        }
        let mut at_least = Duration::ZERO;
        let cause = match ended {
            Ended::Shutdown => break,
            Ended::AuthFailed(message) => {
                tracing::error!(feed = %spec.feed, %message, "Polygon refused the API key");
                None
            }
            Ended::Lost(cause) => {
                tracing::warn!(feed = %spec.feed, %cause, "live feed lost; reconnecting");
                Some(cause)
            }
            Ended::Evicted(cause) => {
                let n = stats.evictions.fetch_add(1, Ordering::Relaxed) + 1;
                // Loud once, then every tenth time: the condition persists until an
                // operator stops the other client.
                if n == 1 || n.is_multiple_of(10) {
                    tracing::error!(feed = %spec.feed, %cause, evictions = n, "another connection with this API key took the feed (Polygon allows one per cluster): is a second tickvault or another client using the key? Backing off instead of taking it back");
                }
                at_least = spec.reconnect_max;
                Some(cause)
            }
        };
        if let Some(cause) = cause {
            stats.disconnects.fetch_add(1, Ordering::Relaxed);
            if open_gap.is_none() {
                let from = last_event_ms.unwrap_or_else(now_ms);
                open_gap = Some((from, cause));
            }
        }
        let delay = backoff.next_delay().max(at_least);
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.changed() => break,
        }
    }
    // Capture stops with the feed down: the gap runs to now.
    if let Some((from_ms, cause)) = open_gap.take() {
        record_gap(&wal, &stats, &spec, from_ms, now_ms(), cause).await;
    }
    drop(tx);
    appender.await.context("live appender")??;
    Ok(())
}

async fn record_gap(wal: &Wal, stats: &LiveStats, spec: &LiveSpec, from_ms: i64, to_ms: i64, cause: String) {
    let gap = SuspectedGap {
        feed: spec.feed,
        symbols: spec.symbols.clone(),
        from_ms,
        to_ms,
        cause,
    };
    match gaps::record(wal, &gap).await {
        Ok(()) => {
            stats.gaps.fetch_add(1, Ordering::Relaxed);
            tracing::info!(feed = %spec.feed, from_ms, to_ms, "suspected gap recorded");
        }
        Err(e) => tracing::error!(feed = %spec.feed, error = %e, "could not record a suspected gap"),
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    spec: &LiveSpec,
    tx: &mpsc::Sender<Arrival>,
    stats: &LiveStats,
    uids: &mut Uids,
    open_gap: &mut Option<(i64, String)>,
    last_event_ms: &mut Option<i64>,
    wal: &Wal,
    subscribed_at: &mut Option<Instant>,
    budget: &Arc<tokio::sync::Semaphore>,
    shutdown: &mut watch::Receiver<bool>,
    room: &mut watch::Receiver<Room>,
) -> Ended {
    let url = format!(
        "{}{}",
        spec.ws_url.trim_end_matches('/'),
        crate::polygon::market_path(spec.feed)
    );
    let limits = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let connect = tokio::time::timeout(
        spec.stale_after,
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(limits), false),
    );
    let mut socket = tokio::select! {
        result = connect => match result {
            Ok(Ok((socket, _))) => socket,
            Ok(Err(e)) => return Ended::Lost(format!("connect {url}: {e}")),
            Err(_) => return Ended::Lost(format!("connect {url}: timed out")),
        },
        _ = shutdown.changed() => return Ended::Shutdown,
    };
    stats.connects.fetch_add(1, Ordering::Relaxed);
    let auth = serde_json::json!({ "action": "auth", "params": spec.api_key.expose() }).to_string();
    if let Err(e) = socket.send(Message::text(auth)).await {
        return Ended::Lost(format!("sending auth: {e}"));
    }
    let mut first_after_reconnect = true;
    // A quiet market (forex at the weekend) sends nothing: pings tell a live connection
    // from a dead one, and any frame, pongs included, proves the connection alive.
    let mut last_rx = tokio::time::Instant::now();
    let mut ping = tokio::time::interval(spec.stale_after / 3);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            next = socket.next() => next,
            _ = tokio::time::sleep_until(last_rx + spec.stale_after) => {
                return Ended::Lost(format!("stale: nothing received for {:?}", spec.stale_after));
            }
            _ = ping.tick() => {
                if let Err(e) = socket.send(Message::Ping(Default::default())).await {
                    return Ended::Lost(format!("ping: {e}"));
                }
                continue;
            }
            _ = shutdown.changed() => {
                let _ = socket.close(None).await;
                return Ended::Shutdown;
            }
            Ok(()) = room.changed() => {
                if room.borrow_and_update().capture_stopped {
                    let _ = socket.close(None).await;
                    return Ended::Lost("free space under log.disk_reserve".into());
                }
                continue;
            }
        };
        last_rx = tokio::time::Instant::now();
        let received = Instant::now();
        let text = match next {
            None => return Ended::Lost("connection closed".into()),
            Some(Err(e)) => return Ended::Lost(format!("read: {e}")),
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                return Ended::Lost(match frame {
                    Some(f) => format!("closed by server: {} (code {})", f.reason, u16::from(f.code)),
                    None => "closed by server".to_owned(),
                })
            }
            Some(Ok(_)) => continue, // pongs; pings are answered by tungstenite
        };
        stats.frames.fetch_add(1, Ordering::Relaxed);
        let items = match wire::parse_frame(spec.feed, &text) {
            Ok(items) => items,
            Err(e) => {
                stats.malformed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(feed = %spec.feed, error = %e, "malformed frame skipped");
                continue;
            }
        };
        let captured_at_ns = now_ns();
        let mut events = Vec::new();
        // A status that ends the session is acted on after the whole frame: the events
        // around it in the same frame were received, and cannot be fetched again.
        let mut ending = None;
        for item in items {
            match item {
                Ok(WireItem::Status { status, message }) => match status.as_str() {
                    // `connected` on open (the spec's schema says `success`); per-item
                    // subscribe replies are `success` too: nothing to do for either.
                    "connected" | "success" => {}
                    "auth_success" => {
                        let params = spec.subscribe_params();
                        if let Err(e) = socket
                            .send(Message::text(
                                serde_json::json!({ "action": "subscribe", "params": params }).to_string(),
                            ))
                            .await
                        {
                            return Ended::Lost(format!("sending subscribe: {e}"));
                        }
                        stats.connected.store(true, Ordering::Relaxed);
                        *subscribed_at = Some(Instant::now());
                        tracing::info!(feed = %spec.feed, symbols = spec.symbols.len(), "live feed subscribed");
                    }
                    "auth_failed" | "auth_timeout" => {
                        ending.get_or_insert(Ended::AuthFailed(message));
                    }
                    "max_connections" => {
                        ending.get_or_insert(Ended::Evicted(format!("{status}: {message}")));
                    }
                    "force_disconnect" | "slow_consumer" => {
                        ending.get_or_insert(Ended::Lost(format!("{status}: {message}")));
                    }
                    "error" => tracing::warn!(feed = %spec.feed, %message, "Polygon status error"),
                    _ => tracing::debug!(feed = %spec.feed, %status, %message, "status"),
                },
                Ok(WireItem::Event(body)) => {
                    let mut event = Event {
                        capture: Capture {
                            feed: spec.feed,
                            lane: Lane::Live,
                            captured_at_ns,
                        },
                        body,
                    };
                    if let Some(problem) = event.problem() {
                        stats.malformed.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(feed = %spec.feed, problem, event = ?event.body, "malformed event skipped");
                        continue;
                    }
                    uids.assign(&mut event.body);
                    events.push(event);
                }
                Ok(WireItem::Ignored(_)) => {}
                Err(e) => {
                    stats.malformed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(feed = %spec.feed, error = %e, "malformed event skipped");
                }
            }
        }
        if events.is_empty() {
            match ending {
                Some(ended) => return ended,
                None => continue,
            }
        }
        // When the market happened up to: a bar's window ends after its timestamp.
        let first_ts = events.iter().map(Event::ts_ms).min().unwrap_or(0);
        let last_ts = events.iter().map(happened_until).max().unwrap_or(0);
        if first_after_reconnect {
            first_after_reconnect = false;
            if let Some((from_ms, cause)) = open_gap.take() {
                // A bar's timestamp is its window's start, up to a minute before what it
                // says: the gap runs at least to where it began.
                record_gap(wal, stats, spec, from_ms, first_ts.max(from_ms), cause).await;
            }
        }
        *last_event_ms = Some(last_event_ms.map_or(last_ts, |t| t.max(last_ts)));
        stats.events.fetch_add(events.len() as u64, Ordering::Relaxed);
        // The frame's size, as the parsed events stand for it in memory.
        let bytes = u32::try_from(text.len().clamp(1, QUEUE_BYTES)).unwrap_or(u32::MAX);
        // Not raced with the stop: the appender drains until the end, and the frame was
        // received, so it is appended too.
        let Ok(permit) = budget.clone().acquire_many_owned(bytes).await else {
            return Ended::Shutdown;
        };
        if tx
            .send(Arrival {
                received,
                events,
                _budget: permit,
            })
            .await
            .is_err()
        {
            return Ended::Shutdown;
        }
        if let Some(ended) = ending {
            return ended;
        }
    }
}

/// The end of what an event tells of the market: a tick's time, a bar's window end.
fn happened_until(event: &Event) -> i64 {
    match &event.body {
        Body::Bar(bar) => bar.start_ms.saturating_add(bar.timeframe.millis()),
        _ => event.ts_ms(),
    }
}

/// Drains arrivals into log appends; each append carries everything queued.
async fn append_loop(wal: Wal, mut rx: mpsc::Receiver<Arrival>, stats: Arc<LiveStats>) -> anyhow::Result<()> {
    while let Some(first) = rx.recv().await {
        let mut arrivals = vec![first];
        while arrivals.len() < 512 {
            match rx.try_recv() {
                Ok(a) => arrivals.push(a),
                Err(_) => break,
            }
        }
        let mut batch = Batch::new();
        let mut by_kind = [0u64; 3];
        let mut marks = crate::coverage::Marks::default();
        for arrival in &arrivals {
            for event in &arrival.events {
                batch.push(EVENT_KIND, &event.to_payload()?)?;
                by_kind[event.kind().index()] += 1;
                marks.add_event(event);
            }
        }
        // A minute aggregate's minute is covered, in the same write as the aggregate.
        marks.into_batch(&mut batch);
        wal.append(Lane::Live, batch).await.context("appending live events")?;
        for (counter, n) in stats.captured_by_kind.iter().zip(by_kind) {
            counter.fetch_add(n, Ordering::Relaxed);
        }
        stats.last_captured_ms.store(now_ms(), Ordering::Relaxed);
        let mut histogram = stats.latency_us.lock().unwrap_or_else(|p| p.into_inner());
        for arrival in &arrivals {
            let us = u64::try_from(arrival.received.elapsed().as_micros()).unwrap_or(u64::MAX);
            histogram.saturating_record(us.max(1));
        }
    }
    Ok(())
}
