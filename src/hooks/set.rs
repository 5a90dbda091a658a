//! The hooks of one run and the eval-callback visitor that applies them row by row.

use super::capture::{fixed, Capture};
use super::edit::{Edit, EditKind, Scope};
use crate::error::{Error, IdleHook, LayerOf, Result, RunError, Shaped};
use crate::ffi::LayerVisitor;

/// Which sequence and position a row of a decode call belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowInfo {
    /// Index of the prompt in the caller's list.
    pub seq: usize,
    pub kind: RowKind,
    /// Whether the row produces logits (only those rows reach the last layer).
    pub output: bool,
    /// A shared-prefix row, decoded once for several prompts: the index of the list of the
    /// *other* prompts that own it (given to [`HookSet::set_rows`]), or [`RowInfo::OWN`].
    pub shared: u32,
}

impl RowInfo {
    /// The row belongs to `seq` alone.
    pub const OWN: u32 = u32::MAX;

    pub fn own(seq: usize, kind: RowKind, output: bool) -> RowInfo {
        RowInfo {
            seq,
            kind,
            output,
            shared: RowInfo::OWN,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    /// Prompt token `idx` of `len`; the post-instruction span starts at `post_start`.
    Prompt { idx: u32, len: u32, post_start: u32 },
    /// The `idx`-th generated token, fed back in.
    Generated { idx: u32 },
    /// A row that belongs to no prompt (kept for callers that pad a batch); hooks never
    /// touch or read it.
    Padding,
}

/// Every hook of one run, applied at `l_out` layers through the engine's eval callback.
#[derive(Debug, Clone)]
pub struct HookSet {
    n_layer: usize,
    n_embd: usize,
    pub edits: Vec<Edit>,
    pub captures: Vec<Capture>,
    want: Vec<bool>,
    rows: Vec<RowInfo>,
    out_rows: Vec<usize>,
    /// The other owners of each shared-prefix row set, indexed by `RowInfo::shared`.
    shared: Vec<Vec<usize>>,
    /// Layers some hook acts on for the rows of the current decode: the callback asks only
    /// for these, so a call whose rows no hook touches runs as one graph (each wanted layer
    /// splits llama.cpp's graph, and is a device sync on a GPU).
    active: Vec<bool>,
    /// Per sequence, the edits that apply to it: adds before projections, each kind in the
    /// order added. Built on demand for as many sequences as the rows name.
    by_seq: Vec<Vec<u32>>,
    /// What each sequence is (e.g. `condition E2[layer=5], prompt 3`), for error messages.
    names: Vec<String>,
}

impl HookSet {
    pub fn new(n_layer: usize, n_embd: usize) -> HookSet {
        HookSet {
            n_layer,
            n_embd,
            edits: vec![],
            captures: vec![],
            want: vec![false; n_layer],
            rows: vec![],
            out_rows: vec![],
            shared: vec![],
            active: vec![false; n_layer],
            by_seq: vec![],
            names: vec![],
        }
    }

    /// Indexes which edits apply to each of the first `n_seqs` sequences, so a decode costs
    /// one lookup per row and edit instead of a scope search per edit.
    fn index(&mut self, n_seqs: usize) {
        let mut by_seq: Vec<Vec<u32>> = vec![Vec::new(); n_seqs];
        for kind in [EditKind::Add, EditKind::Project] {
            for (i, e) in self
                .edits
                .iter()
                .enumerate()
                .filter(|(_, e)| e.kind == kind)
            {
                match &e.scope {
                    Scope::All => by_seq.iter_mut().for_each(|v| v.push(i as u32)),
                    Scope::Only(seqs) => {
                        for &q in seqs.iter().filter(|&&q| q < n_seqs) {
                            by_seq[q].push(i as u32);
                        }
                    }
                }
            }
        }
        self.by_seq = by_seq;
    }

    /// Makes sure the per-sequence index covers sequences `0..n_seqs`.
    pub fn prepare(&mut self, n_seqs: usize) {
        if self.by_seq.len() < n_seqs {
            self.index(n_seqs);
        }
    }

    /// Identifies the edits sequence `seq` is decoded under: two sequences with equal
    /// signatures get identical activations from identical tokens, so they may share rows.
    pub fn signature(&mut self, seq: usize) -> u64 {
        self.prepare(seq + 1);
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &e in &self.by_seq[seq] {
            h = (h ^ (e as u64 + 1)).wrapping_mul(0x0100_0000_01b3);
        }
        h
    }

    /// Names the batch's sequences (by index) so that a non-finite value is reported with
    /// the condition it came from, not just a row number.
    pub fn name_sequences(&mut self, names: Vec<String>) {
        self.names = names;
    }

    /// What sequence `seq` was named, if it was.
    pub fn seq_label(&self, seq: usize) -> Option<&str> {
        self.names.get(seq).map(String::as_str)
    }

    fn check(
        &self,
        layers: impl Iterator<Item = usize>,
        dims: impl Iterator<Item = usize>,
    ) -> Result<()> {
        for l in layers {
            if l >= self.n_layer {
                return Err(Error::Layer {
                    layer: l,
                    n_layer: self.n_layer,
                    of: LayerOf::Hook,
                });
            }
        }
        for d in dims {
            if d != self.n_embd {
                return Err(Error::Shape {
                    what: Shaped::HookVector,
                    got: d,
                    want: self.n_embd,
                });
            }
        }
        Ok(())
    }

    /// # Errors
    /// A layer out of range or a vector of the wrong size.
    pub fn add_edit(&mut self, e: Edit) -> Result<usize> {
        self.check(e.layers(), e.vectors.values().map(Vec::len))?;
        for l in e.layers() {
            self.want[l] = true;
        }
        self.edits.push(e);
        self.by_seq.clear();
        Ok(self.edits.len() - 1)
    }

    /// Replaces the edits that act on sequence `seq` alone with `edits` (their scopes set to
    /// `seq`): the server reuses a sequence index for request after request. Edits that act
    /// on other sequences too are kept.
    ///
    /// # Errors
    /// A layer out of range or a vector of the wrong size; nothing changes then.
    pub fn set_seq_edits(&mut self, seq: usize, edits: Vec<Edit>) -> Result<()> {
        for e in &edits {
            self.check(e.layers(), e.vectors.values().map(Vec::len))?;
        }
        let alone = Scope::Only(vec![seq]);
        self.edits.retain(|e| e.scope != alone);
        self.edits.extend(edits.into_iter().map(|mut e| {
            e.scope = alone.clone();
            e
        }));
        self.by_seq.clear();
        Ok(())
    }

    /// # Errors
    /// A layer out of range.
    pub fn add_capture(&mut self, c: Capture) -> Result<usize> {
        self.check(c.layers.iter().copied(), std::iter::once(c.n_embd))?;
        for &l in &c.layers {
            self.want[l] = true;
        }
        self.captures.push(c);
        Ok(self.captures.len() - 1)
    }

    pub fn is_empty(&self) -> bool {
        self.edits.is_empty() && self.captures.is_empty()
    }

    /// Whether a capture at the last layer needs this prompt row, which llama.cpp drops there
    /// unless it produces logits; the engine then marks it as an output. Only the rows needed
    /// are marked: each costs an output-head pass (n_embd × n_vocab).
    pub fn needs_row_at_last_layer(&self, seq: usize, kind: RowKind) -> bool {
        let row = RowInfo::own(seq, kind, false);
        self.captures.iter().any(|c| {
            c.layer_idx[self.n_layer - 1].is_some()
                && c.group_of_seq.get(seq).copied().flatten().is_some()
                && c.slot(&row).is_some()
        })
    }

    /// Called by the engine before each decode with that batch's rows, in batch order, and
    /// the owner lists that shared-prefix rows point at.
    pub fn set_rows(&mut self, rows: Vec<RowInfo>, shared: Vec<Vec<usize>>) {
        self.out_rows = rows
            .iter()
            .enumerate()
            .filter(|(_, r)| r.output)
            .map(|(i, _)| i)
            .collect();
        let n = rows.iter().map(|r| r.seq + 1).max().unwrap_or(0);
        self.prepare(n);
        self.rows = rows;
        self.shared = shared;
        self.active = self.active_layers();
    }

    /// The layers where some edit applies to a row of the current decode, or some capture
    /// reads one.
    fn active_layers(&self) -> Vec<bool> {
        let mut act = vec![false; self.n_layer];
        let mut seqs: Vec<usize> = self.rows.iter().map(|r| r.seq).collect();
        seqs.sort_unstable();
        seqs.dedup();
        for &q in &seqs {
            for &e in &self.by_seq[q] {
                for l in self.edits[e as usize].layers() {
                    act[l] = true;
                }
            }
        }
        const NONE: &[usize] = &[];
        for c in &self.captures {
            let reads = self.rows.iter().any(|r| {
                let others = match r.shared {
                    RowInfo::OWN => NONE,
                    k => self.shared[k as usize].as_slice(),
                };
                r.kind != RowKind::Padding
                    && c.slot(r).is_some()
                    && std::iter::once(r.seq)
                        .chain(others.iter().copied())
                        .any(|q| c.group_of_seq.get(q).copied().flatten().is_some())
            });
            if reads {
                for &l in &c.layers {
                    act[l] = true;
                }
            }
        }
        act
    }

    /// Fails if a registered hook never touched a row: a silent no-op would make a steered
    /// run look like a baseline.
    ///
    /// # Errors
    /// Names the hook that did nothing.
    pub fn check_touched(&self) -> Result<()> {
        for (i, e) in self.edits.iter().enumerate() {
            if e.touched == 0 {
                return Err(Error::Run(RunError::HookIdle {
                    index: i,
                    layers: e.layers().collect(),
                    hook: IdleHook::Edit {
                        kind: format!("{:?}", e.kind),
                        scope: format!("{:?}", e.scope),
                    },
                }));
            }
        }
        for (i, c) in self.captures.iter().enumerate() {
            if c.total() == 0 {
                return Err(Error::Run(RunError::HookIdle {
                    index: i,
                    layers: c.layers.clone(),
                    hook: IdleHook::Capture(format!("{:?}", c.position)),
                }));
            }
        }
        Ok(())
    }
}

/// ` (condition …)` for sequence `seq`, or nothing when unnamed.
fn seq_name(names: &[String], seq: usize) -> String {
    names
        .get(seq)
        .map(|n| format!(" ({n})"))
        .unwrap_or_default()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

impl LayerVisitor for HookSet {
    fn wants(&self, layer: usize) -> bool {
        self.active.get(layer).copied().unwrap_or(false)
    }

    fn visit(
        &mut self,
        layer: usize,
        data: &mut [f32],
        n_rows: usize,
    ) -> std::result::Result<bool, String> {
        let n_embd = self.n_embd;
        // Which RowInfo each tensor row is: all rows, or at the last layer only output rows.
        let map: Vec<usize> = if n_rows == self.rows.len() {
            (0..n_rows).collect()
        } else if layer + 1 == self.n_layer && n_rows == self.out_rows.len() {
            self.out_rows.clone()
        } else {
            return Err(format!(
                "{n_rows} rows, but the batch has {} tokens ({} outputs)",
                self.rows.len(),
                self.out_rows.len()
            ));
        };
        let mut modified = false;
        let mut edited = vec![false; map.len()];
        // A shared-prefix row is edited once, as its first owner's: the engine shares rows
        // only between sequences with equal signatures, i.e. the same edits.
        for (r, &ri) in map.iter().enumerate() {
            let row = self.rows[ri];
            if row.kind == RowKind::Padding {
                continue;
            }
            for &ei in &self.by_seq[row.seq] {
                let e = &mut self.edits[ei as usize];
                let Some(v) = e.vectors.get(&layer) else {
                    continue;
                };
                let h = &mut data[r * n_embd..(r + 1) * n_embd];
                match e.kind {
                    EditKind::Add => h.iter_mut().zip(v).for_each(|(x, &a)| *x += a),
                    EditKind::Project => {
                        let p = dot(h, v);
                        h.iter_mut()
                            .zip(v)
                            .for_each(|(x, &d)| *x = (*x as f64 - p * d as f64) as f32);
                    }
                }
                e.touched += 1;
                modified = true;
                edited[r] = true;
            }
        }
        // An edit that overflows (a huge coefficient) must stop the run here, naming the
        // layer and condition, rather than surface later as NaN logits or a silent label.
        for (r, _) in edited.iter().enumerate().filter(|(_, e)| **e) {
            let h = &data[r * n_embd..(r + 1) * n_embd];
            if let Some(bad) = h.iter().position(|x| !x.is_finite()) {
                let seq = self.rows[map[r]].seq;
                return Err(format!(
                    "non-finite activation {} after the edits, row {r} (sequence {seq}{}), dim {bad}",
                    h[bad],
                    seq_name(&self.names, seq)
                ));
            }
        }
        const NONE: &[usize] = &[];
        for c in &mut self.captures {
            let Some(li) = c.layer_idx[layer] else {
                continue;
            };
            for (r, &ri) in map.iter().enumerate() {
                let row = self.rows[ri];
                // A shared row counts once for every prompt that owns it. Shared rows lie
                // before every owner's post-instruction span and last token, so the slot is
                // the same for each owner.
                let others = match row.shared {
                    RowInfo::OWN => NONE,
                    k => self.shared[k as usize].as_slice(),
                };
                for seq in std::iter::once(row.seq).chain(others.iter().copied()) {
                    let (Some(g), Some(slot)) =
                        (c.group_of_seq.get(seq).copied().flatten(), c.slot(&row))
                    else {
                        continue;
                    };
                    let h = &data[r * n_embd..(r + 1) * n_embd];
                    if let Some(bad) = h.iter().position(|x| !x.is_finite()) {
                        return Err(format!(
                            "non-finite activation {} in row {r} (sequence {seq}{}), dim {bad}",
                            h[bad],
                            seq_name(&self.names, seq)
                        ));
                    }
                    let cell = c.cell(g, slot, li);
                    c.counts[cell] += 1;
                    // The row's own norm is computed in one fixed order, then summed exactly.
                    c.norm_sums[cell] +=
                        fixed(h.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt());
                    let s = &mut c.sums[cell * n_embd..(cell + 1) * n_embd];
                    s.iter_mut()
                        .zip(h)
                        .for_each(|(a, &x)| *a += fixed(x as f64));
                }
            }
        }
        Ok(modified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::Position;

    fn rows(n: usize) -> Vec<RowInfo> {
        (0..n)
            .map(|i| {
                RowInfo::own(
                    i,
                    RowKind::Prompt {
                        idx: 0,
                        len: 1,
                        post_start: 0,
                    },
                    true,
                )
            })
            .collect()
    }

    #[test]
    fn an_edit_that_overflows_names_the_sequence() {
        // Two finite additions whose sum overflows f32 in one row.
        let mut hs = HookSet::new(2, 3);
        for _ in 0..2 {
            hs.add_edit(Edit::add(
                [(1, vec![0.0, 3e38, 0.0])].into(),
                Scope::only(vec![1]),
            ))
            .unwrap();
        }
        hs.set_rows(rows(2), vec![]);
        hs.name_sequences(vec![
            "condition A, prompt 0".into(),
            "condition B, prompt 0".into(),
        ]);
        let mut d = vec![1.0; 6];
        let e = hs.visit(1, &mut d, 2).unwrap_err();
        assert!(e.contains("non-finite activation inf"), "{e}");
        assert!(e.contains("sequence 1 (condition B, prompt 0)"), "{e}");
    }

    #[test]
    fn add_then_project_at_one_layer_removes_the_addition_direction() {
        let mut hs = HookSet::new(2, 3);
        hs.add_edit(Edit::add([(0, vec![0.0, 5.0, 0.0])].into(), Scope::All))
            .unwrap();
        hs.add_edit(Edit::project([(0, vec![0.0, 2.0, 0.0])].into(), Scope::All).unwrap())
            .unwrap();
        hs.set_rows(rows(2), vec![]);
        let mut d = vec![1.0, 1.0, 1.0, 2.0, 2.0, 2.0];
        assert!(hs.visit(0, &mut d, 2).unwrap());
        assert_eq!(d, vec![1.0, 0.0, 1.0, 2.0, 0.0, 2.0]);
        hs.check_touched().unwrap();
    }

    #[test]
    fn scope_limits_rows_and_untouched_hooks_fail() {
        let mut hs = HookSet::new(2, 2);
        hs.add_edit(Edit::add(
            [(1, vec![1.0, 1.0])].into(),
            Scope::only(vec![1]),
        ))
        .unwrap();
        hs.set_rows(rows(2), vec![]);
        assert!(hs.check_touched().is_err());
        let mut d = vec![0.0; 4];
        hs.visit(1, &mut d, 2).unwrap();
        assert_eq!(d, vec![0.0, 0.0, 1.0, 1.0]);
        hs.check_touched().unwrap();
    }

    #[test]
    fn a_sequence_s_edits_are_replaced_and_others_kept() {
        let mut hs = HookSet::new(2, 1);
        hs.add_edit(Edit::add([(0, vec![1.0])].into(), Scope::All))
            .unwrap();
        hs.set_seq_edits(1, vec![Edit::add([(1, vec![10.0])].into(), Scope::All)])
            .unwrap();
        hs.set_seq_edits(0, vec![Edit::add([(1, vec![20.0])].into(), Scope::All)])
            .unwrap();
        // Sequence 1's next request: its old edit goes, sequence 0's and the global stay.
        hs.set_seq_edits(1, vec![Edit::add([(1, vec![30.0])].into(), Scope::All)])
            .unwrap();
        hs.set_rows(rows(2), vec![]);
        let mut d = vec![0.0, 0.0];
        hs.visit(0, &mut d, 2).unwrap();
        hs.visit(1, &mut d, 2).unwrap();
        assert_eq!(d, vec![21.0, 31.0]);
        // A bad edit changes nothing.
        assert!(hs
            .set_seq_edits(1, vec![Edit::add([(5, vec![1.0])].into(), Scope::All)])
            .is_err());
        assert_eq!(hs.edits.len(), 3);
        hs.set_seq_edits(1, vec![]).unwrap();
        hs.set_seq_edits(0, vec![]).unwrap();
        assert_eq!(hs.edits.len(), 1);
        hs.set_rows(rows(2), vec![]);
        assert!(hs.wants(0) && !hs.wants(1), "no edit is left at layer 1");
    }

    #[test]
    fn last_layer_maps_output_rows() {
        let mut hs = HookSet::new(2, 1);
        hs.add_edit(Edit::add([(1, vec![1.0])].into(), Scope::only(vec![2])))
            .unwrap();
        let mut r = rows(3);
        r[0].output = false;
        hs.set_rows(r, vec![]);
        let mut d = vec![0.0, 0.0]; // rows of seq 1 and seq 2
        hs.visit(1, &mut d, 2).unwrap();
        assert_eq!(d, vec![0.0, 1.0]);
        assert!(
            hs.visit(0, &mut d, 2).is_err(),
            "non-last layer must have every row"
        );
    }

    #[test]
    fn capture_sums_in_f64_per_group_and_slot() {
        let mut hs = HookSet::new(1, 2);
        hs.add_capture(Capture::new(
            &[0],
            Position::PostInstruction,
            vec![Some(0), Some(0)],
            2,
            1,
            2,
        ))
        .unwrap();
        let r = |seq, idx| {
            RowInfo::own(
                seq,
                RowKind::Prompt {
                    idx,
                    len: 3,
                    post_start: 1,
                },
                false,
            )
        };
        hs.set_rows(
            vec![r(0, 0), r(0, 1), r(0, 2), r(1, 0), r(1, 1), r(1, 2)],
            vec![],
        );
        let mut d = vec![9.0, 9.0, 1.0, 2.0, 3.0, 4.0, 9.0, 9.0, 5.0, 6.0, 7.0, 8.0];
        assert!(!hs.visit(0, &mut d, 6).unwrap());
        let c = &hs.captures[0];
        assert_eq!(c.mean(0, 0, 0).unwrap(), vec![5.0, 6.0]); // last token: (3,4) and (7,8)
        assert_eq!(c.mean(0, 1, 0).unwrap(), vec![3.0, 4.0]); // second to last
        assert_eq!(c.count(0, 0, 0), 2);
        // Rows (3,4) and (7,8): norms 5 and sqrt(113).
        let want = (5.0 + 113f64.sqrt()) / 2.0;
        assert!((c.mean_norm(0, 0, 0).unwrap() - want).abs() < 1e-12);
    }

    #[test]
    fn capture_sums_do_not_depend_on_row_order() {
        // Values whose f64 sum depends on the order: 1e8 + 1e-8 - 1e8.
        let vals = [1e8f32, 1e-8, -1e8, 3.0, 1e-3];
        let mut sums = Vec::new();
        for order in [[0, 1, 2, 3, 4], [2, 4, 0, 3, 1], [4, 3, 2, 1, 0]] {
            let mut hs = HookSet::new(1, 1);
            hs.add_capture(Capture::new(
                &[0],
                Position::PromptMean,
                vec![Some(0); 5],
                1,
                1,
                1,
            ))
            .unwrap();
            for &i in &order {
                hs.set_rows(rows(5)[i..=i].to_vec(), vec![]);
                let mut d = vec![vals[i]];
                hs.visit(0, &mut d, 1).unwrap();
            }
            sums.push(hs.captures[0].sum(0, 0, 0)[0].to_bits());
        }
        assert!(sums.windows(2).all(|w| w[0] == w[1]), "{sums:?}");
    }

    #[test]
    fn a_shared_row_counts_for_every_owner() {
        let mut hs = HookSet::new(1, 1);
        hs.add_capture(Capture::new(
            &[0],
            Position::PromptMean,
            vec![Some(0), Some(1), Some(1)],
            1,
            1,
            1,
        ))
        .unwrap();
        let mut r = rows(1);
        r[0].shared = 0;
        hs.set_rows(r, vec![vec![1, 2]]);
        hs.visit(0, &mut [2.0], 1).unwrap();
        let c = &hs.captures[0];
        assert_eq!((c.count(0, 0, 0), c.count(1, 0, 0)), (1, 2));
        assert_eq!(c.mean(1, 0, 0).unwrap(), vec![2.0]);
    }
}
