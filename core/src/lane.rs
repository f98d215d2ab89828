//! Lanes: separate sequences, separate column families, separate runners downstream.

use std::fmt;
use std::str::FromStr;

/// A lane of the log. Each has its own column family and its own sequence, so live data
/// never queues behind backfill, downstream or on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Lane {
    Live,
    Backfill,
    Derived,
}

impl Lane {
    pub const ALL: [Lane; 3] = [Lane::Live, Lane::Backfill, Lane::Derived];

    /// The column family that holds the lane's records, and the lane's name everywhere.
    pub const fn name(self) -> &'static str {
        match self {
            Lane::Live => "live",
            Lane::Backfill => "backfill",
            Lane::Derived => "derived",
        }
    }

    #[doc(hidden)]
    pub const fn tag(self) -> u8 {
        match self {
            Lane::Live => 0,
            Lane::Backfill => 1,
            Lane::Derived => 2,
        }
    }

    #[doc(hidden)]
    pub const fn from_tag(tag: u8) -> Option<Lane> {
        match tag {
            0 => Some(Lane::Live),
            1 => Some(Lane::Backfill),
            2 => Some(Lane::Derived),
            _ => None,
        }
    }

    #[doc(hidden)]
    pub const fn index(self) -> usize {
        self.tag() as usize
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown lane {0:?} (expected live, backfill or derived)")]
pub struct UnknownLane(pub String);

impl FromStr for Lane {
    type Err = UnknownLane;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Lane::ALL
            .into_iter()
            .find(|lane| lane.name() == s)
            .ok_or_else(|| UnknownLane(s.to_owned()))
    }
}
