//! The live index of a data directory: one writer, many concurrent searches.
//!
//! * [`writer::IndexWriter`] owns every change: the lock, the write-ahead log ([`wal`]), the
//!   mutable segments ([`mutable`]), sealing and merging ([`merge_policy`]), deletion files
//!   ([`deletes`]), SKU records ([`records`]) and the manifest commit ([`manifest`]).
//! * [`live::LiveSet`] is what a search reads: every model version's sealed and mutable
//!   segments, published by the writer through an `ArcSwap`.
//! * [`filter`] parses and evaluates attribute filters and keeps the inverted attribute index.

pub mod attrs;
pub mod deletes;
pub mod entry;
pub mod filter;
pub mod live;
pub mod manifest;
pub mod merge_policy;
pub mod mutable;
pub mod records;
pub mod sharded;
pub mod store;
pub mod wal;
pub mod writer;

use crate::ids::{ModelVersion, SegmentId, SkuId};
use crate::segment::SegmentError;

pub use live::{LiveSet, Query, VersionLive};
pub use writer::{IndexWriter, ModelSpec, Outcome, Upsert, WriteOp, WriterConfig, WriterError};

/// Why a search failed.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error("no index for model version {0}")]
    UnknownModel(ModelVersion),
    #[error("query vector has {found} dimensions; model {model} uses {expected}")]
    QueryDim { model: ModelVersion, expected: usize, found: usize },
    #[error("query vector is unusable: {0}")]
    BadQuery(&'static str),
    #[error("segment {id} of {model}: item {idx} has no valid SKU (run `vitrine verify`)")]
    DamagedSku { model: ModelVersion, id: SegmentId, idx: u32 },
}

/// One search answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredSku {
    pub sku: SkuId,
    pub score: f32,
}
