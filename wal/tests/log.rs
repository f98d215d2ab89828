//! Behaviour of the log through its public API: cursors, truncation, corruption, poison,
//! opening, tailing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tickvault_wal::{Batch, Clock, Lane, OpenError, RecordKind, Space, Wal, WalOptions, WriteError};

fn batch(n: usize, tag: &str) -> Batch {
    let mut b = Batch::new();
    for i in 0..n {
        b.push(RecordKind(1), format!("{tag}-{i}").as_bytes()).unwrap();
    }
    b
}

fn manual_clock() -> (Arc<AtomicU64>, WalOptions) {
    let now = Arc::new(AtomicU64::new(1_700_000_000_000));
    let options = WalOptions {
        clock: Clock::Manual(now.clone()),
        ..WalOptions::default()
    };
    (now, options)
}

#[tokio::test]
async fn appends_get_dense_sequences_per_lane_starting_at_one() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let a = wal.append(Lane::Live, batch(3, "a")).await.unwrap();
    let b = wal.append(Lane::Backfill, batch(2, "b")).await.unwrap();
    let c = wal.append(Lane::Live, batch(2, "c")).await.unwrap();
    assert_eq!((a.first_seq, a.last_seq), (1, 3));
    assert_eq!((b.first_seq, b.last_seq), (1, 2));
    assert_eq!((c.first_seq, c.last_seq), (4, 5));
    assert_eq!(wal.head(Lane::Live), 5);
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn truncation_never_removes_a_record_a_sink_has_not_passed() {
    let dir = tempfile::tempdir().unwrap();
    let (now, options) = manual_clock();
    let wal = Wal::open_with(dir.path(), options).unwrap();
    wal.append(Lane::Live, batch(100, "r")).await.unwrap();
    wal.move_cursor("clickhouse", Lane::Live, 80).await.unwrap();
    wal.move_cursor("postgres", Lane::Live, 30).await.unwrap();
    now.fetch_add(3_600_000, Ordering::SeqCst);
    assert_eq!(wal.reader().first_retained(Lane::Live).unwrap(), 1);
    let out = wal.truncate(Duration::from_secs(60)).await.unwrap();
    let live = out.iter().find(|t| t.lane == Lane::Live).unwrap();
    assert_eq!(live.removed, 30, "only what the slowest sink passed");
    assert_eq!(live.first_retained, 31);
    assert_eq!(wal.reader().first_retained(Lane::Live).unwrap(), 31);
    assert_eq!(wal.reader().first_retained(Lane::Backfill).unwrap(), 1);
    let read = wal.reader().read(Lane::Live, 0, usize::MAX).unwrap();
    assert_eq!(read.records.first().unwrap().seq, 31);
    assert_eq!(read.records.len(), 70);
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_record_older_than_retention_but_not_passed_by_every_sink_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (now, options) = manual_clock();
    let wal = Wal::open_with(dir.path(), options).unwrap();
    wal.append(Lane::Backfill, batch(10, "old")).await.unwrap();
    wal.move_cursor("nats", Lane::Backfill, 10).await.unwrap();
    wal.move_cursor("postgres", Lane::Backfill, 0).await.unwrap();
    now.fetch_add(30 * 86_400_000, Ordering::SeqCst);
    let out = wal.truncate(Duration::from_secs(86_400)).await.unwrap();
    assert!(out.iter().all(|t| t.removed == 0));
    assert_eq!(
        wal.reader().read(Lane::Backfill, 0, usize::MAX).unwrap().records.len(),
        10
    );
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_record_every_sink_passed_stays_until_it_is_older_than_retention() {
    let dir = tempfile::tempdir().unwrap();
    let (now, options) = manual_clock();
    let wal = Wal::open_with(dir.path(), options).unwrap();
    wal.append(Lane::Live, batch(5, "first")).await.unwrap();
    now.fetch_add(10_000, Ordering::SeqCst);
    wal.append(Lane::Live, batch(5, "second")).await.unwrap();
    wal.move_cursor("clickhouse", Lane::Live, 10).await.unwrap();
    now.fetch_add(5_000, Ordering::SeqCst);
    // Retention 8 s: the first five (15 s old) go, the second five (5 s old) stay.
    let out = wal.truncate(Duration::from_secs(8)).await.unwrap();
    assert_eq!(out.iter().find(|t| t.lane == Lane::Live).unwrap().removed, 5);
    let left: Vec<u64> = wal
        .reader()
        .read(Lane::Live, 0, usize::MAX)
        .unwrap()
        .records
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(left, vec![6, 7, 8, 9, 10]);
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn sequences_continue_after_everything_was_truncated_and_the_log_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let (now, options) = manual_clock();
    let wal = Wal::open_with(dir.path(), options.clone()).unwrap();
    wal.append(Lane::Live, batch(7, "x")).await.unwrap();
    wal.move_cursor("s", Lane::Live, 7).await.unwrap();
    now.fetch_add(10_000, Ordering::SeqCst);
    wal.truncate(Duration::ZERO).await.unwrap();
    assert!(wal.reader().read(Lane::Live, 0, 10).unwrap().records.is_empty());
    // An emptied lane still tells that it was truncated.
    assert_eq!(wal.reader().first_retained(Lane::Live).unwrap(), 8);
    wal.shutdown().await.unwrap();
    drop(wal);
    let wal = Wal::open_with(dir.path(), options).unwrap();
    assert_eq!(wal.head(Lane::Live), 7);
    let next = wal.append(Lane::Live, batch(1, "y")).await.unwrap();
    assert_eq!(next.first_seq, 8);
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_cursor_cannot_move_past_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    wal.append(Lane::Live, batch(3, "a")).await.unwrap();
    let err = wal.move_cursor("pg", Lane::Live, 4).await.unwrap_err();
    assert!(
        matches!(err, WriteError::CursorBeyondHead { seq: 4, head: 3, .. }),
        "{err}"
    );
    assert_eq!(wal.reader().cursor("pg", Lane::Live).unwrap(), 0);
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_cursor_note_is_kept_with_its_move_survives_a_reopen_and_goes_with_the_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    wal.append(Lane::Live, batch(5, "a")).await.unwrap();
    assert_eq!(wal.reader().cursor_note("nats", Lane::Live).unwrap(), None);
    wal.move_cursor_noted("nats", Lane::Live, 2, Some(b"at 2".to_vec()))
        .await
        .unwrap();
    // A move without a note keeps the last one; other lanes and sinks have none.
    wal.move_cursor("nats", Lane::Live, 3).await.unwrap();
    assert_eq!(
        wal.reader().cursor_note("nats", Lane::Live).unwrap().as_deref(),
        Some(&b"at 2"[..])
    );
    assert_eq!(wal.reader().cursor_note("nats", Lane::Backfill).unwrap(), None);
    assert_eq!(wal.reader().cursor_note("pg", Lane::Live).unwrap(), None);
    // A move the log refuses writes no note either.
    let err = wal
        .move_cursor_noted("nats", Lane::Live, 9, Some(b"at 9".to_vec()))
        .await
        .unwrap_err();
    assert!(matches!(err, WriteError::CursorBeyondHead { .. }), "{err}");
    assert_eq!(
        wal.reader().cursor_note("nats", Lane::Live).unwrap().as_deref(),
        Some(&b"at 2"[..])
    );
    wal.move_cursor_noted("nats", Lane::Live, 5, Some(b"at 5".to_vec()))
        .await
        .unwrap();
    wal.shutdown().await.unwrap();
    drop(wal);

    let wal = Wal::open(dir.path()).unwrap();
    assert_eq!(wal.reader().cursor("nats", Lane::Live).unwrap(), 5);
    assert_eq!(
        wal.reader().cursor_note("nats", Lane::Live).unwrap().as_deref(),
        Some(&b"at 5"[..])
    );
    wal.delete_cursor("nats", Lane::Live).await.unwrap();
    assert_eq!(wal.reader().cursor_note("nats", Lane::Live).unwrap(), None);
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_append_with_state_writes_the_records_and_the_key_together() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let out = wal
        .append_with_state(
            Lane::Backfill,
            batch(3, "bars"),
            Space::State,
            b"progress".to_vec(),
            b"3".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!((out.first_seq, out.last_seq), (1, 3));
    assert_eq!(
        wal.reader().get_state(Space::State, b"progress").unwrap().as_deref(),
        Some(&b"3"[..])
    );
    wal.shutdown().await.unwrap();
    drop(wal);
    let wal = Wal::open(dir.path()).unwrap();
    assert_eq!(wal.head(Lane::Backfill), 3);
    assert_eq!(
        wal.reader().get_state(Space::State, b"progress").unwrap().as_deref(),
        Some(&b"3"[..])
    );
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_corrupt_record_is_quarantined_counted_and_reading_continues_past_it() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    wal.append(Lane::Live, batch(2, "good")).await.unwrap();
    let mut raw = tickvault_wal::record::encode(RecordKind(1), b"will be corrupted").unwrap();
    raw[12] ^= 0x40;
    let bad = wal.append_raw_for_test(Lane::Live, &raw).await.unwrap();
    assert_eq!(bad.first_seq, 3);
    wal.append(Lane::Live, batch(2, "after")).await.unwrap();

    let mut tail = wal.tail(Lane::Live, 0);
    let read = tail.next_batch(100).await.unwrap().unwrap();
    assert_eq!(read.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 4, 5]);
    assert_eq!(read.corrupt.len(), 1);
    assert_eq!((read.corrupt[0].lane, read.corrupt[0].seq), (Lane::Live, 3));
    assert_eq!(tail.position(), 5);

    // The quarantine copy is written through the writer; a synced write after it
    // guarantees it has been applied.
    wal.move_cursor("probe", Lane::Live, 0).await.unwrap();
    assert_eq!(wal.quarantined(), 1);
    let q = wal.reader().quarantined().unwrap();
    assert_eq!(q, vec![(Lane::Live, 3, raw.clone())]);
    // Reading it again does not count it twice.
    wal.reader().read(Lane::Live, 0, 100).unwrap();
    wal.move_cursor("probe", Lane::Live, 0).await.unwrap();
    assert_eq!(wal.quarantined(), 1);

    let report = wal.reader().check().unwrap();
    assert_eq!(report.good, 4);
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(report.corrupt[0].seq, 3);
    // Ingest goes on.
    assert_eq!(wal.append(Lane::Live, batch(1, "more")).await.unwrap().first_seq, 6);
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_tail_reader_wakes_on_new_appends() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    let mut tail = wal.tail(Lane::Live, 0);
    let waiter = tokio::spawn(async move { tail.next_batch(10).await.unwrap().unwrap() });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished(), "the tail returned before anything was appended");
    wal.append(Lane::Live, batch(3, "t")).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got.records.len(), 3);
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_tail_asked_for_no_records_reads_one_and_skips_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    wal.append(Lane::Live, batch(3, "t")).await.unwrap();
    let mut tail = wal.tail(Lane::Live, 0);
    let read = tokio::time::timeout(Duration::from_secs(5), tail.next_batch(0))
        .await
        .expect("skipped to the head and waited for more")
        .unwrap()
        .unwrap();
    assert_eq!(read.records.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1]);
    assert_eq!(tail.position(), 1);
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_tail_ends_after_the_log_shuts_down_and_it_has_read_everything() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    wal.append(Lane::Derived, batch(2, "d")).await.unwrap();
    let mut tail = wal.tail(Lane::Derived, 0);
    wal.shutdown().await.unwrap();
    drop(wal);
    assert_eq!(tail.next_batch(10).await.unwrap().unwrap().records.len(), 2);
    assert!(tail.next_batch(10).await.unwrap().is_none());
}

#[tokio::test]
async fn a_read_only_open_sees_the_log_while_the_writer_runs() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    wal.append(Lane::Live, batch(4, "ro")).await.unwrap();
    wal.move_cursor("pg", Lane::Live, 2).await.unwrap();
    let ro = Wal::open_read_only(dir.path()).unwrap();
    let summary = ro.summary().unwrap();
    let live = summary.lanes.iter().find(|l| l.lane == Lane::Live).unwrap();
    assert_eq!((live.first_seq, live.last_seq, live.records), (Some(1), Some(4), 4));
    assert_eq!(summary.cursors.len(), 1);
    assert_eq!(summary.cursors[0].seq, 2);
    wal.append(Lane::Live, batch(1, "more")).await.unwrap();
    wal.shutdown().await.unwrap();
}

#[test]
fn a_directory_that_is_not_a_log_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("notes.txt"), "precious").unwrap();
    let err = Wal::open(dir.path()).err().unwrap();
    assert!(matches!(err, OpenError::NotALog { .. }), "{err}");
    assert!(err.to_string().contains("not a tickvault log"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("notes.txt")).unwrap(),
        "precious"
    );
}

/// RocksDB makes a new database's files and column families one after another; a
/// crash among them (seen in the SIGKILL drill) left a database without the log's
/// metadata, refused by every later open. The marker the creation starts with tells such
/// a directory from any other: cleared and made again, while one without the marker is
/// still refused and left alone.
#[tokio::test]
async fn a_creation_cut_short_is_made_again_and_a_database_without_the_marker_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let half_made = |path: &std::path::Path, marker: bool| {
        std::fs::create_dir_all(path).unwrap();
        if marker {
            std::fs::write(path.join("TICKVAULT-CREATING"), "").unwrap();
        }
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        drop(rocksdb::DB::open(&options, path).unwrap());
    };
    let foreign = dir.path().join("foreign");
    half_made(&foreign, false);
    let err = Wal::open(&foreign).err().unwrap();
    assert!(matches!(err, OpenError::NotALog { .. }), "{err}");

    let cut_short = dir.path().join("cut_short");
    half_made(&cut_short, true);
    let err = Wal::open_read_only(&cut_short).err().unwrap();
    assert!(matches!(err, OpenError::NotFound { .. }), "{err}");
    let wal = Wal::open(&cut_short).unwrap();
    wal.append(Lane::Live, batch(1, "first")).await.unwrap();
    wal.shutdown().await.unwrap();
    drop(wal);
    assert!(!cut_short.join("TICKVAULT-CREATING").exists());
    let reader = Wal::open_read_only(&cut_short).unwrap();
    assert_eq!(reader.last_seq(Lane::Live).unwrap(), Some(1));
}

/// A fresh ext4 file system's root holds lost+found: refused, as any directory with
/// other files, but saying what to do.
#[test]
fn a_mount_point_is_refused_with_a_hint_to_make_a_directory_under_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("lost+found")).unwrap();
    let err = Wal::open(dir.path()).err().unwrap();
    assert!(matches!(err, OpenError::NotALog { .. }), "{err}");
    assert!(err.to_string().contains("make a directory under it"), "{err}");
    assert!(dir.path().join("lost+found").is_dir());
    Wal::open(dir.path().join("log")).unwrap();
}

#[test]
fn a_missing_directory_is_not_found_for_read_only_inspection() {
    let dir = tempfile::tempdir().unwrap();
    let err = Wal::open_read_only(dir.path().join("nope")).err().unwrap();
    assert!(matches!(err, OpenError::NotFound { .. }), "{err}");
}

#[tokio::test]
async fn a_log_an_older_build_wrote_is_stamped_with_this_builds_format_when_opened_for_writing() {
    let dir = tempfile::tempdir().unwrap();
    Wal::open(dir.path()).unwrap().shutdown().await.unwrap();
    tickvault_wal::stamp_format_version_for_test(dir.path(), 0).unwrap();
    // Reading leaves it as it is; writing says the log now holds this build's records.
    assert_eq!(
        Wal::open_read_only(dir.path())
            .unwrap()
            .summary()
            .unwrap()
            .format_version,
        0
    );
    let wal = Wal::open(dir.path()).unwrap();
    assert_eq!(
        wal.reader().summary().unwrap().format_version,
        tickvault_wal::FORMAT_VERSION
    );
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_lane_whose_last_key_is_not_a_sequence_is_refused_at_open_instead_of_read_as_empty() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    wal.append(Lane::Live, batch(3, "k")).await.unwrap();
    wal.shutdown().await.unwrap();
    drop(wal);
    {
        let names = rocksdb::DB::list_cf(&rocksdb::Options::default(), dir.path()).unwrap();
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), dir.path(), &names).unwrap();
        // Sorts after every sequence key.
        db.put_cf(
            db.cf_handle("live").unwrap(),
            b"\xff\xff\xff\xff\xff\xff\xff\xff\xff",
            b"x",
        )
        .unwrap();
    }
    let err = Wal::open(dir.path()).err().unwrap();
    assert!(matches!(err, OpenError::NotALog { .. }), "{err}");
    assert!(err.to_string().contains("live lane's last key"), "{err}");
}

#[tokio::test]
async fn a_log_written_by_a_newer_format_is_refused_with_both_versions_named() {
    let dir = tempfile::tempdir().unwrap();
    let wal = Wal::open(dir.path()).unwrap();
    wal.append(Lane::Live, batch(1, "v1")).await.unwrap();
    wal.shutdown().await.unwrap();
    drop(wal);
    tickvault_wal::stamp_format_version_for_test(dir.path(), 9).unwrap();
    let err = Wal::open(dir.path()).err().unwrap();
    assert!(
        matches!(
            err,
            OpenError::NewerFormat {
                found: 9,
                supported: 1,
                ..
            }
        ),
        "{err}"
    );
    let err = Wal::open_read_only(dir.path()).err().unwrap();
    assert!(err.to_string().contains("newer tickvault"), "{err}");
}

mod failpoints {
    use super::*;

    // Fail points are process-global: these run one at a time under a scenario.
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test]
    async fn a_truncation_that_fails_part_way_removes_nothing_from_any_lane() {
        let _serial = SERIAL.lock().await;
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let (now, options) = manual_clock();
        let wal = Wal::open_with(dir.path(), options).unwrap();
        for lane in [Lane::Live, Lane::Backfill] {
            wal.append(lane, batch(10, "t")).await.unwrap();
            wal.move_cursor("s", lane, 10).await.unwrap();
        }
        now.fetch_add(10_000, Ordering::SeqCst);
        // Live is planned first; reading the backfill lane's index then fails.
        fail::cfg("wal::truncate_read", "return").unwrap();
        assert!(wal.truncate(Duration::ZERO).await.is_err());
        fail::remove("wal::truncate_read");
        // A synced write after it: whatever the failed truncation's group held is applied.
        wal.move_cursor("probe", Lane::Derived, 0).await.unwrap();
        assert_eq!(
            wal.reader().first_retained(Lane::Live).unwrap(),
            1,
            "live was truncated by a failed truncation"
        );
        assert_eq!(wal.reader().read(Lane::Live, 0, 100).unwrap().records.len(), 10);
        // And the next one removes both.
        wal.truncate(Duration::ZERO).await.unwrap();
        assert_eq!(wal.reader().first_retained(Lane::Live).unwrap(), 11);
        assert_eq!(wal.reader().first_retained(Lane::Backfill).unwrap(), 11);
        wal.shutdown().await.unwrap();
        scenario.teardown();
    }

    #[tokio::test]
    async fn a_reclaim_that_falls_due_while_another_runs_starts_once_that_one_finished() {
        let _serial = SERIAL.lock().await;
        let scenario = fail::FailScenario::setup();
        // The first reclaim waits at its start until the test lets it go.
        fail::cfg("wal::reclaim", "pause").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (now, options) = manual_clock();
        let wal = Wal::open_with(dir.path(), options).unwrap();
        // A lane's truncations start a reclaim once they removed 100,000 records.
        let truncate_all = async |lane: Lane| {
            wal.append(lane, batch(100_000, "r")).await.unwrap();
            wal.move_cursor("s", lane, wal.head(lane)).await.unwrap();
            now.fetch_add(10_000, Ordering::SeqCst);
            wal.truncate(Duration::ZERO).await.unwrap();
        };
        truncate_all(Lane::Live).await;
        assert_eq!(wal.reclaims().0, 1);
        // Due while the first runs: not started yet.
        truncate_all(Lane::Backfill).await;
        assert_eq!(wal.reclaims(), (1, 0));
        fail::remove("wal::reclaim");
        let started = std::time::Instant::now();
        while wal.reclaims().1 < 1 {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the first reclaim never finished"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Nothing is left to truncate: a later group (a truncation removing nothing, as
        // the daemon's timer makes) starts it once the first one's thread has ended.
        let started = std::time::Instant::now();
        while wal.reclaims().0 < 2 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the reclaim that fell due meanwhile was dropped"
            );
            let out = wal.truncate(Duration::ZERO).await.unwrap();
            assert!(out.iter().all(|t| t.removed == 0));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        wal.shutdown().await.unwrap();
        scenario.teardown();
    }

    #[tokio::test]
    async fn a_failed_sync_poisons_the_log_and_nothing_after_it_is_acknowledged() {
        let _serial = SERIAL.lock().await;
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        wal.append(Lane::Live, batch(3, "before")).await.unwrap();
        fail::cfg("wal::sync", "return").unwrap();
        let err = wal.append(Lane::Live, batch(2, "lost")).await.unwrap_err();
        assert!(matches!(err, WriteError::Failed { .. }), "{err}");
        fail::remove("wal::sync");
        // Even with the fault gone, the log refuses writes: it cannot know what is on disk.
        let err = wal.append(Lane::Live, batch(1, "refused")).await.unwrap_err();
        assert!(matches!(err, WriteError::Poisoned { .. }), "{err}");
        assert!(wal.poisoned().is_some());
        assert!(wal.move_cursor("pg", Lane::Live, 1).await.is_err());
        // What was acknowledged is still there and readable.
        assert_eq!(wal.reader().read(Lane::Live, 0, 100).unwrap().records.len(), 3);
        wal.shutdown().await.unwrap();
        drop(wal);
        // A restart recovers, and the unacknowledged batch never appeared.
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.head(Lane::Live), 3);
        assert_eq!(wal.append(Lane::Live, batch(1, "after")).await.unwrap().first_seq, 4);
        wal.shutdown().await.unwrap();
        scenario.teardown();
    }

    #[tokio::test]
    async fn coverage_marks_are_ored_together_and_go_to_disk_with_their_records_or_not_at_all() {
        let _serial = SERIAL.lock().await;
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        let marked = |records: usize, tag: &str, key: &[u8], bits: Vec<u8>| {
            let mut b = batch(records, tag);
            b.cover(key.to_vec(), bits);
            b
        };
        wal.append(Lane::Backfill, marked(2, "a", b"k1", vec![0b0001]))
            .await
            .unwrap();
        wal.append(Lane::Live, marked(1, "b", b"k1", vec![0b0100, 0b1]))
            .await
            .unwrap();
        // Marks alone (a rebuild, a period's source holes with no bar).
        wal.append(Lane::Backfill, marked(0, "c", b"k2", vec![0, 0, 0b1000]))
            .await
            .unwrap();
        assert_eq!(
            wal.reader().get_state(Space::Coverage, b"k1").unwrap(),
            Some(vec![0b0101, 0b1])
        );
        fail::cfg("wal::sync", "return").unwrap();
        assert!(wal
            .append(Lane::Backfill, marked(1, "lost", b"k1", vec![0b10]))
            .await
            .is_err());
        fail::remove("wal::sync");
        wal.shutdown().await.unwrap();
        drop(wal);
        let reader = Wal::open_read_only(dir.path()).unwrap();
        assert_eq!(
            reader.get_state(Space::Coverage, b"k1").unwrap(),
            Some(vec![0b0101, 0b1]),
            "the failed write's mark is not there"
        );
        assert_eq!(
            reader.get_state(Space::Coverage, b"k2").unwrap(),
            Some(vec![0, 0, 0b1000])
        );
        assert_eq!(reader.last_seq(Lane::Backfill).unwrap(), Some(2), "nor its record");
        scenario.teardown();
    }

    #[tokio::test]
    async fn a_full_disk_is_named_as_such_and_refuses_further_writes() {
        let _serial = SERIAL.lock().await;
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        wal.append(Lane::Backfill, batch(5, "kept")).await.unwrap();
        fail::cfg("wal::disk_full", "return").unwrap();
        let err = wal.append(Lane::Backfill, batch(5, "nospace")).await.unwrap_err();
        assert!(matches!(err, WriteError::DiskFull { .. }), "{err}");
        assert!(err.to_string().contains("disk full"), "{err}");
        fail::remove("wal::disk_full");
        assert!(matches!(
            wal.append(Lane::Live, batch(1, "x")).await.unwrap_err(),
            WriteError::Poisoned { .. }
        ));
        assert_eq!(wal.reader().read(Lane::Backfill, 0, 100).unwrap().records.len(), 5);
        wal.shutdown().await.unwrap();
        scenario.teardown();
    }

    #[tokio::test]
    async fn a_failed_cursor_write_leaves_the_cursor_where_it_was() {
        let _serial = SERIAL.lock().await;
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        wal.append(Lane::Live, batch(10, "c")).await.unwrap();
        wal.move_cursor("pg", Lane::Live, 4).await.unwrap();
        fail::cfg("wal::cursor_write", "return").unwrap();
        assert!(wal.move_cursor("pg", Lane::Live, 9).await.is_err());
        fail::remove("wal::cursor_write");
        assert_eq!(wal.reader().cursor("pg", Lane::Live).unwrap(), 4);
        wal.shutdown().await.unwrap();
        drop(wal);
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.reader().cursor("pg", Lane::Live).unwrap(), 4);
        wal.shutdown().await.unwrap();
        scenario.teardown();
    }

    /// Holds the writer in its first commit (400 ms) while `appends` backfill appends of
    /// `records` each queue up behind it, in order, then a live append of one record.
    /// Returns the live append's outcome and the backfill appends', in order.
    async fn live_behind_queued_backfill(
        wal: &Wal,
        appends: usize,
        records: usize,
    ) -> (tickvault_wal::AppendOutcome, Vec<tickvault_wal::AppendOutcome>) {
        fail::cfg("wal::sync", "1*sleep(400)").unwrap();
        let priming = tokio::spawn({
            let wal = wal.clone();
            async move { wal.append(Lane::Live, batch(1, "prime")).await.unwrap() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut backfills = Vec::new();
        for i in 0..appends {
            let wal = wal.clone();
            backfills.push(tokio::spawn(async move {
                wal.append(Lane::Backfill, batch(records, &format!("b{i}")))
                    .await
                    .unwrap()
            }));
            // In order: each is in the channel before the next is sent.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let live = tokio::spawn({
            let wal = wal.clone();
            async move { wal.append(Lane::Live, batch(1, "tick")).await.unwrap() }
        });
        priming.await.unwrap();
        let live = live.await.unwrap();
        fail::remove("wal::sync");
        let mut outcomes = Vec::new();
        for b in backfills {
            outcomes.push(b.await.unwrap());
        }
        (live, outcomes)
    }

    /// Every backfill append got the next dense range of sequences, in the order sent,
    /// and the lane holds each append's records where its range says.
    fn assert_backfill_in_order(wal: &Wal, outcomes: &[tickvault_wal::AppendOutcome], records: u64) {
        for (i, outcome) in outcomes.iter().enumerate() {
            let first = 1 + i as u64 * records;
            assert_eq!(
                (outcome.first_seq, outcome.last_seq),
                (first, first + records - 1),
                "append {i}"
            );
        }
        let read = wal.reader().read(Lane::Backfill, 0, usize::MAX).unwrap();
        assert_eq!(read.records.len() as u64, outcomes.len() as u64 * records);
        for (i, record) in read.records.iter().enumerate().step_by(records as usize) {
            assert_eq!(record.payload, format!("b{}-0", i as u64 / records).as_bytes());
        }
    }

    #[tokio::test]
    async fn a_live_append_does_not_wait_behind_a_deep_backfill_queue() {
        let _serial = SERIAL.lock().await;
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        let (live, backfills) = live_behind_queued_backfill(&wal, 10, 10_000).await;
        // The live record rode with at most one backfill append, not with all 100,000.
        assert!(
            live.group_records <= 10_001,
            "live append committed in a group of {}",
            live.group_records
        );
        assert_backfill_in_order(&wal, &backfills, 10_000);
        wal.shutdown().await.unwrap();
        scenario.teardown();
    }

    #[tokio::test]
    async fn a_live_append_shares_its_group_with_at_most_a_couple_of_thousand_backfill_records() {
        let _serial = SERIAL.lock().await;
        let scenario = fail::FailScenario::setup();
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path()).unwrap();
        // Without the rule the live record would ride with eight of the ten (the
        // 8,192-record cap of any group).
        let (live, backfills) = live_behind_queued_backfill(&wal, 10, 1_000).await;
        assert!(
            live.group_records <= 2_001,
            "live append committed in a group of {}",
            live.group_records
        );
        // The appends sent back to the next group kept their order and dense sequences.
        assert_backfill_in_order(&wal, &backfills, 1_000);
        wal.shutdown().await.unwrap();
        scenario.teardown();
    }
}

/// The on-disk size of the lane's data as the log reports it (`wal summary`).
fn lane_bytes(wal: &Wal, lane: Lane) -> u64 {
    let summary = wal.reader().summary().unwrap();
    summary.lanes.iter().find(|l| l.lane == lane).unwrap().bytes
}

#[tokio::test]
async fn truncating_a_finished_backfill_gives_its_disk_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let (now, options) = manual_clock();
    let wal = Wal::open_with(dir.path(), options.clone()).unwrap();
    // About 50 MB that does not compress: more than a memtable, so SST files hold it.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..120 {
        let mut b = Batch::new();
        for _ in 0..2_000 {
            let record: Vec<u8> = (0..25)
                .flat_map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state.to_le_bytes()
                })
                .collect();
            b.push(RecordKind(1), &record).unwrap();
        }
        wal.append(Lane::Backfill, b).await.unwrap();
    }
    let head = wal.head(Lane::Backfill);
    wal.move_cursor("s", Lane::Backfill, head).await.unwrap();
    wal.shutdown().await.unwrap();
    drop(wal);
    // Reopening flushes what the memtables held: now it is all in SST files.
    let wal = Wal::open_with(dir.path(), options).unwrap();
    let before = lane_bytes(&wal, Lane::Backfill);
    assert!(before > 40 << 20, "{before} bytes");

    // The lane gets no more writes, so no compaction would ever run over its files.
    now.fetch_add(10_000, Ordering::SeqCst);
    let out = wal.truncate(Duration::ZERO).await.unwrap();
    let removed: u64 = out.iter().filter(|t| t.lane == Lane::Backfill).map(|t| t.removed).sum();
    assert_eq!(removed, head);
    let started = std::time::Instant::now();
    while lane_bytes(&wal, Lane::Backfill) > before / 10 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the truncated lane still takes {} of {before} bytes",
            lane_bytes(&wal, Lane::Backfill)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(wal.reader().read(Lane::Backfill, 0, 10).unwrap().records.is_empty());
    wal.shutdown().await.unwrap();
}

/// The bytes of RocksDB's write-ahead files (`*.log`) in the log's directory.
fn write_ahead_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

#[tokio::test]
async fn rocksdbs_write_ahead_files_stay_bounded_and_read_only_opens_succeed_under_a_long_truncating_load() {
    let dir = tempfile::tempdir().unwrap();
    let (now, options) = manual_clock();
    let wal = Wal::open_with(dir.path(), options).unwrap();
    // Twice the bound through the backfill lane, a cursor moved and the log
    // truncated after every batch: the cursors' and time index's column families are
    // written with every group and never fill a memtable of their own.
    let record = vec![0x5au8; 16 << 10];
    let batches = 2 * tickvault_wal::MAX_WAL_BYTES / (1024 * record.len() as u64);
    // Beside it, read-only opens (as `wal summary` and `verify` make) while the writer
    // deletes the write-ahead files they replay.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let inspector = {
        let (path, stop) = (dir.path().to_owned(), stop.clone());
        std::thread::spawn(move || {
            let mut opened = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = Wal::open_read_only(&path) {
                    return Err(format!("read-only open {opened} failed: {e}"));
                }
                opened += 1;
            }
            Ok(opened)
        })
    };
    let mut most = 0;
    for _ in 0..batches {
        let mut b = Batch::new();
        for _ in 0..1024 {
            b.push(RecordKind(1), &record).unwrap();
        }
        let out = wal.append(Lane::Backfill, b).await.unwrap();
        wal.move_cursor("s", Lane::Backfill, out.last_seq).await.unwrap();
        now.fetch_add(2_000, Ordering::SeqCst);
        wal.truncate(Duration::from_secs(1)).await.unwrap();
        most = most.max(write_ahead_bytes(dir.path()));
    }
    stop.store(true, Ordering::Relaxed);
    let opened = inspector.join().unwrap().unwrap();
    assert!(opened > 0);
    // The bound, and the memtables that may fill past it before their flush releases a file.
    let limit = tickvault_wal::MAX_WAL_BYTES + (96 << 20);
    assert!(
        most <= limit,
        "write-ahead files reached {most} bytes, the bound is {limit}"
    );
    wal.shutdown().await.unwrap();
    drop(wal);
    // What a reopen replays is what is left of them.
    assert!(write_ahead_bytes(dir.path()) <= limit);
    let wal = Wal::open(dir.path()).unwrap();
    assert_eq!(wal.head(Lane::Backfill), batches * 1024);
    wal.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_corrupt_record_found_while_the_writer_is_busy_is_copied_before_a_truncation_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (now, mut options) = manual_clock();
    // One command may wait for the writer: busy appenders keep the channel full.
    options.channel_capacity = 1;
    let wal = Wal::open_with(dir.path(), options).unwrap();
    wal.append(Lane::Live, batch(2, "good")).await.unwrap();
    let mut raw = tickvault_wal::record::encode(RecordKind(1), b"will be corrupted").unwrap();
    raw[12] ^= 0x40;
    assert_eq!(wal.append_raw_for_test(Lane::Live, &raw).await.unwrap().first_seq, 3);
    let busy: Vec<_> = (0..4)
        .map(|_| {
            let wal = wal.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    wal.append(Lane::Backfill, batch(2_000, "busy")).await.unwrap();
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(20)).await;
    // Found twice while the writer is busy...
    for _ in 0..2 {
        assert_eq!(wal.reader().read(Lane::Live, 0, 100).unwrap().corrupt.len(), 1);
    }
    // ...then passed by every sink and old enough: the next truncation removes it.
    wal.move_cursor("s", Lane::Live, 3).await.unwrap();
    now.fetch_add(3_600_000, Ordering::SeqCst);
    wal.truncate(Duration::from_secs(1)).await.unwrap();
    assert_eq!(wal.reader().first_retained(Lane::Live).unwrap(), 4);
    assert_eq!(wal.reader().quarantined().unwrap(), vec![(Lane::Live, 3, raw)]);
    assert_eq!(wal.quarantined(), 1, "counted once");
    for task in busy {
        task.await.unwrap();
    }
    wal.shutdown().await.unwrap();
}
