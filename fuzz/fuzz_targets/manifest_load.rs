//! Fuzz target: any bytes as a data directory's `MANIFEST.json`, read by
//! `Manifest::load_any`. A manifest that loads must also store and load back unchanged, and
//! hand out a fresh segment id.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vitrine::index::manifest::{Loaded, MANIFEST_FILE, Manifest};

fuzz_target!(|data: &[u8]| {
    let (dir, _path) = vitrine_fuzz::temp_file(MANIFEST_FILE, data);
    let Ok(Loaded::Current(manifest)) = Manifest::load_any(dir.path()) else { return };
    let copy = tempfile::tempdir().expect("temporary folder");
    manifest.store(copy.path()).expect("a manifest that loaded must store");
    let again = Manifest::load(copy.path()).expect("a stored manifest must load");
    assert_eq!(again, manifest);
    let mut next = manifest.clone();
    let id = next.allocate_id();
    assert!(manifest.indexes.values().flat_map(|ix| &ix.segments).all(|s| s.id.0 != id));
});
