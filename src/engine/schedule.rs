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

/// The order prompts enter slots, given each prompt's own tokens (after any shared prefix).
///
/// Clusters are taken `window` at a time (the session's prefix streams, so every cluster of
/// a block has its prefix decoded while its members arrive), with the unclustered prompts
/// before them. Within a block, prompts go in columns: members `0..piece` of every cluster,
/// then members `piece..2 piece`, and so on, each column longest first.
///
/// Prompts decoded together take the same number of tokens per call, so prompts of equal
/// length finish together in one wide call, while unequal ones end in a staircase of narrow
/// calls (a prompt one token longer than its neighbour cannot finish beside it). The
/// clusters of a grid or a persona set hold the same questions under different conditions
/// or system prompts, so a column puts the same question under up to `window` conditions
/// side by side: measured on 128 persona prompts (8 system prompts x 16 questions, 16
/// slots), 129 prefill calls cluster by cluster, 17 in columns. Columns also keep the
/// prompts in flight to about `window x piece`, so the groups of a run complete (and are
/// written) as it goes rather than at the end of a block. Results do not depend on the
/// order (batch invariance).
pub fn admission_order(
    own: &[usize],
    clusters: &[Cluster],
    window: usize,
    piece: usize,
) -> Vec<usize> {
    let piece = piece.max(1);
    let by_len = |a: &usize, b: &usize| own[*b].cmp(&own[*a]).then(a.cmp(b));
    // Segments covering 0..n in order: unclustered runs and clusters, cut into blocks that
    // hold `window` clusters each.
    let mut blocks: Vec<Vec<Range<usize>>> = vec![vec![]];
    let mut in_block = 0;
    let mut at = 0;
    for cl in clusters {
        if in_block == window.max(1) {
            blocks.push(vec![]);
            in_block = 0;
        }
        let b = blocks.last_mut().expect("one block");
        if at < cl.members.start {
            b.push(at..cl.members.start);
        }
        b.push(cl.members.clone());
        in_block += 1;
        at = cl.members.end;
    }
    if at < own.len() {
        blocks.last_mut().expect("one block").push(at..own.len());
    }
    let mut order = Vec::with_capacity(own.len());
    for b in &blocks {
        let longest = b.iter().map(|r| r.len()).max().unwrap_or(0);
        for j in (0..longest).step_by(piece) {
            let mut col: Vec<usize> = b
                .iter()
                .flat_map(|r| (r.start + j).min(r.end)..(r.start + j + piece).min(r.end))
                .collect();
            col.sort_by(by_len);
            order.extend(col);
        }
    }
    order
}

/// Whether taking `take` of `remaining` tokens leaves none or at least two.
fn leaves_no_single(remaining: usize, take: usize) -> bool {
    remaining == take || remaining >= take + 2
}

/// The next prefill call over `items` = (sequence id, tokens remaining), sorted by id, all
/// with tokens remaining: returns (index of the first item taking part, how many take part,
/// tokens from each).
///
/// The items taking part have consecutive ids, take the same number of tokens, and at most
/// `cap` rows in all; no item is left with exactly one token, and a chunk is one token only
/// for items whose whole prompt is one token (`remaining == 1` from the start, since no call
/// ever leaves one). Among the calls that keep these rules, the one with the most rows (on a
/// tie, the longest take).
///
/// # Panics
/// If `items` is empty or `cap < 4` (the engine validates `--batch`).
pub fn next_prefill(items: &[(usize, usize)], cap: usize) -> (usize, usize, usize) {
    assert!(
        !items.is_empty() && cap >= 4,
        "next_prefill: no items or cap < 4"
    );
    // One-token prompts go first, together.
    if let Some(a) = items.iter().position(|x| x.1 == 1) {
        let k = items[a..]
            .iter()
            .zip(
                items[a..]
                    .iter()
                    .skip(1)
                    .map(Some)
                    .chain(std::iter::once(None)),
            )
            .take_while(|(x, _)| x.1 == 1)
            .count();
        // Only consecutive ids in one call.
        let mut n = 1;
        while n < k && items[a + n].0 == items[a + n - 1].0 + 1 {
            n += 1;
        }
        return (a, n.min(cap), 1);
    }
    let mut best = (0, 1, 0usize);
    let mut best_rows = 0;
    // Candidate takes: each item's remaining (finishing it), and those minus two or more
    // (the largest that still leaves the others valid is found per run below).
    let mut takes: Vec<usize> = items.iter().map(|x| x.1.min(cap)).collect();
    takes.sort_unstable();
    takes.dedup();
    for &t0 in &takes {
        for take in [t0, t0.saturating_sub(2)] {
            if take < 2 {
                continue;
            }
            // Runs of consecutive ids whose every member can take `take`.
            let mut a = 0;
            while a < items.len() {
                if !leaves_no_single(items[a].1, take) {
                    a += 1;
                    continue;
                }
                let mut b = a + 1;
                while b < items.len()
                    && items[b].0 == items[b - 1].0 + 1
                    && leaves_no_single(items[b].1, take)
                {
                    b += 1;
                }
                let n = (b - a).min(cap / take);
                // Ties go to the longer take: fewer calls remain after it.
                if n * take > best_rows || (n * take == best_rows && take > best.2) {
                    best_rows = n * take;
                    best = (a, n, take);
                }
                a = b;
            }
        }
    }
    if best_rows == 0 {
        // Every item has 2 or 3 left and no two can share: the first alone.
        let r = items[0].1;
        return (0, 1, r.min(cap));
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    /// Runs `next_prefill` to the end and checks every property the engine relies on.
    fn drain(lens: &[usize], ids: &[usize], cap: usize) -> usize {
        let mut rem: Vec<(usize, usize)> = ids.iter().copied().zip(lens.iter().copied()).collect();
        let mut done = vec![0usize; lens.len()];
        let mut calls = 0;
        while !rem.is_empty() {
            let (a, k, take) = next_prefill(&rem, cap);
            assert!(
                k >= 1 && take >= 1 && k * take <= cap && a + k <= rem.len(),
                "{k} x {take} > {cap}"
            );
            for w in rem[a..a + k].windows(2) {
                assert_eq!(w[1].0, w[0].0 + 1, "ids in a call are consecutive");
            }
            for item in &mut rem[a..a + k] {
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
        // 5 and 6 cannot both take 5 (6 would keep 1) nor 4 (5 would keep 1): 6 alone
        // takes all of its 6, the most rows a valid call has.
        assert_eq!(next_prefill(&[(0, 5), (1, 6)], 512), (1, 1, 6));
        // A cap that would leave one token takes less.
        let (_, n, t) = next_prefill(&[(0, 9)], 8);
        assert!(n == 1 && t <= 7 && 9 - t != 1);
        assert_eq!(next_prefill(&[(0, 1), (1, 1), (2, 7)], 512), (0, 2, 1));
        // The widest run wins over the first one.
        assert_eq!(
            next_prefill(&[(0, 3), (2, 20), (3, 20), (4, 20)], 512),
            (1, 3, 20)
        );
    }

    #[test]
    fn admission_is_longest_first_in_columns_of_clusters() {
        let own = [3, 9, 5, 2, 8, 4, 7];
        let one = [Cluster {
            members: 2..5,
            len: 10,
        }];
        assert_eq!(
            admission_order(&own, &one, 1, 16),
            vec![1, 4, 6, 2, 5, 0, 3]
        );
        assert_eq!(admission_order(&own, &[], 2, 16), vec![1, 4, 6, 2, 5, 0, 3]);
        // Two clusters of the same three questions: one block interleaves them by length,
        // blocks of one keep each cluster's members together.
        let own = [5, 9, 7, 5, 9, 7];
        let two = [
            Cluster {
                members: 0..3,
                len: 20,
            },
            Cluster {
                members: 3..6,
                len: 30,
            },
        ];
        assert_eq!(admission_order(&own, &two, 2, 16), vec![1, 4, 2, 5, 0, 3]);
        assert_eq!(admission_order(&own, &two, 1, 16), vec![1, 2, 0, 4, 5, 3]);
        // Columns of two: the first two questions of both clusters, then the third.
        assert_eq!(admission_order(&own, &two, 2, 2), vec![1, 4, 0, 3, 2, 5]);
        // Every prompt exactly once, whatever the shapes.
        let mut rng = Rng::new(3);
        for _ in 0..500 {
            let n = 1 + rng.below(60) as usize;
            let own: Vec<usize> = (0..n).map(|_| 2 + rng.below(30) as usize).collect();
            let mut cl = vec![];
            let mut i = rng.below(3) as usize;
            while i + 2 <= n {
                let len = 2 + rng.below(12) as usize;
                let end = (i + len).min(n);
                cl.push(Cluster {
                    members: i..end,
                    len: 8,
                });
                i = end + rng.below(3) as usize;
            }
            let w = 1 + rng.below(5) as usize;
            let p = 1 + rng.below(8) as usize;
            let mut o = admission_order(&own, &cl, w, p);
            o.sort_unstable();
            assert_eq!(o, (0..n).collect::<Vec<_>>());
        }
    }

    /// Calls `next_prefill` makes for prompts admitted in `order` through `slots` slots that
    /// are refilled as prompts finish (the engine's prompt-only mode).
    fn calls_with_refill(own: &[usize], order: &[usize], slots: usize) -> usize {
        let mut pending: std::collections::VecDeque<usize> = order.iter().copied().collect();
        let mut rem: Vec<Option<usize>> = vec![None; slots];
        let mut calls = 0;
        loop {
            for r in rem.iter_mut().filter(|r| r.is_none()) {
                *r = pending.pop_front().map(|p| own[p]);
            }
            let items: Vec<(usize, usize)> = rem
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r.map(|r| (i, r)))
                .collect();
            if items.is_empty() {
                return calls;
            }
            let (a, n, t) = next_prefill(&items, 512);
            for &(i, r) in &items[a..a + n] {
                rem[i] = (r > t).then(|| r - t);
            }
            calls += 1;
        }
    }

    #[test]
    fn interleaving_clusters_by_length_cuts_prefill_calls() {
        // The benchmark's persona shape: 8 system prompts x the same 16 questions.
        let q = [
            18, 17, 15, 15, 14, 14, 14, 13, 13, 13, 13, 12, 12, 11, 11, 10,
        ];
        let own: Vec<usize> = (0..8).flat_map(|_| q).collect();
        let clusters: Vec<Cluster> = (0..8)
            .map(|c| Cluster {
                members: c * 16..c * 16 + 16,
                len: 30,
            })
            .collect();
        let apart = calls_with_refill(&own, &admission_order(&own, &clusters, 1, 16), 16);
        let together = calls_with_refill(&own, &admission_order(&own, &clusters, 8, 16), 16);
        assert!(
            together * 4 <= apart,
            "{together} calls interleaved vs {apart} apart"
        );
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
