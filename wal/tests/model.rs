//! A model-based test of the whole log: random sequences of appends, cursor moves,
//! truncations, clock steps and reopens, checked after every step against a plain
//! in-memory model. Failing cases are kept in `proptest-regressions/` and committed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tickvault_wal::{Batch, Clock, Lane, RecordKind, Wal, WalOptions};

#[derive(Clone, Debug)]
enum Op {
    Append { lane: Lane, records: usize },
    MoveCursor { sink: u8, lane: Lane, percent_of_head: u64 },
    Truncate { retention_secs: u64 },
    AdvanceClock { secs: u64 },
    Reopen,
}

fn lane() -> impl Strategy<Value = Lane> {
    prop_oneof![Just(Lane::Live), Just(Lane::Backfill), Just(Lane::Derived)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (lane(), 0usize..40).prop_map(|(lane, records)| Op::Append { lane, records }),
        3 => (0u8..3, lane(), 0u64..=100).prop_map(|(sink, lane, percent_of_head)| Op::MoveCursor { sink, lane, percent_of_head }),
        2 => (0u64..4).prop_map(|retention_secs| Op::Truncate { retention_secs }),
        2 => (0u64..3).prop_map(|secs| Op::AdvanceClock { secs }),
        1 => Just(Op::Reopen),
    ]
}

/// The log as it should be.
#[derive(Default)]
struct Model {
    /// Every record ever appended per lane: (seq, payload, second it was committed in).
    written: BTreeMap<Lane, Vec<(u64, Vec<u8>, u64)>>,
    /// First retained sequence per lane.
    low: BTreeMap<Lane, u64>,
    cursors: BTreeMap<(Lane, String), u64>,
}

impl Model {
    fn head(&self, lane: Lane) -> u64 {
        self.written.get(&lane).map_or(0, |w| w.len() as u64)
    }

    fn low(&self, lane: Lane) -> u64 {
        *self.low.get(&lane).unwrap_or(&1)
    }

    fn retained_after(&self, lane: Lane, after: u64) -> Vec<(u64, Vec<u8>)> {
        let low = self.low(lane);
        self.written
            .get(&lane)
            .map(|w| {
                w.iter()
                    .filter(|(seq, _, _)| *seq > after && *seq >= low)
                    .map(|(seq, p, _)| (*seq, p.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn truncate(&mut self, now_ms: u64, retention_ms: u64) {
        let cutoff = now_ms.saturating_sub(retention_ms);
        for lane in Lane::ALL {
            let head = self.head(lane);
            let passed = self
                .cursors
                .iter()
                .filter(|((l, _), _)| *l == lane)
                .map(|(_, s)| *s)
                .min()
                .unwrap_or(head);
            let old_enough = self
                .written
                .get(&lane)
                .map(|w| {
                    w.iter()
                        .filter(|(_, _, second)| (second + 1) * 1000 <= cutoff)
                        .map(|(seq, _, _)| *seq)
                        .max()
                        .unwrap_or(0)
                })
                .unwrap_or(0);
            let upto = passed.min(old_enough).min(head);
            if upto >= self.low(lane) {
                self.low.insert(lane, upto + 1);
            }
        }
    }
}

fn payload(lane: Lane, seq: u64) -> Vec<u8> {
    format!("{lane}-{seq}-{}", "x".repeat((seq % 17) as usize)).into_bytes()
}

async fn check(wal: &Wal, model: &Model) -> Result<(), TestCaseError> {
    for lane in Lane::ALL {
        prop_assert_eq!(wal.head(lane), model.head(lane), "head of {}", lane);
        let mut positions = vec![0u64];
        positions.extend(model.cursors.iter().filter(|((l, _), _)| *l == lane).map(|(_, s)| *s));
        for after in positions {
            let read = wal.reader().read(lane, after, usize::MAX).unwrap();
            prop_assert!(read.corrupt.is_empty());
            let got: Vec<(u64, Vec<u8>)> = read.records.into_iter().map(|r| (r.seq, r.payload)).collect();
            prop_assert_eq!(got, model.retained_after(lane, after), "{} after {}", lane, after);
        }
    }
    let mut cursors: Vec<_> = wal
        .reader()
        .cursors()
        .unwrap()
        .into_iter()
        .map(|c| ((c.lane, c.sink), c.seq))
        .collect();
    cursors.sort();
    let expected: Vec<_> = model.cursors.clone().into_iter().collect();
    prop_assert_eq!(cursors, expected);
    Ok(())
}

async fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let now = Arc::new(AtomicU64::new(1_700_000_000_000));
    let options = WalOptions {
        clock: Clock::Manual(now.clone()),
        ..WalOptions::default()
    };
    let mut wal = Wal::open_with(dir.path(), options.clone()).unwrap();
    let mut model = Model::default();
    for op in ops {
        match op {
            Op::Append { lane, records } => {
                let mut batch = Batch::new();
                let head = model.head(lane);
                let second = now.load(Ordering::SeqCst) / 1000;
                for i in 1..=records as u64 {
                    let p = payload(lane, head + i);
                    batch.push(RecordKind(1), &p).unwrap();
                    model.written.entry(lane).or_default().push((head + i, p, second));
                }
                let outcome = wal.append(lane, batch).await.unwrap();
                prop_assert_eq!(outcome.durable_head, model.head(lane));
            }
            Op::MoveCursor {
                sink,
                lane,
                percent_of_head,
            } => {
                let seq = model.head(lane) * percent_of_head / 100;
                let sink = format!("sink{sink}");
                wal.move_cursor(&sink, lane, seq).await.unwrap();
                model.cursors.insert((lane, sink), seq);
            }
            Op::Truncate { retention_secs } => {
                wal.truncate(Duration::from_secs(retention_secs)).await.unwrap();
                model.truncate(now.load(Ordering::SeqCst), retention_secs * 1000);
            }
            Op::AdvanceClock { secs } => {
                now.fetch_add(secs * 1000, Ordering::SeqCst);
            }
            Op::Reopen => {
                wal.shutdown().await.unwrap();
                drop(wal);
                wal = Wal::open_with(dir.path(), options.clone()).unwrap();
            }
        }
        check(&wal, &model).await?;
    }
    wal.shutdown().await.unwrap();
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_log_behaves_like_its_model_across_appends_cursors_truncation_and_reopen(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(run(ops))?;
    }
}
