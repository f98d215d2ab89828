//! A full disk is an alert, not an outage: the daemon on a small filesystem of its own
//! (a tmpfs, mounted by the test: it runs as root, as the package's test does), fed by
//! the simulator, with its one sink cut off so that nothing can be truncated.

use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tickvault_wal::{Lane, Wal};

mod common;

use common::simulator;
use common::sinks::{http_get as get, metrics_addr, postgres, rt, wait_for, wait_for_showing, Daemon, Ports, Target};
use tickvault::sim::relay::Relay as Proxy;

/// A tmpfs of `size`, unmounted when dropped.
struct Mount(std::path::PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Mount {
        let uid = Command::new("id").arg("-u").output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&uid.stdout).trim(),
            "0",
            "this test mounts a filesystem: run it as root"
        );
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .unwrap();
        assert!(ok.success(), "mount tmpfs");
        Mount(at.to_owned())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn free(path: &Path) -> u64 {
    tickvault::disk::filesystem(path).unwrap().0
}

/// Appends filler to `path` until the filesystem has at most `free_bytes` free.
fn fill_to(path: &Path, free_bytes: u64) {
    let now = free(path.parent().unwrap());
    if now > free_bytes {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        let block = vec![0x5au8; 1 << 20];
        for _ in 0..(now - free_bytes).div_ceil(1 << 20) {
            if file.write_all(&block).is_err() {
                break;
            }
        }
        let _ = file.sync_all();
    }
}

/// A metric's value from `/metrics`, by a line's start (`name{labels}`).
fn metric(addr: &str, line_start: &str) -> Option<f64> {
    let (_, text) = get(addr, "/metrics");
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

const RESERVE: u64 = 256 << 20;

#[test]
fn a_full_disk_pauses_capture_then_resumes_by_itself_and_a_restart_opens_the_log() {
    let target = Target::new("disk");
    let dir = tempfile::tempdir().unwrap();
    let fs = dir.path().join("fs");
    // Room for a log of about 360 MiB at the backfill's pause (past the ballast and twice
    // the reserve), some 80 MiB once flushed and compacted: what truncation gives back
    // must clear the filler's part of the reserve and the resume margin.
    let _mount = Mount::tmpfs(&fs, "1000m");
    let log = fs.join("log");
    let (_sim, sim_addr) = simulator(&["--always-open"]);
    // PostgreSQL through a relay, cut: its cursor holds every record in the log. The
    // aggregator's too (a round an hour), until live capture stops.
    let relay = Proxy::start(Ports::SHARED.postgres).unwrap();
    relay.cut();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[log]\nretention = \"1s\"\ntruncate_every = \"1s\"\ndisk_reserve = \"256MiB\"\nbackfill_high_water = 100000000\n\
             [live]\nstale_after = \"2s\"\nreconnect_min = \"50ms\"\nreconnect_max = \"200ms\"\n\
             [live.crypto]\nsymbols = [\"BTC-USD\", \"ETH-USD\"]\nchannels = [\"XQ\", \"XT\"]\n\
             [backfill]\nforex = [\"EUR/USD\", \"GBP/USD\", \"USD/JPY\", \"AUD/USD\", \"USD/CAD\", \"USD/CHF\",\
             \"NZD/USD\", \"EUR/GBP\", \"EUR/JPY\", \"GBP/JPY\", \"EUR/CHF\", \"AUD/JPY\", \"EUR/AUD\", \"GBP/CHF\"]\n\
             lookback = \"365days\"\nchunk = \"30days\"\n\
             [aggregate]\ninterval = \"1h\"\n\
             [sinks]\nretry_min = \"50ms\"\nretry_max = \"500ms\"\n\
             [sinks.postgres]\nenabled = true\nport = {}\ndatabase = \"{}\"\n",
            relay.port, target.name
        ),
    )
    .unwrap();
    let stderr = dir.path().join("stderr");
    let daemon = Daemon::start(&config, &log, &sim_addr, &stderr);
    let addr = metrics_addr(&daemon);

    // The backfill fills the disk down to twice the reserve, and pauses there.
    wait_for("the backfill to pause for the disk", Duration::from_secs(120), || {
        metric(&addr, "tickvault_capture_paused_for_disk{lane=\"backfill\"}") == Some(1.0)
    });
    assert!(daemon.this_run().contains("backfill capture paused"));
    assert_eq!(
        metric(&addr, "tickvault_capture_paused_for_disk{lane=\"live\"}"),
        Some(0.0)
    );
    assert!(tickvault::disk::ballast_path(&log).exists(), "no ballast was made");

    // Something else takes the rest down past the reserve: live capture stops, said at
    // error, and the feeds disconnect. Just under the reserve: what truncation gives
    // back once the sink has the log is then enough to resume (a tenth of the reserve
    // above it).
    let (filler, leave_free) = (fs.join("filler-1"), RESERVE - (8 << 20));
    wait_for("live capture to stop for the disk", Duration::from_secs(30), || {
        fill_to(&filler, leave_free);
        metric(&addr, "tickvault_capture_paused_for_disk{lane=\"live\"}") == Some(1.0)
            && metric(&addr, "tickvault_live_connected{feed=\"crypto\"}") == Some(0.0)
    });
    // The pause flushes the log's memtables and compactions follow, shrinking it by half
    // or more: topped up until it settles, so that what is left for truncation to free
    // is the log's settled size (filled once, it was once too little by 1 MiB).
    let mut last = tickvault::metrics::dir_bytes(&log);
    wait_for("the log to settle", Duration::from_secs(120), || {
        for _ in 0..6 {
            fill_to(&filler, leave_free);
            std::thread::sleep(Duration::from_secs(1));
        }
        let now = tickvault::metrics::dir_bytes(&log);
        std::mem::replace(&mut last, now).abs_diff(now) < 2 << 20
    });
    assert!(daemon.this_run().contains("ERROR") && daemon.this_run().contains("live capture stopped"));
    let (status, body) = get(&addr, "/readyz");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("log.disk_reserve"), "{body}");
    // The feed is dropped as a lost connection: the time until the next is a suspected gap.
    assert!(
        daemon.this_run().contains("live feed lost; reconnecting")
            && daemon.this_run().contains("free space under log.disk_reserve")
    );
    let live_at = |log: &Path| {
        Wal::open_read_only(log)
            .unwrap()
            .last_seq(Lane::Live)
            .unwrap()
            .unwrap_or(0)
    };
    let stopped_at = live_at(&log);
    assert!(stopped_at > 0);

    // The sink comes back: it takes the log, truncation frees the log's space, and live
    // capture resumes without a restart.
    relay.restore();
    wait_for_showing(
        "live capture to resume",
        Duration::from_secs(300),
        || {
            metric(&addr, "tickvault_capture_paused_for_disk{lane=\"live\"}") == Some(0.0)
                && metric(&addr, "tickvault_live_connected{feed=\"crypto\"}") == Some(1.0)
        },
        || {
            format!(
                "{} bytes free (resumes at {}), the log {} bytes\n{}",
                free(&fs),
                RESERVE + RESERVE / 10,
                tickvault::metrics::dir_bytes(&log),
                daemon.this_run()
            )
        },
    );
    assert!(daemon.this_run().contains("live capture resumes"));
    // The aggregator (a round an hour: it took nothing since the start) did not keep
    // the log from giving its space back.
    assert!(daemon
        .this_run()
        .contains("truncation no longer waits for the aggregator"));
    wait_for("live events after the resume", Duration::from_secs(30), || {
        live_at(&log) > stopped_at + 10
    });

    // Killed, and the disk then filled to the last byte: a restart still opens the log
    // (the ballast is given up for it).
    daemon.kill();
    fill_to(&fs.join("filler-2"), 0);
    assert!(free(&fs) < 1 << 20, "{} free", free(&fs));
    let daemon = Daemon::start(&config, &log, &sim_addr, &stderr);
    assert!(daemon.this_run().contains("ballast given up"), "{}", daemon.this_run());
    let addr = metrics_addr(&daemon);

    // The space comes back: capture resumes, the backfill too.
    std::fs::remove_file(fs.join("filler-1")).unwrap();
    std::fs::remove_file(fs.join("filler-2")).unwrap();
    let backfill_at = Wal::open_read_only(&log)
        .unwrap()
        .last_seq(Lane::Backfill)
        .unwrap()
        .unwrap_or(0);
    let live_before = live_at(&log);
    wait_for(
        "live and backfill capture after the restart",
        Duration::from_secs(60),
        || {
            metric(&addr, "tickvault_capture_paused_for_disk{lane=\"backfill\"}") == Some(0.0)
                && Wal::open_read_only(&log)
                    .unwrap()
                    .last_seq(Lane::Backfill)
                    .unwrap()
                    .unwrap_or(0)
                    > backfill_at
                && live_at(&log) > live_before
        },
    );
    let live_head = || {
        Wal::open_read_only(&log)
            .unwrap()
            .last_seq(Lane::Live)
            .unwrap()
            .unwrap_or(0)
    };
    wait_for("PostgreSQL to take the live lane", Duration::from_secs(60), || {
        Wal::open_read_only(&log)
            .unwrap()
            .cursor("postgres", Lane::Live)
            .unwrap()
            >= live_head()
    });
    daemon.stop();

    // Nothing acknowledged was lost: the log checks clean, and the sink holds one row
    // per live record ever appended (each has its own key), truncated ones included.
    let check = common::tickvault()
        .args(["wal", "check", "--data-dir"])
        .arg(&log)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stdout));
    let live_rows: i64 = rt().block_on(async {
        let pg = postgres(&target.name).await;
        pg.query_one("SELECT count(*) FROM events WHERE feed = 'crypto'", &[])
            .await
            .unwrap()
            .get(0)
    });
    assert_eq!(
        live_rows as u64,
        live_head(),
        "live rows in PostgreSQL against live records appended"
    );
}
