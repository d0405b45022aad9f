//! The manifest: the one small file that names every live segment of every model version.
//!
//! `MANIFEST.json` is the commit point of the data directory. Segments, catalogue batches and
//! image blobs are written (and fsynced) first; only then is a new manifest with a higher
//! `generation` atomically renamed over the old one. A file the manifest does not name is not
//! live, whatever is on disk. All functions here are pure except [`Manifest::load`] and
//! [`Manifest::store`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::ids::{ModelVersion, SegmentId};

/// Version of the manifest's own JSON layout.
pub const MANIFEST_FORMAT: u32 = 1;
pub const MANIFEST_FILE: &str = "MANIFEST.json";

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write manifest {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("manifest {path} is not valid: {source}")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("manifest {path} has format {found}; this build reads format {MANIFEST_FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error("manifest {path} is inconsistent: {reason}")]
    Inconsistent { path: PathBuf, reason: String },
}

/// One immutable segment file of one model version's index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentEntry {
    pub id: SegmentId,
    /// Items stored in the file.
    pub count: u64,
    pub bytes: u64,
    /// Sorted item positions (within this segment) that are deleted or superseded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<u32>,
}

impl SegmentEntry {
    pub fn live(&self) -> u64 {
        self.count - self.deleted.len() as u64
    }

    /// Marks `idx` deleted, keeping the list sorted and unique.
    pub fn delete(&mut self, idx: u32) {
        if let Err(pos) = self.deleted.binary_search(&idx) {
            self.deleted.insert(pos, idx);
        }
    }

    pub fn is_deleted(&self, idx: u32) -> bool {
        self.deleted.binary_search(&idx).is_ok()
    }
}

/// The index of one model version: its segments, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelIndex {
    pub dim: u32,
    /// sha256 of the weights the vectors were made with: vectors of other weights never mix in.
    pub weights_sha256: String,
    pub segments: Vec<SegmentEntry>,
}

impl ModelIndex {
    pub fn live_items(&self) -> u64 {
        self.segments.iter().map(SegmentEntry::live).sum()
    }
}

/// One immutable file of catalogue records (SKU, image blob, attributes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogBatch {
    pub id: u64,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// Raised by one on every commit.
    pub generation: u64,
    /// Next id for a segment or catalogue batch; ids are never reused.
    pub next_id: u64,
    /// The model version that answers image and SKU queries.
    pub serving_model: Option<ModelVersion>,
    #[serde(default)]
    pub catalog: Vec<CatalogBatch>,
    #[serde(default)]
    pub indexes: BTreeMap<ModelVersion, ModelIndex>,
}

impl Default for Manifest {
    fn default() -> Self {
        Self {
            format: MANIFEST_FORMAT,
            generation: 0,
            next_id: 1,
            serving_model: None,
            catalog: Vec::new(),
            indexes: BTreeMap::new(),
        }
    }
}

impl Manifest {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(MANIFEST_FILE)
    }

    /// Reads the manifest of `data_dir`; a directory without one has an empty manifest.
    pub fn load(data_dir: &Path) -> Result<Self, ManifestError> {
        let path = Self::path(data_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => return Err(ManifestError::Read { path, source }),
        };
        let m: Manifest = serde_json::from_slice(&bytes)
            .map_err(|source| ManifestError::Parse { path: path.clone(), source })?;
        if m.format != MANIFEST_FORMAT {
            return Err(ManifestError::Format { path, found: m.format });
        }
        m.validate().map_err(|reason| ManifestError::Inconsistent { path, reason })?;
        Ok(m)
    }

    /// Atomically replaces the manifest of `data_dir` with `self` (temp file, fsync, rename,
    /// fsync directory).
    pub fn store(&self, data_dir: &Path) -> Result<(), ManifestError> {
        let path = Self::path(data_dir);
        if let Err(reason) = self.validate() {
            return Err(ManifestError::Inconsistent { path, reason });
        }
        let mut bytes = serde_json::to_vec_pretty(self).expect("manifest serialises");
        bytes.push(b'\n');
        fsutil::atomic_write(&path, &bytes).map_err(|source| ManifestError::Write { path, source })
    }

    /// Checks the invariants: ids unique and below `next_id`, deleted lists sorted and in range,
    /// the serving model has an index.
    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        let ids = self
            .indexes
            .values()
            .flat_map(|ix| ix.segments.iter().map(|s| s.id.0))
            .chain(self.catalog.iter().map(|c| c.id));
        for id in ids {
            if id >= self.next_id {
                return Err(format!("id {id} is not below next_id {}", self.next_id));
            }
            if !seen.insert(id) {
                return Err(format!("id {id} is used twice"));
            }
        }
        for (version, ix) in &self.indexes {
            if ix.dim == 0 {
                return Err(format!("index {version} has dimension 0"));
            }
            for s in &ix.segments {
                if !s.deleted.windows(2).all(|w| w[0] < w[1]) {
                    return Err(format!("segment {} of {version}: deleted list not sorted", s.id));
                }
                if s.deleted.last().is_some_and(|&d| u64::from(d) >= s.count) {
                    return Err(format!("segment {} of {version}: deleted position out of range", s.id));
                }
            }
        }
        if let Some(v) = &self.serving_model
            && !self.indexes.contains_key(v)
        {
            return Err(format!("serving model {v} has no index"));
        }
        Ok(())
    }

    /// Hands out a fresh id (for a segment or a catalogue batch).
    pub fn allocate_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The model version that serves queries, if any index exists.
    pub fn serving(&self) -> Option<(&ModelVersion, &ModelIndex)> {
        let v = self.serving_model.as_ref()?;
        self.indexes.get_key_value(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let mut m = Manifest::default();
        let v = ModelVersion::new("m1").unwrap();
        let id = m.allocate_id();
        m.indexes.insert(
            v.clone(),
            ModelIndex {
                dim: 4,
                weights_sha256: "ab".into(),
                segments: vec![SegmentEntry { id: SegmentId(id), count: 3, bytes: 10, deleted: vec![] }],
            },
        );
        m.serving_model = Some(v);
        m
    }

    #[test]
    fn round_trip_and_generation() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), Manifest::default());
        let mut m = sample();
        m.generation = 7;
        m.store(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), m);
    }

    #[test]
    fn delete_keeps_sorted_unique() {
        let mut s = SegmentEntry { id: SegmentId(1), count: 10, bytes: 0, deleted: vec![] };
        for i in [5, 1, 5, 9, 0] {
            s.delete(i);
        }
        assert_eq!(s.deleted, vec![0, 1, 5, 9]);
        assert!(s.is_deleted(9) && !s.is_deleted(2));
        assert_eq!(s.live(), 6);
    }

    #[test]
    fn rejects_inconsistent_manifests() {
        let mut m = sample();
        m.next_id = 1;
        assert!(m.validate().is_err());
        let mut m = sample();
        m.indexes.values_mut().next().unwrap().segments[0].deleted = vec![3];
        assert!(m.validate().is_err());
        let mut m = sample();
        m.serving_model = Some(ModelVersion::new("other").unwrap());
        assert!(m.validate().is_err());
    }

    #[test]
    fn refuses_unknown_format_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = sample();
        m.format = 99;
        std::fs::write(Manifest::path(dir.path()), serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(matches!(Manifest::load(dir.path()), Err(ManifestError::Format { found: 99, .. })));
        std::fs::write(Manifest::path(dir.path()), b"{not json").unwrap();
        assert!(matches!(Manifest::load(dir.path()), Err(ManifestError::Parse { .. })));
    }
}
