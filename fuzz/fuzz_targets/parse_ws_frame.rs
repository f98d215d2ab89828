#![no_main]
//! A WebSocket text frame as the live collector handles it: parsed for each market,
//! each event given its uid, and an event that passes `problem` encodes to a payload
//! that decodes to the same event. Never a panic, whatever the frame.
use libfuzzer_sys::fuzz_target;
use tickvault_core::event::identity::Uids;
use tickvault_core::event::{Capture, Event, Feed};
use tickvault_core::polygon::wire::{parse_frame, WireItem};
use tickvault_core::Lane;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    for feed in [Feed::Forex, Feed::Crypto, Feed::Stocks] {
        let mut uids = Uids::default();
        let Ok(items) = parse_frame(feed, text) else { continue };
        for item in items.into_iter().flatten() {
            let WireItem::Event(mut body) = item else { continue };
            uids.assign(&mut body);
            let event = Event {
                capture: Capture { feed, lane: Lane::Live, captured_at_ns: 1 },
                body,
            };
            if event.problem().is_none() {
                let payload = event.to_payload().expect("an event encodes");
                assert_eq!(Event::from_payload(&payload).expect("its payload decodes"), event);
            }
        }
    }
});
