//! Sinks: forwarding the log to ClickHouse, TimescaleDB/PostgreSQL and NATS JetStream.
//!
//! One [`runner`] per (sink, lane), each with its own cursor in the log and its own
//! connection (bulkheads), so a slow or absent sink, or a deep backfill, holds up nothing
//! but itself. A runner reads from its cursor, cuts a batch at log positions, writes it
//! (retrying the identical batch behind a [`breaker`]), and moves its cursor only once
//! the sink acknowledged. Delivery is at-least-once; every sink deduplicates on the
//! natural key, so the effect is exactly once.

pub mod admin;
pub mod breaker;
pub mod clickhouse;
pub mod error;
pub mod nats;
pub mod postgres;
pub mod priority;
pub mod refused;
pub mod row;
pub mod runner;

pub use error::SinkError;
pub use row::{Batch, Pushed, Row, SinkKey};
pub use runner::{Holds, RunnerSpec, RunnerStats, Sink};
pub use tickvault_core::config::sinks as config;
pub use tickvault_core::config::sinks::SinksConfig;
