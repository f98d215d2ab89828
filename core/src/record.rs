//! The record envelope: the one codec of the log.
//!
//! ```text
//! offset  size  field
//! 0       1     format_version   (u8, currently 1)
//! 1       1     kind             (u8, opaque to the log; the daemon maps it to a payload type)
//! 2       4     payload_len      (u32, little-endian)
//! 6       4     crc32            (u32, little-endian; crc32fast/IEEE over bytes 0..6 ++ payload)
//! 10      n     payload          (payload_len bytes)
//! ```
//!
//! The CRC covers the header fields before it and the whole payload, so a flipped bit
//! anywhere in a record is caught: in the version byte as an unsupported version, in the
//! length as a length mismatch, anywhere else as a CRC mismatch. Decoding checks every
//! length before it indexes, and never panics on any input (fuzzed by
//! `fuzz/fuzz_targets/decode_record.rs`).

use thiserror::Error;

/// The envelope format this build writes, and the newest it reads.
pub const FORMAT_VERSION: u8 = 1;
/// Bytes before the payload.
pub const HEADER_LEN: usize = 10;
/// The largest payload the log accepts. A market event is well under a kilobyte; the
/// limit keeps a corrupt length field from ever meaning "allocate 4 GiB".
pub const MAX_PAYLOAD_LEN: usize = 16 << 20;

/// What a payload is. The log treats it as an opaque tag; see `tickvault::event` for the
/// kinds the daemon writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RecordKind(pub u8);

/// A decoded record, borrowing its payload from the stored bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub version: u8,
    pub kind: RecordKind,
    pub payload: &'a [u8],
}

/// Why a stored record could not be decoded. Every variant means the record is corrupt
/// (or written by a newer format than this build reads); the log quarantines it.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("record is {len} bytes, shorter than its {HEADER_LEN}-byte header")]
    TooShort { len: usize },
    #[error("record format version {found} is not one this build reads (1..={FORMAT_VERSION})")]
    UnsupportedVersion { found: u8 },
    #[error("header says {declared} payload bytes, {actual} are present")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Crc { stored: u32, computed: u32 },
}

/// Why a record could not be encoded.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum EncodeError {
    #[error("payload of {len} bytes exceeds the {MAX_PAYLOAD_LEN}-byte limit")]
    PayloadTooLarge { len: usize },
}

fn checksum(header: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(header);
    hasher.update(payload);
    hasher.finalize()
}

/// Appends the envelope of one record to `out` (so a caller can reuse one buffer).
pub fn encode_into(kind: RecordKind, payload: &[u8], out: &mut Vec<u8>) -> Result<(), EncodeError> {
    if payload.len() > MAX_PAYLOAD_LEN {
        return Err(EncodeError::PayloadTooLarge { len: payload.len() });
    }
    let mut header = [0u8; 6];
    header[0] = FORMAT_VERSION;
    header[1] = kind.0;
    // Cannot truncate: checked against MAX_PAYLOAD_LEN above.
    header[2..6].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    let crc = checksum(&header, payload);
    out.reserve(HEADER_LEN + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(payload);
    Ok(())
}

/// The envelope of one record as a new buffer.
pub fn encode(kind: RecordKind, payload: &[u8]) -> Result<Vec<u8>, EncodeError> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    encode_into(kind, payload, &mut out)?;
    Ok(out)
}

/// Decodes and verifies one stored record. Never panics.
pub fn decode(bytes: &[u8]) -> Result<RecordRef<'_>, DecodeError> {
    let Some((header, rest)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        return Err(DecodeError::TooShort { len: bytes.len() });
    };
    let version = header[0];
    if version == 0 || version > FORMAT_VERSION {
        return Err(DecodeError::UnsupportedVersion { found: version });
    }
    let declared = u32::from_le_bytes([header[2], header[3], header[4], header[5]]) as usize;
    if declared != rest.len() {
        return Err(DecodeError::LengthMismatch {
            declared,
            actual: rest.len(),
        });
    }
    let stored = u32::from_le_bytes([header[6], header[7], header[8], header[9]]);
    let computed = checksum(&header[..6], rest);
    if stored != computed {
        return Err(DecodeError::Crc { stored, computed });
    }
    Ok(RecordRef {
        version,
        kind: RecordKind(header[1]),
        payload: rest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_record_round_trips(kind in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let bytes = encode(RecordKind(kind), &payload).unwrap();
            let record = decode(&bytes).unwrap();
            prop_assert_eq!(record.kind, RecordKind(kind));
            prop_assert_eq!(record.payload, &payload[..]);
            prop_assert_eq!(record.version, FORMAT_VERSION);
        }

        #[test]
        fn a_record_cut_short_at_any_length_is_an_error(kind in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let bytes = encode(RecordKind(kind), &payload).unwrap();
            for len in 0..bytes.len() {
                prop_assert!(decode(&bytes[..len]).is_err(), "truncated to {} of {} bytes decoded", len, bytes.len());
            }
        }

        #[test]
        fn any_single_flipped_bit_is_reported_as_corruption(
            kind in any::<u8>(),
            payload in proptest::collection::vec(any::<u8>(), 0..512),
            position in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut bytes = encode(RecordKind(kind), &payload).unwrap();
            let at = position.index(bytes.len());
            bytes[at] ^= 1 << bit;
            prop_assert!(decode(&bytes).is_err(), "flipping bit {} of byte {} went unnoticed", bit, at);
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&bytes);
        }
    }

    #[test]
    fn every_flipped_byte_of_a_small_record_is_caught() {
        let bytes = encode(RecordKind(7), b"EUR/USD 1.0842 1.0843").unwrap();
        for at in 0..bytes.len() {
            for flip in 1..=255u8 {
                let mut corrupt = bytes.clone();
                corrupt[at] ^= flip;
                assert!(decode(&corrupt).is_err(), "byte {at} xor {flip:#x} went unnoticed");
            }
        }
    }

    #[test]
    fn the_byte_layout_is_frozen() {
        // Old logs must stay readable: this is the exact encoding of version 1.
        let bytes = encode(RecordKind(3), b"abc").unwrap();
        let mut expected = vec![1u8, 3, 3, 0, 0, 0];
        let crc = crc32fast::hash(&[1, 3, 3, 0, 0, 0, b'a', b'b', b'c']);
        expected.extend_from_slice(&crc.to_le_bytes());
        expected.extend_from_slice(b"abc");
        assert_eq!(bytes, expected);
    }

    #[test]
    fn a_newer_format_version_is_named_as_such() {
        let mut bytes = encode(RecordKind(3), b"abc").unwrap();
        bytes[0] = FORMAT_VERSION + 1;
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::UnsupportedVersion {
                found: FORMAT_VERSION + 1
            })
        );
    }
}
