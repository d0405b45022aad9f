//! Deleted positions of a sealed segment: an in-memory atomic bitset that searches read
//! lock-free while the writer sets bits, and its crash-safe file `seg-N.del-G`.
//!
//! A segment is immutable, so its deletions live beside it. Each checkpoint that changed a
//! segment's deletions writes a new file with a higher generation `G` (temp file, fsync,
//! rename, fsync dir) and the manifest names it; older generations become orphans that the
//! next writer start removes. Bits are only ever set, never cleared: an item that is deleted
//! or superseded stays dead, and a re-added SKU is a new item elsewhere.
//!
//! ```text
//! offset  size
//! 0       8     magic "VTRNDEL\0"
//! 8       4     format version u32 (1)
//! 12      4     reserved (0)
//! 16      8     n: positions covered (= segment item count) u64
//! 24      8     set bits u64
//! 32      8*w   bitmap words u64, w = ceil(n / 64); bit i of word j is position 64*j + i
//! 32+8w   4     crc32 of every byte before it
//! ```
//! All integers little-endian.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::fsutil;

const MAGIC: [u8; 8] = *b"VTRNDEL\0";
const VERSION: u32 = 1;
const HEADER: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum DeletesError {
    #[error("cannot read deletion file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write deletion file {path}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("deletion file {path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: &'static str },
    #[error("deletion file {path} covers {found} positions; its segment has {expected}")]
    WrongLength { path: PathBuf, expected: u64, found: u64 },
}

/// A fixed-size set of deleted positions; `set` and `contains` are lock-free.
#[derive(Debug)]
pub struct DeleteSet {
    n: usize,
    words: Box<[AtomicU64]>,
    count: AtomicU64,
}

impl DeleteSet {
    /// An empty set over `n` positions.
    pub fn new(n: usize) -> Self {
        let words = (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        Self { n, words, count: AtomicU64::new(0) }
    }

    /// Marks `idx` deleted; true if it was live. Out-of-range positions are ignored.
    pub fn set(&self, idx: u32) -> bool {
        let i = idx as usize;
        if i >= self.n {
            return false;
        }
        let bit = 1u64 << (i % 64);
        let old = self.words[i / 64].fetch_or(bit, Ordering::AcqRel);
        let fresh = old & bit == 0;
        if fresh {
            self.count.fetch_add(1, Ordering::AcqRel);
        }
        fresh
    }

    #[inline]
    pub fn contains(&self, idx: u32) -> bool {
        let i = idx as usize;
        i < self.n && self.words[i / 64].load(Ordering::Acquire) & (1u64 << (i % 64)) != 0
    }

    /// Deleted positions.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// The file name for segment file `segment_file` at generation `generation`.
    pub fn file_name(segment_file: &str, generation: u64) -> String {
        format!("{segment_file}.del-{generation}")
    }

    /// Writes the current bits crash-safely to `path`; returns the number of set bits written.
    pub fn store(&self, path: &Path) -> Result<u64, DeletesError> {
        let words: Vec<u64> = self.words.iter().map(|w| w.load(Ordering::Acquire)).collect();
        let count: u64 = words.iter().map(|w| u64::from(w.count_ones())).sum();
        let mut bytes = Vec::with_capacity(HEADER + words.len() * 8 + 4);
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&(self.n as u64).to_le_bytes());
        bytes.extend_from_slice(&count.to_le_bytes());
        for w in &words {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        fsutil::atomic_write(path, &bytes)
            .map_err(|source| DeletesError::Write { path: path.to_path_buf(), source })?;
        Ok(count)
    }

    /// Reads a deletion file written for a segment of `n` items.
    pub fn load(path: &Path, n: usize) -> Result<Self, DeletesError> {
        let bytes =
            std::fs::read(path).map_err(|source| DeletesError::Read { path: path.to_path_buf(), source })?;
        let damaged = |reason| DeletesError::Damaged { path: path.to_path_buf(), reason };
        if bytes.len() < HEADER + 4 {
            return Err(damaged("shorter than its header"));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err(damaged("checksum mismatch"));
        }
        if body[..8] != MAGIC {
            return Err(damaged("bad magic"));
        }
        let u32_at = |o: usize| u32::from_le_bytes(body[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(body[o..o + 8].try_into().expect("8 bytes"));
        if u32_at(8) != VERSION {
            return Err(damaged("unknown format version"));
        }
        let found = u64_at(16);
        if found != n as u64 {
            return Err(DeletesError::WrongLength { path: path.to_path_buf(), expected: n as u64, found });
        }
        let w = n.div_ceil(64);
        if body.len() != HEADER + w * 8 {
            return Err(damaged("length does not match its position count"));
        }
        let set = Self::new(n);
        let mut count = 0u64;
        for (j, slot) in set.words.iter().enumerate() {
            let mut word = u64_at(HEADER + j * 8);
            if j + 1 == w && !n.is_multiple_of(64) {
                word &= (1u64 << (n % 64)) - 1;
            }
            count += u64::from(word.count_ones());
            slot.store(word, Ordering::Relaxed);
        }
        if count != u64_at(24) {
            return Err(damaged("bit count does not match its header"));
        }
        set.count.store(count, Ordering::Release);
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_contains_count_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for n in [1usize, 63, 64, 65, 1000] {
            let s = DeleteSet::new(n);
            assert!(s.set(0));
            assert!(!s.set(0));
            assert!(s.set((n - 1) as u32) || n == 1);
            assert!(!s.set(n as u32), "out of range is ignored");
            let p = dir.path().join(format!("x-{n}"));
            let written = s.store(&p).unwrap();
            assert_eq!(written, s.count());
            let back = DeleteSet::load(&p, n).unwrap();
            assert_eq!(back.count(), s.count());
            for i in 0..n as u32 {
                assert_eq!(back.contains(i), s.contains(i), "n {n} i {i}");
            }
            assert!(matches!(DeleteSet::load(&p, n + 1), Err(DeletesError::WrongLength { .. })));
        }
    }

    #[test]
    fn damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let s = DeleteSet::new(300);
        s.set(7);
        s.store(&p).unwrap();
        let good = std::fs::read(&p).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            std::fs::write(&p, &bad).unwrap();
            assert!(DeleteSet::load(&p, 300).is_err(), "flip at {i} not caught");
        }
        std::fs::write(&p, &good[..good.len() - 1]).unwrap();
        assert!(DeleteSet::load(&p, 300).is_err());
    }
}
