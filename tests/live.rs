//! The live collector and the simulator against each other, over real sockets.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tickvault::config::Secret;
use tickvault::event::MINUTE_MS;
use tickvault::event::{Body, Event, Feed, EVENT_KIND};
use tickvault::gaps;
use tickvault::sim::{self, Faults, Market, SimOptions};
use tickvault::source::live::{self, LiveSpec, LiveStats};
use tickvault_wal::{Lane, Wal};
use tokio_tungstenite::tungstenite::Message;

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_json(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

async fn send(socket: &mut Socket, value: Value) {
    socket.send(Message::text(value.to_string())).await.unwrap();
}

#[tokio::test]
async fn the_simulator_speaks_polygons_session_protocol() {
    let sim = sim::spawn(
        any_port(),
        SimOptions {
            api_key: Some("right".into()),
            always_open: true,
            ..SimOptions::default()
        },
    )
    .await
    .unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/forex", sim.ws_url()))
        .await
        .unwrap();
    assert_eq!(
        next_json(&mut ws).await,
        json!([{"ev":"status","status":"connected","message":"Connected Successfully"}])
    );
    send(&mut ws, json!({"action":"subscribe","params":"C.EUR/USD"})).await;
    assert_eq!(next_json(&mut ws).await[0]["status"], "auth_required");
    send(&mut ws, json!({"action":"auth","params":"right"})).await;
    assert_eq!(
        next_json(&mut ws).await,
        json!([{"ev":"status","status":"auth_success","message":"authenticated"}])
    );
    // Both forex symbol forms, with a space after the comma: one success per item.
    send(
        &mut ws,
        json!({"action":"subscribe","params":"C.EUR/USD, CA.C:EUR-USD"}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!([{"ev":"status","status":"success","message":"subscribed to: C.EUR/USD"}])
    );
    assert_eq!(
        next_json(&mut ws).await,
        json!([{"ev":"status","status":"success","message":"subscribed to: CA.C:EUR-USD"}])
    );
    // Events come as arrays, each with `ev`, symbols in the canonical form.
    let frame = next_json(&mut ws).await;
    let events = frame.as_array().unwrap();
    assert!(!events.is_empty());
    for e in events {
        assert!(e["ev"] == "C" || e["ev"] == "CA", "{e}");
        assert!(e["p"] == "EUR/USD" || e["pair"] == "EUR/USD", "{e}");
    }
    sim.stop().await.unwrap();
}

#[tokio::test]
async fn a_bad_key_gets_auth_failed_and_a_second_connection_evicts_the_first() {
    let sim = sim::spawn(
        any_port(),
        SimOptions {
            api_key: Some("right".into()),
            always_open: true,
            ..SimOptions::default()
        },
    )
    .await
    .unwrap();
    let url = format!("{}/crypto", sim.ws_url());
    let (mut bad, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    next_json(&mut bad).await;
    send(&mut bad, json!({"action":"auth","params":"wrong"})).await;
    assert_eq!(next_json(&mut bad).await[0]["status"], "auth_failed");

    let (mut first, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    next_json(&mut first).await;
    send(&mut first, json!({"action":"auth","params":"right"})).await;
    assert_eq!(next_json(&mut first).await[0]["status"], "auth_success");
    let (mut second, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    next_json(&mut second).await;
    send(&mut second, json!({"action":"auth","params":"right"})).await;
    assert_eq!(next_json(&mut second).await[0]["status"], "auth_success");
    assert_eq!(next_json(&mut first).await[0]["status"], "max_connections");
    // The first is then closed; the second keeps working.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match first.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => break,
                _ => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the evicted connection stayed open");
    send(&mut second, json!({"action":"subscribe","params":"XQ.BTC-USD"})).await;
    assert_eq!(next_json(&mut second).await[0]["status"], "success");
    sim.stop().await.unwrap();
}

fn spec(sim: &sim::SimHandle, feed: Feed, symbols: &[&str], channels: &[&str]) -> LiveSpec {
    LiveSpec {
        feed,
        ws_url: sim.ws_url(),
        api_key: Secret::new("test-key"),
        symbols: symbols.iter().map(|s| s.to_string()).collect(),
        channels: channels.iter().map(|s| s.to_string()).collect(),
        stale_after: Duration::from_secs(5),
        reconnect_min: Duration::from_millis(50),
        reconnect_max: Duration::from_millis(400),
    }
}

fn events(wal: &Wal) -> Vec<Event> {
    let read = wal.reader().read(Lane::Live, 0, usize::MAX).unwrap();
    assert!(read.corrupt.is_empty());
    read.records
        .iter()
        .map(|r| {
            assert_eq!(r.kind, EVENT_KIND);
            Event::from_payload(&r.payload).unwrap()
        })
        .collect()
}

async fn capture_for(spec: LiveSpec, wal: &Wal, how_long: Duration) -> Arc<LiveStats> {
    let stats = Arc::new(LiveStats::default());
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(live::run(spec, wal.clone(), stats.clone(), shutdown));
    tokio::time::sleep(how_long).await;
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    stats
}

#[tokio::test]
async fn the_collector_captures_what_the_simulator_sends_for_every_market() {
    let sim = sim::spawn(
        any_port(),
        SimOptions {
            quotes_per_minute: 600,
            always_open: true,
            ..SimOptions::default()
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let (a, b, c) = tokio::join!(
        capture_for(
            spec(&sim, Feed::Forex, &["EUR/USD", "C:GBP-USD"], &["C", "CAS"]),
            &wal,
            Duration::from_secs(3)
        ),
        capture_for(
            spec(&sim, Feed::Crypto, &["BTC-USD"], &["XQ", "XT"]),
            &wal,
            Duration::from_secs(3)
        ),
        capture_for(
            spec(&sim, Feed::Stocks, &["AAPL"], &["Q", "T"]),
            &wal,
            Duration::from_secs(3)
        ),
    );
    let captured = events(&wal);
    let kinds: BTreeSet<(Feed, String, &str)> = captured
        .iter()
        .map(|e| (e.capture.feed, e.symbol().to_owned(), e.kind().name()))
        .collect();
    assert!(kinds.contains(&(Feed::Forex, "EUR/USD".into(), "quote")), "{kinds:?}");
    assert!(kinds.contains(&(Feed::Forex, "GBP/USD".into(), "quote")), "{kinds:?}");
    assert!(kinds.contains(&(Feed::Forex, "EUR/USD".into(), "bar")), "{kinds:?}");
    assert!(kinds.contains(&(Feed::Crypto, "BTC-USD".into(), "trade")), "{kinds:?}");
    assert!(kinds.contains(&(Feed::Stocks, "AAPL".into(), "quote")), "{kinds:?}");
    for stats in [&a, &b, &c] {
        assert_eq!(stats.malformed.load(Ordering::Relaxed), 0);
        assert_eq!(stats.captured(), stats.events.load(Ordering::Relaxed));
    }
    // Natural keys are unique: no duplicate captured.
    let keys: HashSet<String> = captured.iter().map(|e| e.natural_key().to_string()).collect();
    assert_eq!(keys.len(), captured.len());
    // Live quotes are exactly the simulator's market: same timestamps, same prices.
    let mut market = Market::new(1, 600, 0);
    market.always_open = true;
    for e in &captured {
        if let (Feed::Forex, Body::Quote(q)) = (e.capture.feed, &e.body) {
            let minute = q.ts_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
            let expected = market.quotes(Feed::Forex, &q.symbol, minute);
            assert!(
                expected
                    .iter()
                    .any(|s| s.ts_ms == q.ts_ms && s.bid == q.bid && s.ask == q.ask),
                "{q:?}"
            );
        }
    }
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

#[tokio::test]
async fn after_a_drop_the_collector_resubscribes_and_the_suspected_gap_covers_exactly_what_was_missed() {
    let faults = Faults {
        disconnect_every: Some(Duration::from_millis(1500)),
        ..Faults::default()
    };
    let options = SimOptions {
        quotes_per_minute: 3000,
        faults,
        seed: 9,
        ..SimOptions::default()
    };
    let sim = sim::spawn(any_port(), options).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let stats = capture_for(
        spec(&sim, Feed::Crypto, &["ETH-USD"], &["XQ"]),
        &wal,
        Duration::from_millis(5500),
    )
    .await;
    assert!(stats.connects.load(Ordering::Relaxed) >= 3, "{stats:?}");
    assert!(stats.disconnects.load(Ordering::Relaxed) >= 2, "{stats:?}");

    let captured: Vec<i64> = events(&wal)
        .iter()
        .filter_map(|e| match &e.body {
            Body::Quote(q) => Some(q.ts_ms),
            _ => None,
        })
        .collect();
    let gaps = gaps::suspected(wal.reader()).unwrap();
    // Gaps between sessions (the last one runs to the stop and may hold nothing).
    assert!(gaps.len() >= 2, "{gaps:?}");
    let (first, last) = (*captured.iter().min().unwrap(), *captured.iter().max().unwrap());
    let market = Market::new(9, 3000, 0);
    let mut expected = Vec::new();
    let mut minute = first.div_euclid(MINUTE_MS) * MINUTE_MS;
    while minute <= last {
        expected.extend(
            market
                .quotes(Feed::Crypto, "ETH-USD", minute)
                .into_iter()
                .map(|q| q.ts_ms)
                .filter(|t| (first..=last).contains(t)),
        );
        minute += MINUTE_MS;
    }
    let have: HashSet<i64> = captured.iter().copied().collect();
    let missed: Vec<i64> = expected.iter().copied().filter(|t| !have.contains(t)).collect();
    assert!(!missed.is_empty(), "the disconnects should have cost some quotes");
    for t in &missed {
        assert!(
            gaps.iter().any(|g| g.from_ms <= *t && *t <= g.to_ms),
            "missed quote at {t} lies in no suspected gap {gaps:?}"
        );
    }
    // Exactly: inside a gap nothing was captured (its ends are the events either side).
    for g in &gaps {
        assert!(g.from_ms <= g.to_ms);
        assert!(
            !captured.iter().any(|t| g.from_ms < *t && *t < g.to_ms),
            "captured an event inside {g:?}"
        );
    }
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_frames_are_counted_and_skipped_and_capture_goes_on() {
    let faults = Faults {
        malformed_every: 3,
        ..Faults::default()
    };
    let sim = sim::spawn(
        any_port(),
        SimOptions {
            quotes_per_minute: 3000,
            faults,
            always_open: true,
            ..SimOptions::default()
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let stats = capture_for(
        spec(&sim, Feed::Forex, &["EUR/USD"], &["C"]),
        &wal,
        Duration::from_secs(2),
    )
    .await;
    assert!(stats.malformed.load(Ordering::Relaxed) >= 4, "{stats:?}");
    // Nothing a sink would refuse reached the log.
    for event in events(&wal) {
        assert_eq!(event.problem(), None, "{event:?}");
    }
    assert!(stats.captured() > 20, "{stats:?}");
    assert_eq!(stats.disconnects.load(Ordering::Relaxed), 0);
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

#[tokio::test]
async fn a_quiet_market_is_not_mistaken_for_a_stale_feed() {
    // Every minute is a hole at the source: the connection is alive but carries nothing.
    let faults = Faults {
        hole_every: 1,
        ..Faults::default()
    };
    let sim = sim::spawn(
        any_port(),
        SimOptions {
            faults,
            always_open: true,
            ..SimOptions::default()
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let mut quiet = spec(&sim, Feed::Forex, &["EUR/USD"], &["C"]);
    quiet.stale_after = Duration::from_secs(1);
    let stats = capture_for(quiet, &wal, Duration::from_secs(4)).await;
    assert_eq!(stats.connects.load(Ordering::Relaxed), 1, "{stats:?}");
    assert_eq!(stats.disconnects.load(Ordering::Relaxed), 0, "{stats:?}");
    assert_eq!(stats.captured(), 0);
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

#[tokio::test]
async fn a_reader_that_stops_reading_is_cut_off_as_a_slow_consumer() {
    let options = SimOptions {
        quotes_per_minute: 60_000,
        max_queued_frames: 4,
        always_open: true,
        ..SimOptions::default()
    };
    let sim = sim::spawn(any_port(), options).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("{}/crypto", sim.ws_url()))
        .await
        .unwrap();
    next_json(&mut ws).await;
    send(&mut ws, json!({"action":"auth","params":"k"})).await;
    assert_eq!(next_json(&mut ws).await[0]["status"], "auth_success");
    let symbols: Vec<String> = (0..10).map(|i| format!("XQ.S{i}-USD")).collect();
    send(&mut ws, json!({"action":"subscribe","params": symbols.join(",")})).await;
    // Stop reading while the server keeps producing about 10,000 events a second.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the server kept a reader that did not read");
    sim.stop().await.unwrap();
}

/// Every captured tick's natural key as a string, per feed and kind, with its timestamp.
fn tick_keys(captured: &[Event]) -> Vec<(i64, String)> {
    captured
        .iter()
        .filter(|e| !matches!(e.body, Body::Bar(_)))
        .map(|e| (e.ts_ms(), e.natural_key().to_string()))
        .collect()
}

#[tokio::test]
async fn ticks_whose_timestamps_go_back_and_repeat_each_keep_their_own_key_on_two_appliances() {
    // Each tick at an even millisecond is followed by another exchange's, stamped with
    // the time of the symbol's tick before it.
    let faults = Faults {
        interleave_every: 2,
        ..Faults::default()
    };
    let sim = sim::spawn(
        any_port(),
        SimOptions {
            quotes_per_minute: 3000,
            faults,
            always_open: true,
            ..SimOptions::default()
        },
    )
    .await
    .unwrap();
    // Two appliances on one feed (two keys: one key's second connection evicts the first).
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (wal_a, wal_b) = (Wal::open(dir_a.path()).unwrap(), Wal::open(dir_b.path()).unwrap());
    let appliance = |key: &str| {
        let mut both = Vec::new();
        for (feed, symbol, channels) in [
            (Feed::Crypto, "BTC-USD", &["XQ", "XT"][..]),
            (Feed::Forex, "EUR/USD", &["C"][..]),
        ] {
            let mut s = spec(&sim, feed, &[symbol], channels);
            s.api_key = Secret::new(key);
            both.push(s);
        }
        both
    };
    let [a_crypto, a_forex]: [LiveSpec; 2] = appliance("key-a").try_into().unwrap();
    let [b_crypto, b_forex]: [LiveSpec; 2] = appliance("key-b").try_into().unwrap();
    let how_long = Duration::from_secs(3);
    tokio::join!(
        capture_for(a_crypto, &wal_a, how_long),
        capture_for(a_forex, &wal_a, how_long),
        capture_for(b_crypto, &wal_b, how_long),
        capture_for(b_forex, &wal_b, how_long),
    );
    let (a, b) = (tick_keys(&events(&wal_a)), tick_keys(&events(&wal_b)));
    // The feed went back in time and repeated timestamps...
    assert!(a.windows(2).any(|w| w[1].0 < w[0].0), "no timestamp went back");
    // ...and still no two captured ticks share a key.
    for keys in [&a, &b] {
        let distinct: HashSet<&String> = keys.iter().map(|(_, k)| k).collect();
        assert_eq!(distinct.len(), keys.len(), "ticks shared a key");
    }
    // Where both appliances were connected, they gave every tick the same key.
    let span = |keys: &[(i64, String)]| {
        (
            keys.iter().map(|k| k.0).min().unwrap(),
            keys.iter().map(|k| k.0).max().unwrap(),
        )
    };
    let ((a_from, a_to), (b_from, b_to)) = (span(&a), span(&b));
    let (from, to) = (a_from.max(b_from) + 500, a_to.min(b_to) - 500);
    let within = |keys: &[(i64, String)]| -> BTreeSet<String> {
        keys.iter()
            .filter(|(ts, _)| (from..=to).contains(ts))
            .map(|(_, k)| k.clone())
            .collect()
    };
    let (in_a, in_b) = (within(&a), within(&b));
    assert!(in_a.len() > 50, "overlap too short: {}", in_a.len());
    assert_eq!(in_a, in_b);
    wal_a.shutdown().await.unwrap();
    wal_b.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

/// A fake Polygon: each connection in turn gets the next script's frames after its
/// subscribe, then is closed (or, with `None` left, held open).
async fn scripted_server(scripts: Vec<Vec<Value>>) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        for frames in scripts {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(tcp).await.unwrap();
            let status = |s: &str| json!([{"ev":"status","status":s,"message":s}]).to_string();
            ws.send(Message::text(status("connected"))).await.unwrap();
            // auth, then subscribe
            let _ = ws.next().await;
            ws.send(Message::text(status("auth_success"))).await.unwrap();
            let _ = ws.next().await;
            for frame in frames {
                ws.send(Message::text(frame.to_string())).await.unwrap();
            }
            let _ = ws.close(None).await;
        }
        // Later connections are refused.
        drop(listener);
    });
    (url, task)
}

fn quote(ts: i64) -> Value {
    json!({"ev":"C","p":"EUR/USD","x":48,"a":1.1,"b":1.0,"t":ts})
}

#[tokio::test]
async fn events_in_the_frame_of_a_disconnect_status_are_captured() {
    const T: i64 = 1_700_000_000_000;
    let frame =
        json!([quote(T + 1), quote(T + 2), {"ev":"status","status":"force_disconnect","message":"bye"}, quote(T + 3)]);
    let (url, server) = scripted_server(vec![vec![frame]]).await;
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let mut s = spec_at(&url);
    s.reconnect_min = Duration::from_secs(5);
    capture_for(s, &wal, Duration::from_millis(800)).await;
    let times: Vec<i64> = events(&wal).iter().map(Event::ts_ms).collect();
    assert_eq!(times, vec![T + 1, T + 2, T + 3]);
    server.abort();
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn events_sent_with_the_simulators_force_disconnect_status_are_captured() {
    let faults = Faults {
        kick_every: Some(Duration::from_millis(700)),
        ..Faults::default()
    };
    let options = SimOptions {
        quotes_per_minute: 30_000,
        faults,
        seed: 5,
        always_open: true,
        ..SimOptions::default()
    };
    let sim = sim::spawn(any_port(), options).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let stats = capture_for(
        spec(&sim, Feed::Crypto, &["BTC-USD"], &["XQ"]),
        &wal,
        Duration::from_millis(4000),
    )
    .await;
    assert!(stats.disconnects.load(Ordering::Relaxed) >= 2, "{stats:?}");
    let kicked: Vec<i64> = sim.kicked().iter().filter_map(|e| e["t"].as_i64()).collect();
    assert!(kicked.len() >= 4, "the status frames held too few events: {kicked:?}");
    let have: HashSet<i64> = events(&wal).iter().map(Event::ts_ms).collect();
    let lost: Vec<i64> = kicked.iter().copied().filter(|t| !have.contains(t)).collect();
    assert!(lost.is_empty(), "events of a status frame were dropped: {lost:?}");
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

fn spec_at(url: &str) -> LiveSpec {
    LiveSpec {
        feed: Feed::Forex,
        ws_url: url.to_owned(),
        api_key: Secret::new("test-key"),
        symbols: vec!["EUR/USD".into()],
        channels: vec!["C".into(), "CA".into()],
        stale_after: Duration::from_secs(5),
        reconnect_min: Duration::from_millis(20),
        reconnect_max: Duration::from_millis(100),
    }
}

#[tokio::test]
async fn a_gap_ending_in_a_bar_covers_what_was_missed_and_two_gaps_from_one_event_are_two_records() {
    const MINUTE: i64 = 1_700_000_040_000;
    // A tick just before a minute ends; then, after each of two drops, only the bar of
    // that minute (stamped with its start, before the tick).
    let bar =
        json!([{"ev":"CA","pair":"EUR/USD","o":1.0,"c":1.0,"h":1.0,"l":1.0,"v":3,"s":MINUTE,"e":MINUTE + 60_000}]);
    let (url, server) = scripted_server(vec![
        vec![json!([quote(MINUTE + 59_900)])],
        vec![bar.clone()],
        vec![bar],
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    capture_for(spec_at(&url), &wal, Duration::from_millis(1_500)).await;
    let gaps = gaps::suspected(wal.reader()).unwrap();
    assert!(gaps.len() >= 2, "{gaps:?}");
    for gap in &gaps {
        assert!(gap.to_ms >= gap.from_ms, "inverted: {gap:?}");
    }
    server.abort();
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn two_collectors_on_one_key_back_off_instead_of_evicting_each_other_at_full_speed() {
    let sim = sim::spawn(
        any_port(),
        SimOptions {
            always_open: true,
            ..SimOptions::default()
        },
    )
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let one_key = || {
        let mut s = spec(&sim, Feed::Crypto, &["BTC-USD"], &["XT"]);
        s.reconnect_min = Duration::from_millis(50);
        s.reconnect_max = Duration::from_secs(2);
        s
    };
    let (a, b) = tokio::join!(
        capture_for(one_key(), &wal, Duration::from_secs(8)),
        capture_for(one_key(), &wal, Duration::from_secs(8)),
    );
    let evictions = a.evictions.load(Ordering::Relaxed) + b.evictions.load(Ordering::Relaxed);
    let drops = a.disconnects.load(Ordering::Relaxed) + b.disconnects.load(Ordering::Relaxed);
    assert!(evictions >= 1, "the second connection never evicted the first");
    // Each eviction waits at least reconnect_max (2 s) before taking the feed back.
    assert!(drops <= 10, "{drops} reconnects in 8 s");
    wal.shutdown().await.unwrap();
    sim.stop().await.unwrap();
}

#[tokio::test]
async fn a_message_over_the_size_limit_ends_the_connection_and_leaves_a_gap() {
    const T: i64 = 1_700_000_000_000;
    // One quote, then a frame past the limit (its quotes padded out by a long field).
    let pad = "x".repeat(live::MAX_MESSAGE_BYTES);
    let huge = json!([{"ev":"C","p":"EUR/USD","x":48,"a":1.1,"b":1.0,"t":T + 2,"pad":pad}]);
    let (url, server) = scripted_server(vec![vec![json!([quote(T + 1)]), huge]]).await;
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let mut s = spec_at(&url);
    s.reconnect_min = Duration::from_secs(5);
    let stats = capture_for(s, &wal, Duration::from_millis(1_500)).await;
    assert_eq!(events(&wal).iter().map(Event::ts_ms).collect::<Vec<_>>(), vec![T + 1]);
    assert!(stats.disconnects.load(Ordering::Relaxed) >= 1, "{stats:?}");
    assert!(
        !gaps::suspected(wal.reader()).unwrap().is_empty(),
        "no gap for the lost frame"
    );
    server.abort();
    wal.shutdown().await.unwrap();
}
