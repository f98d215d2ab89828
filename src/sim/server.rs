//! The simulator's server: one address, WebSocket clusters and REST, shared state.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};

use super::market::Market;
use super::options::SimOptions;
use crate::event::{now_ms, Feed, MINUTE_MS};

/// Per-key request counts in the current minute window.
#[derive(Default)]
struct Quota {
    window_start_ms: i64,
    counts: HashMap<String, u32>,
}

/// The connection holding a cluster slot: its id and how to evict it.
pub(crate) type Occupant = (u64, oneshot::Sender<()>);

/// Shared state of one simulator.
pub(crate) struct Sim {
    pub(crate) options: SimOptions,
    pub(crate) market: Market,
    pub(crate) requests: AtomicU64,
    quota: Mutex<Quota>,
    /// The live connection per (key, market): a newer one evicts it.
    pub(crate) clusters: Mutex<HashMap<(String, Feed), Occupant>>,
    pub(crate) next_connection: AtomicU64,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// The events sent in the same frame as a `kick` fault's status, in order.
    pub(crate) kicked: Mutex<Vec<serde_json::Value>>,
    /// With `record_sent`, every live frame of market events handed to a connection.
    pub(crate) sent: Mutex<Vec<SentFrame>>,
}

/// A live frame the simulator handed to a connection's writer.
#[derive(Clone, Debug)]
pub struct SentFrame {
    /// The connection, numbered from 1 in the order they were made.
    pub connection: u64,
    pub feed: Feed,
    /// When it was handed over, Unix milliseconds.
    pub at_ms: i64,
    pub text: String,
}

impl Sim {
    /// Notes a frame handed to connection `connection`, when the options ask for it.
    pub(crate) fn note_sent(&self, connection: u64, feed: Feed, text: &str) {
        if self.options.record_sent {
            self.sent.lock().unwrap_or_else(|p| p.into_inner()).push(SentFrame {
                connection,
                feed,
                at_ms: now_ms(),
                text: text.to_owned(),
            });
        }
    }

    pub(crate) fn accepts_key(&self, key: &str) -> bool {
        !key.is_empty() && self.options.api_key.as_deref().is_none_or(|k| k == key)
    }

    /// `Some(seconds to wait)` when this request is over the key's quota or falls in an
    /// injected 429 burst; counts the request otherwise.
    pub(crate) fn rate_limited(&self, key: &str) -> Option<u64> {
        let now = now_ms();
        let mut quota = self.quota.lock().unwrap_or_else(|p| p.into_inner());
        let window = now - now.rem_euclid(MINUTE_MS);
        if quota.window_start_ms != window {
            quota.window_start_ms = window;
            quota.counts.clear();
        }
        let count = quota.counts.entry(key.to_owned()).or_insert(0);
        *count += 1;
        let retry_after = ((window + MINUTE_MS - now) as u64).div_ceil(1000).max(1);
        let burst = self.options.faults.burst_429;
        if burst > 0 && *count <= burst {
            return Some(retry_after.min(2));
        }
        let limit = self.options.requests_per_minute;
        let allowed = if limit == 0 { u32::MAX } else { limit + burst };
        (*count > allowed).then_some(retry_after)
    }
}

/// A running simulator.
pub struct SimHandle {
    pub addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    sim: Arc<Sim>,
}

impl SimHandle {
    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    pub fn rest_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The events sent so far in the same frame as a `kick` fault's `force_disconnect`
    /// status: a client that acts on the status first loses them.
    pub fn kicked(&self) -> Vec<serde_json::Value> {
        self.sim.kicked.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Every live frame sent so far (with `record_sent`), in order, taken out.
    pub fn take_sent(&self) -> Vec<SentFrame> {
        std::mem::take(&mut *self.sim.sent.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Stops serving and closes every live connection.
    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.stop.send(true);
        self.task.await.unwrap_or(Ok(()))
    }
}

/// Binds `addr` and serves until stopped.
pub async fn spawn(addr: SocketAddr, options: SimOptions) -> std::io::Result<SimHandle> {
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop, shutdown) = watch::channel(false);
    let mut market = Market::new(options.seed, options.quotes_per_minute, options.faults.hole_every);
    market.always_open = options.always_open;
    let sim = Arc::new(Sim {
        market,
        options,
        requests: AtomicU64::new(0),
        quota: Mutex::new(Quota::default()),
        clusters: Mutex::new(HashMap::new()),
        next_connection: AtomicU64::new(1),
        shutdown: shutdown.clone(),
        kicked: Mutex::new(Vec::new()),
        sent: Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .route(
            "/v2/aggs/ticker/{ticker}/range/{multiplier}/{timespan}/{from}/{to}",
            get(super::rest::aggregates),
        )
        .route("/{market}", get(super::ws::upgrade))
        .with_state(sim.clone());
    let mut stopped = shutdown;
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.wait_for(|s| *s).await;
            })
            .await
    });
    Ok(SimHandle { addr, stop, task, sim })
}
