//! Crash-safe file replacement: write a temp file, fsync it, rename it over the target,
//! fsync the directory. Readers never observe a partially written file. Large files are
//! written in paced, synced pieces so that the write-ahead log's syncs do not wait behind them.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Fsyncs a directory so that a rename or create inside it is durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Bytes a large file write may leave dirty before it syncs them ([`Paced`]).
pub const PACED_SYNC_BYTES: u64 = 4 << 20;
/// The same while the log is acknowledging writes ([`note_log_sync`]).
pub const PACED_SYNC_BYTES_LIVE: u64 = 256 << 10;
/// Most bytes per second large file writes take, all of them together, while the log is
/// acknowledging writes.
pub const PACED_BYTES_PER_SEC_LIVE: u64 = 64 << 20;
/// How long after the log's last sync it still counts as acknowledging writes.
const LIVE_WINDOW: Duration = Duration::from_millis(200);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Microseconds after [`epoch`] of the log's last sync (0: never).
static LAST_LOG_SYNC_US: AtomicU64 = AtomicU64::new(0);

/// Called by the write-ahead log after each sync: acknowledgements are waiting on the disk,
/// so large file writes ([`Paced`]) go slower for a while.
pub fn note_log_sync() {
    let us = epoch().elapsed().as_micros().max(1) as u64;
    LAST_LOG_SYNC_US.store(us, Ordering::Relaxed);
}

/// Whether the log has synced within the last 200 ms (acknowledgements are waiting on the
/// disk).
pub fn log_is_live() -> bool {
    let last = LAST_LOG_SYNC_US.load(Ordering::Relaxed);
    last != 0 && epoch().elapsed().as_micros() as u64 <= last + LIVE_WINDOW.as_micros() as u64
}

/// A file writer that pushes its data to the disk as it goes, so that a segment file of tens
/// of megabytes never sits in the page cache as one dirty block for a final fsync to push out
/// at once: it syncs every [`PACED_SYNC_BYTES`]; while the log is acknowledging writes, it
/// instead starts the writeback of every [`PACED_SYNC_BYTES_LIVE`] and writes no more than
/// [`PACED_BYTES_PER_SEC_LIVE`]. The log's fdatasync, which every acknowledgement waits for,
/// makes the disk flush whatever else was written since the last flush (measured: 3 to 10 ms
/// per log sync while a seal wrote its 26 MB flat out), so a background file is trickled out
/// in small pieces instead; and not synced piece by piece, because each sync of a growing
/// file commits the file system's journal, and a log sync arriving meanwhile waited that
/// commit out (5 to 8 ms each, seen with `perf trace`: the slow log syncs started and ended
/// with the sealer's). The caller's one sync at the end finds the data already written.
pub struct Paced<'f> {
    file: &'f File,
    /// Bytes written and not yet synced (or handed to writeback).
    unsynced: u64,
    /// Bytes written in all (the file's offset: [`Paced`] writes a new file from its start).
    written: u64,
    /// When the current piece started (for the rate while live).
    piece_started: Instant,
}

impl<'f> Paced<'f> {
    pub fn new(file: &'f File) -> Self {
        Self { file, unsynced: 0, written: 0, piece_started: Instant::now() }
    }
}

impl Write for Paced<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let live = log_is_live();
        let piece = if live { PACED_SYNC_BYTES_LIVE } else { PACED_SYNC_BYTES };
        let room = piece.saturating_sub(self.unsynced).max(1) as usize;
        let n = self.file.write(&buf[..buf.len().min(room)])?;
        self.unsynced += n as u64;
        self.written += n as u64;
        if self.unsynced >= piece {
            if live {
                // The rate is the process's, not this file's: a seal's segment, a merge's and
                // a spare log file written at once share it (each at the full rate, they
                // stalled log syncs 8-16 ms where one alone did not).
                let until = reserve_live_bandwidth(self.unsynced, self.piece_started);
                if let Some(wait) = until.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                start_writeback(self.file, self.written - self.unsynced, self.unsynced)?;
            } else {
                self.file.sync_data()?;
            }
            self.unsynced = 0;
            self.piece_started = Instant::now();
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The end, in microseconds after [`epoch`], of the last piece of background file writing
/// booked at [`PACED_BYTES_PER_SEC_LIVE`] ([`reserve_live_bandwidth`]).
static LIVE_BOOKED_UNTIL_US: AtomicU64 = AtomicU64::new(0);

/// Books `bytes` of the process's background write rate while the log is live, for a piece
/// that started at `started`: returns when its writeback may start, so that all [`Paced`]
/// writers together write no more than [`PACED_BYTES_PER_SEC_LIVE`]. A piece's slot starts at
/// the later of its own start and the end of the last slot booked; an idle gap in the
/// bookings is not saved up for a burst.
fn reserve_live_bandwidth(bytes: u64, started: Instant) -> Instant {
    let epoch = epoch();
    let len_us = bytes.saturating_mul(1_000_000) / PACED_BYTES_PER_SEC_LIVE;
    let from_us = started.saturating_duration_since(epoch).as_micros() as u64;
    let mut booked = LIVE_BOOKED_UNTIL_US.load(Ordering::Relaxed);
    loop {
        let end = booked.max(from_us) + len_us;
        match LIVE_BOOKED_UNTIL_US.compare_exchange_weak(booked, end, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return epoch + Duration::from_micros(end),
            Err(now) => booked = now,
        }
    }
}

/// Starts the kernel's writeback of `len` bytes of `file` at `offset`, without waiting for it,
/// committing the journal or flushing the disk's cache: `POSIX_FADV_DONTNEED` writes dirty
/// pages out (and drops only pages already clean). Elsewhere than Linux, syncs the data.
fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        rustix::fs::fadvise(file, offset, std::num::NonZeroU64::new(len), rustix::fs::Advice::DontNeed)
            .map_err(io::Error::from)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (offset, len);
        file.sync_data()
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

    /// Writers that pace at once share one rate: each booking ends at least its own length
    /// after the one before (other tests' bookings in between only push it later).
    #[test]
    fn paced_writers_share_the_live_rate() {
        let bytes = PACED_SYNC_BYTES_LIVE;
        let len = Duration::from_micros(bytes * 1_000_000 / PACED_BYTES_PER_SEC_LIVE);
        let now = Instant::now();
        let first = reserve_live_bandwidth(bytes, now);
        let second = reserve_live_bandwidth(bytes, now);
        assert!(first >= now + len, "a piece takes its own time at the rate");
        assert!(second >= first + len, "the second piece waits for the first: {:?}", second - first);
    }

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

    /// While the log is acknowledging writes, a large write goes out in small synced pieces;
    /// either way every byte arrives, whatever the sizes of the writes it is made of.
    #[test]
    fn paced_writes_keep_every_byte_live_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> =
            (0..(PACED_SYNC_BYTES_LIVE * 3 + 12_345) as u32).map(|i| (i % 251) as u8).collect();
        for live in [false, true] {
            if live {
                note_log_sync();
                assert!(log_is_live());
            }
            let p = dir.path().join(format!("big-{live}"));
            atomic_write_with(&p, |w| {
                for chunk in data.chunks(100_003) {
                    w.write_all(chunk)?;
                }
                Ok(())
            })
            .unwrap();
            assert_eq!(fs::read(&p).unwrap(), data, "live {live}");
        }
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
