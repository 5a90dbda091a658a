//! Text from outside (input files, llama.cpp) made safe to print on one line.

/// A message from outside (llama.cpp's, say) with control characters escaped, so it prints
/// as one line and cannot move the terminal's cursor.
pub fn one_line(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let esc = c.is_control();
            c.escape_default()
                .filter(move |_| esc)
                .chain((!esc).then_some(c))
        })
        .collect()
}

/// Multi-line text from a file (a chat template) made safe to print: control characters
/// other than newline and tab are escaped, so it cannot drive the terminal.
pub fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let esc = c.is_control() && c != '\n' && c != '\t';
            c.escape_default()
                .filter(move |_| esc)
                .chain((!esc).then_some(c))
        })
        .collect()
}

/// A name or value read from an input file, made safe for a one-line message: control
/// characters (newlines, NUL, escape sequences) escaped, and cut at 60 characters.
pub fn shown(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i == 60 {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A byte count as people read memory sizes: GiB with two decimals from 1 GiB on, else MiB.
pub fn gib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64)
    }
}

/// A table as CSV bytes: the header, then each row (quoted where needed).
pub fn csv_table<R: AsRef<[String]>>(
    header: &[&str],
    rows: impl IntoIterator<Item = R>,
) -> Vec<u8> {
    let mut w = csv::Writer::from_writer(Vec::new());
    // Writing into a Vec cannot fail.
    let _ = w.write_record(header);
    for r in rows {
        let _ = w.write_record(r.as_ref());
    }
    w.into_inner().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_names_are_one_line_and_short() {
        assert_eq!(shown("a\nb\0c\u{1b}[31m"), "a\\nb\\u{0}c\\u{1b}[31m");
        assert_eq!(shown(&"x".repeat(100)).chars().count(), 61);
        assert_eq!(shown("état"), "état");
        assert_eq!(one_line("a\tb 'c'\n"), "a\\tb 'c'\\n");
    }

    #[test]
    fn csv_tables_quote_what_needs_it() {
        let rows = [vec!["1".to_string(), "a, b".to_string()]];
        assert_eq!(csv_table(&["n", "s"], rows), b"n,s\n1,\"a, b\"\n");
    }
}
