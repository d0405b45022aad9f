//! Helpers shared by the fuzz targets: fuzz inputs become files in a fresh temporary folder.

use std::path::PathBuf;

use tempfile::TempDir;

/// A fresh temporary folder holding `bytes` as the file `name`; the folder is removed when
/// the returned guard drops.
pub fn temp_file(name: &str, bytes: &[u8]) -> (TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temporary folder");
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).expect("write the fuzz input");
    (dir, path)
}
