//! Prompt-set loaders (JSON, JSONL, CSV, text). Byte 0 picks the format, byte 1 the field
//! (default list, `goal`, `instruction`); the rest is the file. Any input must give `Ok` with
//! non-empty instructions or an `Err` message, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use persona_gate::prompts::load::{hash, parse, sample, Format};

fuzz_target!(|data: &[u8]| {
    let [f, k, rest @ ..] = data else { return };
    let format = match f % 4 {
        0 => Format::Json,
        1 => Format::Jsonl,
        2 => Format::Csv,
        _ => Format::Text,
    };
    let field = match k % 3 {
        0 => None,
        1 => Some("goal"),
        _ => Some("instruction"),
    };
    match parse(rest, format, field, "fuzz") {
        Ok(v) => {
            assert!(!v.is_empty());
            assert!(v.iter().all(|i| !i.text.trim().is_empty()));
            let _ = hash(&v);
            let n = v.len();
            let s = sample(v.clone(), Some(n / 2), u64::from(*k)).expect("n/2 fits the set");
            assert_eq!(s.len(), n / 2);
            // More than the set is an error, never a silent clamp.
            assert!(sample(v, Some(n + 1), u64::from(*k)).is_err());
        }
        // One printable line: names read from the file are escaped.
        Err(e) => {
            let e = e.to_string();
            assert!(!e.is_empty() && !e.contains(char::is_control), "{e:?}");
        }
    }
});
