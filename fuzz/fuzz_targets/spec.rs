//! The experiment spec TOML (`reproduce --spec FILE`): parse and check it, then expand its
//! grid as for a 28-layer model, which resolves every `{var}` template, layer list, source
//! and scope.
#![no_main]

use std::collections::{BTreeMap, BTreeSet};

use libfuzzer_sys::fuzz_target;
use persona_gate::experiment::spec::{Builtins, Spec};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(spec) = Spec::parse(s, "fuzz") else {
        return;
    };
    let ids: BTreeMap<String, Vec<String>> = spec
        .prompts
        .keys()
        .map(|k| (k.clone(), (0..4).map(|i| i.to_string()).collect()))
        .collect();
    let b = Builtins {
        n_layer: 28,
        steer_layer: Some(11),
        steer_coef: Some(4.0),
        refusal_layer: Some(15),
    };
    if let Ok(conds) = spec.expand(&b, &ids) {
        let unique: BTreeSet<&String> = conds.iter().map(|c| &c.id).collect();
        assert_eq!(unique.len(), conds.len(), "condition ids are unique");
        for iv in conds.iter().flat_map(|c| &c.interventions) {
            assert!(!iv.layers.is_empty() && iv.layers.iter().all(|&l| l < 28));
            assert!(iv.coefficient.is_finite());
        }
    }
});
