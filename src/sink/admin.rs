//! Emptying what a `[sinks]` config points at, so that benchmarks and tests start from
//! nothing. Never called by the daemon.

use super::clickhouse::ClickHouseSink;
use super::nats::NatsSink;
use super::postgres::PostgresSink;
use super::{SinkError, SinksConfig};

/// Drops the ClickHouse and PostgreSQL databases and deletes the JetStream stream that
/// `sinks` names, whether each sink is enabled or not.
pub async fn drop_targets(sinks: &SinksConfig) -> Result<(), SinkError> {
    ClickHouseSink::new(&sinks.clickhouse).drop_database().await?;
    PostgresSink::new(&sinks.postgres, "").drop_database().await?;
    NatsSink::new(&sinks.nats).delete_stream().await
}
