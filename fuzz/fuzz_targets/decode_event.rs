#![no_main]
use libfuzzer_sys::fuzz_target;
use tickvault_core::event::Event;

fuzz_target!(|data: &[u8]| {
    let _ = Event::from_payload(data);
});
