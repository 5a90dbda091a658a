//! An exclusive lock on an output directory, so two processes never write one run directory
//! at once (one run's results would silently replace the other's).
//!
//! The lock is `DIR/.lock`, held with the operating system's advisory file lock for the life
//! of the process: the kernel releases it when the process exits or is killed, so the lock
//! of a killed run is stale by construction and the next run takes it over. The file names
//! its holder (pid, host, start time) so a refused process can say who holds it.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A held directory lock; released on drop (or when the process ends).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
    path: PathBuf,
    /// The directory did not exist before: if nothing but the lock is in it when the lock
    /// is dropped (the command failed before writing anything), it is removed again, so a
    /// refused command leaves no trace.
    created: Option<PathBuf>,
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let Some(dir) = &self.created else { return };
        let only_lock =
            std::fs::read_dir(dir).is_ok_and(|d| d.flatten().all(|e| e.file_name() == ".lock"));
        if only_lock {
            let _ = std::fs::remove_file(&self.path);
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// This machine's host name, as the kernel reports it.
pub fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown host".into())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl DirLock {
    /// Takes the lock on `dir` (created if missing).
    ///
    /// # Errors
    /// The directory is locked by another process (the error names its pid and host), or it
    /// cannot be created or written.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        let created = (!dir.exists()).then(|| dir.to_path_buf());
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(".lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = crate::text::one_line(holder.trim());
                return Err(Error::file(
                    dir,
                    format!(
                        "is in use by another persona-gate process ({}); wait for it to finish or choose another output directory",
                        if holder.is_empty() { "holder unknown".into() } else { holder }
                    ),
                ));
            }
            Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        let previous = {
            let mut s = String::new();
            let _ = file.read_to_string(&mut s);
            s
        };
        if !previous.trim().is_empty() {
            tracing::debug!(
                "{}: taking over a stale lock ({})",
                dir.display(),
                previous.trim()
            );
        }
        let me = format!(
            "pid {} on {}, since unix time {}",
            std::process::id(),
            host(),
            now()
        );
        file.set_len(0)
            .and_then(|_| file.seek(SeekFrom::Start(0)))
            .and_then(|_| file.write_all(me.as_bytes()))
            .and_then(|_| file.flush())
            .map_err(|e| Error::io(&path, e))?;
        Ok(DirLock {
            _file: file,
            path,
            created,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_directory_is_refused_until_the_first_is_dropped() {
        let dir = std::env::temp_dir().join(format!("pg-lock-{}", std::process::id()));
        let a = DirLock::acquire(&dir).unwrap();
        let e = DirLock::acquire(&dir).unwrap_err().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        assert!(e.contains(&host()), "{e}");
        drop(a);
        // The lock of a run that wrote nothing leaves no directory behind.
        assert!(!dir.exists());
        let b = DirLock::acquire(&dir).unwrap();
        assert!(b.path().ends_with(".lock"));
        std::fs::write(dir.join("result"), "x").unwrap();
        drop(b);
        assert!(
            dir.join("result").exists(),
            "a directory with results is kept"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
