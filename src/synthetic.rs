//! Synthetic records for drills and benchmarks (`wal load`), made so that a reader can
//! tell an intact record from a damaged or misplaced one without knowing its sequence.
//!
//! Payload layout (little-endian): `run u32 | producer u32 | n u64 | filler`, where the
//! filler bytes are a pure function of `(run, producer, n)`.

/// The smallest synthetic payload: the 16-byte header.
pub const MIN_PAYLOAD: usize = 16;

/// Identity of a synthetic record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Synthetic {
    pub run: u32,
    pub producer: u32,
    pub n: u64,
}

/// SplitMix64's finaliser: the simulator's market and the synthetic records both
/// derive their bytes from it.
pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn filler_seed(id: Synthetic) -> u64 {
    splitmix((u64::from(id.run) << 32 | u64::from(id.producer)) ^ splitmix(id.n))
}

/// Writes the payload of record `id`, `len` bytes long (at least [`MIN_PAYLOAD`]).
pub fn fill(id: Synthetic, len: usize, out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&id.run.to_le_bytes());
    out.extend_from_slice(&id.producer.to_le_bytes());
    out.extend_from_slice(&id.n.to_le_bytes());
    let mut state = filler_seed(id);
    while out.len() < len.max(MIN_PAYLOAD) {
        state = splitmix(state);
        let take = (len - out.len()).min(8);
        out.extend_from_slice(&state.to_le_bytes()[..take]);
    }
}

/// Checks a payload; returns its identity when every byte is as written.
pub fn verify(payload: &[u8]) -> Result<Synthetic, String> {
    if payload.len() < MIN_PAYLOAD {
        return Err(format!(
            "synthetic payload of {} bytes, shorter than its header",
            payload.len()
        ));
    }
    let u32_at = |i: usize| u32::from_le_bytes([payload[i], payload[i + 1], payload[i + 2], payload[i + 3]]);
    let mut n = [0u8; 8];
    n.copy_from_slice(&payload[8..16]);
    let id = Synthetic {
        run: u32_at(0),
        producer: u32_at(4),
        n: u64::from_le_bytes(n),
    };
    let mut expected = Vec::with_capacity(payload.len());
    fill(id, payload.len(), &mut expected);
    if expected != payload {
        return Err(format!("synthetic payload {id:?} has damaged filler"));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filled_payload_verifies_and_any_change_is_caught() {
        let id = Synthetic {
            run: 7,
            producer: 3,
            n: 123_456,
        };
        let mut p = Vec::new();
        fill(id, 100, &mut p);
        assert_eq!(p.len(), 100);
        assert_eq!(verify(&p).unwrap(), id);
        for i in 16..p.len() {
            let mut q = p.clone();
            q[i] ^= 1;
            assert!(verify(&q).is_err(), "byte {i}");
        }
    }
}
