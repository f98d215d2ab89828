//! `tickvault replay` against the real servers of `scripts/services.sh up`: a log copied,
//! its sinks emptied, replayed one sink at a time, then again; and a sink that is down.

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::sinks::{caught_up, wait_for, write_config, write_config_at, Daemon, Ports, Target, PG_PASSWORD};
use tickvault::sim::relay::Relay as Proxy;

const BODY: &str = r#"
[live]
reconnect_min = "100ms"
[live.crypto]
symbols = ["BTC-USD", "ETH-USD"]
channels = ["XQ", "XT", "XA"]
[backfill]
forex = ["EUR/USD"]
lookback = "2days"
chunk = "1day"
"#;

fn replay(config: &Path, log: &Path, sink: &str, more: &[&str]) -> Output {
    common::tickvault()
        .args([
            "replay",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            log.to_str().unwrap(),
        ])
        .args(["--sink", sink])
        .args(more)
        .env("TICKVAULT_POSTGRES_PASSWORD", PG_PASSWORD)
        .output()
        .unwrap()
}

fn live_records(log: &Path) -> u64 {
    tickvault_wal::Wal::open_read_only(log)
        .ok()
        .and_then(|r| r.last_seq(tickvault_wal::Lane::Live).ok().flatten())
        .unwrap_or(0)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_copied_log_replayed_into_emptied_sinks_matches_and_a_second_replay_adds_nothing() {
    let target = Target::new("replay");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let (_sim, addr) = common::simulator(&[
        "--always-open",
        "--quotes-per-minute",
        "1200",
        "--faults",
        "interleave=5",
    ]);
    let config = write_config(&dir.path().join("c.toml"), BODY, &target, 4222);
    let daemon = Daemon::start(&config, &log, &addr, &dir.path().join("daemon.stderr"));
    daemon.wait_for_backfill(Duration::from_secs(60));
    wait_for("live events", Duration::from_secs(60), || live_records(&log) > 300);
    wait_for("the sinks to catch up", Duration::from_secs(180), || caught_up(&log));
    daemon.stop();

    // A copy of the log, as taken to another box; the sinks emptied.
    let copy = dir.path().join("copy");
    assert!(std::process::Command::new("cp")
        .arg("-a")
        .arg(&log)
        .arg(&copy)
        .status()
        .unwrap()
        .success());
    target.drop_all().unwrap();

    for sink in ["clickhouse", "postgres", "nats"] {
        let out = replay(&config, &copy, sink, &[]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(0), "{sink}: {said}");
        assert!(said.contains(&format!("verify {sink}: MATCH")), "{sink}: {said}");
        eprint!("{said}");
    }
    // Again: each key still once (verify counts duplicates), and JetStream is sent nothing.
    for sink in ["clickhouse", "postgres", "nats"] {
        let out = replay(&config, &copy, sink, &[]);
        let said = text(&out);
        assert_eq!(out.status.code(), Some(0), "{sink} again: {said}");
        assert!(said.contains(&format!("verify {sink}: MATCH")), "{sink} again: {said}");
        if sink == "nats" {
            assert!(
                said.contains("nats live     0 rows sent") && said.contains("nats backfill 0 rows sent"),
                "{said}"
            );
        }
    }
    // The whole log against every sink, as the daemon's verify sees it.
    let (code, report) = common::sinks::verify(&config, &copy);
    assert_eq!(code, 0, "{report:#}");

    // A range of one lane: its events in the sink, and nothing else asked of it.
    target.drop_all().unwrap();
    let from = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(30)).to_string();
    let to = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(20)).to_string();
    let out = replay(
        &config,
        &copy,
        "postgres",
        &["--lane", "backfill", "--from", &from, "--to", &to],
    );
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("verify postgres: MATCH: 600 keys replayed"), "{said}");
}

#[test]
fn a_replay_into_a_sink_that_is_down_fails_naming_it_and_succeeds_when_run_again() {
    let target = Target::new("replay_down");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let (_sim, addr) = common::simulator(&["--always-open"]);
    // The daemon forwards to nothing: the log is made, the sinks stay empty.
    let config = dir.path().join("capture.toml");
    std::fs::write(&config, BODY).unwrap();
    let daemon = Daemon::start(&config, &log, &addr, &dir.path().join("daemon.stderr"));
    daemon.wait_for_backfill(Duration::from_secs(60));
    daemon.stop();

    let relay = Proxy::start(Ports::SHARED.postgres).unwrap();
    let ports = Ports {
        postgres: relay.port,
        ..Ports::SHARED
    };
    let config = write_config_at(&dir.path().join("c.toml"), BODY, &target, ports);
    relay.cut();
    let out = replay(&config, &log, "postgres", &["--give-up-after", "2s"]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(1), "{said}");
    assert!(said.contains("sink postgres failed"), "{said}");

    relay.restore();
    let out = replay(&config, &log, "postgres", &[]);
    let said = text(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(said.contains("verify postgres: MATCH"), "{said}");
}
