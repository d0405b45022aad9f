//! The on-disk byte layout of a segment file: header, sections and footer.
//!
//! A segment is one immutable file holding one batch of items for one model version.
//! All integers and floats are little-endian; every section starts at a multiple of
//! [`ALIGN`] (64) bytes from the start of the file, so that once the file is memory-mapped
//! (page-aligned) each section can be cast in place to `&[f32]`, `&[u32]`, `&[u64]` or
//! `&[u8]`. Gaps between sections are zero bytes.
//!
//! ```text
//!  offset                                                             size (bytes)
//!  0        +--------------------------------------------------------+
//!           | Header (#[repr(C)], see [`Header`])                     |  256
//!           |   magic "VTRNSEG\0" | version u32 | header_len u32      |
//!           |   dim u32 | m u32 | count u64                           |
//!           |   entry_point u32 | max_level u32                       |
//!           |   ef_construction u32 | reserved u32 | file_len u64     |
//!           |   sections[10]: { offset u64, len u64 }                 |
//!           |   reserved [u64; 5] (zero)                              |
//!  256      +--------------------------------------------------------+
//!           | 0: VECTORS       f32 [count][dim], each row L2-norm 1   |  count*dim*4
//!           +-- pad to 64 -------------------------------------------+
//!           | 1: LAYER0        u32 [count][2*m] neighbour ids,        |  count*2m*4
//!           |                  unused slots = u32::MAX, packed first  |
//!           +-- pad to 64 -------------------------------------------+
//!           | 2: UPPER_OFFSETS u32 [count+1]: node i owns the upper   |  (count+1)*4
//!           |                  rows off[i] .. off[i+1] (one per layer |
//!           |                  1..=level[i]), off[count] = total rows |
//!           +-- pad to 64 -------------------------------------------+
//!           | 3: UPPER         u32 [rows][m] neighbour ids, row       |  rows*m*4
//!           |                  off[i] + (l-1) is node i's layer l;    |
//!           |                  unused slots = u32::MAX                |
//!           +-- pad to 64 -------------------------------------------+
//!           | 4: LEVELS        u8 [count] top layer of each node      |  count
//!           +-- pad to 64 -------------------------------------------+
//!           | 5: SKU_OFFSETS   u64 [count+1] byte ranges into         |  (count+1)*8
//!           |                  SKU_BYTES: sku i = bytes[o[i]..o[i+1]] |
//!           +-- pad to 64 -------------------------------------------+
//!           | 6: SKU_BYTES     UTF-8, concatenated, no separators     |  o[count]
//!           +-- pad to 64 -------------------------------------------+
//!           | 7: SKU_SORTED    u32 [count] node ids ordered by SKU    |  count*4
//!           |                  bytes (binary search for find_sku)     |
//!           +-- pad to 64 -------------------------------------------+
//!           | 8: CODES (v2)    i8 [count][dim]: round(v / scale[d]),  |  count*dim
//!           |                  the int8 copy the graph walk reads     |
//!           +-- pad to 64 -------------------------------------------+
//!           | 9: SCALES (v2)   f32 [dim] per-dimension scale          |  dim*4
//!           |                  (max |v[d]| over the segment / 127)    |
//!           +-- pad to 64 -------------------------------------------+
//!  len-64   | Footer (#[repr(C)], see [`Footer`])                     |  64
//!           |   magic "VTRNEND\0" | version u32 | header_crc u32      |
//!           |   section_crc [u32; 10] | reserved u32 (zero)           |
//!           |   footer_crc u32 (crc32 of the 60 bytes before it)      |
//!  len      +--------------------------------------------------------+
//! ```
//!
//! Version 2 added CODES and SCALES (scalar quantisation, see [`quantise`]); a version-1 file
//! is the same layout with those two sections absent (zero offset, length and crc, where v1
//! had reserved zeros), and still opens: it is searched with its f32 vectors.
//!
//! Version 3 allows `m = 0`: a *flat* segment, with no graph (LAYER0 and UPPER empty, every
//! level 0, entry point 0, max_level 0, ef_construction 0), which searches scan exactly. The
//! writer seals segments small enough to be scanned at the default ef this way and builds
//! graphs only when merging (`index::writer`). Files are written with the lowest version
//! that holds them ([`version_for`]): graph segments stay version 2, readable by the builds
//! before flat segments.
//!
//! Layer 0 has degree `2*m`, upper layers degree `m`; the graph is the HNSW graph built by
//! `build.rs` (or hnsw_rs, the reference), copied verbatim. `entry_point` is a node whose level is `max_level`.
//! Opening a file checks the header, footer, header crc and the bounds and alignment of every
//! section (O(1)); the section crcs and the graph's structure are checked by
//! [`Segment::verify`](super::Segment::verify), which the writer runs on every file it writes.

use bytemuck::{Pod, Zeroable};

#[cfg(target_endian = "big")]
compile_error!(
    "vitrine segment files are little-endian and are cast in place; big-endian hosts are not supported"
);

/// First 8 bytes of every segment file.
pub const HEADER_MAGIC: [u8; 8] = *b"VTRNSEG\0";
/// First 8 bytes of the footer (the last 64 bytes of the file).
pub const FOOTER_MAGIC: [u8; 8] = *b"VTRNEND\0";
/// The newest format version this build writes (see [`version_for`]) and reads.
pub const FORMAT_VERSION: u32 = 3;
/// The first version with flat (`m = 0`) segments.
pub const FLAT_FORMAT_VERSION: u32 = 3;
/// The oldest format version this build reads.
pub const MIN_FORMAT_VERSION: u32 = 1;
/// Every section starts at a multiple of this many bytes.
pub const ALIGN: u64 = 64;
/// `size_of::<Header>()`.
pub const HEADER_LEN: u64 = 256;
/// `size_of::<Footer>()`.
pub const FOOTER_LEN: u64 = 64;
/// Marks an unused neighbour slot.
pub const NO_NEIGHBOUR: u32 = u32::MAX;
/// Highest level a node may have (hnsw_rs builds at most 16 layers: 0..=15).
pub const MAX_LEVEL: u32 = 15;
/// Largest `m` accepted (hnsw_rs exits the process above 256).
pub const MAX_M: usize = 256;

/// The sections of a segment file, in file order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SectionId {
    Vectors = 0,
    Layer0 = 1,
    UpperOffsets = 2,
    Upper = 3,
    Levels = 4,
    SkuOffsets = 5,
    SkuBytes = 6,
    SkuSorted = 7,
    Codes = 8,
    Scales = 9,
}

/// The version a segment with graph degree `m` is written with: the lowest that holds it.
pub fn version_for(m: usize) -> u32 {
    if m == 0 { FLAT_FORMAT_VERSION } else { 2 }
}

/// Number of sections (version 2).
pub const SECTION_COUNT: usize = 10;

impl SectionId {
    pub const ALL: [SectionId; SECTION_COUNT] = [
        SectionId::Vectors,
        SectionId::Layer0,
        SectionId::UpperOffsets,
        SectionId::Upper,
        SectionId::Levels,
        SectionId::SkuOffsets,
        SectionId::SkuBytes,
        SectionId::SkuSorted,
        SectionId::Codes,
        SectionId::Scales,
    ];

    /// Whether a file of format `version` has this section.
    pub fn in_version(self, version: u32) -> bool {
        version >= 2 || !matches!(self, SectionId::Codes | SectionId::Scales)
    }

    pub fn name(self) -> &'static str {
        match self {
            SectionId::Vectors => "vectors",
            SectionId::Layer0 => "layer0",
            SectionId::UpperOffsets => "upper_offsets",
            SectionId::Upper => "upper",
            SectionId::Levels => "levels",
            SectionId::SkuOffsets => "sku_offsets",
            SectionId::SkuBytes => "sku_bytes",
            SectionId::SkuSorted => "sku_sorted",
            SectionId::Codes => "codes",
            SectionId::Scales => "scales",
        }
    }

    /// Size in bytes of one element of the section (alignment requirement as well).
    pub fn elem_size(self) -> u64 {
        match self {
            SectionId::Vectors | SectionId::Layer0 | SectionId::UpperOffsets => 4,
            SectionId::Upper | SectionId::SkuSorted | SectionId::Scales => 4,
            SectionId::Levels | SectionId::SkuBytes | SectionId::Codes => 1,
            SectionId::SkuOffsets => 8,
        }
    }
}

/// Where a section lies in the file.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct Section {
    pub offset: u64,
    pub len: u64,
}

/// The first [`HEADER_LEN`] bytes of a segment file.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct Header {
    pub magic: [u8; 8],
    pub version: u32,
    pub header_len: u32,
    pub dim: u32,
    pub m: u32,
    pub count: u64,
    pub entry_point: u32,
    pub max_level: u32,
    pub ef_construction: u32,
    pub reserved0: u32,
    pub file_len: u64,
    pub sections: [Section; SECTION_COUNT],
    pub reserved1: [u64; 5],
}

/// The last [`FOOTER_LEN`] bytes of a segment file.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Pod, Zeroable)]
pub struct Footer {
    pub magic: [u8; 8],
    pub version: u32,
    pub header_crc: u32,
    pub section_crc: [u32; SECTION_COUNT],
    pub reserved: [u32; 1],
    pub footer_crc: u32,
}

const _: () = assert!(std::mem::size_of::<Header>() as u64 == HEADER_LEN);
const _: () = assert!(std::mem::size_of::<Footer>() as u64 == FOOTER_LEN);

impl Footer {
    /// crc32 of the footer bytes before `footer_crc`.
    pub fn compute_crc(&self) -> u32 {
        let bytes = bytemuck::bytes_of(self);
        crc32fast::hash(&bytes[..FOOTER_LEN as usize - 4])
    }
}

impl Header {
    pub fn compute_crc(&self) -> u32 {
        crc32fast::hash(bytemuck::bytes_of(self))
    }

    pub fn section(&self, id: SectionId) -> Section {
        self.sections[id as usize]
    }
}

/// Rounds `x` up to a multiple of [`ALIGN`]; `None` on overflow.
pub fn align_up(x: u64) -> Option<u64> {
    x.checked_add(ALIGN - 1).map(|v| v & !(ALIGN - 1))
}

/// Places sections of the given byte lengths one after the other after the header, each
/// aligned; returns the sections and the total file length (footer included).
pub fn plan_layout(lens: &[u64; SECTION_COUNT]) -> Option<([Section; SECTION_COUNT], u64)> {
    let mut sections = [Section { offset: 0, len: 0 }; SECTION_COUNT];
    let mut pos = HEADER_LEN;
    for (s, &len) in sections.iter_mut().zip(lens) {
        pos = align_up(pos)?;
        *s = Section { offset: pos, len };
        pos = pos.checked_add(len)?;
    }
    let footer_at = align_up(pos)?;
    Some((sections, footer_at.checked_add(FOOTER_LEN)?))
}

/// Scalar quantisation of L2-normalised rows: one scale per dimension, `max |v[d]|` over
/// the rows divided by 127, and codes `round(v[d] / scale[d])` in -127..=127 (a dimension
/// that is zero everywhere gets scale 0 and codes 0). Per dimension rather than one scale
/// for the segment because embedding dimensions differ widely in spread (ReLU6 features:
/// many near-zero dimensions, a few large ones); one scale would spend most of the 8 bits
/// of the quiet dimensions on range they never use. The rounding error of `v[d]` is at most
/// `scale[d] / 2`, so a query's approximate score is within `sum |q[d]| * scale[d] / 2` of
/// the exact one.
pub fn quantise(dim: usize, vectors: &[f32]) -> (Vec<i8>, Vec<f32>) {
    let mut max = vec![0.0f32; dim];
    for row in vectors.chunks_exact(dim) {
        crate::background::yield_point();
        for (m, &x) in max.iter_mut().zip(row) {
            *m = m.max(x.abs());
        }
    }
    let scales: Vec<f32> = max.iter().map(|&m| m / 127.0).collect();
    let inv: Vec<f32> = scales.iter().map(|&s| if s > 0.0 { 1.0 / s } else { 0.0 }).collect();
    let mut codes = Vec::with_capacity(vectors.len());
    for row in vectors.chunks_exact(dim) {
        crate::background::yield_point();
        codes.extend(row.iter().zip(&inv).map(|(&x, &i)| (x * i).round().clamp(-127.0, 127.0) as i8));
    }
    (codes, scales)
}

/// crc32 of `bytes`, hashed a MiB at a time with a [`yield_point`] between: the same value as
/// `crc32fast::hash`, without holding a core for milliseconds on a background thread.
///
/// [`yield_point`]: crate::background::yield_point
pub fn crc32_yielding(bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for chunk in bytes.chunks(1 << 20) {
        crate::background::yield_point();
        h.update(chunk);
    }
    h.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_aligned_and_ordered() {
        let (sections, len) = plan_layout(&[12, 0, 5, 64, 1, 3, 7, 9, 33, 8]).unwrap();
        let mut end = HEADER_LEN;
        for s in sections {
            assert_eq!(s.offset % ALIGN, 0);
            assert!(s.offset >= end);
            end = s.offset + s.len;
        }
        assert_eq!(len % ALIGN, 0);
        assert!(len >= end + FOOTER_LEN);
    }

    #[test]
    fn quantisation_error_is_within_half_a_step() {
        let shape = crate::segment::synth::Structured { dim: 96, latent: 12, noise: 0.3, seed: 4 };
        let rows = shape.rows(0, 500);
        let (codes, scales) = quantise(96, &rows);
        assert_eq!((codes.len(), scales.len()), (rows.len(), 96));
        for (x, (&c, d)) in rows.iter().zip(codes.iter().zip((0..96).cycle())) {
            let err = (f32::from(c) * scales[d] - x).abs();
            assert!(err <= scales[d] * 0.5 + 1e-7, "dim {d}: {x} coded {c} x {}", scales[d]);
        }
        // The score bound: |approx - exact| <= sum |q[d]| * scale[d] / 2, for every pair.
        let queries = shape.rows(10_000, 20);
        for q in queries.chunks_exact(96) {
            let bound: f32 = q.iter().zip(&scales).map(|(a, s)| a.abs() * s * 0.5).sum();
            for (row, code) in rows.chunks_exact(96).zip(codes.chunks_exact(96)) {
                let exact: f32 = q.iter().zip(row).map(|(a, b)| a * b).sum();
                let approx: f32 =
                    q.iter().zip(code).zip(&scales).map(|((a, &c), s)| a * s * f32::from(c)).sum();
                assert!(
                    (approx - exact).abs() <= bound * 1.001 + 1e-6,
                    "{approx} vs {exact} (bound {bound})"
                );
            }
        }
        // A dimension that is zero everywhere is coded 0 with scale 0, not NaN.
        let (codes, scales) = quantise(2, &[1.0, 0.0, -1.0, 0.0]);
        assert_eq!((codes, scales[1]), (vec![127, 0, -127, 0], 0.0));
    }

    #[test]
    fn overflow_is_reported() {
        assert!(plan_layout(&[u64::MAX, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(align_up(u64::MAX).is_none());
    }
}
