//! No configuration that validates makes the daemon panic: random values for every
//! numeric and duration field go through `validate`, and each configuration it accepts
//! is started for real (live collectors, backfill, three sink runners per lane, all
//! against ports where nothing answers, so that their retry timers run) and stopped.

use std::time::Duration;

use proptest::prelude::*;
use tickvault::config::{Config, Secret};
use tickvault::daemon;

/// A field and the TOML text of its value.
type Setting = (&'static str, &'static str, String);

/// Any value at all: what a typo or a confused operator can write.
fn wild_count() -> BoxedStrategy<String> {
    prop_oneof![
        (0u64..16).prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| (n >> 1).to_string()),
    ]
    .boxed()
}

fn wild_duration() -> BoxedStrategy<String> {
    prop_oneof![
        (0u64..2_000).prop_map(|n| format!("\"{n}ms\"")),
        (0u64..20_000).prop_map(|n| format!("\"{n}days\"")),
        (0u64..500_000_000_000).prop_map(|n| format!("\"{n}years\"")),
    ]
    .boxed()
}

fn wild_share() -> BoxedStrategy<String> {
    (-1.0f64..3.0).prop_map(|f| format!("{f}")).boxed()
}

/// A value an operator might well write for a field: in `lo..hi` of the unit.
fn counts(lo: u64, hi: u64) -> BoxedStrategy<String> {
    (lo..hi).prop_map(|n| n.to_string()).boxed()
}

fn millis(lo: u64, hi: u64) -> BoxedStrategy<String> {
    (lo..hi).prop_map(|n| format!("\"{n}ms\"")).boxed()
}

fn secs(lo: u64, hi: u64) -> BoxedStrategy<String> {
    (lo..hi).prop_map(|n| format!("\"{n}s\"")).boxed()
}

fn shares() -> BoxedStrategy<String> {
    (0.05f64..=1.0).prop_map(|f| format!("{f}")).boxed()
}

/// Every field that takes a number or a duration: a plausible value for some of them,
/// and any value at all for one.
/// `log.disk_reserve`: a size of at least 256 MiB, or a share up to 50%.
fn reserves() -> BoxedStrategy<String> {
    prop_oneof![
        (256u64..100_000).prop_map(|mib| format!("\"{mib}MiB\"")),
        (1u32..=50).prop_map(|p| format!("\"{p}%\"")),
    ]
    .boxed()
}

fn wild_reserve() -> BoxedStrategy<String> {
    prop_oneof![
        Just("\"1KiB\"".to_owned()),
        Just("\"0%\"".to_owned()),
        Just("\"99%\"".to_owned()),
        Just("\"9 PiB\"".to_owned()),
        Just("\"lots\"".to_owned()),
        Just("1024".to_owned()),
        (0u64..u64::MAX).prop_map(|n| format!("\"{n}B\"")),
    ]
    .boxed()
}

fn settings() -> impl Strategy<Value = Vec<Setting>> {
    type Field = (&'static str, &'static str, BoxedStrategy<String>, BoxedStrategy<String>);
    let fields: Vec<Field> = vec![
        ("log", "retention", secs(1, 10_000_000), wild_duration()),
        ("log", "truncate_every", secs(1, 3_600), wild_duration()),
        ("log", "channel_capacity", counts(1, 100_000), wild_count()),
        ("log", "max_group_records", counts(1, 1_000_000), wild_count()),
        ("log", "backfill_high_water", counts(1_000, 100_000_000), wild_count()),
        ("log", "disk_reserve", reserves(), wild_reserve()),
        ("polygon", "requests_per_minute", counts(0, 10_000), wild_count()),
        ("live", "stale_after", secs(1, 600), wild_duration()),
        ("live", "reconnect_min", millis(1, 2_000), wild_duration()),
        ("live", "reconnect_max", secs(2, 600), wild_duration()),
        ("backfill", "lookback", secs(3_600, 100_000_000), wild_duration()),
        ("backfill", "chunk", secs(3_600, 100_000_000), wild_duration()),
        ("backfill", "page_limit", counts(1, 50_001), wild_count()),
        ("backfill", "max_attempts", counts(1, 20), wild_count()),
        ("backfill", "concurrency", counts(1, 17), wild_count()),
        ("backfill", "live_duty", shares(), wild_share()),
        ("sinks", "retry_min", millis(1, 1_000), wild_duration()),
        ("sinks", "retry_max", secs(1, 3_600), wild_duration()),
        ("sinks", "breaker_threshold", counts(1, 100), wild_count()),
        ("sinks", "backfill_writes", counts(0, 64), wild_count()),
        ("sinks", "backfill_duty", shares(), wild_share()),
        ("sinks", "live_latency_budget", millis(0, 10_000), wild_duration()),
        ("sinks", "stop_drain", secs(0, 60), wild_duration()),
        (
            "sinks.clickhouse",
            "live_batch_rows",
            counts(1, 1_000_000),
            wild_count(),
        ),
        (
            "sinks.clickhouse",
            "backfill_flush_interval",
            millis(0, 60_000),
            wild_duration(),
        ),
        (
            "sinks.postgres",
            "backfill_batch_rows",
            counts(1, 1_000_000),
            wild_count(),
        ),
        (
            "sinks.postgres",
            "live_flush_interval",
            millis(0, 1_000),
            wild_duration(),
        ),
        (
            "sinks.postgres",
            "retention",
            secs(3_600, 3_000_000_000),
            wild_duration(),
        ),
        ("sinks.nats", "duplicate_window", secs(1, 2_592_000), wild_duration()),
        ("sinks.nats", "live_batch_rows", counts(1, 1_000_000), wild_count()),
    ];
    let (plausible, wild): (Vec<_>, Vec<_>) = fields
        .into_iter()
        .map(|(section, key, plausible, wild)| {
            (
                (any::<bool>(), plausible).prop_map(move |(set, v)| set.then_some((section, key, v))),
                wild.prop_map(move |v| (section, key, v)),
            )
        })
        .unzip();
    (plausible, proptest::sample::select(wild).prop_flat_map(|w| w)).prop_map(|(chosen, wild)| {
        let mut settings: Vec<Setting> = chosen
            .into_iter()
            .flatten()
            .filter(|(s, k, _)| (*s, *k) != (wild.0, wild.1))
            .collect();
        settings.push(wild);
        settings
    })
}

/// The TOML of `settings` on a config that starts every part, each aimed at `dead`.
fn toml(settings: &[Setting], dead: &str) -> String {
    let mut sections: Vec<(&str, Vec<String>)> = Vec::new();
    let mut add = |section: &'static str, line: String| match sections.iter_mut().find(|(s, _)| *s == section) {
        Some((_, lines)) => lines.push(line),
        None => sections.push((section, vec![line])),
    };
    add("polygon", format!("ws_url = \"ws://{dead}\""));
    add("polygon", format!("rest_url = \"http://{dead}\""));
    add("backfill", "crypto = [\"BTC-USD\"]".into());
    add("live.crypto", "symbols = [\"BTC-USD\"]".into());
    add("live.crypto", "channels = [\"XT\"]".into());
    add("sinks.clickhouse", "enabled = true".into());
    add("sinks.clickhouse", format!("url = \"http://{dead}\""));
    add("sinks.postgres", "enabled = true".into());
    add("sinks.postgres", format!("port = {}", dead.rsplit(':').next().unwrap()));
    add("sinks.nats", "enabled = true".into());
    add("sinks.nats", format!("url = \"nats://{dead}\""));
    for (section, key, value) in settings {
        add(section, format!("{key} = {value}"));
    }
    sections
        .into_iter()
        .map(|(section, lines)| format!("[{section}]\n{}\n", lines.join("\n")))
        .collect()
}

/// Runs `settings` through `validate` and, when it passes, starts and stops the daemon
/// on it; `Ok(true)` when it was started.
fn start_if_valid(settings: &[Setting]) -> Result<bool, String> {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let text = toml(settings, &dead);
    let Ok(mut config) = Config::parse("random.toml", &text) else {
        return Ok(false);
    };
    if config.validate("random.toml").is_err() {
        return Ok(false);
    }
    let dir = tempfile::tempdir().unwrap();
    config.log.data_dir = dir.path().join("log");
    config.polygon.api_key = Some(Secret::new("key"));
    config.metrics.listen = "127.0.0.1:0".parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let outcome: anyhow::Result<()> = runtime.block_on(async {
        let mut running = daemon::start(&config).await?;
        // Every part runs its first attempts and retries against nothing.
        if let Ok(Some(ended)) = tokio::time::timeout(Duration::from_millis(400), running.join_next()).await {
            ended?;
        }
        tokio::time::timeout(Duration::from_secs(30), running.shutdown())
            .await
            .map_err(|_| anyhow::anyhow!("the stop took more than 30 s"))?
    });
    outcome.map(|()| true).map_err(|e| format!("{text}\n{e:#}"))
}

#[test]
fn a_config_that_validates_starts_and_stops_without_a_panic() {
    use proptest::test_runner::{Config as Cases, TestRunner};
    let mut runner = TestRunner::new(Cases {
        cases: 120,
        failure_persistence: None,
        ..Cases::default()
    });
    let started = std::cell::Cell::new(0u32);
    let result = runner.run(&settings(), |settings| {
        let ran = start_if_valid(&settings).map_err(proptest::test_runner::TestCaseError::fail)?;
        started.set(started.get() + u32::from(ran));
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    // Most cases pass validation and start: the property is tested, not skipped.
    assert!(
        started.get() >= 10,
        "only {} of 120 random configs validated",
        started.get()
    );
}
