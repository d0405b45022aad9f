//! The data directory on disk: its layout, the writer lock, image blobs and catalogue batches.
//!
//! ```text
//! DATA_DIR/
//!   MANIFEST.json                      names everything live (see manifest.rs)
//!   LOCK                               held (flock) by the one writer
//!   blobs/ab/ab12...ef                 original image bytes, named by their sha256
//!   catalog/cat-000000000002.jsonl     catalogue records of one ingest batch (immutable)
//!   indexes/<model-version>/seg-000000000003.vseg   HNSW segments (immutable)
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

use super::manifest::{Manifest, ManifestError};
use crate::fsutil;
use crate::ids::{ModelVersion, SegmentId, SkuId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {path}: {source}")]
    Io { action: &'static str, path: PathBuf, source: std::io::Error },
    #[error("data directory {0} is locked by another writer (ingest or server); stop it first")]
    Locked(PathBuf),
    #[error("data directory {0} does not exist; run `vitrine ingest` first")]
    Missing(PathBuf),
    #[error("catalogue batch {path} line {line}: {source}")]
    BadRecord { path: PathBuf, line: usize, source: serde_json::Error },
    #[error("image blob {sha256} is missing from {path}")]
    MissingBlob { sha256: String, path: PathBuf },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
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

    /// Opens (creating if needed) a data directory as its only writer.
    pub fn open_writer(root: &Path) -> Result<Self, StoreError> {
        for sub in ["", "blobs", "catalog", "indexes"] {
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
            Err(fs::TryLockError::WouldBlock) => return Err(StoreError::Locked(root.to_path_buf())),
            Err(fs::TryLockError::Error(e)) => return Err(io_err("cannot lock", &lock_path)(e)),
        }
        Ok(Self { root: root.to_path_buf(), _lock: Some(lock) })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn load_manifest(&self) -> Result<Manifest, StoreError> {
        Ok(Manifest::load(&self.root)?)
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
        fs::create_dir_all(dir).map_err(io_err("cannot create", dir))?;
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

    /// Durably writes one immutable catalogue batch file.
    pub fn write_catalog_batch(&self, id: u64, records: &[CatalogRecord]) -> Result<(), StoreError> {
        let path = self.catalog_path(id);
        fsutil::atomic_write_with(&path, |w| {
            for r in records {
                serde_json::to_writer(&mut *w, r)?;
                w.write_all(b"\n")?;
            }
            Ok(())
        })
        .map_err(io_err("cannot write", &path))
    }

    /// The current catalogue: every live batch read in order, later records of a SKU winning.
    pub fn read_catalog(&self, manifest: &Manifest) -> Result<BTreeMap<SkuId, CatalogRecord>, StoreError> {
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

    /// Removes segment and catalogue files that `manifest` does not name, and stray temp
    /// files: leftovers of a writer that crashed before its commit. Writer only.
    pub fn remove_orphans(&self, manifest: &Manifest) -> Result<Vec<PathBuf>, StoreError> {
        assert!(self._lock.is_some(), "remove_orphans needs the writer lock");
        let mut keep = std::collections::HashSet::new();
        for (v, ix) in &manifest.indexes {
            for s in &ix.segments {
                keep.insert(self.segment_path(v, s.id));
            }
        }
        for c in &manifest.catalog {
            keep.insert(self.catalog_path(c.id));
        }
        let mut dirs = vec![self.root.join("catalog")];
        let indexes = self.root.join("indexes");
        for e in fs::read_dir(&indexes).map_err(io_err("cannot list", &indexes))? {
            let e = e.map_err(io_err("cannot list", &indexes))?;
            if e.path().is_dir() {
                dirs.push(e.path());
            }
        }
        let mut removed = Vec::new();
        for dir in dirs {
            for e in fs::read_dir(&dir).map_err(io_err("cannot list", &dir))? {
                let path = e.map_err(io_err("cannot list", &dir))?.path();
                if path.is_file() && !keep.contains(&path) {
                    fs::remove_file(&path).map_err(io_err("cannot remove", &path))?;
                    removed.push(path);
                }
            }
            if !removed.is_empty() {
                fsutil::sync_dir(&dir).map_err(io_err("cannot sync", &dir))?;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_writer_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _w = DataDir::open_writer(dir.path()).unwrap();
        assert!(matches!(DataDir::open_writer(dir.path()), Err(StoreError::Locked(_))));
    }

    #[test]
    fn blobs_are_content_addressed() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::open_writer(dir.path()).unwrap();
        let a = d.put_blob(b"hello").unwrap();
        assert_eq!(a, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(d.put_blob(b"hello").unwrap(), a);
        assert_eq!(d.read_blob(&a).unwrap(), b"hello");
        assert!(matches!(d.read_blob("00ff"), Err(StoreError::MissingBlob { .. })));
    }

    #[test]
    fn catalog_later_batches_win_and_orphans_go() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::open_writer(dir.path()).unwrap();
        let rec = |sku: &str, sha: &str| CatalogRecord {
            sku: SkuId::new(sku).unwrap(),
            image_sha256: sha.into(),
            attrs: Attrs::new(),
        };
        let mut m = Manifest::default();
        let a = m.allocate_id();
        d.write_catalog_batch(a, &[rec("x", "1"), rec("y", "2")]).unwrap();
        let b = m.allocate_id();
        d.write_catalog_batch(b, &[rec("x", "3")]).unwrap();
        let orphan = m.allocate_id();
        d.write_catalog_batch(orphan, &[rec("z", "4")]).unwrap();
        m.catalog = vec![
            super::super::manifest::CatalogBatch { id: a, count: 2 },
            super::super::manifest::CatalogBatch { id: b, count: 1 },
        ];
        let cat = d.read_catalog(&m).unwrap();
        assert_eq!(cat.len(), 2);
        assert_eq!(cat[&SkuId::new("x").unwrap()].image_sha256, "3");
        let removed = d.remove_orphans(&m).unwrap();
        assert_eq!(removed, vec![d.catalog_path(orphan)]);
        assert_eq!(d.read_catalog(&m).unwrap(), cat);
    }
}
