//! A run directory's group files: whatever bytes a group file holds (truncated, edited,
//! copied from another run), verification says done, invalid or foreign, never panics, and
//! says done only for exactly the group's rows of this run.
#![no_main]

use libfuzzer_sys::fuzz_target;
use persona_gate::experiment::plan::{verify_group_bytes, GroupState, Plan};

/// A real plan: `fuzz/plan.json`, which fuzz/seed.sh writes by running `reproduce` on
/// fuzz/plan-spec.toml (two conditions, eight pairs in three groups).
fn plan() -> &'static Plan {
    static PLAN: std::sync::OnceLock<Plan> = std::sync::OnceLock::new();
    PLAN.get_or_init(|| serde_json::from_slice(include_bytes!("../plan.json")).expect("plan.json"))
}

fuzz_target!(|data: &[u8]| {
    let p = plan();
    let g = usize::from(data.first().copied().unwrap_or(0)) % (p.n_groups + 1);
    let st = verify_group_bytes(p, g, data.get(1..).unwrap_or(&[]));
    if st == GroupState::Done {
        // Done only for rows that carry this run's id (one per pair of the group).
        let id = p.run_id.as_bytes();
        let hits = data[1..].windows(id.len()).filter(|w| *w == id).count();
        assert!(hits >= p.group_pairs(g).len(), "{hits} run ids in a done group");
    }
});
