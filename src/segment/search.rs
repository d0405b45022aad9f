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

use super::distance::{WideDot, dot, dot_body, normalise_into, quantise_scaled, touch_lines};
use super::error::SegmentError;
use super::heap::{TopK, Walk};
use super::reader::{Segment, View};
use super::sketch::{Sketch, SketchQuery};

/// [`Segment::search`] scans a segment exactly when it holds at most this many times `ef` items.
pub const EXACT_SCAN_FACTOR: usize = 4;

/// [`Segment::search`] scans a segment's int8 codes (exactly, see [`flat_scan`]) instead of
/// walking its graph when it holds at most this many times `ef` items: a walk on a small
/// segment scores most of its items anyway, in random order, while the scan reads the codes
/// once, in order. Measured with `cargo run --release --example flat_scan` (README, performance).
pub const FLAT_SCAN_FACTOR: usize = 64;

/// The scan of a segment of at least this many items (and at most [`SKETCH_MAX_ITEMS`], with
/// at least [`SKETCH_MIN_DIM`] dimensions) first rules items out by their one-bit sketches
/// ([`super::sketch`]); below it the int8 pass alone is cheap enough.
pub const SKETCH_MIN_ITEMS: usize = 1024;
/// Beyond this many items a segment is walked, not scanned, unless a caller asks for the exact
/// plan; sketches are then not worth their memory (about 180 bytes per item at 1,280 dims).
pub const SKETCH_MAX_ITEMS: usize = 65_536;
/// Fewer dimensions make the sketch's estimate too coarse to rule much out.
pub const SKETCH_MIN_DIM: usize = 64;

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
    /// [`flat_scan`]'s lower bounds, for the selection of the k-th.
    lows: Vec<f32>,
    /// The query prepared for a sketch, and the sketch's estimates and margins.
    sketch_query: SketchQuery,
    bounds: Vec<(f32, f32)>,
    seeds: TopK,
    seeded: Vec<(f32, u32)>,
    cands: Vec<(f32, u32)>,
    /// A row read for rescoring ([`Segment::rescore_row`]).
    row: Vec<f32>,
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

/// How [`Segment::search_as`] finds the top `k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SearchPlan {
    /// By size: an exact scan of a small segment, the graph walk beyond
    /// [`FLAT_SCAN_FACTOR`]` * ef` items.
    Auto,
    /// The HNSW walk (the scan on a flat segment, which has no graph).
    Graph,
    /// Exact: the int8 scan with exact rescoring, or the f32 scan (tiny segments, format 1).
    Exact,
}

impl Segment {
    /// Approximate top-`k` by cosine similarity (HNSW; `ef` >= `k` candidates kept on layer 0,
    /// see [`DEFAULT_EF_SEARCH`](super::DEFAULT_EF_SEARCH)). The query need not be normalised.
    /// With a `filter`, items for which it returns false are traversed but never returned
    /// (tombstones). Hits are sorted by score descending, ties by index ascending.
    ///
    /// A segment of at most [`EXACT_SCAN_FACTOR`]` * max(ef, k)` items is scanned exactly
    /// instead: the walk would compute about as many distances, and a small pruned graph can
    /// leave an item that no walk reaches. Up to [`FLAT_SCAN_FACTOR`]` * max(ef, k)` items,
    /// the int8 codes are scanned, with the same exact result ([`flat_scan`]).
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Filter<'_>,
    ) -> Result<Vec<Hit>, SegmentError> {
        self.search_as(query, k, ef, filter, SearchPlan::Auto)
    }

    /// [`search`](Self::search) by the given plan: the graph walk or the scan whatever the
    /// segment's size (benchmarks, and tests of the graph on small segments).
    pub fn search_as(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Filter<'_>,
        plan: SearchPlan,
    ) -> Result<Vec<Hit>, SegmentError> {
        self.search_hiding(query, k, ef, filter, plan, None)
    }

    /// The graph walk as if item `hidden` were not in the graph: it is never scored, entered
    /// or expanded, so its neighbour lists do not help (leave-one-out queries for
    /// [`calibrate`](super::calibrate); other items' lists were still chosen with it present).
    pub(super) fn search_without(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        hidden: u32,
    ) -> Result<Vec<Hit>, SegmentError> {
        self.search_hiding(query, k, ef, None, SearchPlan::Graph, Some(hidden))
    }

    fn search_hiding(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Filter<'_>,
        plan: SearchPlan,
        hidden: Option<u32>,
    ) -> Result<Vec<Hit>, SegmentError> {
        let view = self.view();
        with_scratch(|s| {
            self.prepare_query(query, &mut s.query)?;
            if k == 0 {
                return Ok(Vec::new());
            }
            let ef = ef.max(k);
            let plan = match plan {
                // A flat segment has no graph to walk.
                _ if view.m == 0 => SearchPlan::Exact,
                SearchPlan::Auto if self.scanned_at(ef) => SearchPlan::Exact,
                SearchPlan::Auto => SearchPlan::Graph,
                p => p,
            };
            if plan == SearchPlan::Exact {
                let Scratch {
                    walk: w,
                    query,
                    wide,
                    scores,
                    lows,
                    sketch_query,
                    bounds,
                    seeds,
                    seeded,
                    cands,
                    ..
                } = s;
                w.results.clear();
                // A tiny segment, or a format-1 one (no codes): the f32 scan.
                if view.codes.is_empty() || view.n <= ef.saturating_mul(EXACT_SCAN_FACTOR) {
                    brute_force_impl(&view, query, k, filter, &mut w.results);
                } else {
                    let sketch = self.scan_sketch().map(|sketch| SketchPass {
                        sketch,
                        query: sketch_query,
                        bounds,
                        seeds,
                        seeded,
                        cands,
                    });
                    flat_scan(&view, query, wide, k, filter, sketch, scores, lows, &mut w.results);
                }
                return Ok(w.results.sorted_hits(k));
            }
            s.walk.begin(view.n);
            if let Some(h) = hidden.filter(|&h| (h as usize) < view.n) {
                s.walk.visited[h as usize] = s.walk.epoch;
            }
            let Scratch { walk: w, query, wide, ids, scores, row, .. } = s;
            // A format-1 segment has no codes (and no scales): its walk scores exactly.
            let factor = if view.codes.is_empty() {
                wide.clear();
                0.0
            } else {
                quantise_scaled(query, view.scales, wide)
            };
            walk(&view, query, (wide, factor), ef, filter, hidden, w, ids, scores);
            let results = &mut w.results;
            if view.codes.is_empty() {
                return Ok(results.sorted_hits(k));
            }
            // The walk ranked by int8 scores: rescore its best with the exact vectors.
            let hits = results.sorted_hits(ef);
            let bound = code_error_bound(query, view.scales, factor);
            Ok(self.rescore(hits, query, k, bound, row))
        })
    }

    /// Whether a [`SearchPlan::Auto`] search at `ef` scans this segment instead of walking its
    /// graph: a flat segment, or one of at most [`FLAT_SCAN_FACTOR`]` * ef` items.
    pub fn scanned_at(&self, ef: usize) -> bool {
        !self.has_graph() || self.len() <= ef.saturating_mul(FLAT_SCAN_FACTOR)
    }

    /// The one-bit sketches [`flat_scan`] starts from, if they are built; `None` for a segment
    /// outside the sizes they pay off for ([`SKETCH_MIN_ITEMS`], [`SKETCH_MAX_ITEMS`],
    /// [`SKETCH_MIN_DIM`]) or without int8 codes, and until they are built. A search never
    /// waits for them (a pass over the vectors: about 45 ms for 4,096 items at 1,280 dims):
    /// the first one that would use them starts [`Segment::start_scan_sketch`] and scans
    /// without.
    pub(crate) fn scan_sketch(&self) -> Option<&Sketch> {
        let (cell, _) = self.sketch_cell();
        if let Some(built) = cell.get() {
            return built.as_ref();
        }
        self.start_scan_sketch();
        None
    }

    fn sketch_fits(&self) -> bool {
        let view = self.view();
        (SKETCH_MIN_ITEMS..=SKETCH_MAX_ITEMS).contains(&view.n)
            && view.dim >= SKETCH_MIN_DIM
            && !view.codes.is_empty()
    }

    /// Starts building the scan's sketches on a background thread in the idle scheduling class
    /// ([`crate::background`]), which maps the file again; at most once per segment. The
    /// index writer calls it when it publishes a segment that searches will scan.
    pub fn start_scan_sketch(&self) {
        let (cell, started) = self.sketch_cell();
        if cell.get().is_some() || started.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        if !self.sketch_fits() {
            let _ = cell.set(None);
            return;
        }
        let (cell, path) = (std::sync::Arc::clone(cell), self.path().to_path_buf());
        let spawned = std::thread::Builder::new().name("vitrine-sketch".into()).spawn(move || {
            crate::background::lower_current_thread();
            // A file merged away meanwhile no longer opens: its segment is on its way out.
            let built = Segment::open(&path).ok().map(|seg| Sketch::build(seg.view().vectors, seg.dim()));
            let _ = cell.set(built);
        });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "could not start a sketch thread; the segment is scanned without");
        }
    }

    /// Builds the scan's sketches now, on this thread, if this segment gets them; returns their
    /// size in bytes (0: none).
    pub fn prepare_scan(&self) -> usize {
        let (cell, _) = self.sketch_cell();
        cell.get_or_init(|| self.sketch_fits().then(|| Sketch::build(self.view().vectors, self.dim())))
            .as_ref()
            .map_or(0, Sketch::bytes)
    }

    /// The exact top `k` of a walk's candidates (`hits`, best int8 score first): their exact
    /// scores from the f32 rows. Only the candidates within `2 * bound` (`bound`: the int8
    /// scores' error bound) of the k-th best int8 score are read (the others cannot
    /// be in the top `k`, [`flat_scan`]'s argument): the same result, from a handful of rows
    /// instead of `ef` (each a `pread` in a large segment).
    fn rescore(
        &self,
        mut hits: Vec<Hit>,
        query: &[f32],
        k: usize,
        bound: f32,
        row: &mut Vec<f32>,
    ) -> Vec<Hit> {
        if hits.len() > k && k > 0 {
            let kth = hits[k - 1].score;
            let floor = kth - 2.0 * bound - 1e-5 * (1.0 + kth.abs());
            hits.truncate(hits.partition_point(|h| h.score >= floor));
        }
        for h in &mut hits {
            h.score = self.rescore_row(h.idx, row).map_or(f32::NEG_INFINITY, |v| dot(query, v));
        }
        hits.sort_unstable_by(|a, b| b.score.total_cmp(&a.score).then(a.idx.cmp(&b.idx)));
        hits.truncate(k);
        hits
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
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn walk(
    view: &View<'_>,
    q: &[f32],
    wide: (&[i16], f32),
    ef: usize,
    filter: Filter<'_>,
    hidden: Option<u32>,
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
    let wide_dot = WideDot::detect();
    let coded = |i: u32| {
        let at = i as usize * dim;
        view.codes.get(at..at + dim).map_or(f32::NEG_INFINITY, |c| wide_dot.dot(wq, c) as f32 * factor)
    };
    let touch_vector = |i: u32| {
        let at = i as usize * dim;
        view.vectors.get(at..at + dim).map_or(0, |v| touch_lines(bytemuck::cast_slice(v)))
    };
    let touch_code = |i: u32| {
        let at = i as usize * dim;
        view.codes.get(at..at + dim).map_or(0, |c| touch_lines(bytemuck::cast_slice(c)))
    };
    if let Some(h) = hidden {
        // Calibration only: the upper layers never step onto the hidden item (layer 0 never
        // reaches it either: it is marked visited).
        let exact_h = |i: u32| if i == h { f32::NEG_INFINITY } else { exact(i) };
        let coded_h = |i: u32| if i == h { f32::NEG_INFINITY } else { coded(i) };
        if view.codes.is_empty() {
            let entry = greedy_upper_body(view, &exact_h);
            search_layer0_body(view, &exact_h, &touch_vector, entry, ef, filter, w, ids, scores);
        } else {
            let entry = greedy_upper_body(view, &coded_h);
            search_layer0_body(view, &coded_h, &touch_code, entry, ef, filter, w, ids, scores);
        }
    } else if view.codes.is_empty() {
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

#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn brute_force_impl(view: &View<'_>, q: &[f32], k: usize, filter: Filter<'_>, out: &mut TopK) {
    if target_cfg_f!(target_feature = "fma") {
        brute_force_body::<true>(view, q, k, filter, out)
    } else {
        brute_force_body::<false>(view, q, k, filter, out)
    }
}

/// Exact top-`k` of a segment with int8 codes, in two passes: the int8 score of every item,
/// whose distance to the exact score is at most a bound `b` fixed by the query (each code is
/// off by at most half its dimension's scale, each query component by half the query's
/// factor); then the exact score of the items whose int8 score is within `2 b` of the k-th
/// best, the only ones that can be in the top `k`. Same result as [`Segment::brute_force`],
/// at a quarter of its memory traffic.
///
/// With a `sketch` ([`Segment::scan_sketch`]), [`sketch_candidates`] first rules most items
/// out on their one-bit sketches, and the int8 pass scores only the others.
#[allow(clippy::too_many_arguments)]
fn flat_scan(
    view: &View<'_>,
    q: &[f32],
    wide: &mut Vec<i16>,
    k: usize,
    filter: Filter<'_>,
    sketch: Option<SketchPass<'_>>,
    approx: &mut Vec<f32>,
    lows: &mut Vec<f32>,
    out: &mut TopK,
) {
    let dim = view.dim;
    let factor = quantise_scaled(q, view.scales, wide);
    let bound = code_error_bound(q, view.scales, factor);
    let exact = |i: usize| dot(q, &view.vectors[i * dim..(i + 1) * dim]);
    // Float slack: the int8 score is an f32 product of an exact integer sum.
    let floor_of = |kth: f32| kth - 2.0 * bound - 1e-5 * (1.0 + kth.abs());
    if let Some(pass) = sketch {
        let cands = sketch_candidates(view, (wide, factor, bound), k, filter, pass, q);
        lows.clear();
        lows.extend(cands.iter().map(|&(a, _)| a));
        let floor = kth_largest(lows, k).map_or(f32::NEG_INFINITY, floor_of);
        for &(a, i) in cands.iter() {
            if a >= floor {
                out.offer(exact(i as usize), i, k);
            }
        }
        return;
    }
    approx_scores(view, wide, factor, filter, approx);
    lows.clear();
    lows.extend(approx.iter().copied().filter(|a| a.is_finite()));
    let floor = kth_largest(lows, k).map_or(f32::NEG_INFINITY, floor_of);
    for (i, &a) in approx.iter().enumerate() {
        if a.is_finite() && a >= floor {
            out.offer(exact(i), i as u32, k);
        }
    }
}

/// The first pass of [`flat_scan`] on a segment with sketches: every item's estimate and
/// margin ([`Sketch::bounds`]); the `k` best estimates scored in int8, the lowest of which,
/// less the int8 bound, the k-th exact score is at least (k items score at least that); then
/// the int8 score of each item whose estimate plus its margin reaches that floor, the only
/// ones that can be in the top `k` unless an estimate is off by more than its margin. Returns
/// those `(int8 score, item)`, in index order (equal scores in the top `k` go to the first
/// offered). One margin wide, not two: the seeds' own scores are known.
fn sketch_candidates<'p>(
    view: &View<'_>,
    (wide, factor, bound): (&[i16], f32, f32),
    k: usize,
    filter: Filter<'_>,
    pass: SketchPass<'p>,
    q: &[f32],
) -> &'p [(f32, u32)] {
    let SketchPass { sketch, query: prepared, bounds, seeds, seeded, cands } = pass;
    sketch.prepare(q, prepared);
    sketch.bounds(prepared, filter, bounds);
    seeds.clear();
    for (i, &(e, _)) in bounds.iter().enumerate() {
        if e.is_finite() {
            seeds.offer(e, i as u32, k);
        }
    }
    seeds.drain_sorted_into(seeded);
    let floor = if seeded.len() < k {
        f32::NEG_INFINITY
    } else {
        // The seeds' estimates are not needed past here: their int8 scores replace them.
        int8_scores_of(view, wide, factor, seeded);
        let lowest = seeded.iter().map(|&(s, _)| s).fold(f32::INFINITY, f32::min);
        lowest - bound - 1e-5 * (1.0 + lowest.abs())
    };
    cands.clear();
    let reach = |&(e, m): &(f32, f32)| e.is_finite() && e + m >= floor;
    cands.extend(bounds.iter().enumerate().filter(|(_, b)| reach(b)).map(|(i, _)| (0.0, i as u32)));
    // A seed whose estimate was off by more than its margin still counts.
    let before = cands.len();
    cands.extend(seeded.iter().filter(|&&(_, i)| !reach(&bounds[i as usize])).map(|&(_, i)| (0.0, i)));
    if cands.len() > before {
        cands.sort_unstable_by_key(|&(_, i)| i);
    }
    int8_scores_of(view, wide, factor, cands);
    cands
}

/// A segment's sketches and the scratch [`flat_scan`]'s first pass uses with them.
struct SketchPass<'s> {
    sketch: &'s Sketch,
    query: &'s mut SketchQuery,
    bounds: &'s mut Vec<(f32, f32)>,
    seeds: &'s mut TopK,
    seeded: &'s mut Vec<(f32, u32)>,
    /// The items the first pass keeps, with their int8 scores.
    cands: &'s mut Vec<(f32, u32)>,
}

/// The `k`-th largest of `values` (reordered), if there are more than `k`.
fn kth_largest(values: &mut [f32], k: usize) -> Option<f32> {
    (values.len() > k && k > 0).then(|| *values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1)
}

/// How far an item's int8 score (its codes against the query quantised by
/// [`quantise_scaled`] with `factor`) can be from its exact score: each code is off by at most
/// half its dimension's scale, each query component by half the query's factor.
fn code_error_bound(q: &[f32], scales: &[f32], factor: f32) -> f32 {
    let half_steps: f32 = q.iter().zip(scales).map(|(x, s)| x.abs() * s).sum::<f32>() * 0.5;
    half_steps + 0.5 * factor * 127.0 * q.len() as f32
}

/// Pass 1 of [`flat_scan`] after the sketches: the int8 score of each candidate `(_, item)`.
/// The candidates are scattered, so the next one's cache lines are requested before this one
/// is scored ([`touch_lines`]).
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn int8_scores_of(view: &View<'_>, wide: &[i16], factor: f32, cands: &mut [(f32, u32)]) {
    let wide_dot = WideDot::detect();
    let dim = view.dim;
    let code = |i: u32| &view.codes[i as usize * dim..(i as usize + 1) * dim];
    for c in 0..cands.len() {
        let this = code(cands[c].1);
        if let Some(n) = cands.get(c + 1) {
            std::hint::black_box(touch_lines(bytemuck::cast_slice(code(n.1))));
        }
        cands[c].0 = wide_dot.dot(wide, this) as f32 * factor;
    }
}

/// Pass 1 of [`flat_scan`]: the int8 score of every item, `-inf` for those `filter` drops.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn approx_scores(view: &View<'_>, wide: &[i16], factor: f32, filter: Filter<'_>, out: &mut Vec<f32>) {
    out.clear();
    let wide_dot = WideDot::detect();
    for (i, code) in view.codes.chunks_exact(view.dim).enumerate() {
        let keep = filter.is_none_or(|f| f(i as u32));
        out.push(if keep { wide_dot.dot(wide, code) as f32 * factor } else { f32::NEG_INFINITY });
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
        let (n, k, ef) = (1000, 10, 10);
        assert!(n > ef * FLAT_SCAN_FACTOR, "the graph walk must run, not a scan");
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

    /// Up to `FLAT_SCAN_FACTOR * ef` items, the int8 scan returns exactly what the f32 brute
    /// force returns: structured and random rows, near-duplicates (equal codes), filters, any
    /// `k`; the scan must be the path taken.
    #[test]
    fn int8_flat_scan_equals_brute_force() {
        let dir = tempfile::tempdir().unwrap();
        for (dim, n, latent, noise) in
            [(96usize, 2000usize, 8usize, 0.05f64), (1280, 600, 64, 0.3), (33, 1500, 33, 1.0)]
        {
            let path = dir.path().join(format!("flat{dim}.vseg"));
            let shape = Structured { dim, latent, noise, seed: dim as u64 };
            let mut rows = shape.rows(0, n);
            // A few exact duplicates.
            let first = rows[..dim].to_vec();
            rows[dim..2 * dim].copy_from_slice(&first);
            let skus: Vec<SkuId> = (0..n).map(|i| SkuId::new(format!("f{i}")).unwrap()).collect();
            write_segment(&path, dim, &rows, &skus, &HnswParams::default()).unwrap();
            let seg = Segment::open(&path).unwrap();
            // The sketches (if the shape gets them) now, not from a background thread partway
            // through: every query takes the same path.
            seg.prepare_scan();
            let ef = 64;
            assert!(n > ef * EXACT_SCAN_FACTOR && n <= ef * FLAT_SCAN_FACTOR);
            let every_third = |i: u32| !i.is_multiple_of(3);
            let queries = shape.rows(50_000, 30);
            for (qi, q) in queries.chunks_exact(dim).chain([&rows[..dim]]).enumerate() {
                for k in [1usize, 10, 64, n + 3] {
                    for filter in [None, Some(&every_third as &dyn Fn(u32) -> bool)] {
                        let want = seg.brute_force(q, k, filter).unwrap();
                        let got = seg.search(q, k, ef, filter).unwrap();
                        assert_eq!(got, want, "dim {dim}, query {qi}, k {k}");
                    }
                }
            }
        }
    }

    /// Segments big enough for sketches ([`SKETCH_MIN_ITEMS`]) are scanned after a first pass
    /// over them, with the answer of the f32 brute force: structured rows (where the pass rules
    /// out most items), uniform random rows (where it rules out few), exact duplicates (whose
    /// residuals and estimates are equal), filters that keep most, few or fewer than `k` items,
    /// and every `k`.
    #[test]
    fn sketched_scan_equals_brute_force() {
        let dir = tempfile::tempdir().unwrap();
        for (dim, n, latent, noise) in [
            (1280usize, 4096usize, 48usize, 0.15f64),
            (256, 2500, 256, 1.0),
            (200, SKETCH_MIN_ITEMS, 12, 0.05),
        ] {
            let path = dir.path().join(format!("sketched{dim}.vseg"));
            let shape = Structured { dim, latent, noise, seed: 11 + dim as u64 };
            let mut rows = shape.rows(0, n);
            for i in 1..30 {
                let first = rows[..dim].to_vec();
                rows[i * 7 * dim..(i * 7 + 1) * dim].copy_from_slice(&first);
            }
            let skus: Vec<SkuId> = (0..n).map(|i| SkuId::new(format!("s{i}")).unwrap()).collect();
            crate::segment::write_flat_segment(&path, dim, &rows, &skus).unwrap();
            let seg = Segment::open(&path).unwrap();
            assert!(seg.prepare_scan() > 0, "dim {dim}: the segment must be sketched");
            let most = |i: u32| !i.is_multiple_of(3);
            let few = |i: u32| i.is_multiple_of(97);
            let five = |i: u32| i < 5;
            let filters: [Filter<'_>; 4] = [None, Some(&most), Some(&few), Some(&five)];
            let queries = shape.rows(60_000, 25);
            for (qi, q) in
                queries.chunks_exact(dim).chain([&rows[..dim], &rows[9 * dim..10 * dim]]).enumerate()
            {
                for k in [1usize, 10, 64, n + 3] {
                    for (fi, filter) in filters.iter().enumerate() {
                        let want = seg.brute_force(q, k, *filter).unwrap();
                        let got = seg.search_as(q, k, 64, *filter, SearchPlan::Exact).unwrap();
                        // Equal scores (the duplicates) straddling the k-th place may be any of
                        // them (the top-k heap keeps whichever it met first): the scores must
                        // be equal, and the items above the last score the same.
                        let scores = |h: &[Hit]| h.iter().map(|h| h.score).collect::<Vec<_>>();
                        assert_eq!(scores(&got), scores(&want), "dim {dim}, query {qi}, k {k}, filter {fi}");
                        let last = want.last().map_or(f32::INFINITY, |h| h.score);
                        let above =
                            |h: &[Hit]| h.iter().filter(|h| h.score > last).copied().collect::<Vec<_>>();
                        assert_eq!(above(&got), above(&want), "dim {dim}, query {qi}, k {k}, filter {fi}");
                    }
                }
            }
        }
    }

    /// The walk rescores only the candidates whose int8 score is within twice the error bound
    /// of the k-th best: the answer must be the one rescoring all `ef` candidates gives, which
    /// is the walk's answer for `k = ef` cut to `k` (the walk itself depends on `ef` only).
    #[test]
    fn bounded_rescoring_equals_rescoring_every_candidate() {
        let dir = tempfile::tempdir().unwrap();
        for (dim, n, latent, noise) in [(256usize, 3000usize, 16usize, 0.05f64), (1280, 1500, 48, 0.3)] {
            let path = dir.path().join(format!("walk{dim}.vseg"));
            let shape = Structured { dim, latent, noise, seed: 7 + dim as u64 };
            let mut rows = shape.rows(0, n);
            // Near-duplicates: rows whose int8 and exact orders differ.
            for i in 1..40 {
                let (a, b) = rows.split_at_mut(i * dim);
                for (x, y) in b[..dim].iter_mut().zip(&a[..dim]) {
                    *x = y + 1e-4 * ((i * 31 % 7) as f32 - 3.0);
                }
            }
            let skus: Vec<SkuId> = (0..n).map(|i| SkuId::new(format!("w{i}")).unwrap()).collect();
            write_segment(&path, dim, &rows, &skus, &HnswParams { m: 8, ef_construction: 64 }).unwrap();
            let seg = Segment::open(&path).unwrap();
            let queries = shape.rows(90_000, 40);
            for (qi, q) in
                queries.chunks_exact(dim).chain([&rows[..dim], &rows[5 * dim..6 * dim]]).enumerate()
            {
                for ef in [16usize, 64, 200] {
                    let all = seg.search_as(q, ef, ef, None, SearchPlan::Graph).unwrap();
                    for k in [1usize, 3, 10, 15] {
                        let got = seg.search_as(q, k, ef, None, SearchPlan::Graph).unwrap();
                        let want: Vec<Hit> = all.iter().copied().take(k).collect();
                        assert_eq!(got, want, "dim {dim}, query {qi}, ef {ef}, k {k}");
                    }
                }
            }
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
