#![no_main]
use libfuzzer_sys::fuzz_target;
use tickvault::event::Event;

fuzz_target!(|data: &[u8]| {
    let _ = Event::from_payload(data);
});
