//! NATS JetStream: one message per event on `<prefix>.<lane>.<symbol>.<timeframe>`, the
//! natural key as `Nats-Msg-Id` so the stream drops a replayed or redundant copy within
//! its duplicate window (a derived bar's id ends in its version, `:v2`: each version is
//! a message of its own on `<prefix>.derived.<symbol>.<timeframe>`, and readers keep the
//! highest), and every publish awaited until its PubAck (the stream has it on
//! disk). Publishes are pipelined, a bounded window of acknowledgements outstanding. The
//! retry of a batch that broke off starts at its first unacknowledged message, and skips
//! the messages the stream stored although their PubAcks never came.
//!
//! After a crash the runner sends again what lies past its cursor, some of which the
//! stream may hold. Within `duplicate_window` the stream drops those copies itself;
//! beyond it, it would not. So each cursor move keeps a note of the stream's sequence
//! at that point ([`Sink::note`]), and the first write after a restart reads the message
//! ids the stream stored on the lane's subjects past it, and does not publish those
//! rows again (a restart long after a crash, too, stores nothing twice).

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use futures_util::StreamExt;

use super::config::NatsConfig;
use super::runner::WentTo;
use super::{Batch, Holds, Row, Sink, SinkError};
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
/// The most messages one look in the stream reads (a retry's for its rows in flight, a
/// restart's for what the last run published past its cursor). What is looked for is a
/// few batches' worth, published just before the look's start; a range much longer is
/// other publishers' (a redundant appliance) and is cut short, with a warning: what it
/// would have found is published again and dropped by the stream within its duplicate
/// window. A bound on messages rather than on time: the servers' timestamps are not
/// compared with our clock.
const LOOK_MAX: usize = 1_000_000;
/// How long a sink waits before making again a stream it had and finds gone:
/// nats-server (2.9.10 here) takes a deleted stream out of its account before it
/// removes the stream's files, and a stream of the same name made in between loses its
/// files with them (every publish then fails, "error opening msg block file", until the
/// stream is deleted again). Seen once in a full test run, remade 9 ms after the delete.
const REMAKE_AFTER: Duration = Duration::from_secs(1);

pub struct NatsSink {
    config: NatsConfig,
    context: Option<jetstream::Context>,
    /// The last batch whose write failed, and how many of its first rows JetStream had
    /// acknowledged by then.
    resume: Option<Resume>,
    /// The highest stream sequence known to hold an earlier message than any this sink
    /// has yet to publish: the last PubAck's, or the stream's last when connected.
    stream_seq: u64,
    /// Whether `stream_seq` was read from the stream (0 is then a sequence: the stream
    /// was empty).
    stream_seen: bool,
    /// Rows of failed batches that their retry found in the stream without a PubAck.
    found_unacknowledged: u64,
    /// After a restart, what the stream holds past the noted sequence.
    restart: Option<AfterRestart>,
    /// Rows that the first writes after a restart found in the stream and did not
    /// publish again.
    found_after_restart: u64,
    /// Whether the stream was looked up (made if missing) on this connection since the
    /// last failure.
    stream_ready: bool,
    /// The stream the cursor's messages went to (see [`stream_id`]).
    stream_made: WentTo,
    /// The stream as last found, and when it was made (ns since the Unix epoch).
    found: Option<(String, i128)>,
}

/// The note kept with the cursor: the stream, the highest sequence known to hold an
/// earlier message than any past the cursor, and which stream of that name the
/// cursor's messages went to (see [`stream_id`]).
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Note {
    stream: String,
    seq: u64,
    made: String,
}

/// The note as kept before it said which stream (read back from older logs).
#[derive(Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct NoteBefore {
    stream: String,
    seq: u64,
}

/// One stream of a name: its name and when it was made (ns since the Unix epoch, as
/// the server says). A stream deleted and made again (or a new server) has another.
fn stream_id(name: &str, created_ns: i128) -> String {
    format!("{name} created {created_ns}")
}

/// What a restarted sink knows of the messages its last run may have published past its
/// cursor.
#[derive(Debug)]
enum AfterRestart {
    /// The noted sequence: the first write reads the stream past it.
    Noted(u64),
    /// The ids the stream holds on the lane's subjects past the noted sequence
    /// `after_seq`. Each acknowledged batch takes the ids of its rows out; the first
    /// batch with none of its rows among them ends the look (the last run published in
    /// log order, so what it stored past the cursor comes before any row that is not
    /// there).
    Found { after_seq: u64, ids: HashSet<String> },
}

impl AfterRestart {
    fn after_seq(&self) -> u64 {
        match self {
            AfterRestart::Noted(seq) | AfterRestart::Found { after_seq: seq, .. } => *seq,
        }
    }
}

/// Where the retry of a failed batch starts: the runner resends the identical batch, and
/// the rows before `acked` are in the stream (their PubAcks came, in order), so only the
/// rest is published again. The `in_flight` rows after them had been published with
/// their PubAcks outstanding: the stream may hold some. The retry looks for those in the
/// stream (after `after_seq`, at most [`LOOK_MAX`] messages) and skips the ones it
/// finds. Both keep a retry after an outage longer than the stream's
/// `duplicate_window` from storing rows twice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Resume {
    batch: BatchId,
    acked: usize,
    in_flight: usize,
    /// The stream sequence below every message of the batch not acknowledged.
    after_seq: u64,
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
    /// `last_failure` if it was of `batch`: then its retry starts past the acknowledged
    /// rows and looks for the ones in flight; any other batch starts at its first row.
    fn for_batch(last_failure: Option<Resume>, batch: &Batch) -> Option<Resume> {
        last_failure.filter(|r| r.batch == BatchId::of(batch))
    }

    /// Where the next retry starts after an attempt at `batch` failed with `progress`.
    /// When it was itself the retry of `last` (the same batch) and did not get every
    /// row `last` had in flight acknowledged, those rows may still be in the stream
    /// below the sequence of its newest PubAck: the range to look in keeps `last`'s start
    /// and reaches to whichever in-flight row is further.
    fn after_failure(last: Option<Resume>, batch: BatchId, progress: &Progress, stream_seq: u64) -> Resume {
        let (mut after_seq, mut in_flight_end) = (stream_seq, progress.sent);
        if let Some(last) = last.filter(|l| l.batch == batch) {
            let last_end = last.acked + last.in_flight;
            if progress.acked < last_end {
                after_seq = after_seq.min(last.after_seq);
                in_flight_end = in_flight_end.max(last_end);
            }
        }
        Resume {
            batch,
            acked: progress.acked,
            in_flight: in_flight_end - progress.acked,
            after_seq,
        }
    }
}

impl NatsSink {
    pub fn new(config: &NatsConfig) -> NatsSink {
        NatsSink {
            config: config.clone(),
            context: None,
            resume: None,
            stream_seq: 0,
            stream_seen: false,
            found_unacknowledged: 0,
            restart: None,
            found_after_restart: 0,
            stream_ready: false,
            stream_made: WentTo::default(),
            found: None,
        }
    }

    /// Rows the first writes after a restart found in the stream (published by the
    /// last run past its cursor) and did not publish again.
    pub fn found_after_restart(&self) -> u64 {
        self.found_after_restart
    }

    /// How many rows of the last failed batch JetStream had acknowledged, which its
    /// retry skips (none after a success).
    pub fn acknowledged_of_failed_batch(&self) -> Option<usize> {
        self.resume.map(|r| r.acked)
    }

    /// Rows of failed batches whose retries found them in the stream although their
    /// PubAcks had not come, and did not publish again.
    pub fn found_unacknowledged(&self) -> u64 {
        self.found_unacknowledged
    }

    /// The subject of a row: tokens may not hold `.`, `*`, `>` or whitespace.
    pub fn subject(prefix: &str, row: &Row) -> String {
        format!("{prefix}.{}.{}.{}", row.lane, token(&row.symbol), token(&row.timeframe))
    }

    /// The minutes in `from_ms..to_ms` the stream holds a one-minute bar of `symbol`
    /// for, on any lane's subject (the stream keeps a key once, on the subject of the
    /// copy published first). Reads the symbol's minute-bar subjects' headers.
    pub async fn bar_minutes(
        &mut self,
        feed: &str,
        symbol: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<i64>, SinkError> {
        let filter = format!("{}.*.{}.1m", self.config.subject_prefix, token(symbol));
        let prefix = format!("{feed}:{symbol}:bar:1m:");
        let mut minutes = Vec::new();
        self.visit_ids_on(&filter, 0, usize::MAX, |id| {
            let ts = id.as_deref().and_then(|id| id.strip_prefix(&prefix)).and_then(|rest| {
                let (ts, uid) = rest.split_once(':')?;
                (uid == "0").then(|| ts.parse::<i64>().ok()).flatten()
            });
            if let Some(ts) = ts.filter(|ts| (from_ms..to_ms).contains(ts)) {
                minutes.push(ts);
            }
            true
        })
        .await?;
        Ok(minutes)
    }

    /// A new connection's JetStream context.
    async fn connect(&self) -> Result<jetstream::Context, SinkError> {
        let mut options = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .name("tickvault");
        if let Some(token) = &self.config.token {
            options = options.token(token.expose().to_owned());
        }
        if let Some(ca) = &self.config.ca {
            options = options.add_root_certificates(ca.path.clone());
        }
        let client = options
            .connect(self.config.url.as_str())
            .await
            .map_err(|e| match super::error::explain(&e) {
                (text, true) => SinkError::fatal(NAME, "tls", text),
                (text, false) if e.kind() == async_nats::ConnectErrorKind::Tls => SinkError::fatal(NAME, "tls", text),
                (text, false) => SinkError::retriable(NAME, "connect", text),
            })?;
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
            self.context = Some(self.connect().await?);
            self.stream_ready = false;
        }
        if !self.stream_ready {
            let context = self.context.as_ref().expect("connected above");
            // A stream this sink had is looked up (one request, as `get_or_create_stream`
            // would make); found gone, it is made again after REMAKE_AFTER.
            let had = match self.found {
                Some(_) => context.get_stream(&self.config.stream).await.ok(),
                None => None,
            };
            if self.found.is_some() && had.is_none() {
                tokio::time::sleep(REMAKE_AFTER).await;
            }
            let stream = match had {
                Some(stream) => stream,
                None => context
                    .get_or_create_stream(stream::Config {
                        name: self.config.stream.clone(),
                        subjects: vec![self.subjects()],
                        storage: stream::StorageType::File,
                        duplicate_window: self.config.duplicate_window,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| {
                        let text = e.to_string();
                        if text.contains("overlap") {
                            // Another stream takes these subjects: no retry mends that.
                            SinkError::fatal(
                                NAME,
                                "stream",
                                format!(
                                    "{text}: another stream than {} takes subjects {}; delete it, or set \
                                 sinks.nats.subject_prefix for this one",
                                    self.config.stream,
                                    self.subjects()
                                ),
                            )
                        } else {
                            SinkError::retriable(NAME, "stream", text)
                        }
                    })?,
            };
            let info = stream.cached_info();
            self.check_stream(&info.config)?;
            let created_ns = info.created.unix_timestamp_nanos();
            let found = stream_id(&self.config.stream, created_ns);
            if self.found.as_ref().is_some_and(|(f, _)| *f != found) {
                // Made anew since it was last looked up: its sequences start again.
                self.stream_seq = info.state.last_sequence;
            } else {
                self.stream_seq = self.stream_seq.max(info.state.last_sequence);
            }
            self.found = Some((found, created_ns));
            self.stream_seen = true;
            self.stream_ready = true;
        }
        Ok(self.context.as_ref().expect("connected above"))
    }

    /// A stream of our name that was there before is taken as it is: refused if it does
    /// not take our subjects (every publish would fail with "no stream found"), and
    /// named in a warning where it keeps less than the config asks (in memory only, with
    /// limits that discard messages, or a shorter duplicate window).
    fn check_stream(&self, found: &stream::Config) -> Result<(), SinkError> {
        // What the sink publishes: `<prefix>.<lane>.<symbol>.<timeframe>`.
        let published = format!("{}.*.*.*", self.config.subject_prefix);
        if !found.subjects.iter().any(|s| subject_covers(s, &published)) {
            return Err(SinkError::fatal(
                NAME,
                "stream",
                format!(
                    "stream {} was there already with subjects [{}], which do not take what tickvault \
                     publishes ({}.<lane>.<symbol>.<timeframe>): add {} to its subjects, or set \
                     sinks.nats.stream to another name",
                    self.config.stream,
                    found.subjects.join(", "),
                    self.config.subject_prefix,
                    self.subjects()
                ),
            ));
        }
        if found.storage == stream::StorageType::Memory {
            tracing::warn!(
                stream = %self.config.stream,
                "the stream was there already with memory storage: a restart of the NATS server loses \
                 what it holds (tickvault makes its streams with file storage)"
            );
        }
        let limits = limits(found);
        if !limits.is_empty() {
            tracing::warn!(
                stream = %self.config.stream,
                limits = %limits.join(", "),
                "the stream was there already with limits: the messages it discards by them \
                 (or refuses, with discard new) are gone from it, and verify reports them missing"
            );
        }
        if found.duplicate_window < self.config.duplicate_window {
            tracing::warn!(
                stream = %self.config.stream,
                window = ?found.duplicate_window,
                configured = ?self.config.duplicate_window,
                "the stream was there already with a shorter duplicate window than \
                 sinks.nats.duplicate_window: its own applies"
            );
        }
        Ok(())
    }

    /// The JetStream context, or a retriable error at once while the client is
    /// reconnecting: it would buffer requests and publishes meanwhile, and each would
    /// wait out its timeout, so the breaker would count a failure only every 5 s.
    async fn connected(&mut self) -> Result<jetstream::Context, SinkError> {
        let context = self.context().await?.clone();
        if context.client().connection_state() != async_nats::connection::State::Connected {
            return Err(SinkError::retriable(
                NAME,
                "disconnected",
                "not connected to the NATS server",
            ));
        }
        Ok(context)
    }

    /// The subjects of the stream: every one under the prefix.
    fn subjects(&self) -> String {
        format!("{}.>", self.config.subject_prefix)
    }

    /// The subjects of one lane's messages.
    fn lane_subjects(&self, lane: Lane) -> String {
        format!("{}.{lane}.>", self.config.subject_prefix)
    }

    /// The sink's stream, through `context`.
    async fn stream(&self, context: &jetstream::Context) -> Result<stream::Stream, SinkError> {
        context
            .get_stream(&self.config.stream)
            .await
            .map_err(|e| SinkError::retriable(NAME, "stream", e))
    }

    /// Calls `visit` with every row in the stream, in stream order (for `verify`).
    pub async fn scan(&mut self, mut visit: impl FnMut(Row)) -> Result<u64, SinkError> {
        let context = self.context().await?.clone();
        let stream = self.stream(&context).await?;
        let info = stream
            .get_info()
            .await
            .map_err(|e| SinkError::retriable(NAME, "stream", e))?;
        let (total, last) = (info.state.messages, info.state.last_sequence);
        if total == 0 {
            return Ok(0);
        }
        // A push consumer with flow control: the server streams the messages without
        // waiting for a pull request every 500 (async-nats's ordered pull consumer), about
        // 1.4x faster here; an ordered one recreates itself from the last message seen
        // if one is missed.
        let consumer = stream
            .create_consumer(jetstream::consumer::push::OrderedConfig {
                deliver_subject: context.client().new_inbox(),
                filter_subject: self.subjects(),
                ..Default::default()
            })
            .await
            .map_err(|e| SinkError::retriable(NAME, "consumer", e))?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(0);
        }
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

    /// Publishes `batch` (from its first unacknowledged row, and without the rows the
    /// stream holds unacknowledged, when it is the batch that failed last) and awaits
    /// every PubAck.
    async fn publish(&mut self, batch: &Batch) -> Result<(), SinkError> {
        let after_restart = self.stored_after_restart(batch.lane).await?;
        let looking = after_restart.is_some();
        let result = self
            .publish_resuming(batch, after_restart.as_ref().map(|(_, ids)| ids))
            .await;
        self.restart = match (after_restart, &result) {
            (Some((after_seq, mut ids)), Ok(())) => {
                let before = ids.len();
                for row in &batch.rows {
                    ids.remove(&row.key_string());
                }
                let found = before - ids.len();
                self.found_after_restart += found as u64;
                (found > 0 && !ids.is_empty()).then_some(AfterRestart::Found { after_seq, ids })
            }
            (Some((after_seq, ids)), Err(_)) => Some(AfterRestart::Found { after_seq, ids }),
            (None, _) => None,
        };
        if looking && self.restart.is_none() {
            tracing::info!(lane = %batch.lane, rows = self.found_after_restart,
                "rows the last run published past its cursor were in the stream and were not published again");
        }
        result
    }

    /// After a restart, the ids of the messages on `lane`'s subjects that the stream
    /// stored past the sequence noted with the cursor, read at the first write (up to
    /// the stream's last message then, and at most [`LOOK_MAX`]); `None` when
    /// there was no note or the look has ended. With the noted sequence.
    async fn stored_after_restart(&mut self, lane: Lane) -> Result<Option<(u64, HashSet<String>)>, SinkError> {
        // Still noted until a look succeeds, so a failed one is tried again.
        if let Some(AfterRestart::Noted(after_seq)) = self.restart {
            let started = std::time::Instant::now();
            let mut ids = HashSet::new();
            let read = self
                .visit_ids(lane, after_seq, |id| {
                    ids.extend(id);
                    true
                })
                .await?;
            if read >= LOOK_MAX {
                tracing::warn!(%lane, after_seq, read,
                    "the stream holds more past the cursor's noted sequence than a restart reads; rows past the cursor stored more than duplicate_window ago may be stored twice");
            }
            tracing::info!(%lane, after_seq, messages = ids.len(), elapsed_ms = started.elapsed().as_millis() as u64,
                "read what the stream stored past the cursor's noted sequence");
            self.restart = (!ids.is_empty()).then_some(AfterRestart::Found { after_seq, ids });
        }
        Ok(match self.restart.take() {
            Some(AfterRestart::Found { after_seq, ids }) => Some((after_seq, ids)),
            _ => None,
        })
    }

    /// As [`NatsSink::publish`] without the restart's look: publishes `batch` (from its
    /// first unacknowledged row, and without the rows the stream holds unacknowledged,
    /// when it is the batch that failed last, and without those in `after_restart`).
    async fn publish_resuming(
        &mut self,
        batch: &Batch,
        after_restart: Option<&HashSet<String>>,
    ) -> Result<(), SinkError> {
        let last_failure = Resume::for_batch(self.resume, batch);
        let start = last_failure.map_or(0, |r| r.acked);
        let stored = match last_failure {
            Some(r) if r.in_flight > 0 => {
                let ids = self.stored_unacknowledged(batch, &r).await?;
                self.found_unacknowledged += ids.len() as u64;
                ids
            }
            _ => HashSet::new(),
        };
        if start > 0 || !stored.is_empty() {
            tracing::debug!(lane = %batch.lane, last_seq = batch.last_seq, acked = start, stored_unacknowledged = stored.len(),
                rows = batch.rows.len(), "resending a batch from its first unacknowledged row");
        }
        let mut progress = Progress {
            acked: start,
            sent: start,
        };
        let skip = |id: &str| stored.contains(id) || after_restart.is_some_and(|ids| ids.contains(id));
        let result = self.publish_from(batch, &mut progress, skip).await;
        self.resume = match &result {
            Ok(()) => None,
            Err(_) => Some(Resume::after_failure(
                last_failure,
                BatchId::of(batch),
                &progress,
                self.stream_seq,
            )),
        };
        result
    }

    /// The message ids of `resume`'s in-flight rows of `batch` that the stream holds: it
    /// reads the stream's headers from `after_seq` on (at most [`LOOK_MAX`] messages),
    /// and stops early once it found them all.
    async fn stored_unacknowledged(&mut self, batch: &Batch, resume: &Resume) -> Result<HashSet<String>, SinkError> {
        let end = (resume.acked + resume.in_flight).min(batch.rows.len());
        let wanted: HashSet<String> = batch.rows[resume.acked..end].iter().map(|r| r.key_string()).collect();
        let mut found = HashSet::new();
        if wanted.is_empty() {
            return Ok(found);
        }
        let read = self
            .visit_ids(batch.lane, resume.after_seq, |id| {
                if let Some(id) = id.filter(|id| wanted.contains(id)) {
                    found.insert(id);
                }
                found.len() < wanted.len()
            })
            .await?;
        if read >= LOOK_MAX {
            tracing::warn!(lane = %batch.lane, after_seq = resume.after_seq, found = found.len(), wanted = wanted.len(),
                "the retry's look in the stream was cut short; a row it did not find may be stored twice");
        }
        Ok(found)
    }

    /// Calls `visit` with the message id of each message on `lane`'s subjects from
    /// `after_seq + 1` to the stream's last message now, in order and headers only, until
    /// it returns false or [`LOOK_MAX`] were read; returns how many were. No message for
    /// 5 s ends it too: the rest of the range is gone (removed by the stream's limits),
    /// or the server is slow; what was not found is sent.
    async fn visit_ids(
        &mut self,
        lane: Lane,
        after_seq: u64,
        visit: impl FnMut(Option<String>) -> bool,
    ) -> Result<usize, SinkError> {
        self.visit_ids_up_to(lane, after_seq, LOOK_MAX, visit).await
    }

    /// The message id of every message on `lane`'s subjects now, for a replay, which
    /// publishes only what the stream lacks (beyond the duplicate window, the stream would
    /// store a copy again).
    pub async fn stored_ids(&mut self, lane: Lane, mut visit: impl FnMut(&str)) -> Result<usize, SinkError> {
        self.visit_ids_up_to(lane, 0, usize::MAX, |id| {
            if let Some(id) = id {
                visit(&id);
            }
            true
        })
        .await
    }

    async fn visit_ids_up_to(
        &mut self,
        lane: Lane,
        after_seq: u64,
        max: usize,
        visit: impl FnMut(Option<String>) -> bool,
    ) -> Result<usize, SinkError> {
        let filter = self.lane_subjects(lane);
        self.visit_ids_on(&filter, after_seq, max, visit).await
    }

    /// As [`NatsSink::visit_ids_up_to`], for the messages on the subjects `filter` matches.
    async fn visit_ids_on(
        &mut self,
        filter: &str,
        after_seq: u64,
        max: usize,
        mut visit: impl FnMut(Option<String>) -> bool,
    ) -> Result<usize, SinkError> {
        let context = self.connected().await?;
        let stream = self.stream(&context).await?;
        let last = stream.cached_info().state.last_sequence;
        if last <= after_seq {
            return Ok(0);
        }
        // None on the lane's subjects (the others' may be): nothing to wait for.
        let Some(mut messages) = ordered(
            &stream,
            jetstream::consumer::pull::OrderedConfig {
                filter_subject: filter.to_owned(),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after_seq + 1,
                },
                headers_only: true,
                ..Default::default()
            },
        )
        .await?
        else {
            return Ok(0);
        };
        let mut read = 0;
        while read < max {
            let message = match tokio::time::timeout(Duration::from_secs(5), messages.next()).await {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(SinkError::retriable(NAME, "consumer", e)),
                Ok(None) | Err(_) => break,
            };
            read += 1;
            let info = message.info().map_err(|e| SinkError::retriable(NAME, "consumer", e))?;
            let (sequence, pending) = (info.stream_sequence, info.pending);
            let id = message
                .headers
                .as_ref()
                .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                .map(|v| v.as_str().to_owned());
            if !visit(id) || sequence >= last || pending == 0 {
                break;
            }
        }
        Ok(read)
    }

    /// Publishes `batch.rows[progress.acked..]` but the rows whose ids `stored` says the
    /// stream holds, counting the rows sent and acknowledged (or found stored) in
    /// `progress`.
    async fn publish_from(
        &mut self,
        batch: &Batch,
        progress: &mut Progress,
        stored: impl Fn(&str) -> bool,
    ) -> Result<(), SinkError> {
        let prefix = self.config.subject_prefix.clone();
        let context = self.connected().await?;
        let window = match batch.lane {
            Lane::Live => ACK_WINDOW,
            _ => BACKFILL_ACK_WINDOW,
        };
        // In row order; `None`: a row the stream already holds, not published again.
        let mut pending = VecDeque::with_capacity(window);
        for row in &batch.rows[progress.acked..] {
            if pending.len() >= window {
                if let Some(ack) = pending.pop_front() {
                    self.acknowledged(ack, progress).await?;
                }
            }
            let id = row.key_string();
            if stored(&id) {
                progress.sent += 1;
                pending.push_back(None);
                continue;
            }
            let payload = serde_json::to_vec(&Message::from(row)).map_err(|e| SinkError::fatal(NAME, "encode", e))?;
            let payload_len = payload.len();
            let message = PublishMessage::build().payload(payload.into()).message_id(id);
            // Counted before the send: a publish that fails half way may have reached
            // the server.
            progress.sent += 1;
            let ack = context
                .send_publish(Self::subject(&prefix, row), message)
                .await
                .map_err(|e| match e.kind() {
                    // A message larger than the server takes: this row, not the server.
                    jetstream::context::PublishErrorKind::MaxPayloadExceeded => {
                        SinkError::content(NAME, "value", format!("{e} ({} bytes)", payload_len))
                    }
                    _ => SinkError::retriable(NAME, "publish", e),
                })?;
            pending.push_back(Some(ack));
        }
        while let Some(ack) = pending.pop_front() {
            self.acknowledged(ack, progress).await?;
        }
        Ok(())
    }

    /// Waits for the next row's PubAck (none for a row found stored) and counts it.
    async fn acknowledged(
        &mut self,
        ack: Option<jetstream::context::PublishAckFuture>,
        progress: &mut Progress,
    ) -> Result<(), SinkError> {
        if let Some(ack) = ack {
            let ack = await_ack(ack).await?;
            // A duplicate's answer carries the first copy's (older) sequence.
            self.stream_seq = self.stream_seq.max(ack.sequence);
        }
        progress.acked += 1;
        Ok(())
    }
}

/// How far a batch's publishing got: rows before `acked` are in the stream; rows from
/// `acked` to `sent` were published with their PubAcks outstanding.
struct Progress {
    acked: usize,
    sent: usize,
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
    uid: u64,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    indicators: Option<&'a crate::indicators::Indicators>,
}

impl<'a> From<&'a Row> for Message<'a> {
    fn from(r: &'a Row) -> Message<'a> {
        Message {
            feed: &r.feed,
            symbol: &r.symbol,
            kind: &r.kind,
            timeframe: &r.timeframe,
            ts_ms: r.ts_ms,
            uid: r.uid,
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
            version: r.version,
            indicators: r.indicators.as_deref(),
        }
    }
}

/// A subject token: `.`, `*`, `>` and whitespace, which a token may not hold, become `_`.
fn token(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c == '.' || c == '*' || c == '>' || c.is_whitespace() {
                '_'
            } else {
                c
            }
        })
        .collect()
}

/// The messages of an ordered (ephemeral, in stream order) consumer on `stream`; `None`
/// when no message matches it (nothing to wait for).
/// The limits a stream keeps its messages within, as `name value` (none on a stream the
/// sink makes).
fn limits(config: &stream::Config) -> Vec<String> {
    let mut out = Vec::new();
    if !config.max_age.is_zero() {
        out.push(format!("max_age {:?}", config.max_age));
    }
    for (name, value) in [
        ("max_msgs", config.max_messages),
        ("max_bytes", config.max_bytes),
        ("max_msgs_per_subject", config.max_messages_per_subject),
    ] {
        if value > 0 {
            out.push(format!("{name} {value}"));
        }
    }
    out
}

/// Whether every subject `pattern` matches is also matched by `filter` (NATS
/// wildcards: `*` one token, `>` one or more at the end).
fn subject_covers(filter: &str, pattern: &str) -> bool {
    let (mut filter, mut pattern) = (filter.split('.'), pattern.split('.'));
    loop {
        match (filter.next(), pattern.next()) {
            (Some(">"), Some(_)) => return true,
            (Some(_), Some(">")) => return false,
            (Some("*"), Some(_)) => {}
            (Some(f), Some(p)) if f == p => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

async fn ordered(
    stream: &stream::Stream,
    config: jetstream::consumer::pull::OrderedConfig,
) -> Result<Option<jetstream::consumer::pull::Ordered>, SinkError> {
    let consumer = stream
        .create_consumer(config)
        .await
        .map_err(|e| SinkError::retriable(NAME, "consumer", e))?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(None);
    }
    consumer
        .messages()
        .await
        .map(Some)
        .map_err(|e| SinkError::retriable(NAME, "consumer", e))
}

/// Waits for one PubAck. A "duplicate" answer is a success: the stream already holds
/// that natural key (a replay, or a redundant appliance's copy).
async fn await_ack(ack: jetstream::context::PublishAckFuture) -> Result<jetstream::publish::PublishAck, SinkError> {
    ack.await.map_err(|e| {
        if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound {
            // No stream takes the subject (deleted under us): the retry makes it again.
            SinkError::retriable(NAME, "stream", e)
        } else {
            SinkError::retriable(NAME, "puback", e)
        }
    })
}

impl Sink for NatsSink {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Connects at the runner's start, before any publish, so that [`Sink::note`] holds
    /// the stream's last sequence from then on. The runner keeps that note in the log
    /// before the first write when the log has none (a log's first run): a SIGKILL
    /// between the first batch's PubAcks and the first cursor move then still leaves a
    /// sequence below everything the killed run published.
    ///
    /// Whether the stream is the one the cursor's messages went to: one deleted and
    /// made again since (by this sink, when it finds it gone) holds none of them, and
    /// from now on the stream found is the cursor's. Without a note that says (a log's
    /// first start, or a note from before notes said it) the stream found is taken as
    /// the cursor's.
    async fn holds(&mut self, _lane: Lane) -> Result<Holds, SinkError> {
        // Looked up afresh each time: a recheck while running must see the stream as it
        // is now.
        self.stream_ready = false;
        self.context().await?;
        let Some((found, created)) = self.found.clone() else {
            return Ok(Holds::Unknown);
        };
        let holds = self.stream_made.found(&found);
        if let Holds::Nothing(_) = holds {
            let age_ns = jiff::Timestamp::now().as_nanosecond() - created;
            if age_ns > self.config.duplicate_window.as_nanos() as i128 {
                tracing::warn!(stream = %self.config.stream, age_s = age_ns / 1_000_000_000,
                    "the stream was made longer ago than its duplicate window: events another appliance \
                     published to it before the window would be stored twice by sending them again");
            }
            // What the last run noted is of the other stream.
            self.restart = None;
            self.resume = None;
        }
        Ok(holds)
    }

    async fn write(&mut self, batch: &Batch) -> Result<(), SinkError> {
        // The client reconnects by itself; an error here (no PubAck in time) leaves the
        // connection to it and the batch to the runner's retry. A stream found gone is
        // looked up again first, and so made again.
        let result = self.publish(batch).await;
        if result.as_ref().is_err_and(|e| e.code == "stream") {
            self.stream_ready = false;
        }
        result
    }

    /// The stream and a sequence below every message it holds for a row past the cursor:
    /// the last PubAck's (or the stream's last when connected), since what this run
    /// publishes past the cursor comes after it; while a restart's look goes on, the
    /// sequence noted by the last run (what that run stored past the cursor lies after
    /// it, and the stream's last may be past some of it). None before the sink has seen
    /// the stream; 0 when it was empty.
    fn note(&self) -> Option<Vec<u8>> {
        let seq = self.restart.as_ref().map_or(self.stream_seq, AfterRestart::after_seq);
        let note = Note {
            stream: self.config.stream.clone(),
            seq,
            made: self.stream_made.get().unwrap_or_default().to_owned(),
        };
        (self.stream_seen || self.restart.is_some())
            .then(|| tickvault_wal::payload::to_bytes(&note).ok())
            .flatten()
    }

    fn restore(&mut self, note: &[u8]) {
        let note = match tickvault_wal::payload::from_bytes::<Note>(note) {
            Ok(note) => note,
            Err(_) => match tickvault_wal::payload::from_bytes::<NoteBefore>(note) {
                Ok(before) => Note {
                    stream: before.stream,
                    seq: before.seq,
                    made: String::new(),
                },
                Err(e) => {
                    tracing::warn!(error = %e, "the cursor's note does not decode; not looking for what the last run published");
                    return;
                }
            },
        };
        // Another stream (sinks.nats.stream changed) is another `made`: its messages are
        // sent again to this one (see `holds`).
        self.stream_made = WentTo::noted(Some(note.made).filter(|m| !m.is_empty()));
        if note.stream == self.config.stream {
            self.restart = Some(AfterRestart::Noted(note.seq));
        } else {
            tracing::info!(noted = %note.stream, stream = %self.config.stream,
                "the cursor's note is of another stream; not looking for what the last run published");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_note_says_which_stream_and_one_kept_before_it_did_still_restores() {
        let config = NatsConfig::default();
        let mut sink = NatsSink::new(&config);
        sink.stream_seen = true;
        sink.stream_seq = 42;
        sink.stream_made = WentTo::noted(Some(stream_id(&config.stream, 7)));
        let note = sink.note().unwrap();
        let mut restored = NatsSink::new(&config);
        restored.restore(&note);
        assert_eq!(restored.stream_made.get(), Some(stream_id(&config.stream, 7).as_str()));
        assert!(matches!(restored.restart, Some(AfterRestart::Noted(42))));

        let before = tickvault_wal::payload::to_bytes(&NoteBefore {
            stream: config.stream.clone(),
            seq: 9,
        })
        .unwrap();
        let mut restored = NatsSink::new(&config);
        restored.restore(&before);
        assert_eq!(
            restored.stream_made.get(),
            None,
            "the stream found is taken as the cursor's"
        );
        assert!(matches!(restored.restart, Some(AfterRestart::Noted(9))));
    }

    #[test]
    fn a_streams_limits_are_named_and_a_stream_as_the_sink_makes_it_has_none() {
        let ours = stream::Config {
            name: "MARKET".into(),
            subjects: vec!["market.>".into()],
            ..Default::default()
        };
        assert!(limits(&ours).is_empty());
        let limited = stream::Config {
            max_age: Duration::from_secs(86_400),
            max_messages: 1_000_000,
            max_messages_per_subject: -1,
            ..ours
        };
        assert_eq!(limits(&limited), ["max_age 86400s", "max_msgs 1000000"]);
    }

    #[test]
    fn a_stream_takes_our_subjects_only_with_a_filter_that_covers_all_of_them() {
        // What the sink publishes with prefix `market`.
        let published = "market.*.*.*";
        for filter in [">", "market.>", "*.>", "market.*.>", "market.*.*.*", "*.*.*.*"] {
            assert!(subject_covers(filter, published), "{filter}");
        }
        for filter in [
            "other.>",
            "market",
            "market.*",
            "market.*.*",
            "market.live.>",
            "*",
            "m.>",
            "market.*.*.*.*",
        ] {
            assert!(!subject_covers(filter, published), "{filter}");
        }
        assert!(subject_covers("a.>", "a.b.>"));
        assert!(!subject_covers("a.b.>", "a.>"));
    }

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
            Row::from_event(1, event)
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
                    crate::event::Event {
                        capture: crate::event::Capture {
                            feed: crate::event::Feed::Crypto,
                            lane,
                            captured_at_ns: 0,
                        },
                        body: crate::event::Body::Trade(crate::event::Trade {
                            symbol: "BTC-USD".into(),
                            ts_ms: seq as i64,
                            uid: 0,
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
            in_flight: 10,
            after_seq: 7,
        });
        let start = |r, b: &Batch| Resume::for_batch(r, b).map_or(0, |r| r.acked);
        assert_eq!(start(resume, &failed), 40);
        assert_eq!(start(resume, &batch(Lane::Backfill, 101, 200)), 40);
        // Another batch: from its first row.
        assert_eq!(start(None, &failed), 0);
        assert_eq!(start(resume, &batch(Lane::Live, 101, 200)), 0);
        assert_eq!(start(resume, &batch(Lane::Backfill, 101, 199)), 0);
        assert_eq!(start(resume, &batch(Lane::Backfill, 100, 200)), 0);
    }

    #[test]
    fn a_retry_that_fails_before_its_rows_in_flight_are_acknowledged_keeps_looking_from_where_they_were() {
        let batch = BatchId(Lane::Backfill, 1, 1_000, 1_000);
        let first = Resume::after_failure(
            None,
            batch,
            &Progress {
                acked: 600,
                sent: 1_000,
            },
            5_600,
        );
        assert_eq!((first.acked, first.in_flight, first.after_seq), (600, 400, 5_600));
        // The retry failed at once (the server still down): nothing learnt, nothing lost.
        let again = Resume::after_failure(Some(first), batch, &Progress { acked: 600, sent: 600 }, 5_600);
        assert_eq!((again.acked, again.in_flight, again.after_seq), (600, 400, 5_600));
        // The retry got 100 more acknowledged (newer sequences), then failed: rows 700
        // to 1,000 of the first attempt may still be in the stream at their old places.
        let partly = Resume::after_failure(Some(first), batch, &Progress { acked: 700, sent: 800 }, 9_000);
        assert_eq!((partly.acked, partly.in_flight, partly.after_seq), (700, 300, 5_600));
        // Past every row the first attempt had in flight: from the newest PubAck on.
        let past = Resume::after_failure(
            Some(first),
            batch,
            &Progress {
                acked: 1_000,
                sent: 1_000,
            },
            9_400,
        );
        assert_eq!((past.acked, past.in_flight, past.after_seq), (1_000, 0, 9_400));
        // Another batch: its own range only.
        let other = BatchId(Lane::Backfill, 1_001, 2_000, 1_000);
        let fresh = Resume::after_failure(Some(first), other, &Progress { acked: 10, sent: 50 }, 9_500);
        assert_eq!((fresh.acked, fresh.in_flight, fresh.after_seq), (10, 40, 9_500));
    }

    #[test]
    fn a_message_leaves_out_absent_fields_and_reads_back_as_the_row() {
        let row = Row::from_event(
            7,
            crate::event::Event {
                capture: crate::event::Capture {
                    feed: crate::event::Feed::Crypto,
                    lane: tickvault_wal::Lane::Live,
                    captured_at_ns: 42,
                },
                body: crate::event::Body::Trade(crate::event::Trade {
                    symbol: "BTC-USD".into(),
                    ts_ms: 1_700_000_000_000,
                    uid: 1,
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
