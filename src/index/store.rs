//! The data directory on disk: its layout, the writer lock, image blobs, and (for migrating
//! format-1 directories) the old catalogue batch files.
//!
//! ```text
//! DATA_DIR/
//!   MANIFEST.json                      names everything live (see manifest.rs)
//!   LOCK                               flock'd by the one writer; says who holds it
//!   wal/wal-00000000000000000001.log   write-ahead log (see wal.rs)
//!   records.redb                       SKU records (see records.rs)
//!   blobs/ab/ab12...ef                 original image bytes, named by their sha256
//!   indexes/<model-version>/seg-000000000003.vseg        HNSW segments (immutable)
//!   indexes/<model-version>/seg-000000000003.vseg.del-7  its deletions, generation 7
//! ```
//! Every file is written to a temp name, fsynced and renamed into place before the manifest
//! that names it is committed, so a crash at any point leaves the last manifest intact and at
//! worst some unnamed files, which the next writer removes.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, Write};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::manifest::{LegacyManifest, Manifest, ManifestError};
use crate::fsutil;
use crate::ids::{ModelVersion, SegmentId, SkuId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("data directory {path} is held by another writer: {holder}")]
    Locked { path: PathBuf, holder: String },
    #[error("data directory {0} does not exist; run `vitrine ingest` first")]
    Missing(PathBuf),
    #[error("catalogue batch {path} line {line}")]
    BadRecord { path: PathBuf, line: usize, source: serde_json::Error },
    #[error("image blob {sha256} is missing from {path}")]
    MissingBlob { sha256: String, path: PathBuf },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(
        "{path} is not a vitrine data directory: it has no MANIFEST.json and holds other files ({example}); pass a new or empty folder"
    )]
    NotADataDir { path: PathBuf, example: String },
    #[error(
        "data directory {path} has lost its MANIFEST.json but still holds data ({holds}); restore the manifest from a backup (`vitrine verify` checks it), nothing was changed"
    )]
    ManifestMissing { path: PathBuf, holds: String },
}

/// What a data directory holds besides its manifest (a writer creates these first).
const LAYOUT: [&str; 6] = ["blobs", "indexes", "wal", "LOCK", super::records::RECORDS_FILE, "catalog"];

/// Checks that `root`, if it exists, is a data directory or an empty folder: a folder of
/// other files is refused (so a typo never turns someone's folder into an index), and so is
/// a data directory whose manifest is gone (a writer would start an empty catalogue over it).
pub fn check_layout(root: &Path) -> Result<(), StoreError> {
    if !root.is_dir() || Manifest::path(root).exists() {
        return Ok(());
    }
    let mut holds = Vec::new();
    for entry in fs::read_dir(root).map_err(io_err("cannot read", root))? {
        let entry = entry.map_err(io_err("cannot read", root))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !LAYOUT.contains(&name.as_str()) && !name.starts_with(".MANIFEST.json.tmp") {
            return Err(StoreError::NotADataDir { path: root.to_path_buf(), example: name });
        }
        let path = entry.path();
        let has_data = match name.as_str() {
            "blobs" | "indexes" | "catalog" => fs::read_dir(&path).is_ok_and(|mut d| d.next().is_some()),
            "wal" => fs::read_dir(&path).is_ok_and(|d| {
                d.filter_map(Result::ok).any(|e| {
                    !e.file_name().to_str().is_some_and(super::wal::is_spare_name)
                        && e.metadata().is_ok_and(|m| m.len() > 0)
                })
            }),
            _ => false,
        };
        if has_data {
            holds.push(format!("{name}/"));
        }
    }
    if holds.is_empty() {
        return Ok(());
    }
    holds.sort();
    Err(StoreError::ManifestMissing { path: root.to_path_buf(), holds: holds.join(", ") })
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io { action, path: path.to_path_buf(), source }
}

/// An attribute value from the catalogue: a string or a number.
pub type Attrs = BTreeMap<String, serde_json::Value>;

/// What the catalogue says about one SKU; independent of any model version, so a new model
/// can be backfilled from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogRecord {
    pub sku: SkuId,
    /// sha256 (hex) of the original image bytes, stored under blobs/.
    pub image_sha256: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attrs: Attrs,
}

/// sha256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// A data directory, opened for reading or (with the lock held) for writing.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    _lock: Option<File>,
}

impl DataDir {
    /// Opens an existing data directory for reading; takes no lock.
    pub fn open_reader(root: &Path) -> Result<Self, StoreError> {
        if !root.is_dir() {
            return Err(StoreError::Missing(root.to_path_buf()));
        }
        Ok(Self { root: root.to_path_buf(), _lock: None })
    }

    /// Who holds `root`'s writer lock now, if anyone (checked by trying the lock, which is
    /// released again; the directory is not changed).
    pub fn held_by(root: &Path) -> Option<String> {
        let lock_path = root.join("LOCK");
        let lock = File::open(&lock_path).ok()?;
        match lock.try_lock() {
            Err(fs::TryLockError::WouldBlock) => Some(holder_of(&lock_path)),
            _ => None,
        }
    }

    /// Opens (creating if needed) a data directory as its only writer. `holder` says who holds
    /// it (e.g. "vitrine serve, pid 42, listening on 127.0.0.1:50051"); a second writer is
    /// refused with that text.
    pub fn open_writer(root: &Path, holder: &str) -> Result<Self, StoreError> {
        check_layout(root)?;
        for sub in ["", "blobs", "indexes", "wal"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err("cannot create", &p))?;
        }
        let lock_path = root.join("LOCK");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err("cannot open", &lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked { path: root.to_path_buf(), holder: holder_of(&lock_path) });
            }
            Err(fs::TryLockError::Error(e)) => return Err(io_err("cannot lock", &lock_path)(e)),
        }
        // Say who holds it (best effort: the flock, not this text, is the lock).
        let _ = lock.set_len(0).and_then(|()| (&lock).write_all(format!("{holder}\n").as_bytes()));
        Ok(Self { root: root.to_path_buf(), _lock: Some(lock) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn load_manifest(&self) -> Result<Manifest, StoreError> {
        Ok(Manifest::load(&self.root)?)
    }

    pub fn wal_dir(&self) -> PathBuf {
        self.root.join("wal")
    }

    pub fn records_path(&self) -> PathBuf {
        self.root.join(super::records::RECORDS_FILE)
    }

    /// The deletion file of segment `id` at `generation`.
    pub fn deletes_path(&self, model: &ModelVersion, id: SegmentId, generation: u64) -> PathBuf {
        self.index_dir(model).join(super::deletes::DeleteSet::file_name(&id.file_name(), generation))
    }

    pub fn index_dir(&self, model: &ModelVersion) -> PathBuf {
        self.root.join("indexes").join(model.as_str())
    }

    pub fn segment_path(&self, model: &ModelVersion, id: SegmentId) -> PathBuf {
        self.index_dir(model).join(id.file_name())
    }

    pub fn catalog_path(&self, id: u64) -> PathBuf {
        self.root.join("catalog").join(format!("cat-{id:012}.jsonl"))
    }

    pub fn blob_path(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs").join(&sha256[..2.min(sha256.len())]).join(sha256)
    }

    /// Stores image bytes under their sha256 (durably; a no-op if already stored) and
    /// returns the hash.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String, StoreError> {
        let sha = sha256_hex(bytes);
        let path = self.blob_path(&sha);
        if path.is_file() {
            return Ok(sha);
        }
        let dir = path.parent().expect("blob path has a parent");
        if !dir.is_dir() {
            fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
            // The new folder's entry must be durable too, or a crash could lose the blob.
            let blobs = self.root.join("blobs");
            fsutil::sync_dir(&blobs).map_err(io_err("cannot sync", &blobs))?;
        }
        fsutil::atomic_write(&path, bytes).map_err(io_err("cannot write", &path))?;
        Ok(sha)
    }

    pub fn read_blob(&self, sha256: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.blob_path(sha256);
        fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                StoreError::MissingBlob { sha256: sha256.to_string(), path: path.clone() }
            } else {
                io_err("cannot read", &path)(e)
            }
        })
    }

    /// Reads the catalogue batch files a format-1 manifest names, later records of a SKU
    /// winning (for the migration to the record store).
    pub fn read_legacy_catalog(
        &self,
        manifest: &LegacyManifest,
    ) -> Result<BTreeMap<SkuId, CatalogRecord>, StoreError> {
        let mut out = BTreeMap::new();
        for batch in &manifest.catalog {
            let path = self.catalog_path(batch.id);
            let file = File::open(&path).map_err(io_err("cannot open", &path))?;
            for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
                let line = line.map_err(io_err("cannot read", &path))?;
                if line.trim().is_empty() {
                    continue;
                }
                let rec: CatalogRecord = serde_json::from_str(&line)
                    .map_err(|source| StoreError::BadRecord { path: path.clone(), line: i + 1, source })?;
                out.insert(rec.sku.clone(), rec);
            }
        }
        Ok(out)
    }

    /// Removes files under `indexes/` that `manifest` does not name (segments, deletion files
    /// of other generations, temp files) and stray temp files at the top: leftovers of a
    /// writer that crashed before its commit, or of a merge. Writer only.
    pub fn remove_orphans(&self, manifest: &Manifest) -> Result<Vec<PathBuf>, StoreError> {
        assert!(self._lock.is_some(), "remove_orphans needs the writer lock");
        let mut keep = std::collections::HashSet::new();
        for (v, ix) in &manifest.indexes {
            for s in &ix.segments {
                keep.insert(self.segment_path(v, s.id));
                if let Some(d) = s.deletes {
                    keep.insert(self.deletes_path(v, s.id, d.generation));
                }
            }
        }
        let mut dirs = vec![];
        let indexes = self.root.join("indexes");
        for e in fs::read_dir(&indexes).map_err(io_err("cannot list", &indexes))? {
            let e = e.map_err(io_err("cannot list", &indexes))?;
            if e.path().is_dir() {
                dirs.push(e.path());
            }
        }
        let mut removed = Vec::new();
        for dir in dirs {
            let before = removed.len();
            for e in fs::read_dir(&dir).map_err(io_err("cannot list", &dir))? {
                let path = e.map_err(io_err("cannot list", &dir))?.path();
                if path.is_file() && !keep.contains(&path) {
                    fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
                    removed.push(path);
                }
            }
            if removed.len() > before {
                fsutil::sync_dir(&dir).map_err(io_err("cannot sync", &dir))?;
            }
        }
        // Temp files of interrupted atomic writes: at the top and in the blob folders.
        let mut tmp_dirs = vec![self.root.clone()];
        let blobs = self.root.join("blobs");
        if let Ok(rd) = fs::read_dir(&blobs) {
            tmp_dirs.extend(rd.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.is_dir()));
        }
        for dir in tmp_dirs {
            for e in fs::read_dir(&dir).map_err(io_err("cannot list", &dir))? {
                let path = e.map_err(io_err("cannot list", &dir))?.path();
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if path.is_file() && name.starts_with('.') && name.contains(".tmp-") {
                    fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
                    removed.push(path);
                }
            }
        }
        Ok(removed)
    }

    /// Removes one file if it exists (a merged-away segment or an old deletion file).
    pub fn remove_file(&self, path: &Path) -> Result<(), StoreError> {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("cannot remove", path)(e)),
        }
    }
}

/// Who the text of a held LOCK file says holds it (the flock, not this text, is the lock).
fn holder_of(lock_path: &Path) -> String {
    let holder = fs::read_to_string(lock_path).unwrap_or_default().trim().to_string();
    if holder.is_empty() { "unknown process".to_string() } else { holder }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_writer_is_refused_with_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let _w = DataDir::open_writer(dir.path(), "vitrine serve, pid 1, listening on 127.0.0.1:1").unwrap();
        match DataDir::open_writer(dir.path(), "other") {
            Err(StoreError::Locked { holder, .. }) => assert!(holder.contains("127.0.0.1:1"), "{holder}"),
            other => panic!("expected Locked, got {other:?}"),
        }
        let holder = DataDir::held_by(dir.path()).unwrap();
        assert!(holder.contains("127.0.0.1:1"), "{holder}");
        drop(_w);
        assert_eq!(DataDir::held_by(dir.path()), None, "a free directory");
    }

    #[test]
    fn blobs_are_content_addressed() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::open_writer(dir.path(), "test").unwrap();
        let a = d.put_blob(b"hello").unwrap();
        assert_eq!(a, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(d.put_blob(b"hello").unwrap(), a);
        assert_eq!(d.read_blob(&a).unwrap(), b"hello");
        assert!(matches!(d.read_blob("00ff"), Err(StoreError::MissingBlob { .. })));
    }

    #[test]
    fn orphans_go_and_named_files_stay() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::open_writer(dir.path(), "test").unwrap();
        let v = ModelVersion::new("m1").unwrap();
        fs::create_dir_all(d.index_dir(&v)).unwrap();
        let mut m = Manifest::default();
        let id = SegmentId(m.allocate_id());
        let orphan = SegmentId(m.allocate_id());
        for p in [
            d.segment_path(&v, id),
            d.deletes_path(&v, id, 3),
            d.deletes_path(&v, id, 2),
            d.segment_path(&v, orphan),
        ] {
            fs::write(p, b"x").unwrap();
        }
        m.indexes.insert(
            v.clone(),
            super::super::manifest::ModelIndex {
                dim: 2,
                weights_sha256: String::new(),
                segments: vec![super::super::manifest::SegmentEntry {
                    id,
                    count: 1,
                    bytes: 1,
                    deletes: Some(super::super::manifest::DeletesRef { generation: 3, count: 0 }),
                    ef: None,
                }],
            },
        );
        let mut removed = d.remove_orphans(&m).unwrap();
        removed.sort();
        let mut expected = vec![d.deletes_path(&v, id, 2), d.segment_path(&v, orphan)];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(d.segment_path(&v, id).is_file() && d.deletes_path(&v, id, 3).is_file());
    }
}
