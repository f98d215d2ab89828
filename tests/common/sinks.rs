//! The real sink servers (`scripts/services.sh up`), one database / table / stream per
//! test named after it, and the daemon as a real process.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tickvault::event::{Event, EVENT_KIND};
use tickvault_wal::{Lane, Wal};

use super::{tickvault, Child};

pub const SINKS: [&str; 3] = ["clickhouse", "postgres", "nats"];
pub const PG_PASSWORD: &str = "tickvault";

pub fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// The loopback ports a config sends each sink's writes to.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub clickhouse: u16,
    pub postgres: u16,
    pub nats: u16,
}

impl Ports {
    /// The servers `scripts/services.sh up` starts, on their default ports.
    pub const SHARED: Ports = Ports {
        clickhouse: 8123,
        postgres: 5432,
        nats: 4222,
    };
}

/// Where one test's events go: database `tv_<test>` in ClickHouse and PostgreSQL, stream
/// `TV_<TEST>` on subjects `tv_<test>.>` in JetStream. Emptied when made, dropped at
/// the end of a test that passed.
pub struct Target {
    pub name: String,
    pub stream: String,
}

/// A test that passed leaves nothing in the servers (a ClickHouse that has gathered
/// hundreds of parts from earlier runs takes minutes to start); one that failed leaves
/// its databases and stream to be looked at, until its next run drops them.
impl Drop for Target {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "left for inspection: databases {0} and stream {1}",
                self.name, self.stream
            );
            return;
        }
        if let Err(e) = self.drop_all() {
            eprintln!("could not drop {} after the test: {e}", self.name);
        }
    }
}

pub fn clickhouse() -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url("http://127.0.0.1:8123")
        .with_compression(clickhouse::Compression::None)
}

pub async fn postgres(db: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::Config::new()
        .host("127.0.0.1")
        .user("tickvault")
        .password(PG_PASSWORD)
        .dbname(db)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL on 127.0.0.1:5432 (scripts/services.sh up): {e}"));
    tokio::spawn(conn);
    client
}

impl Target {
    pub fn new(test: &str) -> Target {
        let t = Target {
            name: format!("tv_{test}"),
            stream: format!("TV_{}", test.to_uppercase()),
        };
        t.drop_all()
            .unwrap_or_else(|e| panic!("{e} (are the servers up? scripts/services.sh up)"));
        t
    }

    /// Drops the test's databases and deletes its stream on the shared servers.
    pub fn drop_all(&self) -> Result<(), tickvault::sink::SinkError> {
        let mut config = tickvault::config::Config::parse("(test)", &self.sinks_toml(4222)).unwrap();
        config.sinks.postgres.password = Some(tickvault::config::Secret::new(PG_PASSWORD));
        rt().block_on(tickvault::sink::admin::drop_targets(&config.sinks))
    }

    /// The `[sinks]` part of a config sending everything to this target.
    pub fn sinks_toml(&self, nats_port: u16) -> String {
        self.sinks_toml_at(Ports {
            nats: nats_port,
            ..Ports::SHARED
        })
    }

    /// As [`Target::sinks_toml`], with the servers reached on `ports` (a relay of
    /// [`super::proxy`], say).
    pub fn sinks_toml_at(&self, ports: Ports) -> String {
        format!(
            "[sinks]\nretry_min = \"50ms\"\nretry_max = \"1s\"\n\
             [sinks.clickhouse]\nenabled = true\nurl = \"http://127.0.0.1:{ch}\"\ndatabase = \"{n}\"\n\
             [sinks.postgres]\nenabled = true\nport = {pg}\ndatabase = \"{n}\"\n\
             [sinks.nats]\nenabled = true\nurl = \"nats://127.0.0.1:{nats}\"\nstream = \"{s}\"\nsubject_prefix = \"{n}\"\n",
            n = self.name,
            s = self.stream,
            ch = ports.clickhouse,
            pg = ports.postgres,
            nats = ports.nats,
        )
    }

    /// Every natural key of captured events (not derived bars: `verify` holds those to
    /// their versions) in each sink, as a list (duplicates kept), keyed by sink.
    /// ClickHouse is read with `FINAL` (what a reader sees); the raw row count is separate.
    pub fn keys(&self, nats_port: u16) -> BTreeMap<&'static str, Vec<String>> {
        rt().block_on(async {
            let mut out = BTreeMap::new();
            let mut ch = Vec::new();
            for (kind, table) in [("quote", "quotes"), ("trade", "trades"), ("bar", "bars")] {
                ch.extend(
                    clickhouse()
                        .query(&format!(
                            "SELECT concat(feed, ':', symbol, ':{kind}:', timeframe, ':', toString(ts_ms), ':', toString(uid)) \
                             FROM {}.events_{table} FINAL",
                            self.name
                        ))
                        .fetch_all::<String>()
                        .await
                        .unwrap(),
                );
            }
            out.insert("clickhouse", ch);
            out.insert("postgres", self.postgres_keys().await);
            let nats = self.nats_keys_async(nats_port).await;
            out.insert("nats", nats.into_iter().filter(|k| !k.contains(":derived:")).collect());
            out
        })
    }

    /// Every natural key of a captured event in the target's JetStream stream, in stream
    /// order (duplicates kept).
    pub fn nats_keys(&self, nats_port: u16) -> Vec<String> {
        rt().block_on(self.nats_keys_async(nats_port))
            .into_iter()
            .filter(|k| !k.contains(":derived:"))
            .collect()
    }

    /// Every message id of a derived bar in the target's stream (natural key and version).
    pub fn nats_derived_keys(&self, nats_port: u16) -> Vec<String> {
        rt().block_on(self.nats_keys_async(nats_port))
            .into_iter()
            .filter(|k| k.contains(":derived:"))
            .collect()
    }

    async fn nats_keys_async(&self, nats_port: u16) -> Vec<String> {
        let mut keys = Vec::new();
        let config = tickvault::sink::config::NatsConfig {
            url: format!("nats://127.0.0.1:{nats_port}"),
            stream: self.stream.clone(),
            subject_prefix: self.name.clone(),
            ..Default::default()
        };
        tickvault::sink::nats::NatsSink::new(&config)
            .scan(|row| keys.push(row.key_string()))
            .await
            .unwrap();
        keys
    }

    /// Every natural key in PostgreSQL (duplicates kept).
    pub async fn postgres_keys(&self) -> Vec<String> {
        postgres(&self.name)
            .await
            .query(
                "SELECT feed || ':' || symbol || ':' || kind || ':' || timeframe || ':' || ts_ms || ':' || uid FROM events",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<_, String>(0))
            .collect()
    }

    /// Deletes one event row from PostgreSQL (a loss for `verify` to find).
    pub fn delete_one_postgres_row(&self) {
        rt().block_on(async {
            let n = postgres(&self.name)
                .await
                .execute(
                    "DELETE FROM events WHERE ctid IN (SELECT ctid FROM events LIMIT 1)",
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(n, 1);
        })
    }

    /// Swaps the days of two PostgreSQL rows: the first bar (by time) moves a
    /// millisecond past the last bar, and the last a millisecond past the first. Each
    /// day then lacks one key the log holds and holds one it lacks, and every group's
    /// count per day stays as it was. Returns the two new timestamps.
    pub fn swap_two_postgres_rows_between_days(&self) -> (i64, i64) {
        rt().block_on(async {
            let client = postgres(&self.name).await;
            let pick = |order: &'static str| {
                let client = &client;
                async move {
                    let sql = format!("SELECT ctid::text, ts_ms FROM events WHERE kind = 'bar' ORDER BY ts_ms {order} LIMIT 1");
                    let row = client.query_one(&sql, &[]).await.unwrap();
                    (row.get::<_, String>(0), row.get::<_, i64>(1))
                }
            };
            let ((first, first_ts), (last, last_ts)) = (pick("ASC").await, pick("DESC").await);
            assert!(last_ts / 86_400_000 > first_ts / 86_400_000, "the bars span one day only");
            let moved = (last_ts + 1, first_ts + 1);
            for (ctid, ts) in [(&first, moved.0), (&last, moved.1)] {
                let sql = format!(
                    "UPDATE events SET ts_ms = $1::bigint, ts = to_timestamp($1::bigint / 1000.0) WHERE ctid = '{ctid}'::tid"
                );
                assert_eq!(client.execute(&sql, &[&ts]).await.unwrap(), 1);
            }
            moved
        })
    }

    /// Publishes the stream's first message again, to its subject, without
    /// its `Nats-Msg-Id` (a copy JetStream cannot recognise, as one published past the
    /// duplicate window would be): a duplicate for `verify` to find.
    pub fn duplicate_one_nats_message(&self, nats_port: u16) {
        rt().block_on(async {
            let client = async_nats::connect(format!("nats://127.0.0.1:{nats_port}"))
                .await
                .unwrap();
            let js = async_nats::jetstream::new(client);
            let stream = js.get_stream(&self.stream).await.unwrap();
            let first = stream.get_raw_message(1).await.unwrap();
            js.publish(first.subject, first.payload).await.unwrap().await.unwrap();
        })
    }

    /// PostgreSQL's cursor rows: (log id, lane, seq).
    pub fn postgres_cursors(&self) -> Vec<(String, String, i64)> {
        rt().block_on(async {
            postgres(&self.name)
                .await
                .query("SELECT log_id, lane, seq FROM events_cursors ORDER BY 1, 2", &[])
                .await
                .unwrap()
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect()
        })
    }

    /// Asserts each sink holds exactly `expected`, each key once.
    pub fn assert_exactly(&self, nats_port: u16, expected: &HashSet<String>) {
        for (sink, keys) in self.keys(nats_port) {
            let distinct: HashSet<String> = keys.iter().cloned().collect();
            assert_eq!(
                keys.len(),
                distinct.len(),
                "{sink} holds {} duplicate rows",
                keys.len() - distinct.len()
            );
            let missing: Vec<&String> = expected.difference(&distinct).take(5).collect();
            let extra: Vec<&String> = distinct.difference(expected).take(5).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "{sink}: {} keys, expected {}; missing e.g. {missing:?}; extra e.g. {extra:?}",
                distinct.len(),
                expected.len()
            );
        }
    }
}

/// Every distinct natural key in a log's live and backfill lanes.
pub fn log_keys(log: &Path) -> HashSet<String> {
    let reader = Wal::open_read_only(log).unwrap();
    let mut keys = HashSet::new();
    for lane in [Lane::Live, Lane::Backfill] {
        reader
            .scan(lane, 0, u64::MAX, |_, record| {
                let record = record.expect("no corrupt record");
                if record.kind == EVENT_KIND {
                    keys.insert(Event::from_payload(record.payload).unwrap().natural_key().to_string());
                }
                true
            })
            .unwrap();
    }
    keys
}

/// Only the sinks: forwards what the log holds and captures (and derives) nothing new.
const DRAIN: &str = "[live]\nenabled = false\n[backfill]\nenabled = false\n[aggregate]\nenabled = false\n";

/// Runs the daemon without sources until every sink has every record of the log. A
/// stopped daemon leaves in the backfill lane what was captured after a runner's last
/// batch (the next start forwards it; only the live lane is drained at a stop), so a
/// test comparing the sinks with the whole log drains it first.
pub fn drain(dir: &Path, log: &Path, target: &Target, sim: &str, nats_port: u16) {
    let config = write_config(&dir.join("drain.toml"), DRAIN, target, nats_port);
    let daemon = Daemon::start(&config, log, sim, &dir.join("drain.stderr"));
    wait_for("the sinks to catch up with the log", Duration::from_secs(120), || {
        caught_up_in(log, &[Lane::Live, Lane::Backfill, Lane::Derived])
    });
    daemon.stop();
}

/// Whether every sink's cursor in the live and backfill lanes has reached the lane's
/// last record (the derived lane is appended to as long as the aggregator runs).
pub fn caught_up(log: &Path) -> bool {
    caught_up_in(log, &[Lane::Live, Lane::Backfill])
}

/// Whether every sink's cursor in `lanes` has reached the lane's last record.
pub fn caught_up_in(log: &Path, lanes: &[Lane]) -> bool {
    let Ok(reader) = Wal::open_read_only(log) else {
        return false;
    };
    let summary = reader.summary().unwrap();
    for &lane in lanes {
        let last = summary
            .lanes
            .iter()
            .find(|l| l.lane == lane)
            .and_then(|l| l.last_seq)
            .unwrap_or(0);
        for sink in SINKS {
            let at = summary
                .cursors
                .iter()
                .find(|c| c.sink == sink && c.lane == lane)
                .map_or(0, |c| c.seq);
            if at < last {
                return false;
            }
        }
    }
    true
}

/// Writes a config: the test's own body (log, live, backfill) and the target's sinks.
pub fn write_config(path: &Path, body: &str, target: &Target, nats_port: u16) -> PathBuf {
    std::fs::write(path, format!("{body}\n{}", target.sinks_toml(nats_port))).unwrap();
    path.to_owned()
}

/// As [`write_config`], with the sinks reached on `ports`.
pub fn write_config_at(path: &Path, body: &str, target: &Target, ports: Ports) -> PathBuf {
    std::fs::write(path, format!("{body}\n{}", target.sinks_toml_at(ports))).unwrap();
    path.to_owned()
}

/// `tickvault run` as a real process, its stderr in a file.
pub struct Daemon {
    pub child: Child,
    pub stderr: PathBuf,
    /// Where this run's output starts in `stderr`.
    from: usize,
}

impl Daemon {
    /// Starts the daemon and waits until it says it is running (its signal handler is
    /// then in place). `stderr` is appended to, so restarts share one file.
    pub fn start(config: &Path, log: &Path, sim_addr: &str, stderr: &Path) -> Daemon {
        Self::start_with_key(config, log, sim_addr, stderr, "test-key")
    }

    /// As [`Daemon::start`], with its own Polygon key: Polygon (and the simulator) allow
    /// one connection per key and cluster, so redundant appliances each have their own.
    pub fn start_with_key(config: &Path, log: &Path, sim_addr: &str, stderr: &Path, key: &str) -> Daemon {
        let runs = |path: &Path| {
            std::fs::read_to_string(path)
                .unwrap_or_default()
                .matches("tickvault running")
                .count()
        };
        let before = runs(stderr);
        let daemon = Self::spawn(config, log, sim_addr, stderr, key);
        if !waited_for(Duration::from_secs(30), || runs(stderr) > before) {
            panic!("the daemon did not start in 30 s; its output:\n{}", daemon.this_run());
        }
        daemon
    }

    /// Whether this run's backfill has finished.
    pub fn backfill_finished(&self) -> bool {
        self.this_run().contains("backfill pass done")
    }

    /// Waits (up to `timeout`) until this run's backfill has finished.
    pub fn wait_for_backfill(&self, timeout: Duration) {
        wait_for("the backfill to finish", timeout, || self.backfill_finished());
    }

    /// The output of this run only (the file may hold earlier runs): all of it, what
    /// it logged before saying it was running too (a backfill with nothing left to
    /// fetch finishes its pass by then).
    pub fn this_run(&self) -> String {
        let all = self.log();
        all.get(self.from..).unwrap_or_default().to_owned()
    }

    fn spawn(config: &Path, log: &Path, sim_addr: &str, stderr: &Path, key: &str) -> Daemon {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(stderr)
            .unwrap();
        let from = file.metadata().unwrap().len() as usize;
        let child = super::run_command(config, log, sim_addr, key)
            .env("TICKVAULT_POSTGRES_PASSWORD", PG_PASSWORD)
            .stderr(file)
            .spawn()
            .unwrap();
        Daemon {
            child: Child(child),
            stderr: stderr.to_owned(),
            from,
        }
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.0.id().to_string();
        assert!(Command::new("kill").args([signal, &pid]).status().unwrap().success());
    }

    /// SIGTERM, and wait for a clean exit; returns the stderr so far.
    pub fn stop(mut self) -> String {
        self.signal("-TERM");
        let started = Instant::now();
        loop {
            if let Some(status) = self.child.0.try_wait().unwrap() {
                let log = self.log();
                assert!(status.success(), "daemon exited {status}: {log}");
                return log;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "daemon did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(mut self) {
        self.signal("-KILL");
        let _ = self.child.0.wait();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

/// Where the daemon serves its metrics, from its log line.
pub fn metrics_addr(daemon: &Daemon) -> String {
    let mut addr = None;
    wait_for("the metrics address in the log", Duration::from_secs(10), || {
        addr = daemon
            .this_run()
            .split("metrics on http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .map(str::to_owned);
        addr.is_some()
    });
    addr.unwrap()
}

/// GET `path` from `addr` over plain HTTP/1.0: (status, body).
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

/// A nats-server of a test's own on `port` with JetStream stored in `store`, listening
/// when this returns; with `tls` (certificate and key files) it requires TLS.
pub fn nats_server(port: u16, store: &Path, tls: Option<(&Path, &Path)>) -> Child {
    let mut command = Command::new("nats-server");
    command
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(store);
    if let Some((cert, key)) = tls {
        command.arg("--tls").arg("--tlscert").arg(cert).arg("--tlskey").arg(key);
    }
    let child = Child(
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (scripts/services.sh up installs it)"),
    );
    wait_for("nats-server to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    child
}

/// Polls `done` every 200 ms until it holds, or fails after `timeout` naming `what`.
pub fn wait_for(what: &str, timeout: Duration, done: impl FnMut() -> bool) {
    wait_for_showing(what, timeout, done, String::new);
}

/// As [`wait_for`]; a failure also shows what `show` then says (a daemon's log, say).
pub fn wait_for_showing(what: &str, timeout: Duration, done: impl FnMut() -> bool, show: impl FnOnce() -> String) {
    let started = Instant::now();
    if !waited_for(timeout, done) {
        panic!("timed out after {timeout:?} waiting for {what}\n{}", show());
    }
    // Shown with a failure of the test (or with --nocapture): where its time went.
    eprintln!("waited {:.1?} for {what}", started.elapsed());
}

/// Polls `done` every 200 ms until it holds (true) or `timeout` has passed (false), for
/// a caller that says itself what was missing.
pub fn waited_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while !done() {
        if started.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    true
}

/// The entry of a JSON report's array `list` whose field `key` is `name`.
pub fn entry<'a>(report: &'a serde_json::Value, list: &str, key: &str, name: &str) -> &'a serde_json::Value {
    report[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {report:#}"))
        .iter()
        .find(|s| s[key] == name)
        .unwrap_or_else(|| panic!("no {name} in {list} of {report:#}"))
}

/// The part of `verify`'s JSON report about `sink`.
pub fn sink_report<'a>(report: &'a serde_json::Value, sink: &str) -> &'a serde_json::Value {
    entry(report, "sinks", "sink", sink)
}

/// `tickvault verify --json` on a log; returns (exit code, report).
pub fn verify(config: &Path, log: &Path) -> (i32, serde_json::Value) {
    verify_with(config, log, &[])
}

/// As [`verify`], with more arguments.
pub fn verify_with(config: &Path, log: &Path, more: &[&str]) -> (i32, serde_json::Value) {
    let out = tickvault()
        .args([
            "verify",
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            log.to_str().unwrap(),
            "--json",
        ])
        .args(more)
        .env("TICKVAULT_POSTGRES_PASSWORD", PG_PASSWORD)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("verify printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    (out.status.code().unwrap_or(-1), report)
}
