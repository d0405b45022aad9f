//! The write-ahead log of the index writer: every catalogue write (an opaque payload here) is
//! appended and fdatasync'd before it is acknowledged, concurrent writers share fsyncs (group
//! commit), the log is replayed on start, and after a checkpoint the writer rotates and drops the
//! files it no longer needs.
//!
//! # On-disk format
//!
//! ```text
//! DIR/wal-<first_seq as 20 zero-padded digits>.log   (first_seq = seq of the file's first record)
//!
//! file   = frame*            frame = header body      (one frame per group commit)
//! header = 24 bytes, little-endian:
//!   0        4          8                  16       20       24
//!   +--------+----------+------------------+--------+--------+
//!   | "VWAL" | body_len |    first_seq     | count  | crc32  |
//!   | [u8;4] |   u32    |       u64        |  u32   |  u32   |
//!   +--------+----------+------------------+--------+--------+
//! body   = count x ( len u32 | payload[len] )          (exactly body_len bytes, count >= 1)
//! crc32  = CRC-32/IEEE of header[4..20] followed by body
//! ```
//!
//! Seqs are u64 from 1 to [`MAX_SEQ`], one per record, contiguous across frames and files; a
//! file's first frame starts at the seq in its name. A payload is at most [`MAX_RECORD_BYTES`], a
//! frame body at most [`MAX_FRAME_BODY`] (one caller's batch always goes into a single frame).
//! Each frame is written with one positional write and `sync_data`'d before any of its records
//! is reported durable, and the next frame is only written after that. A new file's first
//! frame is reported durable once the directory is fsynced too. Frames overwrite zeros written
//! and synced ahead, so that their `fdatasync` commits no metadata: on ext4 a metadata commit
//! waits for other files' dirty data, such as a segment a seal is writing. A busy log's next
//! file is prepared ahead by a background thread (a *spare*, `wal-spare-*.tmp`: zeros, synced)
//! and renamed into place by the first frame that needs a new file, or that would have to grow
//! the current one; otherwise the current file is extended [`PREALLOC_BYTES`] of zeros at a time
//! (written with the frame that needs them, durable with its sync). Files a checkpoint retires
//! are kept as the next spares ([`Wal::retire`]: overwritten with zeros, never freed). A
//! rotation does no IO: the closed file keeps its zeros (see the recovery rules).
//!
//! # Recovery rules ([`Wal::open`])
//!
//! * A bad frame (short, bad magic, bad crc, malformed body) in the last file, with no valid
//!   frame of seq >= the expected one anywhere after it, is a torn tail: the file is truncated at
//!   the frame's offset and fsynced; [`Replayed::dropped_tail_bytes`] says how much went
//!   (through its last non-zero byte: zeros written ahead of the frames are no loss). In any
//!   other file, only zeros may follow the last frame (written ahead, left by the rotation):
//!   they end it, and the next file's name must continue its seqs (the rule below), so a lost
//!   frame there still shows as a gap.
//! * A bad frame that a valid frame follows, or a bad frame in any other file, is corruption in
//!   the middle: open fails naming the file, offset and seqs. So does a crc-valid frame whose seq
//!   does not continue (no crash produces one).
//! * Files must continue each other's seqs; a gap (or a first file starting late) is allowed only
//!   where every missing seq is <= `after_seq`, the caller's checkpoint. Non-last files holding
//!   only seqs <= `after_seq` are not read.
//! * A checkpoint `after_seq` above [`MAX_SEQ`] is refused (a damaged manifest). File names and
//!   frames beyond [`MAX_SEQ`] are not the log's, and an append that would pass it fails and
//!   poisons the log (it is full).
//! * A last file left with no records is deleted. New files are created lazily by the next
//!   append, so [`Wal::rotate`] only closes the current one.
//! * Spare files are never read: open deletes them (one may hold a retired file's old frames
//!   until it is zeroed). A spare is renamed into the log only once all zeros and synced.
//!
//! A failed write or sync poisons the [`Wal`]: those records are not durable and every later
//! append fails until the log is reopened (which drops the torn frame).

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex, MutexGuard};

pub const MAGIC: [u8; 4] = *b"VWAL";
pub const HEADER_LEN: usize = 24;
/// A frame whose zero fill, write and syncs take longer than this is logged at debug level.
const SLOW_FRAME: Duration = Duration::from_millis(8);
/// Largest payload of one record.
pub const MAX_RECORD_BYTES: usize = 64 << 20;
/// Largest body of one frame (records with their 4-byte length prefixes).
pub const MAX_FRAME_BODY: usize = 128 << 20;
/// The current log file is extended this many zero bytes at a time, written and synced
/// ahead of the frames, so that a frame's `fdatasync` overwrites allocated blocks without
/// changing the file's size: no journal commit, which on ext4 would wait for other files'
/// data (a segment file being written by a seal made acknowledgements wait 5 to 10 ms).
pub const PREALLOC_BYTES: u64 = 1 << 20;
/// Largest spare file prepared ahead of a rotation (see [`Spare`]).
pub const MAX_SPARE_BYTES: u64 = 64 << 20;
/// Highest seq a record may have (2^63 - 1). Keeping seqs this far below `u64::MAX` means
/// `next_seq` arithmetic cannot overflow: appending 2^63 records would take centuries.
pub const MAX_SEQ: u64 = i64::MAX as u64;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("WAL: cannot {op} {path}")]
    Io { op: &'static str, path: PathBuf, source: io::Error },
    #[error("WAL: cannot truncate the torn tail of {path} at byte {offset}")]
    Truncate { path: PathBuf, offset: u64, source: io::Error },
    #[error("WAL: cannot write seqs {first_seq}..={last_seq} to {path} at byte {offset}")]
    Write { path: PathBuf, offset: u64, first_seq: u64, last_seq: u64, source: io::Error },
    #[error("WAL poisoned: writing seqs {first_seq}..={last_seq} to {path} at byte {offset} failed")]
    Poisoned { path: PathBuf, offset: u64, first_seq: u64, last_seq: u64 },
    #[error(
        "WAL file {path} is corrupt at byte {offset}: seqs {expected_seq}..{next_seq} are damaged \
         and a valid frame follows at byte {next_offset}"
    )]
    CorruptMiddle { path: PathBuf, offset: u64, expected_seq: u64, next_seq: u64, next_offset: u64 },
    #[error("WAL file {path} is corrupt at byte {offset} (seq {expected_seq} on) but {next_file} follows it")]
    CorruptNotLast { path: PathBuf, offset: u64, expected_seq: u64, next_file: PathBuf },
    #[error("WAL file {path} at byte {offset}: frame starts at seq {found_seq}, expected {expected_seq}")]
    SeqMismatch { path: PathBuf, offset: u64, expected_seq: u64, found_seq: u64 },
    #[error(
        "WAL file {path} starts at seq {found_seq}, expected {expected_seq}: the log does not \
         continue past the checkpoint at seq {after_seq}"
    )]
    SeqDiscontinuity { path: PathBuf, expected_seq: u64, found_seq: u64, after_seq: u64 },
    #[error("WAL: record {index} of the batch has {len} bytes; the limit is {MAX_RECORD_BYTES}")]
    RecordTooLarge { index: usize, len: usize },
    #[error("WAL: a batch of {records} records needs {bytes} frame bytes; the limit is {MAX_FRAME_BODY}")]
    BatchTooLarge { records: usize, bytes: usize },
    #[error("WAL: append_batch called with no records")]
    EmptyBatch,
    #[error("WAL in {dir}: the checkpoint seq {after_seq} is above the highest seq, {MAX_SEQ}")]
    CheckpointOutOfRange { dir: PathBuf, after_seq: u64 },
    #[error("WAL {path} is full: seqs {first_seq}..={last_seq} would pass the highest seq, {MAX_SEQ}")]
    Full { path: PathBuf, first_seq: u64, last_seq: u64 },
}

/// What [`Wal::open`] found.
#[derive(Debug, Default)]
pub struct Replayed {
    /// Every record with seq > `after_seq`, in seq order.
    pub records: Vec<(u64, Vec<u8>)>,
    /// Bytes cut off the last file as a torn tail, through its last non-zero byte (zeros
    /// after the frames are space written ahead, indistinguishable from a torn frame's own).
    pub dropped_tail_bytes: u64,
    /// Log files found in the directory.
    pub files: usize,
}

/// The write-ahead log. `Send + Sync`; share it as `Arc<Wal>`.
#[derive(Debug)]
pub struct Wal {
    dir: PathBuf,
    state: Mutex<State>,
    wake: Condvar,
    /// Closed files, oldest first. Never locked while waiting for `state`.
    closed: Mutex<VecDeque<LogFile>>,
    disk_bytes: AtomicU64,
    frames: AtomicU64,
    /// Test hook: the next frame write stops half-way and fails.
    fail_next_write: AtomicBool,
    /// The next log file, prepared ahead by a background thread.
    spare: Spare,
    /// Frame bytes of the file the last rotation closed: the size of the next spare.
    last_closed_bytes: AtomicU64,
    /// Bytes the caller expects a file to hold before its rotation (0: unknown).
    expected_file_bytes: AtomicU64,
}

#[derive(Debug)]
struct State {
    /// A leader is writing a frame, or a rotation is under way.
    busy: bool,
    queue: VecDeque<Pending>,
    /// Finished tickets: their first seq, or why their frame failed.
    done: HashMap<u64, Result<u64, Poison>>,
    next_ticket: u64,
    next_seq: u64,
    durable: u64,
    current: Option<(File, LogFile)>,
    poisoned: Option<Poison>,
}

/// One caller's records, encoded as frame body bytes.
#[derive(Debug)]
struct Pending {
    ticket: u64,
    count: u32,
    body: Vec<u8>,
}

#[derive(Debug)]
struct LogFile {
    path: PathBuf,
    last_seq: u64,
    /// Bytes of frames.
    bytes: u64,
    /// The file's length: `bytes` plus zero bytes written and synced ahead of the frames
    /// ([`PREALLOC_BYTES`]); equal to `bytes` once the file is closed.
    allocated: u64,
}

#[derive(Debug, Clone)]
struct Poison {
    path: PathBuf,
    offset: u64,
    first_seq: u64,
    last_seq: u64,
}

impl Poison {
    fn error(&self) -> WalError {
        let Poison { path, offset, first_seq, last_seq } = self.clone();
        WalError::Poisoned { path, offset, first_seq, last_seq }
    }
}

/// The name of the log file whose first record is `first_seq`.
pub fn file_name(first_seq: u64) -> String {
    format!("wal-{first_seq:020}.log")
}

fn parse_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix("wal-")?.strip_suffix(".log")?;
    let well_formed = digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit());
    well_formed.then(|| digits.parse().ok()).flatten().filter(|&s| (1..=MAX_SEQ).contains(&s))
}

/// Whether `name` is a spare log file's ([`Spare`]): zeros only, never part of the log.
pub fn is_spare_name(name: &str) -> bool {
    name.starts_with("wal-spare-") && name.ends_with(".tmp")
}

/// The next log file, prepared ahead of the rotation that needs it: a background thread
/// writes a file of zeros (paced, see [`crate::fsutil::Paced`]) and syncs it, and the first
/// frame after a rotation renames it to its log file name instead of creating an empty file.
/// Its frames then overwrite blocks already allocated and synced, so their `fdatasync` commits
/// no metadata (no journal commit, which on ext4 waits for other files' dirty data, and no
/// zeros written on the acknowledgement path). Measured at 5,000 vector upserts/s: without
/// it, every 1 MiB extension held the group's sync 3.5-4.5 ms, and some 15-30 ms.
///
/// Nothing depends on it for correctness: the rename's directory fsync comes after the first
/// frame as for a created file; a spare not ready is not waited for (the file is created
/// and extended as before); a spare left by a crash is deleted by the next open.
#[derive(Debug)]
struct Spare {
    slot: Arc<(Mutex<SpareSlot>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct SpareSlot {
    /// A prepared file: its path, handle and length.
    ready: Option<(PathBuf, File, u64)>,
    /// Retired log files renamed to spare names, to be zeroed and reused ([`Wal::retire`]).
    pool: Vec<PathBuf>,
    /// Bytes wanted for the next spare (0: none).
    want: u64,
    stop: bool,
}

impl Spare {
    fn start(dir: &Path) -> Spare {
        let slot = Arc::new((Mutex::new(SpareSlot::default()), Condvar::new()));
        let (dir, shared) = (dir.to_path_buf(), Arc::clone(&slot));
        let thread = std::thread::Builder::new()
            .name("vitrine-wal-spare".into())
            .spawn(move || spare_loop(&dir, &shared))
            .map_err(|e| tracing::warn!("no spare log files (cannot start their thread): {e}"))
            .ok();
        Spare { slot, thread }
    }

    fn is_ready(&self) -> bool {
        self.slot.0.lock().ready.is_some()
    }

    /// The prepared file, if one is ready (never waits).
    fn take(&self) -> Option<(PathBuf, File, u64)> {
        self.slot.0.lock().ready.take()
    }

    /// Asks for a spare of `bytes` (rounded up to [`PREALLOC_BYTES`], at most
    /// [`MAX_SPARE_BYTES`]) unless one is ready.
    fn request(&self, bytes: u64) {
        let want = bytes.next_multiple_of(PREALLOC_BYTES).clamp(PREALLOC_BYTES, MAX_SPARE_BYTES);
        let (lock, cv) = &*self.slot;
        let mut st = lock.lock();
        if st.ready.is_none() {
            st.want = want;
            cv.notify_one();
        }
    }
}

impl Drop for Spare {
    fn drop(&mut self) {
        let (lock, cv) = &*self.slot;
        lock.lock().stop = true;
        cv.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut st = lock.lock();
        if let Some((path, file, _)) = st.ready.take() {
            drop(file);
            let _ = fs::remove_file(path);
        }
        for path in st.pool.drain(..) {
            let _ = fs::remove_file(path);
        }
    }
}

/// Retired log files kept for reuse as spares at most; more are deleted.
const SPARE_POOL: usize = 2;
/// A spare is prepared once the current file holds this many bytes of frames (or a quarter
/// of what the caller expects a file to hold, if less): a log this busy will need another
/// file (tiny logs, as in most tests, never make one).
const SPARE_AFTER_BYTES: u64 = 2 * PREALLOC_BYTES;

/// Frame bytes after which the current file asks for a spare ([`SPARE_AFTER_BYTES`]).
fn spare_after(expected_file_bytes: u64) -> u64 {
    match expected_file_bytes {
        0 => SPARE_AFTER_BYTES,
        e => (e / 4).clamp(64 << 10, SPARE_AFTER_BYTES),
    }
}

/// The spare thread: prepares one file at a time when asked ([`Spare::request`]).
fn spare_loop(dir: &Path, slot: &(Mutex<SpareSlot>, Condvar)) {
    crate::background::lower_current_thread();
    let (lock, cv) = slot;
    for n in 0u64.. {
        let (want, recycled) = {
            let mut st = lock.lock();
            while !st.stop && (st.want == 0 || st.ready.is_some()) {
                cv.wait(&mut st);
            }
            if st.stop {
                return;
            }
            (std::mem::take(&mut st.want), st.pool.pop())
        };
        let path = recycled.unwrap_or_else(|| dir.join(format!("wal-spare-{}-{n}.tmp", std::process::id())));
        let made = (|| {
            // A retired log file is overwritten in place (its blocks stay allocated: no
            // metadata to commit, and nothing freed, which with `discard` makes the commit
            // that frees them slow); a new one is created.
            let file = if path.exists() {
                OpenOptions::new().write(true).open(&path)?
            } else {
                OpenOptions::new().create_new(true).write(true).open(&path)?
            };
            let want = want.max(file.metadata()?.len());
            let mut w = io::BufWriter::with_capacity(1 << 20, crate::fsutil::Paced::new(&file));
            let mut left = want;
            while left > 0 {
                if lock.lock().stop {
                    return Err(io::Error::other("the log is closing"));
                }
                let n = left.min(ZEROS.len() as u64) as usize;
                io::Write::write_all(&mut w, &ZEROS[..n])?;
                left -= n as u64;
            }
            io::Write::flush(&mut w)?;
            drop(w);
            // Length and blocks committed, so that frames over them change no metadata.
            file.sync_all()?;
            // Zeros from its start over at least its old length: `want` bytes long now.
            Ok::<(File, u64), io::Error>((file, want))
        })();
        match made {
            Ok((file, len)) => lock.lock().ready = Some((path, file, len)),
            Err(_) if lock.lock().stop => {
                let _ = fs::remove_file(&path);
                return;
            }
            Err(e) => {
                let _ = fs::remove_file(&path);
                tracing::warn!("cannot prepare a spare log file {}: {e}", path.display());
            }
        }
    }
}

/// Deletes spare files ([`Spare`]) a previous process left in `dir`.
fn remove_spares(dir: &Path) -> Result<(), WalError> {
    for entry in fs::read_dir(dir).map_err(io("list", dir))? {
        let entry = entry.map_err(io("list", dir))?;
        if entry.file_name().to_str().is_some_and(is_spare_name) {
            let path = entry.path();
            fs::remove_file(&path).map_err(io("remove", &path))?;
        }
    }
    Ok(())
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> WalError + use<> {
    let path = path.to_path_buf();
    move |source| WalError::Io { op, path, source }
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    crate::fsutil::sync_dir(dir).map_err(io("fsync directory", dir))
}

/// What [`zero_fill`] and the spare thread write zeros from.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// Writes zeros over `from..to` of `file` (nothing when `to <= from`); not synced.
fn zero_fill(file: &File, from: u64, to: u64) -> io::Result<()> {
    let mut at = from;
    while at < to {
        let n = (to - at).min(ZEROS.len() as u64);
        file.write_all_at(&ZEROS[..n as usize], at)?;
        at += n;
    }
    Ok(())
}

fn le<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0; N];
    a.copy_from_slice(b);
    a
}

/// A crc-valid, well-formed frame; `records` are the byte ranges of its payloads in the file.
struct Frame {
    first_seq: u64,
    len: usize,
    records: Vec<Range<usize>>,
}

/// The frame at `off`, or `None` if there is no complete, valid one.
fn parse_frame(data: &[u8], off: usize) -> Option<Frame> {
    let h = data.get(off..off.checked_add(HEADER_LEN)?)?;
    let body_len = u32::from_le_bytes(le(&h[4..8])) as usize;
    let (first_seq, count) = (u64::from_le_bytes(le(&h[8..16])), u32::from_le_bytes(le(&h[16..20])));
    if h[..4] != MAGIC || body_len > MAX_FRAME_BODY || count == 0 || first_seq == 0 {
        return None;
    }
    // The last seq, first_seq + count - 1, must not pass MAX_SEQ.
    first_seq.checked_add(u64::from(count)).filter(|&end| end <= MAX_SEQ + 1)?;
    let body_at = off + HEADER_LEN;
    let body = data.get(body_at..body_at + body_len)?;
    let mut crc = crc32fast::Hasher::new();
    crc.update(&h[4..20]);
    crc.update(body);
    if crc.finalize() != u32::from_le_bytes(le(&h[20..24])) {
        return None;
    }
    let mut records = Vec::with_capacity((count as usize).min(body_len / 4));
    let mut pos = 0;
    for _ in 0..count {
        let len = u32::from_le_bytes(le(body.get(pos..pos + 4)?)) as usize;
        let end = (pos + 4).checked_add(len).filter(|&e| e <= body.len())?;
        records.push(body_at + pos + 4..body_at + end);
        pos = end;
    }
    (pos == body.len()).then_some(Frame { first_seq, len: HEADER_LEN + body_len, records })
}

/// The first valid frame at or after `from` whose first seq is >= `min_seq`: (offset, seq).
fn find_valid_frame(data: &[u8], from: usize, min_seq: u64) -> Option<(usize, u64)> {
    let mut pos = from;
    while pos + HEADER_LEN <= data.len() {
        let at = pos + data[pos..].windows(4).position(|w| w == MAGIC)?;
        if let Some(f) = parse_frame(data, at).filter(|f| f.first_seq >= min_seq) {
            return Some((at, f.first_seq));
        }
        pos = at + 1;
    }
    None
}

struct Scan {
    records: Vec<(u64, Range<usize>)>,
    /// Seq of the last good record (`first - 1` if none).
    end: u64,
    /// Offset of the first bad frame, and the seq it claims if it is crc-valid.
    bad: Option<(usize, Option<u64>)>,
}

fn scan_frames(data: &[u8], first: u64) -> Scan {
    let mut scan = Scan { records: Vec::new(), end: first - 1, bad: None };
    let mut off = 0;
    while off < data.len() {
        match parse_frame(data, off) {
            Some(f) if f.first_seq == scan.end + 1 => {
                scan.end += f.records.len() as u64;
                scan.records.extend((f.first_seq..).zip(f.records));
                off += f.len;
            }
            other => {
                scan.bad = Some((off, other.map(|f| f.first_seq)));
                break;
            }
        }
    }
    scan
}

fn list_files(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io("list", dir))? {
        let entry = entry.map_err(io("list", dir))?;
        let Some(first) = entry.file_name().to_str().and_then(parse_file_name) else { continue };
        if entry.file_type().map_err(io("stat", &entry.path()))?.is_file() {
            out.push((first, entry.path()));
        }
    }
    out.sort_unstable_by_key(|f| f.0);
    Ok(out)
}

/// Whether [`read_files`] cuts a torn tail off the last file (open) or only reports it (check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Repair {
    Truncate,
    ReadOnly,
}

/// What [`read_files`] found: the records to replay and the files as they end.
struct Found {
    replayed: Replayed,
    closed: VecDeque<LogFile>,
    last: Option<LogFile>,
    /// Seq of the last record read (None: no file was read).
    prev_end: Option<u64>,
}

/// Reads the log files in `dir` under the recovery rules (module docs): every record with
/// seq > `after_seq`, or the error that stops a start.
fn read_files(dir: &Path, after_seq: u64, repair: Repair) -> Result<Found, WalError> {
    let files = list_files(dir)?;
    let mut replayed = Replayed { files: files.len(), ..Replayed::default() };
    let (mut closed, mut prev_end, mut last) = (VecDeque::new(), None, None);
    for (i, (first, path)) in files.iter().enumerate() {
        let (first, next) = (*first, files.get(i + 1));
        let expected = prev_end.map_or(after_seq.saturating_add(1), |e: u64| e + 1);
        if (prev_end.is_some() && first < expected) || (first > expected && first - 1 > after_seq) {
            let (path, found_seq) = (path.clone(), first);
            return Err(WalError::SeqDiscontinuity { path, expected_seq: expected, found_seq, after_seq });
        }
        if let Some((next_first, _)) = next
            && next_first - 1 <= after_seq
        {
            // All its records are covered by the caller's checkpoint: not read.
            let bytes = fs::metadata(path).map_err(io("stat", path))?.len();
            let last_seq = next_first - 1;
            closed.push_back(LogFile { path: path.clone(), last_seq, bytes, allocated: bytes });
            prev_end = Some(next_first - 1);
            continue;
        }
        let data = fs::read(path).map_err(io("read", path))?;
        let scan = scan_frames(&data, first);
        let mut bytes = data.len() as u64;
        // A closed file ends in the zeros written ahead of its frames (a rotation leaves
        // them): its end, not damage, as the next file's name is checked to continue its
        // seqs (a lost frame would leave a gap, reported above on the next round).
        let zero_tail = |at: usize| next.is_some() && data[at..].iter().all(|&b| b == 0);
        if let Some((at, None)) = scan.bad.filter(|&(at, _)| zero_tail(at)) {
            bytes = at as u64;
        } else if let Some((at, claimed)) = scan.bad {
            let (path, offset, expected_seq) = (path.clone(), at as u64, scan.end + 1);
            if let Some(found_seq) = claimed {
                return Err(WalError::SeqMismatch { path, offset, expected_seq, found_seq });
            }
            if let Some((_, next_file)) = next {
                let next_file = next_file.clone();
                return Err(WalError::CorruptNotLast { path, offset, expected_seq, next_file });
            }
            if let Some((next_at, next_seq)) = find_valid_frame(&data, at + 1, expected_seq) {
                let next_offset = next_at as u64;
                return Err(WalError::CorruptMiddle { path, offset, expected_seq, next_seq, next_offset });
            }
            if repair == Repair::Truncate {
                OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|f| f.set_len(offset).and_then(|()| f.sync_all()))
                    .map_err(|source| WalError::Truncate { path: path.clone(), offset, source })?;
            }
            // Zero bytes after the last frame are space written ahead, not a lost frame.
            let written = data.iter().rposition(|&b| b != 0).map_or(0, |i| i as u64 + 1);
            replayed.dropped_tail_bytes = written.saturating_sub(offset);
            bytes = offset;
        }
        let fresh = scan.records.into_iter().filter(|(seq, _)| *seq > after_seq);
        replayed.records.extend(fresh.map(|(seq, range)| (seq, data[range].to_vec())));
        prev_end = Some(scan.end);
        let file = LogFile { path: path.clone(), last_seq: scan.end, bytes, allocated: bytes };
        if next.is_some() { closed.push_back(file) } else { last = Some(file) }
    }
    Ok(Found { replayed, closed, last, prev_end })
}

impl Wal {
    /// Opens (creating) the log in `dir`, replays every record with seq > `after_seq` and
    /// repairs a torn tail. Appends continue after the highest seq found, or after `after_seq`
    /// if that is higher.
    pub fn open(dir: &Path, after_seq: u64) -> Result<(Wal, Replayed), WalError> {
        if after_seq > MAX_SEQ {
            return Err(WalError::CheckpointOutOfRange { dir: dir.to_path_buf(), after_seq });
        }
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(io("create directory", dir))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent)?;
            }
        }
        remove_spares(dir)?;
        let Found { replayed, mut closed, last, prev_end } = read_files(dir, after_seq, Repair::Truncate)?;
        let next_seq = after_seq.max(prev_end.unwrap_or(0)) + 1;
        // The last file takes further appends if it holds records and continues at `next_seq`.
        let current = match last {
            Some(f) if f.bytes == 0 => {
                fs::remove_file(&f.path).map_err(io("remove", &f.path))?;
                sync_dir(dir)?;
                None
            }
            Some(f) if f.last_seq + 1 == next_seq => {
                Some((OpenOptions::new().write(true).open(&f.path).map_err(io("open", &f.path))?, f))
            }
            other => {
                closed.extend(other);
                None
            }
        };
        let disk = closed.iter().chain(current.as_ref().map(|c| &c.1)).map(|f| f.bytes).sum();
        let state = State {
            busy: false,
            queue: VecDeque::new(),
            done: HashMap::new(),
            next_ticket: 0,
            next_seq,
            durable: next_seq - 1,
            current,
            poisoned: None,
        };
        let wal = Wal {
            dir: dir.to_path_buf(),
            state: Mutex::new(state),
            wake: Condvar::new(),
            closed: Mutex::new(closed),
            disk_bytes: AtomicU64::new(disk),
            frames: AtomicU64::new(0),
            fail_next_write: AtomicBool::new(false),
            spare: Spare::start(dir),
            last_closed_bytes: AtomicU64::new(0),
            expected_file_bytes: AtomicU64::new(0),
        };
        Ok((wal, replayed))
    }

    /// Reads the log as [`Wal::open`] would, changing nothing: the records a start would
    /// replay and the torn tail it would drop, or the error that would stop it. Spare files
    /// are ignored. For `vitrine verify`.
    pub fn check(dir: &Path, after_seq: u64) -> Result<Replayed, WalError> {
        if after_seq > MAX_SEQ {
            return Err(WalError::CheckpointOutOfRange { dir: dir.to_path_buf(), after_seq });
        }
        if !dir.is_dir() {
            return Ok(Replayed::default());
        }
        Ok(read_files(dir, after_seq, Repair::ReadOnly)?.replayed)
    }

    /// Appends one record; returns its seq once it is durable (fdatasync'd).
    pub fn append(&self, payload: &[u8]) -> Result<u64, WalError> {
        self.append_batch(&[payload])
    }

    /// Appends `payloads` as consecutive seqs in one frame; returns the first seq once durable.
    pub fn append_batch(&self, payloads: &[&[u8]]) -> Result<u64, WalError> {
        if payloads.is_empty() {
            return Err(WalError::EmptyBatch);
        }
        let mut bytes = 0usize;
        for (index, p) in payloads.iter().enumerate() {
            if p.len() > MAX_RECORD_BYTES {
                return Err(WalError::RecordTooLarge { index, len: p.len() });
            }
            bytes = bytes.saturating_add(4 + p.len());
        }
        if bytes > MAX_FRAME_BODY {
            return Err(WalError::BatchTooLarge { records: payloads.len(), bytes });
        }
        let mut body = Vec::with_capacity(bytes);
        for p in payloads {
            body.extend_from_slice(&(p.len() as u32).to_le_bytes());
            body.extend_from_slice(p);
        }
        // Fits: at most MAX_FRAME_BODY / 4 records.
        self.submit(payloads.len() as u32, body)
    }

    /// Queues one caller's records and waits until a leader (maybe this caller) made them durable.
    fn submit(&self, count: u32, body: Vec<u8>) -> Result<u64, WalError> {
        let mut st = self.state.lock();
        if let Some(p) = &st.poisoned {
            return Err(p.error());
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.queue.push_back(Pending { ticket, count, body });
        loop {
            if let Some(done) = st.done.remove(&ticket) {
                return done.map_err(|p| p.error());
            }
            if st.busy {
                self.wake.wait(&mut st);
            } else if let Some(e) = self.lead(&mut st, ticket) {
                return Err(e);
            }
        }
    }

    /// Writes frames of queued records until `ticket` is done. Returns the I/O error if the frame
    /// holding `ticket` failed (that frame's other callers get `Poisoned`).
    fn lead(&self, st: &mut MutexGuard<'_, State>, ticket: u64) -> Option<WalError> {
        st.busy = true;
        let mut own_error = None;
        while own_error.is_none() && !st.done.contains_key(&ticket) {
            if let Some(p) = st.poisoned.clone() {
                for q in std::mem::take(&mut st.queue) {
                    st.done.insert(q.ticket, Err(p.clone()));
                }
                continue;
            }
            let (mut batch, mut bytes, mut count) = (Vec::new(), 0, 0);
            while let Some(front) = st.queue.front() {
                if !batch.is_empty() && bytes + front.body.len() > MAX_FRAME_BODY {
                    break;
                }
                bytes += front.body.len();
                count += u64::from(front.count);
                batch.extend(st.queue.pop_front());
            }
            let first_seq = st.next_seq;
            st.next_seq += count;
            let current = st.current.take();
            match MutexGuard::unlocked(st, || self.write_frame(current, first_seq, count, &batch)) {
                Ok(file) => {
                    st.durable = file.1.last_seq;
                    st.current = Some(file);
                    let mut seq = first_seq;
                    for p in &batch {
                        st.done.insert(p.ticket, Ok(seq));
                        seq += u64::from(p.count);
                    }
                }
                Err((error, poison)) => {
                    for p in batch.iter().filter(|p| p.ticket != ticket) {
                        st.done.insert(p.ticket, Err(poison.clone()));
                    }
                    own_error = batch.iter().any(|p| p.ticket == ticket).then_some(error);
                    st.poisoned = Some(poison);
                }
            }
            self.wake.notify_all();
        }
        st.busy = false;
        self.wake.notify_all();
        own_error
    }

    /// Writes one frame (creating the file first if needed) with one `write_all` + `sync_data`.
    fn write_frame(
        &self,
        current: Option<(File, LogFile)>,
        first_seq: u64,
        count: u64,
        batch: &[Pending],
    ) -> Result<(File, LogFile), (WalError, Poison)> {
        let last_seq = first_seq + count - 1;
        if last_seq > MAX_SEQ {
            let (path, offset) =
                current.map_or((self.dir.join(file_name(first_seq)), 0), |c| (c.1.path, c.1.bytes));
            let poison = Poison { path: path.clone(), offset, first_seq, last_seq };
            return Err((WalError::Full { path, first_seq, last_seq }, poison));
        }
        // A file that would have to grow (the first after an open, or one that outgrew its
        // spare) is closed here instead when a spare is ready: its records are all synced,
        // and file boundaries need not match checkpoints (a file is dropped once one covers
        // all of its records).
        let body_len: usize = batch.iter().map(|p| p.body.len()).sum();
        let current = match current {
            Some((file, log))
                if log.bytes + (HEADER_LEN + body_len) as u64 > log.allocated && self.spare.is_ready() =>
            {
                self.close_file(file, log);
                None
            }
            other => other,
        };
        let created = current.is_none();
        let (file, mut log) = match current {
            Some(c) => c,
            None => {
                let path = self.dir.join(file_name(first_seq));
                let poison = Poison { path: path.clone(), offset: 0, first_seq, last_seq };
                let mut log = LogFile { path, last_seq: first_seq - 1, bytes: 0, allocated: 0 };
                // A spare renamed into place (durable with the directory fsync after this
                // frame, as a created file's name), else a new empty file.
                let spare = if log.path.exists() { None } else { self.spare.take() };
                let spare = spare.and_then(|(spare, file, len)| match fs::rename(&spare, &log.path) {
                    Ok(()) => Some((file, len)),
                    Err(e) => {
                        tracing::warn!("cannot use the spare log file {}: {e}", spare.display());
                        let _ = fs::remove_file(&spare);
                        None
                    }
                });
                let file = match spare {
                    Some((file, len)) => {
                        log.allocated = len;
                        file
                    }
                    None => OpenOptions::new()
                        .create_new(true)
                        .write(true)
                        .open(&log.path)
                        .map_err(io("create", &log.path))
                        .map_err(|e| (e, poison))?,
                };
                (file, log)
            }
        };
        let mut buf = Vec::with_capacity(HEADER_LEN + body_len);
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&(body_len as u32).to_le_bytes());
        buf.extend_from_slice(&first_seq.to_le_bytes());
        buf.extend_from_slice(&(count as u32).to_le_bytes());
        buf.extend_from_slice(&[0; 4]);
        batch.iter().for_each(|p| buf.extend_from_slice(&p.body));
        let mut crc = crc32fast::Hasher::new();
        crc.update(&buf[4..20]);
        crc.update(&buf[HEADER_LEN..]);
        buf[20..24].copy_from_slice(&crc.finalize().to_le_bytes());
        // Past the zeros written ahead: write more first; this frame's sync makes them durable
        // (and is the one sync in PREALLOC_BYTES that changes the file's size).
        let end = log.bytes + buf.len() as u64;
        let allocated = if end > log.allocated {
            (end + PREALLOC_BYTES).next_multiple_of(PREALLOC_BYTES)
        } else {
            log.allocated
        };
        let started = Instant::now();
        let written = zero_fill(&file, log.allocated, allocated).and_then(|()| {
            if self.fail_next_write.swap(false, Ordering::Relaxed) {
                file.write_all_at(&buf[..buf.len() / 2], log.bytes)
                    .and_then(|()| Err(io::Error::other("injected failure")))
            } else {
                // A new file's name is made durable after its first frame, not before: the
                // frame's sync commits the file system's journal anyway (the file grew), and
                // that commit carries the new name too, so the directory's fsync then finds
                // little left to do (one journal commit per new file instead of two).
                let t0 = Instant::now();
                let r = file.write_all_at(&buf, log.bytes);
                let t1 = Instant::now();
                let r = r.and_then(|()| file.sync_data());
                let t2 = Instant::now();
                let r = r.and_then(|()| if created { crate::fsutil::sync_dir(&self.dir) } else { Ok(()) });
                let t3 = Instant::now();
                if t3 - started > SLOW_FRAME {
                    // Diagnostics (`RUST_LOG=vitrine::index::wal=debug`): which step every
                    // acknowledgement in the group waited for.
                    let ms = |d: Duration| d.as_secs_f64() * 1e3;
                    tracing::debug!(
                        created,
                        grew = allocated > log.allocated,
                        bytes = buf.len(),
                        zero_ms = ms(t0 - started),
                        write_ms = ms(t1 - t0),
                        sync_ms = ms(t2 - t1),
                        dir_ms = ms(t3 - t2),
                        "slow log frame"
                    );
                }
                r.map(|()| crate::fsutil::note_log_sync())
            }
        });
        if let Err(source) = written {
            let (path, offset) = (log.path.clone(), log.bytes);
            let poison = Poison { path: path.clone(), offset, first_seq, last_seq };
            return Err((WalError::Write { path, offset, first_seq, last_seq, source }, poison));
        }
        self.disk_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        let expected = self.expected_file_bytes.load(Ordering::Relaxed);
        let after = spare_after(expected);
        if log.bytes < after && end >= after {
            // A file this busy will be followed by another: prepare it, about as large as
            // the last one closed, or as the writer expects, or twice this one so far.
            let closed = self.last_closed_bytes.load(Ordering::Relaxed);
            self.spare.request((closed + closed / 8).max(expected).max(2 * end));
        }
        log.allocated = allocated;
        log.bytes = end;
        log.last_seq = last_seq;
        self.frames.fetch_add(1, Ordering::Relaxed);
        Ok((file, log))
    }

    /// Highest seq that is durable.
    pub fn last_seq(&self) -> u64 {
        self.state.lock().durable
    }

    /// Closes the current file; the next append starts a new one. Returns the last seq of the
    /// closed file, or [`Wal::last_seq`] if no file was open (nothing appended since the last
    /// rotation or open).
    pub fn rotate(&self) -> Result<u64, WalError> {
        let mut st = self.state.lock();
        while st.busy {
            self.wake.wait(&mut st);
        }
        if let Some(p) = &st.poisoned {
            return Err(p.error());
        }
        let Some((file, log)) = st.current.take() else { return Ok(st.durable) };
        Ok(self.close_file(file, log))
    }

    /// Closes the current file (by [`rotate`](Self::rotate), or for a spare); returns its last
    /// seq. No IO here (this runs on the thread every acknowledgement waits for): the zeros
    /// written ahead stay in the closed file, whose every frame is already synced. Recovery
    /// reads them as that file's end because the next file's name continues its seqs (a lost
    /// frame would leave a gap it reports); the file is retired after its checkpoint.
    fn close_file(&self, file: File, log: LogFile) -> u64 {
        drop(file);
        let last_seq = log.last_seq;
        // The next file will likely hold about as much (the size of its spare).
        self.last_closed_bytes.store(log.bytes, Ordering::Relaxed);
        self.closed.lock().push_back(log);
        last_seq
    }

    /// Deletes every closed file all of whose records have seq <= `seq` (never the current
    /// file), then fsyncs the directory. Returns the number of files removed.
    pub fn remove_through(&self, seq: u64) -> Result<usize, WalError> {
        let paths = self.detach_through(seq);
        self.remove_detached(&paths)
    }

    /// The first half of [`remove_through`](Self::remove_through), cheap: takes every closed
    /// file all of whose records have seq <= `seq` off the log (and off
    /// [`disk_bytes`](Self::disk_bytes)) and returns their paths, for
    /// [`remove_detached`](Self::remove_detached) to delete later, off the write path. A
    /// file detached but not yet deleted when the process stops is covered by the checkpoint
    /// the caller committed first, so the next open skips it and deletes it then.
    pub fn detach_through(&self, seq: u64) -> Vec<PathBuf> {
        let mut closed = self.closed.lock();
        let mut paths = Vec::new();
        while let Some(f) = closed.front().filter(|f| f.last_seq <= seq) {
            self.disk_bytes.fetch_sub(f.bytes, Ordering::Relaxed);
            paths.push(f.path.clone());
            closed.pop_front();
        }
        paths
    }

    /// Deletes files [`detach_through`](Self::detach_through) returned (a missing one is
    /// fine), then fsyncs the directory. Returns the number of files.
    pub fn remove_detached(&self, paths: &[PathBuf]) -> Result<usize, WalError> {
        for path in paths {
            match fs::remove_file(path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io("remove", path)(e)),
                _ => {}
            }
        }
        if !paths.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(paths.len())
    }

    /// Like [`remove_detached`](Self::remove_detached), but keeps up to two of the files
    /// to be zeroed and reused as the next log files ([`Spare`]): renamed out of the log at
    /// once, their blocks never freed. Deleting a log file of tens of megabytes held the
    /// log's syncs (and so acknowledgements) 15-110 ms on this project's test machines
    /// (ext4 mounted with `discard`: the journal commit that frees the blocks discards them).
    /// Returns the number of files taken off the disk's log.
    pub fn retire(&self, paths: &[PathBuf]) -> Result<usize, WalError> {
        let mut delete = Vec::new();
        for path in paths {
            let kept = self.spare.thread.is_some() && {
                let (lock, cv) = &*self.spare.slot;
                let mut st = lock.lock();
                st.pool.len() < SPARE_POOL && {
                    static RETIRED: AtomicU64 = AtomicU64::new(0);
                    let n = RETIRED.fetch_add(1, Ordering::Relaxed);
                    let name = format!("wal-spare-{}-r{n}.tmp", std::process::id());
                    let to = self.dir.join(name);
                    match fs::rename(path, &to) {
                        Ok(()) => {
                            st.pool.push(to);
                            cv.notify_one();
                            true
                        }
                        Err(e) if e.kind() == io::ErrorKind::NotFound => true,
                        Err(_) => false,
                    }
                }
            };
            if !kept {
                delete.push(path.clone());
            }
        }
        self.remove_detached(&delete)?;
        Ok(paths.len())
    }

    /// Tells the log how many bytes a file will likely hold before it is rotated (the size
    /// of the first spare file, before one has been closed; see [`Spare`]).
    pub fn expect_file_bytes(&self, bytes: u64) {
        self.expected_file_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Total bytes of frames in the log files (the current file also holds up to
    /// [`PREALLOC_BYTES`] of zeros written ahead).
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes.load(Ordering::Relaxed)
    }

    /// Frames written (each one `sync_data`) since open; fewer than records under group commit.
    pub fn frames_written(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }

    /// Test hook: the next frame write stops half-way and fails.
    #[cfg(test)]
    fn fail_next_write(&self) {
        self.fail_next_write.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn open(dir: &Path, after_seq: u64) -> (Wal, Replayed) {
        Wal::open(dir, after_seq).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()))
    }

    fn names(dir: &Path) -> Vec<String> {
        let files = list_files(dir).unwrap();
        files.iter().map(|(_, p)| p.file_name().unwrap().to_string_lossy().into_owned()).collect()
    }

    /// Bytes of valid frames in the log files (not the zeros written ahead).
    fn on_disk(dir: &Path) -> u64 {
        let used = |first: u64, p: &PathBuf| {
            let scan = scan_frames(&fs::read(p).unwrap(), first);
            scan.records.last().map_or(0, |(_, r)| r.end as u64)
        };
        list_files(dir).unwrap().iter().map(|(first, p)| used(*first, p)).sum()
    }

    fn recs(list: &[(u64, &str)]) -> Vec<(u64, Vec<u8>)> {
        list.iter().map(|(s, p)| (*s, p.as_bytes().to_vec())).collect()
    }

    #[test]
    fn round_trip_across_reopen_and_after_seq_skips() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("wal");
        let (wal, rep) = open(&dir, 0);
        assert_eq!((rep.records.len(), rep.files, wal.last_seq()), (0, 0, 0));
        assert_eq!(wal.append(b"a").unwrap(), 1);
        assert_eq!(wal.append(b"").unwrap(), 2);
        assert_eq!(wal.append_batch(&[b"c", b"dd", b"eee"]).unwrap(), 3);
        assert_eq!((wal.last_seq(), wal.frames_written(), wal.disk_bytes()), (5, 3, on_disk(&dir)));
        drop(wal);
        let (wal, rep) = open(&dir, 0);
        assert_eq!(rep.records, recs(&[(1, "a"), (2, ""), (3, "c"), (4, "dd"), (5, "eee")]));
        assert_eq!((rep.dropped_tail_bytes, rep.files, wal.last_seq()), (0, 1, 5));
        assert_eq!(wal.append(b"f").unwrap(), 6);
        drop(wal);
        assert_eq!(open(&dir, 4).1.records, recs(&[(5, "eee"), (6, "f")]));
        // A checkpoint beyond the log: seqs continue after it (in a new file).
        let (wal, rep) = open(&dir, 20);
        assert_eq!((rep.records.len(), wal.last_seq()), (0, 20));
        assert_eq!(wal.append(b"g").unwrap(), 21);
        drop(wal);
        let rep = open(&dir, 20).1;
        assert_eq!((rep.records, rep.files), (recs(&[(21, "g")]), 2));
        // Replaying from before that gap would silently lose 7..=20.
        let err = Wal::open(&dir, 0).unwrap_err();
        assert!(matches!(err, WalError::SeqDiscontinuity { expected_seq: 7, found_seq: 21, .. }), "{err}");
    }

    #[test]
    fn rotate_and_remove_through_drop_only_covered_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (wal, _) = open(dir, 0);
        assert_eq!(wal.rotate().unwrap(), 0);
        for p in ["r1", "r2", "r3"] {
            wal.append(p.as_bytes()).unwrap();
        }
        assert_eq!(wal.rotate().unwrap(), 3);
        assert_eq!(wal.rotate().unwrap(), 3, "no file open: nothing to close");
        wal.append_batch(&[b"r4", b"r5", b"r6"]).unwrap();
        assert_eq!(wal.rotate().unwrap(), 6);
        wal.append(b"r7").unwrap();
        wal.append(b"r8").unwrap();
        assert_eq!(names(dir), [file_name(1), file_name(4), file_name(7)]);
        assert_eq!(wal.remove_through(2).unwrap(), 0);
        assert_eq!(wal.remove_through(5).unwrap(), 1);
        assert_eq!(wal.disk_bytes(), on_disk(dir));
        assert_eq!(wal.remove_through(100).unwrap(), 1, "the current file is never removed");
        assert_eq!((names(dir), wal.disk_bytes()), (vec![file_name(7)], on_disk(dir)));
        drop(wal);
        let (wal, rep) = open(dir, 6);
        assert_eq!(rep.records, recs(&[(7, "r7"), (8, "r8")]));
        assert_eq!(wal.append(b"r9").unwrap(), 9);
        assert_eq!(wal.rotate().unwrap(), 9);
        assert_eq!(wal.remove_through(9).unwrap(), 1);
        assert_eq!((names(dir).len(), wal.disk_bytes()), (0, 0));
        assert_eq!(wal.append(b"r10").unwrap(), 10);
        drop(wal);
        assert_eq!(open(dir, 9).1.records, recs(&[(10, "r10")]));
        let err = Wal::open(dir, 0).unwrap_err();
        assert!(matches!(err, WalError::SeqDiscontinuity { expected_seq: 1, found_seq: 10, .. }), "{err}");
    }

    #[test]
    fn torn_tail_at_every_offset_is_dropped() {
        let src = tempfile::tempdir().unwrap();
        let (wal, _) = open(src.path(), 0);
        wal.append(b"one").unwrap();
        let one_end = wal.disk_bytes() as usize;
        wal.append(b"two").unwrap();
        let start = wal.disk_bytes() as usize;
        wal.append_batch(&[b"three", b"four", b"five"]).unwrap();
        let end = wal.disk_bytes() as usize;
        drop(wal);
        let full = fs::read(src.path().join(file_name(1))).unwrap();
        assert!(full.len() >= end + PREALLOC_BYTES as usize / 2 && full[end..].iter().all(|&b| b == 0));
        let full = &full[..end];
        for cut in start..full.len() {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join(file_name(1));
            fs::write(&path, &full[..cut]).unwrap();
            let (wal, rep) = open(tmp.path(), 0);
            assert_eq!(rep.records, recs(&[(1, "one"), (2, "two")]), "cut at {cut}");
            let written = full[start..cut].iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            assert_eq!(rep.dropped_tail_bytes, written as u64, "cut at {cut}");
            assert_eq!(fs::metadata(&path).unwrap().len(), start as u64);
            assert_eq!(wal.append(b"new").unwrap(), 3);
            drop(wal);
            let rep = open(tmp.path(), 0).1;
            assert_eq!(rep.records, recs(&[(1, "one"), (2, "two"), (3, "new")]), "cut at {cut}");
            assert_eq!(rep.dropped_tail_bytes, 0);
        }
        // A torn first frame leaves an empty file, which is removed; seqs restart after it.
        let tmp = tempfile::tempdir().unwrap();
        fs::write(tmp.path().join(file_name(1)), &full[..one_end - 1]).unwrap();
        let (wal, rep) = open(tmp.path(), 0);
        assert_eq!((rep.records.len(), rep.dropped_tail_bytes), (0, one_end as u64 - 1));
        assert_eq!((names(tmp.path()).len(), wal.disk_bytes()), (0, 0));
        assert_eq!(wal.append(b"x").unwrap(), 1);
    }

    /// Found by the `wal_open` fuzz target (fuzz/regressions/wal_open/): a checkpoint near
    /// `u64::MAX` overflowed the next seq (a panic in debug builds; in release, appends at seq 0
    /// that the next open ignored). Now the seq range ends at MAX_SEQ, and the log fills up.
    #[test]
    fn seqs_end_at_max_seq_and_a_full_log_refuses_appends() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        fs::write(dir.join(file_name(u64::MAX)), [0xef, 0xef]).unwrap();
        for after_seq in [MAX_SEQ + 1, u64::MAX] {
            let err = Wal::open(dir, after_seq).unwrap_err();
            assert!(matches!(err, WalError::CheckpointOutOfRange { .. }), "{err}");
        }
        // A file named beyond MAX_SEQ is not a log file; the last seqs work, then the log is full.
        let (wal, rep) = open(dir, MAX_SEQ - 2);
        assert_eq!((rep.files, wal.last_seq()), (0, MAX_SEQ - 2));
        assert_eq!(wal.append_batch(&[b"a", b"b"]).unwrap(), MAX_SEQ - 1);
        let err = wal.append(b"c").unwrap_err();
        assert!(matches!(err, WalError::Full { first_seq, .. } if first_seq == MAX_SEQ + 1), "{err}");
        assert!(matches!(wal.append(b"d").unwrap_err(), WalError::Poisoned { .. }));
        drop(wal);
        let (wal, rep) = open(dir, MAX_SEQ - 2);
        assert_eq!(rep.records, recs(&[(MAX_SEQ - 1, "a"), (MAX_SEQ, "b")]));
        assert!(matches!(wal.append(b"c").unwrap_err(), WalError::Full { .. }));
        drop(wal);
        assert!(open(dir, MAX_SEQ).1.records.is_empty());
    }

    #[test]
    fn garbage_after_the_last_frame_is_a_torn_tail() {
        let noise: Vec<u8> = (0..300u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&[7; 40]);
        for garbage in [vec![0; 100], noise, huge, MAGIC.to_vec(), vec![0xff]] {
            let tmp = tempfile::tempdir().unwrap();
            let (wal, _) = open(tmp.path(), 0);
            wal.append_batch(&[b"a", b"b"]).unwrap();
            let end = wal.disk_bytes() as usize;
            drop(wal);
            let path = tmp.path().join(file_name(1));
            let frame = fs::read(&path).unwrap()[..end].to_vec();
            fs::write(&path, [&frame[..], &garbage].concat()).unwrap();
            let (wal, rep) = open(tmp.path(), 0);
            assert_eq!(rep.records, recs(&[(1, "a"), (2, "b")]));
            let written = garbage.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
            assert_eq!(rep.dropped_tail_bytes, written as u64, "zeros after the frames were written ahead");
            assert_eq!(wal.append(b"c").unwrap(), 3);
            drop(wal);
            assert_eq!(open(tmp.path(), 0).1.records.len(), 3);
            // A crc-valid frame whose seq does not continue cannot come from a crash: error.
            fs::write(&path, [fs::read(&path).unwrap(), frame].concat()).unwrap();
            let err = Wal::open(tmp.path(), 0).unwrap_err();
            assert!(matches!(err, WalError::SeqMismatch { expected_seq: 4, found_seq: 1, .. }), "{err}");
        }
    }

    #[test]
    fn flipped_byte_is_corruption_unless_in_the_last_frame() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = open(tmp.path(), 0);
        let mut ends = Vec::new();
        for p in ["alpha", "beta", "gamma"] {
            wal.append(p.as_bytes()).unwrap();
            ends.push(wal.disk_bytes() as usize);
        }
        drop(wal);
        let path = tmp.path().join(file_name(1));
        let full = fs::read(&path).unwrap();
        for i in ends[0]..ends[2] {
            let mut data = full.clone();
            data[i] ^= 0x40;
            fs::write(&path, &data).unwrap();
            // `check` (vitrine verify) sees what a start would, and changes nothing.
            let checked = Wal::check(tmp.path(), 0);
            assert_eq!(fs::read(&path).unwrap(), data, "check wrote to the log");
            if i < ends[1] {
                let err = checked.unwrap_err();
                assert!(matches!(err, WalError::CorruptMiddle { expected_seq: 2, .. }), "flip at {i}: {err}");
                let err = Wal::open(tmp.path(), 0).unwrap_err();
                let WalError::CorruptMiddle { offset, expected_seq: 2, next_seq: 3, .. } = err else {
                    panic!("flip at {i}: {err}")
                };
                assert_eq!(offset, ends[0] as u64, "flip at {i}");
                assert!(err.to_string().contains(&format!("byte {}", ends[0])), "{err}");
            } else {
                let seen = checked.unwrap();
                assert_eq!(seen.records, recs(&[(1, "alpha"), (2, "beta")]), "flip at {i}");
                assert_eq!(seen.dropped_tail_bytes, (ends[2] - ends[1]) as u64);
                let rep = open(tmp.path(), 0).1;
                assert_eq!(rep.records, recs(&[(1, "alpha"), (2, "beta")]), "flip at {i}");
                assert_eq!(rep.dropped_tail_bytes, (ends[2] - ends[1]) as u64);
            }
        }
    }

    /// The current file holds zeros written ahead of its frames (so a frame's sync does not
    /// change the file's size); a reopen reads them as the end of the log, not a torn frame;
    /// a rotation cuts them, and zeros at the end of a file that is not the last are damage.
    #[test]
    fn zeros_written_ahead_end_the_last_file_only() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (wal, _) = open(dir, 0);
        wal.append_batch(&[b"a", b"b"]).unwrap();
        let end = wal.disk_bytes();
        let first = dir.join(file_name(1));
        let len = fs::metadata(&first).unwrap().len();
        assert!(
            len >= end + PREALLOC_BYTES / 2 && len.is_multiple_of(PREALLOC_BYTES),
            "{len} for {end} bytes of frames"
        );
        // Frames past the first extension extend it again, in whole steps.
        let big = vec![7u8; PREALLOC_BYTES as usize];
        wal.append(&big).unwrap();
        let grown = fs::metadata(&first).unwrap().len();
        assert!(grown > wal.disk_bytes() && grown.is_multiple_of(PREALLOC_BYTES), "{grown}");
        drop(wal);
        let (wal, rep) = open(dir, 0);
        assert_eq!((rep.records.len(), rep.dropped_tail_bytes), (3, 0));
        assert_eq!(fs::metadata(&first).unwrap().len(), wal.disk_bytes(), "the zeros are cut at open");
        wal.append(b"c").unwrap();
        let frames = wal.disk_bytes();
        wal.rotate().unwrap();
        assert!(fs::metadata(&first).unwrap().len() > frames, "a rotation keeps the zeros");
        wal.append(b"d").unwrap();
        drop(wal);
        // The closed file's zeros end it: every record comes back, nothing counts as dropped.
        let (wal, rep) = open(dir, 0);
        assert_eq!((rep.records.len(), rep.dropped_tail_bytes), (5, 0));
        assert_eq!(wal.disk_bytes(), frames + fs::metadata(dir.join(file_name(5))).unwrap().len());
        drop(wal);
        // Non-zero bytes after the zeros of a closed file are damage.
        let mut padded = fs::read(&first).unwrap();
        let n = padded.len();
        padded[n - 1] = 1;
        fs::write(&first, &padded).unwrap();
        let err = Wal::open(dir, 0).unwrap_err();
        assert!(matches!(err, WalError::CorruptNotLast { expected_seq: 5, .. }), "{err}");
    }

    fn spare_files(dir: &Path) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_str().is_some_and(is_spare_name))
            .map(|e| e.path())
            .collect();
        out.sort();
        out
    }

    /// Waits (up to 20 s) until the spare thread has a file ready.
    fn spare_ready(wal: &Wal) -> bool {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < until {
            if wal.spare.is_ready() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        false
    }

    #[test]
    fn a_busy_log_moves_to_spare_files_and_reuses_retired_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (wal, _) = open(dir, 0);
        wal.expect_file_bytes(12 * PREALLOC_BYTES);
        let rec = vec![5u8; 256 << 10];
        // Past SPARE_AFTER_BYTES of frames a spare is prepared: zeros, outside the log.
        let mut seq = 0;
        while wal.disk_bytes() < SPARE_AFTER_BYTES {
            seq = wal.append(&rec).unwrap();
        }
        assert!(spare_ready(&wal), "no spare prepared");
        let spare = spare_files(dir);
        assert_eq!(spare.len(), 1, "{spare:?}");
        let spare_len = fs::metadata(&spare[0]).unwrap().len();
        assert_eq!(spare_len, 12 * PREALLOC_BYTES, "as large as the writer expects a file to get");
        assert!(fs::read(&spare[0]).unwrap().iter().all(|&b| b == 0));
        assert_eq!(names(dir), [file_name(1)], "a spare is not part of the log");
        // The first frame that would grow the file goes to the spare instead, renamed into the
        // log as the next file, already as long as it will get for a while.
        while names(dir).len() == 1 {
            seq = wal.append(&rec).unwrap();
        }
        assert_eq!(names(dir), [file_name(1), file_name(seq)]);
        assert!(spare_files(dir).is_empty());
        assert_eq!(fs::metadata(dir.join(file_name(seq))).unwrap().len(), spare_len);
        let second_first = seq;
        for _ in 0..3 {
            seq = wal.append(&rec).unwrap();
        }
        assert_eq!(fs::metadata(dir.join(file_name(second_first))).unwrap().len(), spare_len, "not grown");
        // A retired file leaves the log at once and is kept to be zeroed for the next spare.
        assert_eq!(wal.rotate().unwrap(), seq);
        let retired = wal.detach_through(second_first - 1);
        assert_eq!(retired, [dir.join(file_name(1))]);
        assert_eq!(wal.retire(&retired).unwrap(), 1);
        assert_eq!(names(dir), [file_name(second_first)]);
        assert_eq!(spare_files(dir).len(), 1, "kept as a spare");
        while wal.disk_bytes() < fs::metadata(dir.join(file_name(second_first))).unwrap().len() {
            seq = wal.append(&rec).unwrap();
        }
        assert!(spare_ready(&wal));
        let reused = spare_files(dir);
        assert_eq!(reused.len(), 1, "{reused:?}");
        assert!(fs::read(&reused[0]).unwrap().iter().all(|&b| b == 0), "a reused file is zeroed first");
        drop(wal);
        // Every record after the checkpoint comes back; spares are not the log's and are gone.
        let (wal, rep) = open(dir, second_first - 1);
        assert_eq!(rep.records.len() as u64, seq - second_first + 1);
        assert!(rep.records.iter().all(|(_, r)| *r == rec));
        assert!(spare_files(dir).is_empty());
        assert_eq!(wal.append(b"next").unwrap(), seq + 1);
    }

    #[test]
    fn small_expected_files_ask_for_spares_sooner() {
        assert_eq!(spare_after(0), SPARE_AFTER_BYTES);
        assert_eq!(spare_after(64 << 20), SPARE_AFTER_BYTES);
        assert_eq!(spare_after(1 << 20), 256 << 10);
        assert_eq!(spare_after(1000), 64 << 10);
    }

    #[test]
    fn spare_files_left_by_a_crash_are_deleted_not_replayed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (wal, _) = open(dir, 0);
        wal.append_batch(&[b"a", b"b"]).unwrap();
        wal.rotate().unwrap();
        wal.append(b"c").unwrap();
        drop(wal);
        // A retired file renamed to a spare but not yet zeroed (its frames are valid), and a
        // half-zeroed one: neither is read.
        fs::copy(dir.join(file_name(1)), dir.join("wal-spare-1-r0-0.tmp")).unwrap();
        fs::write(dir.join("wal-spare-1-3.tmp"), [0u8, 0, 7, 7]).unwrap();
        let (wal, rep) = open(dir, 0);
        assert_eq!(rep.records, recs(&[(1, "a"), (2, "b"), (3, "c")]));
        assert!(spare_files(dir).is_empty());
        drop(wal);
        assert_eq!(open(dir, 2).1.records, recs(&[(3, "c")]));
    }

    /// A closed file's zero tail ends it only where the next file continues its seqs: frames
    /// lost from its end (zeros where synced frames were) leave a gap, reported.
    #[test]
    fn frames_lost_before_a_closed_files_zeros_are_a_gap() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (wal, _) = open(dir, 0);
        wal.append(b"a").unwrap();
        let one = wal.disk_bytes() as usize;
        wal.append(b"b").unwrap();
        wal.rotate().unwrap();
        wal.append(b"c").unwrap();
        drop(wal);
        let first = dir.join(file_name(1));
        let mut data = fs::read(&first).unwrap();
        let end = data.iter().rposition(|&b| b != 0).unwrap() + 1;
        data[one..end].fill(0);
        fs::write(&first, &data).unwrap();
        let err = Wal::open(dir, 0).unwrap_err();
        assert!(matches!(err, WalError::SeqDiscontinuity { expected_seq: 2, found_seq: 3, .. }), "{err}");
        // The same loss is no gap where a checkpoint covers it.
        let (_, rep) = open(dir, 2);
        assert_eq!(rep.records.len(), 1);
    }

    #[test]
    fn bad_frame_in_a_non_last_file_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let (wal, _) = open(dir, 0);
        wal.append(b"a").unwrap();
        let second = wal.disk_bytes();
        wal.append(b"b").unwrap();
        wal.rotate().unwrap();
        wal.append(b"c").unwrap();
        drop(wal);
        let first = dir.join(file_name(1));
        let full = fs::read(&first).unwrap();
        let mut flipped = full.clone();
        flipped[second as usize + 5] ^= 1;
        for damaged in [flipped, full[..second as usize + 3].to_vec()] {
            fs::write(&first, &damaged).unwrap();
            let err = Wal::open(dir, 0).unwrap_err();
            let WalError::CorruptNotLast { offset, expected_seq: 2, next_file, .. } = err else {
                panic!("{err}")
            };
            assert_eq!((offset, next_file), (second, dir.join(file_name(3))));
            // A checkpoint covering the damaged file means it is not needed (nor read).
            assert_eq!(open(dir, 2).1.records, recs(&[(3, "c")]));
        }
        fs::write(&first, &full).unwrap();
        fs::rename(dir.join(file_name(3)), dir.join(file_name(4))).unwrap();
        let err = Wal::open(dir, 0).unwrap_err();
        assert!(matches!(err, WalError::SeqDiscontinuity { expected_seq: 3, found_seq: 4, .. }), "{err}");
    }

    #[test]
    fn failed_write_poisons_and_bad_appends_are_rejected() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = open(tmp.path(), 0);
        let big = vec![0u8; MAX_RECORD_BYTES + 1];
        assert!(matches!(wal.append(&big), Err(WalError::RecordTooLarge { index: 0, .. })));
        let parts = vec![&big[..MAX_RECORD_BYTES]; 3];
        assert!(matches!(wal.append_batch(&parts), Err(WalError::BatchTooLarge { records: 3, .. })));
        assert!(matches!(wal.append_batch(&[]), Err(WalError::EmptyBatch)));
        wal.append(b"ok").unwrap();
        wal.fail_next_write();
        assert!(matches!(wal.append(b"lost"), Err(WalError::Write { first_seq: 2, last_seq: 2, .. })));
        assert_eq!(wal.last_seq(), 1);
        assert!(matches!(wal.append(b"later"), Err(WalError::Poisoned { first_seq: 2, .. })));
        assert!(matches!(wal.rotate(), Err(WalError::Poisoned { .. })));
        drop(wal);
        let (wal, rep) = open(tmp.path(), 0);
        // Half of the 32-byte frame reached the file: "VWAL", body length 8, seq 2 (then
        // zeros): its last non-zero byte is the 9th.
        assert_eq!((rep.records, rep.dropped_tail_bytes), (recs(&[(1, "ok")]), 9));
        assert_eq!(wal.append(b"again").unwrap(), 2);
    }

    #[test]
    fn concurrent_appends_share_fsyncs_and_replay_exactly_once() {
        let tmp = tempfile::tempdir().unwrap();
        let wal = Arc::new(open(tmp.path(), 0).0);
        let spawn = |t: usize| {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || {
                if t == 8 {
                    for _ in 0..5 {
                        wal.rotate().unwrap();
                        std::thread::sleep(std::time::Duration::from_millis(3));
                    }
                }
                let ps = (0..if t == 8 { 0 } else { 200 }).map(|i| format!("t{t}-{i}"));
                ps.map(|p| (wal.append(p.as_bytes()).unwrap(), p)).collect::<Vec<_>>()
            })
        };
        let threads: Vec<_> = (0..9).map(spawn).collect();
        let mut got = BTreeMap::new();
        for mine in threads.into_iter().map(|t| t.join().unwrap()) {
            assert!(mine.windows(2).all(|w| w[0].0 < w[1].0), "one thread's seqs go up");
            for (seq, p) in mine {
                assert!(got.insert(seq, p).is_none(), "seq {seq} handed out twice");
            }
        }
        assert_eq!(got.keys().copied().collect::<Vec<_>>(), (1..=1600).collect::<Vec<u64>>());
        let frames = wal.frames_written();
        assert!(frames < 1600, "no group commit: {frames} frames for 1600 records");
        assert_eq!((wal.last_seq(), wal.disk_bytes()), (1600, on_disk(tmp.path())));
        drop(wal);
        let replayed = open(tmp.path(), 0).1.records;
        let want: Vec<_> = got.into_iter().map(|(s, p)| (s, p.into_bytes())).collect();
        assert_eq!(replayed, want);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(Vec<Vec<u8>>),
        Rotate,
        Remove(u8),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        let payload = proptest::collection::vec(any::<u8>(), 0..12);
        prop_oneof![
            5 => proptest::collection::vec(payload, 1..4).prop_map(Op::Append),
            1 => Just(Op::Rotate),
            1 => any::<u8>().prop_map(Op::Remove),
            1 => Just(Op::Reopen),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]
        #[test]
        fn behaves_like_a_model(ops in proptest::collection::vec(op(), 1..24)) {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path();
            let mut wal = open(dir, 0).0;
            let mut records: Vec<(u64, Vec<u8>)> = Vec::new();
            let mut files: Vec<(u64, u64)> = Vec::new(); // (first seq, last seq)
            let (mut current, mut ckpt) = (false, 0u64);
            for op in ops {
                let last = records.last().map_or(0, |r| r.0);
                match op {
                    Op::Append(batch) => {
                        let first = match &batch[..] {
                            [one] => wal.append(one).unwrap(),
                            _ => wal.append_batch(&batch.iter().map(|p| &p[..]).collect::<Vec<_>>()).unwrap(),
                        };
                        prop_assert_eq!(first, last + 1);
                        let end = last + batch.len() as u64;
                        records.extend((first..).zip(batch));
                        match files.last_mut() {
                            Some(f) if current => f.1 = end,
                            _ => files.push((first, end)),
                        }
                        current = true;
                    }
                    Op::Rotate => {
                        prop_assert_eq!(wal.rotate().unwrap(), last);
                        current = false;
                    }
                    Op::Remove(frac) => {
                        let seq = last * u64::from(frac) / 255;
                        let closed = files.len() - usize::from(current);
                        let n = files[..closed].iter().take_while(|f| f.1 <= seq).count();
                        prop_assert_eq!(wal.remove_through(seq).unwrap(), n);
                        files.drain(..n);
                        ckpt = ckpt.max(seq);
                    }
                    Op::Reopen => {
                        drop(wal);
                        let rep;
                        (wal, rep) = open(dir, ckpt);
                        let expected: Vec<_> = records.iter().filter(|r| r.0 > ckpt).cloned().collect();
                        prop_assert_eq!(rep.records, expected);
                        let got = (rep.files, rep.dropped_tail_bytes, wal.last_seq());
                        prop_assert_eq!(got, (files.len(), 0, last));
                        current = !files.is_empty();
                    }
                }
                prop_assert_eq!(names(dir).len(), files.len());
                prop_assert_eq!(wal.disk_bytes(), on_disk(dir));
            }
        }
    }
}
