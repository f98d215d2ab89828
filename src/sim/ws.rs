//! The simulator's WebSocket clusters (`/forex`, `/crypto`, `/stocks`): auth, subscribe,
//! batched JSON arrays in real time, one connection per key and cluster, slow consumers
//! cut off, and injected disconnects (abrupt, or announced by a status).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use super::market::{Market, SimQuote};
use super::server::Sim;
use crate::event::{now_ms, Feed, MINUTE_MS};
use crate::polygon::symbol;

/// What `PREFIX.*` covers in the simulator.
pub const WILDCARD_SYMBOLS: &[(Feed, &[&str])] = &[
    (Feed::Forex, &["EUR/USD", "GBP/USD", "USD/JPY", "AUD/USD", "USD/CHF"]),
    (Feed::Crypto, &["BTC-USD", "ETH-USD", "SOL-USD"]),
    (Feed::Stocks, &["AAPL", "MSFT", "NVDA"]),
];

use crate::polygon::channels as prefixes;

fn status(status: &str, message: &str) -> Message {
    Message::Text(
        json!([{ "ev": "status", "status": status, "message": message }])
            .to_string()
            .into(),
    )
}

pub(crate) async fn upgrade(State(sim): State<Arc<Sim>>, Path(market): Path<String>, ws: WebSocketUpgrade) -> Response {
    let feed = match market.as_str() {
        "forex" => Feed::Forex,
        "crypto" => Feed::Crypto,
        "stocks" => Feed::Stocks,
        _ => return (StatusCode::NOT_FOUND, "unknown market").into_response(),
    };
    ws.on_upgrade(move |socket| connection(sim, feed, socket))
}

struct Subscriptions {
    items: BTreeSet<(String, String)>,
}

impl Subscriptions {
    fn symbols(&self, feed: Feed, prefix: &str) -> Vec<String> {
        let mut out = BTreeSet::new();
        for (p, s) in &self.items {
            if p != prefix {
                continue;
            }
            if s == "*" {
                let all = WILDCARD_SYMBOLS
                    .iter()
                    .find(|(f, _)| *f == feed)
                    .map_or(&[][..], |(_, s)| *s);
                out.extend(all.iter().map(|s| s.to_string()));
            } else {
                out.insert(s.clone());
            }
        }
        out.into_iter().collect()
    }
}

async fn connection(sim: Arc<Sim>, feed: Feed, socket: WebSocket) {
    let id = sim.next_connection.fetch_add(1, Ordering::Relaxed);
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Message>(sim.options.max_queued_frames.max(1));
    let writer = tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            let closing = matches!(message, Message::Close(_));
            if sink.send(message).await.is_err() || closing {
                break;
            }
        }
    });
    let _ = tx.send(status("connected", "Connected Successfully")).await;

    let mut key: Option<String> = None;
    let mut subs = Subscriptions { items: BTreeSet::new() };
    let mut evicted: Option<oneshot::Receiver<()>> = None;
    let mut tick = tokio::time::interval(sim.options.batch_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_emit = now_ms();
    let disconnect = sim.options.faults.disconnect_every;
    let deadline = tokio::time::sleep(disconnect.unwrap_or(std::time::Duration::from_secs(86_400 * 365)));
    tokio::pin!(deadline);
    let kick = sim.options.faults.kick_every;
    let kick_deadline = tokio::time::sleep(kick.unwrap_or(std::time::Duration::from_secs(86_400 * 365)));
    tokio::pin!(kick_deadline);
    let mut kicking = false;
    let mut shutdown = sim.shutdown.clone();
    let mut graceful = true;
    let mut frames_sent = 0u64;

    loop {
        tokio::select! {
            incoming = stream.next() => {
                let text = match incoming {
                    Some(Ok(Message::Text(text))) => text,
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => continue,
                };
                let Ok(request) = serde_json::from_str::<Value>(&text) else {
                    let _ = tx.send(status("error", "could not parse message")).await;
                    continue;
                };
                let action = request["action"].as_str().unwrap_or("");
                let params = request["params"].as_str().unwrap_or("");
                match action {
                    "auth" => {
                        if !sim.accepts_key(params) {
                            let _ = tx.send(status("auth_failed", "authentication failed")).await;
                            let _ = tx.send(Message::Close(Some(CloseFrame { code: 1008, reason: Utf8Bytes::from_static("authentication failed") }))).await;
                            break;
                        }
                        let (evict_tx, evict_rx) = oneshot::channel();
                        let previous = sim
                            .clusters
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert((params.to_owned(), feed), (id, evict_tx));
                        if let Some((_, old)) = previous {
                            let _ = old.send(());
                        }
                        evicted = Some(evict_rx);
                        key = Some(params.to_owned());
                        let _ = tx.send(status("auth_success", "authenticated")).await;
                    }
                    "subscribe" | "unsubscribe" => {
                        if key.is_none() {
                            let _ = tx.send(status("auth_required", "Please authenticate first")).await;
                            continue;
                        }
                        for item in params.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                            let parsed = item.split_once('.').and_then(|(prefix, sym)| {
                                if !prefixes(feed).contains(&prefix) {
                                    return None;
                                }
                                let sym = if sym == "*" { Some("*".to_owned()) } else { symbol::canonical(feed, sym) };
                                sym.map(|s| (prefix.to_owned(), s))
                            });
                            let Some(entry) = parsed else {
                                let _ = tx.send(status("error", &format!("invalid subscription: {item}"))).await;
                                continue;
                            };
                            let verb = if action == "subscribe" {
                                subs.items.insert(entry);
                                "subscribed to"
                            } else {
                                subs.items.remove(&entry);
                                "unsubscribed to"
                            };
                            let _ = tx.send(status("success", &format!("{verb}: {item}"))).await;
                        }
                    }
                    _ => {
                        let _ = tx.send(status("error", "unknown action")).await;
                    }
                }
            }
            _ = async { evicted.as_mut().expect("guarded").await }, if evicted.is_some() => {
                let _ = tx.try_send(Message::Text(json!([{ "ev": "status", "status": "max_connections", "message": "Maximum number of connections exceeded." }]).to_string().into()));
                let _ = tx.try_send(Message::Close(Some(CloseFrame { code: 1008, reason: Utf8Bytes::from_static("max connections") })));
                // The newer connection owns the cluster entry now.
                key = None;
                break;
            }
            _ = tick.tick() => {
                let now = now_ms();
                if kicking {
                    // The status between the batch's events: what came before and after
                    // it in the frame was sent, and a client must keep it.
                    let mut events = if key.is_some() && !subs.items.is_empty() {
                        gather(&sim.market, feed, &subs, last_emit, now, sim.options.faults.interleave_every)
                    } else {
                        Vec::new()
                    };
                    sim.kicked.lock().unwrap_or_else(|p| p.into_inner()).extend(events.iter().cloned());
                    tracing::info!(connection = id, events = events.len(), "simulator: injected force_disconnect");
                    let status = json!({ "ev": "status", "status": "force_disconnect", "message": "connection closed by the server" });
                    events.insert(events.len().div_ceil(2), status);
                    let text = Value::Array(events).to_string();
                    if tx.try_send(Message::Text(text.clone().into())).is_ok() {
                        sim.note_sent(id, feed, &text);
                    }
                    let _ = tx.try_send(Message::Close(Some(CloseFrame { code: 1000, reason: Utf8Bytes::from_static("force disconnect") })));
                    break;
                }
                if key.is_some() && !subs.items.is_empty() {
                    let events = gather(&sim.market, feed, &subs, last_emit, now, sim.options.faults.interleave_every);
                    if !events.is_empty() {
                        frames_sent += 1;
                        let every = sim.options.faults.malformed_every;
                        if every > 0 && frames_sent.is_multiple_of(u64::from(every)) {
                            let _ = tx.try_send(Message::Text(r#"[{"ev":"C","p":"EUR/USD","b":"not-a-price"},{"no_ev":1}] trailing"#.into()));
                            let _ = tx.try_send(Message::Text(r#"[{"ev":"C","p":42,"t":1}]"#.into()));
                            // Well-formed JSON that no sink could store: a timestamp far
                            // past any PostgreSQL timestamp, a price that is not a number.
                            let _ = tx.try_send(Message::Text(format!(
                                r#"[{{"ev":"C","p":"EUR/USD","x":48,"a":1.1,"b":1.0,"t":18500000000000000}},{{"ev":"C","p":"EUR/USD","x":48,"a":"NaN","b":1.0,"t":{now}}}]"#
                            ).into()));
                        }
                        let text = Value::Array(events).to_string();
                        if tx.try_send(Message::Text(text.clone().into())).is_ok() {
                            sim.note_sent(id, feed, &text);
                        } else {
                            tracing::info!(connection = id, "simulator: slow consumer, disconnecting");
                            graceful = false;
                            break;
                        }
                    }
                }
                last_emit = now;
            }
            // Due: the next batch goes out with the status inside it.
            _ = &mut kick_deadline, if kick.is_some() && !kicking => kicking = true,
            _ = &mut deadline, if disconnect.is_some() => {
                tracing::info!(connection = id, "simulator: injected disconnect");
                graceful = false;
                break;
            }
            _ = shutdown.changed() => break,
        }
    }
    if let Some(k) = key {
        let mut clusters = sim.clusters.lock().unwrap_or_else(|p| p.into_inner());
        if clusters.get(&(k.clone(), feed)).is_some_and(|(owner, _)| *owner == id) {
            clusters.remove(&(k, feed));
        }
    }
    drop(tx);
    if graceful {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), writer).await;
    } else {
        // An abrupt cut: no close frame, the TCP connection just ends.
        writer.abort();
    }
}

/// The `interleave` fault: a tick from another exchange stamped with the time of the
/// symbol's tick before (a later tick stamped earlier, and a timestamp seen twice), its
/// price a cent away, a trade with its own trade id. Which ticks get one depends on the
/// tick alone, so every connection receives the same feed.
fn twin(tick: &Value, earlier_ts: i64) -> Value {
    let mut twin = tick.clone();
    twin["t"] = json!(earlier_ts);
    for (field, exchange) in [("x", 2), ("bx", 5)] {
        if twin.get(field).is_some() {
            twin[field] = json!(exchange);
        }
    }
    // Forex's `p` is the pair, not a price: only numbers move.
    for field in ["p", "b", "bp"] {
        if let Some(price) = twin.get(field).and_then(Value::as_f64) {
            twin[field] = json!(price + 0.01);
        }
    }
    if let Some(id) = twin.get("i").and_then(Value::as_str) {
        twin["i"] = json!(format!("x2-{id}"));
    }
    twin
}

fn size(ts: i64) -> f64 {
    1.0 + (ts.rem_euclid(7)) as f64
}

fn quote_json(feed: Feed, symbol: &str, prefix: &str, q: &SimQuote) -> Value {
    match prefix {
        "C" => json!({ "ev": "C", "p": symbol, "x": 48, "a": q.ask, "b": q.bid, "t": q.ts_ms }),
        "XQ" => {
            json!({ "ev": "XQ", "pair": symbol, "bp": q.bid, "bs": size(q.ts_ms), "ap": q.ask, "as": size(q.ts_ms + 1), "t": q.ts_ms, "x": 1, "r": q.ts_ms + 1 })
        }
        "XT" => {
            json!({ "ev": "XT", "pair": symbol, "p": q.bid, "s": size(q.ts_ms) / 10.0, "t": q.ts_ms, "c": [1], "i": format!("{}", q.ts_ms), "x": 1, "r": q.ts_ms + 1 })
        }
        "Q" => {
            json!({ "ev": "Q", "sym": symbol, "bx": 4, "bp": q.bid, "bs": size(q.ts_ms), "ax": 7, "ap": q.ask, "as": size(q.ts_ms + 1), "c": 0, "i": [], "t": q.ts_ms, "q": q.ts_ms, "z": 3 })
        }
        "T" => {
            json!({ "ev": "T", "sym": symbol, "x": 4, "i": format!("{}", q.ts_ms), "z": 3, "p": q.bid, "s": 100.0 * size(q.ts_ms), "c": [], "t": q.ts_ms, "q": q.ts_ms })
        }
        _ => unreachable!("quote prefix {prefix} for {feed}"),
    }
}

struct Window {
    start: i64,
    end: i64,
    open: f64,
    high: f64,
    low: f64,
    close: f64,
    count: u64,
}

fn window_json(feed: Feed, symbol: &str, prefix: &str, w: &Window) -> Value {
    let vw = ((w.open + w.high + w.low + w.close) / 4.0 * 1e5).round() / 1e5;
    match feed {
        Feed::Forex => {
            json!({ "ev": prefix, "pair": symbol, "v": w.count, "o": w.open, "c": w.close, "h": w.high, "l": w.low, "s": w.start, "e": w.end })
        }
        Feed::Crypto => {
            json!({ "ev": prefix, "pair": symbol, "v": w.count as f64, "vw": vw, "z": 1, "o": w.open, "c": w.close, "h": w.high, "l": w.low, "s": w.start, "e": w.end })
        }
        Feed::Stocks => {
            json!({ "ev": prefix, "sym": symbol, "v": w.count, "vw": vw, "o": w.open, "c": w.close, "h": w.high, "l": w.low, "z": 100, "s": w.start, "e": w.end })
        }
    }
}

fn fold(quotes: &[SimQuote], start: i64, end: i64) -> Option<Window> {
    let inside: Vec<&SimQuote> = quotes.iter().filter(|q| q.ts_ms >= start && q.ts_ms < end).collect();
    let (first, last) = (inside.first()?, inside.last()?);
    Some(Window {
        start,
        end,
        open: first.bid,
        close: last.bid,
        high: inside.iter().map(|q| q.bid).fold(f64::MIN, f64::max),
        low: inside.iter().map(|q| q.bid).fold(f64::MAX, f64::min),
        count: inside.len() as u64,
    })
}

/// Every event of the subscriptions that happened in `(after, upto]`, in time order;
/// bars are sent when their window has closed. With `interleave_every` N > 0, a tick
/// whose time is a multiple of N is followed by its [`twin`].
fn gather(
    market: &Market,
    feed: Feed,
    subs: &Subscriptions,
    after: i64,
    upto: i64,
    interleave_every: u32,
) -> Vec<Value> {
    let mut events: Vec<(i64, Value)> = Vec::new();
    let first_minute = after.div_euclid(MINUTE_MS) * MINUTE_MS - MINUTE_MS;
    for &prefix in prefixes(feed) {
        for symbol in subs.symbols(feed, prefix) {
            let mut minute = first_minute;
            while minute <= upto {
                match prefix {
                    "C" | "XQ" | "XT" | "Q" | "T" => {
                        let quotes = market.quotes_between(feed, &symbol, minute, after, upto);
                        let every = i64::from(interleave_every);
                        for (i, q) in quotes.iter().enumerate() {
                            let tick = quote_json(feed, &symbol, prefix, q);
                            // The symbol's tick before this one in the minute: the one before
                            // it here, or for the first, one before this window.
                            let earlier = (every > 0 && q.ts_ms % every == 0)
                                .then(|| match i {
                                    0 => market
                                        .quotes_between(feed, &symbol, minute, minute - 1, q.ts_ms - 1)
                                        .last()
                                        .map(|e| e.ts_ms),
                                    _ => Some(quotes[i - 1].ts_ms),
                                })
                                .flatten();
                            if let Some(earlier) = earlier {
                                // Sorting is stable: the twin stays right after its tick.
                                events.push((q.ts_ms, tick.clone()));
                                events.push((q.ts_ms, twin(&tick, earlier)));
                                continue;
                            }
                            events.push((q.ts_ms, tick));
                        }
                    }
                    "CA" | "XA" | "AM" => {
                        let end = minute + MINUTE_MS;
                        if end > after && end <= upto {
                            if let Some(b) = market.bar(feed, &symbol, minute) {
                                let w = Window {
                                    start: minute,
                                    end,
                                    open: b.open,
                                    high: b.high,
                                    low: b.low,
                                    close: b.close,
                                    count: b.count,
                                };
                                events.push((end, window_json(feed, &symbol, prefix, &w)));
                            }
                        }
                    }
                    _ => {
                        // Second bars: each second of the minute that closed in the window.
                        let mut second = minute.max(after.div_euclid(1000) * 1000);
                        while second < (minute + MINUTE_MS).min(upto) {
                            let end = second + 1000;
                            if end > after && end <= upto {
                                let quotes = market.quotes_between(feed, &symbol, minute, second - 1, end - 1);
                                if let Some(w) = fold(&quotes, second, end) {
                                    events.push((end, window_json(feed, &symbol, prefix, &w)));
                                }
                            }
                            second = end;
                        }
                    }
                }
                minute += MINUTE_MS;
            }
        }
    }
    events.sort_by_key(|(t, _)| *t);
    events.into_iter().map(|(_, v)| v).collect()
}
