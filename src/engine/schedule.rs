//! The engine's scheduling rules, as pure functions: which prompts share a decoded prefix,
//! and how pending prompt tokens are cut into decode calls. No llama.cpp here, so each rule
//! is unit-tested against the properties the engine relies on.
//!
//! Every decode call must run as exactly one llama.cpp ubatch with rows in push order. With
//! one KV stream per sequence llama.cpp splits a batch "equally": a run of *consecutive*
//! sequence ids, each contributing the *same* number of tokens. And a prompt row's numbers
//! must not depend on the call it is in (see the engine's module docs): the CPU kernels are
//! row-invariant except that attention over a chunk of one token takes a different path
//! (vec_dot instead of tinyBLAS) than over a chunk of two or more. So prompt chunks are never
//! one token long, unless the prompt itself is.

use std::ops::Range;

/// The fewest shared prompt tokens worth decoding once and copying (a stream copy costs a
/// memcpy of the whole KV stream, about a millisecond; eight prompt rows cost far more).
pub const MIN_SHARED: usize = 8;

/// Consecutive prompts (in admission order) that begin with the same `len` tokens and carry
/// the same hooks: those rows are decoded once, into a cache stream, and copied to each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub members: Range<usize>,
    pub len: usize,
}

fn lcp(a: &[i32], b: &[i32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Groups consecutive prompts into clusters that share a prefix.
///
/// `signature[i]` identifies the hooks prompt `i` is decoded under (only prompts with equal
/// signatures can share rows); `limit[i]` caps the prefix prompt `i` may share (the engine
/// keeps at least two tokens of each prompt, and its post-instruction span, to decode itself).
/// Greedy, left to right: a prompt joins the current cluster unless that would lower the
/// rows saved, `(members - 1) × len`.
pub fn plan_prefixes(tokens: &[&[i32]], signature: &[u64], limit: &[usize]) -> Vec<Cluster> {
    let n = tokens.len();
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let mut len = limit[i];
        let mut j = i + 1;
        while j < n && signature[j] == signature[i] {
            let l = lcp(tokens[i], tokens[j]).min(limit[j]).min(len);
            if l < MIN_SHARED || (j - i) * l < (j - i - 1) * len {
                break;
            }
            len = l;
            j += 1;
        }
        if j - i >= 2 {
            out.push(Cluster { members: i..j, len });
        }
        i = j;
    }
    out
}

/// Whether taking `take` of `remaining` tokens leaves none or at least two.
fn leaves_no_single(remaining: usize, take: usize) -> bool {
    remaining == take || remaining >= take + 2
}

/// The next prefill call over `items` = (sequence id, tokens remaining), sorted by id, all
/// with tokens remaining: returns (how many leading items take part, tokens from each).
///
/// The items taking part have consecutive ids, take the same number of tokens, and at most
/// `cap` rows in all; no item is left with exactly one token, and a chunk is one token only
/// for items whose whole prompt is one token (`remaining == 1` from the start, since no call
/// ever leaves one).
///
/// # Panics
/// If `items` is empty or `cap < 4` (the engine validates `--batch`).
pub fn next_prefill(items: &[(usize, usize)], cap: usize) -> (usize, usize) {
    assert!(
        !items.is_empty() && cap >= 4,
        "next_prefill: no items or cap < 4"
    );
    let mut run = 1;
    while run < items.len() && items[run].0 == items[run - 1].0 + 1 {
        run += 1;
    }
    if items[0].1 == 1 {
        let k = items[..run].iter().take_while(|x| x.1 == 1).count();
        return (k.min(cap), 1);
    }
    run = items[..run].iter().take_while(|x| x.1 >= 2).count();
    run = run.min(cap / 2);
    loop {
        let members = &items[..run];
        let least = members.iter().map(|x| x.1).min().expect("run >= 1");
        let mut take = least.min(cap / run);
        while take >= 2 && !members.iter().all(|x| leaves_no_single(x.1, take)) {
            take -= 1;
        }
        if take >= 2 {
            return (run, take);
        }
        run -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::Rng;

    /// Runs `next_prefill` to the end and checks every property the engine relies on.
    fn drain(lens: &[usize], ids: &[usize], cap: usize) -> usize {
        let mut rem: Vec<(usize, usize)> = ids.iter().copied().zip(lens.iter().copied()).collect();
        let mut done = vec![0usize; lens.len()];
        let mut calls = 0;
        while !rem.is_empty() {
            let (k, take) = next_prefill(&rem, cap);
            assert!(
                k >= 1 && take >= 1 && k * take <= cap,
                "{k} x {take} > {cap}"
            );
            for w in rem[..k].windows(2) {
                assert_eq!(w[1].0, w[0].0 + 1, "ids in a call are consecutive");
            }
            for item in &mut rem[..k] {
                let i = ids.iter().position(|&s| s == item.0).unwrap();
                if take == 1 {
                    assert_eq!(lens[i], 1, "a one-token chunk only for one-token prompts");
                }
                item.1 -= take;
                done[i] += take;
                assert_ne!(item.1, 1, "a prompt was left with a single token");
            }
            rem.retain(|x| x.1 > 0);
            calls += 1;
        }
        assert_eq!(done, lens, "every token decoded exactly once");
        calls
    }

    #[test]
    fn prefill_calls_keep_the_invariants_on_random_shapes() {
        let mut rng = Rng::new(42);
        for _ in 0..2000 {
            let n = 1 + rng.below(20) as usize;
            let cap = 4 + rng.below(600) as usize;
            let lens: Vec<usize> = (0..n)
                .map(|_| match rng.below(10) {
                    0 => 1,
                    1 => 2 + rng.below(3) as usize,
                    _ => 2 + rng.below(200) as usize,
                })
                .collect();
            // Ids with gaps now and then, as when some slots are not prefilling.
            let mut ids = Vec::new();
            let mut id = 0;
            for _ in 0..n {
                id += 1 + usize::from(rng.below(5) == 0);
                ids.push(id);
            }
            drain(&lens, &ids, cap);
        }
    }

    #[test]
    fn equal_prompts_in_consecutive_slots_are_one_call() {
        assert_eq!(drain(&[50; 8], &[0, 1, 2, 3, 4, 5, 6, 7], 512), 1);
        // 16 x 50 rows exceed 512: two calls of 10 and 6 sequences.
        assert_eq!(drain(&[50; 16], &(0..16).collect::<Vec<_>>(), 512), 2);
    }

    #[test]
    fn a_remainder_of_one_is_avoided() {
        // 5 and 6 cannot both take 5 (6 would keep 1) nor 4 (5 would keep 1): they take 3.
        assert_eq!(next_prefill(&[(0, 5), (1, 6)], 512), (2, 3));
        // A cap that would leave one token takes one less.
        assert_eq!(next_prefill(&[(0, 9)], 8), (1, 7));
        assert_eq!(next_prefill(&[(0, 1), (1, 1), (2, 7)], 512), (2, 1));
    }

    fn toks(prefix: &[i32], rest: &[i32]) -> Vec<i32> {
        prefix.iter().chain(rest).copied().collect()
    }

    #[test]
    fn clusters_follow_shared_prefixes_and_signatures() {
        let sys_a: Vec<i32> = (0..20).collect();
        let sys_b: Vec<i32> = (100..130).collect();
        let ps = [
            toks(&sys_a, &[1, 2, 3]),
            toks(&sys_a, &[4, 5, 6]),
            toks(&sys_a, &[7, 8]),
            toks(&sys_b, &[9, 9, 9]),
            toks(&sys_b, &[8, 8, 8]),
            toks(&sys_b, &[7, 7, 7]),
            toks(&sys_b, &[6, 6, 6]),
        ];
        let refs: Vec<&[i32]> = ps.iter().map(Vec::as_slice).collect();
        let limit: Vec<usize> = ps.iter().map(|p| p.len() - 2).collect();
        let c = plan_prefixes(&refs, &[0; 7], &limit);
        assert_eq!(
            c,
            vec![
                Cluster {
                    members: 0..3,
                    len: 20
                },
                Cluster {
                    members: 3..7,
                    len: 30
                }
            ]
        );
        // Other hooks on prompt 5: it cannot share rows with 3 and 4.
        let c = plan_prefixes(&refs, &[0, 0, 0, 0, 0, 1, 0], &limit);
        assert_eq!(
            c[1],
            Cluster {
                members: 3..5,
                len: 30
            }
        );
        // A limit below MIN_SHARED shares nothing.
        let c = plan_prefixes(&refs, &[0; 7], &[4; 7]);
        assert!(c.is_empty());
        // The limit caps the shared length: identical prompts keep their last tokens.
        let same = [toks(&sys_a, &[1, 2]), toks(&sys_a, &[1, 2])];
        let refs: Vec<&[i32]> = same.iter().map(Vec::as_slice).collect();
        let c = plan_prefixes(&refs, &[0; 2], &[20, 20]);
        assert_eq!(
            c,
            vec![Cluster {
                members: 0..2,
                len: 20
            }]
        );
    }
}
