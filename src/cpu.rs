//! The instruction set this binary was built for, checked against the CPU it runs on before
//! anything else runs: a binary copied to a CPU that lacks what it was built for says so in
//! one line instead of dying with SIGILL inside llama.cpp (whose C++ static constructors are
//! compiled for the same level). `make build` picks the level (scripts/cpu-flags.sh).

/// Target features the build enabled, by the names `/proc/cpuinfo` and
/// `is_x86_feature_detected!` use. Only those llama.cpp's kernels or the compiler may emit.
pub fn compiled() -> Vec<&'static str> {
    let mut v = Vec::new();
    macro_rules! feat {
        ($($f:tt),*) => { $( if cfg!(target_feature = $f) { v.push($f); } )* };
    }
    feat!(
        "sse4.2",
        "avx",
        "avx2",
        "fma",
        "f16c",
        "bmi2",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512dq",
        "avx512cd",
        "avx512vnni",
        "avx512bf16",
        "avx512vbmi",
        "avxvnni"
    );
    v
}

/// A short name for the build's level, e.g. `x86-64-v4+avx512vnni+avx512bf16+avx512vbmi`.
pub fn built_for() -> String {
    let c = compiled();
    let has = |f: &str| c.contains(&f);
    if !cfg!(target_arch = "x86_64") {
        return std::env::consts::ARCH.to_string();
    }
    let base = if has("avx512f") && has("avx512bw") && has("avx512vl") {
        "x86-64-v4"
    } else if has("avx2") && has("fma") && has("bmi2") {
        "x86-64-v3"
    } else if has("sse4.2") {
        "x86-64-v2"
    } else {
        "x86-64"
    };
    let mut s = base.to_string();
    for f in ["avx512vnni", "avx512bf16", "avx512vbmi", "avxvnni"] {
        if has(f) {
            s.push('+');
            s.push_str(f);
        }
    }
    s
}

/// Compiled-in features this CPU does not report. `PERSONA_GATE_TEST_CPU_LACKS` (a comma
/// list) pretends features are missing, so the refusal can be tested on any machine.
pub fn missing() -> Vec<&'static str> {
    let fake = std::env::var("PERSONA_GATE_TEST_CPU_LACKS").unwrap_or_default();
    let fake: Vec<&str> = fake.split(',').map(str::trim).collect();
    compiled()
        .into_iter()
        .filter(|f| fake.contains(f) || !detected(f))
        .collect()
}

#[cfg(target_arch = "x86_64")]
fn detected(f: &str) -> bool {
    match f {
        "sse4.2" => std::arch::is_x86_feature_detected!("sse4.2"),
        "avx" => std::arch::is_x86_feature_detected!("avx"),
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        "fma" => std::arch::is_x86_feature_detected!("fma"),
        "f16c" => std::arch::is_x86_feature_detected!("f16c"),
        "bmi2" => std::arch::is_x86_feature_detected!("bmi2"),
        "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
        "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
        "avx512vl" => std::arch::is_x86_feature_detected!("avx512vl"),
        "avx512dq" => std::arch::is_x86_feature_detected!("avx512dq"),
        "avx512cd" => std::arch::is_x86_feature_detected!("avx512cd"),
        "avx512vnni" => std::arch::is_x86_feature_detected!("avx512vnni"),
        "avx512bf16" => std::arch::is_x86_feature_detected!("avx512bf16"),
        "avx512vbmi" => std::arch::is_x86_feature_detected!("avx512vbmi"),
        "avxvnni" => std::arch::is_x86_feature_detected!("avxvnni"),
        _ => true,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detected(_: &str) -> bool {
    true
}

/// The one-line refusal for a CPU that lacks compiled-in features, or None when it has all.
pub fn refusal() -> Option<String> {
    let m = missing();
    (!m.is_empty()).then(|| {
        let built = built_for();
        let other = if built.starts_with("x86-64-v4") {
            "`make build ISA=portable` for any CPU with AVX2"
        } else {
            "`make build ISA=v2` for CPUs without AVX2"
        };
        format!(
            "persona-gate: this binary was built for {built}, but this CPU lacks {}; rebuild it here with `make build` (or {other})",
            m.join(", ")
        )
    })
}

/// Exits with the refusal when the CPU lacks what the binary was built for. Runs as an
/// early constructor of the binary (see main.rs), before llama.cpp's own.
pub fn check_or_exit() {
    if let Some(msg) = refusal() {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "{msg}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_cpu_runs_this_build_and_the_name_matches_the_flags() {
        assert!(missing().is_empty() || std::env::var_os("PERSONA_GATE_TEST_CPU_LACKS").is_some());
        let name = built_for();
        if cfg!(target_feature = "avx512f") {
            assert!(name.starts_with("x86-64-v4"), "{name}");
        } else if cfg!(target_feature = "avx2") {
            assert!(name.starts_with("x86-64-v3"), "{name}");
        }
    }
}
