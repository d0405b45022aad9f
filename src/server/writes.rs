//! The write handlers' work: validate upsert items, embed new images with every model version
//! the index holds (batched, on the blocking pool), store the image bytes, hand the operations
//! to the index writer and turn its outcomes into per-item statuses.

use std::sync::Arc;

use crate::ids::{ModelVersion, SkuId};
use crate::index::store::sha256_hex;
use crate::index::{Outcome, Upsert, WriteOp};
use crate::proto;

use super::admission::Work;
use super::{ServerState, ServiceError, attrs, blocking};

/// Largest image an upsert may carry.
pub const MAX_IMAGE_BYTES: usize = 32 << 20;

/// One image's vectors (one per model version), or why it could not be embedded.
type Embedded = Result<Vec<(ModelVersion, Vec<f32>)>, String>;

/// One upsert item's result: its outcome, or why it was refused.
pub type ItemResult = Result<proto::UpsertOutcome, String>;

/// A validated upsert item, before embedding.
pub(super) struct Item {
    sku: SkuId,
    attrs: Option<crate::index::store::Attrs>,
    payload: Payload,
}

enum Payload {
    None,
    Image { bytes: Vec<u8>, sha256: String },
    Vector(ModelVersion, Vec<f32>),
}

/// An image's size, checked before any work: not empty, at most [`MAX_IMAGE_BYTES`] (the
/// message limit only bounds the whole request).
pub(super) fn check_image_size(bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty() {
        return Err("image is empty".into());
    }
    if bytes.len() > MAX_IMAGE_BYTES {
        return Err(format!("image is {} bytes; the limit is {MAX_IMAGE_BYTES}", bytes.len()));
    }
    Ok(())
}

pub(super) fn validate(req: proto::UpsertRequest) -> Result<Item, String> {
    let sku = super::parse_sku(&req.sku)?;
    let attrs = req.attrs.as_ref().map(attrs::from_struct).transpose()?;
    let payload = match req.payload {
        None => Payload::None,
        Some(proto::upsert_request::Payload::Image(bytes)) => {
            check_image_size(&bytes)?;
            let sha256 = sha256_hex(&bytes);
            Payload::Image { bytes, sha256 }
        }
        Some(proto::upsert_request::Payload::Vector(v)) => {
            let version = ModelVersion::new(v.model_version.clone()).map_err(|e| e.to_string())?;
            if v.values.is_empty() {
                return Err("vector is empty".into());
            }
            Payload::Vector(version, v.values)
        }
    };
    Ok(Item { sku, attrs, payload })
}

fn outcome_to_proto(o: &Outcome) -> ItemResult {
    match o {
        Outcome::Added => Ok(proto::UpsertOutcome::Added),
        Outcome::Updated => Ok(proto::UpsertOutcome::Updated),
        Outcome::Unchanged => Ok(proto::UpsertOutcome::Unchanged),
        Outcome::Rejected(why) => Err(why.clone()),
        Outcome::Deleted | Outcome::NotFound | Outcome::NeedsEmbedding { .. } => {
            Err(format!("unexpected outcome {o:?} for an upsert"))
        }
    }
}

impl ServerState {
    /// Embeds `images` with each of `versions` for a write or a backfill (on the blocking
    /// pool, waiting for the embed slot rather than being shed; `background` work such as a
    /// canary's backfill runs on the idle-class pool of [`crate::background`], so queries keep
    /// their latency). Per image: one vector per version, or why it failed.
    pub(super) async fn embed(
        self: &Arc<Self>,
        images: Vec<Vec<u8>>,
        versions: Vec<ModelVersion>,
        background: bool,
    ) -> Result<Vec<Embedded>, ServiceError> {
        let mut encoders = Vec::with_capacity(versions.len());
        for v in &versions {
            encoders.push(self.models.get(v).map_err(ServiceError::from)?);
        }
        // Writes were admitted (and bounded) by the write gate, and a backfill is never shed:
        // both wait their turn for the embedding slot instead of failing.
        let _permit = self.admission.admit_waiting(Work::Embed).await?;
        let pool = if background { crate::background::embed_pool() } else { None };
        let metrics = Arc::clone(&self.metrics);
        blocking("embedding", move || {
            let run = || embed_all(&encoders, &images, &metrics);
            match pool {
                Some(pool) => pool.install(run),
                None => run(),
            }
        })
        .await
    }

    /// Runs a group of upsert requests: each item's result in order. An error is for the whole
    /// group (the writer is down); an invalid item only fails itself.
    pub(super) async fn upsert_items(
        self: &Arc<Self>,
        requests: Vec<proto::UpsertRequest>,
    ) -> Result<Vec<ItemResult>, ServiceError> {
        let mut results: Vec<Option<ItemResult>> = requests.iter().map(|_| None).collect();
        let mut items: Vec<(usize, Item)> = Vec::new();
        for (i, req) in requests.into_iter().enumerate() {
            match validate(req) {
                Ok(item) => items.push((i, item)),
                Err(why) => results[i] = Some(Err(why)),
            }
        }
        // First try: images whose bytes are already stored for that SKU need no embedding.
        let mut ops: Vec<(usize, Upsert, Option<Vec<u8>>)> = Vec::new();
        let mut to_embed: Vec<(usize, Upsert, Vec<u8>)> = Vec::new();
        for (i, item) in items {
            let mut op = Upsert { sku: item.sku, attrs: item.attrs, image_sha256: None, vectors: vec![] };
            match item.payload {
                Payload::None => ops.push((i, op, None)),
                Payload::Vector(v, values) => {
                    op.vectors.push((v, values));
                    ops.push((i, op, None));
                }
                Payload::Image { bytes, sha256 } => {
                    let stored = self.writer.record(op.sku.as_str())?.and_then(|r| r.image_sha256);
                    let same = stored.as_deref() == Some(sha256.as_str());
                    op.image_sha256 = Some(sha256);
                    if same {
                        ops.push((i, op, Some(bytes)));
                    } else {
                        to_embed.push((i, op, bytes));
                    }
                }
            }
        }
        for _attempt in 0..3 {
            if !to_embed.is_empty() {
                let versions: Vec<ModelVersion> = self.writer.live().versions.keys().cloned().collect();
                if versions.is_empty() {
                    return Err(ServiceError::NoIndex);
                }
                let images: Vec<Vec<u8>> = to_embed.iter().map(|(_, _, b)| b.clone()).collect();
                let embedded = self.embed(images, versions, false).await?;
                for ((i, mut op, bytes), emb) in std::mem::take(&mut to_embed).into_iter().zip(embedded) {
                    match emb {
                        Ok(vectors) => {
                            let writer = Arc::clone(&self.writer);
                            let b = bytes.clone();
                            blocking("blob", move || writer.data().put_blob(&b))
                                .await?
                                .map_err(|e| ServiceError::Writer(e.into()))?;
                            op.vectors = vectors;
                            ops.push((i, op, Some(bytes)));
                        }
                        Err(why) => results[i] = Some(Err(why)),
                    }
                }
            }
            if ops.is_empty() {
                break;
            }
            let batch = std::mem::take(&mut ops);
            let outcomes = self
                .writer
                .write(batch.iter().map(|(_, op, _)| WriteOp::Upsert(op.clone())).collect())
                .await?;
            for ((i, op, bytes), outcome) in batch.into_iter().zip(outcomes) {
                match (&outcome, bytes) {
                    (Outcome::NeedsEmbedding { .. }, Some(bytes)) => to_embed.push((i, op, bytes)),
                    _ => results[i] = Some(outcome_to_proto(&outcome)),
                }
            }
            if to_embed.is_empty() {
                break;
            }
        }
        for (i, _, _) in to_embed {
            results[i] = Some(Err("the catalogue's model versions changed while embedding; retry".into()));
        }
        Ok(results.into_iter().map(|r| r.unwrap_or_else(|| Err("not processed".into()))).collect())
    }
}

/// Embeds every image with every encoder: per image, one vector per encoder's version, or
/// the first error.
fn embed_all(
    encoders: &[Arc<crate::encoder::Encoder>],
    images: &[Vec<u8>],
    metrics: &super::metrics::Metrics,
) -> Vec<Embedded> {
    let refs: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    let mut out: Vec<Embedded> = refs.iter().map(|_| Ok(Vec::new())).collect();
    for enc in encoders {
        let started = std::time::Instant::now();
        let embedded = enc.embed_bytes(&refs);
        metrics.record_encode(enc.version().as_str(), refs.len(), started.elapsed());
        for (slot, r) in out.iter_mut().zip(embedded) {
            match (slot.as_mut(), r) {
                (Ok(vecs), Ok(v)) => vecs.push((enc.version().clone(), v)),
                (Ok(_), Err(e)) => {
                    *slot = Err(format!("cannot embed the image: {}", crate::report::chain(&e).trim_end()))
                }
                (Err(_), _) => {}
            }
        }
    }
    out
}
