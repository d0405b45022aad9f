//! Immutable, memory-mapped HNSW segment files: format, writer, reader and search.
//!
//! A segment holds one batch of items (L2-normalised vectors + SKUs) for one model version,
//! with an HNSW graph built by vitrine's own builder (`build`; hnsw_rs is the reference it is
//! tested against) and stored as flat arrays (see [`format`](mod@format) for the byte
//! layout). [`write_segment`] builds and writes one crash-safely; [`Segment::open`] maps it in
//! O(1) without reading the body; [`Segment::search`] runs HNSW straight on the mapping;
//! [`Segment::verify`] checks every checksum and the graph's structure.

mod build;
pub mod calibrate;
mod distance;
mod error;
pub mod format;
mod heap;
mod mmap;
mod reader;
mod search;
mod sketch;
pub mod synth;
mod writer;

pub(crate) use distance::WideDot;
pub use distance::{dot, dot_wide, normalise_into, quantise_query, quantise_row};
pub use error::SegmentError;
pub use reader::Segment;
pub use search::{
    EXACT_SCAN_FACTOR, FLAT_SCAN_FACTOR, Hit, SKETCH_MAX_ITEMS, SKETCH_MIN_DIM, SKETCH_MIN_ITEMS, SearchPlan,
};
pub use writer::{
    GraphLayout, write_flat_segment, write_segment, write_segment_extending, write_segment_hnsw_rs,
    write_segment_with_graph,
};

/// Layer-0 candidate list size used when the caller has no preference. Chosen so that
/// recall@10 against brute force is at least 0.95 on structured data (see tests/suite/segment.rs).
pub const DEFAULT_EF_SEARCH: usize = 64;

/// HNSW build parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HnswParams {
    /// Neighbours per node on the upper layers (layer 0 keeps `2*m`). 2..=256.
    pub m: usize,
    /// Candidate list size while building. 1..=100000.
    pub ef_construction: usize,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams { m: 16, ef_construction: 200 }
    }
}

/// What [`write_segment`] built.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SegmentStats {
    pub count: usize,
    pub dim: usize,
    /// Fraction of a sample of items (up to 256) that find themselves in their own top 10 by
    /// the graph walk (not a scan) at [`DEFAULT_EF_SEARCH`]; 1 for a flat segment.
    pub self_recall: f32,
    /// The `ef` a search of this segment uses when the caller leaves it to the index
    /// ([`calibrate::calibrate_ef`]).
    pub default_ef: usize,
    /// Wall time of the whole call: validation, graph build, write, verify, self-recall.
    pub build_secs: f64,
    /// File size.
    pub bytes: u64,
}
