//! The segment module's error type: every variant names the segment file it is about.

use std::io;
use std::path::PathBuf;

/// Why a segment could not be written, opened, verified or searched.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("{}: I/O error", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: not a vitrine segment (bad {which} magic)", path.display())]
    BadMagic { path: PathBuf, which: &'static str },
    #[error("{}: segment format version {found} is not supported (this build reads {supported})", path.display())]
    UnsupportedVersion { path: PathBuf, found: u32, supported: u32 },
    #[error("{}: file is {actual} bytes, the header says {expected}: truncated or damaged", path.display())]
    Truncated { path: PathBuf, actual: u64, expected: u64 },
    #[error("{}: checksum mismatch in {section} (stored {stored:#010x}, computed {computed:#010x})", path.display())]
    Checksum { path: PathBuf, section: &'static str, stored: u32, computed: u32 },
    #[error("{}: section {section} is malformed: {reason}", path.display())]
    BadLayout { path: PathBuf, section: &'static str, reason: &'static str },
    #[error("{}: corrupt {section} at entry {index}: {reason}", path.display())]
    Corrupt { path: PathBuf, section: &'static str, index: u64, reason: &'static str },
    #[error("{}: vector has {actual} dimensions, the segment has {expected}", path.display())]
    DimMismatch { path: PathBuf, expected: usize, actual: usize },
    #[error("{}: {what} has length {actual}, expected {expected}", path.display())]
    LengthMismatch { path: PathBuf, what: &'static str, expected: usize, actual: usize },
    #[error("{}: vector {index} is unusable: {reason}", path.display())]
    InvalidVector { path: PathBuf, index: usize, reason: &'static str },
    #[error("{}: query vector is unusable: {reason}", path.display())]
    InvalidQuery { path: PathBuf, reason: &'static str },
    #[error("{}: a segment needs at least one vector", path.display())]
    Empty { path: PathBuf },
    #[error("{}: invalid parameter {name} = {value}: {reason}", path.display())]
    InvalidParams { path: PathBuf, name: &'static str, value: usize, reason: &'static str },
    #[error("{}: SKU {sku:?} appears more than once in the batch", path.display())]
    DuplicateSku { path: PathBuf, sku: String },
    #[error("{}: a segment already exists here; segments are never rewritten", path.display())]
    AlreadyExists { path: PathBuf },
    #[error("{}: HNSW build produced an inconsistent graph: {reason}", path.display())]
    GraphBuild { path: PathBuf, reason: &'static str },
}

impl SegmentError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: io::Error) -> Self {
        SegmentError::Io { path: path.into(), source }
    }

    /// The segment file the error is about.
    pub fn path(&self) -> &std::path::Path {
        match self {
            SegmentError::Io { path, .. }
            | SegmentError::BadMagic { path, .. }
            | SegmentError::UnsupportedVersion { path, .. }
            | SegmentError::Truncated { path, .. }
            | SegmentError::Checksum { path, .. }
            | SegmentError::BadLayout { path, .. }
            | SegmentError::Corrupt { path, .. }
            | SegmentError::DimMismatch { path, .. }
            | SegmentError::LengthMismatch { path, .. }
            | SegmentError::InvalidVector { path, .. }
            | SegmentError::InvalidQuery { path, .. }
            | SegmentError::Empty { path }
            | SegmentError::InvalidParams { path, .. }
            | SegmentError::DuplicateSku { path, .. }
            | SegmentError::AlreadyExists { path }
            | SegmentError::GraphBuild { path, .. } => path,
        }
    }
}
