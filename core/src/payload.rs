//! Payload encoding: postcard 1.x.
//!
//! Why postcard: bincode was the usual choice and is discontinued (its 3.0.0 release is
//! only a compile error; 2.x gets no fixes). postcard is maintained, serde-based, compact
//! (varint integers, no field names) and, since 1.0, has a frozen, documented wire format
//! (<https://postcard.jamesmunns.com/wire-format>): a payload written today decodes with
//! any later postcard 1.x. The envelope's version byte (see [`crate::record`]) decides how
//! a payload is read, so a future change of payload format is a new version, never a
//! silent reinterpretation.
//!
//! Postcard is not self-describing: adding a field to a payload type is a format change.
//! Payload types evolve by adding a new [`crate::RecordKind`] or a new format version.

use serde::{de::DeserializeOwned, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
#[error("payload encoding: {0}")]
pub struct PayloadError(#[from] postcard::Error);

/// Encodes a payload value.
pub fn to_bytes<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, PayloadError> {
    Ok(postcard::to_stdvec(value)?)
}

/// Decodes a payload value. Never panics on any input; trailing bytes are an error.
pub fn from_bytes<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, PayloadError> {
    let (value, rest) = postcard::take_from_bytes(bytes)?;
    if rest.is_empty() {
        Ok(value)
    } else {
        Err(PayloadError(postcard::Error::DeserializeBadEncoding))
    }
}
