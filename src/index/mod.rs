//! The live index: which segments of which model version are searchable, named by one manifest.
//!
//! [`IndexSnapshot::open`] maps every segment the manifest names (O(1) per segment: nothing is
//! rebuilt on the heap) and answers searches by fanning out over the segments of one model
//! version and merging their hits. A snapshot is immutable; a server swaps in a new one when
//! the manifest's generation moves.

pub mod manifest;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use crate::ids::{ModelVersion, SegmentId, SkuId};
use crate::segment::{DEFAULT_EF_SEARCH, Segment, SegmentError, normalise_into};
use manifest::{Manifest, SegmentEntry};
use store::{Attrs, DataDir, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Segment(#[from] SegmentError),
    #[error("segment {id} of {model}: manifest says {expected} items, file {path} holds {found}")]
    CountMismatch { model: ModelVersion, id: SegmentId, path: PathBuf, expected: u64, found: u64 },
    #[error("segment {id} of {model}: file {path} has dimension {found}, index has {expected}")]
    DimMismatch { model: ModelVersion, id: SegmentId, path: PathBuf, expected: usize, found: usize },
    #[error("no index for model version {0}")]
    UnknownModel(ModelVersion),
    #[error("query vector has {found} dimensions; model {model} uses {expected}")]
    QueryDim { model: ModelVersion, expected: usize, found: usize },
    #[error("query vector is unusable: {0}")]
    BadQuery(&'static str),
    #[error("segment {id} of {model}: item {idx} has no valid SKU (run `vitrine verify`)")]
    DamagedSku { model: ModelVersion, id: SegmentId, idx: u32 },
}

/// One search answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredSku {
    pub sku: SkuId,
    pub score: f32,
}

/// A mapped segment together with its manifest entry (which carries the deleted positions).
#[derive(Debug)]
pub struct LoadedSegment {
    pub entry: SegmentEntry,
    pub segment: Segment,
}

/// The searchable index of one model version.
#[derive(Debug)]
pub struct ModelIndexView {
    pub version: ModelVersion,
    pub dim: usize,
    pub weights_sha256: String,
    /// Oldest first.
    pub segments: Vec<LoadedSegment>,
}

impl ModelIndexView {
    pub fn live_items(&self) -> u64 {
        self.segments.iter().map(|s| s.entry.live()).sum()
    }

    /// The newest live copy of `sku`: its segment and position.
    pub fn find_sku(&self, sku: &str) -> Option<(&LoadedSegment, u32)> {
        self.segments.iter().rev().find_map(|s| {
            let idx = s.segment.find_sku(sku)?;
            (!s.entry.is_deleted(idx)).then_some((s, idx))
        })
    }

    /// The stored embedding of `sku`, if it is live.
    pub fn vector_of(&self, sku: &str) -> Option<&[f32]> {
        self.find_sku(sku).map(|(s, idx)| s.segment.vector(idx))
    }

    /// Top-`k` live items by cosine similarity to `query` (normalised here), best first.
    /// `ef` of 0 means [`DEFAULT_EF_SEARCH`]; it is raised to at least `k`. Items for which
    /// `exclude` returns true are left out.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        exclude: Option<&str>,
    ) -> Result<Vec<ScoredSku>, IndexError> {
        if query.len() != self.dim {
            return Err(IndexError::QueryDim {
                model: self.version.clone(),
                expected: self.dim,
                found: query.len(),
            });
        }
        // Validated (and normalised) once here, so a bad query is the caller's error even
        // when the index has no segment; each segment normalises its copy again.
        let mut q = Vec::with_capacity(query.len());
        normalise_into(query, &mut q).map_err(IndexError::BadQuery)?;
        let k_inner = k + usize::from(exclude.is_some());
        let ef = if ef == 0 { DEFAULT_EF_SEARCH } else { ef }.max(k_inner);
        // (score, segment order, position): ties break towards newer segments, then position.
        let mut all: Vec<(f32, usize, u32)> = Vec::with_capacity(k_inner * self.segments.len());
        for (order, s) in self.segments.iter().enumerate() {
            let hits = if s.entry.deleted.is_empty() {
                s.segment.search(&q, k_inner, ef, None)?
            } else {
                let keep = |idx: u32| !s.entry.is_deleted(idx);
                s.segment.search(&q, k_inner, ef, Some(&keep))?
            };
            all.extend(hits.into_iter().map(|h| (h.score, order, h.idx)));
        }
        all.sort_by(|a, b| b.0.total_cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        let mut out = Vec::with_capacity(k);
        for (score, order, idx) in all {
            let seg = &self.segments[order];
            let sku = seg.segment.sku(idx);
            if exclude == Some(sku) {
                continue;
            }
            let sku = SkuId::new(sku).map_err(|_| IndexError::DamagedSku {
                model: self.version.clone(),
                id: seg.entry.id,
                idx,
            })?;
            out.push(ScoredSku { sku, score });
            if out.len() == k {
                break;
            }
        }
        Ok(out)
    }
}

/// Every model version's index as the manifest of one generation names it.
#[derive(Debug)]
pub struct IndexSnapshot {
    pub generation: u64,
    pub serving: Option<ModelVersion>,
    pub models: BTreeMap<ModelVersion, Arc<ModelIndexView>>,
    /// Catalogue attributes of the SKUs that have any, as of this manifest. Empty unless
    /// [`load_attrs`](Self::load_attrs) filled it (the server does; ingest has no use for it).
    pub attrs: HashMap<SkuId, Attrs>,
}

impl IndexSnapshot {
    /// Reads the catalogue batches `manifest` names and keeps each SKU's latest attributes
    /// (O(catalogue): run before the snapshot serves, never on a query).
    pub fn load_attrs(&mut self, data: &DataDir, manifest: &Manifest) -> Result<(), StoreError> {
        self.attrs = data
            .read_catalog(manifest)?
            .into_values()
            .filter(|r| !r.attrs.is_empty())
            .map(|r| (r.sku, r.attrs))
            .collect();
        Ok(())
    }

    /// Maps the segments named by `manifest`.
    pub fn open(data: &DataDir, manifest: &Manifest) -> Result<Self, IndexError> {
        let mut models = BTreeMap::new();
        for (version, ix) in &manifest.indexes {
            let mut segments = Vec::with_capacity(ix.segments.len());
            for entry in &ix.segments {
                let path = data.segment_path(version, entry.id);
                let segment = Segment::open(&path)?;
                if segment.len() as u64 != entry.count {
                    return Err(IndexError::CountMismatch {
                        model: version.clone(),
                        id: entry.id,
                        path,
                        expected: entry.count,
                        found: segment.len() as u64,
                    });
                }
                if segment.dim() != ix.dim as usize {
                    return Err(IndexError::DimMismatch {
                        model: version.clone(),
                        id: entry.id,
                        path,
                        expected: ix.dim as usize,
                        found: segment.dim(),
                    });
                }
                segments.push(LoadedSegment { entry: entry.clone(), segment });
            }
            let view = ModelIndexView {
                version: version.clone(),
                dim: ix.dim as usize,
                weights_sha256: ix.weights_sha256.clone(),
                segments,
            };
            models.insert(version.clone(), Arc::new(view));
        }
        Ok(Self {
            generation: manifest.generation,
            serving: manifest.serving_model.clone(),
            models,
            attrs: HashMap::new(),
        })
    }

    pub fn model(&self, version: &ModelVersion) -> Result<&Arc<ModelIndexView>, IndexError> {
        self.models.get(version).ok_or_else(|| IndexError::UnknownModel(version.clone()))
    }

    /// Asks the kernel to read every segment ahead (`MADV_WILLNEED`), so the first queries
    /// after a start or a swap do not each wait on page faults. Returns at once.
    pub fn warm(&self) {
        for view in self.models.values() {
            for s in &view.segments {
                s.segment.warm();
            }
        }
    }

    /// Checks every segment's checksums and graph structure (reads whole files: O(N)).
    /// Returns the segments that fail, with why.
    pub fn verify_segments(&self) -> Vec<(ModelVersion, SegmentId, SegmentError)> {
        let mut bad = Vec::new();
        for (version, view) in &self.models {
            for s in &view.segments {
                if let Err(e) = s.segment.verify() {
                    bad.push((version.clone(), s.entry.id, e));
                }
            }
        }
        bad
    }

    pub fn serving_index(&self) -> Option<&Arc<ModelIndexView>> {
        self.serving.as_ref().and_then(|v| self.models.get(v))
    }
}
