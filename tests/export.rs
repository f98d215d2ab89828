//! `tickvault export` read back by readers independent of it (pyarrow, Python's csv and
//! json, through tests/export_check.py), against `tickvault wal dump` of the same log.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::sinks::wait_for;

const CONFIG: &str = r#"
[live]
reconnect_min = "100ms"
[live.forex]
symbols = ["EUR/USD", "USD/JPY"]
channels = ["C", "CA"]
[live.crypto]
symbols = ["BTC-USD", "ETH-USD"]
channels = ["XQ", "XT", "XA"]
[backfill]
forex = ["EUR/USD"]
crypto = ["BTC-USD"]
lookback = "3days"
chunk = "1day"
"#;

fn export(log: &Path, out: &Path, format: &str, more: &[&str]) -> String {
    let output = common::tickvault()
        .args(["export", "--data-dir", log.to_str().unwrap(), "--format", format])
        .args(["--out", out.to_str().unwrap()])
        .args(more)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "export {format}: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// Every lane's `wal dump`, in one file.
fn dump(log: &Path, to: &Path) {
    let mut all = Vec::new();
    for lane in ["live", "backfill", "derived"] {
        let out = common::tickvault()
            .args(["wal", "dump", "--data-dir", log.to_str().unwrap(), "--lane", lane])
            .output()
            .unwrap();
        assert!(out.status.success());
        all.extend(out.stdout);
    }
    std::fs::write(to, all).unwrap();
}

/// tests/export_check.py's verdict: (success, what it printed).
fn check(dump: &Path, dir: &Path, format: &str, more: &[&str]) -> (bool, String) {
    let out = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/export_check.py"))
        .args([dump, dir])
        .arg(format)
        .args(more)
        .output()
        .expect("python3 with pyarrow (scripts/install-deps.sh --test installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn summary(log: &Path) -> serde_json::Value {
    let out = common::tickvault()
        .args(["wal", "summary", "--json", "--data-dir", log.to_str().unwrap()])
        .output()
        .unwrap();
    // Null until the daemon has made the log.
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

fn records(summary: &serde_json::Value, lane: &str) -> u64 {
    summary["lanes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|l| l["lane"] == lane)
        .map_or(0, |l| l["records"].as_u64().unwrap())
}

#[test]
fn parquet_csv_and_jsonl_hold_exactly_the_logs_events_field_by_field() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let config = dir.path().join("c.toml");
    std::fs::write(&config, CONFIG).unwrap();
    // Interleaved and repeated timestamps, and bars with holes, as the real feed has.
    let (_sim, addr) = common::simulator(&[
        "--always-open",
        "--quotes-per-minute",
        "1200",
        "--faults",
        "interleave=5",
    ]);
    let mut daemon = common::Child(common::run_command(&config, &log, &addr, "k").spawn().unwrap());

    // While the daemon appends: an export is a prefix of each lane, whatever moment it
    // opened the log at.
    wait_for("live events and backfill bars", Duration::from_secs(60), || {
        let s = summary(&log);
        records(&s, "live") > 200 && records(&s, "backfill") > 1000
    });
    let during = dir.path().join("during");
    export(&log, &during, "jsonl", &[]);
    let live_then = records(&summary(&log), "live");
    wait_for("the backfill's 3 days", Duration::from_secs(60), || {
        let s = summary(&log);
        records(&s, "backfill") >= 2 * 3 * 1440 - 200 && records(&s, "live") > live_then + 100
    });
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    assert!(daemon.0.wait().unwrap().success());

    let dumped = dir.path().join("dump.jsonl");
    dump(&log, &dumped);
    let (ok, text) = check(&dumped, &during, "jsonl", &["--prefix"]);
    assert!(ok, "the export taken while the daemon ran: {text}");
    eprint!("during the run: {text}");

    for format in ["parquet", "csv", "jsonl"] {
        let out = dir.path().join(format);
        let printed = export(&log, &out, format, &[]);
        for kind in ["quote", "trade", "bar"] {
            assert!(printed.contains(&format!("{kind}.{format}")), "{printed}");
        }
        let (ok, text) = check(&dumped, &out, format, &[]);
        assert!(ok, "{format}: {text}");
        eprint!("{text}");
    }

    // The filters: one symbol's bars over one day.
    let (from, to) = (
        jiff::Timestamp::now() - jiff::SignedDuration::from_hours(48),
        jiff::Timestamp::now() - jiff::SignedDuration::from_hours(24),
    );
    let (from_text, to_text) = (from.to_string(), to.to_string());
    let filtered = dir.path().join("filtered");
    export(
        &log,
        &filtered,
        "parquet",
        &[
            "--kind", "bar", "--symbol", "C:EURUSD", "--from", &from_text, "--to", &to_text, "--lane", "backfill",
        ],
    );
    let (from_ms, to_ms) = (from.as_millisecond().to_string(), to.as_millisecond().to_string());
    let (ok, text) = check(
        &dumped,
        &filtered,
        "parquet",
        &[
            "--kind", "bar", "--symbol", "EUR/USD", "--from", &from_ms, "--to", &to_ms,
        ],
    );
    assert!(ok, "filtered: {text}");
    assert!(text.contains("1 files"), "{text}");

    // The check can fail: one price changed in the CSV is named.
    let csv = dir.path().join("csv/quote.csv");
    let body = std::fs::read_to_string(&csv).unwrap();
    let mut lines: Vec<String> = body.lines().map(str::to_owned).collect();
    let mut fields: Vec<String> = lines[1].split(',').map(str::to_owned).collect();
    fields[6] = format!("{}1", fields[6]);
    lines[1] = fields.join(",");
    std::fs::write(&csv, lines.join("\n") + "\n").unwrap();
    let (ok, text) = check(&dumped, &dir.path().join("csv"), "csv", &[]);
    assert!(!ok && text.contains("bid: exported"), "{text}");
}

#[test]
fn bad_arguments_exit_2_and_a_missing_log_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    for (args, says) in [
        (vec!["--format", "xml"], "invalid value 'xml'"),
        (vec!["--format", "csv", "--from", "yesterday"], "neither a date"),
        (vec!["--format", "csv", "--symbol", "not a symbol"], "--symbol"),
        (vec!["--format", "csv", "--kind", "tick"], "invalid value 'tick'"),
    ] {
        let output = common::tickvault()
            .args(["export", "--data-dir"])
            .arg(dir.path().join("log"))
            .arg("--out")
            .arg(&out)
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let output = common::tickvault()
        .args(["export", "--format", "csv", "--data-dir"])
        .arg(dir.path().join("log"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("log"));
}
