//! Prometheus metrics and health checks over HTTP: `/metrics`, `/healthz`, `/readyz`.
//!
//! The series are read at scrape time from the counters and histograms the daemon keeps
//! anyway (the ones the demo and the benchmarks print), through a `prometheus-client`
//! [`Collector`]: a scrape takes a few locks for microseconds, and the hot paths do no
//! work of their own for metrics. `prometheus-client` is the Prometheus project's
//! crate; its collector API suits values that already exist, where the `metrics`
//! facade would want every increment to go through its global recorder.
//!
//! Latency histograms are kept at microsecond precision (hdrhistogram, 3 significant
//! figures) and given as Prometheus buckets at scrape; their `_sum` is the histogram's
//! mean times its count, exact to the same 3 figures.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use tickvault_wal::{Lane, Wal};
use tokio::sync::watch;

use crate::event::{EventKind, Feed};
use crate::sink::breaker::State;
use crate::sink::priority::Priority;
use crate::sink::runner::RunnerStats;
use crate::source::backfill::BackfillStats;
use crate::source::live::LiveStats;

/// What the series are read from: the running daemon's parts.
pub struct Sources {
    pub wal: Wal,
    pub data_dir: PathBuf,
    pub live: Vec<(Feed, Arc<LiveStats>)>,
    pub backfill: Option<Arc<BackfillStats>>,
    pub aggregate: Option<Arc<crate::aggregate::AggregateStats>>,
    pub verifier: Option<Arc<crate::verify::periods::VerifierStats>>,
    pub sinks: Vec<Arc<RunnerStats>>,
    pub priority: Arc<Priority>,
    /// Market hours, as `[calendar]` sets them.
    pub calendar: tickvault_core::calendar::Calendar,
    pub retention: std::time::Duration,
    pub reserve: crate::disk::Reserve,
    /// What the disk lets capture do.
    pub room: tokio::sync::watch::Receiver<crate::disk::Room>,
}

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sources")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// Latency buckets, seconds: from the live path's sub-millisecond appends to a sink
/// that takes a minute.
const BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// One labelled series of a family.
type Labels = Vec<(&'static str, String)>;

fn labels(pairs: &[(&'static str, &str)]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// Writes a family of counters or gauges, one series per row (a row without labels is
/// the family's one series).
fn family(
    enc: &mut DescriptorEncoder,
    kind: MetricType,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels, f64)],
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, unit, kind)?;
    for (labels, value) in rows {
        let mut series = family.encode_family(labels)?;
        match kind {
            MetricType::Counter => series.encode_counter::<NoLabelSet, f64, f64>(value, None)?,
            _ => series.encode_gauge(value)?,
        }
    }
    Ok(())
}

/// Counters (`_total` is added by the encoder).
fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels, f64)],
) -> fmt::Result {
    family(enc, MetricType::Counter, name, help, unit, rows)
}

fn gauges(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels, f64)],
) -> fmt::Result {
    family(enc, MetricType::Gauge, name, help, unit, rows)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<&Unit>, value: f64) -> fmt::Result {
    gauges(enc, name, help, unit, &[(Vec::new(), value)])
}

/// A histogram of microseconds as Prometheus buckets of seconds.
fn histograms(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, &Mutex<hdrhistogram::Histogram<u64>>)],
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (labels, histogram) in rows {
        // One pass over the recorded values, under the lock the hot path records with
        // (16 range counts took about a millisecond on a busy histogram).
        let (sum, count, buckets) = {
            let h = histogram.lock().unwrap_or_else(|p| p.into_inner());
            let mut counts = [0u64; BUCKETS.len() + 1];
            for v in h.iter_recorded() {
                let seconds = h.highest_equivalent(v.value_iterated_to()) as f64 / 1e6;
                let i = BUCKETS.iter().position(|&b| seconds <= b).unwrap_or(BUCKETS.len());
                counts[i] += v.count_at_value();
            }
            let buckets: Vec<(f64, u64)> = BUCKETS.iter().copied().chain([f64::INFINITY]).zip(counts).collect();
            (h.mean() * h.len() as f64 / 1e6, h.len(), buckets)
        };
        family
            .encode_family(labels)?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

impl Collector for Sources {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        let info = [("version", env!("CARGO_PKG_VERSION"))];
        let mut family = enc.encode_descriptor("tickvault_build", "The running build.", None, MetricType::Info)?;
        family.encode_info(&info)?;

        // Capture.
        let mut captured = Vec::new();
        for (feed, stats) in &self.live {
            for kind in EventKind::CAPTURED {
                let n = load(&stats.captured_by_kind[kind.index()]);
                captured.push((
                    labels(&[("lane", "live"), ("feed", feed.name()), ("kind", kind.name())]),
                    n,
                ));
            }
        }
        if let Some(b) = &self.backfill {
            for feed in Feed::ALL {
                let n = load(&b.bars_by_feed[feed.index()]);
                captured.push((
                    labels(&[("lane", "backfill"), ("feed", feed.name()), ("kind", "bar")]),
                    n,
                ));
            }
        }
        counters(
            &mut enc,
            "tickvault_events_captured",
            "Events made durable in the log.",
            None,
            &captured,
        )?;
        let per_feed = |value: &dyn Fn(&LiveStats) -> f64| -> Vec<(Labels, f64)> {
            self.live
                .iter()
                .map(|(feed, s)| (labels(&[("feed", feed.name())]), value(s)))
                .collect()
        };
        counters(
            &mut enc,
            "tickvault_live_frames",
            "WebSocket frames received.",
            None,
            &per_feed(&|s| load(&s.frames)),
        )?;
        counters(
            &mut enc,
            "tickvault_live_malformed",
            "Live messages refused as malformed (counted and logged, never appended).",
            None,
            &per_feed(&|s| load(&s.malformed)),
        )?;
        counters(
            &mut enc,
            "tickvault_live_reconnects",
            "Connections made after the first.",
            None,
            &per_feed(&|s| (s.connects.load(Ordering::Relaxed).saturating_sub(1)) as f64),
        )?;
        counters(
            &mut enc,
            "tickvault_live_gaps_suspected",
            "Disconnects recorded as a suspected gap.",
            None,
            &per_feed(&|s| load(&s.gaps)),
        )?;
        let now_ms = crate::event::now_ms();
        gauges(
            &mut enc,
            "tickvault_live_market_open",
            "1 while the feed's market is open by [calendar] (forex Sunday 17:00 to Friday 17:00 New York, crypto always, stocks 09:30-16:00 on weekdays but holidays): when silence means staleness.",
            None,
            &self
                .live
                .iter()
                .map(|(feed, _)| {
                    let open = self.calendar.market_is_open(*feed, now_ms);
                    (labels(&[("feed", feed.name())]), f64::from(u8::from(open)))
                })
                .collect::<Vec<_>>(),
        )?;
        gauges(
            &mut enc,
            "tickvault_live_connected",
            "1 while the feed's connection is up and authenticated.",
            None,
            &per_feed(&|s| f64::from(u8::from(s.connected.load(Ordering::Relaxed)))),
        )?;
        gauges(
            &mut enc,
            "tickvault_live_last_capture_timestamp",
            "When the feed's last events were made durable, Unix time (0: none yet); time() minus it is the feed's staleness.",
            Some(&Unit::Seconds),
            &per_feed(&|s| s.last_captured_ms.load(Ordering::Relaxed) as f64 / 1000.0),
        )?;
        let rows: Vec<_> = self
            .live
            .iter()
            .map(|(feed, s)| (labels(&[("feed", feed.name())]), &s.latency_us))
            .collect();
        histograms(
            &mut enc,
            "tickvault_live_frame_to_durable",
            "A live frame, received to durable in the log.",
            &rows,
        )?;

        if let Some(a) = &self.aggregate {
            for (name, help, value) in [
                (
                    "tickvault_aggregate_rounds",
                    "Aggregator rounds (each takes what the log received since the last).",
                    &a.rounds,
                ),
                (
                    "tickvault_aggregate_minutes",
                    "One-minute bars the aggregator took in.",
                    &a.minutes_in,
                ),
            ] {
                counters(&mut enc, name, help, None, &[(Vec::new(), load(value))])?;
            }
            let rows = [("new", &a.bars_new), ("revised", &a.bars_revised)]
                .map(|(state, n)| (labels(&[("state", state)]), load(n)));
            counters(
                &mut enc,
                "tickvault_aggregate_bars",
                "Derived bars appended: new, or revised by late data (a higher version).",
                None,
                &rows,
            )?;
            let mut rows = Vec::new();
            for lane in [Lane::Live, Lane::Backfill] {
                let taken = self.wal.reader().cursor(crate::aggregate::CURSOR, lane).unwrap_or(0);
                let behind = self.wal.head(lane).saturating_sub(taken);
                rows.push((labels(&[("lane", lane.name())]), behind as f64));
            }
            gauges(
                &mut enc,
                "tickvault_aggregate_backlog_records",
                "Records of a lane the aggregator has not taken yet.",
                None,
                &rows,
            )?;
        }

        if let Some(v) = &self.verifier {
            for (name, help, value) in [
                (
                    "tickvault_backfill_periods_verified",
                    "Backfill periods found whole in every enabled sink (each key the log holds).",
                    &v.verified,
                ),
                (
                    "tickvault_backfill_periods_unverified",
                    "Verified backfill periods found short in a sink since, and verified no more.",
                    &v.unverified,
                ),
            ] {
                counters(&mut enc, name, help, None, &[(Vec::new(), load(value))])?;
            }
        }
        if self.backfill.is_some() {
            let counts = crate::gaps::PeriodCounts::read(self.wal.reader()).unwrap_or_default();
            let rows: Vec<_> = crate::source::backfill::PeriodState::ALL
                .iter()
                .map(|state| (labels(&[("state", state.name())]), counts.get(*state) as f64))
                .collect();
            gauges(
                &mut enc,
                "tickvault_backfill_tracker_periods",
                "The tracker's periods per state: pending, downloaded, verified (every enabled sink holds it whole).",
                None,
                &rows,
            )?;
        }

        if let Some(b) = &self.backfill {
            for (name, help, value) in [
                ("tickvault_backfill_requests", "REST requests made.", &b.requests),
                ("tickvault_backfill_pages", "REST pages appended.", &b.pages),
                ("tickvault_backfill_retries", "REST requests retried.", &b.retries),
                (
                    "tickvault_backfill_repairs",
                    "Gaps of the coverage index fetched by the daemon.",
                    &b.repairs,
                ),
                (
                    "tickvault_backfill_rate_limited",
                    "REST answers 429 (rate limited).",
                    &b.rate_limited,
                ),
                (
                    "tickvault_backfill_server_errors",
                    "REST answers 5xx.",
                    &b.server_errors,
                ),
                (
                    "tickvault_backfill_malformed",
                    "Bars refused as malformed.",
                    &b.malformed,
                ),
            ] {
                counters(&mut enc, name, help, None, &[(Vec::new(), load(value))])?;
            }
            counters(
                &mut enc,
                "tickvault_backfill_paused",
                "Time the backfill's appends paused for live capture.",
                Some(&Unit::Seconds),
                &[(Vec::new(), load(&b.paused_ms) / 1000.0)],
            )?;
            let (total, done, skipped, failed, ahead) = (
                load(&b.periods_total),
                load(&b.periods_done),
                load(&b.periods_skipped),
                load(&b.periods_failed),
                load(&b.periods_ahead),
            );
            let pending = (total - done - skipped - failed - ahead).max(0.0);
            let rows: Vec<_> = [
                ("done", done),
                ("already_done", skipped),
                ("failed", failed),
                ("ahead_of_source", ahead),
                ("pending", pending),
            ]
            .into_iter()
            .map(|(state, n)| (labels(&[("state", state)]), n))
            .collect();
            gauges(
                &mut enc,
                "tickvault_backfill_periods",
                "The current pass's periods by state.",
                None,
                &rows,
            )?;
            gauge(
                &mut enc,
                "tickvault_backfill_waiting_for_backlog",
                "1 while the backfill waits for the sinks to take its backlog.",
                None,
                f64::from(u8::from(b.waiting_for_backlog.load(Ordering::Relaxed))),
            )?;
        }

        // The log.
        let heads: Vec<_> = Lane::ALL
            .iter()
            .map(|lane| (labels(&[("lane", lane.name())]), self.wal.head(*lane) as f64))
            .collect();
        gauges(
            &mut enc,
            "tickvault_log_head_sequence",
            "The last sequence appended, per lane.",
            None,
            &heads,
        )?;
        gauge(
            &mut enc,
            "tickvault_log_disk",
            "The log directory's size on disk.",
            Some(&Unit::Bytes),
            dir_bytes(&self.data_dir) as f64,
        )?;
        if let Some((free, size)) = crate::disk::filesystem(&self.data_dir) {
            gauge(
                &mut enc,
                "tickvault_log_filesystem_free",
                "Free space on the log's filesystem, for an unprivileged user.",
                Some(&Unit::Bytes),
                free as f64,
            )?;
            gauge(
                &mut enc,
                "tickvault_log_filesystem_size",
                "The log's filesystem's size.",
                Some(&Unit::Bytes),
                size as f64,
            )?;
        }
        if let Some((_, size)) = crate::disk::filesystem(&self.data_dir) {
            gauge(
                &mut enc,
                "tickvault_log_disk_reserve",
                "Free space kept for forwarding, truncation and reopening the log (log.disk_reserve).",
                Some(&Unit::Bytes),
                self.reserve.bytes(size) as f64,
            )?;
        }
        let room = *self.room.borrow();
        gauges(
            &mut enc,
            "tickvault_capture_paused_for_disk",
            "1 while a lane's capture is paused for free space: backfill under twice log.disk_reserve, live under it.",
            None,
            &[
                (labels(&[("lane", "live")]), f64::from(u8::from(room.capture_stopped))),
                (
                    labels(&[("lane", "backfill")]),
                    f64::from(u8::from(room.backfill_paused)),
                ),
            ],
        )?;
        gauge(
            &mut enc,
            "tickvault_log_quarantined_records",
            "Records set aside as corrupt (wal check lists them).",
            None,
            self.wal.quarantined() as f64,
        )?;
        gauge(
            &mut enc,
            "tickvault_log_poisoned",
            "1 once a write failed: the log refuses writes until restarted.",
            None,
            f64::from(u8::from(self.wal.poisoned().is_some())),
        )?;
        counters(
            &mut enc,
            "tickvault_log_written",
            "Bytes committed to the log (records, cursors, state; before compression).",
            Some(&Unit::Bytes),
            &[(Vec::new(), self.wal.committed_bytes() as f64)],
        )?;
        gauge(
            &mut enc,
            "tickvault_log_retention",
            "How long the log keeps a record (log.retention).",
            Some(&Unit::Seconds),
            self.retention.as_secs_f64(),
        )?;
        let (started, finished) = self.wal.reclaims();
        counters(
            &mut enc,
            "tickvault_log_reclaims",
            "Space reclaims (the files of truncated records dropped, behind the writer), by state.",
            None,
            &[
                (labels(&[("state", "started")]), started as f64),
                (labels(&[("state", "finished")]), finished as f64),
            ],
        )?;
        counters(
            &mut enc,
            "tickvault_log_group_commits",
            "Group commits (one fsync each).",
            None,
            &[(Vec::new(), self.wal.group_commits() as f64)],
        )?;

        // Forwarding.
        let per_runner = |value: &dyn Fn(&RunnerStats) -> f64| -> Vec<(Labels, f64)> {
            self.sinks
                .iter()
                .map(|s| (labels(&[("sink", s.sink), ("lane", s.lane.name())]), value(s)))
                .collect()
        };
        gauges(
            &mut enc,
            "tickvault_sink_cursor_sequence",
            "The last log sequence the sink acknowledged.",
            None,
            &per_runner(&|s| load(&s.acked_seq)),
        )?;
        gauges(
            &mut enc,
            "tickvault_sink_backlog_records",
            "Records in the lane not yet acknowledged by the sink.",
            None,
            &per_runner(&|s| {
                self.wal
                    .head(s.lane)
                    .saturating_sub(s.acked_seq.load(Ordering::Relaxed)) as f64
            }),
        )?;
        counters(
            &mut enc,
            "tickvault_sink_rows_written",
            "Rows the sink acknowledged.",
            None,
            &per_runner(&|s| load(&s.rows)),
        )?;
        counters(
            &mut enc,
            "tickvault_sink_batches_written",
            "Batches the sink acknowledged.",
            None,
            &per_runner(&|s| load(&s.batches)),
        )?;
        counters(
            &mut enc,
            "tickvault_sink_write_failures",
            "Write attempts that failed (retried).",
            None,
            &per_runner(&|s| load(&s.failures)),
        )?;
        counters(
            &mut enc,
            "tickvault_sink_refused_records",
            "Records the sink refused for their content, set aside (verify lists them).",
            None,
            &per_runner(&|s| load(&s.refused)),
        )?;
        let mut states = Vec::new();
        for s in &self.sinks {
            let now = s.state();
            for state in [State::Closed, State::Open, State::HalfOpen] {
                let l = labels(&[("sink", s.sink), ("lane", s.lane.name()), ("state", state.name())]);
                states.push((l, f64::from(u8::from(now == state))));
            }
        }
        gauges(
            &mut enc,
            "tickvault_sink_breaker_state",
            "The sink's circuit breaker: 1 for the state it is in.",
            None,
            &states,
        )?;
        let rows: Vec<_> = self
            .sinks
            .iter()
            .map(|s| (labels(&[("sink", s.sink), ("lane", s.lane.name())]), &s.write_us))
            .collect();
        histograms(
            &mut enc,
            "tickvault_sink_batch_write",
            "A successful batch write, sent to acknowledged.",
            &rows,
        )?;
        let rows: Vec<_> = self
            .sinks
            .iter()
            .map(|s| (labels(&[("sink", s.sink), ("lane", s.lane.name())]), &s.latency_us))
            .collect();
        histograms(
            &mut enc,
            "tickvault_sink_capture_to_commit",
            "An event, captured to acknowledged by the sink (rows sent again left out).",
            &rows,
        )?;
        gauge(
            &mut enc,
            "tickvault_live_budget_backfill_share",
            "The backfill's share of its duties under the live latency budget (1: all of it).",
            None,
            self.priority.backfill_share(),
        )?;
        Ok(())
    }
}

/// Bytes of the files under `dir` (RocksDB's are one level deep).
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Why the daemon is not ready, one line each; empty when it is.
pub fn not_ready(sources: &Sources) -> Vec<String> {
    let mut why = Vec::new();
    if let Some(e) = sources.wal.poisoned() {
        why.push(format!("log: {e}"));
    }
    if sources.room.borrow().capture_stopped {
        why.push("log: free space under log.disk_reserve: live capture stopped".to_owned());
    }
    for s in &sources.sinks {
        if s.state() == State::Open {
            let error = s.last_error().unwrap_or_default();
            why.push(format!(
                "sink {} ({} lane): breaker open: {error}",
                s.sink,
                s.lane.name()
            ));
        }
    }
    why
}

struct Served {
    registry: Registry,
    sources: Arc<Sources>,
}

/// Binds `listen` and serves until `shutdown`; returns the bound address.
pub async fn serve(
    listen: SocketAddr,
    sources: Sources,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, impl std::future::Future<Output = ()>)> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let sources = Arc::new(sources);
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SharedSources(sources.clone())));
    let served = Arc::new(Served { registry, sources });
    let app = axum::Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route("/readyz", axum::routing::get(readyz))
        .with_state(served);
    let server = async move {
        let stop = async move {
            while !*shutdown.borrow() {
                if shutdown.changed().await.is_err() {
                    break;
                }
            }
        };
        if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop).await {
            tracing::error!(error = %e, "the metrics server stopped");
        }
    };
    Ok((addr, server))
}

/// The collector registered: the sources, shared with `/readyz`.
#[derive(Debug)]
struct SharedSources(Arc<Sources>);

impl Collector for SharedSources {
    fn encode(&self, enc: DescriptorEncoder) -> fmt::Result {
        self.0.encode(enc)
    }
}

async fn metrics(axum::extract::State(served): axum::extract::State<Arc<Served>>) -> axum::response::Response {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &served.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding the metrics failed\n").into_response(),
    }
}

async fn readyz(axum::extract::State(served): axum::extract::State<Arc<Served>>) -> axum::response::Response {
    let why = not_ready(&served.sources);
    if why.is_empty() {
        (StatusCode::OK, "ready\n".to_owned()).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", why.join("\n")),
        )
            .into_response()
    }
}
