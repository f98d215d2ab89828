//! Sources: the live WebSocket collector and the historical REST backfill.

pub mod backfill;
pub mod live;
