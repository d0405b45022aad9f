//! The manifest: the one small file that names every live segment of every model version.
//!
//! `MANIFEST.json` is the commit point of the data directory. Segments, deletion bitmaps and
//! the record store are written (and fsynced) first; only then is a new manifest with a higher
//! `generation` atomically renamed over the old one. A file the manifest does not name is not
//! live, whatever is on disk. `wal_checkpoint` says which write-ahead-log records the named
//! files already contain: recovery replays only the records after it.
//!
//! The file's last member is `"checksum": "crc32:XXXXXXXX"`, a crc32 of every byte before the
//! comma that precedes it: a damaged manifest is refused at load, never half-trusted (files
//! written before checksums have none and still load).
//!
//! Format 2 (this build) keeps deletions out of the manifest (one bitmap file per segment
//! generation, see `deletes.rs`) and SKU records in the record store (`records.rs`). Format 1
//! manifests (deleted positions inline, catalogue batch files) are read by [`LegacyManifest`]
//! and migrated by the index writer on first open. All functions here are pure except
//! [`Manifest::load`] and [`Manifest::store`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::ids::{ModelVersion, SegmentId};

/// Version of the manifest's own JSON layout.
pub const MANIFEST_FORMAT: u32 = 2;
/// The previous layout, still readable (and migrated by the writer).
pub const LEGACY_MANIFEST_FORMAT: u32 = 1;
pub const MANIFEST_FILE: &str = "MANIFEST.json";
/// The largest `next_id` a manifest may hold (a damaged or crafted one beyond it is refused).
pub const MAX_SEGMENT_ID: u64 = 1 << 62;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write manifest {path}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("manifest {path} is not valid")]
    Parse { path: PathBuf, source: serde_json::Error },
    #[error("manifest {path} has format {found}; this build reads formats 1 and {MANIFEST_FORMAT}")]
    Format { path: PathBuf, found: u32 },
    #[error(
        "manifest {path} has format 1: open the directory with a writer (vitrine serve or ingest) once to migrate it"
    )]
    NeedsMigration { path: PathBuf },
    #[error("manifest {path} is inconsistent: {reason}")]
    Inconsistent { path: PathBuf, reason: String },
}

/// Where a segment's deletions are kept: `seg-N.del-G` holds `count` set bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeletesRef {
    /// The deletion file's generation (its name's suffix); raised on every rewrite.
    pub generation: u64,
    pub count: u64,
}

/// One immutable segment file of one model version's index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentEntry {
    pub id: SegmentId,
    /// Items stored in the file.
    pub count: u64,
    pub bytes: u64,
    /// The segment's deletion bitmap, if any item of it is deleted or superseded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deletes: Option<DeletesRef>,
    /// The `ef` its searches use when the query leaves it at 0, calibrated when it was written
    /// (see [`crate::segment::calibrate`]); absent in older manifests: the global default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ef: Option<u32>,
}

impl SegmentEntry {
    /// The entry of a segment just written as `id` (nothing deleted yet).
    pub fn written(id: SegmentId, stats: &crate::segment::SegmentStats) -> Self {
        SegmentEntry {
            id,
            count: stats.count as u64,
            bytes: stats.bytes,
            deletes: None,
            ef: Some(stats.default_ef as u32),
        }
    }

    pub fn deleted(&self) -> u64 {
        self.deletes.map_or(0, |d| d.count)
    }

    pub fn live(&self) -> u64 {
        self.count.saturating_sub(self.deleted())
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

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: u32,
    /// Raised by one on every commit.
    pub generation: u64,
    /// Next id for a segment; ids are never reused.
    pub next_id: u64,
    /// The model version that answers image and SKU queries.
    pub serving_model: Option<ModelVersion>,
    /// Every write-ahead-log record with a sequence number at or below this one is contained
    /// in the files this manifest names (and in the record store); recovery replays the rest.
    #[serde(default)]
    pub wal_checkpoint: u64,
    #[serde(default)]
    pub indexes: BTreeMap<ModelVersion, ModelIndex>,
    /// The rollout layer's state (its schema is `rollout::state::Rollout`), kept here so it
    /// commits atomically with the version changes it causes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<serde_json::Value>,
}

impl Default for Manifest {
    fn default() -> Self {
        Self {
            format: MANIFEST_FORMAT,
            generation: 0,
            next_id: 1,
            serving_model: None,
            wal_checkpoint: 0,
            indexes: BTreeMap::new(),
            rollout: None,
        }
    }
}

/// The manifest's last member: a crc32 of every byte of the file before the comma that
/// precedes it. Any damaged byte (one that still parses as JSON included) is caught at load.
const CHECKSUM_KEY: &[u8] = b",\n  \"checksum\": \"crc32:";

/// Appends the checksum member to a pretty-printed manifest object (`{...\n}`).
fn with_checksum(mut json: Vec<u8>) -> Vec<u8> {
    debug_assert!(json.ends_with(b"\n}"));
    json.truncate(json.len() - 2);
    let crc = crc32fast::hash(&json);
    json.extend_from_slice(CHECKSUM_KEY);
    json.extend_from_slice(format!("{crc:08x}\"\n}}\n").as_bytes());
    json
}

/// Checks and removes the checksum member; a manifest written before checksums has none.
fn strip_checksum(bytes: &[u8]) -> Result<std::borrow::Cow<'_, [u8]>, &'static str> {
    let Some(at) = bytes.windows(CHECKSUM_KEY.len()).rposition(|w| w == CHECKSUM_KEY) else {
        return Ok(bytes.into());
    };
    let rest = &bytes[at + CHECKSUM_KEY.len()..];
    let stored = rest
        .get(..8)
        .and_then(|h| std::str::from_utf8(h).ok())
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or("its checksum is not readable")?;
    if !matches!(rest.get(8..), Some(b"\"\n}\n") | Some(b"\"\n}")) {
        return Err("bytes follow its checksum");
    }
    if crc32fast::hash(&bytes[..at]) != stored {
        return Err("its checksum does not match its contents (the file is damaged)");
    }
    let mut body = bytes[..at].to_vec();
    body.extend_from_slice(b"\n}");
    Ok(body.into())
}

/// What a data directory's manifest file holds.
#[derive(Debug)]
pub enum Loaded {
    Current(Manifest),
    /// A format-1 manifest: the writer migrates it.
    Legacy(LegacyManifest),
}

impl Manifest {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(MANIFEST_FILE)
    }

    /// Reads the manifest of `data_dir` in either format; a directory without one has an
    /// empty (current) manifest.
    pub fn load_any(data_dir: &Path) -> Result<Loaded, ManifestError> {
        let path = Self::path(data_dir);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Loaded::Current(Self::default()));
            }
            Err(source) => return Err(ManifestError::Read { path, source }),
        };
        #[derive(Deserialize)]
        struct Probe {
            format: u32,
        }
        let bytes = strip_checksum(&bytes).map_err(|reason| ManifestError::Inconsistent {
            path: path.clone(),
            reason: reason.to_string(),
        })?;
        let probe: Probe = serde_json::from_slice(&bytes)
            .map_err(|source| ManifestError::Parse { path: path.clone(), source })?;
        match probe.format {
            MANIFEST_FORMAT => {
                let m: Manifest = serde_json::from_slice(&bytes)
                    .map_err(|source| ManifestError::Parse { path: path.clone(), source })?;
                m.validate().map_err(|reason| ManifestError::Inconsistent { path, reason })?;
                Ok(Loaded::Current(m))
            }
            LEGACY_MANIFEST_FORMAT => {
                let m: LegacyManifest = serde_json::from_slice(&bytes)
                    .map_err(|source| ManifestError::Parse { path: path.clone(), source })?;
                Ok(Loaded::Legacy(m))
            }
            found => Err(ManifestError::Format { path, found }),
        }
    }

    /// Reads a current-format manifest; a format-1 one is an error asking for migration.
    pub fn load(data_dir: &Path) -> Result<Self, ManifestError> {
        match Self::load_any(data_dir)? {
            Loaded::Current(m) => Ok(m),
            Loaded::Legacy(_) => Err(ManifestError::NeedsMigration { path: Self::path(data_dir) }),
        }
    }

    /// Atomically replaces the manifest of `data_dir` with `self` (temp file, fsync, rename,
    /// fsync directory).
    pub fn store(&self, data_dir: &Path) -> Result<(), ManifestError> {
        let path = Self::path(data_dir);
        if let Err(reason) = self.validate() {
            return Err(ManifestError::Inconsistent { path, reason });
        }
        let bytes = with_checksum(serde_json::to_vec_pretty(self).expect("manifest serialises"));
        fsutil::atomic_write(&path, &bytes).map_err(|source| ManifestError::Write { path, source })
    }

    /// Checks the invariants: ids unique and below `next_id`, deletion counts in range, the
    /// serving model has an index.
    pub fn validate(&self) -> Result<(), String> {
        if self.format != MANIFEST_FORMAT {
            return Err(format!("format {} is not {MANIFEST_FORMAT}", self.format));
        }
        if self.next_id > MAX_SEGMENT_ID {
            return Err(format!("next_id {} is above the limit {MAX_SEGMENT_ID}", self.next_id));
        }
        let mut seen = std::collections::HashSet::new();
        for (version, ix) in &self.indexes {
            if ix.dim == 0 {
                return Err(format!("index {version} has dimension 0"));
            }
            for s in &ix.segments {
                if s.id.0 >= self.next_id {
                    return Err(format!("segment id {} is not below next_id {}", s.id.0, self.next_id));
                }
                if !seen.insert(s.id.0) {
                    return Err(format!("segment id {} is used twice", s.id.0));
                }
                if s.count == 0 {
                    return Err(format!("segment {} of {version} is empty", s.id));
                }
                if s.deleted() > s.count {
                    return Err(format!("segment {} of {version}: more deletions than items", s.id));
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

    /// Hands out a fresh segment id.
    pub fn allocate_id(&mut self) -> u64 {
        let id = self.next_id;
        // `validate` keeps next_id at most MAX_SEGMENT_ID (2^62), which no writer reaches by
        // allocating one id per segment.
        self.next_id = self.next_id.saturating_add(1);
        id
    }

    /// The model version that serves queries, if any index exists.
    pub fn serving(&self) -> Option<(&ModelVersion, &ModelIndex)> {
        let v = self.serving_model.as_ref()?;
        self.indexes.get_key_value(v)
    }
}

/// A format-1 manifest, kept only to migrate old data directories.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyManifest {
    pub format: u32,
    pub generation: u64,
    pub next_id: u64,
    pub serving_model: Option<ModelVersion>,
    #[serde(default)]
    pub catalog: Vec<LegacyCatalogBatch>,
    #[serde(default)]
    pub indexes: BTreeMap<ModelVersion, LegacyModelIndex>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyCatalogBatch {
    pub id: u64,
    pub count: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacyModelIndex {
    pub dim: u32,
    pub weights_sha256: String,
    pub segments: Vec<LegacySegmentEntry>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LegacySegmentEntry {
    pub id: SegmentId,
    pub count: u64,
    pub bytes: u64,
    #[serde(default)]
    pub deleted: Vec<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_damaged_byte_of_a_stored_manifest_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = sample();
        m.serving_model = Some(ModelVersion::new("m1").unwrap());
        m.store(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), m);
        let good = std::fs::read(Manifest::path(dir.path())).unwrap();
        let text = String::from_utf8(good.clone()).unwrap();
        assert!(text.trim_end().ends_with('}') && text.contains("\"checksum\": \"crc32:"), "{text}");
        for i in 0..good.len() {
            for bit in [0x01u8, 0x10] {
                let mut bad = good.clone();
                bad[i] ^= bit;
                std::fs::write(Manifest::path(dir.path()), &bad).unwrap();
                match Manifest::load(dir.path()) {
                    Err(_) => {}
                    Ok(loaded) => panic!("byte {i} ^ {bit:#x} ({:?}) loaded: {loaded:?}", good[i] as char),
                }
            }
        }
    }

    #[test]
    fn a_manifest_without_checksum_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        std::fs::write(Manifest::path(dir.path()), serde_json::to_vec_pretty(&m).unwrap()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), m);
    }

    fn sample() -> Manifest {
        let mut m = Manifest::default();
        let v = ModelVersion::new("m1").unwrap();
        let id = m.allocate_id();
        m.indexes.insert(
            v.clone(),
            ModelIndex {
                dim: 4,
                weights_sha256: "ab".into(),
                segments: vec![SegmentEntry {
                    id: SegmentId(id),
                    count: 3,
                    bytes: 10,
                    deletes: None,
                    ef: None,
                }],
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
        m.wal_checkpoint = 42;
        m.store(dir.path()).unwrap();
        assert_eq!(Manifest::load(dir.path()).unwrap(), m);
    }

    #[test]
    fn rejects_inconsistent_manifests() {
        let mut m = sample();
        m.next_id = 1;
        assert!(m.validate().is_err());
        let mut m = sample();
        m.indexes.values_mut().next().unwrap().segments[0].deletes =
            Some(DeletesRef { generation: 1, count: 4 });
        assert!(m.validate().is_err());
        let mut m = sample();
        m.serving_model = Some(ModelVersion::new("other").unwrap());
        assert!(m.validate().is_err());
        let mut m = sample();
        m.next_id = u64::MAX;
        assert!(m.validate().unwrap_err().contains("next_id"));
    }

    #[test]
    fn reads_format_1_as_legacy_and_refuses_unknown_formats() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = r#"{"format": 1, "generation": 3, "next_id": 4, "serving_model": "m1",
            "catalog": [{"id": 2, "count": 3}],
            "indexes": {"m1": {"dim": 4, "weights_sha256": "ab",
                "segments": [{"id": 1, "count": 3, "bytes": 10, "deleted": [1]}]}}}"#;
        std::fs::write(Manifest::path(dir.path()), v1).unwrap();
        match Manifest::load_any(dir.path()).unwrap() {
            Loaded::Legacy(l) => {
                assert_eq!(l.catalog[0].id, 2);
                assert_eq!(l.indexes[&ModelVersion::new("m1").unwrap()].segments[0].deleted, vec![1]);
            }
            other => panic!("expected legacy, got {other:?}"),
        }
        assert!(matches!(Manifest::load(dir.path()), Err(ManifestError::NeedsMigration { .. })));
        std::fs::write(Manifest::path(dir.path()), r#"{"format": 99}"#).unwrap();
        assert!(matches!(Manifest::load(dir.path()), Err(ManifestError::Format { found: 99, .. })));
        std::fs::write(Manifest::path(dir.path()), b"{not json").unwrap();
        assert!(matches!(Manifest::load(dir.path()), Err(ManifestError::Parse { .. })));
    }
}
