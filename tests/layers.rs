//! The crate's import graph runs one way: each top-level module uses only modules of a lower
//! layer (or its own submodules), so there are no cycles and no arrow runs upward. The
//! README's layout section lists the same layers.

use std::collections::BTreeMap;
use std::path::Path;

/// Bottom to top. A module may use any module of a lower layer.
const LAYERS: &[&[&str]] = &[
    &["text", "rng", "cpu", "label", "plot", "html"],
    &["stats", "gguf", "ffi"],
    &["error"],
    &["fsio", "lock", "memory", "hooks"],
    &["model", "prompts"],
    &["chat"],
    &["engine"],
    &["directions", "judge"],
    &["experiment"],
    &["studies", "serve"],
];

fn rank() -> BTreeMap<&'static str, usize> {
    let mut r = BTreeMap::new();
    for (i, l) in LAYERS.iter().enumerate() {
        for m in *l {
            r.insert(*m, i);
        }
    }
    r
}

/// `crate::X` paths in code (comments and the test module left out).
fn uses(src: &str) -> Vec<String> {
    let code = src.split("#[cfg(test)]").next().unwrap_or("");
    let mut out = vec![];
    for line in code.lines() {
        let l = line.trim_start();
        if l.starts_with("//") {
            continue;
        }
        let mut rest = l;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + 7..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn every_module_imports_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let rank = rank();
    let mut all = vec![];
    files(&src, &mut all);
    let mut bad = vec![];
    let mut seen = std::collections::BTreeSet::new();
    for f in &all {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        // The binary and the crate root sit above every layer.
        if top == "main" || top == "cli" || top == "lib" {
            continue;
        }
        let Some(&mine) = rank.get(top.as_str()) else {
            panic!(
                "src/{}: module '{top}' is in no layer of tests/layers.rs",
                rel.display()
            );
        };
        seen.insert(top.clone());
        for u in uses(&std::fs::read_to_string(f).unwrap()) {
            // Crate-root items (VERSION, llama_cpp(), FFI_CRATE) are provenance, not modules.
            if u == top
                || u.chars().next().is_some_and(|c| c.is_ascii_uppercase())
                || u == "llama_cpp"
            {
                continue;
            }
            match rank.get(u.as_str()) {
                Some(&r) if r < mine => {}
                Some(&r) => bad.push(format!(
                    "src/{} ({top}, layer {mine}) uses {u} (layer {r})",
                    rel.display()
                )),
                None => bad.push(format!("src/{} uses unknown module {u}", rel.display())),
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports that run upward or sideways:\n{}",
        bad.join("\n")
    );
    // Every layer entry names a module that exists, so the table cannot silently rot.
    for m in rank.keys() {
        assert!(
            seen.contains(*m),
            "tests/layers.rs names '{m}', which is not in src/"
        );
    }
}

#[test]
fn the_checker_sees_crate_paths_and_skips_comments_and_tests() {
    let src =
        "use crate::a::B;\n// crate::c\nfn f() { crate::d::e(); }\n#[cfg(test)]\nuse crate::z;";
    assert_eq!(uses(src), ["a", "d"]);
}
