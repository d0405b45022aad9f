//! Opening a segment file: map it, check header, footer and section bounds in O(1), and hand
//! out typed views of the sections straight from the mapping; `verify` checks everything else.

use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use bytemuck::Pod;
use memmap2::Mmap;

use super::error::SegmentError;
use super::format::{
    ALIGN, FLAT_FORMAT_VERSION, FOOTER_LEN, FOOTER_MAGIC, FORMAT_VERSION, Footer, HEADER_LEN, HEADER_MAGIC,
    Header, MAX_LEVEL, MAX_M, MIN_FORMAT_VERSION, NO_NEIGHBOUR, SECTION_COUNT, SectionId,
};
use super::mmap::map_segment;
use super::sketch::Sketch;

/// An open, immutable, memory-mapped segment. Cheap to share between threads (`Send + Sync`);
/// all reads come from the mapping.
pub struct Segment {
    path: PathBuf,
    /// The open file behind `map`: [`Segment::verify_checksums`] reads through it, not the
    /// mapping, so a check of the whole file leaves none of it resident in this process.
    file: File,
    map: Mmap,
    header: Header,
    footer: Footer,
    ranges: [Range<usize>; SECTION_COUNT],
    /// One-bit sketches for the scan's first pass ([`Segment::scan_sketch`]): shared with the
    /// background thread that builds them.
    sketch: Arc<OnceLock<Option<Sketch>>>,
    /// Whether that thread was started.
    sketch_started: AtomicBool,
}

/// Typed slices of every section of a segment, borrowed from its mapping.
#[derive(Clone, Copy)]
pub(super) struct View<'a> {
    pub n: usize,
    pub dim: usize,
    pub m: usize,
    pub entry_point: u32,
    pub max_level: usize,
    pub vectors: &'a [f32],
    pub layer0: &'a [u32],
    pub upper_offsets: &'a [u32],
    pub upper: &'a [u32],
    pub levels: &'a [u8],
    /// int8 codes of the vectors (`n * dim`), empty in a version-1 file.
    pub codes: &'a [i8],
    /// Per-dimension scales of the codes (`dim`), empty in a version-1 file.
    pub scales: &'a [f32],
    pub sku_offsets: &'a [u64],
    pub sku_bytes: &'a [u8],
    pub sku_sorted: &'a [u32],
}

impl<'a> View<'a> {
    /// Bytes of SKU `idx`; empty if the offsets are damaged (reported by `verify`).
    #[inline]
    pub fn sku_bytes_at(&self, idx: usize) -> &'a [u8] {
        let (Some(&start), Some(&end)) = (self.sku_offsets.get(idx), self.sku_offsets.get(idx + 1)) else {
            return &[];
        };
        let (Ok(start), Ok(end)) = (usize::try_from(start), usize::try_from(end)) else {
            return &[];
        };
        self.sku_bytes.get(start..end).unwrap_or(&[])
    }

    /// Node `node`'s neighbour row on upper layer `layer` (>= 1); `None` if the node does
    /// not reach that layer or the offsets are damaged.
    #[inline]
    pub fn upper_row(&self, node: usize, layer: usize) -> Option<&'a [u32]> {
        let start = *self.upper_offsets.get(node)? as usize;
        let end = *self.upper_offsets.get(node + 1)? as usize;
        let row = start + layer - 1;
        if layer == 0 || row >= end {
            return None;
        }
        self.upper.get(row * self.m..(row + 1) * self.m)
    }
}

fn cast<T: Pod>(bytes: &[u8]) -> &[T] {
    // `open` has checked every section's alignment and length with `try_cast_slice`, and the
    // mapping never moves, so this cannot fail.
    bytemuck::cast_slice(bytes)
}

/// See [`Segment::rescore_row`]: f32 rows sections at least this large are read, not mapped,
/// when a walk's candidates are rescored (256 MiB: 52k rows of 1,280 dimensions).
pub const READ_RESCORE_BYTES: usize = 256 << 20;

impl Segment {
    /// Opens and maps a segment file. Reads only the header and footer: the cost does not grow
    /// with the number of vectors. Checks magic numbers, versions, the header crc, and that
    /// every section lies inside the file, is aligned and has the size the header implies.
    pub fn open(path: &Path) -> Result<Segment, SegmentError> {
        let p = || path.to_path_buf();
        let file = File::open(path).map_err(|e| SegmentError::io(path, e))?;
        let actual_len = file.metadata().map_err(|e| SegmentError::io(path, e))?.len();
        if actual_len < HEADER_LEN + FOOTER_LEN {
            if actual_len >= 8 && !starts_with_magic(&file) {
                return Err(SegmentError::BadMagic { path: p(), which: "header" });
            }
            return Err(SegmentError::Truncated {
                path: p(),
                actual: actual_len,
                expected: HEADER_LEN + FOOTER_LEN,
            });
        }
        let map = map_segment(&file).map_err(|e| SegmentError::io(path, e))?;
        let bytes: &[u8] = &map;
        let header: Header = bytemuck::pod_read_unaligned(&bytes[..HEADER_LEN as usize]);
        if header.magic != HEADER_MAGIC {
            return Err(SegmentError::BadMagic { path: p(), which: "header" });
        }
        if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&header.version) {
            return Err(SegmentError::UnsupportedVersion {
                path: p(),
                found: header.version,
                supported: FORMAT_VERSION,
            });
        }
        if header.file_len != actual_len {
            return Err(SegmentError::Truncated { path: p(), actual: actual_len, expected: header.file_len });
        }
        let footer_at = (actual_len - FOOTER_LEN) as usize;
        let footer: Footer = bytemuck::pod_read_unaligned(&bytes[footer_at..]);
        if footer.magic != FOOTER_MAGIC {
            return Err(SegmentError::BadMagic { path: p(), which: "footer" });
        }
        if footer.version != header.version {
            return Err(SegmentError::UnsupportedVersion {
                path: p(),
                found: footer.version,
                supported: header.version,
            });
        }
        let computed = footer.compute_crc();
        if computed != footer.footer_crc {
            return Err(SegmentError::Checksum {
                path: p(),
                section: "footer",
                stored: footer.footer_crc,
                computed,
            });
        }
        let computed = header.compute_crc();
        if computed != footer.header_crc {
            return Err(SegmentError::Checksum {
                path: p(),
                section: "header",
                stored: footer.header_crc,
                computed,
            });
        }
        let ranges = check_layout(path, &header, footer_at as u64)?;
        let seg = Segment {
            path: p(),
            file,
            map,
            header,
            footer,
            ranges,
            sketch: Arc::default(),
            sketch_started: AtomicBool::new(false),
        };
        seg.check_typed_views()?;
        Ok(seg)
    }

    /// O(1) consistency checks on the typed views (a few scalar reads).
    fn check_typed_views(&self) -> Result<(), SegmentError> {
        let bad = |section: SectionId, reason| SegmentError::BadLayout {
            path: self.path.clone(),
            section: section.name(),
            reason,
        };
        for id in SectionId::ALL {
            let b = &self.map[self.ranges[id as usize].clone()];
            let ok = match id.elem_size() {
                1 => true,
                4 => bytemuck::try_cast_slice::<u8, u32>(b).is_ok(),
                8 => bytemuck::try_cast_slice::<u8, u64>(b).is_ok(),
                _ => false,
            };
            if !ok {
                return Err(bad(id, "misaligned or not a whole number of elements"));
            }
        }
        let v = self.view();
        let upper_rows = v.upper_offsets[v.n] as usize;
        if upper_rows.checked_mul(v.m * 4) != Some(self.ranges[SectionId::Upper as usize].len()) {
            return Err(bad(SectionId::Upper, "length does not match the row count in upper_offsets"));
        }
        if v.sku_offsets[v.n] != self.ranges[SectionId::SkuBytes as usize].len() as u64 {
            return Err(bad(SectionId::SkuOffsets, "last offset does not match sku_bytes length"));
        }
        if usize::from(v.levels[v.entry_point as usize]) != v.max_level {
            return Err(bad(SectionId::Levels, "entry point is not on the top layer"));
        }
        Ok(())
    }

    #[inline]
    pub(super) fn view(&self) -> View<'_> {
        let sec = |id: SectionId| &self.map[self.ranges[id as usize].clone()];
        View {
            n: self.header.count as usize,
            dim: self.header.dim as usize,
            m: self.header.m as usize,
            entry_point: self.header.entry_point,
            max_level: self.header.max_level as usize,
            vectors: cast(sec(SectionId::Vectors)),
            layer0: cast(sec(SectionId::Layer0)),
            upper_offsets: cast(sec(SectionId::UpperOffsets)),
            upper: cast(sec(SectionId::Upper)),
            levels: sec(SectionId::Levels),
            codes: cast(sec(SectionId::Codes)),
            scales: cast(sec(SectionId::Scales)),
            sku_offsets: cast(sec(SectionId::SkuOffsets)),
            sku_bytes: sec(SectionId::SkuBytes),
            sku_sorted: cast(sec(SectionId::SkuSorted)),
        }
    }

    /// Number of vectors (always >= 1).
    pub fn len(&self) -> usize {
        self.header.count as usize
    }

    /// Always false: empty segments cannot be written. Present for API symmetry.
    pub fn is_empty(&self) -> bool {
        self.header.count == 0
    }

    pub fn dim(&self) -> usize {
        self.header.dim as usize
    }

    /// HNSW `m` the graph was built with (layer 0 has degree `2*m`); 0 for a flat segment.
    pub fn m(&self) -> usize {
        self.header.m as usize
    }

    /// Whether the segment has an HNSW graph; a flat one (format 3, `m = 0`) is always
    /// searched by an exact scan.
    pub fn has_graph(&self) -> bool {
        self.header.m != 0
    }

    /// Top HNSW layer.
    pub fn max_level(&self) -> usize {
        self.header.max_level as usize
    }

    /// The file's format version (1: f32 only; 2: with int8 codes for the graph walk; 3: a
    /// flat segment, without a graph).
    pub fn format_version(&self) -> u32 {
        self.header.version
    }

    /// The cell the scan's sketches go in, and whether a thread was started to fill it.
    pub(super) fn sketch_cell(&self) -> (&Arc<OnceLock<Option<Sketch>>>, &AtomicBool) {
        (&self.sketch, &self.sketch_started)
    }

    /// Whether searches walk the graph on int8 codes (and rescore with the f32 vectors).
    pub fn is_quantised(&self) -> bool {
        !self.view().codes.is_empty()
    }

    /// The node every graph walk starts from (on the top layer).
    pub fn entry_point(&self) -> u32 {
        self.header.entry_point
    }

    /// Every section's name and byte range in the file (for tools and corruption tests).
    pub fn sections(&self) -> Vec<(&'static str, Range<usize>)> {
        SectionId::ALL.iter().map(|&id| (id.name(), self.ranges[id as usize].clone())).collect()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Size of the file in bytes.
    pub fn file_len(&self) -> u64 {
        self.header.file_len
    }

    /// The stored (L2-normalised) vector of item `idx`.
    ///
    /// # Panics
    /// If `idx >= self.len()`.
    pub fn vector(&self, idx: u32) -> &[f32] {
        let dim = self.dim();
        let start = idx as usize * dim;
        &self.view().vectors[start..start + dim]
    }

    /// Item `idx`'s exact row for rescoring a walk's candidates: from the mapping, or, in a
    /// segment whose f32 rows take at least [`READ_RESCORE_BYTES`], read with `pread` into
    /// `buf`. A walk reads the int8 codes and the graph, which stay resident in a busy
    /// server; the f32 rows are read only for its `ef` best, scattered over the file, and a
    /// page fault maps its neighbours too (fault-around), so through the mapping a large
    /// segment's rows would fill the server's resident memory within a few thousand queries
    /// (1M x 1280 holds 5 GB of them). Read, they cost page cache the kernel can reclaim, and
    /// one syscall per candidate. `None` for an index out of range or a failed read.
    pub(super) fn rescore_row<'a>(&'a self, idx: u32, buf: &'a mut Vec<f32>) -> Option<&'a [f32]> {
        self.rescore_row_above(idx, buf, READ_RESCORE_BYTES)
    }

    fn rescore_row_above<'a>(
        &'a self,
        idx: u32,
        buf: &'a mut Vec<f32>,
        read_from: usize,
    ) -> Option<&'a [f32]> {
        let dim = self.dim();
        let range = &self.ranges[SectionId::Vectors as usize];
        let start = idx as usize * dim;
        if range.len() < read_from {
            return self.view().vectors.get(start..start + dim);
        }
        if idx as usize >= self.len() {
            return None;
        }
        buf.resize(dim, 0.0);
        self.read_at(bytemuck::cast_slice_mut(buf.as_mut_slice()), (range.start + start * 4) as u64).ok()?;
        Some(buf.as_slice())
    }

    /// The SKU of item `idx`. A damaged entry (which `verify` reports) reads as "".
    ///
    /// # Panics
    /// If `idx >= self.len()`.
    pub fn sku(&self, idx: u32) -> &str {
        assert!((idx as usize) < self.len(), "sku index {idx} out of range (len {})", self.len());
        std::str::from_utf8(self.view().sku_bytes_at(idx as usize)).unwrap_or("")
    }

    /// Finds the item with this SKU by binary search over the sorted SKU index: O(log n).
    pub fn find_sku(&self, sku: &str) -> Option<u32> {
        let v = self.view();
        let key = sku.as_bytes();
        let pos = v.sku_sorted.binary_search_by(|&idx| v.sku_bytes_at(idx as usize).cmp(key)).ok()?;
        let idx = v.sku_sorted[pos];
        ((idx as usize) < v.n).then_some(idx)
    }

    /// Asks the kernel to read the whole file ahead (`MADV_WILLNEED`), to avoid slow first
    /// queries on a cold page cache. Advisory; errors are ignored.
    pub fn warm(&self) {
        let _ = self.map.advise(memmap2::Advice::WillNeed);
    }

    /// Reads the whole file: checks every section's crc32 and the structure of the graph,
    /// the vectors (finite, unit length) and the SKU index. O(file size).
    pub fn verify(&self) -> Result<(), SegmentError> {
        self.verify_checksums()?;
        self.verify_structure()
    }

    /// Checks every section's crc32 against the footer (the header and footer were checked by
    /// [`Segment::open`]): after this, every byte a search reads is the byte the writer wrote.
    ///
    /// Reads the file with `pread`, a MiB per task on rayon's pool (the chunk crcs are
    /// combined), not through the mapping: checking a segment of several GB at open then costs
    /// page cache, which the kernel reclaims, and never the server's resident memory, which
    /// would otherwise hold the whole file after the check.
    pub fn verify_checksums(&self) -> Result<(), SegmentError> {
        use rayon::prelude::*;
        // A MiB per task: a background thread (a seal's check) yields between chunks.
        const CHUNK: u64 = 1 << 20;
        for id in SectionId::ALL {
            let range = self.ranges[id as usize].clone();
            let (start, end) = (range.start as u64, range.end as u64);
            let chunks: Vec<u64> = (start..end).step_by(CHUNK as usize).collect();
            let parts = chunks
                .par_iter()
                .map_init(Vec::new, |buf, &at| {
                    crate::background::yield_point();
                    buf.resize((end - at).min(CHUNK) as usize, 0);
                    self.read_at(buf, at)?;
                    let mut h = crc32fast::Hasher::new();
                    h.update(buf);
                    Ok(h)
                })
                .collect::<Result<Vec<crc32fast::Hasher>, SegmentError>>()?;
            let mut all = crc32fast::Hasher::new();
            for part in &parts {
                all.combine(part);
            }
            let computed = all.finalize();
            let stored = self.footer.section_crc[id as usize];
            if computed != stored {
                return Err(SegmentError::Checksum {
                    path: self.path.clone(),
                    section: id.name(),
                    stored,
                    computed,
                });
            }
        }
        Ok(())
    }

    /// Fills `buf` from the file at byte `at`, without touching the mapping.
    fn read_at(&self, buf: &mut [u8], at: u64) -> Result<(), SegmentError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            self.file.read_exact_at(buf, at).map_err(|e| SegmentError::io(&self.path, e))
        }
        #[cfg(not(unix))]
        {
            buf.copy_from_slice(&self.map[at as usize..at as usize + buf.len()]);
            Ok(())
        }
    }

    fn verify_structure(&self) -> Result<(), SegmentError> {
        check_structure(&self.view()).map_err(|(section, index, reason)| SegmentError::Corrupt {
            path: self.path.clone(),
            section: section.name(),
            index: index as u64,
            reason,
        })
    }
}

/// Full structural check of a segment's sections (also used by the writer on the in-memory
/// sections before anything is written). On failure: (section, entry index, reason).
pub(super) fn check_structure(v: &View<'_>) -> Result<(), (SectionId, usize, &'static str)> {
    for (i, row) in v.vectors.chunks_exact(v.dim).enumerate() {
        crate::background::yield_point();
        let mut norm2 = 0.0f64;
        for &x in row {
            if !x.is_finite() {
                return Err((SectionId::Vectors, i, "non-finite component"));
            }
            norm2 += f64::from(x) * f64::from(x);
        }
        if (norm2 - 1.0).abs() > 1e-3 {
            return Err((SectionId::Vectors, i, "not L2-normalised"));
        }
    }
    if !v.scales.is_empty() {
        if let Some(d) = v.scales.iter().position(|s| !(s.is_finite() && *s >= 0.0)) {
            return Err((SectionId::Scales, d, "not a finite non-negative scale"));
        }
        // Each code must be its vector component rounded (half a step, plus float slack).
        for (i, (row, codes)) in v.vectors.chunks_exact(v.dim).zip(v.codes.chunks_exact(v.dim)).enumerate() {
            crate::background::yield_point();
            for ((&x, &c), &s) in row.iter().zip(codes).zip(v.scales) {
                if (f32::from(c) * s - x).abs() > s * 0.5 + 1e-6 {
                    return Err((SectionId::Codes, i, "code does not match its vector"));
                }
            }
        }
    }
    let n32 = v.n as u32;
    // A flat segment's empty LAYER0 has no rows (its levels, all 0, are checked below).
    for (i, row) in v.layer0.chunks_exact(2 * v.m.max(1)).enumerate() {
        if i % 256 == 0 {
            crate::background::yield_point();
        }
        check_row(row, n32).map_err(|r| (SectionId::Layer0, i, r))?;
    }
    if v.upper_offsets[0] != 0 {
        return Err((SectionId::UpperOffsets, 0, "does not start at 0"));
    }
    for i in 0..v.n {
        if i % 256 == 0 {
            crate::background::yield_point();
        }
        let level = usize::from(v.levels[i]);
        if level > v.max_level {
            return Err((SectionId::Levels, i, "level above max_level"));
        }
        let (start, end) = (v.upper_offsets[i], v.upper_offsets[i + 1]);
        if end < start || (end - start) as usize != level {
            return Err((SectionId::UpperOffsets, i, "row count differs from the node's level"));
        }
        for layer in 1..=level {
            let row = v.upper_row(i, layer).ok_or((SectionId::Upper, i, "row out of range"))?;
            check_row(row, n32).map_err(|r| (SectionId::Upper, i, r))?;
            if row.iter().any(|&nb| nb != NO_NEIGHBOUR && usize::from(v.levels[nb as usize]) < layer) {
                return Err((SectionId::Upper, i, "neighbour does not reach this layer"));
            }
        }
    }
    if usize::from(v.levels[v.entry_point as usize]) != v.max_level {
        return Err((SectionId::Levels, v.entry_point as usize, "entry point is not on the top layer"));
    }
    if v.sku_offsets[0] != 0 {
        return Err((SectionId::SkuOffsets, 0, "does not start at 0"));
    }
    for i in 0..v.n {
        if v.sku_offsets[i + 1] <= v.sku_offsets[i] {
            return Err((SectionId::SkuOffsets, i, "empty or decreasing SKU range"));
        }
        if std::str::from_utf8(v.sku_bytes_at(i)).is_err() {
            return Err((SectionId::SkuBytes, i, "SKU is not UTF-8"));
        }
    }
    if v.sku_offsets[v.n] != v.sku_bytes.len() as u64 {
        return Err((SectionId::SkuOffsets, v.n, "last offset does not match sku_bytes length"));
    }
    let mut seen = vec![false; v.n];
    for (pos, &idx) in v.sku_sorted.iter().enumerate() {
        let Some(slot) = seen.get_mut(idx as usize) else {
            return Err((SectionId::SkuSorted, pos, "node id out of range"));
        };
        if std::mem::replace(slot, true) {
            return Err((SectionId::SkuSorted, pos, "node listed twice"));
        }
        if pos > 0 && v.sku_bytes_at(v.sku_sorted[pos - 1] as usize) >= v.sku_bytes_at(idx as usize) {
            return Err((SectionId::SkuSorted, pos, "not strictly sorted by SKU"));
        }
    }
    Ok(())
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("path", &self.path)
            .field("count", &self.header.count)
            .field("dim", &self.header.dim)
            .field("m", &self.header.m)
            .field("max_level", &self.header.max_level)
            .finish_non_exhaustive()
    }
}

/// A neighbour row: ids < n, then only `NO_NEIGHBOUR`.
fn check_row(row: &[u32], n: u32) -> Result<(), &'static str> {
    let used = row.iter().take_while(|&&x| x != NO_NEIGHBOUR).count();
    if row[used..].iter().any(|&x| x != NO_NEIGHBOUR) {
        return Err("neighbour after an empty slot");
    }
    if row[..used].iter().any(|&x| x >= n) {
        return Err("neighbour id out of range");
    }
    Ok(())
}

fn starts_with_magic(file: &File) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 8];
    let mut r = file;
    r.read_exact(&mut buf).is_ok() && buf == HEADER_MAGIC
}

/// Checks header scalars and that every section is in bounds, aligned, in order, and of the
/// size the header implies. Returns each section's byte range.
fn check_layout(
    path: &Path,
    h: &Header,
    footer_at: u64,
) -> Result<[Range<usize>; SECTION_COUNT], SegmentError> {
    let bad =
        |section: &'static str, reason| SegmentError::BadLayout { path: path.to_path_buf(), section, reason };
    if u64::from(h.header_len) != HEADER_LEN {
        return Err(bad("header", "unexpected header length"));
    }
    if h.count == 0 {
        return Err(SegmentError::Empty { path: path.to_path_buf() });
    }
    if h.count >= u64::from(NO_NEIGHBOUR) {
        return Err(bad("header", "count too large"));
    }
    if h.dim == 0 {
        return Err(bad("header", "dim is 0"));
    }
    if h.m as usize > MAX_M || (h.m == 0 && h.version < FLAT_FORMAT_VERSION) {
        return Err(bad("header", "m out of range"));
    }
    if h.m == 0 && (h.max_level != 0 || h.entry_point != 0) {
        return Err(bad("header", "a flat segment (m = 0) has no entry point or upper layers"));
    }
    if h.max_level > MAX_LEVEL {
        return Err(bad("header", "max_level out of range"));
    }
    if u64::from(h.entry_point) >= h.count {
        return Err(bad("header", "entry point out of range"));
    }
    let (n, dim, m) = (h.count, u64::from(h.dim), u64::from(h.m));
    let mut ranges: [Range<usize>; SECTION_COUNT] = Default::default();
    let mut prev_end = HEADER_LEN;
    for id in SectionId::ALL {
        let s = h.section(id);
        let name = id.name();
        if !id.in_version(h.version) {
            // Reserved (zero) bytes in files of this version.
            if s.offset != 0 || s.len != 0 {
                return Err(bad(name, "set in a file of a version without this section"));
            }
            continue;
        }
        let expected = match id {
            SectionId::Vectors => n.checked_mul(dim).and_then(|x| x.checked_mul(4)),
            SectionId::Layer0 => n.checked_mul(2 * m).and_then(|x| x.checked_mul(4)),
            SectionId::UpperOffsets => Some((n + 1) * 4),
            SectionId::Levels => Some(n),
            SectionId::SkuOffsets => Some((n + 1) * 8),
            SectionId::SkuSorted => Some(n * 4),
            SectionId::Codes => n.checked_mul(dim),
            SectionId::Scales => Some(dim * 4),
            SectionId::Upper | SectionId::SkuBytes => None,
        };
        match expected {
            Some(e) if e != s.len => return Err(bad(name, "length does not match count/dim/m")),
            None if id == SectionId::Upper && m == 0 && s.len != 0 => {
                return Err(bad(name, "a flat segment (m = 0) has no upper layers"));
            }
            None if id == SectionId::Upper && m != 0 && !s.len.is_multiple_of(m * 4) => {
                return Err(bad(name, "length is not a whole number of rows"));
            }
            _ => {}
        }
        if !s.offset.is_multiple_of(ALIGN) {
            return Err(bad(name, "offset is not 64-byte aligned"));
        }
        if s.offset < prev_end {
            return Err(bad(name, "overlaps the header or the previous section"));
        }
        let end = s.offset.checked_add(s.len).ok_or_else(|| bad(name, "offset + length overflows"))?;
        if end > footer_at {
            return Err(bad(name, "extends past the footer"));
        }
        let (Ok(start), Ok(end_usize)) = (usize::try_from(s.offset), usize::try_from(end)) else {
            return Err(bad(name, "does not fit in the address space"));
        };
        ranges[id as usize] = start..end_usize;
        prev_end = end;
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SkuId;
    use crate::segment::synth::Structured;
    use crate::segment::{HnswParams, write_segment};

    /// Rows read with pread for rescoring are the mapped rows; out of range is `None`.
    #[test]
    fn rows_read_for_rescoring_equal_the_mapped_rows() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rows.vseg");
        let (dim, n) = (37usize, 300usize);
        let rows = Structured { dim, latent: 5, noise: 0.2, seed: 4 }.rows(0, n);
        let skus: Vec<SkuId> = (0..n).map(|i| SkuId::new(format!("r{i}")).unwrap()).collect();
        write_segment(&path, dim, &rows, &skus, &HnswParams::default()).unwrap();
        let seg = Segment::open(&path).unwrap();
        let mut buf = Vec::new();
        for idx in 0..n as u32 {
            let want = seg.vector(idx).to_vec();
            assert_eq!(seg.rescore_row_above(idx, &mut buf, 0), Some(want.as_slice()), "read, row {idx}");
            assert_eq!(seg.rescore_row_above(idx, &mut buf, usize::MAX), Some(want.as_slice()), "mapped");
        }
        assert_eq!(seg.rescore_row_above(n as u32, &mut buf, 0), None);
        assert_eq!(seg.rescore_row_above(n as u32, &mut buf, usize::MAX), None);
    }
}
