#![no_main]
//! The log's one decode function on arbitrary bytes: never panics, and whatever decodes
//! re-encodes to the same bytes.
use libfuzzer_sys::fuzz_target;
use tickvault_core::record;

fuzz_target!(|data: &[u8]| {
    if let Ok(rec) = record::decode(data) {
        assert_eq!(record::encode(rec.kind, rec.payload).unwrap(), data);
    }
});
