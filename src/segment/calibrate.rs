//! Per-segment default `ef`: when a segment is written, the smallest `ef` of a fixed ladder at
//! which the graph walk reaches [`TARGET_RECALL`] recall@10 against exact search, measured
//! leave-one-out on a sample of the segment's own items: each item is a query whose true
//! neighbours are the other items, and the walk runs as if the item were not in the graph
//! ([`Segment::search_without`]), since a walk that reaches the item itself finds its
//! neighbours through its own neighbour list, which held-out queries cannot (plain self-queries
//! measured 0.96 where held-out ones got 0.91). Large or hard segments need a wider beam than
//! small ones (1M x 1,280 structured vectors gave recall@10 0.77 at `ef` 64), and a caller who
//! leaves `ef` at 0 gets the segment's own.

use rayon::prelude::*;

use super::{DEFAULT_EF_SEARCH, FLAT_SCAN_FACTOR, Hit, SearchPlan, Segment};

/// Recall@10 the calibrated `ef` reaches on the sample: above the promised 0.95, as a margin
/// for the sample's own error (about ±0.005 at 256 queries).
pub const TARGET_RECALL: f64 = 0.96;
/// Queries in the sample.
const SAMPLE: usize = 256;
/// Neighbours scored.
const K: usize = 10;
/// The `ef` values tried, in order; the last is used when none reaches the target.
pub const LADDER: [usize; 9] = [DEFAULT_EF_SEARCH, 96, 128, 192, 256, 384, 512, 768, 1024];

/// The default `ef` of `segment`: [`DEFAULT_EF_SEARCH`] for a flat segment or one small enough
/// that a search at that `ef` scans it exactly, else the first rung of [`LADDER`] whose sampled
/// recall@10 reaches [`TARGET_RECALL`] (the last rung if none does). Reads the whole segment
/// once per query for the exact answers: run it where the segment was just built.
pub fn calibrate_ef(segment: &Segment) -> usize {
    let n = segment.len();
    if !segment.has_graph() || n <= DEFAULT_EF_SEARCH * FLAT_SCAN_FACTOR || n <= K + 1 {
        return DEFAULT_EF_SEARCH;
    }
    let sample = n.min(SAMPLE);
    let queries: Vec<u32> = (0..sample).map(|j| (j * n / sample) as u32).collect();
    // The exact neighbours of each query, itself left out.
    let truth: Vec<Vec<u32>> = queries
        .par_iter()
        .map(|&q| {
            crate::background::yield_point();
            let hits = segment.search_as(segment.vector(q), K + 1, K + 1, None, SearchPlan::Exact);
            others(q, hits.unwrap_or_default())
        })
        .collect();
    for &ef in &LADDER {
        let found: usize = queries
            .par_iter()
            .zip(&truth)
            .map(|(&q, want)| {
                crate::background::yield_point();
                let got = others(q, segment.search_without(segment.vector(q), K, ef, q).unwrap_or_default());
                want.iter().filter(|w| got.contains(w)).count()
            })
            .sum();
        let wanted: usize = truth.iter().map(Vec::len).sum();
        if wanted == 0 || found as f64 / wanted as f64 >= TARGET_RECALL {
            return ef;
        }
    }
    LADDER[LADDER.len() - 1]
}

/// The first [`K`] hits other than the query item itself.
fn others(query: u32, hits: Vec<Hit>) -> Vec<u32> {
    hits.into_iter().map(|h| h.idx).filter(|&i| i != query).take(K).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SkuId;
    use crate::segment::synth::Structured;
    use crate::segment::{HnswParams, write_segment};

    /// `n` rows of `shape` written as a segment with `params`: the folder (kept while the
    /// guard lives), the open segment and the writer's calibrated `ef`.
    fn written(shape: &Structured, n: usize, params: HnswParams) -> (tempfile::TempDir, Segment, usize) {
        let rows = shape.rows(0, n);
        let skus: Vec<SkuId> = (0..n).map(|i| SkuId::new(format!("s{i}")).unwrap()).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seg.vseg");
        let stats = write_segment(&path, shape.dim, &rows, &skus, &params).unwrap();
        let seg = Segment::open(&path).unwrap();
        (dir, seg, stats.default_ef)
    }

    /// Recall@10 of the graph walk at `ef` for held-out `queries`, against exact search.
    fn held_out_recall(seg: &Segment, queries: &[f32], ef: usize) -> f64 {
        let (mut found, mut wanted) = (0, 0);
        for q in queries.chunks_exact(seg.dim()) {
            let truth = seg.search_as(q, K, K, None, SearchPlan::Exact).unwrap();
            let got = seg.search_as(q, K, ef, None, SearchPlan::Graph).unwrap();
            found += truth.iter().filter(|t| got.iter().any(|g| g.idx == t.idx)).count();
            wanted += truth.len();
        }
        found as f64 / wanted as f64
    }

    #[test]
    fn a_poor_graph_gets_the_beam_that_brings_held_out_recall_to_the_target() {
        // A deliberately thin graph (M=4, ef_construction 24) on data of intrinsic dimension 32:
        // the fixed default beam misses neighbours that a wider one finds.
        let shape = Structured { dim: 64, latent: 32, noise: 0.1, seed: 7 };
        let (_dir, seg, default_ef) = written(&shape, 6000, HnswParams { m: 4, ef_construction: 24 });
        assert_eq!(default_ef, calibrate_ef(&seg), "the writer reports the calibration");
        let queries = shape.rows(1 << 40, 200);
        let at_default = held_out_recall(&seg, &queries, DEFAULT_EF_SEARCH);
        let calibrated = held_out_recall(&seg, &queries, default_ef);
        assert!(default_ef > DEFAULT_EF_SEARCH, "ef {} (recall at 64: {at_default})", default_ef);
        assert!(at_default < 0.95, "the data is not hard enough: {at_default} at ef 64");
        assert!(calibrated >= 0.94, "held-out recall@10 {calibrated} at the calibrated ef {}", default_ef);
        // The smallest rung that does it: the one below falls short on the sample.
        let below = LADDER[LADDER.iter().position(|&e| e == default_ef).unwrap() - 1];
        let sample_recall = held_out_recall(&seg, &queries, below);
        assert!(sample_recall < calibrated, "rung {below} did as well: {sample_recall}");
    }

    #[test]
    fn small_segments_keep_the_default() {
        let shape = Structured { dim: 16, latent: 8, noise: 0.1, seed: 1 };
        let n = DEFAULT_EF_SEARCH * FLAT_SCAN_FACTOR;
        let (_dir, _seg, default_ef) = written(&shape, n, HnswParams { m: 4, ef_construction: 24 });
        assert_eq!(default_ef, DEFAULT_EF_SEARCH, "searched exactly at the default anyway");
    }
}
