//! k-nearest-neighbour search over a mapped segment: HNSW (greedy descent on the upper layers,
//! ef-bounded best-first search on layer 0) and exact brute force. Score = dot product of
//! L2-normalised vectors (cosine similarity; higher is better).
//!
//! The hot loops run on flat slices of the mapping, with per-thread scratch (an epoch-stamped
//! visited array and two preallocated binary heaps), so a query allocates only its result.
//! Neighbour ids are range-checked against `n` (which also catches the `u32::MAX` empty-slot
//! marker), so a damaged graph yields poor results rather than a panic.

use std::cell::RefCell;

use multiversion::multiversion;
use multiversion::target::target_cfg_f;

use super::distance::{dot, dot_body, dot_wide_body, normalise_into, quantise_scaled, touch_lines};
use super::error::SegmentError;
use super::heap::{TopK, Walk};
use super::reader::{Segment, View};

/// [`Segment::search`] scans a segment exactly when it holds at most this many times `ef` items.
pub const EXACT_SCAN_FACTOR: usize = 4;

/// One search result: the item's index in the segment and its cosine similarity to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub idx: u32,
    pub score: f32,
}

/// Per-thread reusable search state.
#[derive(Default)]
struct Scratch {
    walk: Walk,
    query: Vec<f32>,
    /// The query times the per-dimension scales, quantised to `i16` (the int8 walk's query).
    wide: Vec<i16>,
    ids: Vec<u32>,
    scores: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Runs `f` with this thread's scratch (or a fresh one if it is already borrowed, e.g. from
/// a filter closure that itself searches).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

type Filter<'f> = Option<&'f dyn Fn(u32) -> bool>;

impl Segment {
    /// Approximate top-`k` by cosine similarity (HNSW; `ef` >= `k` candidates kept on layer 0,
    /// see [`DEFAULT_EF_SEARCH`](super::DEFAULT_EF_SEARCH)). The query need not be normalised.
    /// With a `filter`, items for which it returns false are traversed but never returned
    /// (tombstones). Hits are sorted by score descending, ties by index ascending.
    ///
    /// A segment of at most [`EXACT_SCAN_FACTOR`]` * max(ef, k)` items is scanned exactly
    /// instead: the walk would compute about as many distances, and a small pruned graph can
    /// leave an item that no walk reaches.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Filter<'_>,
    ) -> Result<Vec<Hit>, SegmentError> {
        let view = self.view();
        with_scratch(|s| {
            self.prepare_query(query, &mut s.query)?;
            if k == 0 {
                return Ok(Vec::new());
            }
            let ef = ef.max(k);
            if view.n <= ef.saturating_mul(EXACT_SCAN_FACTOR) {
                s.walk.results.clear();
                brute_force_impl(&view, &s.query, k, filter, &mut s.walk.results);
                return Ok(s.walk.results.sorted_hits(k));
            }
            s.walk.begin(view.n);
            let Scratch { walk: w, query, wide, ids, scores } = s;
            // A format-1 segment has no codes (and no scales): its walk scores exactly.
            let factor = if view.codes.is_empty() {
                wide.clear();
                0.0
            } else {
                quantise_scaled(query, view.scales, wide)
            };
            walk(&view, query, (wide, factor), ef, filter, w, ids, scores);
            let results = &mut w.results;
            if view.codes.is_empty() {
                return Ok(results.sorted_hits(k));
            }
            // The walk ranked by int8 scores: rescore its `ef` best with the exact vectors.
            let mut hits = results.sorted_hits(ef);
            for h in &mut hits {
                let at = h.idx as usize * view.dim;
                h.score = view.vectors.get(at..at + view.dim).map_or(f32::NEG_INFINITY, |v| dot(query, v));
            }
            hits.sort_unstable_by(|a, b| b.score.total_cmp(&a.score).then(a.idx.cmp(&b.idx)));
            hits.truncate(k);
            Ok(hits)
        })
    }

    /// Exact top-`k` by cosine similarity over every item (same ordering and filter rules as
    /// [`search`](Self::search)).
    pub fn brute_force(&self, query: &[f32], k: usize, filter: Filter<'_>) -> Result<Vec<Hit>, SegmentError> {
        let view = self.view();
        with_scratch(|s| {
            self.prepare_query(query, &mut s.query)?;
            s.walk.results.clear();
            brute_force_impl(&view, &s.query, k, filter, &mut s.walk.results);
            Ok(s.walk.results.sorted_hits(k))
        })
    }

    /// Checks the query's length and values and writes its normalised copy into `out`.
    fn prepare_query(&self, query: &[f32], out: &mut Vec<f32>) -> Result<(), SegmentError> {
        if query.len() != self.dim() {
            return Err(SegmentError::DimMismatch {
                path: self.path().to_path_buf(),
                expected: self.dim(),
                actual: query.len(),
            });
        }
        out.clear();
        normalise_into(query, out)
            .map_err(|reason| SegmentError::InvalidQuery { path: self.path().to_path_buf(), reason })
    }
}

#[inline(always)]
fn dot_sel<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    dot_body::<FMA>(a, b)
}

/// The HNSW walk: greedy descent through the upper layers, then the `ef`-wide search of
/// layer 0, leaving the best `ef` filter-passing nodes in `results`. Scores are exact (f32
/// vectors) in a version-1 segment and int8 approximations (the `wide` query, see
/// [`quantise_scaled`], against the codes) in a quantised one.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets("x86_64+avx512f+avx512bw+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn walk(
    view: &View<'_>,
    q: &[f32],
    wide: (&[i16], f32),
    ef: usize,
    filter: Filter<'_>,
    w: &mut Walk,
    ids: &mut Vec<u32>,
    scores: &mut Vec<f32>,
) {
    let dim = view.dim;
    let exact = |i: u32| {
        let at = i as usize * dim;
        view.vectors.get(at..at + dim).map_or(f32::NEG_INFINITY, |v| {
            if target_cfg_f!(target_feature = "fma") { dot_sel::<true>(q, v) } else { dot_sel::<false>(q, v) }
        })
    };
    let (wq, factor) = wide;
    let coded = |i: u32| {
        let at = i as usize * dim;
        view.codes.get(at..at + dim).map_or(f32::NEG_INFINITY, |c| dot_wide_body(wq, c) as f32 * factor)
    };
    let touch_vector = |i: u32| {
        let at = i as usize * dim;
        view.vectors.get(at..at + dim).map_or(0, |v| touch_lines(bytemuck::cast_slice(v)))
    };
    let touch_code = |i: u32| {
        let at = i as usize * dim;
        view.codes.get(at..at + dim).map_or(0, |c| touch_lines(bytemuck::cast_slice(c)))
    };
    if view.codes.is_empty() {
        let entry = greedy_upper_body(view, &exact);
        search_layer0_body(view, &exact, &touch_vector, entry, ef, filter, w, ids, scores);
    } else {
        let entry = greedy_upper_body(view, &coded);
        search_layer0_body(view, &coded, &touch_code, entry, ef, filter, w, ids, scores);
    }
}

/// Greedy descent from the entry point through layers max_level..1; returns the layer-0 entry.
#[inline(always)]
fn greedy_upper_body<F: Fn(u32) -> f32>(view: &View<'_>, score: &F) -> (u32, f32) {
    let n = view.n as u32;
    let mut cur = view.entry_point;
    let mut cur_score = score(cur);
    for layer in (1..=view.max_level).rev() {
        loop {
            let mut improved = false;
            let Some(row) = view.upper_row(cur as usize, layer) else { break };
            for &nb in row {
                if nb >= n {
                    break;
                }
                let s = score(nb);
                if s > cur_score {
                    cur_score = s;
                    cur = nb;
                    improved = true;
                }
            }
            if !improved {
                break;
            }
        }
    }
    (cur, cur_score)
}

/// Best-first search on layer 0 from `entry`, keeping the best `ef` filter-passing nodes in
/// `results`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn search_layer0_body<F: Fn(u32) -> f32, T: Fn(u32) -> u8>(
    view: &View<'_>,
    score: &F,
    touch: &T,
    entry: (u32, f32),
    ef: usize,
    filter: Filter<'_>,
    w: &mut Walk,
    ids: &mut Vec<u32>,
    scores: &mut Vec<f32>,
) {
    let Walk { visited, epoch, candidates, results } = w;
    let (visited, epoch) = (&mut visited[..view.n], *epoch);
    let n = view.n as u32;
    let degree = 2 * view.m;
    let (ep, ep_score) = entry;
    if ep >= n {
        return;
    }
    visited[ep as usize] = epoch;
    candidates.push(ep_score, ep);
    if filter.is_none_or(|f| f(ep)) {
        results.offer(ep_score, ep, ef);
    }
    while let Some((c_score, c)) = candidates.pop() {
        if results.len() >= ef && c_score < results.worst() {
            break;
        }
        let start = c as usize * degree;
        let Some(row) = view.layer0.get(start..start + degree) else { continue };
        // Three passes per candidate: collect unvisited neighbours, score them all (a loop
        // with no data-dependent branches, so the CPU overlaps the vectors' cache misses),
        // then update the heaps.
        ids.clear();
        for &nb in row {
            if nb >= n {
                break;
            }
            let slot = &mut visited[nb as usize];
            if *slot != epoch {
                *slot = epoch;
                ids.push(nb);
            }
        }
        let mut touched = 0u8;
        for &nb in ids.iter() {
            touched ^= touch(nb);
        }
        std::hint::black_box(touched);
        scores.clear();
        for &nb in ids.iter() {
            scores.push(score(nb));
        }
        for (&nb, &s) in ids.iter().zip(scores.iter()) {
            if results.len() < ef || s > results.worst() {
                candidates.push(s, nb);
                if filter.is_none_or(|f| f(nb)) {
                    results.offer(s, nb, ef);
                }
            }
        }
    }
}

#[multiversion(targets("x86_64+avx512f+avx512bw+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn brute_force_impl(view: &View<'_>, q: &[f32], k: usize, filter: Filter<'_>, out: &mut TopK) {
    if target_cfg_f!(target_feature = "fma") {
        brute_force_body::<true>(view, q, k, filter, out)
    } else {
        brute_force_body::<false>(view, q, k, filter, out)
    }
}

#[inline(always)]
fn brute_force_body<const FMA: bool>(
    view: &View<'_>,
    q: &[f32],
    k: usize,
    filter: Filter<'_>,
    out: &mut TopK,
) {
    if k == 0 {
        return;
    }
    for (i, v) in view.vectors.chunks_exact(view.dim).enumerate() {
        let idx = i as u32;
        if filter.is_some_and(|f| !f(idx)) {
            continue;
        }
        out.offer(dot_sel::<FMA>(q, v), idx, k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::SkuId;
    use crate::segment::synth::Structured;
    use crate::segment::{HnswParams, write_segment};

    /// The visited array is stamped with a u16 epoch that wraps after 65535 queries: a stale
    /// stamp would mark unvisited nodes as visited and change the answer.
    #[test]
    fn results_stay_correct_across_epoch_wraparound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wrap.vseg");
        let (n, k, ef) = (200, 10, 10);
        assert!(n > ef * EXACT_SCAN_FACTOR, "the graph walk must run, not the exact scan");
        let shape = Structured { dim: 4, latent: 2, noise: 0.1, seed: 3 };
        let skus: Vec<SkuId> = (0..n).map(|i| SkuId::new(format!("w{i}")).unwrap()).collect();
        write_segment(&path, 4, &shape.rows(0, n), &skus, &HnswParams::default()).unwrap();
        let seg = Segment::open(&path).unwrap();
        let q = shape.rows(1_000, 1);
        // The walk is approximate (the graph build is not deterministic), but each hit it
        // returns carries its exact score, and the same query always gets the same answer.
        let first = seg.search(&q, k, ef, None).unwrap();
        assert_eq!(first.len(), k);
        let exact = seg.brute_force(&q, n, None).unwrap();
        for hit in &first {
            assert!(exact.contains(hit), "{hit:?}");
        }
        for i in 0..70_000 {
            let got = seg.search(&q, k, ef, None).unwrap();
            assert_eq!(got, first, "query {i}");
        }
    }

    /// Small segments are scanned exactly, so every item can be found whatever the graph.
    #[test]
    fn small_segments_are_searched_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("small.vseg");
        let shape = Structured { dim: 8, latent: 3, noise: 0.3, seed: 5 };
        let n = 40;
        let skus: Vec<SkuId> = (0..n).map(|i| SkuId::new(format!("s{i}")).unwrap()).collect();
        write_segment(&path, 8, &shape.rows(0, n), &skus, &HnswParams::default()).unwrap();
        let seg = Segment::open(&path).unwrap();
        let keep_odd = |idx: u32| idx % 2 == 1;
        for j in 0..50 {
            let q = shape.rows(500 + j, 1);
            assert_eq!(seg.search(&q, n, 10, None).unwrap(), seg.brute_force(&q, n, None).unwrap());
            assert_eq!(
                seg.search(&q, 5, 10, Some(&keep_odd)).unwrap(),
                seg.brute_force(&q, 5, Some(&keep_odd)).unwrap()
            );
        }
    }
}
