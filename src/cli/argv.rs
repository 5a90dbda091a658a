//! llama.cpp's multi-letter short flags (`-ngl 99`, `-np 4`, …), which clap cannot declare:
//! before parsing, each such token in flag position becomes its long name. A token that is
//! the value of the flag before it (`--layers -np`, `-p -np`) is left alone, as is
//! everything after `--`, and a token whose long name the subcommand does not have (clap then
//! reports the token as typed).

use std::ffi::OsString;

/// llama.cpp's multi-letter short flags and the long names they stand for here.
pub const MULTI_SHORT: &[(&str, &str)] = &[
    ("-ngl", "n-gpu-layers"),
    ("-np", "parallel"),
    ("-ub", "ubatch-size"),
    ("-fa", "flash-attn"),
    ("-sys", "system-prompt"),
];

/// Whether `a` consumes the next token as its value (when not given as `--flag=value` or
/// attached to a short flag).
fn takes_value(a: &clap::Arg) -> bool {
    a.get_action().takes_values()
}

/// The argument of `path` (innermost subcommand first, then its parents' global ones) whose
/// long name or alias is `name`.
fn find_long<'a>(path: &[&'a clap::Command], name: &str) -> Option<&'a clap::Arg> {
    path.iter().rev().find_map(|c| {
        c.get_arguments().find(|a| {
            a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|v| v.contains(&name))
        })
    })
}

fn find_short<'a>(path: &[&'a clap::Command], ch: char) -> Option<&'a clap::Arg> {
    path.iter().rev().find_map(|c| {
        c.get_arguments().find(|a| {
            a.get_short() == Some(ch) || a.get_all_short_aliases().is_some_and(|v| v.contains(&ch))
        })
    })
}

/// `args` (program name first) with llama.cpp's multi-letter short flags in flag position
/// replaced by their long names, for parsing with `root`. `-ngl=5` becomes
/// `--n-gpu-layers=5`.
pub fn rewrite(args: impl IntoIterator<Item = OsString>, root: &clap::Command) -> Vec<OsString> {
    let mut it = args.into_iter();
    let mut out: Vec<OsString> = it.next().into_iter().collect();
    let mut path: Vec<&clap::Command> = vec![root];
    // The previous token was a flag whose value this one is.
    let mut value_next = false;
    while let Some(tok) = it.next() {
        if std::mem::take(&mut value_next) {
            out.push(tok);
            continue;
        }
        let Some(s) = tok.to_str() else {
            out.push(tok);
            continue;
        };
        if s == "--" {
            out.push(tok);
            out.extend(it);
            break;
        }
        let (head, inline) = match s.split_once('=') {
            Some((h, v)) => (h, Some(v)),
            None => (s, None),
        };
        if let Some((_, long)) = MULTI_SHORT.iter().find(|(short, _)| *short == head) {
            if let Some(a) = find_long(&path, long) {
                value_next = inline.is_none() && takes_value(a);
                out.push(match inline {
                    Some(v) => format!("--{long}={v}").into(),
                    None => format!("--{long}").into(),
                });
                continue;
            }
        }
        if let Some(body) = s.strip_prefix("--") {
            value_next = inline.is_none() && find_long(&path, body).is_some_and(takes_value);
        } else if let Some(cluster) = s.strip_prefix('-').filter(|c| !c.is_empty()) {
            // -vv, -t2, -m model: the first short that takes a value ends the cluster.
            for (i, ch) in cluster.char_indices() {
                match find_short(&path, ch) {
                    Some(a) if takes_value(a) => {
                        value_next = i + ch.len_utf8() == cluster.len();
                        break;
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        } else if let Some(sub) = path.last().and_then(|c| c.find_subcommand(s)) {
            path.push(sub);
        }
        out.push(tok);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn rw(args: &[&str]) -> Vec<String> {
        let v = std::iter::once("persona-gate")
            .chain(args.iter().copied())
            .map(OsString::from);
        rewrite(v, &crate::cli::Cli::command())
            .into_iter()
            .skip(1)
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    #[test]
    fn multi_letter_shorts_become_long_names() {
        assert_eq!(
            rw(&["info", "-m", "x.gguf", "-ngl", "5", "-np", "4", "-ub", "256", "-fa", "on"]),
            [
                "info",
                "-m",
                "x.gguf",
                "--n-gpu-layers",
                "5",
                "--parallel",
                "4",
                "--ubatch-size",
                "256",
                "--flash-attn",
                "on"
            ]
        );
        assert_eq!(
            rw(&["generate", "-ngl=-1", "-sys", "Be terse."]),
            [
                "generate",
                "--n-gpu-layers=-1",
                "--system-prompt",
                "Be terse."
            ]
        );
        // The value of -ngl may itself look like a flag.
        assert_eq!(
            rw(&["info", "-ngl", "-1", "-np", "2"]),
            ["info", "--n-gpu-layers", "-1", "--parallel", "2"]
        );
    }

    #[test]
    fn values_and_operands_are_never_rewritten() {
        // A value of the flag before it, however it is spelled.
        for (flag, v) in [
            ("-p", "-np"),
            ("--prompt", "-np"),
            ("--system", "-sys"),
            ("-sys", "-fa"),
            ("--layers", "-ub"),
            ("-m", "-ngl"),
            ("-vm", "-np"),
        ] {
            let cmd = if flag == "--layers" {
                "demo"
            } else {
                "generate"
            };
            let got = rw(&[cmd, flag, v]);
            assert_eq!(got[2], v, "{flag} {v}: {got:?}");
        }
        // After --, and where the subcommand has no such flag (compare has no --parallel).
        assert_eq!(rw(&["generate", "--", "-np"]), ["generate", "--", "-np"]);
        assert_eq!(rw(&["compare", "-np", "2"]), ["compare", "-np", "2"]);
        // Attached values and other tokens pass unchanged.
        assert_eq!(
            rw(&["generate", "-p-np", "-npx"]),
            ["generate", "-p-np", "-npx"]
        );
        assert_eq!(
            rw(&["generate", "--prompt=-np"]),
            ["generate", "--prompt=-np"]
        );
    }
}
