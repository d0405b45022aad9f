//! Bulk catalogue ingestion: parse a JSONL/CSV catalogue, embed images, write segments.
//!
//! The run: parse and validate the catalogue ([`catalog`]), compare each row with what the
//! data directory already holds (same image bytes and attributes: nothing to do, so re-running
//! is idempotent), decode and embed new or changed images in parallel batches with every
//! model version the directory indexes, store the original image bytes (for later backfills),
//! write one new immutable segment per model version, mark the superseded copies of changed
//! SKUs deleted, and commit it all with one atomic manifest replacement.

pub mod catalog;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use crate::encoder::{Encoder, EncoderError};
use crate::ids::{ModelVersion, SegmentId, SkuId};
use crate::index::manifest::{CatalogBatch, ModelIndex, SegmentEntry};
use crate::index::store::{CatalogRecord, DataDir, StoreError};
use crate::index::{IndexError, IndexSnapshot};
use crate::models::ModelRegistry;
use crate::segment::{HnswParams, SegmentError, write_segment};
use catalog::{CatalogError, CatalogFormat, CatalogRow, RejectReason, Rejected};

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("cannot load model {version}: {source}")]
    Model { version: ModelVersion, source: Box<EncoderError> },
    #[error("embedding a batch with model {version} failed: {source}")]
    Embed { version: ModelVersion, source: Box<EncoderError> },
    #[error("writing segment {id} of {version} failed: {source}")]
    Segment { version: ModelVersion, id: SegmentId, source: SegmentError },
    #[error("model {version} has dimension {found}, but its index in this data directory has {expected}")]
    ModelDim { version: ModelVersion, expected: u32, found: usize },
    #[error(
        "model {version}'s weights (sha256 {found}) differ from the ones its index was built with ({expected}); give the new weights a new version"
    )]
    ModelWeights { version: ModelVersion, expected: String, found: String },
}

/// Settings of one ingest run.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub format: Option<CatalogFormat>,
    /// Images per forward pass.
    pub batch_size: usize,
    pub hnsw: HnswParams,
    /// Show a progress bar on stderr.
    pub progress: bool,
    /// The model version to index with when the data directory has none yet.
    pub default_model: ModelVersion,
    /// A run writes a new segment (per model version) each time this many items have been
    /// embedded, bounding memory and graph-build size.
    pub max_segment_items: usize,
}

/// Default for [`IngestOptions::max_segment_items`].
pub const DEFAULT_MAX_SEGMENT_ITEMS: usize = 250_000;

/// What an ingest run did.
#[derive(Debug, Default)]
pub struct IngestReport {
    pub rows: usize,
    pub added: usize,
    pub updated: usize,
    pub unchanged: usize,
    pub rejected: Vec<Rejected>,
    /// (model version, segment, items) written.
    pub segments: Vec<(ModelVersion, SegmentId, usize)>,
    pub generation: u64,
    pub secs: f64,
    pub embed_secs: f64,
}

impl IngestReport {
    /// Rows that are now in the index as the catalogue says.
    pub fn accepted(&self) -> usize {
        self.added + self.updated + self.unchanged
    }
}

/// A row whose image bytes were read, with what must happen to it.
struct Pending {
    row: CatalogRow,
    sha256: String,
    bytes: Vec<u8>,
    /// Whether the SKU already exists (with other image bytes).
    replaces: bool,
}

/// Checks that an encoder may write into an existing index of its version.
fn check_compatible(enc: &Encoder, ix: Option<&ModelIndex>) -> Result<(), IngestError> {
    let Some(ix) = ix else { return Ok(()) };
    let version = enc.version().clone();
    if enc.dim() != ix.dim as usize {
        return Err(IngestError::ModelDim { version, expected: ix.dim, found: enc.dim() });
    }
    if enc.manifest().sha256 != ix.weights_sha256 {
        return Err(IngestError::ModelWeights {
            version,
            expected: ix.weights_sha256.clone(),
            found: enc.manifest().sha256.clone(),
        });
    }
    Ok(())
}

/// Ingests `catalog_path` into the data directory (which must be opened as the writer).
pub fn ingest(
    data: &DataDir,
    models: &ModelRegistry,
    catalog_path: &Path,
    opts: &IngestOptions,
) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    let manifest = data.load_manifest()?;
    let removed = data.remove_orphans(&manifest)?;
    if !removed.is_empty() {
        tracing::warn!(count = removed.len(), "removed files left by an interrupted writer");
    }
    let parsed = catalog::parse_catalog(catalog_path, opts.format)?;
    let mut report = IngestReport { rows: parsed.rows.len() + parsed.rejected.len(), ..Default::default() };
    report.rejected = parsed.rejected;

    // Every model version the directory indexes gets the new items; a fresh directory starts
    // with the default model.
    let mut versions: Vec<ModelVersion> = manifest.indexes.keys().cloned().collect();
    if versions.is_empty() {
        versions.push(opts.default_model.clone());
    }
    let mut encoders: Vec<Arc<Encoder>> = Vec::new();
    for v in &versions {
        let enc = models
            .get(v)
            .map_err(|source| IngestError::Model { version: v.clone(), source: Box::new(source) })?;
        check_compatible(&enc, manifest.indexes.get(v))?;
        encoders.push(enc);
    }

    let existing = data.read_catalog(&manifest)?;
    let snapshot = IndexSnapshot::open(data, &manifest)?;
    let mut next = manifest.clone();
    let mut records: Vec<CatalogRecord> = Vec::new();
    let mut replaced: Vec<SkuId> = Vec::new();
    let mut acc = Accumulator::new(encoders.len());
    let mut embed_secs = 0.0;

    // Stream the rows in chunks, so memory stays bounded whatever the catalogue's size: read
    // the images (in parallel), skip the unchanged ones, decode and embed the rest in batches.
    let bar = progress_bar(parsed.rows.len() as u64, opts.progress);
    let chunk_len = opts.batch_size.max(1) * 8;
    for chunk in parsed.rows.chunks(chunk_len) {
        let read: Vec<Result<Pending, Rejected>> = chunk
            .par_iter()
            .map(|row| match std::fs::read(&row.image) {
                Ok(bytes) => Ok(Pending {
                    sha256: crate::index::store::sha256_hex(&bytes),
                    bytes,
                    row: row.clone(),
                    replaces: false,
                }),
                Err(e) => Err(Rejected {
                    file: catalog_path.to_path_buf(),
                    line: row.line,
                    sku: Some(row.sku.to_string()),
                    reason: RejectReason::UnreadableImage { path: row.image.clone(), error: e.to_string() },
                }),
            })
            .collect();
        let mut pending = Vec::new();
        for r in read {
            let mut p = match r {
                Ok(p) => p,
                Err(rej) => {
                    report.rejected.push(rej);
                    continue;
                }
            };
            match existing.get(&p.row.sku) {
                Some(old) if old.image_sha256 == p.sha256 => {
                    report.unchanged += 1;
                    if old.attrs != p.row.attrs {
                        // Only the attributes changed: a new record, no new vector.
                        records.push(CatalogRecord {
                            sku: p.row.sku,
                            image_sha256: p.sha256,
                            attrs: p.row.attrs,
                        });
                    }
                }
                old => {
                    p.replaces = old.is_some();
                    pending.push(p);
                }
            }
        }
        let embed_started = Instant::now();
        for batch in pending.chunks(opts.batch_size.max(1)) {
            let embedded = embed_batch(&encoders, batch, catalog_path, &mut report.rejected)?;
            for (p, vecs) in embedded {
                data.put_blob(&p.bytes)?;
                acc.push(&p.row.sku, vecs);
                if p.replaces {
                    replaced.push(p.row.sku.clone());
                    report.updated += 1;
                } else {
                    report.added += 1;
                }
                records.push(CatalogRecord {
                    sku: p.row.sku.clone(),
                    image_sha256: p.sha256.clone(),
                    attrs: p.row.attrs.clone(),
                });
                if acc.skus.len() >= opts.max_segment_items.max(1) {
                    acc.flush(data, &encoders, &mut next, &opts.hnsw, &mut report)?;
                }
            }
        }
        embed_secs += embed_started.elapsed().as_secs_f64();
        bar.inc(chunk.len() as u64);
    }
    acc.flush(data, &encoders, &mut next, &opts.hnsw, &mut report)?;
    bar.finish_and_clear();
    report.embed_secs = embed_secs;
    report.rejected.sort_by_key(|r| r.line);

    if records.is_empty() {
        report.generation = manifest.generation;
        report.secs = started.elapsed().as_secs_f64();
        return Ok(report);
    }

    // Superseded copies of changed SKUs are marked deleted in every index.
    for (version, view) in &snapshot.models {
        let Some(ix) = next.indexes.get_mut(version) else { continue };
        for sku in &replaced {
            if let Some((seg, idx)) = view.find_sku(sku.as_str())
                && let Some(e) = ix.segments.iter_mut().find(|e| e.id == seg.entry.id)
            {
                e.delete(idx);
            }
        }
    }
    // Commit: the catalogue batch, then one manifest replacement naming everything.
    let batch_id = next.allocate_id();
    data.write_catalog_batch(batch_id, &records)?;
    next.catalog.push(CatalogBatch { id: batch_id, count: records.len() as u64 });
    if next.serving_model.is_none() {
        next.serving_model = Some(versions[0].clone());
    }
    next.generation += 1;
    next.store(data.root()).map_err(StoreError::from)?;
    report.generation = next.generation;
    report.secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// A decoded row with its embedding from each encoder, in encoder order.
type Embedded<'p> = (&'p Pending, Vec<Vec<f32>>);

/// Decodes (in parallel) and embeds (batched) `batch` with every encoder. Undecodable images
/// become rejections; the rest come back with one vector per encoder.
fn embed_batch<'p>(
    encoders: &[Arc<Encoder>],
    batch: &'p [Pending],
    catalog_path: &Path,
    rejected: &mut Vec<Rejected>,
) -> Result<Vec<Embedded<'p>>, IngestError> {
    // Preprocess for every encoder (input sizes may differ between versions).
    let prepared: Vec<Result<Vec<_>, String>> = batch
        .par_iter()
        .map(|p| {
            encoders
                .iter()
                .map(|e| e.preprocess(&p.bytes).map_err(|err| err.to_string().trim_end().to_string()))
                .collect()
        })
        .collect();
    let mut ok_items = Vec::new();
    let mut per_encoder: Vec<Vec<_>> = encoders.iter().map(|_| Vec::new()).collect();
    for (p, prep) in batch.iter().zip(prepared) {
        match prep {
            Ok(imgs) => {
                for (slot, img) in per_encoder.iter_mut().zip(imgs) {
                    slot.push(img);
                }
                ok_items.push(p);
            }
            Err(error) => rejected.push(Rejected {
                file: catalog_path.to_path_buf(),
                line: p.row.line,
                sku: Some(p.row.sku.to_string()),
                reason: RejectReason::UndecodableImage { path: p.row.image.clone(), error },
            }),
        }
    }
    let mut out: Vec<Embedded<'_>> = ok_items.into_iter().map(|p| (p, Vec::new())).collect();
    if out.is_empty() {
        return Ok(out);
    }
    for (enc, imgs) in encoders.iter().zip(&per_encoder) {
        let embs = enc.embed(imgs).map_err(|source| IngestError::Embed {
            version: enc.version().clone(),
            source: Box::new(source),
        })?;
        for ((_, vecs), e) in out.iter_mut().zip(embs) {
            vecs.push(e);
        }
    }
    Ok(out)
}

/// Embeddings waiting to be written as one segment per model version.
struct Accumulator {
    /// One flat `n x dim` buffer per encoder.
    vectors: Vec<Vec<f32>>,
    skus: Vec<SkuId>,
}

impl Accumulator {
    fn new(encoders: usize) -> Self {
        Self { vectors: vec![Vec::new(); encoders], skus: Vec::new() }
    }

    fn push(&mut self, sku: &SkuId, vecs: Vec<Vec<f32>>) {
        for (buf, v) in self.vectors.iter_mut().zip(vecs) {
            buf.extend_from_slice(&v);
        }
        self.skus.push(sku.clone());
    }

    /// Writes the accumulated items as a new segment of each model version (durable, not yet
    /// live) and records them in `next`, the manifest to be committed.
    fn flush(
        &mut self,
        data: &DataDir,
        encoders: &[Arc<Encoder>],
        next: &mut crate::index::manifest::Manifest,
        hnsw: &HnswParams,
        report: &mut IngestReport,
    ) -> Result<(), IngestError> {
        if self.skus.is_empty() {
            return Ok(());
        }
        for (enc, vecs) in encoders.iter().zip(&mut self.vectors) {
            let version = enc.version().clone();
            let id = SegmentId(next.allocate_id());
            let dir = data.index_dir(&version);
            std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
                action: "cannot create",
                path: dir.clone(),
                source,
            })?;
            let path = data.segment_path(&version, id);
            let stats = write_segment(&path, enc.dim(), vecs, &self.skus, hnsw)
                .map_err(|source| IngestError::Segment { version: version.clone(), id, source })?;
            tracing::info!(%version, %id, count = stats.count, self_recall = stats.self_recall, secs = stats.build_secs, "segment written");
            let ix = next.indexes.entry(version.clone()).or_insert_with(|| ModelIndex {
                dim: enc.dim() as u32,
                weights_sha256: enc.manifest().sha256.clone(),
                segments: Vec::new(),
            });
            ix.segments.push(SegmentEntry {
                id,
                count: stats.count as u64,
                bytes: stats.bytes,
                deleted: Vec::new(),
            });
            report.segments.push((version, id, stats.count));
            vecs.clear();
        }
        self.skus.clear();
        Ok(())
    }
}

fn progress_bar(len: u64, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} ingesting [{bar:30}] {pos}/{len} rows, {per_sec}, ETA {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar
}

/// Counts of rejected rows by reason kind, for the summary line.
pub fn reject_summary(rejected: &[Rejected]) -> BTreeMap<&'static str, usize> {
    let mut out = BTreeMap::new();
    for r in rejected {
        let key = match r.reason {
            RejectReason::Malformed(_) => "malformed",
            RejectReason::BadSku(_) => "bad sku",
            RejectReason::BadAttr { .. } => "bad attribute",
            RejectReason::DuplicateSku { .. } => "duplicate sku",
            RejectReason::UnreadableImage { .. } => "unreadable image",
            RejectReason::UndecodableImage { .. } => "undecodable image",
        };
        *out.entry(key).or_default() += 1;
    }
    out
}
