//! llama.cpp control-vector GGUF import (what any command taking `-d FILE.gguf` reads).
//! Whatever imports must export again and re-import to the same rows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use persona_gate::directions::cvec;

fuzz_target!(|data: &[u8]| {
    let f = match cvec::import(data) {
        Ok(f) => f,
        Err(e) => {
            let e = e.to_string();
            assert!(!e.contains(char::is_control), "{e:?}");
            return;
        }
    };
    let d = f.get(None).expect("one direction");
    let layers: Vec<usize> = (1..d.n_layer())
        .filter(|&l| d.rows[l].iter().any(|&x| x != 0.0))
        .collect();
    if layers.is_empty() {
        return;
    }
    let arch = f.meta.get("arch").map_or("any", String::as_str);
    let b = cvec::export(d, arch, 1.0, &layers).expect("export of an imported vector");
    let g = cvec::import(&b).expect("our own export re-imports");
    let e = g.get(None).unwrap();
    for &l in &layers {
        for (x, y) in d.rows[l].iter().zip(&e.rows[l]) {
            assert!(
                x == y || (x.is_nan() && y.is_nan()),
                "layer {l}: {x} vs {y}"
            );
        }
    }
});
