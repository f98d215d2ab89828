#![no_main]
use libfuzzer_sys::fuzz_target;
use tickvault_core::config::Config;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = Config::parse("fuzz", text) {
            let _ = config.validate("fuzz");
        }
    }
});
