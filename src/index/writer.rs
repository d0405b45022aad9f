//! The index writer: the one owner of a data directory's changes.
//!
//! [`IndexWriter::open`] takes the directory's lock, migrates a format-1 directory, removes
//! what a crashed writer left, maps the sealed segments, replays the write-ahead log into
//! fresh mutable segments and starts its threads:
//!
//! * the **writer thread** owns all mutable state. It drains every queued write request at
//!   once (group commit): decides each operation against the current records, appends the
//!   resulting changes to the log in one frame with one fdatasync, applies them to the mutable
//!   segments, deletion bitsets, record store and attribute index, and only then answers. A
//!   search that starts after an answer therefore sees the write, and the write survives a
//!   crash. When a mutable segment is full (or the log is large) it freezes every version's
//!   mutable segment and hands them to the sealer; it also commits what the sealer and the
//!   merger return: deletion files, the new manifest in memory, a new [`LiveSet`].
//! * the **sealer** and **merger** threads build HNSW segment files, from frozen mutable
//!   segments and from sealed segments (see `merge_policy.rs`), each on its own idle-class
//!   pool. They touch no shared state but the record store, which the sealer flushes into
//!   redb after a seal's build (off the writer thread, where every acknowledgement would wait
//!   for the redb commit).
//! * the **janitor** thread finishes each commit, in commit order: stores its manifest (the
//!   durable commit point), answers the checkpoint requests it completes, then deletes the
//!   log files and data files it made dead. None of it holds up an acknowledgement.
//!
//! A failed commit poisons the writer: later writes are refused with the reason, searches keep
//! working, and a restart recovers from the last manifest plus the log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use parking_lot::RwLock;

use super::deletes::{DeleteSet, DeletesError};
use super::entry::{Change, EntryError};
use super::filter::AttrIndex;
use super::live::{LiveSet, SealedSegment, VersionLive, delete_older_copies, holds};
use super::manifest::{DeletesRef, Loaded, Manifest, ManifestError, ModelIndex, SegmentEntry};
use super::merge_policy::{MergePolicy, SegmentStat};
use super::mutable::MutableSegment;
use super::records::{Record, RecordError, RecordStore};
use super::store::{Attrs, DataDir, StoreError};
use super::wal::{Wal, WalError};
use crate::ids::{ModelVersion, SegmentId, SkuId};
use crate::segment::{
    DEFAULT_EF_SEARCH, FLAT_SCAN_FACTOR, HnswParams, Segment, SegmentError, SegmentStats, normalise_into,
    write_flat_segment, write_segment, write_segment_extending,
};

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error(transparent)]
    Records(#[from] RecordError),
    #[error(transparent)]
    Deletes(#[from] DeletesError),
    #[error("segment {id} of {version}")]
    Segment { version: ModelVersion, id: SegmentId, source: SegmentError },
    #[error(
        "segment {id} of {version}: manifest says {expected} items of dimension {dim} in {bytes} bytes, file {path} differs"
    )]
    SegmentShape { version: ModelVersion, id: SegmentId, path: PathBuf, expected: u64, dim: u32, bytes: u64 },
    #[error("write-ahead log record {seq} cannot be replayed")]
    Replay { seq: u64, source: EntryError },
    #[error("the index writer takes no writes: {reason}")]
    Poisoned { reason: String },
    #[error("the index writer has shut down")]
    Closed,
    #[error("model version {0} has no index in this data directory")]
    UnknownVersion(ModelVersion),
    #[error(
        "model version {version} already has an index with other dimension or weights ({dim}, {weights_sha256})"
    )]
    VersionConflict { version: ModelVersion, dim: usize, weights_sha256: String },
    #[error("model version {0} serves queries; make another version serve first")]
    DropServing(ModelVersion),
}

/// A model version's index as created on first use: its dimension and weights.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub version: ModelVersion,
    pub dim: usize,
    pub weights_sha256: String,
}

/// Settings of an [`IndexWriter`].
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Written into the LOCK file, shown to a second writer that is refused.
    pub holder: String,
    /// The index created (and served) when the directory has none yet.
    pub default_model: Option<ModelSpec>,
    /// A mutable segment is sealed once it holds this many items.
    pub seal_items: usize,
    /// A checkpoint is forced once the log holds this many bytes.
    pub checkpoint_wal_bytes: u64,
    pub hnsw: HnswParams,
    pub merge: MergePolicy,
    /// Frozen segments waiting for the sealer before writes wait (backpressure).
    pub max_pending_seals: usize,
    /// Frozen segments waiting for the sealer before each group of writes is delayed a little
    /// (1 ms, doubling with each further one), so that a long burst slows down smoothly and
    /// leaves the sealer CPU, instead of running into `max_pending_seals` and stopping every
    /// writer for a whole seal. Segments that merges are behind on
    /// ([`MergePolicy::backlog`]) count as waiting seals here (not for the hard stop).
    /// `max_pending_seals` or more turns the slowdown off.
    pub slowdown_pending_seals: usize,
    /// Threads a merge, and a seal with no other seal waiting behind it, may use. Seals and
    /// merges run on separate threads, so a long merge never holds up a seal. Build threads
    /// run in the idle scheduling class ([`crate::background`]), so they take only the CPU
    /// that acknowledgements and searches leave; even so, a build on every core slows
    /// searches (shared caches, memory bandwidth, wake-up latency), so by default this is
    /// half the cores.
    pub build_threads: usize,
    /// Threads a seal may use while another waits behind it (a write burst), and a merge
    /// while merges are behind ([`MergePolicy::backlog`]): by default every core, so that the
    /// backlog drains before writes have to slow down.
    pub burst_build_threads: usize,
}

/// A write group whose oldest request waited longer than this for its answer, in the writer's
/// queue and processing, is logged at debug level.
const SLOW_GROUP: Duration = Duration::from_millis(5);

/// Most log bytes written as one frame (the log refuses frames over 128 MiB).
const MAX_GROUP_BYTES: usize = 32 << 20;

/// Segments of up to this many items are written flat, without a graph
/// ([`write_flat_segment`]): a search at the default ef scans them anyway (a segment holding
/// at most [`FLAT_SCAN_FACTOR`] times the ef), so no search would use their graph, and
/// building it at seal time would only move part of a later merge's work onto the busiest
/// moment of the write path. With the default `seal_items`, seals build no graph; merges
/// build one once segments outgrow this.
pub const FLAT_SEGMENT_ITEMS: usize = FLAT_SCAN_FACTOR * DEFAULT_EF_SEARCH;

/// Default for [`WriterConfig::seal_items`]: small enough that the exact scan of the
/// mutable segment stays around a millisecond at 1280 dimensions.
pub const DEFAULT_SEAL_ITEMS: usize = 4096;

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            holder: format!("vitrine, pid {}", std::process::id()),
            default_model: None,
            seal_items: DEFAULT_SEAL_ITEMS,
            checkpoint_wal_bytes: 256 << 20,
            hnsw: HnswParams::default(),
            merge: MergePolicy::default(),
            max_pending_seals: 8,
            slowdown_pending_seals: 6,
            build_threads: crate::background::backfill_threads(),
            burst_build_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// One change a client asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    Upsert(Upsert),
    Delete(SkuId),
    /// A backfill's vector for one model version, made from the stored image `image_sha256`:
    /// written only while the SKU still has that image and the version holds no vector of it
    /// (otherwise `Unchanged`), so it never overwrites a newer upsert.
    Backfill {
        sku: SkuId,
        version: ModelVersion,
        image_sha256: String,
        vector: Vec<f32>,
    },
}

/// A change to the directory's set of model versions.
#[derive(Debug, Clone, PartialEq)]
pub enum AdminOp {
    /// Adds an empty index for a new model version; image upserts from now on must bring a
    /// vector for it too. A no-op if an index with the same dimension and weights exists.
    AddVersion(ModelSpec),
    /// Makes `version` the one that serves image and SKU queries (one manifest commit).
    SetServing(ModelVersion),
    /// Removes a version's index and deletes its files; never the serving one.
    DropVersion(ModelVersion),
    /// Replaces the rollout layer's state in the manifest, in the same commit switching the
    /// serving version (`serve`) and dropping a version (`drop`), if given.
    SetRollout { state: Option<serde_json::Value>, serve: Option<ModelVersion>, drop: Option<ModelVersion> },
}

/// An upsert: the SKU's new attributes (`None`: keep), image (by the sha256 of bytes already
/// stored with [`DataDir::put_blob`]; `None`: keep) and vectors (one per model version; an
/// image upsert must bring one for every version the directory indexes).
#[derive(Debug, Clone, PartialEq)]
pub struct Upsert {
    pub sku: SkuId,
    pub attrs: Option<Attrs>,
    pub image_sha256: Option<String>,
    pub vectors: Vec<(ModelVersion, Vec<f32>)>,
}

/// What became of one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Added,
    Updated,
    /// Same image and attributes as stored: nothing written.
    Unchanged,
    Deleted,
    /// A delete of a SKU that does not exist.
    NotFound,
    /// An image upsert whose image is new but which lacks a vector for some model version
    /// (`missing`): embed with those and send it again.
    NeedsEmbedding {
        missing: Vec<ModelVersion>,
    },
    /// Invalid: nothing written.
    Rejected(String),
}

/// Where the writer thread sends an answer: to an async caller or a blocking one (a blocking
/// caller may itself run inside an async runtime, where tokio's blocking receive panics).
enum Reply<T> {
    Async(tokio::sync::oneshot::Sender<Result<T, WriterError>>),
    Blocking(std::sync::mpsc::Sender<Result<T, WriterError>>),
}

impl<T> Reply<T> {
    fn send(self, value: Result<T, WriterError>) -> Result<(), ()> {
        match self {
            Reply::Async(tx) => tx.send(value).map_err(|_| ()),
            Reply::Blocking(tx) => tx.send(value).map_err(|_| ()),
        }
    }
}

enum Msg {
    Write {
        ops: Vec<WriteOp>,
        reply: Reply<Vec<Outcome>>,
        /// When it was sent (for the slow-group diagnostics).
        queued: Instant,
    },
    Checkpoint {
        reply: Reply<u64>,
    },
    Admin {
        op: AdminOp,
        reply: Reply<u64>,
    },
    Sealed(SealResult),
    Merged(MergeResult),
    /// Take no more writes, for this reason (damage found outside the writer).
    RefuseWrites(String),
    Stop,
}

struct SealJob {
    id: u64,
    seal_seq: u64,
    parts: Vec<(ModelVersion, Arc<MutableSegment>, SegmentId)>,
}

/// A segment file the sealer wrote: its id, where each of its items came from (a position of
/// the frozen segment, or an (input, position) pair of a merge), and its build stats.
struct BuiltFile<P> {
    id: SegmentId,
    sources: Vec<P>,
    stats: SegmentStats,
}

/// One frozen segment after sealing: its file, or none when no item was live.
struct SealedPart {
    version: ModelVersion,
    frozen: Arc<MutableSegment>,
    file: Option<BuiltFile<u32>>,
}

struct SealResult {
    id: u64,
    seal_seq: u64,
    built: Result<Vec<SealedPart>, WriterError>,
}

struct MergeJob {
    version: ModelVersion,
    inputs: Vec<Arc<SealedSegment>>,
    id: SegmentId,
    /// Merges are behind the writes ([`MergePolicy::backlog`]): build on the wide pool.
    behind: bool,
}

struct MergeResult {
    version: ModelVersion,
    inputs: Vec<Arc<SealedSegment>>,
    /// The merged file (none when nothing was live).
    built: Result<Option<BuiltFile<(usize, u32)>>, WriterError>,
}

/// What the writer shares with readers.
struct Shared {
    data: DataDir,
    wal: Wal,
    records: RecordStore,
    attrs: RwLock<AttrIndex>,
    live: ArcSwap<LiveSet>,
}

/// What a writer's open found and did.
#[derive(Debug, Clone, Default)]
pub struct OpenReport {
    pub replayed: usize,
    pub dropped_tail_bytes: u64,
    pub orphans_removed: usize,
    pub migrated: bool,
    pub secs: f64,
    /// Damage found before serving: segments left out, damaged records. While any is listed
    /// the writer takes no writes (a write could resurrect or lose what the damaged file
    /// holds); searches serve what is intact.
    pub integrity: Vec<IntegrityProblem>,
}

impl OpenReport {
    /// Why writes are refused, if damage was found.
    fn read_only_reason(&self) -> Option<String> {
        let first = self.integrity.first()?;
        Some(format!(
            "the data directory failed its integrity check ({} problem{}, first: {first}); writes are refused until the damaged files are restored from a backup (`vitrine verify` lists them)",
            self.integrity.len(),
            if self.integrity.len() == 1 { "" } else { "s" },
        ))
    }
}

/// One piece of damage found when the writer opened the directory.
#[derive(Debug, Clone, PartialEq)]
pub struct IntegrityProblem {
    /// The model version and segment left out, for a damaged segment.
    pub version: Option<ModelVersion>,
    pub segment: Option<SegmentId>,
    pub reason: String,
}

impl std::fmt::Display for IntegrityProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// See the module docs.
pub struct IndexWriter {
    shared: Arc<Shared>,
    tx: Sender<Msg>,
    writer: Option<JoinHandle<()>>,
    sealer: Option<JoinHandle<()>>,
    merger: Option<JoinHandle<()>>,
    janitor: Option<JoinHandle<()>>,
    report: OpenReport,
}

impl std::fmt::Debug for IndexWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IndexWriter").field("root", &self.shared.data.root()).finish_non_exhaustive()
    }
}

struct VState {
    dim: usize,
    weights_sha256: String,
    sealed: Vec<Arc<SealedSegment>>,
    frozen: Vec<Arc<MutableSegment>>,
    mutable: Arc<MutableSegment>,
}

/// The writer thread's state.
struct State {
    shared: Arc<Shared>,
    cfg: WriterConfig,
    manifest: Manifest,
    versions: BTreeMap<ModelVersion, VState>,
    seal_jobs: Sender<SealJob>,
    merge_jobs: Sender<MergeJob>,
    cleanup: Sender<Cleanup>,
    next_job: u64,
    pending_seals: usize,
    merging: HashSet<SegmentId>,
    checkpoint_waiters: Vec<(u64, Reply<u64>)>,
    poisoned: Option<String>,
    /// Directories of dropped versions, removed once no seal or merge is under way.
    dropped_dirs: Vec<PathBuf>,
    /// What this thread let go of (replaced live sets, sealed-away mutable segments, merged-away
    /// segments), handed to the janitor with its next job to be dropped there; see [`Garbage`].
    retired: Vec<Garbage>,
}

/// Something the writer thread must not drop itself: the last reference to a segment frees
/// tens to hundreds of MiB (a frozen mutable segment's vectors, a sealed segment's mapping),
/// and the `munmap` of that much memory takes milliseconds on this thread, every
/// acknowledgement waiting, and holds the process's memory-map lock meanwhile (measured here:
/// a 512 MiB `munmap` took 30-35 ms and held another thread's small `mmap` for as long). The
/// janitor drops it instead (or a search still holding it, when that finishes).
type Garbage = Box<dyn std::any::Any + Send>;

/// The most [`Garbage`] the writer keeps before handing it to the janitor on its own.
const MAX_RETIRED: usize = 8;

impl IndexWriter {
    /// Opens `root` (creating it) as its one writer; see the module docs.
    pub fn open(root: &std::path::Path, cfg: WriterConfig) -> Result<Self, WriterError> {
        let started = Instant::now();
        let data = DataDir::open_writer(root, &cfg.holder)?;
        let records = RecordStore::open(&data.records_path())?;
        let mut report = OpenReport::default();
        let mut manifest = match Manifest::load_any(root)? {
            Loaded::Current(m) => m,
            Loaded::Legacy(legacy) => {
                report.migrated = true;
                migrate(&data, &records, legacy)?
            }
        };
        report.orphans_removed = data.remove_orphans(&manifest)?.len();
        if report.orphans_removed > 0 {
            tracing::warn!(count = report.orphans_removed, "removed files left by an interrupted writer");
        }
        if manifest.indexes.is_empty()
            && let Some(spec) = &cfg.default_model
        {
            manifest.indexes.insert(
                spec.version.clone(),
                ModelIndex {
                    dim: spec.dim as u32,
                    weights_sha256: spec.weights_sha256.clone(),
                    segments: vec![],
                },
            );
            manifest.serving_model = Some(spec.version.clone());
            manifest.generation += 1;
            manifest.store(root)?;
        }
        // Every segment is checked (header, footer and section checksums, size, deletion file)
        // before anything is served from it, all segments at once. One that fails is left out
        // and the writer refuses writes (see `integrity`), so nothing is lost or resurrected.
        let mut opened: BTreeMap<(ModelVersion, SegmentId), Result<SealedSegment, WriterError>> = {
            use rayon::prelude::*;
            let jobs: Vec<(&ModelVersion, u32, &SegmentEntry)> = manifest
                .indexes
                .iter()
                .flat_map(|(v, ix)| ix.segments.iter().map(move |e| (v, ix.dim, e)))
                .collect();
            jobs.par_iter()
                .map(|&(v, dim, e)| ((v.clone(), e.id), open_sealed(&data, v, dim, e)))
                .collect::<Vec<_>>()
                .into_iter()
                .collect()
        };
        let mut versions = BTreeMap::new();
        for (version, ix) in &manifest.indexes {
            std::fs::create_dir_all(data.index_dir(version)).map_err(|source| StoreError::Io {
                action: "cannot create",
                path: data.index_dir(version),
                source,
            })?;
            let mut sealed = Vec::with_capacity(ix.segments.len());
            for e in &ix.segments {
                match opened.remove(&(version.clone(), e.id)).expect("every segment was opened") {
                    Ok(seg) => sealed.push(Arc::new(seg)),
                    Err(err) => {
                        let err = crate::report::chain(&err);
                        tracing::error!("left out of serving: {err}");
                        report.integrity.push(IntegrityProblem {
                            version: Some(version.clone()),
                            segment: Some(e.id),
                            reason: err,
                        });
                    }
                }
            }
            let mutable = Arc::new(MutableSegment::with_capacity(ix.dim as usize, cfg.seal_items));
            versions.insert(
                version.clone(),
                VState {
                    dim: ix.dim as usize,
                    weights_sha256: ix.weights_sha256.clone(),
                    sealed,
                    frozen: vec![],
                    mutable,
                },
            );
        }
        let mut attrs = AttrIndex::new();
        records.for_each_checked(
            |sku, rec| {
                attrs.upsert(sku.as_str(), &rec.attrs);
            },
            |err| {
                let err = crate::report::chain(&err);
                tracing::error!("{err}");
                report.integrity.push(IntegrityProblem { version: None, segment: None, reason: err });
            },
        )?;
        let (wal, replayed) = Wal::open(&data.wal_dir(), manifest.wal_checkpoint)?;
        report.dropped_tail_bytes = replayed.dropped_tail_bytes;
        if replayed.dropped_tail_bytes > 0 {
            tracing::warn!(bytes = replayed.dropped_tail_bytes, "dropped a torn write at the end of the log");
        }
        let shared = Arc::new(Shared {
            data,
            wal,
            records,
            attrs: RwLock::new(attrs),
            live: ArcSwap::from_pointee(LiveSet::default()),
        });
        let (tx, rx) = channel::<Msg>();
        let (seal_tx, seal_rx) = channel::<SealJob>();
        let (merge_tx, merge_rx) = channel::<MergeJob>();
        let (cleanup_tx, cleanup_rx) = channel::<Cleanup>();
        let mut state = State {
            shared: Arc::clone(&shared),
            cfg,
            manifest,
            versions,
            seal_jobs: seal_tx,
            merge_jobs: merge_tx,
            cleanup: cleanup_tx,
            next_job: 1,
            pending_seals: 0,
            merging: HashSet::new(),
            checkpoint_waiters: vec![],
            dropped_dirs: vec![],
            retired: vec![],
            poisoned: report.read_only_reason(),
        };
        report.replayed = replayed.records.len();
        for (seq, bytes) in replayed.records {
            let change = Change::decode(&bytes).map_err(|source| WriterError::Replay { seq, source })?;
            state.apply(&change)?;
            if state.mutable_full() {
                state.freeze_all(seq)?;
            }
        }
        state.publish();
        state.plan_merges();
        // A log file is rotated when the mutable segments fill (or at the checkpoint size):
        // about `seal_items` records of every version's vector, for the log's spare files.
        let per_item: u64 = state.versions.values().map(|vs| vs.dim as u64 * 4 + 128).sum();
        let per_file = (state.cfg.seal_items as u64).saturating_mul(per_item);
        shared.wal.expect_file_bytes(per_file.min(state.cfg.checkpoint_wal_bytes));
        let (narrow, wide) = (state.cfg.build_threads.max(1), state.cfg.burst_build_threads.max(1));
        let spawn_builder = |name: &str, work: BuildWork| {
            let thread_name = name.to_string();
            std::thread::Builder::new()
                .name(thread_name.clone())
                .spawn(move || {
                    let pools = crate::background::pool(&thread_name, narrow).and_then(|n| {
                        Ok((n, crate::background::pool(&format!("{thread_name}-burst"), wide)?))
                    });
                    match pools {
                        Ok((narrow, wide)) => work(&narrow, &wide),
                        Err(e) => tracing::error!("cannot start a graph-build pool: {e}"),
                    }
                })
                .map_err(|source| StoreError::Io {
                    action: "cannot start a thread in",
                    path: root.into(),
                    source,
                })
        };
        let sealer = {
            let (shared, tx, hnsw) = (Arc::clone(&shared), tx.clone(), state.cfg.hnsw);
            spawn_builder(
                "vitrine-sealer",
                Box::new(move |narrow, wide| sealer_loop(&shared, &seal_rx, &tx, &hnsw, [narrow, wide])),
            )?
        };
        let merger = {
            let (shared, tx, hnsw) = (Arc::clone(&shared), tx.clone(), state.cfg.hnsw);
            spawn_builder(
                "vitrine-merger",
                Box::new(move |narrow, wide| merger_loop(&shared, &merge_rx, &tx, &hnsw, [narrow, wide])),
            )?
        };
        let janitor = {
            let (shared, tx) = (Arc::clone(&shared), tx.clone());
            std::thread::Builder::new()
                .name("vitrine-janitor".into())
                .spawn(move || {
                    let mut failed = None;
                    while let Ok(job) = cleanup_rx.recv() {
                        let before = failed.is_some();
                        job.run(&shared, &mut failed);
                        if let (false, Some(why)) = (before, &failed) {
                            let _ = tx.send(Msg::RefuseWrites(why.clone()));
                        }
                    }
                })
                .map_err(|source| StoreError::Io {
                    action: "cannot start a thread in",
                    path: root.into(),
                    source,
                })?
        };
        let writer = std::thread::Builder::new()
            .name("vitrine-writer".into())
            .spawn(move || state.run(&rx))
            .map_err(|source| StoreError::Io {
                action: "cannot start the writer thread in",
                path: root.into(),
                source,
            })?;
        report.secs = started.elapsed().as_secs_f64();
        Ok(Self {
            shared,
            tx,
            writer: Some(writer),
            sealer: Some(sealer),
            merger: Some(merger),
            janitor: Some(janitor),
            report,
        })
    }

    pub fn open_report(&self) -> &OpenReport {
        &self.report
    }

    /// Makes the writer refuse every later write with `reason` (searches go on); for damage
    /// its owner finds, such as an index whose model weights are not the ones loaded.
    pub fn refuse_writes(&self, reason: String) {
        let _ = self.tx.send(Msg::RefuseWrites(reason));
    }

    pub fn data(&self) -> &DataDir {
        &self.shared.data
    }

    /// Bytes of write-ahead log on disk (what a restart would replay, at most).
    pub fn wal_bytes(&self) -> u64 {
        self.shared.wal.disk_bytes()
    }

    /// What searches read now.
    pub fn live(&self) -> Arc<LiveSet> {
        self.shared.live.load_full()
    }

    pub fn attrs(&self) -> &RwLock<AttrIndex> {
        &self.shared.attrs
    }

    /// The current record of `sku`.
    pub fn record(&self, sku: &str) -> Result<Option<Record>, WriterError> {
        Ok(self.shared.records.get(sku)?)
    }

    /// Calls `f` for every current SKU record (O(records); for backfills and checks).
    pub fn for_each_record(&self, f: impl FnMut(&SkuId, &Record)) -> Result<(), WriterError> {
        Ok(self.shared.records.for_each(f)?)
    }

    /// Sends the writer thread a request and awaits its answer.
    async fn ask<T>(&self, msg: impl FnOnce(Reply<T>) -> Msg) -> Result<T, WriterError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(msg(Reply::Async(tx))).map_err(|_| WriterError::Closed)?;
        rx.await.map_err(|_| WriterError::Closed)?
    }

    /// [`ask`](Self::ask), blocking the calling thread (safe inside an async runtime too).
    fn ask_blocking<T>(&self, msg: impl FnOnce(Reply<T>) -> Msg) -> Result<T, WriterError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx.send(msg(Reply::Blocking(tx))).map_err(|_| WriterError::Closed)?;
        rx.recv().map_err(|_| WriterError::Closed)?
    }

    /// Applies `ops` (in order) durably; see [`Outcome`]. Answers once every change is in the
    /// log (fsynced) and visible to searches.
    pub async fn write(&self, ops: Vec<WriteOp>) -> Result<Vec<Outcome>, WriterError> {
        self.ask(|reply| Msg::Write { ops, reply, queued: Instant::now() }).await
    }

    /// [`write`](Self::write) that blocks the calling thread.
    pub fn write_blocking(&self, ops: Vec<WriteOp>) -> Result<Vec<Outcome>, WriterError> {
        self.ask_blocking(|reply| Msg::Write { ops, reply, queued: Instant::now() })
    }

    /// Seals every mutable segment and waits for the commit; returns the manifest generation.
    /// Afterwards the log holds nothing that the segments do not.
    pub fn checkpoint_blocking(&self) -> Result<u64, WriterError> {
        self.ask_blocking(|reply| Msg::Checkpoint { reply })
    }

    /// Applies a change to the set of model versions (one manifest commit); returns the new
    /// manifest generation.
    pub async fn admin(&self, op: AdminOp) -> Result<u64, WriterError> {
        self.ask(|reply| Msg::Admin { op, reply }).await
    }

    /// [`admin`](Self::admin) that blocks the calling thread.
    pub fn admin_blocking(&self, op: AdminOp) -> Result<u64, WriterError> {
        self.ask_blocking(|reply| Msg::Admin { op, reply })
    }

    /// Stops both threads (a seal or merge in progress finishes first; its file is committed
    /// by the next writer's start, or removed as an orphan) and releases the lock.
    pub fn close(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        let _ = self.tx.send(Msg::Stop);
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        // The writer thread held the other threads' job senders: they finish what is queued
        // (the janitor its deletions) and stop.
        for t in [self.sealer.take(), self.merger.take(), self.janitor.take()].into_iter().flatten() {
            let _ = t.join();
        }
    }
}

impl Drop for IndexWriter {
    fn drop(&mut self) {
        self.stop();
    }
}

fn open_sealed(
    data: &DataDir,
    version: &ModelVersion,
    dim: u32,
    e: &SegmentEntry,
) -> Result<SealedSegment, WriterError> {
    let path = data.segment_path(version, e.id);
    let segment = Segment::open(&path).map_err(|source| WriterError::Segment {
        version: version.clone(),
        id: e.id,
        source,
    })?;
    // The size first: a file of another length is not the one the manifest names.
    let shape_ok = |s: &Segment| s.len() as u64 == e.count && s.dim() == dim as usize;
    if segment.file_len() != e.bytes || !shape_ok(&segment) {
        return Err(WriterError::SegmentShape {
            version: version.clone(),
            id: e.id,
            path,
            expected: e.count,
            dim,
            bytes: e.bytes,
        });
    }
    segment.verify_checksums().map_err(|source| WriterError::Segment {
        version: version.clone(),
        id: e.id,
        source,
    })?;
    let deleted = match e.deletes {
        Some(d) => {
            let set = DeleteSet::load(&data.deletes_path(version, e.id, d.generation), segment.len())?;
            if set.count() != d.count {
                return Err(DeletesError::Damaged {
                    path: data.deletes_path(version, e.id, d.generation),
                    reason: "bit count differs from the manifest's",
                }
                .into());
            }
            set
        }
        None => DeleteSet::new(segment.len()),
    };
    let ef = e.ef.map_or(crate::segment::DEFAULT_EF_SEARCH, |ef| ef as usize);
    Ok(SealedSegment::new(e.id, segment, deleted).with_default_ef(ef).start_scan_sketch())
}

/// Turns a format-1 directory into format 2: catalogue batches into the record store, inline
/// deleted lists into deletion files, then the new manifest (the commit point). Idempotent: a
/// crash before the manifest rename leaves format 1, and the next open migrates again.
fn migrate(
    data: &DataDir,
    records: &RecordStore,
    legacy: super::manifest::LegacyManifest,
) -> Result<Manifest, WriterError> {
    tracing::info!(generation = legacy.generation, "migrating a format-1 data directory to format 2");
    for (sku, rec) in data.read_legacy_catalog(&legacy)? {
        records.put(
            sku,
            Some(Record { image_sha256: Some(rec.image_sha256), attrs: rec.attrs, supplied: vec![] }),
        );
    }
    records.flush()?;
    let generation = legacy.generation + 1;
    let mut m = Manifest {
        generation,
        next_id: legacy.next_id,
        serving_model: legacy.serving_model.clone(),
        ..Manifest::default()
    };
    for (version, ix) in &legacy.indexes {
        let mut segments = Vec::new();
        for s in &ix.segments {
            let mut deletes = None;
            if !s.deleted.is_empty() {
                let set = DeleteSet::new(s.count as usize);
                for &p in &s.deleted {
                    set.set(p);
                }
                let count = set.store(&data.deletes_path(version, s.id, generation))?;
                deletes = Some(DeletesRef { generation, count });
            }
            segments.push(SegmentEntry { id: s.id, count: s.count, bytes: s.bytes, deletes, ef: None });
        }
        m.indexes.insert(
            version.clone(),
            ModelIndex { dim: ix.dim, weights_sha256: ix.weights_sha256.clone(), segments },
        );
    }
    m.store(data.root())?;
    for batch in &legacy.catalog {
        let _ = data.remove_file(&data.catalog_path(batch.id));
    }
    let _ = std::fs::remove_dir(data.root().join("catalog"));
    Ok(m)
}

/// How long a group of writes waits before it is processed, with `pending` frozen segments
/// queued for the sealer plus the merge backlog ([`MergePolicy::backlog`]): nothing below `slowdown_pending_seals`, then 1 ms doubling with each
/// further segment (the hard stop at `max_pending_seals` is elsewhere). Pure, for tests.
fn slowdown(pending: usize, cfg: &WriterConfig) -> std::time::Duration {
    let (soft, hard) = (cfg.slowdown_pending_seals, cfg.max_pending_seals.max(1));
    if pending < soft || soft >= hard {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::from_millis(1 << (pending - soft).min(6))
}

/// Checks and normalises one vector of an upsert.
fn checked_vector(
    versions: &BTreeMap<ModelVersion, VState>,
    v: &ModelVersion,
    values: &[f32],
) -> Result<Vec<f32>, String> {
    let Some(vs) = versions.get(v) else {
        return Err(format!("model version {v} has no index in this data directory"));
    };
    if values.len() != vs.dim {
        return Err(format!("vector for {v} has {} dimensions; the index has {}", values.len(), vs.dim));
    }
    let mut out = Vec::with_capacity(values.len());
    normalise_into(values, &mut out).map_err(|why| format!("vector for {v} is unusable: {why}"))?;
    Ok(out)
}

impl State {
    fn run(mut self, rx: &Receiver<Msg>) {
        let mut deferred: Vec<Msg> = Vec::new();
        loop {
            // Backpressure: while the sealer is behind, only its results are taken; requests
            // wait in `deferred` and go first, in arrival order, once it catches up.
            let backlogged = self.pending_seals >= self.cfg.max_pending_seals.max(1);
            let mut batch = if !backlogged && !deferred.is_empty() {
                std::mem::take(&mut deferred)
            } else {
                match rx.recv() {
                    Ok(m) => vec![m],
                    Err(_) => return,
                }
            };
            while let Ok(m) = rx.try_recv() {
                batch.push(m);
                if batch.len() >= 1024 {
                    break;
                }
            }
            let mut writes = Vec::new();
            // When the group's oldest write was sent.
            let mut oldest: Option<Instant> = None;
            for m in batch {
                match m {
                    Msg::Write { .. } | Msg::Checkpoint { .. } | Msg::Admin { .. }
                        if self.pending_seals >= self.cfg.max_pending_seals.max(1) =>
                    {
                        deferred.push(m)
                    }
                    Msg::Write { ops, reply, queued } => {
                        // A group starts afresh after a checkpoint or admin op processed the
                        // writes before it.
                        oldest =
                            Some(oldest.filter(|_| !writes.is_empty()).map_or(queued, |o| o.min(queued)));
                        writes.push((ops, reply))
                    }
                    Msg::Checkpoint { reply } => {
                        if !writes.is_empty() {
                            self.process_writes(std::mem::take(&mut writes));
                        }
                        self.request_checkpoint(reply);
                    }
                    Msg::Admin { op, reply } => {
                        if !writes.is_empty() {
                            self.process_writes(std::mem::take(&mut writes));
                        }
                        let result = self.admin(op);
                        let _ = reply.send(result);
                    }
                    Msg::Sealed(r) => {
                        self.commit_seal(r);
                        self.remove_dropped_dirs();
                    }
                    Msg::Merged(r) => {
                        self.commit_merge(r);
                        self.remove_dropped_dirs();
                    }
                    Msg::RefuseWrites(reason) => {
                        if !writes.is_empty() {
                            self.process_writes(std::mem::take(&mut writes));
                        }
                        tracing::error!("index writer takes no more writes: {reason}");
                        self.poisoned.get_or_insert(reason);
                    }
                    Msg::Stop => {
                        if !writes.is_empty() {
                            self.process_writes(std::mem::take(&mut writes));
                        }
                        return;
                    }
                }
            }
            if !writes.is_empty() {
                let (seals, backlog) = (self.pending_seals, self.merge_backlog());
                let delay = slowdown(seals + backlog, &self.cfg);
                if !delay.is_zero() {
                    tracing::debug!(
                        pending_seals = seals,
                        merge_backlog = backlog,
                        delay_ms = delay.as_millis() as u64,
                        "delaying a group of writes"
                    );
                    // The writes that arrive meanwhile form the next group.
                    std::thread::sleep(delay);
                }
                let (started, requests) = (Instant::now(), writes.len());
                self.process_writes(writes);
                if let Some(oldest) = oldest.filter(|o| o.elapsed() > SLOW_GROUP) {
                    // Diagnostics (`RUST_LOG=vitrine::index::writer=debug`): whether a slow
                    // acknowledgement waited here, and for what; one that waited elsewhere (the
                    // runtime, the network) leaves no line.
                    let ms = |d: Duration| d.as_secs_f64() * 1e3;
                    tracing::debug!(
                        requests,
                        queued_ms = ms(started - oldest),
                        process_ms = ms(started.elapsed()),
                        "slow write group"
                    );
                }
            }
        }
    }

    fn poison(&mut self, why: &WriterError) {
        let why = crate::report::chain(why);
        tracing::error!("index writer failed, refusing further writes: {why}");
        self.poisoned
            .get_or_insert_with(|| format!("it stopped after a failure (restart to recover): {why}"));
    }

    /// Decides, logs (one frame, one fsync), applies and answers a group of write requests.
    fn process_writes(&mut self, requests: Vec<(Vec<WriteOp>, Reply<Vec<Outcome>>)>) {
        if let Some(reason) = &self.poisoned {
            for (_, reply) in requests {
                let _ = reply.send(Err(WriterError::Poisoned { reason: reason.clone() }));
            }
            return;
        }
        // Decide every operation against the records as the earlier ones leave them.
        let mut pending: HashMap<SkuId, Option<Record>> = HashMap::new();
        let mut changes: Vec<Change> = Vec::new();
        let mut outcomes: Vec<Result<Vec<Outcome>, WriterError>> = Vec::with_capacity(requests.len());
        for (ops, _) in &requests {
            let mut out = Vec::with_capacity(ops.len());
            let mut failed = None;
            for op in ops {
                match self.decide(op, &mut pending) {
                    Ok((outcome, change)) => {
                        if let Some(c) = change {
                            changes.push(c);
                        }
                        out.push(outcome);
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            outcomes.push(match failed {
                Some(e) => Err(e),
                None => Ok(out),
            });
        }
        if outcomes.iter().any(Result::is_err) {
            // A record store read failed: answer everyone with an error, change nothing.
            for ((_, reply), o) in requests.into_iter().zip(outcomes) {
                let _ = reply.send(Err(o.err().unwrap_or(WriterError::Poisoned {
                    reason: "another request in the same group failed".into(),
                })));
            }
            return;
        }
        if !changes.is_empty() {
            let payloads: Vec<Vec<u8>> = changes.iter().map(Change::encode).collect();
            let mut froze = false;
            let mut done = 0;
            let mut last = 0;
            // One frame (one fsync) per group, split only to respect the log's frame limit and
            // where a mutable segment fills up (so the log file closed at that freeze holds
            // nothing past the seal point, and the checkpoint can drop it).
            while done < changes.len() {
                let mut room = self
                    .versions
                    .values()
                    .map(|vs| self.cfg.seal_items.max(1).saturating_sub(vs.mutable.len()))
                    .min()
                    .unwrap_or(usize::MAX)
                    .max(1);
                let mut end = done;
                let mut bytes = 0;
                while end < changes.len()
                    && room > 0
                    && (end == done || bytes + payloads[end].len() + 4 <= MAX_GROUP_BYTES)
                {
                    if matches!(&changes[end], Change::Upsert { vectors, .. } if !vectors.is_empty()) {
                        room -= 1;
                    }
                    bytes += payloads[end].len() + 4;
                    end += 1;
                }
                let refs: Vec<&[u8]> = payloads[done..end].iter().map(Vec::as_slice).collect();
                let first = match self.shared.wal.append_batch(&refs) {
                    Ok(first) => first,
                    Err(e) => {
                        let e = WriterError::Wal(e);
                        self.poison(&e);
                        if froze {
                            self.publish();
                        }
                        for (_, reply) in requests {
                            let _ =
                                reply.send(Err(WriterError::Poisoned { reason: crate::report::chain(&e) }));
                        }
                        return;
                    }
                };
                for (i, c) in changes[done..end].iter().enumerate() {
                    let seq = first + i as u64;
                    if let Err(e) = self.apply(c) {
                        self.poison(&e);
                    }
                    // Segments are cut at exactly `seal_items`, even inside a group.
                    if self.mutable_full() {
                        if let Err(e) = self.freeze_all(seq) {
                            self.poison(&e);
                        }
                        froze = true;
                    }
                    last = seq;
                }
                done = end;
            }
            if self.shared.wal.disk_bytes() >= self.cfg.checkpoint_wal_bytes && self.pending_seals == 0 {
                if let Err(e) = self.freeze_all(last) {
                    self.poison(&e);
                }
                froze = true;
            }
            if froze {
                self.publish();
            }
        }
        for ((_, reply), o) in requests.into_iter().zip(outcomes) {
            let _ = reply.send(o);
        }
    }

    fn current(
        &self,
        sku: &SkuId,
        pending: &HashMap<SkuId, Option<Record>>,
    ) -> Result<Option<Record>, WriterError> {
        match pending.get(sku) {
            Some(r) => Ok(r.clone()),
            None => Ok(self.shared.records.get(sku.as_str())?),
        }
    }

    /// What one operation does, given the records; the change to log, if any.
    fn decide(
        &self,
        op: &WriteOp,
        pending: &mut HashMap<SkuId, Option<Record>>,
    ) -> Result<(Outcome, Option<Change>), WriterError> {
        match op {
            WriteOp::Delete(sku) => {
                if self.current(sku, pending)?.is_none() {
                    return Ok((Outcome::NotFound, None));
                }
                pending.insert(sku.clone(), None);
                Ok((Outcome::Deleted, Some(Change::Delete { sku: sku.clone() })))
            }
            WriteOp::Backfill { sku, version, image_sha256, vector } => {
                let cur = self.current(sku, pending)?;
                let same_image = cur.as_ref().and_then(|r| r.image_sha256.as_ref()) == Some(image_sha256);
                let held = self
                    .versions
                    .get(version)
                    .is_some_and(|vs| holds(&vs.mutable, &vs.frozen, &vs.sealed, sku.as_str()));
                if !same_image || held {
                    return Ok((Outcome::Unchanged, None));
                }
                match checked_vector(&self.versions, version, vector) {
                    Ok(v) => Ok((
                        Outcome::Updated,
                        Some(Change::Upsert {
                            sku: sku.clone(),
                            attrs: None,
                            image_sha256: None,
                            vectors: vec![(version.clone(), v)],
                            from_image: true,
                        }),
                    )),
                    Err(why) => Ok((Outcome::Rejected(why), None)),
                }
            }
            WriteOp::Upsert(u) => {
                let mut vectors = Vec::with_capacity(u.vectors.len());
                let mut seen = HashSet::new();
                for (v, values) in &u.vectors {
                    if !seen.insert(v) {
                        return Ok((Outcome::Rejected(format!("two vectors for model version {v}")), None));
                    }
                    match checked_vector(&self.versions, v, values) {
                        Ok(vec) => vectors.push((v.clone(), vec)),
                        Err(why) => return Ok((Outcome::Rejected(why), None)),
                    }
                }
                let cur = self.current(&u.sku, pending)?;
                let cur_attrs = cur.as_ref().map(|r| r.attrs.clone()).unwrap_or_default();
                let attrs_changed = u.attrs.as_ref().is_some_and(|a| *a != cur_attrs);
                let same_image = u.image_sha256.is_some()
                    && cur.as_ref().and_then(|r| r.image_sha256.as_ref()) == u.image_sha256.as_ref();
                let new_image = u.image_sha256.is_some() && !same_image;
                // The stored image sent again, where a version's vector was sent as a vector
                // since: that version gets the image's embedding back.
                let stale: Vec<&ModelVersion> = match &cur {
                    Some(r) if same_image => {
                        r.supplied.iter().filter(|v| self.versions.contains_key(*v)).collect()
                    }
                    _ => Vec::new(),
                };
                if new_image || !stale.is_empty() {
                    let missing: Vec<ModelVersion> = self
                        .versions
                        .keys()
                        .filter(|v| new_image || stale.contains(v))
                        .filter(|v| !vectors.iter().any(|(have, _)| have == *v))
                        .cloned()
                        .collect();
                    if !missing.is_empty() {
                        return Ok((Outcome::NeedsEmbedding { missing }, None));
                    }
                }
                if !stale.is_empty() {
                    vectors.retain(|(v, _)| stale.contains(&v));
                } else if !new_image && vectors.is_empty() || same_image {
                    // Attributes only (the image, if sent, is the stored one: nothing to embed).
                    if cur.is_none() {
                        return Ok((
                            // Callers name the item (the server prefixes its SKU).
                            Outcome::Rejected("no such SKU: a new SKU needs an image or a vector".into()),
                            None,
                        ));
                    }
                    if !attrs_changed {
                        return Ok((Outcome::Unchanged, None));
                    }
                    vectors.clear();
                }
                let from_image = u.image_sha256.is_some();
                let record = Record {
                    image_sha256: if new_image {
                        u.image_sha256.clone()
                    } else {
                        cur.as_ref().and_then(|r| r.image_sha256.clone())
                    },
                    attrs: u.attrs.clone().unwrap_or(cur_attrs),
                    supplied: supplied_after(cur.as_ref(), new_image, &vectors, from_image),
                };
                let outcome = if cur.is_some() { Outcome::Updated } else { Outcome::Added };
                pending.insert(u.sku.clone(), Some(record));
                let change = Change::Upsert {
                    sku: u.sku.clone(),
                    attrs: u.attrs.clone().filter(|_| attrs_changed || cur.is_none()),
                    image_sha256: u.image_sha256.clone().filter(|_| new_image),
                    vectors,
                    from_image,
                };
                Ok((outcome, Some(change)))
            }
        }
    }

    /// Applies one logged change to memory (live writes and replay alike).
    fn apply(&mut self, change: &Change) -> Result<(), WriterError> {
        let records = &self.shared.records;
        match change {
            Change::Upsert { sku, attrs, image_sha256, vectors, from_image } => {
                let cur = records.get(sku.as_str())?;
                let supplied = supplied_after(cur.as_ref(), image_sha256.is_some(), vectors, *from_image);
                let record = Record {
                    image_sha256: image_sha256
                        .clone()
                        .or_else(|| cur.as_ref().and_then(|r| r.image_sha256.clone())),
                    attrs: attrs.clone().or_else(|| cur.map(|r| r.attrs)).unwrap_or_default(),
                    supplied,
                };
                let doc = self.shared.attrs.write().upsert(sku.as_str(), &record.attrs);
                for (v, values) in vectors {
                    let Some(vs) = self.versions.get(v) else { continue };
                    if values.len() != vs.dim {
                        continue;
                    }
                    // The new copy first, then the old ones go: a search never sees neither.
                    vs.mutable.push(sku.clone(), doc, values);
                    delete_older_copies(&vs.frozen, &vs.sealed, sku);
                }
                records.put(sku.clone(), Some(record));
            }
            Change::Delete { sku } => {
                for vs in self.versions.values() {
                    vs.mutable.delete_sku(sku);
                    delete_older_copies(&vs.frozen, &vs.sealed, sku);
                }
                records.put(sku.clone(), None);
                self.shared.attrs.write().remove(sku.as_str());
            }
        }
        Ok(())
    }

    fn mutable_full(&self) -> bool {
        self.versions.values().any(|vs| vs.mutable.len() >= self.cfg.seal_items.max(1))
    }

    /// Freezes every version's mutable segment (they hold exactly the log records after the
    /// last checkpoint, up to `seal_seq`) and queues them for sealing.
    fn freeze_all(&mut self, seal_seq: u64) -> Result<(), WriterError> {
        self.shared.wal.rotate()?;
        let mut parts = Vec::new();
        for (v, vs) in &mut self.versions {
            let fresh = MutableSegment::with_capacity(vs.dim, self.cfg.seal_items);
            let old = std::mem::replace(&mut vs.mutable, Arc::new(fresh));
            old.freeze();
            vs.frozen.push(Arc::clone(&old));
            let id = SegmentId(self.manifest.allocate_id());
            parts.push((v.clone(), old, id));
        }
        let job = SealJob { id: self.next_job, seal_seq, parts };
        self.next_job += 1;
        self.pending_seals += 1;
        self.seal_jobs.send(job).map_err(|_| WriterError::Closed)
    }

    fn request_checkpoint(&mut self, reply: Reply<u64>) {
        if let Some(reason) = &self.poisoned {
            let _ = reply.send(Err(WriterError::Poisoned { reason: reason.clone() }));
            return;
        }
        let seq = self.shared.wal.last_seq();
        if seq <= self.manifest.wal_checkpoint && self.pending_seals == 0 {
            // Nothing logged since the last checkpoint: nothing to seal or commit, once the
            // janitor has stored the manifests it was given.
            let generation = self.manifest.generation;
            self.clean_up(Cleanup { waiters: vec![reply], generation, ..Cleanup::default() });
            return;
        }
        let job = self.next_job;
        if let Err(e) = self.freeze_all(seq) {
            self.poison(&e);
            let _ = reply.send(Err(e));
            return;
        }
        self.publish();
        self.checkpoint_waiters.push((job, reply));
    }

    /// Runs one change to the set of model versions: commit the manifest, then publish.
    fn admin(&mut self, op: AdminOp) -> Result<u64, WriterError> {
        if let Some(reason) = &self.poisoned {
            return Err(WriterError::Poisoned { reason: reason.clone() });
        }
        let data = &self.shared.data;
        let mut next = self.manifest.clone();
        let mut drop_dir = None;
        match &op {
            AdminOp::AddVersion(spec) => {
                if let Some(ix) = next.indexes.get(&spec.version) {
                    if ix.dim as usize == spec.dim && ix.weights_sha256 == spec.weights_sha256 {
                        return Ok(self.manifest.generation);
                    }
                    return Err(WriterError::VersionConflict {
                        version: spec.version.clone(),
                        dim: ix.dim as usize,
                        weights_sha256: ix.weights_sha256.clone(),
                    });
                }
                let dir = data.index_dir(&spec.version);
                std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
                    action: "cannot create",
                    path: dir,
                    source,
                })?;
                next.indexes.insert(
                    spec.version.clone(),
                    ModelIndex {
                        dim: spec.dim as u32,
                        weights_sha256: spec.weights_sha256.clone(),
                        segments: vec![],
                    },
                );
                if next.serving_model.is_none() {
                    next.serving_model = Some(spec.version.clone());
                }
            }
            AdminOp::SetServing(v) => {
                if !next.indexes.contains_key(v) {
                    return Err(WriterError::UnknownVersion(v.clone()));
                }
                if next.serving_model.as_ref() == Some(v) {
                    return Ok(self.manifest.generation);
                }
                next.serving_model = Some(v.clone());
            }
            AdminOp::DropVersion(v) => {
                if next.serving_model.as_ref() == Some(v) {
                    return Err(WriterError::DropServing(v.clone()));
                }
                if next.indexes.remove(v).is_none() {
                    return Err(WriterError::UnknownVersion(v.clone()));
                }
                drop_dir = Some(data.index_dir(v));
            }
            AdminOp::SetRollout { state, serve, drop } => {
                next.rollout = state.clone();
                if let Some(v) = serve {
                    if !next.indexes.contains_key(v) {
                        return Err(WriterError::UnknownVersion(v.clone()));
                    }
                    next.serving_model = Some(v.clone());
                }
                if let Some(v) = drop {
                    if next.serving_model.as_ref() == Some(v) {
                        return Err(WriterError::DropServing(v.clone()));
                    }
                    if next.indexes.remove(v).is_some() {
                        drop_dir = Some(data.index_dir(v));
                    }
                }
            }
        }
        next.generation += 1;
        // After the manifests the janitor still has to store, never before one of them.
        self.wait_for_janitor();
        next.store(self.shared.data.root())?;
        self.manifest = next;
        match op {
            AdminOp::AddVersion(spec) => {
                self.versions.insert(
                    spec.version,
                    VState {
                        dim: spec.dim,
                        weights_sha256: spec.weights_sha256,
                        sealed: vec![],
                        frozen: vec![],
                        mutable: Arc::new(MutableSegment::with_capacity(spec.dim, self.cfg.seal_items)),
                    },
                );
            }
            AdminOp::SetServing(_) | AdminOp::SetRollout { drop: None, .. } => {}
            AdminOp::DropVersion(v) | AdminOp::SetRollout { drop: Some(v), .. } => {
                self.versions.remove(&v);
            }
        }
        self.publish();
        if let Some(dir) = drop_dir {
            // After the commit the files are orphans (open mappings keep working), but a seal
            // or merge under way may still be writing into the directory: it goes once none is.
            self.dropped_dirs.push(dir);
            self.remove_dropped_dirs();
        }
        Ok(self.manifest.generation)
    }

    /// Publishes the current segments to searches. The replaced live set is retired (dropped
    /// by the janitor, see [`Garbage`]).
    fn publish(&mut self) {
        let versions = self
            .versions
            .iter()
            .map(|(v, vs)| {
                let live = VersionLive {
                    version: v.clone(),
                    dim: vs.dim,
                    weights_sha256: vs.weights_sha256.clone(),
                    sealed: vs.sealed.clone(),
                    frozen: vs.frozen.clone(),
                    mutable: Arc::clone(&vs.mutable),
                };
                (v.clone(), Arc::new(live))
            })
            .collect();
        let old = self.shared.live.swap(Arc::new(LiveSet {
            generation: self.manifest.generation,
            serving: self.manifest.serving_model.clone(),
            rollout: self.manifest.rollout.clone(),
            versions,
        }));
        self.retire(Box::new(old));
    }

    /// Keeps `garbage` for the janitor's next job ([`Garbage`]), handing it over at once when
    /// much has gathered.
    fn retire(&mut self, garbage: Garbage) {
        self.retired.push(garbage);
        if self.retired.len() >= MAX_RETIRED {
            self.clean_up(Cleanup::default());
        }
    }

    /// Writes a new deletion file for every sealed segment whose deletions changed since the
    /// manifest `next` names; returns the files it replaces.
    fn persist_deletes(
        &self,
        next: &mut Manifest,
        extra: &[(ModelVersion, Arc<SealedSegment>)],
    ) -> Result<Vec<PathBuf>, WriterError> {
        let data = &self.shared.data;
        let generation = next.generation;
        let mut replaced = Vec::new();
        for (v, ix) in &mut next.indexes {
            for e in &mut ix.segments {
                let seg = self
                    .versions
                    .get(v)
                    .and_then(|vs| vs.sealed.iter().find(|s| s.id == e.id))
                    .or_else(|| extra.iter().find(|(ev, s)| ev == v && s.id == e.id).map(|(_, s)| s));
                let Some(seg) = seg else { continue };
                if seg.deleted.count() == e.deleted() {
                    continue;
                }
                let count = seg.deleted.store(&data.deletes_path(v, e.id, generation))?;
                if let Some(old) = e.deletes {
                    replaced.push(data.deletes_path(v, e.id, old.generation));
                }
                e.deletes = Some(DeletesRef { generation, count });
            }
        }
        Ok(replaced)
    }

    /// Maps a file the sealer built, with the deletions that happened to its items while it
    /// was being built (`dead` says, per item source, whether it is deleted now).
    fn open_built<P>(
        &self,
        v: &ModelVersion,
        file: &BuiltFile<P>,
        dead: impl Fn(&P) -> bool,
    ) -> Result<Arc<SealedSegment>, WriterError> {
        let id = file.id;
        let path = self.shared.data.segment_path(v, id);
        let segment =
            Segment::open(&path).map_err(|source| WriterError::Segment { version: v.clone(), id, source })?;
        let deleted = DeleteSet::new(segment.len());
        for (i, src) in file.sources.iter().enumerate() {
            if dead(src) {
                deleted.set(i as u32);
            }
        }
        // If searches will scan it, its sketches are built on an idle-class thread from now on
        // (neither this thread, which acknowledges writes, nor the seal or merge waits).
        let sealed = SealedSegment::new(id, segment, deleted).with_default_ef(file.stats.default_ef);
        Ok(Arc::new(sealed.start_scan_sketch()))
    }

    fn commit_seal(&mut self, r: SealResult) {
        self.pending_seals -= 1;
        let result = self.try_commit_seal(r.seal_seq, r.built);
        let waiters: Vec<_> = {
            let (done, rest): (Vec<_>, Vec<_>) =
                std::mem::take(&mut self.checkpoint_waiters).into_iter().partition(|(j, _)| *j <= r.id);
            self.checkpoint_waiters = rest;
            done
        };
        match result {
            Ok(mut job) => {
                // Answered by the janitor once the manifest is on disk.
                job.waiters = waiters.into_iter().map(|(_, reply)| reply).collect();
                self.clean_up(job);
                self.plan_merges();
            }
            Err(e) => {
                self.poison(&e);
                for (_, reply) in waiters {
                    let _ = reply.send(Err(WriterError::Poisoned { reason: crate::report::chain(&e) }));
                }
            }
        }
    }

    fn try_commit_seal(
        &mut self,
        seal_seq: u64,
        built: Result<Vec<SealedPart>, WriterError>,
    ) -> Result<Cleanup, WriterError> {
        if let Some(reason) = &self.poisoned {
            return Err(WriterError::Poisoned { reason: reason.clone() });
        }
        let built = built?;
        let data = &self.shared.data;
        let mut next = self.manifest.clone();
        next.generation += 1;
        let mut added: Vec<(ModelVersion, Arc<SealedSegment>)> = Vec::new();
        for part in &built {
            let (v, Some(file)) = (&part.version, &part.file) else { continue };
            if !next.indexes.contains_key(v) {
                // The version was dropped while its segment was being sealed.
                data.remove_file(&data.segment_path(v, file.id))?;
                continue;
            }
            let seg = self.open_built(v, file, |&p| part.frozen.is_deleted(p))?;
            if let Some(ix) = next.indexes.get_mut(v) {
                ix.segments.push(SegmentEntry::written(file.id, &file.stats));
            }
            added.push((v.clone(), seg));
        }
        let replaced = self.persist_deletes(&mut next, &added)?;
        // No record store flush here: the sealer flushed it after the freeze, so every record
        // change up to `seal_seq` is already durable in redb (a redb commit takes 1 to 30 ms,
        // which this thread would make every acknowledgement wait).
        next.wal_checkpoint = seal_seq;
        self.manifest = next.clone();
        for (v, seg) in added {
            if let Some(vs) = self.versions.get_mut(&v) {
                vs.sealed.push(seg);
            }
        }
        for part in &built {
            if let Some(vs) = self.versions.get_mut(&part.version) {
                vs.frozen.retain(|f| !Arc::ptr_eq(f, &part.frozen));
            }
        }
        self.publish();
        // The frozen segments' last references (besides searches) are `built`'s and the
        // replaced live set's: both dropped by the janitor.
        self.retire(Box::new(built));
        // Searches see the new segments now; the items were searchable before too (frozen),
        // so nothing waits for the manifest to be durable but the log's truncation, and the
        // manifest store (1 to 8 ms of fsyncs), deleting the covered log files and the
        // replaced deletion files (7 to 12 ms of unlinks) are the janitor's, in this order,
        // off the thread every acknowledgement waits on.
        Ok(Cleanup::after(next, self.shared.wal.detach_through(seal_seq), replaced))
    }

    /// Starts a merge for every version the policy says needs one (one at a time per version).
    /// The largest [`MergePolicy::backlog`] of any version: slows writes down like queued
    /// seals (never stops them: a merge that keeps failing must not stall the writes).
    fn merge_backlog(&self) -> usize {
        self.versions.values().map(|vs| self.cfg.merge.backlog(&segment_stats(&vs.sealed))).max().unwrap_or(0)
    }

    fn plan_merges(&mut self) {
        if self.poisoned.is_some() {
            return;
        }
        let mut jobs = Vec::new();
        for (v, vs) in &self.versions {
            if vs.sealed.iter().any(|s| self.merging.contains(&s.id)) {
                continue;
            }
            let stats = segment_stats(&vs.sealed);
            if let Some(ids) = self.cfg.merge.plan(&stats) {
                let inputs: Vec<Arc<SealedSegment>> =
                    vs.sealed.iter().filter(|s| ids.contains(&s.id)).cloned().collect();
                jobs.push((v.clone(), inputs, self.cfg.merge.backlog(&stats) > 0));
            }
        }
        for (version, inputs, behind) in jobs {
            for s in &inputs {
                self.merging.insert(s.id);
            }
            let id = SegmentId(self.manifest.allocate_id());
            tracing::debug!(%version, inputs = inputs.len(), %id, "merging segments");
            if self.merge_jobs.send(MergeJob { version, inputs, id, behind }).is_err() {
                return;
            }
        }
    }

    fn commit_merge(&mut self, r: MergeResult) {
        for s in &r.inputs {
            self.merging.remove(&s.id);
        }
        match self.try_commit_merge(&r) {
            Err(e) => {
                // A merge that fails changes nothing: the inputs stay live.
                tracing::error!(version = %r.version, "merge failed, keeping its input segments: {}", crate::report::Chain(&e));
                if let Ok(Some(file)) = &r.built {
                    let _ = self.shared.data.remove_file(&self.shared.data.segment_path(&r.version, file.id));
                }
            }
            Ok(job) => {
                // The inputs' last references (besides searches) are `r`'s and the replaced
                // live set's: both go to the janitor with the job.
                self.retire(Box::new(r));
                if let Some(job) = job {
                    self.clean_up(job);
                }
                self.plan_merges();
            }
        }
    }

    /// Commits a merge in memory and publishes it; returns the janitor's job (none when the
    /// version was dropped meanwhile).
    fn try_commit_merge(&mut self, r: &MergeResult) -> Result<Option<Cleanup>, WriterError> {
        if let Some(reason) = &self.poisoned {
            return Err(WriterError::Poisoned { reason: reason.clone() });
        }
        let built = match &r.built {
            Ok(b) => b,
            Err(e) => return Err(WriterError::Poisoned { reason: crate::report::chain(e) }),
        };
        let shared = Arc::clone(&self.shared);
        let data = &shared.data;
        let v = &r.version;
        let input_ids: Vec<SegmentId> = r.inputs.iter().map(|s| s.id).collect();
        let mut next = self.manifest.clone();
        next.generation += 1;
        let mut added = Vec::new();
        let merged = match built {
            Some(file) => {
                let seg = self.open_built(v, file, |&(input, pos)| r.inputs[input].deleted.contains(pos))?;
                added.push((v.clone(), Arc::clone(&seg)));
                Some((SegmentEntry::written(file.id, &file.stats), seg))
            }
            None => None,
        };
        let Some(ix) = next.indexes.get_mut(v) else {
            // The version was dropped while it was being merged.
            if let Some(file) = built {
                data.remove_file(&data.segment_path(v, file.id))?;
            }
            return Ok(None);
        };
        let at = ix.segments.iter().position(|e| input_ids.contains(&e.id)).unwrap_or(ix.segments.len());
        let removed: Vec<SegmentEntry> =
            ix.segments.iter().filter(|e| input_ids.contains(&e.id)).cloned().collect();
        ix.segments.retain(|e| !input_ids.contains(&e.id));
        if let Some((entry, _)) = &merged {
            ix.segments.insert(at.min(ix.segments.len()), entry.clone());
        }
        let replaced = self.persist_deletes(&mut next, &added)?;
        self.manifest = next.clone();
        if let Some(vs) = self.versions.get_mut(v) {
            let at = vs.sealed.iter().position(|s| input_ids.contains(&s.id)).unwrap_or(vs.sealed.len());
            vs.sealed.retain(|s| !input_ids.contains(&s.id));
            if let Some((_, seg)) = merged {
                vs.sealed.insert(at.min(vs.sealed.len()), seg);
            }
        }
        self.publish();
        // Storing the manifest and then deleting the inputs' files (a search still holding one
        // keeps its mapping) are the janitor's, as after a seal.
        let mut files = replaced;
        for e in removed {
            files.push(data.segment_path(v, e.id));
            if let Some(d) = e.deletes {
                files.push(data.deletes_path(v, e.id, d.generation));
            }
        }
        Ok(Some(Cleanup::after(next, Vec::new(), files)))
    }

    /// Removes the directories of dropped versions once no seal or merge is under way (either
    /// may be writing a file into one), after the janitor's queued deletions (which may be in
    /// one). Called after every drop, seal and merge commit.
    fn remove_dropped_dirs(&mut self) {
        if self.dropped_dirs.is_empty() || self.pending_seals > 0 || !self.merging.is_empty() {
            return;
        }
        self.wait_for_janitor();
        for dir in std::mem::take(&mut self.dropped_dirs) {
            if let Err(e) = std::fs::remove_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), "cannot remove a dropped version's files: {e}");
            }
        }
    }

    /// Hands a job to the janitor thread; if it is gone, does it here.
    fn clean_up(&mut self, mut job: Cleanup) {
        job.garbage.append(&mut self.retired);
        if let Err(job) = self.cleanup.send(job) {
            let mut failed = None;
            job.0.run(&self.shared, &mut failed);
            if let Some(why) = failed {
                self.poisoned.get_or_insert(why);
            }
        }
    }

    /// Returns once the janitor has done every job handed to it so far (every manifest it
    /// was given is on disk, or the writer is poisoned).
    fn wait_for_janitor(&mut self) {
        let (done, finished) = channel();
        self.clean_up(Cleanup { done: Some(done), ..Cleanup::default() });
        let _ = finished.recv();
    }
}

/// A commit's durable tail, for the janitor thread, in this order: store the manifest (the
/// commit), answer the checkpoint requests it completes, then delete what it made dead: log
/// files detached from the log ([`Wal::detach_through`], retired: some are kept to be reused,
/// see [`Wal::retire`]) and data files (merged-away segments, replaced deletion files). Jobs
/// run in the order the writer committed them, so manifests reach the disk in generation
/// order.
///
/// A manifest that cannot be stored poisons the writer (through `RefuseWrites`) and stops
/// every later job's store and deletions: the disk keeps the last stored manifest and every
/// log file it does not cover, which is what a restart recovers from. A failed deletion is
/// only logged: what is left is covered by the manifest (log files: skipped and deleted by
/// the next open) or an orphan (data files: deleted by the next open).
#[derive(Default)]
struct Cleanup {
    manifest: Option<Box<Manifest>>,
    /// Checkpoint requests this job completes, answered with `generation` once its manifest
    /// (and every earlier one) is stored.
    waiters: Vec<Reply<u64>>,
    generation: u64,
    wal: Vec<PathBuf>,
    files: Vec<PathBuf>,
    /// Told when this job (and so every earlier one) is done.
    done: Option<Sender<()>>,
    /// Dropped here, off the writer thread ([`Garbage`]).
    garbage: Vec<Garbage>,
}

impl Cleanup {
    fn after(manifest: Manifest, wal: Vec<PathBuf>, files: Vec<PathBuf>) -> Self {
        Self {
            generation: manifest.generation,
            manifest: Some(Box::new(manifest)),
            wal,
            files,
            ..Self::default()
        }
    }

    /// Does the job; `failed` is the reason of an earlier failed store (set here on one).
    fn run(self, shared: &Shared, failed: &mut Option<String>) {
        if let (Some(m), None) = (&self.manifest, &failed)
            && let Err(e) = m.store(shared.data.root())
        {
            let why = crate::report::chain(&WriterError::from(e));
            tracing::error!("index writer failed, refusing further writes: {why}");
            *failed = Some(format!("it stopped after a failure (restart to recover): {why}"));
        }
        if let Some(reason) = failed {
            for reply in self.waiters {
                let _ = reply.send(Err(WriterError::Poisoned { reason: reason.clone() }));
            }
        } else {
            for reply in self.waiters {
                let _ = reply.send(Ok(self.generation));
            }
            if let Err(e) = shared.wal.retire(&self.wal) {
                tracing::warn!(
                    "cannot delete covered log files (the next start does): {}",
                    crate::report::Chain(&e)
                );
            }
            for p in &self.files {
                if let Err(e) = shared.data.remove_file(p) {
                    tracing::warn!(
                        "cannot delete a dead file (the next start does): {}",
                        crate::report::Chain(&e)
                    );
                }
            }
        }
        drop(self.garbage);
        if let Some(done) = self.done {
            let _ = done.send(());
        }
    }
}

/// A builder thread's loop, given its narrow and its wide graph-build pool.
type BuildWork = Box<dyn FnOnce(&rayon::ThreadPool, &rayon::ThreadPool) + Send>;

/// The sealer thread: builds segment files from frozen segments, one job at a time, in order,
/// on its own graph-build pools: `[narrow, wide]`, the wide one while other jobs wait.
fn sealer_loop(
    shared: &Shared,
    jobs: &Receiver<SealJob>,
    tx: &Sender<Msg>,
    hnsw: &HnswParams,
    pools: [&rayon::ThreadPool; 2],
) {
    // Jobs taken off the channel, oldest first: how many wait behind the current one.
    let mut queue = std::collections::VecDeque::new();
    loop {
        if queue.is_empty() {
            match jobs.recv() {
                Ok(job) => queue.push_back(job),
                Err(_) => return,
            }
        }
        queue.extend(jobs.try_iter());
        let Some(job) = queue.pop_front() else { continue };
        let pool = pools[usize::from(!queue.is_empty())];
        let built = job
            .parts
            .into_iter()
            .map(|(version, frozen, id)| {
                let items = frozen.live_items();
                if items.skus.is_empty() {
                    return Ok(SealedPart { version, frozen, file: None });
                }
                let path = shared.data.segment_path(&version, id);
                let stats = pool
                    .install(|| write_sized(&path, frozen.dim(), &items.vectors, &items.skus, hnsw, None))
                    .map_err(|source| WriterError::Segment { version: version.clone(), id, source })?;
                tracing::info!(%version, %id, count = stats.count, secs = stats.build_secs, "sealed a segment");
                Ok(SealedPart { version, frozen, file: Some(BuiltFile { id, sources: items.positions, stats }) })
            })
            .collect::<Result<Vec<_>, WriterError>>()
            // The log is truncated through `seal_seq` once this seal commits, so the record
            // changes up to it must be durable in redb first. They are all in the store's
            // overlay since the freeze (the writer applies a write before it freezes), so one
            // flush here, off the writer thread, covers them; changes made since are flushed
            // too, harmlessly (the log still holds them).
            .and_then(|parts| {
                shared.records.flush()?;
                Ok(parts)
            });
        if tx.send(Msg::Sealed(SealResult { id: job.id, seal_seq: job.seal_seq, built })).is_err() {
            return;
        }
    }
}

/// What the merge policy sees of a version's sealed segments.
fn segment_stats(sealed: &[Arc<SealedSegment>]) -> Vec<SegmentStat> {
    sealed
        .iter()
        .map(|s| SegmentStat {
            id: s.id,
            count: s.segment.len() as u64,
            live: s.live(),
            graph: s.segment.has_graph(),
        })
        .collect()
}

/// Writes a sealed or merged segment: flat (no graph) when it is small enough that searches
/// at the default ef scan it anyway ([`FLAT_SEGMENT_ITEMS`]), so that graphs are built only
/// for segments they serve; else with a graph, extending `base`'s when given.
fn write_sized(
    path: &std::path::Path,
    dim: usize,
    vectors: &[f32],
    skus: &[SkuId],
    hnsw: &HnswParams,
    base: Option<(&Segment, &[u32])>,
) -> Result<SegmentStats, SegmentError> {
    match base {
        _ if skus.len() <= FLAT_SEGMENT_ITEMS => write_flat_segment(path, dim, vectors, skus),
        Some((segment, keep)) => write_segment_extending(path, dim, vectors, skus, hnsw, segment, keep),
        None => write_segment(path, dim, vectors, skus, hnsw),
    }
}

/// The merger thread: merges sealed segments on its own graph-build pools, so a long merge
/// never holds up a seal (and with it the writes waiting on seal backpressure): the narrow
/// one, or the wide one while merges are behind the writes (which they then slow down).
fn merger_loop(
    shared: &Shared,
    jobs: &Receiver<MergeJob>,
    tx: &Sender<Msg>,
    hnsw: &HnswParams,
    pools: [&rayon::ThreadPool; 2],
) {
    while let Ok(job) = jobs.recv() {
        let built = pools[usize::from(job.behind)].install(|| merge_segments(shared, &job, hnsw));
        if tx.send(Msg::Merged(MergeResult { version: job.version, inputs: job.inputs, built })).is_err() {
            return;
        }
    }
}

/// A merge extends the graph of its largest input unless more than this fraction of that
/// input is deleted (then too many links need repair, and the graph is built afresh).
const MAX_BASE_DELETED: f64 = 0.2;

/// Writes the live items of `job.inputs` as one new segment. The input with the most live
/// items goes first and keeps its graph; only the others' items are inserted into it.
fn merge_segments(
    shared: &Shared,
    job: &MergeJob,
    hnsw: &HnswParams,
) -> Result<Option<BuiltFile<(usize, u32)>>, WriterError> {
    let dim = job.inputs.first().map_or(0, |s| s.segment.dim());
    let live = |s: &SealedSegment| (s.segment.len() as u64).saturating_sub(s.deleted.count());
    // The largest input with a graph worth extending (flat segments have none).
    let base = (0..job.inputs.len())
        .filter(|&i| job.inputs[i].segment.has_graph())
        .max_by_key(|&i| live(&job.inputs[i]))
        .filter(|&i| {
            let s = &job.inputs[i];
            (s.deleted.count() as f64) <= MAX_BASE_DELETED * s.segment.len() as f64
        });
    let order = base.into_iter().chain((0..job.inputs.len()).filter(|&i| Some(i) != base));
    let mut skus = Vec::new();
    let mut vectors = Vec::new();
    let mut mapping = Vec::new();
    let mut keep = Vec::new();
    for i in order {
        let s = &job.inputs[i];
        for p in 0..s.segment.len() as u32 {
            if s.deleted.contains(p) {
                continue;
            }
            let Ok(sku) = SkuId::new(s.segment.sku(p)) else { continue };
            skus.push(sku);
            vectors.extend_from_slice(s.segment.vector(p));
            mapping.push((i, p));
            if Some(i) == base {
                keep.push(p);
            }
        }
    }
    if skus.is_empty() {
        return Ok(None);
    }
    let path = shared.data.segment_path(&job.version, job.id);
    let base = base.map(|b| (&job.inputs[b].segment, keep.as_slice()));
    let written = write_sized(&path, dim, &vectors, &skus, hnsw, base);
    let stats = written.map_err(|source| WriterError::Segment {
        version: job.version.clone(),
        id: job.id,
        source,
    })?;
    tracing::info!(
        version = %job.version, id = %job.id, inputs = job.inputs.len(), count = stats.count,
        extended = keep.len(), secs = stats.build_secs, "merged segments"
    );
    Ok(Some(BuiltFile { id: job.id, sources: mapping, stats }))
}

/// The versions whose vector was sent as a vector after an upsert: a new image is embedded for
/// every version (none are); vectors from the image leave the list, vectors sent join it. A
/// SKU without an image keeps none (there is nothing to embed again; and a catalogue of
/// vectors only, the common bulk case, pays nothing for it).
fn supplied_after(
    cur: Option<&Record>,
    new_image: bool,
    vectors: &[(ModelVersion, Vec<f32>)],
    from_image: bool,
) -> Vec<ModelVersion> {
    if !new_image && cur.is_none_or(|r| r.image_sha256.is_none()) {
        return Vec::new();
    }
    let mut supplied = match cur {
        Some(r) if !new_image => r.supplied.clone(),
        _ => Vec::new(),
    };
    for (v, _) in vectors {
        if from_image || new_image {
            supplied.retain(|s| s != v);
        } else if !supplied.contains(v) {
            supplied.push(v.clone());
        }
    }
    supplied
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Sealed-away frozen segments are freed off the writer thread (`Garbage`): their last
    /// drop, a munmap of the vectors, would hold up every acknowledgement.
    #[test]
    fn the_writer_thread_never_frees_a_frozen_segment() {
        let dir = tempfile::tempdir().unwrap();
        let version = ModelVersion::new("test-v1").unwrap();
        // A dimension no other test uses: drops are recorded process-wide.
        let dim = 13;
        let cfg = WriterConfig {
            seal_items: 16,
            default_model: Some(ModelSpec { version: version.clone(), dim, weights_sha256: "0".repeat(64) }),
            ..WriterConfig::default()
        };
        let writer = IndexWriter::open(dir.path(), cfg).unwrap();
        for batch in 0..12 {
            let ops = (0..10)
                .map(|i| {
                    let mut v = vec![0.1f32; dim];
                    v[(batch + i) % dim] = 1.0 + i as f32;
                    WriteOp::Upsert(Upsert {
                        sku: SkuId::new(format!("G-{batch}-{i}")).unwrap(),
                        attrs: None,
                        image_sha256: None,
                        vectors: vec![(version.clone(), v)],
                    })
                })
                .collect();
            writer.write_blocking(ops).unwrap();
        }
        // Every seal so far committed and its manifest stored (the janitor then drops).
        writer.checkpoint_blocking().unwrap();
        writer.checkpoint_blocking().unwrap();
        let dropped_on: Vec<String> = super::super::mutable::FROZEN_DROPPED_ON
            .lock()
            .iter()
            .filter(|(d, _)| *d == dim)
            .map(|(_, t)| t.clone())
            .collect();
        assert!(dropped_on.len() >= 5, "seals freed their frozen segments: {dropped_on:?}");
        assert!(
            !dropped_on.iter().any(|t| t == "vitrine-writer"),
            "frozen segments dropped on: {dropped_on:?}"
        );
        writer.close();
    }

    #[test]
    fn writes_slow_down_before_they_stop() {
        let cfg = WriterConfig { slowdown_pending_seals: 6, max_pending_seals: 8, ..WriterConfig::default() };
        let at = |pending| slowdown(pending, &cfg);
        assert_eq!(at(0), Duration::ZERO);
        assert_eq!(at(5), Duration::ZERO);
        assert_eq!(at(6), Duration::from_millis(1));
        assert_eq!(at(7), Duration::from_millis(2));
        assert_eq!(at(8), Duration::from_millis(4), "at the hard limit writes wait anyway");
        let off = WriterConfig { slowdown_pending_seals: 8, ..cfg.clone() };
        assert_eq!(slowdown(7, &off), Duration::ZERO, "a threshold at the hard limit turns it off");
        let far = WriterConfig { slowdown_pending_seals: 1, max_pending_seals: 100, ..cfg };
        assert_eq!(slowdown(99, &far), Duration::from_millis(64), "capped");
    }
}
