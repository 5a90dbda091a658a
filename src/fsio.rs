//! Reading input files safely and writing outputs atomically.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// The largest input file read whole: far above any prompt set, spec, template or direction
/// file (an 8B model's direction file is 0.5 MiB), far below this machine's memory.
pub const MAX_INPUT: u64 = 1 << 30;

/// Reads a whole input file; `expected` names what it should be ("a direction file") for the
/// message when `path` is not a regular file.
///
/// Only regular files are read, and at most [`MAX_INPUT`] bytes: a FIFO would block forever
/// and `/dev/zero` would be read until memory runs out.
///
/// # Errors
/// Missing ("no such file"), a directory, a FIFO, device or socket, a file over the cap, or
/// any other I/O error, naming the path.
pub fn read_input(path: &Path, expected: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let md = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if md.is_dir() {
        return Err(Error::file(
            path,
            format!("is a directory, expected {expected}"),
        ));
    }
    if !md.is_file() {
        return Err(Error::file(
            path,
            format!("is not a regular file (a FIFO, device or socket), expected {expected}"),
        ));
    }
    if md.len() > MAX_INPUT {
        return Err(Error::file(
            path,
            format!(
                "is {} bytes, more than the {} MiB an input may have; expected {expected}",
                md.len(),
                MAX_INPUT >> 20
            ),
        ));
    }
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::with_capacity(md.len() as usize);
    // The cap holds even if the file grows while it is read.
    f.take(MAX_INPUT + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::io(path, e))?;
    if out.len() as u64 > MAX_INPUT {
        return Err(Error::file(
            path,
            "grew past the input size cap while being read",
        ));
    }
    Ok(out)
}

/// [`read_input`] for a text file.
///
/// # Errors
/// As [`read_input`], and a file that is not UTF-8.
pub fn read_text(path: &Path, expected: &str) -> Result<String> {
    String::from_utf8(read_input(path, expected)?).map_err(|e| {
        Error::file(
            path,
            format!("is not UTF-8 (byte {})", e.utf8_error().valid_up_to()),
        )
    })
}

/// Writes `bytes` to a temp file beside `path`, syncs it, then renames it into place, so no
/// reader ever sees a half-written file under the final name.
///
/// # Errors
/// Any I/O error, with a message saying which step failed (the error keeps its kind); the
/// temp file is removed on failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_inner(path, Some(bytes))
}

/// One output of a command's result directory: `dir/name` written atomically, with the
/// folders `name` names (`plots/…`) created, and `name` added to `written`, the list the
/// command reports at the end.
///
/// # Errors
/// As [`write_atomic`], naming the path; a folder that cannot be created.
pub fn write_output(dir: &Path, name: &str, bytes: &[u8], written: &mut Vec<String>) -> Result<()> {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    write_atomic(&p, bytes).map_err(|e| Error::io(&p, e))?;
    written.push(name.to_string());
    Ok(())
}

/// `write_atomic`, or with `None` only the checks and the temp file's creation.
fn write_atomic_inner(path: &Path, bytes: Option<&[u8]>) -> std::io::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("out");
    let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
    let ctx = |what: String| {
        move |e: std::io::Error| std::io::Error::new(e.kind(), format!("{what}: {e}"))
    };
    if path.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "is a directory, expected a file name",
        ));
    }
    let mut f = std::fs::File::create(&tmp)
        .map_err(ctx(format!("cannot create a file in '{}'", dir.display())))?;
    let Some(bytes) = bytes else {
        drop(f);
        return std::fs::remove_file(&tmp);
    };
    let res = (|| {
        f.write_all(bytes)?;
        f.sync_all()
    })()
    .map_err(ctx(format!("writing {} bytes failed", bytes.len())))
    .and_then(|()| {
        drop(f);
        std::fs::rename(&tmp, path)
            .map_err(ctx(format!("cannot rename '{}' into place", tmp.display())))
    });
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Checks up front that [`write_atomic`] could create `path` (its directory exists and takes
/// a new file, and `path` is not a directory), so a long job fails before it starts rather
/// than when it saves. Creates and removes the same temp file `write_atomic` would use.
///
/// # Errors
/// As [`write_atomic`].
pub fn check_writable(path: &Path) -> std::io::Result<()> {
    write_atomic_inner(path, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_writes_say_why_and_leave_nothing() {
        let d = std::env::temp_dir().join(format!("pg-util-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("file"), b"x").unwrap();
        let e = write_atomic(&d.join("file/out"), b"y").unwrap_err();
        assert!(e.to_string().starts_with("cannot create a file in"), "{e}");
        let e = write_atomic(&d, b"y").unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        let e = check_writable(&d.join("file/out")).unwrap_err();
        assert!(e.to_string().starts_with("cannot create a file in"), "{e}");
        check_writable(&d.join("later")).unwrap();
        write_atomic(&d.join("ok"), b"z").unwrap();
        let mut names: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["file", "ok"]);
        let e = read_input(&d, "a test file").unwrap_err();
        assert!(
            e.to_string()
                .ends_with("is a directory, expected a test file"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
