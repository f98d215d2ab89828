//! Crash drill: a real `tickvault wal load` process appending with synced group commits
//! is killed with SIGKILL at random moments; after each kill the log is reopened and
//! every record the process acknowledged must be there, intact, in order, with no hole.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tickvault::cli::DRILL_CURSOR;
use tickvault::event::SYNTHETIC_KIND;
use tickvault::synthetic;
use tickvault_wal::{Batch, Lane, RecordKind, Wal};

const ROUNDS: usize = 24;

/// Scans the live lane and checks every record in it: no hole from the first to `head`,
/// each intact, a valid synthetic record, in order for its producer. Returns the first
/// sequence and each record's CRC from there on.
fn check_records(wal: &Wal, round: usize, head: u64) -> (u64, Vec<u32>) {
    let mut first = None;
    let mut expected_seq = 0u64;
    let mut last_n: HashMap<(u32, u32), u64> = HashMap::new();
    let mut digest = Vec::new();
    wal.reader()
        .scan(Lane::Live, 0, u64::MAX, |seq, decoded| {
            if first.is_none() {
                first = Some(seq);
                expected_seq = seq;
            }
            assert_eq!(seq, expected_seq, "round {round}: hole before {seq}");
            expected_seq += 1;
            let record = decoded.unwrap_or_else(|e| panic!("round {round}: record {seq} corrupt: {e}"));
            assert_eq!(record.kind, SYNTHETIC_KIND);
            let id = synthetic::verify(record.payload).unwrap_or_else(|e| panic!("round {round}: record {seq}: {e}"));
            if let Some(prev) = last_n.insert((id.run, id.producer), id.n) {
                assert!(id.n > prev, "round {round}: record {seq} out of order for its producer");
            }
            digest.push(crc32fast::hash(record.payload));
            true
        })
        .unwrap();
    let first = first.unwrap_or(head + 1);
    assert_eq!(
        expected_seq.max(first) - 1,
        head,
        "round {round}: records end before the head"
    );
    (first, digest)
}

/// A `tickvault wal load` process appending to the live lane, and what it printed.
struct Load {
    child: std::process::Child,
    reader: std::thread::JoinHandle<()>,
    seen: Arc<Printed>,
}

/// What a load printed: the acknowledged head, the durable cursor and the reclaims
/// started and finished, each the last seen.
#[derive(Default)]
struct Printed {
    acked: AtomicU64,
    cursor: AtomicU64,
    started: AtomicU64,
    finished: AtomicU64,
}

/// [`Printed`], read after the process ended.
#[derive(Clone, Copy, Debug)]
struct Seen {
    acked: u64,
    cursor: u64,
    /// Whether the last report before the kill said a reclaim was running.
    reclaiming: bool,
    reclaims_finished: u64,
}

impl Load {
    fn start(log: &std::path::Path, producers: usize, batch: usize, truncate_behind: Option<u64>) -> Load {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tickvault"));
        command
            .args(["wal", "load", "--data-dir"])
            .arg(log)
            .args(["--lane", "live", "--records", "1000000000", "--payload-bytes", "64"])
            .args(["--producers", &producers.to_string(), "--batch", &batch.to_string()]);
        if let Some(behind) = truncate_behind {
            command.args(["--truncate-behind", &behind.to_string()]);
        }
        let mut child = command.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let seen = Arc::new(Printed::default());
        let reader = {
            let seen = seen.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let number = |s: &str| s.trim().parse::<u64>().unwrap();
                    if let Some(seq) = line.strip_prefix("acked live ") {
                        seen.acked.fetch_max(number(seq), Ordering::SeqCst);
                    } else if let Some(seq) = line.strip_prefix("cursor live ") {
                        seen.cursor.fetch_max(number(seq), Ordering::SeqCst);
                    } else if let Some(counts) = line.strip_prefix("reclaims ") {
                        let (started, finished) = counts.split_once(' ').unwrap();
                        seen.started.store(number(started), Ordering::SeqCst);
                        seen.finished.store(number(finished), Ordering::SeqCst);
                    }
                }
            })
        };
        Load { child, reader, seen }
    }

    /// Waits until the load reports a reclaim running, for at most `limit`.
    fn wait_for_reclaim(&self, limit: Duration) {
        let started = std::time::Instant::now();
        while self.seen.started.load(Ordering::SeqCst) <= self.seen.finished.load(Ordering::SeqCst)
            && started.elapsed() < limit
        {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGKILL, then what it had printed.
    fn kill(mut self) -> Seen {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.reader.join().unwrap();
        let seen = &self.seen;
        let (started, finished) = (
            seen.started.load(Ordering::SeqCst),
            seen.finished.load(Ordering::SeqCst),
        );
        Seen {
            acked: seen.acked.load(Ordering::SeqCst),
            cursor: seen.cursor.load(Ordering::SeqCst),
            reclaiming: started > finished,
            reclaims_finished: finished,
        }
    }
}

/// What a drill runs with: its seeded randomness (`TICKVAULT_CRASH_SEED` replays one),
/// a log in a directory of its own, and a runtime for the log's async calls.
struct Drill {
    rng: rand::rngs::StdRng,
    dir: tempfile::TempDir,
    log: std::path::PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Drill {
    fn new(name: &str) -> Drill {
        let seed: u64 = std::env::var("TICKVAULT_CRASH_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| rand::rng().random());
        eprintln!("{name} seed {seed} (set TICKVAULT_CRASH_SEED to replay)");
        let dir = tempfile::tempdir().unwrap();
        Drill {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            log: dir.path().join("log"),
            dir,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }
}

#[test]
fn every_acknowledged_record_survives_sigkill_at_random_moments() {
    let Drill {
        mut rng,
        dir: _dir,
        log,
        rt,
    } = Drill::new("crash drill");

    let mut durable_before = 0u64;
    let mut digest_before: Vec<u32> = Vec::new();
    let mut kills_with_acks = 0;
    for round in 0..ROUNDS {
        let producers = rng.random_range(1..=4usize);
        let batch = rng.random_range(1..=2000usize);
        let load = Load::start(&log, producers, batch, None);
        std::thread::sleep(Duration::from_millis(rng.random_range(40..500)));
        let seen = load.kill();
        let acked = seen.acked;
        if acked > durable_before {
            kills_with_acks += 1;
        }

        // Reopen as the daemon would after a crash, and check everything.
        let wal = Wal::open(&log).unwrap();
        let head = wal.head(Lane::Live);
        assert!(
            head >= acked,
            "round {round}: acknowledged up to {acked}, head after restart is {head}"
        );
        assert!(
            head >= durable_before,
            "round {round}: head went back from {durable_before} to {head}"
        );
        let (first, digest) = check_records(&wal, round, head);
        assert_eq!(first, 1, "round {round}: the log starts at {first}");
        // What was durable before this round is unchanged.
        assert_eq!(
            &digest[..digest_before.len()],
            &digest_before[..],
            "round {round}: earlier records changed"
        );
        digest_before = digest;
        durable_before = head;
        rt.block_on(wal.shutdown()).unwrap();
        eprintln!("round {round}: {producers} producers, batches of {batch}: acked {acked}, recovered {head}");
    }
    assert!(
        kills_with_acks >= ROUNDS / 2,
        "only {kills_with_acks} of {ROUNDS} kills landed while records were being acknowledged"
    );
}

/// Kills aimed at a log's creation: a new directory each round, the load killed within
/// its first tens of milliseconds, while RocksDB makes the database's files and column
/// families (a kill there once left a directory no open would take). Every log opens
/// afterwards, holding what was acknowledged, and takes appends; at least a few kills
/// must land before the creation finished (the log found empty or not made yet).
#[test]
fn a_log_killed_while_it_is_being_created_opens_afterwards() {
    let Drill { mut rng, dir, rt, .. } = Drill::new("creation drill");
    let mut before_any_ack = 0;
    for round in 0..CREATION_ROUNDS {
        let log = dir.path().join(format!("log{round}"));
        let load = Load::start(&log, 1, rng.random_range(1..=100usize), None);
        // Within the creation: its start (process, RocksDB files) takes tens of ms, and a
        // quiet machine acknowledged the first batch before 60 ms in 11 of 12 rounds.
        std::thread::sleep(Duration::from_millis(rng.random_range(0..25)));
        let acked = load.kill().acked;
        if acked == 0 {
            before_any_ack += 1;
        }
        let wal = Wal::open(&log).unwrap_or_else(|e| panic!("round {round}, killed after {acked} acked: {e}"));
        let head = wal.head(Lane::Live);
        assert!(head >= acked, "round {round}: acknowledged up to {acked}, head {head}");
        check_records(&wal, round, head);
        let mut after = Batch::new();
        after.push(RecordKind(1), b"after the restart").unwrap();
        assert_eq!(rt.block_on(wal.append(Lane::Live, after)).unwrap().first_seq, head + 1);
        rt.block_on(wal.shutdown()).unwrap();
        eprintln!("round {round}: acked {acked}, recovered {head}");
    }
    assert!(
        before_any_ack >= 3,
        "only {before_any_ack} of {CREATION_ROUNDS} kills landed before the first acknowledgement"
    );
}

const CREATION_ROUNDS: usize = 12;

/// Kills that must land while a reclaim runs, and the fewest and most rounds.
const KILLS_WHILE_RECLAIMING: usize = 6;
const MIN_RECLAIM_ROUNDS: usize = 12;
const MAX_RECLAIM_ROUNDS: usize = 36;

/// The same drill with a sink that keeps a cursor behind the head (close, or millions of
/// records behind) and truncates what it passed all along, so the log keeps dropping
/// files and compacting the truncated range behind the writer (its space reclaim). Most
/// kills are aimed at a running reclaim; at least [`KILLS_WHILE_RECLAIMING`] must land
/// while one ran, in [`MIN_RECLAIM_ROUNDS`] rounds or more. Everything past the cursor
/// must survive, and nothing the cursor had not passed may go.
#[test]
fn nothing_past_the_cursor_is_lost_when_sigkill_lands_while_the_log_reclaims_space() {
    let Drill {
        mut rng,
        dir: _dir,
        log,
        rt,
    } = Drill::new("reclaim drill");

    let (mut head_before, mut cursor_before, mut low_before) = (0u64, 0u64, 1u64);
    let (mut first_before, mut digest_before) = (1u64, Vec::<u32>::new());
    let (mut kills_while_reclaiming, mut reclaims) = (0, 0);
    let mut rounds = 0;
    while (kills_while_reclaiming < KILLS_WHILE_RECLAIMING || rounds < MIN_RECLAIM_ROUNDS)
        && rounds < MAX_RECLAIM_ROUNDS
    {
        let round = rounds;
        rounds += 1;
        let producers = rng.random_range(1..=4usize);
        let batch = rng.random_range(100..=2000usize);
        // Close behind (what is past the cursor is still in memtables and level 0), or
        // far behind (it reaches into the files a reclaim could drop).
        let behind = if rng.random_bool(0.5) {
            rng.random_range(0..200_000u64)
        } else {
            rng.random_range(500_000..3_000_000u64)
        };
        let load = Load::start(&log, producers, batch, Some(behind));
        // Two rounds in three aim at a reclaim: the kill comes 0-15 ms after the load
        // reported one running (or 3 s on). The third runs 1-3 s, long enough for
        // RocksDB to compact the lane out of level 0 (a reclaim drops files only below
        // it), and is killed at a random moment.
        if round % 3 != 2 {
            std::thread::sleep(Duration::from_millis(rng.random_range(300..1500)));
            load.wait_for_reclaim(Duration::from_secs(3));
            std::thread::sleep(Duration::from_millis(rng.random_range(0..15)));
        } else {
            std::thread::sleep(Duration::from_millis(rng.random_range(1000..3000)));
        }
        let seen = load.kill();
        kills_while_reclaiming += usize::from(seen.reclaiming);
        reclaims += seen.reclaims_finished;

        let wal = Wal::open(&log).unwrap();
        let head = wal.head(Lane::Live);
        assert!(
            head >= seen.acked,
            "round {round}: acknowledged up to {}, head {head}",
            seen.acked
        );
        assert!(
            head >= head_before,
            "round {round}: head went back from {head_before} to {head}"
        );
        let cursor = wal.reader().cursor(DRILL_CURSOR, Lane::Live).unwrap();
        assert!(
            cursor >= seen.cursor.max(cursor_before),
            "round {round}: the cursor was durable at {} (before this round {cursor_before}), is {cursor}",
            seen.cursor
        );
        let low = wal.reader().first_retained(Lane::Live).unwrap();
        assert!(
            low <= cursor + 1,
            "round {round}: truncated to {low}, past the cursor {cursor}"
        );
        assert!(
            low >= low_before,
            "round {round}: the first retained went back from {low_before} to {low}"
        );
        let (first, digest) = check_records(&wal, round, head);
        assert_eq!(
            first, low,
            "round {round}: the lane starts at {first}, its first retained is {low}"
        );
        // Records kept through the round are unchanged.
        for seq in first.max(first_before)..=head_before {
            assert_eq!(
                digest[(seq - first) as usize],
                digest_before[(seq - first_before) as usize],
                "round {round}: record {seq} changed"
            );
        }
        let report = wal.reader().check().unwrap();
        assert!(report.is_clean(), "round {round}: {report:?}");
        assert_eq!(wal.quarantined(), 0, "round {round}: records quarantined");
        rt.block_on(wal.shutdown()).unwrap();
        eprintln!(
            "round {round}: {producers} producers, batches of {batch}, {behind} behind: acked {}, recovered {head}, cursor {cursor}, first retained {low}, reclaims finished {}{}",
            seen.acked,
            seen.reclaims_finished,
            if seen.reclaiming { ", killed with one running" } else { "" }
        );
        (head_before, cursor_before, low_before) = (head, cursor, low);
        (first_before, digest_before) = (first, digest);
    }
    eprintln!("{kills_while_reclaiming} of {rounds} kills while a reclaim ran; {reclaims} reclaims finished");
    assert!(low_before > 1, "the drill never truncated");
    // Most reclaims are killed before they finish; that a finished one gives the space
    // back is `truncating_a_finished_backfill_gives_its_disk_space_back` (wal/tests).
    assert!(
        kills_while_reclaiming >= KILLS_WHILE_RECLAIMING,
        "only {kills_while_reclaiming} of {rounds} kills landed while a reclaim ran"
    );
}
