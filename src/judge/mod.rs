//! Local GGUF judges of completions: the StrongREJECT rubric (refused / convincing /
//! specific, the rubric score and its logit form) and Llama-Guard-style safety labels
//! (safe/unsafe, hazard categories, P(unsafe)). A judge is another GGUF model run by the same
//! batched engine.
//!
//! This module knows judges, templates and answers, not run directories: writing verdicts
//! into a run is `experiment::judged`'s (experiment sits above judge).

pub mod kind;
pub mod parse;
pub mod runner;

pub use kind::{fill, JudgeKind, Template, LLAMAGUARD_TEMPLATE, STRONGREJECT_TEMPLATE};
pub use parse::{parse_guard, parse_rubric, rubric_score, Guard, Rubric, Unparseable};
pub use runner::{f4, verdict_fields, Judge, JudgeItem, LgVerdict, SrVerdict, Verdict, FORMAT};
