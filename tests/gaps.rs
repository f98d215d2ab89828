//! `tickvault gaps` against logs the daemon wrote from the simulator: source holes told
//! from gaps, a range the backfill never fetched named as open gaps, and the coverage
//! index made again from the log by `--rebuild`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::sinks::Daemon;

/// The simulator's `holes=N`: about one minute in N of a symbol has no bar at the source.
const HOLE_EVERY: u32 = 97;

fn config(dir: &Path, lookback: &str) -> std::path::PathBuf {
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[live]\nenabled = false\n[backfill]\nforex = [\"EUR/USD\"]\ncrypto = [\"BTC-USD\"]\nlookback = \"{lookback}\"\nchunk = \"1day\"\n\
             [gaps]\nlookback = \"{lookback}\"\n[calendar]\nforex = \"always\"\n"
        ),
    )
    .unwrap();
    path
}

fn gaps(config: &Path, log: &Path, more: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let out = common::tickvault()
        .args([
            "gaps",
            "--json",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            log.to_str().unwrap(),
        ])
        .args(more)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| panic!("{stderr}"));
    (out.status.code(), json, stderr)
}

fn symbol<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["symbols"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["symbol"] == name)
        .unwrap_or_else(|| panic!("{name} in {report:#}"))
}

/// A log with two days of EUR/USD and BTC-USD bars from a simulator with holes.
fn captured(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let (_sim, addr) = common::simulator(&["--always-open", "--faults", &format!("holes={HOLE_EVERY}")]);
    let log = dir.join("log");
    let config = config(dir, "2days");
    let daemon = Daemon::start(&config, &log, &addr, &dir.join("daemon.stderr"));
    daemon.wait_for_backfill(Duration::from_secs(60));
    daemon.stop();
    (config, log)
}

#[test]
fn source_holes_are_marked_as_such_and_a_complete_download_has_no_open_gap() {
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = captured(dir.path());
    let (code, report, stderr) = gaps(&config, &log, &[]);
    assert_eq!(code, Some(0), "{report:#} {stderr}");
    assert_eq!(report["open_gaps"], 0);
    for name in ["EUR/USD", "BTC-USD"] {
        let s = symbol(&report, name);
        let (market, covered, holes) = (
            s["market_minutes"].as_u64().unwrap(),
            s["covered"].as_u64().unwrap(),
            s["source_holes"].as_u64().unwrap(),
        );
        assert_eq!(covered + holes, market, "{s:#}");
        // Exactly the minutes the simulator's market leaves out.
        let sim = tickvault::sim::Market::new(1, 120, HOLE_EVERY);
        let (from, to) = (s["from_ms"].as_i64().unwrap(), s["to_ms"].as_i64().unwrap());
        let expected = (from..to).step_by(60_000).filter(|m| sim.is_hole(name, *m)).count() as u64;
        assert_eq!(holes, expected, "{s:#}");
        assert!(holes > 10, "{s:#}");
    }
}

#[test]
fn minutes_the_backfill_never_fetched_are_open_gaps_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = captured(dir.path());
    // Four days back, where the two-day backfill never went.
    let since = (jiff::Timestamp::now() - jiff::SignedDuration::from_hours(96)).to_string();
    let (code, report, _) = gaps(&config, &log, &["--since", &since, "--symbol", "C:EURUSD"]);
    assert_eq!(code, Some(1), "{report:#}");
    let s = symbol(&report, "EUR/USD");
    assert_eq!(report["symbols"].as_array().unwrap().len(), 1);
    let gaps = s["gaps"].as_array().unwrap();
    assert_eq!(gaps.len(), 1, "{s:#}");
    let minutes = gaps[0]["minutes"].as_u64().unwrap();
    assert!((2 * 1440 - 5..=2 * 1440 + 5).contains(&minutes), "{s:#}");
    assert_eq!(gaps[0]["why"], "no bar");
    // The text form says so too.
    let out = common::tickvault()
        .args([
            "gaps",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            log.to_str().unwrap(),
        ])
        .args(["--since", &since])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text.contains("forex   EUR/USD    1m:") && text.contains("1 open gaps") && text.contains("open gaps: exit 1"),
        "{text}"
    );
}

#[test]
fn a_lost_coverage_index_is_rebuilt_from_the_log_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = captured(dir.path());
    let (_, before, _) = gaps(&config, &log, &[]);
    tickvault_wal::clear_space_for_test(&log, tickvault_wal::Space::Coverage).unwrap();
    let (code, lost, _) = gaps(&config, &log, &[]);
    assert_eq!(code, Some(1), "an empty index: every minute is a gap");
    assert_eq!(symbol(&lost, "EUR/USD")["covered"], 0);
    let (code, rebuilt, stderr) = gaps(&config, &log, &["--rebuild"]);
    assert_eq!(code, Some(0), "{rebuilt:#} {stderr}");
    assert!(stderr.contains("coverage index rebuilt"), "{stderr}");
    for name in ["EUR/USD", "BTC-USD"] {
        let (a, b) = (symbol(&before, name), symbol(&rebuilt, name));
        for field in ["covered", "source_holes"] {
            assert_eq!(a[field], b[field], "{name} {field}");
        }
    }
}

#[test]
fn bad_arguments_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "2days");
    for (args, says) in [
        (vec!["--symbol", "GBP/USD"], "captures no minute bars of it"),
        (vec!["--symbol", "not a symbol"], "not a symbol"),
        (vec!["--since", "last week"], "neither a date"),
    ] {
        let out = common::tickvault()
            .args(["gaps", "--config", config.to_str().unwrap()])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}
