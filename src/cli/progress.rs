//! Progress on stderr: indicatif bars when stderr is a terminal, a plain line per phase and
//! per tenth of it otherwise (CI logs, `nohup`). Counts and phase names only: prompts and
//! completions never reach the terminal.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar on stderr; hidden when stderr is not a terminal.
pub fn bar(total: usize, what: &str) -> ProgressBar {
    let b = ProgressBar::new(total as u64);
    b.set_style(
        ProgressStyle::with_template(
            "{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

/// Progress through named phases (prepare, grid, ...), each with its own count.
pub struct Phases {
    pub bar: ProgressBar,
    phase: String,
    last_tenth: usize,
    started: Instant,
}

impl Phases {
    pub fn new(what: &str) -> Phases {
        Phases {
            bar: bar(0, what),
            phase: String::new(),
            last_tenth: usize::MAX,
            started: Instant::now(),
        }
    }

    /// `done` of `total` in phase `p`, on `item`.
    pub fn update(&mut self, p: &str, done: usize, total: usize, item: &str) {
        if p != self.phase {
            self.phase = p.to_string();
            self.bar.reset();
            self.last_tenth = usize::MAX;
        }
        let tenth = done * 10 / total.max(1);
        if self.bar.is_hidden() && tenth != self.last_tenth {
            self.last_tenth = tenth;
            eprintln!(
                "[{:>6.0}s] {p} {item}: {done}/{total}",
                self.started.elapsed().as_secs_f64()
            );
        }
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
        self.bar.set_message(format!("{p} {item}"));
    }
}

/// A note (chosen layers, resume) printed above the bar.
pub fn note(bar: &ProgressBar, s: &str) {
    bar.suspend(|| eprintln!("{s}"));
}
