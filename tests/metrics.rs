//! `/metrics`, `/healthz` and `/readyz` of a real daemon against the simulator and the
//! three real sinks, read with a real Prometheus parser (Python's `prometheus_client`,
//! its OpenMetrics parser, which refuses what Prometheus would).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tickvault_wal::{Lane, Wal};

mod common;

use common::simulator;
use common::sinks::{caught_up, http_get as get, metrics_addr, wait_for, write_config, Daemon, Ports, Target, SINKS};
use tickvault::sim::relay::Relay as Proxy;

/// One sample: its name (with `_total`, `_bucket`...), labels and value.
#[derive(Debug, serde::Deserialize)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

#[derive(Debug, serde::Deserialize)]
struct Family {
    #[serde(rename = "type")]
    kind: String,
    samples: Vec<Sample>,
}

/// Fetches `url` and parses it with prometheus_client's OpenMetrics parser (the daemon
/// serves `application/openmetrics-text`): a family per name.
const PARSE: &str = r#"
import json, sys, urllib.request
from prometheus_client.openmetrics.parser import text_string_to_metric_families
with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
    assert r.headers["Content-Type"].startswith("application/openmetrics-text"), r.headers["Content-Type"]
    text = r.read().decode()
out = {}
for f in text_string_to_metric_families(text):
    out[f.name] = {"type": f.type, "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples]}
print(json.dumps(out))
"#;

fn scrape(addr: &str) -> BTreeMap<String, Family> {
    let out = Command::new("python3")
        .args(["-c", PARSE, &format!("http://{addr}/metrics")])
        .output()
        .expect("python3 (scripts/install-deps.sh --test installs python3-prometheus-client)");
    assert!(
        out.status.success(),
        "the Prometheus parser refused /metrics: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The sum of a family's samples whose labels include every pair of `with`.
fn sum(families: &BTreeMap<String, Family>, sample: &str, with: &[(&str, &str)]) -> f64 {
    let family = ["_total", "_count", "_sum", "_bucket"]
        .iter()
        .find_map(|suffix| families.get(sample.strip_suffix(suffix)?))
        .or_else(|| families.get(sample))
        .unwrap_or_else(|| panic!("no family for {sample}"));
    family
        .samples
        .iter()
        .filter(|s| {
            s.name == sample
                && with
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

fn records(log: &Path, lane: Lane) -> u64 {
    let summary = Wal::open_read_only(log).unwrap().summary().unwrap();
    summary.lanes.iter().find(|l| l.lane == lane).map_or(0, |l| l.records)
}

const BODY: &str = "[log]\ntruncate_every = \"1h\"\n\
                    [live]\nstale_after = \"2s\"\nreconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n\
                    [live.crypto]\nsymbols = [\"BTC-USD\", \"ETH-USD\"]\nchannels = [\"XQ\", \"XT\", \"XA\"]\n\
                    [backfill]\nforex = [\"EUR/USD\"]\ncrypto = [\"BTC-USD\"]\nlookback = \"3days\"\nchunk = \"1day\"\n";

#[test]
fn metrics_parse_and_agree_with_the_log_and_the_sinks() {
    let target = Target::new("metrics");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let (sim, sim_addr) = simulator(&[]);
    let config = write_config(&dir.path().join("c.toml"), BODY, &target, 4222);
    let daemon = Daemon::start(&config, &log, &sim_addr, &dir.path().join("stderr"));
    let addr = metrics_addr(&daemon);
    daemon.wait_for_backfill(Duration::from_secs(60));
    wait_for("live events", Duration::from_secs(30), || {
        sum(&scrape(&addr), "tickvault_events_captured_total", &[("lane", "live")]) >= 50.0
    });
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_owned()));
    assert_eq!(get(&addr, "/readyz"), (200, "ready\n".to_owned()));

    // The source goes quiet (the simulator ends), the sinks catch up: every figure holds still.
    drop(sim);
    wait_for("the feeds to go down", Duration::from_secs(20), || {
        sum(&scrape(&addr), "tickvault_live_connected", &[]) == 0.0
    });
    wait_for("the sinks to catch up", Duration::from_secs(120), || caught_up(&log));
    let m = scrape(&addr);

    for (name, kind) in [
        ("tickvault_build", "info"),
        ("tickvault_events_captured", "counter"),
        ("tickvault_live_frames", "counter"),
        ("tickvault_live_malformed", "counter"),
        ("tickvault_live_reconnects", "counter"),
        ("tickvault_live_gaps_suspected", "counter"),
        ("tickvault_live_market_open", "gauge"),
        ("tickvault_live_connected", "gauge"),
        ("tickvault_live_last_capture_timestamp_seconds", "gauge"),
        ("tickvault_live_frame_to_durable_seconds", "histogram"),
        ("tickvault_backfill_requests", "counter"),
        ("tickvault_backfill_pages", "counter"),
        ("tickvault_backfill_retries", "counter"),
        ("tickvault_backfill_repairs", "counter"),
        ("tickvault_aggregate_rounds", "counter"),
        ("tickvault_aggregate_minutes", "counter"),
        ("tickvault_aggregate_bars", "counter"),
        ("tickvault_aggregate_backlog_records", "gauge"),
        ("tickvault_backfill_rate_limited", "counter"),
        ("tickvault_backfill_periods", "gauge"),
        ("tickvault_backfill_tracker_periods", "gauge"),
        ("tickvault_backfill_periods_verified", "counter"),
        ("tickvault_backfill_periods_unverified", "counter"),
        ("tickvault_log_head_sequence", "gauge"),
        ("tickvault_log_disk_bytes", "gauge"),
        ("tickvault_log_filesystem_free_bytes", "gauge"),
        ("tickvault_log_written_bytes", "counter"),
        ("tickvault_log_retention_seconds", "gauge"),
        ("tickvault_log_disk_reserve_bytes", "gauge"),
        ("tickvault_capture_paused_for_disk", "gauge"),
        ("tickvault_log_quarantined_records", "gauge"),
        ("tickvault_log_poisoned", "gauge"),
        ("tickvault_sink_cursor_sequence", "gauge"),
        ("tickvault_sink_backlog_records", "gauge"),
        ("tickvault_sink_rows_written", "counter"),
        ("tickvault_sink_refused_records", "counter"),
        ("tickvault_sink_breaker_state", "gauge"),
        ("tickvault_sink_batch_write_seconds", "histogram"),
        ("tickvault_sink_capture_to_commit_seconds", "histogram"),
        ("tickvault_live_budget_backfill_share", "gauge"),
    ] {
        let family = m.get(name).unwrap_or_else(|| panic!("no family {name}"));
        assert_eq!(family.kind, kind, "{name}");
        assert!(!family.samples.is_empty(), "{name} has no sample");
    }

    // The capture counters are what the log holds; the rows written what the sinks hold.
    let live = records(&log, Lane::Live);
    let backfill = records(&log, Lane::Backfill);
    assert!(live > 0 && backfill > 0);
    let captured = |lane| sum(&m, "tickvault_events_captured_total", &[("lane", lane)]) as u64;
    assert_eq!(captured("live"), live);
    assert_eq!(captured("backfill"), backfill);
    for lane in [Lane::Live, Lane::Backfill] {
        assert_eq!(
            sum(&m, "tickvault_log_head_sequence", &[("lane", lane.name())]) as u64,
            Wal::open_read_only(&log).unwrap().last_seq(lane).unwrap().unwrap()
        );
    }
    // The captured lanes (the derived lane grows as long as the aggregator runs).
    let keys = target.keys(4222);
    let captured_lanes = |name: &str, sink: &str, more: &[(&str, &str)]| -> f64 {
        ["live", "backfill"]
            .iter()
            .map(|lane| {
                let mut with = vec![("sink", sink), ("lane", *lane)];
                with.extend_from_slice(more);
                sum(&m, name, &with)
            })
            .sum()
    };
    for sink in SINKS {
        let written = captured_lanes("tickvault_sink_rows_written_total", sink, &[]) as u64;
        assert_eq!(written, keys[sink].len() as u64, "{sink}");
        assert_eq!(written, live + backfill, "{sink}");
        assert_eq!(
            captured_lanes("tickvault_sink_backlog_records", sink, &[]),
            0.0,
            "{sink}"
        );
        assert_eq!(
            sum(
                &m,
                "tickvault_sink_breaker_state",
                &[("sink", sink), ("state", "closed")]
            ),
            3.0,
            "{sink}: every lane's breaker closed"
        );
        let commits = captured_lanes("tickvault_sink_capture_to_commit_seconds_count", sink, &[]) as u64;
        assert_eq!(commits, written, "{sink}: one latency per row");
        let le_inf = captured_lanes(
            "tickvault_sink_capture_to_commit_seconds_bucket",
            sink,
            &[("le", "+Inf")],
        ) as u64;
        assert_eq!(le_inf, commits, "{sink}");
    }
    // The alert rules and the dashboard (queries, runbooks) name only what the daemon serves.
    let served: std::collections::BTreeSet<String> = m
        .iter()
        .flat_map(|(family, f)| f.samples.iter().map(|s| s.name.clone()).chain([family.clone()]))
        .collect();
    let asked = names_in(&std::fs::read_to_string(packaging("alerts.yml")).unwrap())
        .into_iter()
        .chain(dashboard_queries().into_iter().flat_map(|q| names_in(&q)));
    for name in asked {
        assert!(served.contains(&name), "{name} is asked for and not served");
    }
    let frames = sum(&m, "tickvault_live_frame_to_durable_seconds_count", &[]);
    assert!(frames > 0.0);
    assert_eq!(sum(&m, "tickvault_log_poisoned", &[]), 0.0);
    assert!(sum(&m, "tickvault_log_disk_bytes", &[]) > 0.0);
    assert!(sum(&m, "tickvault_log_filesystem_free_bytes", &[]) > 0.0);
    assert!(sum(&m, "tickvault_backfill_periods", &[("state", "done")]) >= 6.0);
    for state in ["pending", "failed"] {
        assert_eq!(
            sum(&m, "tickvault_backfill_periods", &[("state", state)]),
            0.0,
            "{state}"
        );
    }
    daemon.stop();
}

#[test]
fn a_sink_cut_off_shows_in_its_breaker_its_backlog_and_readyz() {
    let target = Target::new("metrics_outage");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let (_sim, sim_addr) = simulator(&[]);
    let relay = Proxy::start(Ports::SHARED.clickhouse).unwrap();
    relay.cut();
    let ports = Ports {
        clickhouse: relay.port,
        ..Ports::SHARED
    };
    // The breaker opens after two failed attempts.
    let sinks = target
        .sinks_toml_at(ports)
        .replacen("[sinks]\n", "[sinks]\nbreaker_threshold = 2\n", 1);
    let config = dir.path().join("c.toml");
    std::fs::write(&config, format!("{BODY}\n{sinks}")).unwrap();
    let daemon = Daemon::start(&config, &log, &sim_addr, &dir.path().join("stderr"));
    let addr = metrics_addr(&daemon);

    wait_for("ClickHouse's backfill breaker to open", Duration::from_secs(60), || {
        let m = scrape(&addr);
        sum(
            &m,
            "tickvault_sink_breaker_state",
            &[("sink", "clickhouse"), ("lane", "backfill"), ("state", "open")],
        ) == 1.0
            && sum(
                &m,
                "tickvault_sink_backlog_records",
                &[("sink", "clickhouse"), ("lane", "backfill")],
            ) > 0.0
    });
    let (status, body) = get(&addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("sink clickhouse"), "{body}");
    assert!(!body.contains("sink postgres") && !body.contains("sink nats"), "{body}");
    let m = scrape(&addr);
    for sink in ["postgres", "nats"] {
        assert_eq!(
            sum(&m, "tickvault_sink_breaker_state", &[("sink", sink), ("state", "open")]),
            0.0,
            "{sink}"
        );
    }
    assert!(sum(&m, "tickvault_sink_write_failures_total", &[("sink", "clickhouse")]) >= 2.0);

    relay.restore();
    wait_for("readiness once ClickHouse is back", Duration::from_secs(60), || {
        get(&addr, "/readyz").0 == 200
    });
    wait_for("ClickHouse's backlog to empty", Duration::from_secs(120), || {
        let m = scrape(&addr);
        sum(
            &m,
            "tickvault_sink_backlog_records",
            &[("sink", "clickhouse"), ("lane", "backfill")],
        ) == 0.0
    });
    daemon.stop();
}

/// Every `tickvault_*` name in a text (PromQL in the alert rules or the dashboard).
fn names_in(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("tickvault_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        names.insert(name);
    }
    names
}

fn packaging(file: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging").join(file)
}

/// The dashboard's queries, with its template variables filled in.
fn dashboard_queries() -> Vec<String> {
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(packaging("dashboard.json")).unwrap()).unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            queries.push(target["expr"].as_str().unwrap().replace("$instance", ".+"));
        }
    }
    assert!(queries.len() >= 10, "{queries:?}");
    queries
}

#[test]
fn the_alert_rules_pass_promtool_and_their_unit_tests() {
    for args in [
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "alerts.test.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(packaging(""))
            .output()
            .expect("promtool (scripts/install-deps.sh --test installs Debian's prometheus)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Every rule has a test that fires it.
    let rules = std::fs::read_to_string(packaging("alerts.yml")).unwrap();
    let tests = std::fs::read_to_string(packaging("alerts.test.yml")).unwrap();
    for line in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        let fired = tests
            .split("alertname: ")
            .skip(1)
            .any(|t| t.starts_with(line) && t.contains("exp_labels"));
        assert!(fired, "no test fires {line}");
    }
}

#[test]
fn every_dashboard_query_is_valid_promql() {
    // promtool parses a recording rule's expression as Prometheus would.
    let dir = tempfile::tempdir().unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, query) in dashboard_queries().iter().enumerate() {
        rules.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {}\n",
            serde_json::to_string(query).unwrap()
        ));
    }
    let file = dir.path().join("dashboard-rules.yml");
    std::fs::write(&file, rules).unwrap();
    let out = Command::new("promtool")
        .arg("check")
        .arg("rules")
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
