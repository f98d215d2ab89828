//! The derived lane written by the daemon: SIGKILLed in the middle and restarted, it
//! equals the lane `tickvault aggregate --check` makes again from the journal, record
//! for record, on the log and on a copy of it; a record removed is found. Forwarded to
//! every sink, `verify` holds each to the versions it must keep.

mod common;

use std::path::Path;
use std::time::Duration;

use common::sinks::{caught_up_in, clickhouse, postgres, rt, verify, wait_for, write_config, Daemon, Target};
use tickvault_wal::{Lane, Wal};

fn derived_records(log: &Path) -> u64 {
    Wal::open_read_only(log)
        .ok()
        .and_then(|r| r.last_seq(Lane::Derived).ok().flatten())
        .unwrap_or(0)
}

fn check(config: &Path, log: &Path) -> (Option<i32>, serde_json::Value, String) {
    common::json_output(
        common::tickvault()
            .args(["aggregate", "--check", "--json", "--config"])
            .arg(config)
            .arg("--data-dir")
            .arg(log),
    )
}

#[test]
fn a_killed_aggregator_resumes_and_its_lane_equals_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let (_sim, addr) = common::simulator(&["--always-open", "--faults", "holes=97,interleave=7,disconnect=20s"]);
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[live]\nreconnect_min = \"100ms\"\n[live.crypto]\nsymbols = [\"BTC-USD\", \"ETH-USD\"]\n\
         channels = [\"XQ\", \"XT\", \"XA\"]\n[backfill]\nforex = [\"EUR/USD\", \"GBP/USD\"]\n\
         crypto = [\"BTC-USD\"]\nlookback = \"4days\"\nchunk = \"1day\"\n[calendar]\nforex = \"always\"\n\
         [aggregate]\ninterval = \"200ms\"\n",
    )
    .unwrap();
    let log = dir.path().join("log");
    let stderr = dir.path().join("daemon.stderr");
    // Killed twice, each time once the aggregator has appended: in the first run while
    // the backfill pours in, in the second when a live minute closes.
    for _ in 0..2 {
        let daemon = Daemon::start(&config, &log, &addr, &stderr);
        let before = derived_records(&log);
        wait_for("derived bars", Duration::from_secs(120), || {
            derived_records(&log) > before
        });
        daemon.kill();
    }
    let daemon = Daemon::start(&config, &log, &addr, &stderr);
    daemon.wait_for_backfill(Duration::from_secs(120));
    std::thread::sleep(Duration::from_secs(3));
    let said = daemon.stop();
    assert!(
        said.matches("aggregator resumed from its journal").count() >= 3,
        "{said}"
    );

    let (code, report, stderr) = check(&config, &log);
    assert_eq!(code, Some(0), "{report:#} {stderr}");
    assert_eq!(report["identical"], true);
    let records = report["records"].as_u64().unwrap();
    assert_eq!(records, derived_records(&log));
    assert!(records > 3 * 4 * 1_440, "{report:#}");

    // The same on a copy, and a copy with one record gone is told apart.
    let copy = dir.path().join("copy");
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(&log)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    let (code, again, _) = check(&config, &copy);
    assert_eq!((code, &again["records"]), (Some(0), &report["records"]));
    tickvault_wal::delete_record_for_test(&copy, Lane::Derived, records / 2).unwrap();
    let (code, broken, _) = check(&config, &copy);
    assert_eq!(code, Some(1), "{broken:#}");
    assert_eq!(broken["difference"]["seq"], records / 2, "{broken:#}");
}

#[test]
fn bad_timeframes_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    for (timeframes, says) in [
        ("[\"1s\"]", "at least 1m"),
        ("[\"2d\"]", "1d"),
        ("[\"5m\", \"5m\"]", "twice"),
        ("[\"fortnight\"]", "bad timeframe"),
    ] {
        let config = dir.path().join("c.toml");
        std::fs::write(&config, format!("[aggregate]\ntimeframes = {timeframes}\n")).unwrap();
        let out = common::tickvault()
            .arg("validate")
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{timeframes}: {stderr}");
        assert!(
            stderr.contains("aggregate.timeframes") && stderr.contains(says),
            "{timeframes}: {stderr}"
        );
    }
}

/// A log of derived bars only, as the aggregator writes them: bar 0 in versions 1 to 3,
/// bar 1 in 1 and 2, bar 2 in 1. Returns the bars' start times.
fn revised_bars(log: &Path) -> [i64; 3] {
    use tickvault::event::{Bar, Body, Capture, Derived, Event, Feed, TimeUnit, Timeframe, EVENT_KIND};
    let starts = [0, 1, 2].map(|i| 1_764_000_000_000 + i * 300_000);
    let mut batch = tickvault_wal::Batch::with_capacity(6, 1_024);
    for (bar, version) in [(0, 1), (1, 1), (0, 2), (2, 1), (0, 3), (1, 2)] {
        let event = Event {
            capture: Capture {
                feed: Feed::Crypto,
                lane: Lane::Derived,
                captured_at_ns: 1,
            },
            body: Body::Derived(Box::new(Derived {
                bar: Bar {
                    symbol: "BTC-USD".into(),
                    timeframe: Timeframe {
                        multiplier: 5,
                        unit: TimeUnit::Minute,
                    },
                    start_ms: starts[bar],
                    open: 1.0,
                    high: 2.0,
                    low: 0.5,
                    close: f64::from(version),
                    volume: 3.0,
                    vwap: None,
                    trades: None,
                },
                version,
                indicators: Default::default(),
            })),
        };
        batch.push(EVENT_KIND, &event.to_payload().unwrap()).unwrap();
    }
    rt().block_on(async {
        let wal = Wal::open(log).unwrap();
        wal.append(Lane::Derived, batch).await.unwrap();
    });
    starts
}

/// The differences `verify` reports for `sink`, as (kind, missing, extra, example uids).
fn differences(report: &serde_json::Value, sink: &str) -> Vec<(String, u64, u64, Vec<u64>)> {
    common::sinks::sink_report(report, sink)["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap().to_owned(),
                d["missing"].as_u64().unwrap(),
                d["extra"].as_u64().unwrap(),
                d["examples"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|e| e["uid"].as_u64().unwrap())
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn every_sink_holds_the_derived_versions_it_must_and_verify_tells_when_not() {
    let target = Target::new("derived_sinks");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let starts = revised_bars(&log);
    // Forwarding only: nothing captured, nothing aggregated.
    let config = write_config(
        &dir.path().join("c.toml"),
        "[live]\nenabled = false\n[backfill]\nenabled = false\n[aggregate]\nenabled = false\n",
        &target,
        4222,
    );
    let daemon = Daemon::start(&config, &log, "127.0.0.1:9", &dir.path().join("daemon.stderr"));
    wait_for("the derived lane in every sink", Duration::from_secs(60), || {
        caught_up_in(&log, &[Lane::Derived])
    });
    daemon.stop();
    let (code, report) = verify(&config, &log);
    assert_eq!(code, 0, "{report:#}");

    // ClickHouse and PostgreSQL: each bar once, at its highest version; JetStream: all six.
    let versions = |rows: Vec<(i64, u32)>| rows.into_iter().map(|(_, v)| v).collect::<Vec<_>>();
    #[derive(serde::Deserialize, clickhouse::Row)]
    struct Version {
        ts_ms: i64,
        version: u32,
    }
    let (ch, pg) = rt().block_on(async {
        let ch: Vec<(i64, u32)> = clickhouse()
            .query(&format!(
                "SELECT ts_ms, version FROM {}.events_derived FINAL ORDER BY ts_ms",
                target.name
            ))
            .fetch_all::<Version>()
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.ts_ms, r.version))
            .collect();
        let pg: Vec<(i64, u32)> = postgres(&target.name)
            .await
            .query("SELECT ts_ms, version FROM events_derived ORDER BY ts_ms", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<_, i64>(0), r.get::<_, i32>(1) as u32))
            .collect();
        (ch, pg)
    });
    assert_eq!(versions(ch), [3, 2, 1]);
    assert_eq!(versions(pg), [3, 2, 1]);
    let mut nats = target.nats_derived_keys(4222);
    nats.sort();
    assert_eq!(nats.len(), 6, "{nats:?}");
    assert!(nats.iter().all(|k| k.contains(":derived:5m:")), "{nats:?}");

    // An older version in the newest one's place, and a version the log never had.
    rt().block_on(async {
        postgres(&target.name)
            .await
            .execute("UPDATE events_derived SET version = 2 WHERE ts_ms = $1", &[&starts[0]])
            .await
            .unwrap();
        clickhouse()
            .query(&format!(
                "INSERT INTO {0}.events_derived SELECT feed, symbol, timeframe, ts_ms, uid, seq, lane, \
                 captured_at_ns, toUInt32(9), open, high, low, close, volume, vwap, trades, sma20, ema20, \
                 rsi14, macd, macd_signal, macd_hist, bb_upper, bb_middle, bb_lower, atr14 \
                 FROM {0}.events_derived FINAL WHERE ts_ms = {1}",
                target.name, starts[1]
            ))
            .execute()
            .await
            .unwrap();
    });
    let (code, report) = verify(&config, &log);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(
        differences(&report, "postgres"),
        [("derived".to_owned(), 1, 0, vec![3])],
        "{report:#}"
    );
    assert_eq!(
        differences(&report, "clickhouse"),
        [("derived".to_owned(), 1, 1, vec![2, 9])],
        "{report:#}"
    );
    assert_eq!(differences(&report, "nats"), [], "{report:#}");
}
