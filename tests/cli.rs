//! The command-line shapes other work relies on, run as a user runs them.

use std::path::Path;
use std::process::{Command, Output};

use tickvault_wal::{Lane, RecordKind, Wal};

fn tickvault(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tickvault"))
        .args(args)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn load(dir: &Path, lane: &str, records: u64) -> Output {
    tickvault(&[
        "wal",
        "load",
        "--data-dir",
        dir.to_str().unwrap(),
        "--lane",
        lane,
        "--records",
        &records.to_string(),
        "--batch",
        "100",
    ])
}

#[test]
fn validate_accepts_the_shipped_configs() {
    for file in ["config/tickvault.toml", "config/demo.toml", "config/local-sinks.toml"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(file);
        let out = Command::new(env!("CARGO_BIN_EXE_tickvault"))
            .args(["validate", "--config", path.to_str().unwrap()])
            .env("TICKVAULT_POLYGON_API_KEY", "a-key")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{file}: {}", text(&out.stderr));
    }
}

#[test]
fn validate_and_run_without_the_api_key_they_need_exit_2_before_creating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("live.toml");
    std::fs::write(&path, "[live.forex]\nsymbols = [\"EUR/USD\"]\nchannels = [\"C\"]\n").unwrap();
    let log = dir.path().join("log");
    for args in [
        vec!["validate", "--config", path.to_str().unwrap()],
        vec![
            "run",
            "--config",
            path.to_str().unwrap(),
            "--data-dir",
            log.to_str().unwrap(),
        ],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_tickvault"))
            .args(&args)
            .env_remove("TICKVAULT_POLYGON_API_KEY")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("`polygon.api_key_file`"),
            "{}",
            text(&out.stderr)
        );
        assert!(!log.exists(), "{args:?} created the log directory");
    }
    // With nothing to capture, no key is needed.
    std::fs::write(&path, "[backfill]\nenabled = false\n").unwrap();
    let out = tickvault(&["validate", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn validate_names_the_bad_field_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[log]\nretension = \"1d\"\n", "log.retension"),
        ("[log]\nretention = \"soon\"\n", "log.retention"),
        ("[log]\nmax_group_records = 0\n", "log.max_group_records"),
        ("[sinks.clickhouse]\nhost = \"x\"\n", "sinks.clickhouse.host"),
        (
            "[sinks.clickhouse]\nlive_batch_rows = 0\n",
            "sinks.clickhouse.live_batch_rows",
        ),
        ("[sinks.postgres]\nport = 0\n", "sinks.postgres.port"),
        ("[sinks.postgres]\ntable = \"events; drop\"\n", "sinks.postgres.table"),
        ("[sinks.nats]\nurl = \"http://127.0.0.1:4222\"\n", "sinks.nats.url"),
        ("[sinks]\nbreaker_threshold = 0\n", "sinks.breaker_threshold"),
        ("[sinks]\nlive_latency_budget = \"1min\"\n", "sinks.live_latency_budget"),
        ("[sinks]\nlive_latency_budget = 40\n", "sinks.live_latency_budget"),
        // Values the daemon cannot honour (each crashed or wedged it once).
        (
            "[log]\nchannel_capacity = 2300000000000000000\n",
            "log.channel_capacity",
        ),
        (
            "[sinks]\nbackfill_writes = 2300000000000000000\n",
            "sinks.backfill_writes",
        ),
        ("[live]\nstale_after = \"300000000000years\"\n", "live.stale_after"),
        ("[sinks]\nretry_max = \"300000000000years\"\n", "sinks.retry_max"),
        ("[backfill]\nlookback = \"500000000000years\"\n", "backfill.lookback"),
        ("[backfill]\nlookback = \"40years\"\nchunk = \"1h\"\n", "backfill.chunk"),
        (
            "[sinks.nats]\nduplicate_window = \"300years\"\n",
            "sinks.nats.duplicate_window",
        ),
        (
            "[sinks.postgres]\ndatabase = \"TvReviewMixed\"\n",
            "sinks.postgres.database",
        ),
        (
            "[sinks.postgres]\ntable = \"t23456789012345678901234567890123456789012345678901234567\"\n",
            "sinks.postgres.table",
        ),
    ];
    for (body, field) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, body).unwrap();
        let out = tickvault(&["validate", "--config", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{body}");
        let err = text(&out.stderr);
        assert!(err.contains(&format!("`{field}`")), "{body}: {err}");
    }
    let out = tickvault(&[
        "validate",
        "--config",
        dir.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("cannot read"));
}

#[test]
fn load_acknowledges_batches_and_summary_reports_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let out = load(&log, "backfill", 1000);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let acks: Vec<u64> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("acked backfill "))
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(acks.len(), 10, "{stdout}");
    assert_eq!(acks.iter().max(), Some(&1000));
    let last = stdout.lines().last().unwrap();
    assert!(last.contains("records/s") && last.contains("MB/s"), "{last}");

    let out = tickvault(&["wal", "summary", "--data-dir", log.to_str().unwrap(), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let backfill = summary["lanes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["lane"] == "backfill")
        .unwrap();
    assert_eq!(backfill["first_seq"], 1);
    assert_eq!(backfill["last_seq"], 1000);
    assert_eq!(backfill["records"], 1000);
    assert!(backfill["bytes"].as_u64().unwrap() > 0);
    assert_eq!(summary["quarantined"], 0);
    assert!(summary["cursors"].as_array().unwrap().is_empty());

    let out = tickvault(&["wal", "summary", "--data-dir", log.to_str().unwrap()]);
    assert!(text(&out.stdout).contains("backfill"));
}

#[test]
fn dump_prints_one_json_object_per_record_within_the_range() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    assert!(load(&log, "live", 50).status.success());
    let out = tickvault(&[
        "wal",
        "dump",
        "--data-dir",
        log.to_str().unwrap(),
        "--lane",
        "live",
        "--from",
        "5",
        "--to",
        "9",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let lines: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect::<Vec<_>>(),
        vec![5, 6, 7, 8, 9]
    );
    assert!(lines
        .iter()
        .all(|l| l["lane"] == "live" && l["synthetic"]["producer"] == 0));
}

#[tokio::test]
async fn check_lists_each_corrupt_record_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let out = tickvault(&["wal", "check", "--data-dir", log.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "no log yet: {}", text(&out.stderr));
    assert!(load(&log, "live", 10).status.success());
    let out = tickvault(&["wal", "check", "--data-dir", log.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));

    let wal = Wal::open(&log).unwrap();
    let mut raw = tickvault_wal::record::encode(RecordKind(200), &[7u8; 40]).unwrap();
    raw[20] ^= 0xff;
    wal.append_raw_for_test(Lane::Live, &raw).await.unwrap();
    wal.append_raw_for_test(Lane::Live, &raw[..5]).await.unwrap();
    wal.shutdown().await.unwrap();
    drop(wal);

    let out = tickvault(&["wal", "check", "--data-dir", log.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("corrupt live 11: crc mismatch"), "{stdout}");
    assert!(stdout.contains("corrupt live 12: record is 5 bytes"), "{stdout}");
    let out = tickvault(&[
        "wal",
        "dump",
        "--data-dir",
        log.to_str().unwrap(),
        "--lane",
        "live",
        "--from",
        "11",
    ]);
    assert!(text(&out.stdout).contains("\"corrupt\""));
}

#[test]
fn a_directory_that_is_not_a_log_gets_a_clear_error_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data.csv"), "a,b\n").unwrap();
    for args in [
        vec!["wal", "summary", "--data-dir"],
        vec!["wal", "check", "--data-dir"],
        vec!["wal", "load", "--lane", "live", "--records", "1", "--data-dir"],
    ] {
        let mut args = args.clone();
        args.push(dir.path().to_str().unwrap());
        let out = tickvault(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            text(&out.stderr).contains("not a tickvault log"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    assert_eq!(std::fs::read_to_string(dir.path().join("data.csv")).unwrap(), "a,b\n");
}

#[test]
fn a_log_from_a_newer_tickvault_is_refused_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    assert!(load(&log, "live", 5).status.success());
    tickvault_wal::stamp_format_version_for_test(&log, 2).unwrap();
    for sub in ["summary", "check"] {
        let out = tickvault(&["wal", sub, "--data-dir", log.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2));
        assert!(text(&out.stderr).contains("newer tickvault"), "{}", text(&out.stderr));
    }
    let out = load(&log, "live", 5);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn bad_input_exits_2_with_the_reason_for_every_command() {
    let dir = tempfile::tempdir().unwrap();
    let d = |name: &str| dir.path().join(name).to_str().unwrap().to_owned();
    let config = d("ok.toml");
    std::fs::write(&config, "[backfill]\nenabled = false\n").unwrap();
    // A link to nothing, a directory of other files, a log whose CURRENT is garbage.
    std::os::unix::fs::symlink(d("nowhere"), d("dangling")).unwrap();
    std::fs::create_dir(d("other")).unwrap();
    std::fs::write(dir.path().join("other/notes.txt"), "x").unwrap();
    assert_eq!(load(&dir.path().join("corrupt"), "live", 10).status.code(), Some(0));
    std::fs::write(dir.path().join("corrupt/CURRENT"), "MANIFEST-999999\n").unwrap();
    assert_eq!(load(&dir.path().join("garbled"), "live", 10).status.code(), Some(0));
    std::fs::write(dir.path().join("garbled/CURRENT"), "not a manifest name").unwrap();
    let garbled = d("garbled");
    let (dangling, other, corrupt, missing) = (d("dangling"), d("other"), d("corrupt"), d("missing.toml"));
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "backfill",
                "--config",
                &config,
                "--symbol",
                "EUR/USD",
                "--from",
                "2024-03-05",
                "--to",
                "2024-03-04",
            ],
            "is after --to",
        ),
        (
            vec![
                "backfill",
                "--config",
                &config,
                "--symbol",
                "EUR/USD/JPY?",
                "--from",
                "2024-03-04",
                "--to",
                "2024-03-04",
            ],
            "is not a symbol",
        ),
        (
            vec!["wal", "summary", "--data-dir", &dangling],
            "symbolic link to a missing target",
        ),
        (vec!["wal", "summary", "--data-dir", &other], "not a tickvault log"),
        (vec!["wal", "summary", "--data-dir", &corrupt], "damaged"),
        (vec!["wal", "check", "--data-dir", &corrupt], "damaged"),
        (vec!["wal", "summary", "--data-dir", &garbled], "damaged"),
        (
            vec!["run", "--config", &config, "--data-dir", &dangling],
            "symbolic link",
        ),
        (vec!["run", "--config", &config, "--data-dir", &corrupt], "damaged"),
        (vec!["validate", "--config", &missing], "cannot read"),
    ];
    for (args, says) in cases {
        let out = tickvault(&args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    assert!(!dir.path().join("nowhere").exists(), "a log was made through the link");
}

#[test]
fn a_secret_in_a_path_field_is_never_printed_and_a_readable_secret_file_is_warned_about() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    let validate = |config: &Path| {
        Command::new(env!("CARGO_BIN_EXE_tickvault"))
            .args(["validate", "--config", config.to_str().unwrap()])
            .env_remove("TICKVAULT_POLYGON_API_KEY")
            .output()
            .unwrap()
    };
    // The key itself, pasted where its file's path belongs.
    std::fs::write(&config, "[polygon]\napi_key_file = \"pk_9f8e7d6c5b4a\"\n").unwrap();
    let out = validate(&config);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("`polygon.api_key_file`"), "{err}");
    assert!(!err.contains("pk_9f8e7d6c5b4a"), "the secret was printed: {err}");
    // A key file others can read: accepted, with a warning.
    let key = dir.path().join("key");
    std::fs::write(&key, "pk_9f8e7d6c5b4a\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(&config, format!("[polygon]\napi_key_file = \"{}\"\n", key.display())).unwrap();
    let out = validate(&config);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(all.contains("chmod 600"), "{all}");
    assert!(!all.contains("pk_9f8e7d6c5b4a"), "the secret was printed: {all}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = validate(&config);
    assert!(!text(&out.stderr).contains("chmod 600"), "{}", text(&out.stderr));
}

#[test]
fn clear_text_to_a_remote_host_is_warned_about_and_refused_when_forbidden() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    let sinks = "[sinks.clickhouse]\nenabled = true\nurl = \"http://clickhouse.example:8123\"\n\
                 [sinks.postgres]\nenabled = true\nhost = \"127.0.0.1\"\n";
    std::fs::write(&config, sinks).unwrap();
    let out = tickvault(&["validate", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("clear text") && err.contains("sinks.clickhouse.url"),
        "{err}"
    );
    assert!(
        !err.contains("sinks.postgres"),
        "loopback is not clear text to warn of: {err}"
    );
    std::fs::write(&config, format!("[security]\nforbid_clear_text = true\n{sinks}")).unwrap();
    let out = tickvault(&["validate", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("`sinks.clickhouse.url`"),
        "{}",
        text(&out.stderr)
    );
}
