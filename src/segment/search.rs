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

use super::distance::{dot_body, normalise_into};
use super::error::SegmentError;
use super::reader::{Segment, View};

/// [`Segment::search`] scans a segment exactly when it holds at most this many times `ef` items.
pub const EXACT_SCAN_FACTOR: usize = 4;

/// One search result: the item's index in the segment and its cosine similarity to the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub idx: u32,
    pub score: f32,
}

/// A binary max-heap of (key, id) with f32 keys, kept in a reusable Vec.
#[derive(Default)]
struct Heap {
    items: Vec<(f32, u32)>,
}

impl Heap {
    #[inline(always)]
    fn clear(&mut self) {
        self.items.clear();
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.items.len()
    }

    #[inline(always)]
    fn top_key(&self) -> f32 {
        self.items.first().map_or(f32::NEG_INFINITY, |t| t.0)
    }

    #[inline(always)]
    fn push(&mut self, key: f32, id: u32) {
        let items = &mut self.items;
        let mut pos = items.len();
        items.push((key, id));
        while pos > 0 {
            let parent = (pos - 1) / 2;
            if items[parent].0 >= key {
                break;
            }
            items[pos] = items[parent];
            pos = parent;
        }
        items[pos] = (key, id);
    }

    #[inline(always)]
    fn pop(&mut self) -> Option<(f32, u32)> {
        let last = self.items.pop()?;
        if self.items.is_empty() {
            return Some(last);
        }
        let top = self.items[0];
        self.sift_down_from_root(last);
        Some(top)
    }

    /// Replaces the top with (key, id) and restores the heap (pop + push in one pass).
    #[inline(always)]
    fn replace_top(&mut self, key: f32, id: u32) {
        self.sift_down_from_root((key, id));
    }

    #[inline(always)]
    fn sift_down_from_root(&mut self, item: (f32, u32)) {
        let items = &mut self.items[..];
        let len = items.len();
        let mut pos = 0;
        loop {
            let left = 2 * pos + 1;
            if left >= len {
                break;
            }
            let right = left + 1;
            let child = if right < len && items[right].0 > items[left].0 { right } else { left };
            if items[child].0 <= item.0 {
                break;
            }
            items[pos] = items[child];
            pos = child;
        }
        items[pos] = item;
    }
}

/// Keeps the best `cap` (score, id) pairs seen: a min-heap on score (stored negated).
#[derive(Default)]
struct TopK {
    heap: Heap,
}

impl TopK {
    #[inline(always)]
    fn clear(&mut self) {
        self.heap.clear();
    }

    #[inline(always)]
    fn len(&self) -> usize {
        self.heap.len()
    }

    /// Lowest score kept; +inf when empty.
    #[inline(always)]
    fn worst(&self) -> f32 {
        -self.heap.top_key()
    }

    /// Offers a result; keeps at most `cap`.
    #[inline(always)]
    fn offer(&mut self, score: f32, id: u32, cap: usize) {
        if self.heap.len() < cap {
            self.heap.push(-score, id);
        } else if score > self.worst() {
            self.heap.replace_top(-score, id);
        }
    }

    /// The kept results, best first, ties broken by lower index; at most `k`.
    fn sorted_hits(&self, k: usize) -> Vec<Hit> {
        let mut hits: Vec<Hit> = self.heap.items.iter().map(|&(neg, idx)| Hit { idx, score: -neg }).collect();
        hits.sort_unstable_by(|a, b| b.score.total_cmp(&a.score).then(a.idx.cmp(&b.idx)));
        hits.truncate(k);
        hits
    }
}

/// Per-thread reusable search state.
#[derive(Default)]
struct Scratch {
    visited: Vec<u16>,
    epoch: u16,
    candidates: Heap,
    results: TopK,
    query: Vec<f32>,
    ids: Vec<u32>,
    scores: Vec<f32>,
}

impl Scratch {
    /// Starts a new query over `n` nodes: a fresh visited epoch, empty heaps.
    fn begin(&mut self, n: usize) {
        if self.visited.len() < n {
            self.visited.resize(n, 0);
        }
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.visited.fill(0);
            self.epoch = 1;
        }
        self.candidates.clear();
        self.results.clear();
    }
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
                s.results.clear();
                brute_force_impl(&view, &s.query, k, filter, &mut s.results);
                return Ok(s.results.sorted_hits(k));
            }
            s.begin(view.n);
            let Scratch { visited, epoch, candidates, results, query, ids, scores } = s;
            let entry = greedy_upper(&view, query);
            let visited = &mut visited[..view.n];
            search_layer0(&view, query, entry, ef, filter, visited, *epoch, candidates, results, ids, scores);
            Ok(results.sorted_hits(k))
        })
    }

    /// Exact top-`k` by cosine similarity over every item (same ordering and filter rules as
    /// [`search`](Self::search)).
    pub fn brute_force(&self, query: &[f32], k: usize, filter: Filter<'_>) -> Result<Vec<Hit>, SegmentError> {
        let view = self.view();
        with_scratch(|s| {
            self.prepare_query(query, &mut s.query)?;
            s.results.clear();
            brute_force_impl(&view, &s.query, k, filter, &mut s.results);
            Ok(s.results.sorted_hits(k))
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

/// Greedy descent from the entry point through layers max_level..1; returns the layer-0 entry.
#[multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn greedy_upper(view: &View<'_>, q: &[f32]) -> (u32, f32) {
    if target_cfg_f!(target_feature = "fma") {
        greedy_upper_body::<true>(view, q)
    } else {
        greedy_upper_body::<false>(view, q)
    }
}

#[inline(always)]
fn greedy_upper_body<const FMA: bool>(view: &View<'_>, q: &[f32]) -> (u32, f32) {
    let (n, dim) = (view.n as u32, view.dim);
    let vec_of = |i: u32| &view.vectors[i as usize * dim..(i as usize + 1) * dim];
    let mut cur = view.entry_point;
    let mut cur_score = dot_sel::<FMA>(q, vec_of(cur));
    for layer in (1..=view.max_level).rev() {
        loop {
            let mut improved = false;
            let Some(row) = view.upper_row(cur as usize, layer) else { break };
            for &nb in row {
                if nb >= n {
                    break;
                }
                let s = dot_sel::<FMA>(q, vec_of(nb));
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
#[multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
fn search_layer0(
    view: &View<'_>,
    q: &[f32],
    entry: (u32, f32),
    ef: usize,
    filter: Filter<'_>,
    visited: &mut [u16],
    epoch: u16,
    candidates: &mut Heap,
    results: &mut TopK,
    ids: &mut Vec<u32>,
    scores: &mut Vec<f32>,
) {
    if target_cfg_f!(target_feature = "fma") {
        search_layer0_body::<true>(
            view, q, entry, ef, filter, visited, epoch, candidates, results, ids, scores,
        )
    } else {
        search_layer0_body::<false>(
            view, q, entry, ef, filter, visited, epoch, candidates, results, ids, scores,
        )
    }
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn search_layer0_body<const FMA: bool>(
    view: &View<'_>,
    q: &[f32],
    entry: (u32, f32),
    ef: usize,
    filter: Filter<'_>,
    visited: &mut [u16],
    epoch: u16,
    candidates: &mut Heap,
    results: &mut TopK,
    ids: &mut Vec<u32>,
    scores: &mut Vec<f32>,
) {
    let n = visited.len() as u32;
    let dim = view.dim;
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
        scores.clear();
        for &nb in ids.iter() {
            let at = nb as usize * dim;
            let s = match view.vectors.get(at..at + dim) {
                Some(v) => dot_sel::<FMA>(q, v),
                None => f32::NEG_INFINITY,
            };
            scores.push(s);
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

#[multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
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

    #[test]
    fn heaps_order_and_bound() {
        let mut h = Heap::default();
        for (i, k) in [3.0f32, -1.0, 7.5, 0.0, 7.5, 2.0].into_iter().enumerate() {
            h.push(k, i as u32);
        }
        let keys: Vec<f32> = std::iter::from_fn(|| h.pop().map(|t| t.0)).collect();
        assert_eq!(keys, vec![7.5, 7.5, 3.0, 2.0, 0.0, -1.0]);
        let mut top = TopK::default();
        for (i, s) in [0.1f32, 0.9, 0.5, 0.7, 0.3, 0.9].into_iter().enumerate() {
            top.offer(s, i as u32, 3);
        }
        assert_eq!(top.len(), 3);
        assert_eq!(top.worst(), 0.7);
        let hits = top.sorted_hits(10);
        let got: Vec<(u32, f32)> = hits.iter().map(|h| (h.idx, h.score)).collect();
        assert_eq!(got, vec![(1, 0.9), (5, 0.9), (3, 0.7)]);
    }

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
