#![no_main]
//! A REST aggregates body as the backfill downloader handles it: parsed, each bar made
//! an event, and a bar that passes `problem` encodes to a payload that decodes to the
//! same event. Never a panic, whatever the body.
use libfuzzer_sys::fuzz_target;
use tickvault_core::event::{Body, Capture, Event, Feed};
use tickvault_core::polygon::rest::AggsPage;
use tickvault_core::Lane;

fuzz_target!(|data: &[u8]| {
    let Ok(page) = AggsPage::parse(data) else { return };
    let _ = page.has_data();
    for bar in &page.results {
        let event = Event {
            capture: Capture { feed: Feed::Forex, lane: Lane::Backfill, captured_at_ns: 1 },
            body: Body::Bar(bar.to_bar("EUR/USD")),
        };
        if event.problem().is_none() {
            let payload = event.to_payload().expect("a bar encodes");
            assert_eq!(Event::from_payload(&payload).expect("its payload decodes"), event);
        }
    }
});
