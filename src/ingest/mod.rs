//! Bulk catalogue ingestion into a data directory, through its index writer.
//!
//! The run streams the catalogue ([`catalog::CatalogReader`]: memory bounded by one chunk of
//! rows, whatever the file's length), reads each chunk's images in parallel, skips rows whose
//! SKU already has these exact image bytes and attributes (so a killed run resumes where it
//! stopped: committed rows are not embedded again), embeds the new or changed images with
//! every model version the directory indexes, stores the original bytes (for later
//! backfills) and hands the chunk to the [`IndexWriter`], which makes it durable in its
//! write-ahead log before answering. Segments are sealed every `max_segment_items` items and
//! once more at the end, so a finished run leaves no log behind.

pub mod catalog;
pub mod image_file;
pub mod progress;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;

use crate::encoder::{Encoder, EncoderError, PreparedImage};
use crate::ids::ModelVersion;
use crate::index::store::sha256_hex;
use crate::index::{IndexWriter, ModelSpec, Outcome, Upsert, WriteOp, WriterConfig, WriterError};
use crate::models::ModelRegistry;
use crate::segment::HnswParams;
use catalog::{CatalogError, CatalogFormat, CatalogReader, CatalogRow, RejectReason, Rejected, RowError};
use image_file::ImagePolicy;

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Writer(#[from] WriterError),
    #[error("cannot load model {version}")]
    Model { version: ModelVersion, source: Box<EncoderError> },
    #[error("embedding a batch with model {version} failed")]
    Embed { version: ModelVersion, source: Box<EncoderError> },
    #[error("model {version} has dimension {found}, but its index in this data directory has {expected}")]
    ModelDim { version: ModelVersion, expected: usize, found: usize },
    #[error(
        "model {version}'s weights (sha256 {found}) differ from the ones its index was built with ({expected}); give the new weights a new version"
    )]
    ModelWeights { version: ModelVersion, expected: String, found: String },
    #[error("the index writer answered {outcome:?} for sku {sku}")]
    Unexpected { sku: String, outcome: Outcome },
    #[error("image roots of {}", catalog.display())]
    ImageRoots { catalog: PathBuf, source: std::io::Error },
}

/// Settings of one ingest run.
#[derive(Debug, Clone)]
pub struct IngestOptions {
    pub format: Option<CatalogFormat>,
    /// Images per forward pass.
    pub batch_size: usize,
    pub hnsw: HnswParams,
    /// Show progress on stderr.
    pub progress: bool,
    /// The model version to index with when the data directory has none yet.
    pub default_model: ModelVersion,
    /// Items per sealed segment (bounds memory and graph-build size).
    pub max_segment_items: usize,
    /// Directories besides the catalogue's own folder that image paths may resolve into.
    pub image_roots: Vec<PathBuf>,
    /// Largest image file read (see [`image_file::DEFAULT_MAX_IMAGE_BYTES`]).
    pub max_image_bytes: u64,
}

/// Default for [`IngestOptions::max_segment_items`].
pub const DEFAULT_MAX_SEGMENT_ITEMS: usize = 250_000;

/// What an ingest run did.
#[derive(Debug, Default)]
pub struct IngestReport {
    pub rows: usize,
    pub added: usize,
    pub updated: usize,
    /// Rows already in the index with the same image and attributes (nothing embedded): on a
    /// re-run after a crash, the rows committed before it.
    pub unchanged: usize,
    pub rejected: Vec<Rejected>,
    /// Images embedded in this run.
    pub embedded: usize,
    /// Log records replayed when the directory was opened (a previous run's tail).
    pub replayed: usize,
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

/// Checks that an encoder may write into an existing index of its version.
fn check_compatible(enc: &Encoder, dim: usize, sha: &str) -> Result<(), IngestError> {
    let version = enc.version().clone();
    if enc.dim() != dim {
        return Err(IngestError::ModelDim { version, expected: dim, found: enc.dim() });
    }
    if enc.manifest().sha256 != sha {
        return Err(IngestError::ModelWeights {
            version,
            expected: sha.to_string(),
            found: enc.manifest().sha256.clone(),
        });
    }
    Ok(())
}

fn model(models: &ModelRegistry, v: &ModelVersion) -> Result<Arc<Encoder>, IngestError> {
    models.get(v).map_err(|source| IngestError::Model { version: v.clone(), source: Box::new(source) })
}

/// Ingests `catalog_path` into the data directory `data_dir`, as its writer (refused while a
/// server holds it: stream to the server instead).
pub fn ingest(
    data_dir: &Path,
    models: &ModelRegistry,
    catalog_path: &Path,
    opts: &IngestOptions,
) -> Result<IngestReport, IngestError> {
    let started = Instant::now();
    let default = model(models, &opts.default_model)?;
    let config = WriterConfig {
        holder: format!("vitrine ingest (pid {})", std::process::id()),
        default_model: Some(ModelSpec {
            version: default.version().clone(),
            dim: default.dim(),
            weights_sha256: default.manifest().sha256.clone(),
        }),
        seal_items: opts.max_segment_items.max(1),
        hnsw: opts.hnsw,
        ..WriterConfig::default()
    };
    let reader = CatalogReader::open(catalog_path, opts.format)?;
    let images = ImagePolicy::for_catalog(catalog_path, &opts.image_roots, opts.max_image_bytes)
        .map_err(|source| IngestError::ImageRoots { catalog: catalog_path.to_path_buf(), source })?;
    let writer = IndexWriter::open(data_dir, config)?;
    let mut report = IngestReport { replayed: writer.open_report().replayed, ..Default::default() };
    let mut encoders = Vec::new();
    for (v, view) in &writer.live().versions {
        let enc = model(models, v)?;
        check_compatible(&enc, view.dim, &view.weights_sha256)?;
        encoders.push(enc);
    }

    let mut progress = progress::Progress::new(reader.total_bytes(), opts.progress);
    let chunk_len = opts.batch_size.max(1) * 8;
    let mut done = 0u64;
    let mut reader = reader;
    let mut rejected = Vec::new();
    report.rows = for_each_chunk(&mut reader, chunk_len, &mut rejected, |rows, bytes_read| {
        let n = rows.len() as u64;
        ingest_chunk(&writer, &encoders, rows, catalog_path, &images, opts, &mut report)?;
        done += n;
        progress.update(done, bytes_read);
        Ok::<(), IngestError>(())
    })?;
    report.rejected.extend(rejected);
    progress.finish();
    report.generation = writer.checkpoint_blocking()?;
    writer.close();
    report.rejected.sort_by_key(|r| r.line);
    report.secs = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Feeds the catalogue to `f` in chunks of at most `len` valid rows, in file order, with the
/// catalogue bytes read so far; rejected rows go to `rejected`. Returns the number of rows
/// (valid and rejected). Stops at the first error, a fatal read error included.
pub fn for_each_chunk<E: From<CatalogError>>(
    reader: &mut CatalogReader,
    len: usize,
    rejected: &mut Vec<Rejected>,
    mut f: impl FnMut(Vec<CatalogRow>, u64) -> Result<(), E>,
) -> Result<usize, E> {
    let mut rows = 0;
    let mut chunk: Vec<CatalogRow> = Vec::with_capacity(len);
    loop {
        let item = reader.next();
        let end = item.is_none();
        match item {
            Some(Ok(row)) => chunk.push(row),
            Some(Err(RowError::Rejected(r))) => {
                rows += 1;
                rejected.push(r);
            }
            Some(Err(RowError::Fatal(e))) => return Err(e.into()),
            None => {}
        }
        if chunk.len() >= len.max(1) || (end && !chunk.is_empty()) {
            rows += chunk.len();
            f(std::mem::take(&mut chunk), reader.bytes_read())?;
        }
        if end {
            return Ok(rows);
        }
    }
}

/// A row whose image was read.
struct Read {
    row: CatalogRow,
    sha256: String,
    bytes: Vec<u8>,
}

fn ingest_chunk(
    writer: &IndexWriter,
    encoders: &[Arc<Encoder>],
    rows: Vec<CatalogRow>,
    catalog_path: &Path,
    images: &ImagePolicy,
    opts: &IngestOptions,
    report: &mut IngestReport,
) -> Result<(), IngestError> {
    let reject = |row: &CatalogRow, reason| Rejected {
        file: catalog_path.to_path_buf(),
        line: row.line,
        sku: Some(row.sku.to_string()),
        reason,
    };
    let read: Vec<Result<Read, Rejected>> = rows
        .into_par_iter()
        .map(|row| match images.read(&row.image) {
            Ok(bytes) => Ok(Read { sha256: sha256_hex(&bytes), bytes, row }),
            Err(e) => Err(reject(
                &row,
                RejectReason::UnreadableImage { path: row.image.clone(), error: crate::report::chain(&e) },
            )),
        })
        .collect();
    // Rows whose image is already stored need no embedding (the writer decides whether their
    // attributes changed); the rest are embedded with every model version.
    let mut ops: Vec<(Upsert, usize)> = Vec::new();
    let mut to_embed: Vec<Read> = Vec::new();
    for r in read {
        match r {
            Ok(r) => {
                let stored = writer.record(r.row.sku.as_str())?.and_then(|rec| rec.image_sha256);
                if stored.as_deref() == Some(r.sha256.as_str()) {
                    let line = r.row.line;
                    ops.push((
                        Upsert {
                            sku: r.row.sku,
                            attrs: Some(r.row.attrs),
                            image_sha256: Some(r.sha256),
                            vectors: vec![],
                        },
                        line,
                    ));
                } else {
                    to_embed.push(r);
                }
            }
            Err(rej) => report.rejected.push(rej),
        }
    }
    let embed_started = Instant::now();
    let batches: Vec<&[Read]> = to_embed.chunks(opts.batch_size.max(1)).collect();
    // A pipeline over the batches: while the encoder embeds batch i (on a GPU the calling
    // thread mostly waits), a second thread decodes and resizes batch i+1 on the rayon pool
    // and stores the image bytes of batch i-1. Only the order of the finished upserts matters,
    // and it stays the catalogue's.
    let mut prepared = batches.first().map(|b| prepare(b, encoders));
    let mut embedded: Option<Embedded> = None;
    for i in 0..batches.len() {
        let current = prepared.take().unwrap_or_else(|| unreachable!("batch {i} was prepared"));
        let done = embedded.take();
        let (result, (next, stored)) = std::thread::scope(|scope| {
            let side = scope.spawn(|| {
                let next = batches.get(i + 1).map(|b| prepare(b, encoders));
                (next, done.map(|d| store_blobs(writer, d)))
            });
            let result = embed(current, encoders);
            (result, side.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        });
        prepared = next;
        if let Some(stored) = stored {
            finish(stored?, &reject, report, &mut ops);
        }
        embedded = Some(result?);
    }
    if let Some(done) = embedded {
        finish(store_blobs(writer, done)?, &reject, report, &mut ops);
    }
    report.embed_secs += embed_started.elapsed().as_secs_f64();
    if ops.is_empty() {
        return Ok(());
    }
    let skus: Vec<String> = ops.iter().map(|(u, _)| u.sku.to_string()).collect();
    let outcomes = writer.write_blocking(ops.into_iter().map(|(u, _)| WriteOp::Upsert(u)).collect())?;
    for (sku, o) in skus.into_iter().zip(outcomes) {
        match o {
            Outcome::Added => report.added += 1,
            Outcome::Updated => report.updated += 1,
            Outcome::Unchanged => report.unchanged += 1,
            outcome => return Err(IngestError::Unexpected { sku, outcome }),
        }
    }
    Ok(())
}

/// One batch's images decoded and resized for every model version (`Err`: why a row's image
/// could not be), in row order.
struct Prepared<'a> {
    rows: Vec<&'a Read>,
    images: Vec<Result<Vec<PreparedImage>, String>>,
}

/// One vector per model version.
type Vectors = Vec<(ModelVersion, Vec<f32>)>;

/// A batch after embedding: rows with their vectors, and the rows whose image failed to decode.
struct Embedded<'a> {
    ok: Vec<(&'a Read, Vectors)>,
    undecodable: Vec<(&'a Read, String)>,
}

/// Decodes and resizes a batch's images in parallel, for every encoder.
fn prepare<'a>(batch: &'a [Read], encoders: &[Arc<Encoder>]) -> Prepared<'a> {
    let images = batch
        .par_iter()
        .map(|r| {
            encoders
                .iter()
                .map(|e| {
                    e.preprocess(&r.bytes).map_err(|err| crate::report::chain(&err).trim_end().to_string())
                })
                .collect()
        })
        .collect();
    Prepared { rows: batch.iter().collect(), images }
}

/// Embeds a prepared batch with every encoder.
fn embed<'a>(batch: Prepared<'a>, encoders: &[Arc<Encoder>]) -> Result<Embedded<'a>, IngestError> {
    let mut ok = Vec::new();
    let mut undecodable = Vec::new();
    let mut per_encoder: Vec<Vec<PreparedImage>> = encoders.iter().map(|_| Vec::new()).collect();
    for (r, prep) in batch.rows.into_iter().zip(batch.images) {
        match prep {
            Ok(imgs) => {
                for (slot, img) in per_encoder.iter_mut().zip(imgs) {
                    slot.push(img);
                }
                ok.push((r, Vec::with_capacity(encoders.len())));
            }
            Err(error) => undecodable.push((r, error)),
        }
    }
    for (enc, imgs) in encoders.iter().zip(&per_encoder) {
        if imgs.is_empty() {
            continue;
        }
        let embs = enc.embed(imgs).map_err(|source| IngestError::Embed {
            version: enc.version().clone(),
            source: Box::new(source),
        })?;
        for ((_, slot), e) in ok.iter_mut().zip(embs) {
            slot.push((enc.version().clone(), e));
        }
    }
    Ok(Embedded { ok, undecodable })
}

/// Stores the original image bytes of an embedded batch (for later backfills), in parallel:
/// each blob is its own fsynced file, so this waits on the disk, not the CPU.
fn store_blobs<'a>(writer: &IndexWriter, batch: Embedded<'a>) -> Result<Embedded<'a>, IngestError> {
    batch
        .ok
        .par_iter()
        .try_for_each(|(r, _)| writer.data().put_blob(&r.bytes).map(drop))
        .map_err(WriterError::from)?;
    Ok(batch)
}

/// Turns a stored batch into upserts (in row order) and its undecodable rows into rejections.
fn finish(
    batch: Embedded<'_>,
    reject: &impl Fn(&CatalogRow, RejectReason) -> Rejected,
    report: &mut IngestReport,
    ops: &mut Vec<(Upsert, usize)>,
) {
    for (r, error) in batch.undecodable {
        report
            .rejected
            .push(reject(&r.row, RejectReason::UndecodableImage { path: r.row.image.clone(), error }));
    }
    for (r, vectors) in batch.ok {
        report.embedded += 1;
        ops.push((
            Upsert {
                sku: r.row.sku.clone(),
                attrs: Some(r.row.attrs.clone()),
                image_sha256: Some(r.sha256.clone()),
                vectors,
            },
            r.row.line,
        ));
    }
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
