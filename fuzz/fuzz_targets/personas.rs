//! The personas TOML file (`extract persona --personas FILE`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use persona_gate::prompts::parse_personas;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(m) = parse_personas(s, "fuzz") {
        assert!(m
            .values()
            .all(|p| !p.positive.is_empty() && !p.negative.is_empty()));
    }
});
