//! vitrine's own parallel HNSW graph builder: the graph every segment is written with.
//!
//! It follows hnswlib's algorithm (Malkov & Yashunin): each node draws its top layer from an
//! exponential distribution (`mL = 1/ln(m)`), descends greedily from the entry point, runs an
//! `ef_construction`-wide best-first search on each of its layers, keeps `m` neighbours chosen
//! by the diversity heuristic, and links back to them, shrinking a full neighbour list with the
//! same heuristic (layer 0 holds `2m`, upper layers `m`). Inserts run in parallel on the
//! current rayon pool: neighbour lists are arrays of atomics (a walk reads them without a lock;
//! a torn read only sees other valid ids), writes to a node's lists take that node's lock, and
//! the global entry point is locked only while a node that raises the top layer is inserted.
//!
//! It can also *extend* an existing segment's graph (for merges): the kept nodes of the base
//! segment come first with their links remapped, links to dropped (deleted) nodes are repaired
//! from the dropped nodes' own neighbours, and only the other nodes are inserted. A merge then
//! costs the inserts of the smaller inputs, not a rebuild of everything.
//!
//! hnsw_rs builds the reference graph this builder is tested against
//! (`write_segment_hnsw_rs`); both produce the same flat layout.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU32, Ordering::Relaxed};

use multiversion::multiversion;
use parking_lot::Mutex;
use rayon::prelude::*;

use super::distance::{WideDot, dot, quantise_scaled, touch_lines};
use super::format::{MAX_LEVEL, NO_NEIGHBOUR};
use super::heap::Walk;
use super::reader::View;
use super::synth::SplitMix64;

/// An HNSW graph in flat arrays (the segment file's layout).
pub(super) struct FlatGraph {
    pub levels: Vec<u8>,
    pub layer0: Vec<u32>,
    pub upper: Vec<u32>,
    pub entry_point: u32,
}

/// The segment's int8 codes and per-dimension scales ([`super::format::quantise`] of the
/// vectors), which the builder's walks score with and the file stores.
pub(super) type Quantised<'a> = (&'a [i8], &'a [f32]);

/// An existing segment's graph to extend: its nodes `keep[i]` become nodes `i` of the new
/// graph, whose vectors must start with theirs in that order.
pub(super) struct BaseGraph<'a> {
    pub view: View<'a>,
    /// Old node ids kept, strictly ascending.
    pub keep: &'a [u32],
}

/// Seed of the level draws: a fixed seed makes the layer structure reproducible (the links
/// still depend on the order parallel inserts happen to run in).
const LEVEL_SEED: u64 = 0x5EED_1E7E_1520_2024;

#[derive(Clone, Copy)]
struct Entry {
    node: u32,
    level: usize,
}

/// The graph while it is built.
struct Graph<'a> {
    dim: usize,
    m: usize,
    ef: usize,
    vectors: &'a [f32],
    /// The int8 codes and per-dimension scales the walks score with (the segment's own).
    codes: &'a [i8],
    scales: &'a [f32],
    /// The int8 dot product on this CPU's widest vectors.
    wide: WideDot,
    levels: Vec<u8>,
    /// `n + 1` offsets into `upper` rows (node i owns rows `upper_off[i]..upper_off[i+1]`).
    upper_off: Vec<u32>,
    layer0: Vec<AtomicU32>,
    upper: Vec<AtomicU32>,
    /// Each link's similarity to its node (f32 bits), beside `layer0` and `upper`.
    layer0_scores: Vec<AtomicU32>,
    upper_scores: Vec<AtomicU32>,
    locks: Vec<Mutex<()>>,
    /// `None` until the first node is in.
    entry: Mutex<Option<Entry>>,
}

impl<'a> Graph<'a> {
    fn new(
        dim: usize,
        m: usize,
        ef: usize,
        vectors: &'a [f32],
        quantised: Quantised<'a>,
        levels: Vec<u8>,
    ) -> Self {
        let n = levels.len();
        let mut upper_off = Vec::with_capacity(n + 1);
        let mut rows = 0u32;
        upper_off.push(0);
        for &l in &levels {
            rows += u32::from(l);
            upper_off.push(rows);
        }
        let empty = |len: usize| (0..len).map(|_| AtomicU32::new(NO_NEIGHBOUR)).collect::<Vec<_>>();
        let (codes, scales) = quantised;
        Graph {
            dim,
            m,
            ef,
            vectors,
            codes,
            scales,
            wide: WideDot::detect(),
            layer0: empty(n * 2 * m),
            upper: empty(rows as usize * m),
            layer0_scores: empty(n * 2 * m),
            upper_scores: empty(rows as usize * m),
            upper_off,
            levels,
            locks: (0..n).map(|_| Mutex::new(())).collect(),
            entry: Mutex::new(None),
        }
    }

    #[inline(always)]
    fn vec(&self, i: u32) -> &'a [f32] {
        let at = i as usize * self.dim;
        &self.vectors[at..at + self.dim]
    }

    #[inline(always)]
    fn code(&self, i: u32) -> &[i8] {
        let at = i as usize * self.dim;
        &self.codes[at..at + self.dim]
    }

    /// Vector `i` as a query of the int8 walk: times the scales, quantised to `i16` in `out`.
    #[inline(always)]
    fn wide_query<'s>(&self, i: u32, out: &'s mut Vec<i16>) -> Wide<'s> {
        let factor = quantise_scaled(self.vec(i), self.scales, out);
        Wide { q: out, factor, dot: self.wide }
    }

    /// Node `node`'s link slots on `layer` and their scores.
    #[inline(always)]
    fn slots(&self, node: u32, layer: usize) -> (&[AtomicU32], &[AtomicU32]) {
        if layer == 0 {
            let d = 2 * self.m;
            let r = node as usize * d..(node as usize + 1) * d;
            (&self.layer0[r.clone()], &self.layer0_scores[r])
        } else {
            let at = (self.upper_off[node as usize] as usize + layer - 1) * self.m;
            (&self.upper[at..at + self.m], &self.upper_scores[at..at + self.m])
        }
    }

    #[inline(always)]
    fn row(&self, node: u32, layer: usize) -> &[AtomicU32] {
        self.slots(node, layer).0
    }

    /// Replaces `node`'s links on `layer` with `links` (score, id), best first.
    fn write_row(&self, node: u32, layer: usize, links: &[(f32, u32)]) {
        let (ids, scores) = self.slots(node, layer);
        for (i, (slot, score)) in ids.iter().zip(scores).enumerate() {
            let (s, id) = links.get(i).copied().unwrap_or((f32::NEG_INFINITY, NO_NEIGHBOUR));
            slot.store(id, Relaxed);
            score.store(s.to_bits(), Relaxed);
        }
    }

    #[inline(always)]
    fn read_row(&self, node: u32, layer: usize, out: &mut Vec<u32>) {
        out.clear();
        for slot in self.row(node, layer) {
            let v = slot.load(Relaxed);
            if v == NO_NEIGHBOUR {
                break;
            }
            out.push(v);
        }
    }

    fn into_flat(self) -> FlatGraph {
        let load = |v: Vec<AtomicU32>| v.into_iter().map(AtomicU32::into_inner).collect();
        let entry_point = self.entry.into_inner().map_or(0, |e| e.node);
        FlatGraph { levels: self.levels, layer0: load(self.layer0), upper: load(self.upper), entry_point }
    }
}

/// Per-thread reusable build state.
#[derive(Default)]
struct Scratch {
    walk: Walk,
    row: Vec<u32>,
    ids: Vec<u32>,
    scores: Vec<f32>,
    found: Vec<(f32, u32)>,
    selected: Vec<(f32, u32)>,
    /// The inserted node's walk query (`i16`).
    qw: Vec<i16>,
    heuristic: Heuristic,
}

/// [`select`]'s reusable buffers.
#[derive(Default)]
struct Heuristic {
    /// A newly kept neighbour's walk query, before it is appended to `kept_wide`.
    query: Vec<i16>,
    /// The kept neighbours as walk queries (`dim` values each) and their factors.
    kept_wide: Vec<i16>,
    kept_factors: Vec<f32>,
}

/// A query of the int8 walk: `i16` values and the factor that turns their integer dot
/// product with a code into a similarity.
#[derive(Clone, Copy)]
struct Wide<'a> {
    q: &'a [i16],
    factor: f32,
    dot: WideDot,
}

impl Wide<'_> {
    #[inline(always)]
    fn score(self, code: &[i8]) -> f32 {
        self.dot.dot(self.q, code) as f32 * self.factor
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Draws each node's top layer: `floor(-ln(u) / ln(m))`, capped at [`MAX_LEVEL`].
fn draw_levels(count: usize, first: u64, m: usize) -> impl Iterator<Item = u8> {
    let ml = 1.0 / (m as f64).ln();
    (0..count as u64).map(move |i| {
        let u =
            1.0 - SplitMix64::new(LEVEL_SEED ^ (first + i).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_f64();
        (-u.ln() * ml).floor().min(f64::from(MAX_LEVEL)) as u8
    })
}

/// Builds the graph over `vectors` (`n * dim`, rows L2-normalised, `quantised` their codes)
/// on the current rayon pool, extending `base` when given.
pub(super) fn build(
    dim: usize,
    m: usize,
    ef_construction: usize,
    vectors: &[f32],
    quantised: Quantised<'_>,
    base: Option<BaseGraph<'_>>,
) -> FlatGraph {
    let n = vectors.len() / dim;
    let kept = base.as_ref().map_or(0, |b| b.keep.len());
    let mut levels: Vec<u8> = Vec::with_capacity(n);
    if let Some(b) = &base {
        levels.extend(b.keep.iter().map(|&old| b.view.levels[old as usize]));
    }
    levels.extend(draw_levels(n - kept, kept as u64, m));
    let graph = Graph::new(dim, m, ef_construction.max(m), vectors, quantised, levels);
    if let Some(b) = base.filter(|b| !b.keep.is_empty()) {
        seed_from_base(&graph, &b);
    }
    (kept..n).into_par_iter().for_each(|q| {
        crate::background::yield_point();
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut s) => insert_node(&graph, q as u32, &mut s),
            Err(_) => insert_node(&graph, q as u32, &mut Scratch::default()),
        })
    });
    let linked = connect_unreachable(&graph);
    if linked > 0 {
        tracing::debug!(linked, nodes = n, "linked nodes layer 0 could not reach from the entry point");
    }
    graph.into_flat()
}

/// Makes every node reachable on layer 0 from the entry point, and returns how many needed
/// a link. Parallel inserts can leave a node that no list points to (a full list drops its
/// least similar link for a closer newcomer, a merge drops deleted nodes): no walk would ever
/// find that item. Such a node is linked from the nearest node that can be reached (found by
/// a layer-0 walk from the entry point, which only meets reachable nodes), into a free slot or
/// in place of that node's least similar link to a node that keeps another link in; then
/// everything the node itself links to counts as reached. A replaced link may have been all
/// that reached a part of the graph, so the check repeats until nothing is missing (one pass
/// over layer 0 when nothing was), at most [`REPAIR_ROUNDS`] times.
fn connect_unreachable(g: &Graph<'_>) -> usize {
    let mut linked = 0;
    // A replaced link can cut off what only it reached: check again from scratch.
    for _ in 0..REPAIR_ROUNDS {
        match connect_round(g) {
            0 => return linked,
            k => linked += k,
        }
    }
    tracing::warn!(linked, "layer 0 may still leave nodes unreachable after {REPAIR_ROUNDS} repair rounds");
    linked
}

/// Passes of [`connect_unreachable`] at most (one when nothing is missing).
const REPAIR_ROUNDS: usize = 8;

/// One pass of [`connect_unreachable`]: how many nodes it linked.
fn connect_round(g: &Graph<'_>) -> usize {
    let n = g.levels.len();
    let Some(entry) = *g.entry.lock() else {
        return 0;
    };
    let mut reached = vec![false; n];
    let mut stack = Vec::new();
    let mut row = Vec::new();
    let mut spread = |from: u32, reached: &mut [bool]| {
        if std::mem::replace(&mut reached[from as usize], true) {
            return;
        }
        stack.push(from);
        while let Some(c) = stack.pop() {
            g.read_row(c, 0, &mut row);
            for &nb in &row {
                if !std::mem::replace(&mut reached[nb as usize], true) {
                    stack.push(nb);
                }
            }
        }
    };
    spread(entry.node, &mut reached);
    if reached.iter().all(|&r| r) {
        return 0;
    }
    let mut in_degree = vec![0u32; n];
    for slot in &g.layer0 {
        let id = slot.load(Relaxed);
        if id != NO_NEIGHBOUR {
            in_degree[id as usize] += 1;
        }
    }
    let mut s = Scratch::default();
    let mut linked = 0;
    for u in 0..n as u32 {
        if reached[u as usize] {
            continue;
        }
        nearest_on_layer0(g, u, entry.node, &mut s);
        let spot = |found: &[(f32, u32)]| {
            found.iter().find_map(|&(score, v)| Some((score, v, free_or_spare_slot(g, v, &in_degree)?)))
        };
        let mut found = spot(&s.found);
        if found.is_none() {
            // Every near node's list is full of sole links: try all reached nodes, nearest first.
            let uv = g.vec(u);
            s.found.clear();
            s.found.extend((0..n as u32).filter(|&v| reached[v as usize]).map(|v| (dot(uv, g.vec(v)), v)));
            s.found.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            found = spot(&s.found);
        }
        let Some((score, v, slot)) = found else {
            continue;
        };
        let (ids, scores) = g.slots(v, 0);
        let old = ids[slot].swap(u, Relaxed);
        scores[slot].store(score.to_bits(), Relaxed);
        if old != NO_NEIGHBOUR {
            in_degree[old as usize] -= 1;
        }
        in_degree[u as usize] += 1;
        linked += 1;
        spread(u, &mut reached);
    }
    linked
}

/// A slot of `v`'s layer-0 list to link a new node into: a free one, else the least similar
/// link to a node that other links also point to.
fn free_or_spare_slot(g: &Graph<'_>, v: u32, in_degree: &[u32]) -> Option<usize> {
    let (ids, scores) = g.slots(v, 0);
    let mut spare: Option<(f32, usize)> = None;
    for (i, (slot, score)) in ids.iter().zip(scores).enumerate() {
        let id = slot.load(Relaxed);
        if id == NO_NEIGHBOUR {
            return Some(i);
        }
        let score = f32::from_bits(score.load(Relaxed));
        if in_degree[id as usize] >= 2 && spare.is_none_or(|(best, _)| score < best) {
            spare = Some((score, i));
        }
    }
    spare.map(|(_, i)| i)
}

/// `u`'s nearest nodes by a layer-0 walk from `from`, best first, in `s.found`.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn nearest_on_layer0(g: &Graph<'_>, u: u32, from: u32, s: &mut Scratch) {
    let mut qw = std::mem::take(&mut s.qw);
    let wq = g.wide_query(u, &mut qw);
    let start = (from, wq.score(g.code(from)));
    search_layer(g, wq, u, start, 0, s);
    s.qw = qw;
}

#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn insert_node(g: &Graph<'_>, q: u32, s: &mut Scratch) {
    insert_body(g, q, s)
}

#[inline(always)]
fn insert_body(g: &Graph<'_>, q: u32, s: &mut Scratch) {
    let level = usize::from(g.levels[q as usize]);
    let mut guard = g.entry.lock();
    let Some(entry) = *guard else {
        *guard = Some(Entry { node: q, level });
        return;
    };
    // A node that raises the top layer keeps the entry locked until it is fully linked
    // (hnswlib does the same); every other insert releases it at once.
    let raise = if level > entry.level {
        Some(guard)
    } else {
        // Dropped here explicitly: a guard not moved would live to the end of the function
        // and serialise every insert.
        drop(guard);
        None
    };
    // Walks score with int8 codes against the node's scaled vector (a quarter of the memory
    // traffic of f32 rows, which is where a build spends its time), in integers.
    let mut qw = std::mem::take(&mut s.qw);
    let wq = g.wide_query(q, &mut qw);
    let (mut cur, mut cur_s) = (entry.node, wq.score(g.code(entry.node)));
    for layer in (level + 1..=entry.level).rev() {
        (cur, cur_s) = greedy(g, wq, (cur, cur_s), layer, &mut s.row);
    }
    for layer in (0..=level.min(entry.level)).rev() {
        search_layer(g, wq, q, (cur, cur_s), layer, s);
        if let Some(&(best_s, best)) = s.found.first() {
            (cur, cur_s) = (best, best_s);
        }
        let cap = if layer == 0 { 2 * g.m } else { g.m };
        select(g, &s.found, cap, &mut s.selected, &mut s.heuristic);
        {
            let _lock = g.locks[q as usize].lock();
            g.write_row(q, layer, &s.selected);
        }
        for &(score, nb) in &s.selected {
            link(g, nb, q, score, layer);
        }
    }
    s.qw = qw;
    if let Some(mut guard) = raise {
        *guard = Some(Entry { node: q, level });
    }
}

/// Greedy descent on one upper layer: moves to any better neighbour until none is.
#[inline(always)]
fn greedy(g: &Graph<'_>, qv: Wide<'_>, start: (u32, f32), layer: usize, row: &mut Vec<u32>) -> (u32, f32) {
    let (mut cur, mut cur_s) = start;
    loop {
        let mut improved = false;
        g.read_row(cur, layer, row);
        for &nb in row.iter() {
            let d = qv.score(g.code(nb));
            if d > cur_s {
                (cur, cur_s) = (nb, d);
                improved = true;
            }
        }
        if !improved {
            return (cur, cur_s);
        }
    }
}

/// `ef`-wide best-first search on `layer` from `entry`; leaves the best nodes (never `q`
/// itself) in `s.found`, best first.
#[inline(always)]
fn search_layer(g: &Graph<'_>, qv: Wide<'_>, q: u32, entry: (u32, f32), layer: usize, s: &mut Scratch) {
    s.walk.begin(g.levels.len());
    let Scratch { walk: Walk { visited, epoch, candidates, results }, row, ids, scores, found, .. } = s;
    let (ep, ep_s) = entry;
    visited[ep as usize] = *epoch;
    candidates.push(ep_s, ep);
    if ep != q {
        results.offer(ep_s, ep, g.ef);
    }
    while let Some((c_s, c)) = candidates.pop() {
        if results.len() >= g.ef && c_s < results.worst() {
            break;
        }
        // Collect the unvisited neighbours, score them in a loop with no data-dependent
        // branches (so the CPU overlaps the vectors' cache misses), then update the heaps.
        g.read_row(c, layer, row);
        ids.clear();
        for &nb in row.iter() {
            let slot = &mut visited[nb as usize];
            if *slot != *epoch {
                *slot = *epoch;
                ids.push(nb);
            }
        }
        let mut touched = 0u8;
        for &nb in ids.iter() {
            touched ^= touch_lines(bytemuck::cast_slice(g.code(nb)));
        }
        std::hint::black_box(touched);
        scores.clear();
        for &nb in ids.iter() {
            scores.push(qv.score(g.code(nb)));
        }
        for (&nb, &d) in ids.iter().zip(scores.iter()) {
            if results.len() < g.ef || d > results.worst() {
                candidates.push(d, nb);
                if nb != q {
                    results.offer(d, nb, g.ef);
                }
            }
        }
    }
    results.drain_sorted_into(found);
}

/// The diversity heuristic: walks `cands` (best first) and keeps a candidate unless it is
/// closer to an already kept one than to the query; at most `cap`.
///
/// A kept neighbour is turned into a walk query once (`h.kept_wide`), and each later candidate is
/// scored from its int8 code against those: the candidate's code is in cache from the walk
/// that found it, while turning every candidate into a query would read its f32 row (four
/// times the bytes) and quantise it, for the up to `ef_construction` candidates a node
/// examines against at most `cap` kept ones.
#[inline(always)]
fn select(g: &Graph<'_>, cands: &[(f32, u32)], cap: usize, out: &mut Vec<(f32, u32)>, h: &mut Heuristic) {
    let Heuristic { query, kept_wide, kept_factors } = h;
    out.clear();
    kept_wide.clear();
    kept_factors.clear();
    for &(score, c) in cands {
        if out.len() >= cap {
            break;
        }
        let code = g.code(c);
        // A plain loop: an iterator adaptor here may stay out of line, compiled without the
        // target's features (see `dot_body`).
        let mut diverse = true;
        for (r, &factor) in kept_factors.iter().enumerate() {
            let rq = Wide { q: &kept_wide[r * g.dim..(r + 1) * g.dim], factor, dot: g.wide };
            if rq.score(code) > score {
                diverse = false;
                break;
            }
        }
        if diverse {
            out.push((score, c));
            if out.len() < cap {
                let cq = g.wide_query(c, query);
                kept_wide.extend_from_slice(cq.q);
                kept_factors.push(cq.factor);
            }
        }
    }
}

/// Adds `q` (similarity `score`) to `nb`'s list on `layer`; a full list drops its least
/// similar link if `q` is more similar (the backlink rule of hnsw_rs: no distance computed).
fn link(g: &Graph<'_>, nb: u32, q: u32, score: f32, layer: usize) {
    let _lock = g.locks[nb as usize].lock();
    let (ids, scores) = g.slots(nb, layer);
    let mut worst = (f32::INFINITY, 0);
    for (i, (slot, s)) in ids.iter().zip(scores).enumerate() {
        let id = slot.load(Relaxed);
        if id == q {
            return;
        }
        if id == NO_NEIGHBOUR {
            slot.store(q, Relaxed);
            s.store(score.to_bits(), Relaxed);
            return;
        }
        let s = f32::from_bits(s.load(Relaxed));
        if s < worst.0 {
            worst = (s, i);
        }
    }
    if score > worst.0 {
        ids[worst.1].store(q, Relaxed);
        scores[worst.1].store(score.to_bits(), Relaxed);
    }
}

/// Copies the base graph's links for the kept nodes (renumbered) and sets the entry point.
/// A list that lost a dropped neighbour is rebuilt from the node's surviving neighbours plus
/// the dropped neighbours' own (one hop through each), with the heuristic.
fn seed_from_base(g: &Graph<'_>, b: &BaseGraph<'_>) {
    let mut old_to_new = vec![NO_NEIGHBOUR; b.view.n];
    for (new, &old) in b.keep.iter().enumerate() {
        old_to_new[old as usize] = new as u32;
    }
    let degree0 = 2 * b.view.m;
    let old_row = |old: u32, layer: usize| -> &[u32] {
        if layer == 0 {
            &b.view.layer0[old as usize * degree0..(old as usize + 1) * degree0]
        } else {
            b.view.upper_row(old as usize, layer).unwrap_or(&[])
        }
    };
    b.keep.par_iter().enumerate().for_each_init(
        || {
            let pairs = || Vec::<(f32, u32)>::new();
            (Vec::<u32>::new(), pairs(), pairs(), Heuristic::default())
        },
        |(live, pool, kept, heuristic), (new, &old)| {
            crate::background::yield_point();
            let new = new as u32;
            for layer in 0..=usize::from(g.levels[new as usize]) {
                live.clear();
                let mut lost = false;
                for &x in old_row(old, layer).iter().take_while(|&&x| x != NO_NEIGHBOUR) {
                    match old_to_new.get(x as usize) {
                        Some(&y) if y != NO_NEIGHBOUR => live.push(y),
                        _ => {
                            lost = true;
                            let second = old_row(x, layer).iter().take_while(|&&z| z != NO_NEIGHBOUR);
                            live.extend(second.filter_map(|&z| old_to_new.get(z as usize).copied()));
                        }
                    }
                }
                let nv = g.vec(new);
                pool.clear();
                if !lost {
                    pool.extend(live.iter().map(|&y| (dot(nv, g.vec(y)), y)));
                    g.write_row(new, layer, pool);
                    continue;
                }
                live.retain(|&y| y != NO_NEIGHBOUR && y != new);
                live.sort_unstable();
                live.dedup();
                pool.extend(live.iter().map(|&y| (dot(nv, g.vec(y)), y)));
                pool.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                select_dispatched(g, pool, g.row(new, layer).len(), kept, heuristic);
                g.write_row(new, layer, kept);
            }
        },
    );
    let old_entry = old_to_new[b.view.entry_point as usize];
    let node = if old_entry != NO_NEIGHBOUR {
        old_entry
    } else {
        // The first kept node on the highest layer any kept node reaches.
        let kept_levels = &g.levels[..b.keep.len()];
        let top = kept_levels.iter().copied().max().unwrap_or(0);
        kept_levels.iter().position(|&l| l == top).unwrap_or(0) as u32
    };
    *g.entry.lock() = Some(Entry { node, level: usize::from(g.levels[node as usize]) });
}

#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn select_dispatched(
    g: &Graph<'_>,
    cands: &[(f32, u32)],
    cap: usize,
    out: &mut Vec<(f32, u32)>,
    h: &mut Heuristic,
) {
    select(g, cands, cap, out, h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segment::format::quantise;
    use crate::segment::synth::Structured;

    /// Nodes layer 0 reaches from the entry point.
    fn reachable(flat: &FlatGraph, m: usize) -> usize {
        let n = flat.levels.len();
        let mut seen = vec![false; n];
        let mut stack = vec![flat.entry_point];
        seen[flat.entry_point as usize] = true;
        while let Some(c) = stack.pop() {
            let row = &flat.layer0[c as usize * 2 * m..(c as usize + 1) * 2 * m];
            for &nb in row.iter().take_while(|&&x| x != NO_NEIGHBOUR) {
                if !std::mem::replace(&mut seen[nb as usize], true) {
                    stack.push(nb);
                }
            }
        }
        seen.iter().filter(|&&s| s).count()
    }

    /// Tiny, clustered graphs with short lists, built in parallel, where a full list dropping
    /// its least similar link often orphans a node (without the repair pass the first build
    /// here already leaves some unreachable): every node must be reachable, whatever order the
    /// inserts ran in.
    #[test]
    fn every_node_is_reachable_from_the_entry_point() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
        let m = 2;
        for seed in 0..300u64 {
            let n = 20 + (seed as usize % 60);
            let shape = Structured { dim: 8, latent: 2, noise: 0.05, seed };
            let mut rows = shape.rows(0, n);
            for r in rows.chunks_exact_mut(8) {
                let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
                r.iter_mut().for_each(|x| *x /= norm);
            }
            let (codes, scales) = quantise(8, &rows);
            let flat = pool.install(|| build(8, m, 8, &rows, (&codes, &scales), None));
            assert_eq!(reachable(&flat, m), n, "seed {seed}, {n} nodes");
        }
    }
}
