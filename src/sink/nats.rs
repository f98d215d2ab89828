//! NATS JetStream: one message per event on `<prefix>.<lane>.<symbol>.<timeframe>`, the
//! natural key as `Nats-Msg-Id` so the stream drops a replayed or redundant copy within
//! its duplicate window, and every publish awaited until its PubAck (the stream has it on
//! disk). Publishes are pipelined, a bounded window of acknowledgements outstanding. The
//! retry of a batch that broke off starts at its first unacknowledged message.

use std::collections::VecDeque;
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use futures_util::StreamExt;

use super::config::NatsConfig;
use super::{Batch, Row, Sink, SinkError};
use tickvault_wal::Lane;

const NAME: &str = "nats";
/// PubAcks outstanding at most; below the client's own limit (5,000), which would
/// otherwise block a publish while we hold the futures that release it.
const ACK_WINDOW: usize = 4_096;
/// The backfill runner's window. The stream takes messages in order, so a live message
/// waits behind every backfill message published before it: a smaller window keeps that
/// queue short, for some throughput. Measured (`bench sinks`, one sitting, alternating):
/// live p99 during the backfill 13-28 ms with 512 against 60 ms with 4,096; backfill
/// 79,000-86,000 rows/s with 512 against 92,000-94,000 with 4,096. Live comes first.
const BACKFILL_ACK_WINDOW: usize = 512;

pub struct NatsSink {
    config: NatsConfig,
    context: Option<jetstream::Context>,
    /// The last batch whose write failed, and how many of its first rows JetStream had
    /// acknowledged by then.
    resume: Option<Resume>,
}

/// Where the retry of a failed batch starts: the runner resends the identical batch, and
/// the rows before `acked` are in the stream (their PubAcks came, in order), so only the
/// rest is published again. That keeps a retry after an outage longer than the stream's
/// `duplicate_window` from storing those rows twice; only the PubAcks outstanding at the
/// failure (at most the window, 512 or 4,096) can be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Resume {
    batch: BatchId,
    acked: usize,
}

/// A batch by its place in the log: lane, first row's and last position, rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct BatchId(Lane, u64, u64, usize);

impl BatchId {
    fn of(batch: &Batch) -> BatchId {
        let first = batch.rows.first().map_or(0, |r| r.seq);
        BatchId(batch.lane, first, batch.last_seq, batch.rows.len())
    }
}

impl Resume {
    /// The first row of `batch` to publish: past the acknowledged ones if it is the
    /// batch that failed, else the first.
    fn start(last_failure: Option<Resume>, batch: &Batch) -> usize {
        match last_failure {
            Some(r) if r.batch == BatchId::of(batch) => r.acked,
            _ => 0,
        }
    }
}

impl NatsSink {
    pub fn new(config: &NatsConfig) -> NatsSink {
        NatsSink {
            config: config.clone(),
            context: None,
            resume: None,
        }
    }

    /// How many rows of the last failed batch JetStream had acknowledged, which its
    /// retry skips (none after a success).
    pub fn acknowledged_of_failed_batch(&self) -> Option<usize> {
        self.resume.map(|r| r.acked)
    }

    /// The subject of a row: tokens may not hold `.`, `*`, `>` or whitespace.
    pub fn subject(prefix: &str, row: &Row) -> String {
        let token = |s: &str| -> String {
            s.chars()
                .map(|c| {
                    if c == '.' || c == '*' || c == '>' || c.is_whitespace() {
                        '_'
                    } else {
                        c
                    }
                })
                .collect()
        };
        format!("{prefix}.{}.{}.{}", row.lane, token(&row.symbol), token(&row.timeframe))
    }

    /// A new connection's JetStream context.
    async fn connect(&self) -> Result<jetstream::Context, SinkError> {
        let mut options = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .name("tickvault");
        if let Some(token) = &self.config.token {
            options = options.token(token.expose().to_owned());
        }
        let client = options
            .connect(self.config.url.as_str())
            .await
            .map_err(|e| SinkError::retriable(NAME, "connect", e))?;
        Ok(jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(5))
            .build(client))
    }

    /// Deletes the stream and its messages (benchmarks and tests start from nothing);
    /// a stream that does not exist is fine.
    pub async fn delete_stream(&self) -> Result<(), SinkError> {
        let _ = self.connect().await?.delete_stream(&self.config.stream).await;
        Ok(())
    }

    /// The JetStream context, connected and with the stream made, if needed.
    pub async fn context(&mut self) -> Result<&jetstream::Context, SinkError> {
        if self.context.is_none() {
            let context = self.connect().await?;
            context
                .get_or_create_stream(stream::Config {
                    name: self.config.stream.clone(),
                    subjects: vec![format!("{}.>", self.config.subject_prefix)],
                    storage: stream::StorageType::File,
                    duplicate_window: self.config.duplicate_window,
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    let text = e.to_string();
                    if text.contains("overlap") {
                        SinkError::fatal(NAME, "stream", text)
                    } else {
                        SinkError::retriable(NAME, "stream", text)
                    }
                })?;
            self.context = Some(context);
        }
        Ok(self.context.as_ref().expect("connected above"))
    }

    /// Calls `visit` with every row in the stream, in stream order (for `verify`).
    pub async fn scan(&mut self, mut visit: impl FnMut(Row)) -> Result<u64, SinkError> {
        let (name, filter) = (self.config.stream.clone(), format!("{}.>", self.config.subject_prefix));
        let context = self.context().await?;
        let stream = context
            .get_stream(&name)
            .await
            .map_err(|e| SinkError::retriable(NAME, "stream", e))?;
        let info = stream
            .get_info()
            .await
            .map_err(|e| SinkError::retriable(NAME, "stream", e))?;
        let (total, last) = (info.state.messages, info.state.last_sequence);
        if total == 0 {
            return Ok(0);
        }
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter,
                ..Default::default()
            })
            .await
            .map_err(|e| SinkError::retriable(NAME, "consumer", e))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| SinkError::retriable(NAME, "consumer", e))?;
        let mut seen = 0;
        while seen < total {
            let message = match tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(SinkError::retriable(NAME, "consumer", e)),
                Ok(None) | Err(_) => break,
            };
            seen += 1;
            let sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
            match serde_json::from_slice::<Row>(&message.payload) {
                Ok(row) => visit(row),
                Err(e) => tracing::warn!(sequence, error = %e, "stream message is not a tickvault row"),
            }
            if sequence >= last {
                break;
            }
        }
        Ok(seen)
    }

    /// Publishes `batch` (from its first unacknowledged row, when it is the batch that
    /// failed last) and awaits every PubAck.
    async fn publish(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let start = Resume::start(self.resume, batch);
        if start > 0 {
            tracing::debug!(lane = %batch.lane, last_seq = batch.last_seq, acked = start, rows = batch.rows.len(),
                "resending a batch from its first unacknowledged row");
        }
        let mut acked = start;
        let result = self.publish_from(batch, &mut acked).await;
        self.resume = result.is_err().then(|| Resume {
            batch: BatchId::of(batch),
            acked,
        });
        result
    }

    /// Publishes `batch.rows[*acked..]`, counting in `acked` the rows acknowledged.
    async fn publish_from(&mut self, batch: &Batch, acked: &mut usize) -> Result<(), SinkError> {
        let prefix = self.config.subject_prefix.clone();
        let context = self.context().await?.clone();
        // While the client is reconnecting it would buffer publishes and each would wait
        // out its ack timeout: fail fast instead and let the breaker pace the retries.
        if context.client().connection_state() != async_nats::connection::State::Connected {
            return Err(SinkError::retriable(
                NAME,
                "disconnected",
                "not connected to the NATS server",
            ));
        }
        let window = match batch.lane {
            Lane::Live => ACK_WINDOW,
            _ => BACKFILL_ACK_WINDOW,
        };
        let mut pending = VecDeque::with_capacity(window);
        for row in &batch.rows[*acked..] {
            if pending.len() >= window {
                if let Some(ack) = pending.pop_front() {
                    await_ack(ack).await?;
                    *acked += 1;
                }
            }
            let payload = serde_json::to_vec(&Message::from(row)).map_err(|e| SinkError::fatal(NAME, "encode", e))?;
            let message = PublishMessage::build()
                .payload(payload.into())
                .message_id(row.key_string());
            let ack = context
                .send_publish(Self::subject(&prefix, row), message)
                .await
                .map_err(|e| SinkError::retriable(NAME, "publish", e))?;
            pending.push_back(ack);
        }
        while let Some(ack) = pending.pop_front() {
            await_ack(ack).await?;
            *acked += 1;
        }
        Ok(())
    }
}

/// A row as a JetStream message: JSON, the fields an event does not have left out (a
/// reader deserializing into [`Row`] gets `None` / empty for them).
#[derive(serde::Serialize)]
struct Message<'a> {
    feed: &'a str,
    symbol: &'a str,
    kind: &'a str,
    timeframe: &'a str,
    ts_ms: i64,
    ordinal: u32,
    seq: u64,
    lane: &'a str,
    captured_at_ns: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    bid: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ask: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bid_size: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ask_size: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    price: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    size: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    open: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    high: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    low: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    close: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    volume: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vwap: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trades: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exchange: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trade_id: Option<&'a str>,
    #[serde(skip_serializing_if = "<[i32]>::is_empty")]
    conditions: &'a [i32],
}

impl<'a> From<&'a Row> for Message<'a> {
    fn from(r: &'a Row) -> Message<'a> {
        Message {
            feed: &r.feed,
            symbol: &r.symbol,
            kind: &r.kind,
            timeframe: &r.timeframe,
            ts_ms: r.ts_ms,
            ordinal: r.ordinal,
            seq: r.seq,
            lane: &r.lane,
            captured_at_ns: r.captured_at_ns,
            bid: r.bid,
            ask: r.ask,
            bid_size: r.bid_size,
            ask_size: r.ask_size,
            price: r.price,
            size: r.size,
            open: r.open,
            high: r.high,
            low: r.low,
            close: r.close,
            volume: r.volume,
            vwap: r.vwap,
            trades: r.trades,
            exchange: r.exchange,
            trade_id: r.trade_id.as_deref(),
            conditions: &r.conditions,
        }
    }
}

/// Waits for one PubAck. A "duplicate" answer is a success: the stream already holds
/// that natural key (a replay, or a redundant appliance's copy).
async fn await_ack(ack: jetstream::context::PublishAckFuture) -> Result<(), SinkError> {
    ack.await.map(drop).map_err(|e| SinkError::retriable(NAME, "puback", e))
}

impl Sink for NatsSink {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        // The client reconnects by itself; an error here (no PubAck in time) leaves the
        // connection to it and the batch to the runner's retry.
        self.publish(batch).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_carry_lane_symbol_and_timeframe_with_dots_replaced() {
        use crate::event::{Bar, Body, Capture, Event, Feed, Timeframe};
        let bar = |symbol: &str, lane| {
            let event = Event {
                capture: Capture {
                    feed: Feed::Stocks,
                    lane,
                    captured_at_ns: 0,
                },
                body: Body::Bar(Bar {
                    symbol: symbol.into(),
                    timeframe: Timeframe::MINUTE,
                    start_ms: 0,
                    open: 1.0,
                    high: 1.0,
                    low: 1.0,
                    close: 1.0,
                    volume: 1.0,
                    vwap: None,
                    trades: None,
                }),
            };
            Row::from_event(1, &event)
        };
        let live = bar("BRK.B", tickvault_wal::Lane::Live);
        assert_eq!(NatsSink::subject("market", &live), "market.live.BRK_B.1m");
        let backfill = bar("EUR/USD", tickvault_wal::Lane::Backfill);
        assert_eq!(NatsSink::subject("market", &backfill), "market.backfill.EUR/USD.1m");
    }

    #[test]
    fn a_retry_starts_after_the_acknowledged_rows_only_for_the_batch_that_failed() {
        let batch = |lane, first: u64, last: u64| {
            let mut b = Batch::new(lane, first - 1);
            for seq in first..=last {
                b.rows.push(Row::from_event(
                    seq,
                    &crate::event::Event {
                        capture: crate::event::Capture {
                            feed: crate::event::Feed::Crypto,
                            lane,
                            captured_at_ns: 0,
                        },
                        body: crate::event::Body::Trade(crate::event::Trade {
                            symbol: "BTC-USD".into(),
                            ts_ms: seq as i64,
                            ordinal: 0,
                            price: 1.0,
                            size: 1.0,
                            exchange: None,
                            trade_id: None,
                            conditions: vec![],
                        }),
                    },
                ));
            }
            b.last_seq = last;
            b
        };
        let failed = batch(Lane::Backfill, 101, 200);
        let resume = Some(Resume {
            batch: BatchId::of(&failed),
            acked: 40,
        });
        assert_eq!(Resume::start(resume, &failed), 40);
        assert_eq!(Resume::start(resume, &batch(Lane::Backfill, 101, 200)), 40);
        // Another batch: from its first row.
        assert_eq!(Resume::start(None, &failed), 0);
        assert_eq!(Resume::start(resume, &batch(Lane::Live, 101, 200)), 0);
        assert_eq!(Resume::start(resume, &batch(Lane::Backfill, 101, 199)), 0);
        assert_eq!(Resume::start(resume, &batch(Lane::Backfill, 100, 200)), 0);
    }

    #[test]
    fn a_message_leaves_out_absent_fields_and_reads_back_as_the_row() {
        let row = Row::from_event(
            7,
            &crate::event::Event {
                capture: crate::event::Capture {
                    feed: crate::event::Feed::Crypto,
                    lane: tickvault_wal::Lane::Live,
                    captured_at_ns: 42,
                },
                body: crate::event::Body::Trade(crate::event::Trade {
                    symbol: "BTC-USD".into(),
                    ts_ms: 1_700_000_000_000,
                    ordinal: 1,
                    price: 50_000.5,
                    size: 0.25,
                    exchange: Some(1),
                    trade_id: Some("t9".into()),
                    conditions: vec![2],
                }),
            },
        );
        let json = serde_json::to_string(&Message::from(&row)).unwrap();
        assert!(!json.contains("bid") && !json.contains("null"), "{json}");
        assert_eq!(serde_json::from_str::<Row>(&json).unwrap(), row);
    }
}
