//! `tickvault drill`, as an operator runs it: with the three real sinks, and its
//! negative control (a record deleted on purpose must be named as lost).

mod common;

use common::sinks::{Target, PG_PASSWORD};

const BODY: &str = r#"
[live.forex]
symbols = ["EUR/USD", "USD/JPY"]
channels = ["C", "CA"]
[live.crypto]
symbols = ["BTC-USD"]
channels = ["XQ", "XT", "XA"]
[backfill]
forex = ["EUR/USD"]
crypto = ["BTC-USD"]
lookback = "20days"
"#;

fn drill(config: &std::path::Path, more: &[&str]) -> (Option<i32>, String, String) {
    let out = common::tickvault()
        .args(["drill", "--config", config.to_str().unwrap()])
        .args(more)
        .env("TICKVAULT_POSTGRES_PASSWORD", PG_PASSWORD)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn five_cycles_with_all_three_sinks_lose_nothing_and_duplicate_nothing() {
    let target = Target::new("drill");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, format!("{BODY}\n{}", target.sinks_toml(4222))).unwrap();
    let (code, stdout, stderr) = drill(&config, &["--cycles", "5", "--seed", "42", "--json"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    eprintln!("{report:#}");
    assert_eq!(report["lost"], 0);
    assert_eq!(report["duplicated"], 0);
    assert_eq!(report["passed"], true);
    let kills: u64 = report["kills"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(kills, 5);
    assert_eq!(report["recovery_ms"].as_array().unwrap().len(), 5);
    assert!(report["live_required"].as_u64().unwrap() > 100, "{report:#}");
    assert!(
        report["backfill_bars_required"].as_u64().unwrap() > 20_000,
        "{report:#}"
    );
    for sink in ["clickhouse", "postgres", "nats"] {
        assert_eq!(report["sinks_match"][sink], true, "{report:#}");
    }
}

#[test]
fn a_drill_whose_log_lost_one_acknowledged_record_fails_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, BODY).unwrap();
    let log = dir.path().join("drill");
    let (code, stdout, stderr) = drill(
        &config,
        &[
            "--cycles",
            "2",
            "--seed",
            "7",
            "--sabotage",
            "--data-dir",
            log.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let deleted = stderr
        .lines()
        .find_map(|l| l.strip_prefix("sabotage: deleted "))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(stdout.contains("lost        1\n"), "{stdout}");
    assert!(
        stdout.contains("    lost backfill forex:EUR/USD:bar:1m:")
            || stdout.contains("    lost backfill crypto:BTC-USD:bar:1m:"),
        "{stdout}"
    );
    assert!(stdout.contains("FAILED"), "{stdout}");
    eprintln!("deleted {deleted}; {stdout}");
    // The failed drill keeps its log for a look.
    assert!(log.join("log").exists());
}

#[test]
fn a_data_dir_that_holds_something_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    std::fs::write(&config, BODY).unwrap();
    std::fs::write(dir.path().join("something"), "x").unwrap();
    let (code, _, stderr) = drill(&config, &["--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("must be missing or empty"), "{stderr}");
}
