//! The in-memory mutable segment of one model version: where upserts land the moment they are
//! acknowledged, searched by exact scan until it is sealed into an immutable, memory-mapped
//! HNSW segment.
//!
//! The scan is exact, in two passes: int8 scores against a per-row coded copy of every
//! vector (a quarter of the memory traffic of f32, integer multiply-adds), each with a proven
//! error bound; then the exact f32 score of only the rows whose bound could reach the top
//! `k`. The result is the one a plain f32 scan gives.
//!
//! Appends and deletions take a short write lock; searches take a read lock for one scan. An
//! item's position never changes. The writer freezes a full mutable segment (no more appends;
//! deletions still land) and a background task seals it; until the sealed segment replaces
//! it, the frozen one keeps serving.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use parking_lot::RwLock;

use crate::ids::SkuId;
use crate::index::filter::DocId;
use crate::segment::{WideDot, dot, quantise_query, quantise_row};

/// One scored position of a segment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PosHit {
    pub score: f32,
    pub pos: u32,
}

/// Keeps the best `k` hits; ties prefer the lower position.
pub(crate) struct TopHits {
    k: usize,
    heap: BinaryHeap<Worst>,
}

#[derive(PartialEq)]
struct Worst(PosHit);
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Worst {
    /// The heap's top is the worst hit kept: lowest score, then highest position.
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.score.total_cmp(&self.0.score).then(self.0.pos.cmp(&other.0.pos))
    }
}

impl TopHits {
    pub(crate) fn new(k: usize) -> Self {
        Self { k, heap: BinaryHeap::with_capacity(k + 1) }
    }

    #[inline]
    pub(crate) fn offer(&mut self, score: f32, pos: u32) {
        if self.k == 0 {
            return;
        }
        if self.heap.len() < self.k {
            self.heap.push(Worst(PosHit { score, pos }));
        } else if let Some(top) = self.heap.peek()
            && (score > top.0.score || (score == top.0.score && pos < top.0.pos))
        {
            self.heap.pop();
            self.heap.push(Worst(PosHit { score, pos }));
        }
    }

    /// Best first.
    pub(crate) fn into_sorted(self) -> Vec<PosHit> {
        let mut v: Vec<PosHit> = self.heap.into_iter().map(|w| w.0).collect();
        v.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.pos.cmp(&b.pos)));
        v
    }
}

#[derive(Debug, Default)]
struct Inner {
    skus: Vec<SkuId>,
    docs: Vec<DocId>,
    /// `len * dim` unit-length values.
    vectors: Vec<f32>,
    /// `len * dim` int8 codes of `vectors`, one scale per row ([`quantise_row`]).
    codes: Vec<i8>,
    scales: Vec<f32>,
    deleted: Vec<bool>,
    /// The live position of each SKU.
    live: HashMap<SkuId, u32>,
    frozen: bool,
}

/// Most bytes of vectors [`MutableSegment::with_capacity`] reserves up front.
pub const MAX_RESERVED_BYTES: usize = 256 << 20;

/// See the module docs.
#[derive(Debug)]
pub struct MutableSegment {
    dim: usize,
    inner: RwLock<Inner>,
}

/// Tests only: the dimension of each frozen segment dropped and the name of the thread that
/// dropped it (the writer thread must never be one, see `writer::Garbage`).
#[cfg(test)]
pub(crate) static FROZEN_DROPPED_ON: parking_lot::Mutex<Vec<(usize, String)>> =
    parking_lot::Mutex::new(Vec::new());

#[cfg(test)]
impl Drop for MutableSegment {
    fn drop(&mut self) {
        if self.inner.get_mut().frozen {
            let name = std::thread::current().name().unwrap_or("unnamed").to_string();
            FROZEN_DROPPED_ON.lock().push((self.dim, name));
        }
    }
}

/// A consistent copy of a segment's live items, for sealing.
#[derive(Debug, Default)]
pub struct LiveItems {
    pub positions: Vec<u32>,
    pub skus: Vec<SkuId>,
    pub vectors: Vec<f32>,
}

impl MutableSegment {
    pub fn new(dim: usize) -> Self {
        Self::with_capacity(dim, 0)
    }

    /// An empty segment with room reserved for `rows` rows (capped at [`MAX_RESERVED_BYTES`]
    /// of vectors): appends up to it never move the rows. Growing by doubling instead copied up
    /// to 10 MiB under the write lock at 1280-d, which held an acknowledgement group (and
    /// searches) for 10-23 ms. The reservation is address space; pages are touched as rows
    /// arrive.
    pub fn with_capacity(dim: usize, rows: usize) -> Self {
        let rows = rows.min(MAX_RESERVED_BYTES / (dim.max(1) * std::mem::size_of::<f32>()));
        let inner = Inner {
            skus: Vec::with_capacity(rows),
            docs: Vec::with_capacity(rows),
            vectors: Vec::with_capacity(rows * dim),
            codes: Vec::with_capacity(rows * dim),
            scales: Vec::with_capacity(rows),
            deleted: Vec::with_capacity(rows),
            live: HashMap::with_capacity(rows),
            frozen: false,
        };
        Self { dim, inner: RwLock::new(inner) }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Positions used (live and deleted).
    pub fn len(&self) -> usize {
        self.inner.read().skus.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn live_count(&self) -> usize {
        self.inner.read().live.len()
    }

    /// Appends a unit-length `vector` for `sku` (the caller has deleted any older copy) and
    /// returns its position.
    ///
    /// # Panics
    /// If the segment is frozen or the vector has the wrong length: both are writer bugs.
    pub fn push(&self, sku: SkuId, doc: DocId, vector: &[f32]) -> u32 {
        assert_eq!(vector.len(), self.dim, "vector length");
        // Coded before the lock: searches wait for the write lock, not for the coding.
        let mut code = Vec::with_capacity(self.dim);
        let scale = quantise_row(vector, &mut code);
        let mut g = self.inner.write();
        assert!(!g.frozen, "append to a frozen mutable segment");
        let pos = g.skus.len() as u32;
        g.vectors.extend_from_slice(vector);
        g.codes.extend_from_slice(&code);
        g.scales.push(scale);
        g.docs.push(doc);
        g.deleted.push(false);
        if let Some(old) = g.live.insert(sku.clone(), pos) {
            // Never two live copies of one SKU in a segment.
            g.deleted[old as usize] = true;
        }
        g.skus.push(sku);
        pos
    }

    /// Deletes the live copy of `sku`, if this segment has one. True if it did.
    pub fn delete_sku(&self, sku: &SkuId) -> bool {
        // Look first under the read lock: a sealer copying this (frozen) segment holds a read
        // lock for milliseconds, and most upserts have no copy here to delete.
        if !self.inner.read().live.contains_key(sku) {
            return false;
        }
        let mut g = self.inner.write();
        match g.live.remove(sku) {
            Some(pos) => {
                g.deleted[pos as usize] = true;
                true
            }
            None => false,
        }
    }

    /// The live position of `sku`.
    pub fn find(&self, sku: &str) -> Option<u32> {
        let key = SkuId::new(sku).ok()?;
        self.inner.read().live.get(&key).copied()
    }

    pub fn is_deleted(&self, pos: u32) -> bool {
        self.inner.read().deleted.get(pos as usize).copied().unwrap_or(true)
    }

    /// The stored vector of the live copy of `sku`.
    pub fn vector_of(&self, sku: &str) -> Option<Vec<f32>> {
        let key = SkuId::new(sku).ok()?;
        let g = self.inner.read();
        let pos = *g.live.get(&key)? as usize;
        Some(g.vectors[pos * self.dim..(pos + 1) * self.dim].to_vec())
    }

    /// No more appends (deletions still apply).
    pub fn freeze(&self) {
        self.inner.write().frozen = true;
    }

    /// A copy of the live items, in position order.
    pub fn live_items(&self) -> LiveItems {
        let g = self.inner.read();
        let mut out = LiveItems::default();
        for (pos, sku) in g.skus.iter().enumerate() {
            if !g.deleted[pos] {
                out.positions.push(pos as u32);
                out.skus.push(sku.clone());
                out.vectors.extend_from_slice(&g.vectors[pos * self.dim..(pos + 1) * self.dim]);
            }
        }
        out
    }

    /// Exact top-`k` over live items whose doc passes `keep` (all when `None`), with their SKUs.
    /// `query` must be unit length and `dim` long. See the module docs for the two passes.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        keep: Option<&dyn Fn(DocId) -> bool>,
    ) -> Vec<(PosHit, SkuId)> {
        let g = self.inner.read();
        let mut top = TopHits::new(k);
        if k == 0 {
            return Vec::new();
        }
        let dim = self.dim;
        let mut q16 = Vec::with_capacity(dim);
        let factor = quantise_query(query, &mut q16);
        // |exact - approx| <= scale_row * slack: each code is off by at most scale_row / 2
        // (times |q|, summed), each query component by at most factor / 2 (times
        // scale_row * |code| <= scale_row * 127); plus room for the f32 rounding of the sum.
        let l1: f32 = query.iter().map(|x| x.abs()).sum();
        let slack = 0.5 * l1 + 0.5 * factor * 127.0 * dim as f32;
        // Pass 1: (lower bound, upper bound, position) of every candidate.
        let mut cands: Vec<(f32, f32, u32)> = Vec::new();
        let wide = WideDot::detect();
        for (pos, code) in g.codes.chunks_exact(dim).enumerate() {
            if g.deleted[pos] || keep.is_some_and(|f| !f(g.docs[pos])) {
                continue;
            }
            let scale = g.scales[pos];
            let approx = wide.dot(&q16, code) as f32 * factor * scale;
            let err = scale * slack + 1e-5 * (1.0 + approx.abs());
            cands.push((approx - err, approx + err, pos as u32));
        }
        // The k-th best lower bound: the k-th best exact score is at least this, so a row
        // whose upper bound is below it cannot be in the top k.
        let floor = if cands.len() > k {
            let mut lows: Vec<f32> = cands.iter().map(|c| c.0).collect();
            let (_, kth, _) = lows.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            *kth
        } else {
            f32::NEG_INFINITY
        };
        // Pass 2: exact scores of the rows that may make the top k.
        for &(_, high, pos) in &cands {
            if high >= floor {
                let at = pos as usize * dim;
                top.offer(dot(query, &g.vectors[at..at + dim]), pos);
            }
        }
        top.into_sorted().into_iter().map(|h| (h, g.skus[h.pos as usize].clone())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(dim: usize, hot: usize) -> Vec<f32> {
        let mut v = vec![0.0; dim];
        v[hot] = 1.0;
        v
    }

    #[test]
    fn push_replace_delete_and_search() {
        let m = MutableSegment::new(4);
        let a = SkuId::new("a").unwrap();
        let b = SkuId::new("b").unwrap();
        m.push(a.clone(), 0, &unit(4, 0));
        m.push(b.clone(), 1, &unit(4, 1));
        let hits = m.search(&unit(4, 0), 2, None);
        assert_eq!(hits[0].1, a);
        assert_eq!(hits.len(), 2);
        // A second copy of `a` replaces the first.
        m.push(a.clone(), 0, &unit(4, 2));
        assert_eq!(m.live_count(), 2);
        let hits = m.search(&unit(4, 0), 5, None);
        assert_eq!(hits.len(), 2);
        assert_eq!(m.find("a"), Some(2));
        assert!(m.delete_sku(&b));
        assert!(!m.delete_sku(&b));
        let hits = m.search(&unit(4, 1), 5, None);
        assert_eq!(hits.iter().map(|h| h.1.as_str()).collect::<Vec<_>>(), vec!["a"]);
        let only_doc1 = |d: DocId| d == 1;
        assert!(m.search(&unit(4, 1), 5, Some(&only_doc1)).is_empty());
        let live = m.live_items();
        assert_eq!(live.positions, vec![2]);
        assert_eq!(live.vectors, unit(4, 2));
    }

    /// The two-pass scan returns exactly what a plain f32 scan returns: random and clustered
    /// rows (near-duplicates make the int8 scores tie), deletions, filters, every `k`.
    #[test]
    fn int8_scan_equals_the_exact_f32_scan() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
        };
        let unitise = |v: Vec<f32>| {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect::<Vec<f32>>()
        };
        for (dim, rows, clusters) in [(8usize, 300usize, 0usize), (96, 500, 5), (1280, 300, 3), (513, 200, 1)]
        {
            let m = MutableSegment::new(dim);
            let centres: Vec<Vec<f32>> = (0..clusters).map(|_| (0..dim).map(|_| next()).collect()).collect();
            let mut all = Vec::new();
            for i in 0..rows {
                let v: Vec<f32> = match centres.get(i % clusters.max(1)) {
                    Some(c) if clusters > 0 => c.iter().map(|x| x + 0.01 * next()).collect(),
                    _ => (0..dim).map(|_| next()).collect(),
                };
                let v = unitise(v);
                m.push(SkuId::new(format!("s{i}")).unwrap(), i as DocId, &v);
                all.push(v);
            }
            for i in (0..rows).step_by(7) {
                m.delete_sku(&SkuId::new(format!("s{i}")).unwrap());
            }
            let odd = |d: DocId| d % 2 == 1;
            for trial in 0..20 {
                let q = if trial % 2 == 0 {
                    unitise((0..dim).map(|_| next()).collect())
                } else {
                    unitise(all[trial * 13 % rows].iter().map(|x| x + 0.02 * next()).collect())
                };
                for k in [1usize, 3, 10, 50, rows + 5] {
                    for filter in [None, Some(&odd as &dyn Fn(DocId) -> bool)] {
                        let mut want = TopHits::new(k);
                        for (pos, v) in all.iter().enumerate() {
                            if pos % 7 != 0 && filter.is_none_or(|f| f(pos as DocId)) {
                                want.offer(dot(&q, v), pos as u32);
                            }
                        }
                        let want = want.into_sorted();
                        let got: Vec<PosHit> = m.search(&q, k, filter).into_iter().map(|h| h.0).collect();
                        assert_eq!(got, want, "dim {dim}, k {k}, trial {trial}");
                    }
                }
            }
        }
    }

    #[test]
    fn top_hits_keeps_the_best_in_order() {
        let mut t = TopHits::new(3);
        for (i, s) in [0.1f32, 0.9, 0.5, 0.9, 0.2, 0.7].into_iter().enumerate() {
            t.offer(s, i as u32);
        }
        let v = t.into_sorted();
        assert_eq!(v.iter().map(|h| h.pos).collect::<Vec<_>>(), vec![1, 3, 5]);
    }
}
