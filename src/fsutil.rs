//! Crash-safe file replacement: write a temp file, fsync it, rename it over the target,
//! fsync the directory. Readers never observe a partially written file.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Fsyncs a directory so that a rename or create inside it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Bytes a large file write may leave dirty before it syncs them ([`Paced`]).
pub const PACED_SYNC_BYTES: u64 = 4 << 20;

/// A file writer that syncs its data every [`PACED_SYNC_BYTES`]: a segment file of tens of
/// megabytes never sits in the page cache as one dirty block for a final fsync to push out at
/// once. Otherwise the log's fdatasync, which every acknowledgement waits for, queues behind
/// that flush (and on ext4 in ordered mode a journal commit may have to write it first).
pub struct Paced<'f> {
    file: &'f File,
    unsynced: u64,
}

impl<'f> Paced<'f> {
    pub fn new(file: &'f File) -> Self {
        Self { file, unsynced: 0 }
    }
}

impl Write for Paced<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= PACED_SYNC_BYTES {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Atomically replaces `path` with a file produced by `write`.
///
/// The bytes go to `.name.tmp-<pid>-<n>` (unique per call) in the same directory, are fsynced
/// (in steps, see [`Paced`]), renamed over `path`, and the directory is fsynced. On error the
/// temp file is removed and `path` is untouched.
pub fn atomic_write_with<F>(path: &Path, write: F) -> io::Result<()>
where
    F: FnOnce(&mut io::BufWriter<Paced<'_>>) -> io::Result<()>,
{
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    // Unique per call: concurrent writers of the same path (e.g. two upserts of the same image
    // bytes) must not share, truncate or rename each other's temp file.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{}.tmp-{}-{n}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let file = File::create(&tmp)?;
        {
            let mut w = io::BufWriter::with_capacity(1 << 20, Paced::new(&file));
            write(&mut w)?;
            w.flush()?;
        }
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Atomically replaces `path` with `bytes` (see [`atomic_write_with`]).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> io::Result<()> {
    atomic_write_with(path, |w| w.write_all(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_atomically_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    /// Regression: two threads writing the same path shared one temp file name, so one
    /// rename failed (seen as INTERNAL on concurrent upserts of the same image bytes).
    #[test]
    fn concurrent_writers_of_one_path_do_not_collide() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("blob");
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..50 {
                        atomic_write(&p, b"same bytes").unwrap();
                    }
                });
            }
        });
        assert_eq!(fs::read(&p).unwrap(), b"same bytes");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temp file left");
    }

    #[test]
    fn failed_write_keeps_old_contents() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        atomic_write(&p, b"old").unwrap();
        let err = atomic_write_with(&p, |_| Err(io::Error::other("boom")));
        assert!(err.is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
