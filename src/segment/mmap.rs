//! The one place in vitrine that memory-maps a file (the only `unsafe` in the crate).
#![allow(unsafe_code)]

use std::fs::File;
use std::io;

use memmap2::Mmap;

/// Maps a published segment file read-only.
///
/// Only for segment files: vitrine writes a segment once, under a temporary name, fsyncs it
/// and renames it into place ([`crate::fsutil::atomic_write_with`]); after that nothing in
/// vitrine opens the file for writing, truncates it or renames another file over it while it
/// may be mapped (segments are never rewritten: a new segment gets a new file name, and
/// obsolete ones are unlinked, which leaves existing mappings valid).
pub(super) fn map_segment(file: &File) -> io::Result<Mmap> {
    // SAFETY: `Mmap::map` is unsafe because the mapped bytes could change (or vanish, on
    // truncation) under the returned `&[u8]` if another process or thread modified the file.
    // The file is a published segment, immutable by vitrine's contract described above, so the
    // slice stays valid and unchanged for the lifetime of the `Mmap`. An outside actor editing
    // files inside the data directory breaks this promise; nothing here can prevent that.
    unsafe { Mmap::map(file) }
}
