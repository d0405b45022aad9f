//! The reusable state of a graph walk (search and build): a max-heap of (key, id), a top-k
//! keeper and an epoch-stamped visited set, all in reusable Vecs so a walk allocates nothing.

use super::search::Hit;

/// A binary max-heap of (key, id) with f32 keys, kept in a reusable Vec.
#[derive(Default)]
pub(super) struct Heap {
    pub(super) items: Vec<(f32, u32)>,
}

impl Heap {
    #[inline(always)]
    pub(super) fn clear(&mut self) {
        self.items.clear();
    }

    #[inline(always)]
    pub(super) fn len(&self) -> usize {
        self.items.len()
    }

    #[inline(always)]
    pub(super) fn top_key(&self) -> f32 {
        self.items.first().map_or(f32::NEG_INFINITY, |t| t.0)
    }

    #[inline(always)]
    pub(super) fn push(&mut self, key: f32, id: u32) {
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
    pub(super) fn pop(&mut self) -> Option<(f32, u32)> {
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
    pub(super) fn replace_top(&mut self, key: f32, id: u32) {
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
pub(super) struct TopK {
    heap: Heap,
}

impl TopK {
    #[inline(always)]
    pub(super) fn clear(&mut self) {
        self.heap.clear();
    }

    #[inline(always)]
    pub(super) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Lowest score kept; +inf when empty.
    #[inline(always)]
    pub(super) fn worst(&self) -> f32 {
        -self.heap.top_key()
    }

    /// Offers a result; keeps at most `cap`.
    #[inline(always)]
    pub(super) fn offer(&mut self, score: f32, id: u32, cap: usize) {
        if self.heap.len() < cap {
            self.heap.push(-score, id);
        } else if score > self.worst() {
            self.heap.replace_top(-score, id);
        }
    }

    /// Moves the kept (score, id) pairs into `out`, best first (ties by lower id), leaving
    /// this empty.
    pub(super) fn drain_sorted_into(&mut self, out: &mut Vec<(f32, u32)>) {
        out.clear();
        out.extend(self.heap.items.drain(..).map(|(neg, id)| (-neg, id)));
        out.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    }

    /// The kept results, best first, ties broken by lower index; at most `k`.
    pub(super) fn sorted_hits(&self, k: usize) -> Vec<Hit> {
        let mut hits: Vec<Hit> = self.heap.items.iter().map(|&(neg, idx)| Hit { idx, score: -neg }).collect();
        hits.sort_unstable_by(|a, b| b.score.total_cmp(&a.score).then(a.idx.cmp(&b.idx)));
        hits.truncate(k);
        hits
    }
}

/// The state one best-first walk needs: visited marks (a node is visited when its mark equals
/// `epoch`, so starting a walk costs no clearing) and the two heaps.
#[derive(Default)]
pub(super) struct Walk {
    pub(super) visited: Vec<u16>,
    pub(super) epoch: u16,
    pub(super) candidates: Heap,
    pub(super) results: TopK,
}

impl Walk {
    /// Starts a new walk over `n` nodes: a fresh visited epoch (the marks are cleared only
    /// when the epoch wraps), empty heaps.
    pub(super) fn begin(&mut self, n: usize) {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
