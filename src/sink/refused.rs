//! Records a sink refused for their content, set aside for that sink alone.
//!
//! A value a destination cannot store (a NUL in PostgreSQL text, a message larger than
//! the NATS server takes) fails the whole batch, and retrying it would stall the lane
//! for good: the runner halves the batch until it finds the row, and sets the record
//! aside here, in the log's state space, in the same durable write as nothing else: a
//! copy of the record, the sink and its reason. The other sinks are not affected, and
//! the runner's cursor moves past it. `verify` counts and lists them, and does not
//! match while a sink has any (they are records that sink lacks).

use serde::{Deserialize, Serialize};
use tickvault_wal::{Lane, LogReader, ReadError, Space, Wal};

use super::SinkError;

/// One record a sink refused.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Refused {
    pub sink: String,
    pub lane: String,
    pub seq: u64,
    /// The sink's error code and message.
    pub code: String,
    pub reason: String,
    /// When it was set aside, ms since the epoch.
    pub at_ms: i64,
    /// The record's payload as the log held it (the log's copy goes with truncation).
    pub payload: Vec<u8>,
}

const PREFIX: &str = "refused/";

fn key(sink: &str, lane: Lane, seq: u64) -> Vec<u8> {
    let mut key = format!("{PREFIX}{sink}/{lane}/").into_bytes();
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// Keeps record `seq` of `lane`, refused by `sink` with `error`, durably. Setting one
/// aside twice (the runner resent it after a restart) keeps one entry.
pub async fn set_aside(wal: &Wal, sink: &str, lane: Lane, seq: u64, error: &SinkError) -> anyhow::Result<()> {
    let read = wal.reader().read(lane, seq - 1, 1)?;
    let payload = read
        .records
        .into_iter()
        .find(|r| r.seq == seq)
        .map(|r| r.payload)
        .unwrap_or_default();
    let refused = Refused {
        sink: sink.to_owned(),
        lane: lane.name().to_owned(),
        seq,
        code: error.code.to_owned(),
        reason: error.message.clone(),
        at_ms: crate::event::now_ms(),
        payload,
    };
    wal.put_state(Space::State, key(sink, lane, seq), Some(serde_json::to_vec(&refused)?))
        .await?;
    Ok(())
}

/// Every record set aside, by sink, lane and sequence.
pub fn list(reader: &LogReader) -> Result<Vec<Refused>, ReadError> {
    Ok(reader
        .scan_state(Space::State, PREFIX.as_bytes())?
        .into_iter()
        .filter_map(|(_, v)| serde_json::from_slice(&v).ok())
        .collect())
}
