//! The library's error type. Each variant carries what a user needs to fix the input: the
//! file, the field or layer, and the reason. The binary prints it on one line.

use std::path::PathBuf;

use crate::ffi::FfiError;
use crate::gguf::GgufError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is shown in the message and is not also a `source`: the binary prints the
    // whole error chain on one line, and a source would repeat it ("x: No space …: No space …").
    #[error("{}: {err}", .path.display())]
    Gguf { path: PathBuf, err: GgufError },
    #[error("{}: {msg}", .path.display())]
    File { path: PathBuf, msg: String },
    #[error("{}: {err}", .path.display())]
    Io { path: PathBuf, err: std::io::Error },
    #[error(transparent)]
    Ffi(#[from] FfiError),
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Invalid(String),
    #[error("model '{arch}': {msg}")]
    Arch { arch: String, msg: String },
    /// Writing a report to stdout (or another stream) failed; the cause is the source, so a
    /// closed pipe can be told apart.
    #[error("writing output")]
    Output(#[source] std::io::Error),
}

impl Error {
    pub fn file(path: impl Into<PathBuf>, msg: impl Into<String>) -> Error {
        Error::File {
            path: path.into(),
            msg: msg.into(),
        }
    }
    /// An I/O error on `path`; a missing file reads "no such file".
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> Error {
        match err.kind() {
            std::io::ErrorKind::NotFound => Error::file(path, "no such file"),
            _ => Error::Io {
                path: path.into(),
                err,
            },
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
