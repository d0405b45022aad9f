//! Writing segment files: validate and normalise the batch, build the HNSW graph (vitrine's
//! own builder, optionally extending a merged segment's graph; hnsw_rs as the reference),
//! write the file crash-safely, then verify it and measure self-recall.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use hnsw_rs::prelude::{DistDot, Hnsw};
use rayon::prelude::*;

use super::build::{BaseGraph, FlatGraph, Quantised, build};
use super::distance::normalise_into;
use super::error::SegmentError;
use super::format::{
    FOOTER_MAGIC, Footer, HEADER_LEN, HEADER_MAGIC, Header, MAX_LEVEL, MAX_M, NO_NEIGHBOUR, SECTION_COUNT,
    SectionId, plan_layout, quantise, version_for,
};
use super::reader::{Segment, View, check_structure};
use super::{DEFAULT_EF_SEARCH, HnswParams, SearchPlan, SegmentStats};
use crate::fsutil::atomic_write_with;
use crate::ids::SkuId;

/// hnsw_rs's `DistDot` asserts that `dot <= 1.000002`; rounding can push the dot product of a
/// normalised f32 vector with itself slightly above 1 in high dimensions, so the copies handed
/// to hnsw_rs are scaled by this factor (a uniform scale: the neighbour order is unchanged).
const HNSW_INPUT_SCALE: f32 = 1.0 - 1e-4;
/// Largest hnsw_rs layer count (its `NB_LAYER_MAX`).
const HNSW_MAX_LAYERS: usize = MAX_LEVEL as usize + 1;
/// Upper bound on `ef_construction`: far above any useful value, it only guards against
/// absurd inputs.
const MAX_EF_CONSTRUCTION: usize = 100_000;
/// Rows handed to hnsw_rs per `parallel_insert_slice` call.
const INSERT_BATCH: usize = 16_384;
/// Points checked for self-recall after a build.
const SELF_RECALL_SAMPLE: usize = 256;

/// An HNSW graph in vitrine's flat layout, for [`write_segment_with_graph`].
#[derive(Debug, Clone, Copy)]
pub struct GraphLayout<'a> {
    pub dim: usize,
    /// Upper-layer degree; layer 0 has degree `2*m`.
    pub m: usize,
    /// Recorded in the header (informational).
    pub ef_construction: usize,
    /// `n * dim` values, each row L2-normalised (checked to 1e-3).
    pub vectors: &'a [f32],
    /// Top layer of each node, `n` values.
    pub levels: &'a [u8],
    /// `n * 2m` neighbour ids per node, unused slots `u32::MAX` after the used ones.
    pub layer0: &'a [u32],
    /// For each node in order, `levels[i]` rows of `m` ids (layers 1..=level).
    pub upper: &'a [u32],
    /// A node on the top layer.
    pub entry_point: u32,
}

fn invalid_param(path: &Path, name: &'static str, value: usize, reason: &'static str) -> SegmentError {
    SegmentError::InvalidParams { path: path.to_path_buf(), name, value, reason }
}

/// Which graph builder a write uses.
enum Builder<'a> {
    /// vitrine's builder ([`super::build`]), extending `(base, keep)` when given.
    Native(Option<(&'a Segment, &'a [u32])>),
    /// hnsw_rs, the reference implementation.
    HnswRs,
    /// No graph: a flat segment (written with [`FLAT_PARAMS`]).
    Flat,
}

/// The header's `m` and `ef_construction` of a flat segment.
const FLAT_PARAMS: HnswParams = HnswParams { m: 0, ef_construction: 0 };

/// Builds an HNSW index over `vectors` (`skus.len()` rows of `dim` values, any non-zero
/// finite length: they are L2-normalised here) and writes it as a new segment at `path`.
///
/// The file is written under a temporary name, fsynced and renamed into place; `path` must
/// not exist yet (segments are never rewritten). The written file is re-opened and fully
/// verified before returning. Nothing is written when the input is invalid.
pub fn write_segment(
    path: &Path,
    dim: usize,
    vectors: &[f32],
    skus: &[SkuId],
    params: &HnswParams,
) -> Result<SegmentStats, SegmentError> {
    write_built(path, dim, vectors, skus, params, Builder::Native(None))
}

/// Writes `vectors` (as [`write_segment`] takes them) as a flat segment, without a graph:
/// searches scan it exactly (format 3, `m = 0`). For segments small enough that a search at
/// the default ef would scan them anyway (at most [`FLAT_SCAN_FACTOR`]` * `
/// [`DEFAULT_EF_SEARCH`] items), where building a graph is work no search uses.
///
/// [`FLAT_SCAN_FACTOR`]: super::FLAT_SCAN_FACTOR
pub fn write_flat_segment(
    path: &Path,
    dim: usize,
    vectors: &[f32],
    skus: &[SkuId],
) -> Result<SegmentStats, SegmentError> {
    write_built(path, dim, vectors, skus, &FLAT_PARAMS, Builder::Flat)
}

/// [`write_segment`] for a merge: the first `keep.len()` rows of `vectors` are the items
/// `keep` (strictly ascending) of `base`, in that order, and the new graph extends `base`'s
/// graph instead of being built from nothing (links to items of `base` not kept are
/// repaired). Falls back to a full build when `base` has another `m` or `dim`.
pub fn write_segment_extending(
    path: &Path,
    dim: usize,
    vectors: &[f32],
    skus: &[SkuId],
    params: &HnswParams,
    base: &Segment,
    keep: &[u32],
) -> Result<SegmentStats, SegmentError> {
    if keep.len() > skus.len()
        || keep.windows(2).any(|w| w[0] >= w[1])
        || keep.last().is_some_and(|&k| k as usize >= base.len())
    {
        return Err(invalid_param(
            path,
            "keep",
            keep.len(),
            "must be ascending ids of the base segment, at most the batch size",
        ));
    }
    let compatible = base.m() == params.m && base.dim() == dim;
    let builder = Builder::Native(compatible.then_some((base, keep)));
    write_built(path, dim, vectors, skus, params, builder)
}

/// [`write_segment`] with the graph built by hnsw_rs: the reference the native builder is
/// tested and benchmarked against.
pub fn write_segment_hnsw_rs(
    path: &Path,
    dim: usize,
    vectors: &[f32],
    skus: &[SkuId],
    params: &HnswParams,
) -> Result<SegmentStats, SegmentError> {
    write_built(path, dim, vectors, skus, params, Builder::HnswRs)
}

fn write_built(
    path: &Path,
    dim: usize,
    vectors: &[f32],
    skus: &[SkuId],
    params: &HnswParams,
    builder: Builder<'_>,
) -> Result<SegmentStats, SegmentError> {
    let started = Instant::now();
    let n = skus.len();
    let flat = matches!(builder, Builder::Flat);
    check_common(path, dim, n, (!flat).then_some(params.m))?;
    check_vector_count(path, dim, n, vectors)?;
    if !flat && (params.ef_construction == 0 || params.ef_construction > MAX_EF_CONSTRUCTION) {
        return Err(invalid_param(path, "ef_construction", params.ef_construction, "must be in 1..=100000"));
    }
    let normalised = normalise_rows(path, dim, vectors)?;
    let sku_sections = SkuSections::build(path, skus)?;
    // Quantised once: the native builder walks these codes and the file stores them.
    let (codes, scales) = quantise(dim, &normalised);
    let graph = match builder {
        Builder::Native(base) => {
            let base = base.map(|(segment, keep)| BaseGraph { view: segment.view(), keep });
            build(dim, params.m, params.ef_construction, &normalised, (&codes, &scales), base)
        }
        Builder::HnswRs => build_graph_hnsw_rs(path, dim, &normalised, params)?,
        Builder::Flat => {
            FlatGraph { levels: vec![0; n], layer0: Vec::new(), upper: Vec::new(), entry_point: 0 }
        }
    };
    let layout = GraphLayout {
        dim,
        m: params.m,
        ef_construction: params.ef_construction,
        vectors: &normalised,
        levels: &graph.levels,
        layer0: &graph.layer0,
        upper: &graph.upper,
        entry_point: graph.entry_point,
    };
    write_checked(path, &layout, (&codes, &scales), &sku_sections, started)
}

/// Writes a segment from an explicit graph (no HNSW build): for tools and benchmarks that
/// produce the graph themselves. The graph and vectors are fully validated before writing.
pub fn write_segment_with_graph(
    path: &Path,
    graph: &GraphLayout<'_>,
    skus: &[SkuId],
) -> Result<SegmentStats, SegmentError> {
    let started = Instant::now();
    let n = skus.len();
    check_common(path, graph.dim, n, Some(graph.m))?;
    let lengths = [
        ("vectors", n * graph.dim, graph.vectors.len()),
        ("levels", n, graph.levels.len()),
        ("layer0", n * 2 * graph.m, graph.layer0.len()),
    ];
    for (what, expected, actual) in lengths {
        if expected != actual {
            return Err(SegmentError::LengthMismatch { path: path.to_path_buf(), what, expected, actual });
        }
    }
    let rows: usize = graph.levels.iter().map(|&l| usize::from(l)).sum();
    if graph.upper.len() != rows * graph.m {
        return Err(SegmentError::LengthMismatch {
            path: path.to_path_buf(),
            what: "upper (sum of levels * m)",
            expected: rows * graph.m,
            actual: graph.upper.len(),
        });
    }
    if graph.entry_point as usize >= n {
        return Err(invalid_param(path, "entry_point", graph.entry_point as usize, "must be < n"));
    }
    if graph.ef_construction > u32::MAX as usize {
        return Err(invalid_param(path, "ef_construction", graph.ef_construction, "must fit in u32"));
    }
    let sku_sections = SkuSections::build(path, skus)?;
    let (codes, scales) = quantise(graph.dim, graph.vectors);
    write_checked(path, graph, (&codes, &scales), &sku_sections, started)
}

fn check_vector_count(path: &Path, dim: usize, n: usize, vectors: &[f32]) -> Result<(), SegmentError> {
    if vectors.len() != n * dim {
        return Err(SegmentError::LengthMismatch {
            path: path.to_path_buf(),
            what: "vectors (skus.len() * dim)",
            expected: n * dim,
            actual: vectors.len(),
        });
    }
    Ok(())
}

/// Checks shared by every write; `m` is `None` for a flat segment.
fn check_common(path: &Path, dim: usize, n: usize, m: Option<usize>) -> Result<(), SegmentError> {
    if n == 0 {
        return Err(SegmentError::Empty { path: path.to_path_buf() });
    }
    if n >= NO_NEIGHBOUR as usize {
        return Err(invalid_param(path, "count", n, "must be < 2^32 - 1"));
    }
    if dim == 0 || dim > u32::MAX as usize {
        return Err(invalid_param(path, "dim", dim, "must be in 1..2^32"));
    }
    if let Some(m) = m
        && !(2..=MAX_M).contains(&m)
    {
        return Err(invalid_param(path, "m", m, "must be in 2..=256"));
    }
    if path.symlink_metadata().is_ok() {
        return Err(SegmentError::AlreadyExists { path: path.to_path_buf() });
    }
    Ok(())
}

/// L2-normalises each row (computed in f64); rejects non-finite and zero rows.
fn normalise_rows(path: &Path, dim: usize, vectors: &[f32]) -> Result<Vec<f32>, SegmentError> {
    let mut out = Vec::with_capacity(vectors.len());
    for (index, row) in vectors.chunks_exact(dim).enumerate() {
        crate::background::yield_point();
        normalise_into(row, &mut out).map_err(|reason| SegmentError::InvalidVector {
            path: path.to_path_buf(),
            index,
            reason,
        })?;
    }
    Ok(out)
}

/// The three SKU sections, built from the batch.
struct SkuSections {
    offsets: Vec<u64>,
    bytes: Vec<u8>,
    sorted: Vec<u32>,
}

impl SkuSections {
    fn build(path: &Path, skus: &[SkuId]) -> Result<Self, SegmentError> {
        let mut offsets = Vec::with_capacity(skus.len() + 1);
        let mut bytes = Vec::new();
        offsets.push(0u64);
        for sku in skus {
            bytes.extend_from_slice(sku.as_str().as_bytes());
            offsets.push(bytes.len() as u64);
        }
        let mut sorted: Vec<u32> = (0..skus.len() as u32).collect();
        sorted.sort_unstable_by(|&a, &b| {
            skus[a as usize].as_str().as_bytes().cmp(skus[b as usize].as_str().as_bytes())
        });
        if let Some(w) = sorted.windows(2).find(|w| skus[w[0] as usize] == skus[w[1] as usize]) {
            return Err(SegmentError::DuplicateSku {
                path: path.to_path_buf(),
                sku: skus[w[0] as usize].to_string(),
            });
        }
        Ok(SkuSections { offsets, bytes, sorted })
    }
}

/// Builds the graph with hnsw_rs (parallel inserts) and copies it into flat arrays.
fn build_graph_hnsw_rs(
    path: &Path,
    dim: usize,
    normalised: &[f32],
    params: &HnswParams,
) -> Result<FlatGraph, SegmentError> {
    let n = normalised.len() / dim;
    let hnsw = Hnsw::<f32, DistDot>::new(params.m, n, HNSW_MAX_LAYERS, params.ef_construction, DistDot);
    // hnsw_rs copies every vector it is given; scaling batch by batch keeps the extra copy
    // small.
    for (batch_no, batch) in normalised.chunks(INSERT_BATCH * dim).enumerate() {
        let scaled: Vec<f32> = batch.iter().map(|&x| x * HNSW_INPUT_SCALE).collect();
        let first = batch_no * INSERT_BATCH;
        let items: Vec<(&[f32], usize)> =
            scaled.chunks_exact(dim).enumerate().map(|(i, v)| (v, first + i)).collect();
        hnsw.parallel_insert_slice(&items);
    }
    extract_graph(&hnsw, n, params.m)
        .map_err(|reason| SegmentError::GraphBuild { path: path.to_path_buf(), reason })
}

/// Copies hnsw_rs's graph: per node its level and, per layer 0..=level, its neighbours
/// (nearest first), dropping self-links, duplicates, out-of-range ids and neighbours that do
/// not reach the layer, and truncating to the layer's degree.
fn extract_graph(hnsw: &Hnsw<'_, f32, DistDot>, n: usize, m: usize) -> Result<FlatGraph, &'static str> {
    let indexation = hnsw.get_point_indexation();
    let max_level = usize::from(indexation.get_max_level_observed());
    if max_level > MAX_LEVEL as usize {
        return Err("max level above 15");
    }
    let degree0 = 2 * m;
    let mut levels = vec![u8::MAX; n];
    let mut layer0 = vec![NO_NEIGHBOUR; n * degree0];
    let mut upper_rows: Vec<Vec<u32>> = vec![Vec::new(); n];
    for layer_of_points in 0..=max_level {
        for point in indexation.get_layer_iterator(layer_of_points) {
            let idx = point.get_origin_id();
            if idx >= n {
                return Err("point id out of range");
            }
            let level = usize::from(point.get_point_id().0);
            if level != layer_of_points {
                return Err("point stored on a layer other than its level");
            }
            if levels[idx] != u8::MAX {
                return Err("point inserted twice");
            }
            levels[idx] = level as u8;
            let hood = point.get_neighborhood_id();
            let mut upper = vec![NO_NEIGHBOUR; level * m];
            for layer in 0..=level {
                let row = if layer == 0 {
                    &mut layer0[idx * degree0..(idx + 1) * degree0]
                } else {
                    &mut upper[(layer - 1) * m..layer * m]
                };
                let mut used = 0;
                for nb in hood.get(layer).into_iter().flatten() {
                    let id = nb.get_origin_id();
                    if used == row.len() {
                        break;
                    }
                    if id == idx
                        || id >= n
                        || usize::from(nb.p_id.0) < layer
                        || row[..used].contains(&(id as u32))
                    {
                        continue;
                    }
                    row[used] = id as u32;
                    used += 1;
                }
            }
            upper_rows[idx] = upper;
        }
    }
    if levels.contains(&u8::MAX) {
        return Err("some points are missing from the graph");
    }
    let entry = indexation.get_layer_iterator(max_level).next().ok_or("top layer is empty")?;
    let entry_point = entry.get_origin_id() as u32;
    let upper = upper_rows.into_iter().flatten().collect();
    Ok(FlatGraph { levels, layer0, upper, entry_point })
}

/// Validates the complete in-memory layout (`quantised`: the codes of `graph.vectors`),
/// writes it, re-opens and verifies the file, and measures self-recall.
fn write_checked(
    path: &Path,
    graph: &GraphLayout<'_>,
    quantised: Quantised<'_>,
    skus: &SkuSections,
    started: Instant,
) -> Result<SegmentStats, SegmentError> {
    let n = graph.levels.len();
    let mut upper_offsets = Vec::with_capacity(n + 1);
    let mut rows = 0u64;
    upper_offsets.push(0u32);
    for &l in graph.levels {
        rows += u64::from(l);
        let Ok(r) = u32::try_from(rows) else {
            return Err(invalid_param(path, "upper rows", rows as usize, "must fit in u32"));
        };
        upper_offsets.push(r);
    }
    let max_level = usize::from(graph.levels[graph.entry_point as usize]);
    if max_level > MAX_LEVEL as usize {
        return Err(invalid_param(path, "max_level", max_level, "must be <= 15"));
    }
    let (codes, scales) = quantised;
    let view = View {
        n,
        dim: graph.dim,
        m: graph.m,
        entry_point: graph.entry_point,
        max_level,
        vectors: graph.vectors,
        layer0: graph.layer0,
        upper_offsets: &upper_offsets,
        upper: graph.upper,
        levels: graph.levels,
        codes,
        scales,
        sku_offsets: &skus.offsets,
        sku_bytes: &skus.bytes,
        sku_sorted: &skus.sorted,
    };
    check_structure(&view).map_err(|(section, index, reason)| {
        if section == SectionId::Vectors {
            SegmentError::InvalidVector { path: path.to_path_buf(), index, reason }
        } else {
            SegmentError::Corrupt {
                path: path.to_path_buf(),
                section: section.name(),
                index: index as u64,
                reason,
            }
        }
    })?;
    write_file(path, &view, graph.ef_construction as u32)?;
    let checked = Segment::open(path).and_then(|seg| seg.verify().map(|()| seg));
    let segment = match checked {
        Ok(seg) => seg,
        Err(e) => {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
    };
    // A flat segment's exact scan always finds an item itself.
    let self_recall = if segment.has_graph() { self_recall(&segment) } else { 1.0 };
    if self_recall < 0.99 {
        tracing::warn!(path = %path.display(), self_recall, "segment self-recall below 0.99");
    }
    let default_ef = super::calibrate::calibrate_ef(&segment);
    Ok(SegmentStats {
        count: n,
        dim: graph.dim,
        self_recall,
        default_ef,
        build_secs: started.elapsed().as_secs_f64(),
        bytes: segment.file_len(),
    })
}

/// Fraction of sampled items that the graph walk (never a scan) finds in their own top 10 at
/// the default ef: the graph's own quality, whatever plan searches would pick.
fn self_recall(segment: &Segment) -> f32 {
    let n = segment.len();
    let sample = n.min(SELF_RECALL_SAMPLE);
    let k = n.min(10);
    let found = (0..sample)
        .into_par_iter()
        .filter(|&j| {
            let idx = (j * n / sample) as u32;
            crate::background::yield_point();
            segment
                .search_as(segment.vector(idx), k, DEFAULT_EF_SEARCH, None, SearchPlan::Graph)
                .is_ok_and(|hits| hits.iter().any(|h| h.idx == idx))
        })
        .count();
    found as f32 / sample as f32
}

fn section_bytes<'a>(view: &View<'a>, id: SectionId) -> &'a [u8] {
    match id {
        SectionId::Vectors => bytemuck::cast_slice(view.vectors),
        SectionId::Layer0 => bytemuck::cast_slice(view.layer0),
        SectionId::UpperOffsets => bytemuck::cast_slice(view.upper_offsets),
        SectionId::Upper => bytemuck::cast_slice(view.upper),
        SectionId::Levels => view.levels,
        SectionId::SkuOffsets => bytemuck::cast_slice(view.sku_offsets),
        SectionId::SkuBytes => view.sku_bytes,
        SectionId::SkuSorted => bytemuck::cast_slice(view.sku_sorted),
        SectionId::Codes => bytemuck::cast_slice(view.codes),
        SectionId::Scales => bytemuck::cast_slice(view.scales),
    }
}

/// Streams header, sections (zero-padded to alignment) and footer through a crash-safe
/// temp-file-and-rename.
fn write_file(path: &Path, view: &View<'_>, ef_construction: u32) -> Result<(), SegmentError> {
    let bodies: [&[u8]; SECTION_COUNT] = SectionId::ALL.map(|id| section_bytes(view, id));
    let lens = bodies.map(|b| b.len() as u64);
    let (sections, file_len) =
        plan_layout(&lens).ok_or_else(|| invalid_param(path, "file size", usize::MAX, "overflows u64"))?;
    let header = Header {
        magic: HEADER_MAGIC,
        version: version_for(view.m),
        header_len: HEADER_LEN as u32,
        dim: view.dim as u32,
        m: view.m as u32,
        count: view.n as u64,
        entry_point: view.entry_point,
        max_level: view.max_level as u32,
        ef_construction,
        reserved0: 0,
        file_len,
        sections,
        reserved1: [0; 5],
    };
    let mut footer = Footer {
        magic: FOOTER_MAGIC,
        version: version_for(view.m),
        header_crc: header.compute_crc(),
        section_crc: bodies.map(super::format::crc32_yielding),
        reserved: [0; 1],
        footer_crc: 0,
    };
    footer.footer_crc = footer.compute_crc();
    const ZEROS: [u8; 64] = [0; 64];
    atomic_write_with(path, |w| {
        w.write_all(bytemuck::bytes_of(&header))?;
        let mut pos = HEADER_LEN;
        for (section, body) in sections.iter().zip(bodies) {
            w.write_all(&ZEROS[..(section.offset - pos) as usize])?;
            w.write_all(body)?;
            pos = section.offset + section.len;
        }
        let footer_at = file_len - super::format::FOOTER_LEN;
        w.write_all(&ZEROS[..(footer_at - pos) as usize])?;
        w.write_all(bytemuck::bytes_of(&footer))
    })
    .map_err(|e| SegmentError::io(path, e))
}
