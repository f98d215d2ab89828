//! Gaps: intervals in which the appliance may have missed data. The live collector
//! records every disconnect as a suspected gap; the gap detector (to come) reads them,
//! with the coverage index, to schedule backfill.

use serde::{Deserialize, Serialize};
use tickvault_wal::{Space, Wal, WriteError};

use crate::event::Feed;

/// A suspected gap: events of `symbols` with timestamps in `from_ms..=to_ms` may be
/// missing, because the feed was disconnected in between.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SuspectedGap {
    pub feed: Feed,
    pub symbols: Vec<String>,
    /// Timestamp of the last event received before the disconnect (or the connect
    /// time, when none had arrived).
    pub from_ms: i64,
    /// Timestamp of the first event received after the reconnect (or the time capture
    /// stopped, when none arrived).
    pub to_ms: i64,
    /// Why the connection ended.
    pub cause: String,
}

const PREFIX: &str = "gap/suspected/";

/// Sorted by start; the end and the time it was recorded keep two gaps with one start
/// (no event between two disconnects) two records.
fn key(gap: &SuspectedGap) -> Vec<u8> {
    let mut key = format!("{PREFIX}{}/", gap.feed).into_bytes();
    key.extend_from_slice(&gap.from_ms.to_be_bytes());
    key.extend_from_slice(&gap.to_ms.to_be_bytes());
    let recorded_ns = jiff::Timestamp::now().as_nanosecond();
    key.extend_from_slice(&i64::try_from(recorded_ns).unwrap_or(i64::MAX).to_be_bytes());
    key
}

/// Stores a suspected gap durably.
pub async fn record(wal: &Wal, gap: &SuspectedGap) -> Result<(), WriteError> {
    let value = serde_json::to_vec(gap).map_err(|e| WriteError::Failed { cause: e.to_string() })?;
    wal.put_state(Space::State, key(gap), Some(value)).await
}

/// Every suspected gap in the log, oldest first per feed.
pub fn suspected(reader: &tickvault_wal::LogReader) -> Result<Vec<SuspectedGap>, tickvault_wal::ReadError> {
    Ok(reader
        .scan_state(Space::State, PREFIX.as_bytes())?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect())
}
