//! The derived lane written by the daemon: SIGKILLed in the middle and restarted, it
//! equals the lane `tickvault aggregate --check` makes again from the journal, record
//! for record, on the log and on a copy of it; a record removed is found.

mod common;

use std::path::Path;
use std::time::Duration;

use common::sinks::{wait_for, Daemon};
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
