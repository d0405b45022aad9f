//! SKU records: what the catalogue says about each SKU (attributes, the sha256 of its stored
//! image), independent of any model version, with O(1)-ish lookup by SKU.
//!
//! The durable part is a [redb](https://docs.rs/redb) database (`DATA_DIR/records.redb`): a
//! single-file copy-on-write B-tree with ACID commits. Writes since the last checkpoint live in
//! an in-memory overlay (the write-ahead log is what makes them durable); a checkpoint writes
//! the overlay into redb in one transaction (O(changes), fsynced) before the manifest commit.
//! A crash after that redb commit but before the manifest commit is harmless: recovery replays
//! the log from the manifest's checkpoint, and applying a record again gives the same result.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::sharded::ShardedMap;
use crate::ids::{ModelVersion, SkuId};
use crate::index::store::Attrs;

const RECORDS: TableDefinition<&str, &[u8]> = TableDefinition::new("records");
pub const RECORDS_FILE: &str = "records.redb";

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record store {path}")]
    Db { path: PathBuf, source: Box<redb::Error> },
    #[error("record store {path}: record of sku {sku:?} is damaged: {reason}")]
    Damaged { path: PathBuf, sku: String, reason: String },
}

/// First byte of a record value written with a checksum (format 2 values start with `{`).
const CHECKED: u8 = 0xC5;

/// A record's stored bytes: [`CHECKED`], crc32 (LE) of the SKU, a zero byte and the JSON, then
/// the JSON. The crc covers the key too, so a damaged key is caught as well as a damaged value.
fn encode(sku: &str, rec: &Record) -> Vec<u8> {
    let json = serde_json::to_vec(rec).expect("records serialise");
    let mut out = Vec::with_capacity(json.len() + 5);
    out.push(CHECKED);
    out.extend_from_slice(&record_crc(sku, &json).to_le_bytes());
    out.extend_from_slice(&json);
    out
}

fn record_crc(sku: &str, json: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(sku.as_bytes());
    h.update(&[0]);
    h.update(json);
    h.finalize()
}

/// Reads a stored value; values of earlier builds (plain JSON, no checksum) still read.
fn decode(sku: &str, bytes: &[u8]) -> Result<Record, String> {
    let json = match bytes.split_first() {
        Some((&CHECKED, rest)) if rest.len() >= 4 => {
            let (crc, json) = rest.split_at(4);
            if record_crc(sku, json) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
                return Err("checksum mismatch".into());
            }
            json
        }
        Some((b'{', _)) => bytes,
        _ => return Err("unknown value layout".into()),
    };
    serde_json::from_slice(json).map_err(|e| e.to_string())
}

/// What the catalogue says about one SKU.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Record {
    /// sha256 (hex) of the original image bytes under blobs/; `None` for SKUs upserted as
    /// vectors only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Attrs::is_empty")]
    pub attrs: Attrs,
    /// Model versions whose vector was sent as a vector (`Upsert` with a vector), not embedded
    /// from `image_sha256`: an upsert of that same image embeds it again for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub supplied: Vec<ModelVersion>,
}

/// sku -> record, or `None` for deleted.
type Changes = ShardedMap<SkuId, Option<Record>>;

/// The changes not yet in redb, in two parts so that a flush takes them in O(1): the writer
/// never waits for a copy of thousands of changes (measured: 3-28 ms stalls of every
/// acknowledgement while a seal flushed a 30k-change overlay it cloned under the lock). Sharded
/// maps, so that their growth never stalls one `put` either.
#[derive(Default)]
struct Overlay {
    /// Changes since the last flush began (newest).
    active: Changes,
    /// The changes a flush in progress is writing into redb.
    flushing: Option<Arc<Changes>>,
}

impl Overlay {
    fn get(&self, sku: &SkuId) -> Option<&Option<Record>> {
        self.active.get(sku).or_else(|| self.flushing.as_ref().and_then(|f| f.get(sku)))
    }

    /// Every pending change, the newest per SKU (O(changes): for start-up scans only).
    fn merged(&self) -> HashMap<SkuId, Option<Record>> {
        let older = self.flushing.iter().flat_map(|f| f.iter());
        older.chain(self.active.iter()).map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// The record store: redb plus the overlay of changes since the last checkpoint.
pub struct RecordStore {
    path: PathBuf,
    db: redb::Database,
    overlay: Mutex<Overlay>,
    /// Serialises flushes (there is one `flushing` slot).
    flush_lock: Mutex<()>,
}

impl std::fmt::Debug for RecordStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordStore").field("path", &self.path).finish_non_exhaustive()
    }
}

impl RecordStore {
    fn db_err(&self, e: impl Into<redb::Error>) -> RecordError {
        RecordError::Db { path: self.path.clone(), source: Box::new(e.into()) }
    }

    fn damaged(&self, sku: &str, reason: String) -> RecordError {
        RecordError::Damaged { path: self.path.clone(), sku: sku.to_string(), reason }
    }

    /// Opens (creating) the store at `path`.
    pub fn open(path: &Path) -> Result<Self, RecordError> {
        let db = redb::Database::create(path)
            .map_err(|e| RecordError::Db { path: path.to_path_buf(), source: Box::new(e.into()) })?;
        let store = Self {
            path: path.to_path_buf(),
            db,
            overlay: Mutex::new(Overlay::default()),
            flush_lock: Mutex::new(()),
        };
        // Make sure the table exists so readers never see "table does not exist".
        let txn = store.db.begin_write().map_err(|e| store.db_err(e))?;
        txn.open_table(RECORDS).map_err(|e| store.db_err(e))?;
        txn.commit().map_err(|e| store.db_err(e))?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current record of `sku`.
    pub fn get(&self, sku: &str) -> Result<Option<Record>, RecordError> {
        if let Ok(key) = SkuId::new(sku)
            && let Some(rec) = self.overlay.lock().get(&key)
        {
            return Ok(rec.clone());
        }
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(RECORDS).map_err(|e| self.db_err(e))?;
        let Some(value) = table.get(sku).map_err(|e| self.db_err(e))? else { return Ok(None) };
        let rec = decode(sku, value.value()).map_err(|reason| self.damaged(sku, reason))?;
        Ok(Some(rec))
    }

    /// Sets (or with `None` removes) the record of `sku`. In memory until the next
    /// [`flush`](Self::flush); the log makes it durable.
    pub fn put(&self, sku: SkuId, record: Option<Record>) {
        self.overlay.lock().active.insert(sku, record);
    }

    /// Changes waiting for a checkpoint.
    pub fn pending(&self) -> usize {
        let o = self.overlay.lock();
        o.active.len() + o.flushing.as_ref().map_or(0, |f| f.len())
    }

    /// Writes every pending change into redb in one durable transaction and forgets them.
    /// Returns how many were written. Called by the one writer only.
    pub fn flush(&self) -> Result<usize, RecordError> {
        let _one = self.flush_lock.lock();
        let pending = {
            let mut o = self.overlay.lock();
            if o.active.is_empty() {
                return Ok(0);
            }
            let taken = Arc::new(std::mem::take(&mut o.active));
            o.flushing = Some(Arc::clone(&taken));
            taken
        };
        match self.write_changes(&pending) {
            Ok(()) => {
                // Readers now find these in redb (or newer ones in `active`).
                self.overlay.lock().flushing = None;
                Ok(pending.len())
            }
            Err(e) => {
                // Back into the overlay, under the newer changes made since.
                let mut o = self.overlay.lock();
                o.flushing = None;
                for (sku, change) in pending.iter() {
                    o.active.insert_if_absent(sku.clone(), || change.clone());
                }
                Err(e)
            }
        }
    }

    /// Writes `changes` into redb in one durable transaction.
    fn write_changes(&self, changes: &Changes) -> Result<(), RecordError> {
        let mut txn = self.db.begin_write().map_err(|e| self.db_err(e))?;
        txn.set_durability(redb::Durability::Immediate).map_err(|e| self.db_err(e))?;
        {
            let mut table = txn.open_table(RECORDS).map_err(|e| self.db_err(e))?;
            for (sku, rec) in changes.iter() {
                match rec {
                    Some(r) => {
                        let bytes = encode(sku.as_str(), r);
                        table.insert(sku.as_str(), bytes.as_slice()).map_err(|e| self.db_err(e))?;
                    }
                    None => {
                        table.remove(sku.as_str()).map_err(|e| self.db_err(e))?;
                    }
                }
            }
        }
        txn.commit().map_err(|e| self.db_err(e))
    }

    /// Calls `f` for every current record (redb's, with pending changes applied), in no
    /// particular order. O(records): for building in-memory indexes at start. Fails on the
    /// first damaged record.
    pub fn for_each(&self, mut f: impl FnMut(&SkuId, &Record)) -> Result<(), RecordError> {
        let mut first = None;
        self.for_each_checked(&mut f, |e| {
            first.get_or_insert(e);
        })?;
        first.map_or(Ok(()), Err)
    }

    /// Like [`for_each`](Self::for_each), but hands each damaged record (bad checksum, bad
    /// JSON, bad key) to `damaged` and goes on with the rest.
    pub fn for_each_checked(
        &self,
        mut f: impl FnMut(&SkuId, &Record),
        mut damaged: impl FnMut(RecordError),
    ) -> Result<(), RecordError> {
        let overlay = self.overlay.lock().merged();
        let txn = self.db.begin_read().map_err(|e| self.db_err(e))?;
        let table = txn.open_table(RECORDS).map_err(|e| self.db_err(e))?;
        for item in table.iter().map_err(|e| self.db_err(e))? {
            let (k, v) = item.map_err(|e| self.db_err(e))?;
            let key = k.value();
            let sku = match SkuId::new(key) {
                Ok(sku) => sku,
                Err(e) => {
                    damaged(self.damaged(&crate::ids::shorten(key, 64), format!("bad key: {e}")));
                    continue;
                }
            };
            if overlay.contains_key(&sku) {
                continue;
            }
            match decode(key, v.value()) {
                Ok(rec) => f(&sku, &rec),
                Err(reason) => damaged(self.damaged(key, reason)),
            }
        }
        for (sku, rec) in &overlay {
            if let Some(r) = rec {
                f(sku, r);
            }
        }
        Ok(())
    }

    /// Number of current records (O(records)).
    pub fn count(&self) -> Result<u64, RecordError> {
        let mut n = 0;
        self.for_each(|_, _| n += 1)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sha: &str, title: &str) -> Record {
        let mut attrs = Attrs::new();
        attrs.insert("title".into(), serde_json::json!(title));
        Record { image_sha256: Some(sha.into()), attrs, supplied: vec![] }
    }

    #[test]
    fn overlay_then_flush_then_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(RECORDS_FILE);
        let a = SkuId::new("A").unwrap();
        let b = SkuId::new("B").unwrap();
        {
            let s = RecordStore::open(&p).unwrap();
            s.put(a.clone(), Some(rec("1", "mug")));
            s.put(b.clone(), Some(rec("2", "cup")));
            assert_eq!(s.get("A").unwrap(), Some(rec("1", "mug")));
            assert_eq!(s.flush().unwrap(), 2);
            assert_eq!(s.pending(), 0);
            s.put(a.clone(), None);
            assert_eq!(s.get("A").unwrap(), None, "the overlay hides the flushed record");
            assert_eq!(s.count().unwrap(), 1);
            // Not flushed: lost on reopen, as intended (the log replays it).
        }
        let s = RecordStore::open(&p).unwrap();
        assert_eq!(s.get("A").unwrap(), Some(rec("1", "mug")));
        assert_eq!(s.get("B").unwrap(), Some(rec("2", "cup")));
        assert_eq!(s.get("C").unwrap(), None);
        s.put(a, None);
        s.flush().unwrap();
        let mut seen = Vec::new();
        s.for_each(|k, _| seen.push(k.to_string())).unwrap();
        assert_eq!(seen, vec!["B".to_string()]);
    }

    #[test]
    fn reads_see_the_latest_change_while_flushes_run() {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
        let dir = tempfile::tempdir().unwrap();
        let s = Arc::new(RecordStore::open(&dir.path().join(RECORDS_FILE)).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let flushed = Arc::new(AtomicUsize::new(0));
        let flusher = {
            let (s, stop, flushed) = (Arc::clone(&s), Arc::clone(&stop), Arc::clone(&flushed));
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    if s.flush().unwrap() > 0 {
                        flushed.fetch_add(1, Relaxed);
                    }
                }
            })
        };
        let deleted_last = |round: u64, i: u64| (round + i).is_multiple_of(3);
        let skus: Vec<SkuId> = (0..20).map(|i| SkuId::new(format!("S{i}")).unwrap()).collect();
        // At least 300 rounds, and on until 50 flushes ran between the puts and gets.
        let mut round = 0u64;
        while round < 300 || (flushed.load(Relaxed) < 50 && round < 1_000_000) {
            round += 1;
            for (i, sku) in skus.iter().enumerate() {
                let r = (!deleted_last(round, i as u64)).then(|| rec(&format!("{round}"), sku.as_str()));
                s.put(sku.clone(), r.clone());
                assert_eq!(s.get(sku.as_str()).unwrap(), r, "{sku} in round {round}");
            }
        }
        stop.store(true, Relaxed);
        flusher.join().unwrap();
        assert!(flushed.load(Relaxed) >= 50, "only {} flushes ran", flushed.load(Relaxed));
        s.flush().unwrap();
        assert_eq!(s.pending(), 0);
        let mut live = 0;
        s.for_each(|k, r| {
            let i: u64 = k.as_str()[1..].parse().unwrap();
            assert!(!deleted_last(round, i), "{k} was deleted last");
            assert_eq!(r, &rec(&format!("{round}"), k.as_str()));
            live += 1;
        })
        .unwrap();
        assert_eq!(live, (0..20).filter(|&i| !deleted_last(round, i)).count());
    }
}
