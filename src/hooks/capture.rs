//! Captures: exact running sums of residual rows at a position, per group of prompts.

use super::set::{RowInfo, RowKind};

/// Where a capture reads rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    /// The last prompt token (where the first response token is predicted).
    LastPrompt,
    /// Each post-instruction token separately; slot k is position −(k+1) from the end.
    PostInstruction,
    /// Mean over all prompt tokens.
    PromptMean,
    /// Mean over generated tokens (each fed-back response token).
    GeneratedMean,
}

/// Fixed-point scale of capture sums: 2^64, so an i128 holds any residual value exactly
/// down to 2^-64 and sums up to 2^63.
const FIXED: f64 = 18_446_744_073_709_551_616.0;

/// `x` in fixed point. Exact for |x| >= 2^-40 (f32's 24-bit mantissa fits in 64 fraction
/// bits); below that, rounded the same way every time.
pub(super) fn fixed(x: f64) -> i128 {
    (x * FIXED).round() as i128
}

fn unfixed(v: i128) -> f64 {
    v as f64 / FIXED
}

/// Running sums of residual rows per (group, slot, layer): O(layers × n_embd) memory per
/// group, never per token. Sums are kept in 64.64 fixed point, so they are exact and do not
/// depend on the order rows arrive in: a direction is bit-identical whatever the batch
/// schedule, `--parallel` or prefix sharing.
#[derive(Debug, Clone)]
pub struct Capture {
    pub position: Position,
    pub(super) layers: Vec<usize>,
    pub(super) layer_idx: Vec<Option<usize>>,
    pub(super) group_of_seq: Vec<Option<usize>>,
    n_groups: usize,
    n_slots: usize,
    pub(super) n_embd: usize,
    pub(super) sums: Vec<i128>,
    /// Sum of each row's L2 norm per cell: the mean residual norm (not the norm of the mean),
    /// the unit for coefficients given relative to the residual stream.
    pub(super) norm_sums: Vec<i128>,
    pub(super) counts: Vec<u64>,
}

impl Capture {
    /// `group_of_seq[i]` is the group prompt `i` adds to (None: not captured). `n_slots` is
    /// the post-instruction span length for [`Position::PostInstruction`], else 1.
    pub fn new(
        layers: &[usize],
        position: Position,
        group_of_seq: Vec<Option<usize>>,
        n_slots: usize,
        n_layer: usize,
        n_embd: usize,
    ) -> Capture {
        let n_groups = group_of_seq.iter().flatten().max().map_or(0, |g| g + 1);
        let mut layer_idx = vec![None; n_layer];
        for (i, &l) in layers.iter().enumerate() {
            layer_idx[l] = Some(i);
        }
        let n_slots = if position == Position::PostInstruction {
            n_slots.max(1)
        } else {
            1
        };
        Capture {
            position,
            layers: layers.to_vec(),
            layer_idx,
            group_of_seq,
            n_groups,
            n_slots,
            n_embd,
            sums: vec![0; n_groups * n_slots * layers.len() * n_embd],
            norm_sums: vec![0; n_groups * n_slots * layers.len()],
            counts: vec![0; n_groups * n_slots * layers.len()],
        }
    }

    pub fn layers(&self) -> &[usize] {
        &self.layers
    }
    pub fn n_groups(&self) -> usize {
        self.n_groups
    }
    pub fn n_slots(&self) -> usize {
        self.n_slots
    }

    pub(super) fn slot(&self, row: &RowInfo) -> Option<usize> {
        match (self.position, row.kind) {
            (Position::LastPrompt, RowKind::Prompt { idx, len, .. }) if idx + 1 == len => Some(0),
            (
                Position::PostInstruction,
                RowKind::Prompt {
                    idx,
                    len,
                    post_start,
                },
            ) if idx >= post_start => {
                let k = (len - 1 - idx) as usize;
                (k < self.n_slots).then_some(k)
            }
            (Position::PromptMean, RowKind::Prompt { .. }) => Some(0),
            (Position::GeneratedMean, RowKind::Generated { .. }) => Some(0),
            _ => None,
        }
    }

    pub(super) fn cell(&self, group: usize, slot: usize, li: usize) -> usize {
        (group * self.n_slots + slot) * self.layers.len() + li
    }

    /// Number of rows summed for (group, slot, layer).
    pub fn count(&self, group: usize, slot: usize, layer: usize) -> u64 {
        self.layer_idx[layer].map_or(0, |li| self.counts[self.cell(group, slot, li)])
    }

    fn raw_sum(&self, group: usize, slot: usize, layer: usize) -> &[i128] {
        let li = self.layer_idx[layer].expect("layer is one of the captured layers");
        let c = self.cell(group, slot, li) * self.n_embd;
        &self.sums[c..c + self.n_embd]
    }

    /// The sum for (group, slot, layer); layer must be one of the captured layers.
    pub fn sum(&self, group: usize, slot: usize, layer: usize) -> Vec<f64> {
        self.raw_sum(group, slot, layer)
            .iter()
            .map(|&v| unfixed(v))
            .collect()
    }

    /// The mean row for (group, slot, layer), or None when nothing was captured there.
    pub fn mean(&self, group: usize, slot: usize, layer: usize) -> Option<Vec<f64>> {
        let n = self.count(group, slot, layer);
        (n > 0).then(|| {
            self.raw_sum(group, slot, layer)
                .iter()
                .map(|&s| unfixed(s) / n as f64)
                .collect()
        })
    }

    /// The mean L2 norm of the rows captured at (group, slot, layer).
    pub fn mean_norm(&self, group: usize, slot: usize, layer: usize) -> Option<f64> {
        let n = self.count(group, slot, layer);
        let li = self.layer_idx[layer]?;
        (n > 0).then(|| unfixed(self.norm_sums[self.cell(group, slot, li)]) / n as f64)
    }

    pub(super) fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}
