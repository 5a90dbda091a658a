//! The direction-file (safetensors) reader. Whatever parses must write back and re-read to
//! the same directions (bit for bit) and metadata.
#![no_main]

use libfuzzer_sys::fuzz_target;
use persona_gate::directions::DirectionFile;

fn bits(f: &DirectionFile) -> Vec<(String, Vec<u32>)> {
    f.directions
        .iter()
        .map(|d| {
            (
                d.name.clone(),
                d.rows.iter().flatten().map(|x| x.to_bits()).collect(),
            )
        })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    match DirectionFile::from_bytes(data) {
        Ok(f) => {
            assert!(f.n_layer() > 0 && f.n_embd() > 0);
            let _ = f.directions[0].norms();
            let g = DirectionFile::from_bytes(&f.to_bytes()).expect("our own bytes re-read");
            let mut a = bits(&f);
            a.sort();
            assert_eq!(a, bits(&g));
            assert_eq!(f.meta, g.meta);
        }
        Err(e) => {
            let e = e.to_string();
            assert!(!e.is_empty() && !e.contains(char::is_control), "{e:?}");
        }
    }
});
