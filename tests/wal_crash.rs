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
use tickvault::event::SYNTHETIC_KIND;
use tickvault::synthetic;
use tickvault_wal::{Lane, Wal};

const ROUNDS: usize = 24;

#[test]
fn every_acknowledged_record_survives_sigkill_at_random_moments() {
    let seed: u64 = std::env::var("TICKVAULT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random());
    eprintln!("crash drill seed {seed} (set TICKVAULT_CRASH_SEED to replay)");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut durable_before = 0u64;
    let mut digest_before: Vec<u32> = Vec::new();
    let mut kills_with_acks = 0;
    for round in 0..ROUNDS {
        let producers = rng.random_range(1..=4usize);
        let batch = rng.random_range(1..=2000usize);
        let mut child = Command::new(env!("CARGO_BIN_EXE_tickvault"))
            .args(["wal", "load", "--data-dir"])
            .arg(&log)
            .args(["--lane", "live", "--records", "1000000000", "--payload-bytes", "64"])
            .args(["--producers", &producers.to_string(), "--batch", &batch.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let acked = Arc::new(AtomicU64::new(0));
        let reader = {
            let acked = acked.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(seq) = line.strip_prefix("acked live ") {
                        acked.fetch_max(seq.trim().parse().unwrap(), Ordering::SeqCst);
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(rng.random_range(40..500)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        let acked = acked.load(Ordering::SeqCst);
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
        let mut expected_seq = 1u64;
        let mut last_n: HashMap<(u32, u32), u64> = HashMap::new();
        let mut digest = Vec::with_capacity(head as usize);
        wal.reader()
            .scan(Lane::Live, 0, u64::MAX, |seq, decoded| {
                assert_eq!(seq, expected_seq, "round {round}: hole before {seq}");
                expected_seq += 1;
                let record = decoded.unwrap_or_else(|e| panic!("round {round}: record {seq} corrupt: {e}"));
                assert_eq!(record.kind, SYNTHETIC_KIND);
                let id =
                    synthetic::verify(record.payload).unwrap_or_else(|e| panic!("round {round}: record {seq}: {e}"));
                if let Some(prev) = last_n.insert((id.run, id.producer), id.n) {
                    assert!(id.n > prev, "round {round}: record {seq} out of order for its producer");
                }
                digest.push(crc32fast::hash(record.payload));
                true
            })
            .unwrap();
        assert_eq!(expected_seq - 1, head, "round {round}: records end before the head");
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
