//! Hook points on the residual stream and the hooks that act there: capture, add, project.
//!
//! A hook point is `resid_post.L`, llama.cpp's `l_out-L`: the residual stream after layer L
//! (zero-based, like llama.cpp's `il`), control vector included. At the last layer llama.cpp
//! keeps only the rows that produce logits. Hooks work on plain `&mut [f32]` rows; the engine
//! tells them which sequence and position each row is ([`RowInfo`]). At one layer, every
//! *add* runs before every *project*, then captures read the result: so "steer, then ablate
//! the steering direction" at the same layer removes what was added.
//!
//! - [`point`]: where hooks attach ([`Site`], [`HookPoint`]) and layer lists ([`LayerSet`]);
//! - [`edit`]: what an add or project hook does ([`Edit`]) and to which sequences ([`Scope`]);
//! - [`capture`]: running sums of rows ([`Capture`]) at a [`Position`];
//! - [`set`]: every hook of one run ([`HookSet`]), run by the engine's eval callback.

pub mod capture;
pub mod edit;
pub mod point;
pub mod set;

pub use capture::{Capture, Position};
pub use edit::{Edit, EditKind, Scope};
pub use point::{HookPoint, LayerSet, Site};
pub use set::{HookSet, RowInfo, RowKind};
