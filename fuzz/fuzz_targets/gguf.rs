//! The GGUF header reader every model and control-vector file goes through first. Errors
//! must be one printable line (names read from the file are escaped).
#![no_main]

use std::io::Cursor;

use libfuzzer_sys::fuzz_target;
use persona_gate::gguf::{file_type_name, Gguf};

fuzz_target!(|data: &[u8]| {
    let g = match Gguf::parse(Cursor::new(data), data.len() as u64) {
        Ok(g) => g,
        Err(e) => {
            let e = e.to_string();
            assert!(!e.contains(char::is_control), "{e:?}");
            return;
        }
    };
    let _ = g.arch();
    let _ = g.arch_u64("block_count");
    let _ = g.arch_u64("embedding_length");
    let _ = g.get_u64("general.file_type").map(file_type_name);
    let _ = g.get_str("tokenizer.chat_template");
    for t in &g.tensors {
        if let Some(n) = t.n_bytes {
            assert!(
                t.offset + n <= data.len() as u64,
                "{} out of bounds",
                t.name
            );
        }
    }
});
