//! What searches read: for each model version, its sealed (memory-mapped) segments with their
//! deletion bitsets, the frozen mutable segments being sealed, and the mutable segment that
//! takes new writes. One [`LiveSet`] is published through an `ArcSwap` by the index writer;
//! a search loads it once and sees a consistent set of segments for its whole run.
//!
//! Search fans out over every segment of one version (each segment a task on the calling rayon
//! pool, so a search that finds an idle core shares its segments with it), merges the hits,
//! drops duplicates and deleted items, and applies an attribute filter. The filter planner
//! finds the matching documents with the attribute index first, then plans each sealed
//! segment by how many of its own items match: none (skipped), few (an exact scan over them,
//! so their recall is 1), or many (a filtered HNSW walk with a beam widened by the inverse of
//! the segment's match share).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;
use rayon::prelude::*;

use super::deletes::DeleteSet;
use super::filter::{AttrIndex, DocId, Filter};
use super::mutable::MutableSegment;
use super::{IndexError, ScoredSku};
use crate::ids::{ModelVersion, SegmentId, SkuId};
use crate::segment::{DEFAULT_EF_SEARCH, Segment, normalise_into};

/// A filter matching at most this share of a segment's items is answered there by an exact
/// scan.
pub const EXACT_FILTER_FRACTION: f64 = 0.10;
/// ... and so is one matching at most this many items, whatever the share.
pub const EXACT_FILTER_ITEMS: u64 = 4096;
/// Upper bound of the widened beam of a filtered HNSW walk.
pub const MAX_FILTERED_EF: usize = 4096;

/// An immutable, memory-mapped segment with its deletions.
#[derive(Debug)]
pub struct SealedSegment {
    pub id: SegmentId,
    pub segment: Segment,
    pub deleted: DeleteSet,
    /// The `ef` of a query that leaves it at 0 (calibrated when the segment was written).
    pub default_ef: usize,
    /// The attribute-index document of each position, and the set of them (built on the first
    /// filtered search).
    docs: OnceLock<(Vec<DocId>, roaring::RoaringBitmap)>,
}

impl SealedSegment {
    /// A segment searched at [`DEFAULT_EF_SEARCH`] by default.
    pub fn new(id: SegmentId, segment: Segment, deleted: DeleteSet) -> Self {
        Self { id, segment, deleted, default_ef: DEFAULT_EF_SEARCH, docs: OnceLock::new() }
    }

    /// The same, searched at `ef` when a query leaves it at 0.
    pub fn with_default_ef(mut self, ef: usize) -> Self {
        self.default_ef = ef.max(1);
        self
    }

    /// Starts building, in the background, the one-bit sketches of a segment that searches
    /// scan rather than walk at its default `ef` ([`Segment::scanned_at`];
    /// `Segment::start_scan_sketch`).
    pub fn start_scan_sketch(self) -> Self {
        if self.segment.scanned_at(self.default_ef) {
            self.segment.start_scan_sketch();
        }
        self
    }

    pub fn live(&self) -> u64 {
        self.segment.len() as u64 - self.deleted.count()
    }

    /// The live position of `sku` in this segment.
    pub fn find(&self, sku: &str) -> Option<u32> {
        self.segment.find_sku(sku).filter(|&p| !self.deleted.contains(p))
    }

    fn docs(&self, attrs: &RwLock<AttrIndex>) -> &(Vec<DocId>, roaring::RoaringBitmap) {
        self.docs.get_or_init(|| {
            let index = attrs.read();
            let docs: Vec<DocId> = (0..self.segment.len() as u32)
                .map(|p| index.doc(self.segment.sku(p)).unwrap_or(DocId::MAX))
                .collect();
            drop(index);
            let mut sorted: Vec<DocId> = docs.iter().copied().filter(|&d| d != DocId::MAX).collect();
            sorted.sort_unstable();
            sorted.dedup();
            let set = roaring::RoaringBitmap::from_sorted_iter(sorted).expect("sorted and deduplicated");
            (docs, set)
        })
    }
}

/// The searchable index of one model version.
#[derive(Debug)]
pub struct VersionLive {
    pub version: ModelVersion,
    pub dim: usize,
    pub weights_sha256: String,
    /// Oldest first.
    pub sealed: Vec<Arc<SealedSegment>>,
    /// Oldest first; each is being sealed.
    pub frozen: Vec<Arc<MutableSegment>>,
    pub mutable: Arc<MutableSegment>,
}

/// How a search runs on each segment: the normalised query, the hits it wants, and the
/// filter planner's decisions.
struct SegmentPlan<'a> {
    query: &'a [f32],
    k: usize,
    /// The query's `ef` (0: each sealed segment's default).
    ef: usize,
    /// The filter's matching documents (planned per sealed segment: [`segment_plan`]).
    matches: Option<&'a roaring::RoaringBitmap>,
    mask: Option<&'a DocMask>,
}

/// How a filtered search runs on one sealed segment, from how many of its items match: not
/// at all (none do), by an exact scan over the matches (few do, or a small share), or by a
/// walk whose beam is widened by the inverse of the share that matches. Planning per segment
/// matters when the matches cluster in some segments (recent items, one merchant's upload):
/// a global share would walk the others with too narrow a beam for their few matches.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Walk {
    Skip,
    Exact,
    Widened(f64),
}

/// See [`Walk`]: `matching` of the segment's `items` match the filter.
fn segment_plan(matching: u64, items: u64) -> Walk {
    if matching == 0 {
        return Walk::Skip;
    }
    let share = matching as f64 / items.max(1) as f64;
    if share <= EXACT_FILTER_FRACTION || matching <= EXACT_FILTER_ITEMS {
        Walk::Exact
    } else {
        Walk::Widened(1.0 / share)
    }
}

/// One segment's hits: (score, segment order, sku), newer segments having higher order.
type PartHits = Vec<(f32, usize, SkuId)>;

/// The hits of an in-memory segment (frozen or mutable) searched as segment `order`.
fn search_memory(m: &MutableSegment, order: usize, plan: &SegmentPlan<'_>) -> PartHits {
    let keep_doc = |d: DocId| plan.mask.is_none_or(|m| m.contains(d));
    let doc_filter: Option<&dyn Fn(DocId) -> bool> = if plan.mask.is_some() { Some(&keep_doc) } else { None };
    m.search(plan.query, plan.k, doc_filter).into_iter().map(|(h, sku)| (h.score, order, sku)).collect()
}

/// Every model version's live index, as one writer generation publishes it.
#[derive(Debug, Default)]
pub struct LiveSet {
    /// The manifest generation the sealed segments come from.
    pub generation: u64,
    pub serving: Option<ModelVersion>,
    /// The rollout layer's state, as the manifest holds it.
    pub rollout: Option<serde_json::Value>,
    pub versions: BTreeMap<ModelVersion, Arc<VersionLive>>,
}

impl LiveSet {
    pub fn version(&self, v: &ModelVersion) -> Result<&Arc<VersionLive>, IndexError> {
        self.versions.get(v).ok_or_else(|| IndexError::UnknownModel(v.clone()))
    }

    pub fn serving_version(&self) -> Option<&Arc<VersionLive>> {
        self.serving.as_ref().and_then(|v| self.versions.get(v))
    }
}

/// Whether one version's segments (mutable, frozen, sealed) hold a live vector of `sku`.
pub(crate) fn holds(
    mutable: &MutableSegment,
    frozen: &[Arc<MutableSegment>],
    sealed: &[Arc<SealedSegment>],
    sku: &str,
) -> bool {
    mutable.find(sku).is_some()
        || frozen.iter().any(|f| f.find(sku).is_some())
        || sealed.iter().any(|s| s.find(sku).is_some())
}

/// Deletes the live copies of `sku` in frozen and sealed segments (the ones a new copy in the
/// mutable segment supersedes).
pub(crate) fn delete_older_copies(
    frozen: &[Arc<MutableSegment>],
    sealed: &[Arc<SealedSegment>],
    sku: &SkuId,
) {
    for f in frozen {
        f.delete_sku(sku);
    }
    for s in sealed {
        if let Some(p) = s.find(sku.as_str()) {
            s.deleted.set(p);
        }
    }
}

/// A dense bitset over document ids, for fast membership tests in the search loops.
struct DocMask {
    words: Vec<u64>,
}

impl DocMask {
    fn new(matches: &roaring::RoaringBitmap) -> Self {
        let max = matches.max().map_or(0, |m| m as usize + 1);
        let mut words = vec![0u64; max.div_ceil(64)];
        for d in matches {
            words[d as usize / 64] |= 1 << (d % 64);
        }
        Self { words }
    }

    #[inline]
    fn contains(&self, d: DocId) -> bool {
        self.words.get(d as usize / 64).is_some_and(|w| w & (1 << (d % 64)) != 0)
    }
}

/// One search, as the caller asks it.
#[derive(Debug, Clone, Copy)]
pub struct Query<'a> {
    pub vector: &'a [f32],
    pub k: usize,
    /// 0: each sealed segment's calibrated default ([`SealedSegment::default_ef`]; the
    /// in-memory segments are scanned exactly). Raised to at least `k`.
    pub ef: usize,
    /// A SKU never to return (the query item of "more like this").
    pub exclude: Option<&'a str>,
    pub filter: Option<&'a Filter>,
}

impl VersionLive {
    /// Live items in every segment.
    pub fn live_items(&self) -> u64 {
        let sealed: u64 = self.sealed.iter().map(|s| s.live()).sum();
        let mutable: usize = self.frozen.iter().chain([&self.mutable]).map(|m| m.live_count()).sum();
        sealed + mutable as u64
    }

    /// The stored (unit-length) vector of the live copy of `sku`.
    pub fn vector_of(&self, sku: &str) -> Option<Vec<f32>> {
        for m in std::iter::once(&self.mutable).chain(self.frozen.iter().rev()) {
            if let Some(v) = m.vector_of(sku) {
                return Some(v);
            }
        }
        self.sealed.iter().rev().find_map(|s| s.find(sku).map(|p| s.segment.vector(p).to_vec()))
    }

    /// Whether this version holds a live vector of `sku`.
    pub fn holds(&self, sku: &str) -> bool {
        holds(&self.mutable, &self.frozen, &self.sealed, sku)
    }

    /// Top-`k` live items by cosine similarity, best first; see the module docs.
    pub fn search(&self, q: &Query<'_>, attrs: &RwLock<AttrIndex>) -> Result<Vec<ScoredSku>, IndexError> {
        if q.vector.len() != self.dim {
            return Err(IndexError::QueryDim {
                model: self.version.clone(),
                expected: self.dim,
                found: q.vector.len(),
            });
        }
        let mut query = Vec::with_capacity(self.dim);
        normalise_into(q.vector, &mut query).map_err(IndexError::BadQuery)?;
        let k_inner = q.k + usize::from(q.exclude.is_some());

        // Filter planning: the matching documents, from the attribute index; each sealed
        // segment then counts its own ([`segment_plan`]).
        let matches = match q.filter.filter(|f| !f.conditions.is_empty()) {
            None => None,
            Some(f) => {
                let matches = attrs.read().matching(f);
                if matches.is_empty() {
                    return Ok(Vec::new());
                }
                Some(matches)
            }
        };
        let mask = matches.as_ref().map(DocMask::new);

        // Each segment is one task on the calling pool: a search that finds an idle core
        // splits its segments with it (most useful while writes leave several small segments
        // waiting for a merge), and one that finds every core busy runs them in turn.
        let plan = SegmentPlan {
            query: &query,
            k: k_inner,
            ef: q.ef,
            matches: matches.as_ref(),
            mask: mask.as_ref(),
        };
        let base = self.sealed.len();
        let per_part = (0..base + self.frozen.len() + 1)
            .into_par_iter()
            .map(|order| match order.checked_sub(base) {
                None => self.search_sealed(order, &plan, attrs),
                Some(i) => Ok(search_memory(self.frozen.get(i).unwrap_or(&self.mutable), order, &plan)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut all: PartHits = per_part.into_iter().flatten().collect();
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then_with(|| a.2.cmp(&b.2)));
        let mut seen = HashSet::with_capacity(all.len());
        let mut out = Vec::with_capacity(q.k);
        for (score, _, sku) in all {
            if q.exclude == Some(sku.as_str()) || !seen.insert(sku.clone()) {
                continue;
            }
            out.push(ScoredSku { sku, score });
            if out.len() == q.k {
                break;
            }
        }
        Ok(out)
    }

    /// The hits of sealed segment `order`, without its deleted items.
    fn search_sealed(
        &self,
        order: usize,
        plan: &SegmentPlan<'_>,
        attrs: &RwLock<AttrIndex>,
    ) -> Result<PartHits, IndexError> {
        let s = &self.sealed[order];
        let docs = plan.matches.map(|_| s.docs(attrs));
        let walk = match (plan.matches, docs) {
            (Some(m), Some((_, set))) => segment_plan(m.intersection_len(set), s.segment.len() as u64),
            _ => Walk::Widened(1.0),
        };
        let deleted = s.deleted.count() > 0;
        let keep = |pos: u32| {
            !(deleted && s.deleted.contains(pos))
                && match (plan.mask, docs) {
                    (Some(m), Some((d, _))) => d.get(pos as usize).is_some_and(|&doc| m.contains(doc)),
                    _ => true,
                }
        };
        let filter: Option<&dyn Fn(u32) -> bool> =
            if deleted || plan.mask.is_some() { Some(&keep) } else { None };
        let hits = match walk {
            Walk::Skip => return Ok(Vec::new()),
            Walk::Exact => s.segment.brute_force(plan.query, plan.k, filter)?,
            Walk::Widened(widen) => {
                let ef = if plan.ef == 0 { s.default_ef } else { plan.ef }.max(plan.k);
                let ef = ((ef as f64 * widen).ceil() as usize).clamp(ef, MAX_FILTERED_EF.max(ef));
                s.segment.search(plan.query, plan.k, ef, filter)?
            }
        };
        hits.into_iter()
            .map(|h| {
                let sku = SkuId::new(s.segment.sku(h.idx)).map_err(|_| IndexError::DamagedSku {
                    model: self.version.clone(),
                    id: s.id,
                    idx: h.idx,
                })?;
                Ok((h.score, order, sku))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_segment_is_planned_by_its_own_matches() {
        assert_eq!(segment_plan(0, 100_000), Walk::Skip);
        assert_eq!(segment_plan(EXACT_FILTER_ITEMS, 10_000), Walk::Exact, "few matches: scanned");
        assert_eq!(segment_plan(9_000, 100_000), Walk::Exact, "a small share: scanned");
        assert_eq!(segment_plan(50_000, 100_000), Walk::Widened(2.0));
        assert_eq!(segment_plan(5, 0), Walk::Exact);
    }
}
