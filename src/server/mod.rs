//! The gRPC service: `vitrine.v1.VisualSearch`, plus `grpc.health.v1` and server reflection.
//!
//! The server is its data directory's one writer: it opens an [`IndexWriter`] (lock, log
//! replay) and answers searches from the writer's published [`LiveSet`], so a search that
//! starts after a write's acknowledgement sees it. Handlers are thin: validate the request,
//! call the index (and the encoder, on the blocking pool), convert back. Every call passes
//! the bearer-token check of [`auth`] first; TLS is rustls through tonic.

pub mod admission;
pub mod attrs;
pub mod auth;
pub mod batcher;
pub mod conn;
pub mod error;
pub mod filter;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
mod metrics_http;
pub mod observe;
mod per_method;
pub mod priority;
pub mod rollout;
mod writes;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::ids::{ModelVersion, SkuId};
use crate::index::filter::Filter;
use crate::index::{
    IndexWriter, LiveSet, ModelSpec, Outcome, Query, ScoredSku, VersionLive, WriteOp, WriterConfig,
};
use crate::models::ModelRegistry;
use crate::proto;
use crate::proto::rollouts_server::Rollouts;
use crate::proto::visual_search_server::{VisualSearch, VisualSearchServer};
use crate::rollout::guardrail::GuardrailConfig;
use crate::rollout::router::Arm;
use admission::{Admission, AdmissionConfig, Work};
pub use error::ServiceError;
use rollout::{Kind, RolloutController};
pub use writes::MAX_IMAGE_BYTES;

/// Largest `k` a request may ask for.
pub const MAX_K: u32 = 1000;
/// Largest `ef` a request may ask for.
pub const MAX_EF: u32 = 10_000;
/// Default number of hits.
pub const DEFAULT_K: u32 = 10;
/// Largest request (an encoded image), in bytes.
pub const MAX_REQUEST_BYTES: usize = 40 << 20;
/// Largest rollout start request (it carries the golden set's images).
pub const MAX_GOLDEN_BYTES: usize = 512 << 20;
/// Most SKUs in one Delete or Get request.
pub const MAX_SKUS_PER_REQUEST: usize = 10_000;
/// Upsert stream items handed to the writer together.
const STREAM_CHUNK: usize = 64;

/// Settings of a running server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    /// Concurrency, queue and wait limits per kind of work (image embedding, search, writes).
    pub admission: AdmissionConfig,
    /// The model version indexed when the data directory has none yet.
    pub default_model: ModelVersion,
    /// Seal size, merge policy, HNSW parameters (its `holder` and `default_model` are set by
    /// the server).
    pub writer: WriterConfig,
    /// Limits that take a canary out of traffic.
    pub guardrail: GuardrailConfig,
    /// For tests of the guardrails: the share of canary requests that fail on purpose.
    pub canary_fault_rate: f64,
    /// Serve TLS with this certificate and key (default: plaintext).
    pub tls: Option<TlsFiles>,
    /// Bearer tokens and their roles (default: none, every call allowed).
    pub auth: Arc<auth::AuthPolicy>,
    /// Allow a server without tokens on a non-loopback address.
    pub insecure: bool,
    /// Connection cap, idle timeout and TCP keepalive.
    pub connections: conn::ConnLimits,
    /// Micro-batching of image queries (see [`batcher`]); `None`: the device's default.
    pub query_batch: Option<batcher::BatchPolicy>,
}

/// PEM files of the server's certificate chain and private key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// How long a client may take over its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl TlsFiles {
    /// Reads both files into tonic's server TLS settings.
    fn load(&self) -> Result<tonic::transport::ServerTlsConfig, anyhow::Error> {
        let cert = std::fs::read(&self.cert)
            .with_context(|| format!("cannot read TLS certificate {}", self.cert.display()))?;
        let key = std::fs::read(&self.key)
            .with_context(|| format!("cannot read TLS key {}", self.key.display()))?;
        Ok(tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(cert, key))
            .timeout(TLS_HANDSHAKE_TIMEOUT))
    }
}

impl ServeConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            admission: AdmissionConfig::default(),
            default_model: ModelVersion::new(crate::models::DEFAULT_MODEL).expect("valid default model"),
            writer: WriterConfig::default(),
            guardrail: GuardrailConfig::default(),
            canary_fault_rate: 0.0,
            tls: None,
            auth: Arc::default(),
            insecure: false,
            connections: conn::ConnLimits::default(),
            query_batch: None,
        }
    }
}

/// State shared by all handlers.
pub struct ServerState {
    writer: Arc<IndexWriter>,
    models: Arc<ModelRegistry>,
    admission: Admission,
    rollout: Arc<RolloutController>,
    /// Request and encoder metrics (see [`metrics`]).
    metrics: Arc<metrics::Metrics>,
    /// Set when the server stops taking requests: background work (backfill, shadow queries)
    /// ends at its next step so the writer can be closed and its lock released.
    closing: std::sync::atomic::AtomicBool,
    /// See [`ServerState::problems`].
    problems: Vec<String>,
    /// Model versions not served, and why.
    unservable: BTreeMap<ModelVersion, String>,
    /// How image queries are batched, and each model version's batching thread.
    query_batch: batcher::BatchPolicy,
    batchers: parking_lot::Mutex<BTreeMap<ModelVersion, Arc<batcher::QueryBatcher>>>,
}

impl ServerState {
    /// Opens the data directory as its writer (replaying its log) and loads the encoder of
    /// every model version it indexes. `addr` is named in the lock for other writers to see.
    pub fn open(
        config: &ServeConfig,
        models: Arc<ModelRegistry>,
        addr: SocketAddr,
    ) -> Result<Self, anyhow::Error> {
        // Settings first: a refusal must not come after the writer has opened (and replayed)
        // the directory.
        config.guardrail.validate()?;
        config.admission.validate().map_err(|e| anyhow::anyhow!("admission limits: {e}"))?;
        let default = models
            .get(&config.default_model)
            .with_context(|| format!("cannot load model {}", config.default_model))?;
        let mut wc = config.writer.clone();
        wc.holder = format!("vitrine serve (pid {}, listening on {addr})", std::process::id());
        wc.default_model = Some(ModelSpec {
            version: default.version().clone(),
            dim: default.dim(),
            weights_sha256: default.manifest().sha256.clone(),
        });
        let writer = IndexWriter::open(&config.data_dir, wc)?;
        let report = writer.open_report().clone();
        tracing::info!(
            replayed = report.replayed,
            dropped_tail_bytes = report.dropped_tail_bytes,
            secs = report.secs,
            "index writer open"
        );
        let mut problems: Vec<String> = report.integrity.iter().map(ToString::to_string).collect();
        let mut unservable = BTreeMap::new();
        for (v, view) in &writer.live().versions {
            let Some(why) = models.index_mismatch(v, view.dim, &view.weights_sha256) else { continue };
            // Its vectors would be compared with queries embedded by other weights: not served,
            // and no writes (image upserts would be embedded with the wrong model).
            tracing::error!("not served: {why}");
            writer.refuse_writes(format!("{why}; restore the model or its index"));
            problems.push(why.clone());
            unservable.insert(v.clone(), why);
        }
        if !problems.is_empty() {
            tracing::error!(
                problems = problems.len(),
                "serving DEGRADED: what is damaged is left out and writes are refused; run `vitrine verify`"
            );
        }
        writer.live().versions.values().for_each(|v| v.sealed.iter().for_each(|s| s.segment.warm()));
        let rollout = Arc::new(RolloutController::new(
            &writer.live(),
            config.data_dir.clone(),
            config.guardrail,
            config.canary_fault_rate,
        ));
        let query_batch =
            config.query_batch.unwrap_or_else(|| batcher::BatchPolicy::for_device(models.device()));
        tracing::info!(
            max_batch = query_batch.max_batch,
            max_wait_us = query_batch.max_wait.as_micros() as u64,
            "image query batching"
        );
        Ok(Self {
            writer: Arc::new(writer),
            models,
            admission: Admission::new(&config.admission),
            rollout,
            metrics: Default::default(),
            closing: Default::default(),
            problems,
            unservable,
            query_batch,
            batchers: Default::default(),
        })
    }

    /// Damage found at start (segments left out, damaged records, model versions not served);
    /// empty when the directory is intact.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    /// Refuses a search on a model version that is not served (its weights differ from the
    /// loaded model's).
    pub fn check_servable(&self, version: &ModelVersion) -> Result<(), ServiceError> {
        match self.unservable.get(version) {
            Some(why) => Err(ServiceError::FailedPrecondition(format!("not served: {why}"))),
            None => Ok(()),
        }
    }

    /// Whether the server is shutting down (background work should stop at its next step).
    pub fn closing(&self) -> bool {
        self.closing.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn writer(&self) -> &Arc<IndexWriter> {
        &self.writer
    }

    pub fn live(&self) -> Arc<LiveSet> {
        self.writer.live()
    }
}

/// The `vitrine.v1.VisualSearch` implementation.
pub struct VisualSearchService {
    state: Arc<ServerState>,
}

impl VisualSearchService {
    pub fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }
}

/// Validated search options.
struct Options {
    k: usize,
    ef: usize,
    filter: Option<Filter>,
}

fn options(o: Option<proto::SearchOptions>) -> Result<Options, ServiceError> {
    let o = o.unwrap_or_default();
    let k = if o.k == 0 { DEFAULT_K } else { o.k };
    if k > MAX_K {
        return Err(ServiceError::InvalidArgument(format!("k = {k} is above the limit of {MAX_K}")));
    }
    if o.ef > MAX_EF {
        return Err(ServiceError::InvalidArgument(format!("ef = {} is above the limit of {MAX_EF}", o.ef)));
    }
    let filter = filter::from_options(&o)?;
    Ok(Options { k: k as usize, ef: o.ef as usize, filter })
}

/// Longest routing key accepted (it is hashed to pick a rollout arm).
pub const MAX_ROUTING_KEY_BYTES: usize = 256;

/// A request's SKU, validated before any work; the message echoes at most 64 characters of it.
fn request_sku(raw: &str) -> Result<SkuId, ServiceError> {
    parse_sku(raw).map_err(ServiceError::InvalidArgument)
}

/// [`SkuId::new`] with a message fit for a client: it echoes at most 64 characters.
pub(crate) fn parse_sku(raw: &str) -> Result<SkuId, String> {
    SkuId::new(raw).map_err(|e| {
        let e = match e {
            crate::ids::IdError::SkuControlChar(_) => "it contains a control character".to_string(),
            other => other.to_string(),
        };
        format!("invalid sku {:?}: {e}", crate::ids::shorten(raw, 64))
    })
}

/// Checks a search's routing key and image size before any work.
fn check_routing_key(key: &str) -> Result<(), ServiceError> {
    if key.len() > MAX_ROUTING_KEY_BYTES {
        return Err(ServiceError::InvalidArgument(format!(
            "routing_key is {} bytes; the limit is {MAX_ROUTING_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

/// A Delete or Get request's SKUs, validated; the first bad one is named.
fn sku_list(raw: &[String]) -> Result<Vec<SkuId>, ServiceError> {
    if raw.len() > MAX_SKUS_PER_REQUEST {
        return Err(ServiceError::InvalidArgument(format!(
            "{} skus in one request; the limit is {MAX_SKUS_PER_REQUEST}",
            raw.len()
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(raw.len());
    let mut out = Vec::with_capacity(raw.len());
    for s in raw {
        let sku = request_sku(s)?;
        // A SKU named twice is answered once: a second delete of it in the same request
        // would otherwise report it both deleted and missing.
        if seen.insert(sku.clone()) {
            out.push(sku);
        }
    }
    Ok(out)
}

impl ServerState {
    /// The answer, with each hit's catalogue attributes.
    fn response(
        &self,
        version: &ModelVersion,
        hits: Vec<ScoredSku>,
    ) -> Result<proto::SearchResponse, ServiceError> {
        let mut out = Vec::with_capacity(hits.len());
        for h in hits {
            let attrs = self.writer.record(h.sku.as_str())?.and_then(|r| attrs::to_struct(&r.attrs));
            out.push(proto::Hit { attrs, sku: h.sku.to_string(), score: h.score });
        }
        Ok(proto::SearchResponse { model_version: version.to_string(), hits: out })
    }

    fn search_hits(
        &self,
        view: &VersionLive,
        vector: &[f32],
        o: &Options,
        exclude: Option<&str>,
    ) -> Result<Vec<ScoredSku>, ServiceError> {
        let q = Query { vector, k: o.k, ef: o.ef, exclude, filter: o.filter.as_ref() };
        Ok(view.search(&q, self.writer.attrs())?)
    }

    fn search(
        &self,
        view: &VersionLive,
        vector: &[f32],
        o: &Options,
        exclude: Option<&str>,
    ) -> Result<proto::SearchResponse, ServiceError> {
        let hits = self.search_hits(view, vector, o, exclude)?;
        self.response(&view.version, hits)
    }

    /// Embeds one query image: decoded on the calling thread, then either run there (timed for
    /// the metrics) or, with batching on, handed to the model version's batching thread.
    fn embed_query(
        &self,
        encoder: &Arc<crate::encoder::Encoder>,
        image: &[u8],
        gone: Option<&AtomicBool>,
    ) -> Result<Vec<f32>, ServiceError> {
        let started = std::time::Instant::now();
        let prepared = encoder.preprocess(image)?;
        if gone.is_some_and(|g| g.load(Ordering::Acquire)) {
            return Err(ServiceError::Internal(ABANDONED.into()));
        }
        if self.query_batch.enabled() {
            return self.batcher(encoder)?.embed(prepared).map_err(|e| match e {
                batcher::BatchError::Encoder(e) => ServiceError::Encoder(e),
                e @ batcher::BatchError::Stopped(_) => ServiceError::Internal(e.to_string()),
            });
        }
        let q = encoder.embed_one(&prepared)?;
        self.metrics.record_encode(encoder.version().as_str(), 1, started.elapsed());
        Ok(q)
    }

    /// The batching thread of `encoder`'s model version, started on first use.
    fn batcher(
        &self,
        encoder: &Arc<crate::encoder::Encoder>,
    ) -> Result<Arc<batcher::QueryBatcher>, ServiceError> {
        let mut batchers = self.batchers.lock();
        if let Some(b) = batchers.get(encoder.version()) {
            return Ok(Arc::clone(b));
        }
        let b =
            batcher::QueryBatcher::start(Arc::clone(encoder), self.query_batch, Arc::clone(&self.metrics))
                .map(Arc::new)
                .map_err(|e| {
                    ServiceError::Internal(format!("cannot start the query batching thread: {e}"))
                })?;
        batchers.insert(encoder.version().clone(), Arc::clone(&b));
        Ok(b)
    }

    /// Embeds `image` with `view`'s model (on the blocking pool, under the embed limit) and
    /// searches `view`.
    async fn embed_and_search(
        self: &Arc<Self>,
        view: &Arc<VersionLive>,
        image: Arc<Vec<u8>>,
        o: Arc<Options>,
        arm: Arm,
    ) -> Result<proto::SearchResponse, ServiceError> {
        let encoder = self.models.get(&view.version).map_err(ServiceError::from)?;
        // The slot goes with the work and is freed when it ends (see `search_by_vector`).
        let permit = self.admission.admit(Work::Embed).await?;
        let (state, view) = (Arc::clone(self), Arc::clone(view));
        // Set if this call is dropped (its client went away) while the work runs: the task
        // then skips the forward pass and the search, and frees the embedding slot sooner.
        let mut abandoned = Abandoned { flag: Arc::new(AtomicBool::new(false)), armed: true };
        let gone = Arc::clone(&abandoned.flag);
        let result = blocking("embedding", move || -> Result<_, ServiceError> {
            let _permit = permit.working();
            if gone.load(Ordering::Acquire) {
                return Err(ServiceError::Internal(ABANDONED.into()));
            }
            if state.rollout.inject_fault(arm) {
                return Err(ServiceError::Internal("injected canary fault".into()));
            }
            let q = state.embed_query(&encoder, &image, Some(&gone))?;
            state.search(&view, &q, &o, None)
        })
        .await;
        abandoned.armed = false;
        result?
    }
}

type Resp<T> = Result<Response<T>, Status>;

/// The error of an embedding whose caller went away (never sent: nobody is listening).
const ABANDONED: &str = "the caller went away before its image was embedded";

/// Sets its flag when dropped while armed: the embedding's caller was dropped before the
/// answer.
struct Abandoned {
    flag: Arc<AtomicBool>,
    armed: bool,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if self.armed {
            self.flag.store(true, Ordering::Release);
        }
    }
}

/// The rollout arm of a routed query, while a canary takes traffic (`champion`/`challenger`).
fn route_arm(route: &rollout::Route) -> Option<&'static str> {
    route.canary.then_some(match route.arm {
        Arm::Champion => "champion",
        Arm::Canary => "challenger",
    })
}

/// A response named with the model version (and arm) that answered, for the request log and
/// metrics (see [`observe`]).
fn tag_response<T>(resp: T, version: &impl std::fmt::Display, arm: Option<&'static str>) -> Response<T> {
    let mut r = Response::new(resp);
    observe::tag(r.metadata_mut(), &version.to_string(), arm);
    r
}

/// An error of a routed query, named with its model version and arm.
fn tag_error(e: ServiceError, route: &rollout::Route) -> Status {
    let mut status = Status::from(e);
    observe::tag(status.metadata_mut(), route.primary.version.as_str(), route_arm(route));
    status
}

/// Runs CPU-bound or blocking work (an embedding and the search after it, file I/O) on the
/// blocking pool, so it never holds up the runtime threads that move every other request's
/// bytes. Vector and SKU searches run on the query pool instead ([`priority`]). A task
/// that panics becomes `Internal("{what} task failed: ...")`.
pub(super) async fn blocking<T: Send + 'static>(
    what: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ServiceError::Internal(format!("{what} task failed: {e}")))
}

#[tonic::async_trait]
impl VisualSearch for VisualSearchService {
    async fn search_by_image(
        &self,
        request: Request<proto::SearchByImageRequest>,
    ) -> Resp<proto::SearchResponse> {
        let started = std::time::Instant::now();
        let req = request.into_inner();
        let o = Arc::new(options(req.options)?);
        writes::check_image_size(&req.image).map_err(ServiceError::InvalidArgument)?;
        check_routing_key(&req.routing_key)?;
        let route = self.state.rollout.route(&self.state.live(), &req.routing_key)?;
        self.state.check_servable(&route.primary.version)?;
        let image = Arc::new(req.image);
        let result =
            self.state.embed_and_search(&route.primary, Arc::clone(&image), Arc::clone(&o), route.arm).await;
        if !result.as_ref().is_err_and(ServiceError::is_callers_or_load) {
            self.state.rollout.observe(
                &self.state,
                Kind::Image,
                route.arm,
                started.elapsed(),
                result.is_ok(),
            );
        }
        let resp = result.map_err(|e| tag_error(e, &route))?;
        if let Some(other) = route.shadow.clone() {
            let state = Arc::clone(&self.state);
            let hits = resp.hits.iter().map(|h| h.sku.clone()).collect();
            self.state.rollout.shadow(&self.state, Kind::Image, hits, move || {
                let enc = state.models.get(&other.version).map_err(ServiceError::from)?;
                let q = state.embed_query(&enc, &image, None)?;
                let hits = state.search_hits(&other, &q, &o, None)?;
                Ok(hits.into_iter().map(|h| h.sku.to_string()).collect())
            });
        }
        Ok(tag_response(resp, &route.primary.version, route_arm(&route)))
    }

    async fn search_by_vector(
        &self,
        request: Request<proto::SearchByVectorRequest>,
    ) -> Resp<proto::SearchResponse> {
        let req = request.into_inner();
        let o = options(req.options)?;
        if req.model_version.is_empty() {
            return Err(ServiceError::InvalidArgument("model_version is required".into()).into());
        }
        let version =
            ModelVersion::new(req.model_version).map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        let live = self.state.live();
        let view = Arc::clone(live.version(&version).map_err(ServiceError::from)?);
        self.state.check_servable(&version)?;
        // The slot goes with the search and is freed when it ends, not when this task is next
        // polled (on a saturated runtime, much later), and the gate's service time (which
        // bounds how long queries may queue) is the search's own. A search whose client went
        // away still holds its slot while it runs.
        let permit = self.state.admission.admit(Work::Search).await?;
        let state = Arc::clone(&self.state);
        let resp = priority::on_query_pool("search", move || {
            let _permit = permit.working();
            state.search(&view, &req.vector, &o, None)
        })
        .await??;
        let version = resp.model_version.clone();
        Ok(tag_response(resp, &version, None))
    }

    async fn search_by_sku(
        &self,
        request: Request<proto::SearchBySkuRequest>,
    ) -> Resp<proto::SearchResponse> {
        let started = std::time::Instant::now();
        let req = request.into_inner();
        let o = Arc::new(options(req.options)?);
        if req.sku.is_empty() {
            return Err(ServiceError::InvalidArgument("sku is required".into()).into());
        }
        request_sku(&req.sku)?;
        check_routing_key(&req.routing_key)?;
        let route = self.state.rollout.route(&self.state.live(), &req.routing_key)?;
        self.state.check_servable(&route.primary.version)?;
        let permit = self.state.admission.admit(Work::Search).await?;
        let result = {
            let (state, primary, arm, o, sku) = (
                Arc::clone(&self.state),
                Arc::clone(&route.primary),
                route.arm,
                Arc::clone(&o),
                req.sku.clone(),
            );
            priority::on_query_pool("search", move || {
                let _permit = permit.working();
                if state.rollout.inject_fault(arm) {
                    return Err(ServiceError::Internal("injected canary fault".into()));
                }
                let q = primary
                    .vector_of(&sku)
                    .ok_or_else(|| ServiceError::NotFound(format!("sku {sku:?} is not in the index")))?;
                state.search(&primary, &q, &o, Some(&sku))
            })
            .await
            .and_then(|r| r)
        };
        if !result.as_ref().is_err_and(ServiceError::is_callers_or_load) {
            self.state.rollout.observe(&self.state, Kind::Sku, route.arm, started.elapsed(), result.is_ok());
        }
        let resp = result.map_err(|e| tag_error(e, &route))?;
        if let Some(other) = route.shadow.clone() {
            let state = Arc::clone(&self.state);
            let hits = resp.hits.iter().map(|h| h.sku.clone()).collect();
            let sku = req.sku.clone();
            self.state.rollout.shadow(&self.state, Kind::Sku, hits, move || {
                let q =
                    other.vector_of(&sku).ok_or_else(|| ServiceError::NotFound(format!("sku {sku:?}")))?;
                let hits = state.search_hits(&other, &q, &o, Some(&sku))?;
                Ok(hits.into_iter().map(|h| h.sku.to_string()).collect())
            });
        }
        Ok(tag_response(resp, &route.primary.version, route_arm(&route)))
    }

    async fn get_index_info(&self, _request: Request<proto::GetIndexInfoRequest>) -> Resp<proto::IndexInfo> {
        let live = self.state.live();
        let mut models = Vec::new();
        for (version, view) in &live.versions {
            let (architecture, input_size) = match self.state.models.get(version) {
                Ok(enc) => (architecture_name(enc.manifest().architecture), enc.manifest().input_size),
                Err(_) => (String::new(), 0),
            };
            models.push(proto::ModelIndexInfo {
                model_version: version.to_string(),
                architecture,
                dim: view.dim as u32,
                input_size,
                weights_sha256: view.weights_sha256.clone(),
                live_items: view.live_items(),
                segments: view
                    .sealed
                    .iter()
                    .map(|s| proto::SegmentInfo {
                        id: s.id.0,
                        count: s.segment.len() as u64,
                        deleted: s.deleted.count(),
                        bytes: s.segment.file_len(),
                    })
                    .collect(),
                serving: live.serving.as_ref() == Some(version),
            });
        }
        Ok(Response::new(proto::IndexInfo {
            serving_model_version: live.serving.as_ref().map(ToString::to_string).unwrap_or_default(),
            models,
            manifest_generation: live.generation,
            degraded: !self.state.problems().is_empty(),
            problems: self.state.problems().to_vec(),
        }))
    }

    async fn upsert(&self, request: Request<proto::UpsertRequest>) -> Resp<proto::UpsertResponse> {
        let req = request.into_inner();
        let sku = req.sku.clone();
        let _permit = self.state.admission.admit(Work::Write).await?;
        let mut results = self.state.upsert_items(vec![req]).await?;
        match results.pop() {
            Some(Ok(outcome)) => Ok(Response::new(proto::UpsertResponse { sku, outcome: outcome as i32 })),
            Some(Err(why)) => {
                Err(ServiceError::InvalidArgument(format!("sku {:?}: {why}", crate::ids::shorten(&sku, 64)))
                    .into())
            }
            None => Err(ServiceError::Internal("no result for the upsert".into()).into()),
        }
    }

    async fn upsert_stream(
        &self,
        request: Request<Streaming<proto::UpsertRequest>>,
    ) -> Resp<proto::UpsertStreamResponse> {
        let mut stream = request.into_inner();
        // One write slot for the whole stream: once admitted, a stream is never shed halfway.
        let _permit = self.state.admission.admit(Work::Write).await?;
        let mut resp = proto::UpsertStreamResponse::default();
        let mut chunk = Vec::with_capacity(STREAM_CHUNK);
        let mut done = false;
        while !done {
            match stream.next().await {
                Some(Ok(item)) => chunk.push(item),
                Some(Err(status)) => return Err(status),
                None => done = true,
            }
            if chunk.len() >= STREAM_CHUNK || (done && !chunk.is_empty()) {
                let skus: Vec<String> = chunk.iter().map(|r| r.sku.clone()).collect();
                let results = self.state.upsert_items(std::mem::take(&mut chunk)).await?;
                for (sku, r) in skus.into_iter().zip(results) {
                    let index = resp.items.len() as u32;
                    let status = match r {
                        Ok(outcome) => {
                            match outcome {
                                proto::UpsertOutcome::Added => resp.added += 1,
                                proto::UpsertOutcome::Updated => resp.updated += 1,
                                _ => resp.unchanged += 1,
                            }
                            proto::UpsertItemStatus {
                                index,
                                sku,
                                code: 0,
                                message: String::new(),
                                outcome: outcome as i32,
                            }
                        }
                        Err(message) => {
                            resp.failed += 1;
                            proto::UpsertItemStatus {
                                index,
                                sku,
                                code: tonic::Code::InvalidArgument as i32,
                                message,
                                outcome: 0,
                            }
                        }
                    };
                    resp.items.push(status);
                }
            }
        }
        Ok(Response::new(resp))
    }

    async fn delete(&self, request: Request<proto::DeleteRequest>) -> Resp<proto::DeleteResponse> {
        let skus = sku_list(&request.into_inner().skus)?;
        let _permit = self.state.admission.admit(Work::Write).await?;
        let outcomes = self
            .state
            .writer
            .write(skus.iter().cloned().map(WriteOp::Delete).collect())
            .await
            .map_err(ServiceError::from)?;
        let mut resp = proto::DeleteResponse::default();
        for (sku, o) in skus.into_iter().zip(outcomes) {
            match o {
                Outcome::Deleted => resp.deleted.push(sku.to_string()),
                _ => resp.missing.push(sku.to_string()),
            }
        }
        Ok(Response::new(resp))
    }

    async fn get(&self, request: Request<proto::GetRequest>) -> Resp<proto::GetResponse> {
        let skus = sku_list(&request.into_inner().skus)?;
        let live = self.state.live();
        let mut resp = proto::GetResponse::default();
        for sku in skus {
            match self.state.writer.record(sku.as_str()).map_err(ServiceError::from)? {
                Some(rec) => resp.records.push(proto::SkuRecord {
                    attrs: attrs::to_struct(&rec.attrs),
                    image_sha256: rec.image_sha256.unwrap_or_default(),
                    model_versions: live
                        .versions
                        .iter()
                        .filter(|(_, v)| v.holds(sku.as_str()))
                        .map(|(k, _)| k.to_string())
                        .collect(),
                    sku: sku.to_string(),
                }),
                None => resp.missing.push(sku.to_string()),
            }
        }
        Ok(Response::new(resp))
    }
}

/// The `vitrine.v1.Rollouts` implementation: thin wrappers over the rollout controller.
pub struct RolloutsService {
    state: Arc<ServerState>,
}

impl RolloutsService {
    fn status(&self) -> Response<proto::RolloutStatus> {
        Response::new(self.state.rollout.status(&self.state.live()))
    }
}

#[tonic::async_trait]
impl Rollouts for RolloutsService {
    async fn start(&self, request: Request<proto::RolloutStartRequest>) -> Resp<proto::RolloutStatus> {
        self.state.rollout.start(&self.state, request.into_inner()).await?;
        Ok(self.status())
    }

    async fn set(&self, request: Request<proto::RolloutSetRequest>) -> Resp<proto::RolloutStatus> {
        self.state.rollout.set(&self.state, request.into_inner().fraction).await?;
        Ok(self.status())
    }

    async fn promote(&self, r: Request<proto::RolloutActionRequest>) -> Resp<proto::RolloutStatus> {
        self.state.rollout.promote(&self.state, r.into_inner().force).await?;
        Ok(self.status())
    }

    async fn rollback(&self, _r: Request<proto::RolloutActionRequest>) -> Resp<proto::RolloutStatus> {
        self.state.rollout.act(&self.state, "rollback").await?;
        Ok(self.status())
    }

    async fn abort(&self, _r: Request<proto::RolloutActionRequest>) -> Resp<proto::RolloutStatus> {
        self.state.rollout.act(&self.state, "abort").await?;
        Ok(self.status())
    }

    async fn gc(&self, _r: Request<proto::RolloutActionRequest>) -> Resp<proto::RolloutStatus> {
        self.state.rollout.act(&self.state, "gc").await?;
        Ok(self.status())
    }

    async fn status(&self, _r: Request<proto::RolloutActionRequest>) -> Resp<proto::RolloutStatus> {
        Ok(self.status())
    }
}

/// The health service name that reports damage found at start: NOT_SERVING while degraded
/// (see `IndexInfo.degraded`); the search service itself stays SERVING for what is intact.
pub const INTEGRITY_HEALTH: &str = "vitrine.integrity";

/// Concurrent calls (HTTP/2 streams) one connection may have open; more wait in the client.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// How long a stopping server waits for background work before it gives up closing the writer.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(60);

/// How long a stopping server lets in-flight calls finish: a client stream that stalls (or
/// trickles) must not keep the server from stopping. Under the 30 s a container orchestrator
/// usually grants before its SIGKILL. Every acknowledged write is in the log already, so the
/// calls cut off lose nothing that was acknowledged.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);

/// Runs the server on `listener` until `shutdown` resolves.
pub async fn serve(
    config: ServeConfig,
    models: Arc<ModelRegistry>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), anyhow::Error> {
    serve_with_metrics(config, models, listener, None, shutdown).await
}

/// [`serve`], with Prometheus metrics at `GET /metrics` on `metrics` when given. When
/// `shutdown` resolves, health turns NOT_SERVING first, then the server drains.
pub async fn serve_with_metrics(
    config: ServeConfig,
    models: Arc<ModelRegistry>,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), anyhow::Error> {
    let addr: SocketAddr = listener.local_addr()?;
    auth::check_exposure(addr, &config.auth, config.insecure)?;
    // TLS files are checked before the (slow) index and model loading.
    // A client that opens streams and never reads their answers holds each one's buffers:
    // bound them per connection (with `--max-connections`, per server).
    let mut builder =
        tonic::transport::Server::builder().max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION));
    if let Some(files) = &config.tls {
        builder = builder.tls_config(files.load()?).with_context(|| {
            format!("TLS certificate {} or key {} is not usable", files.cert.display(), files.key.display())
        })?;
    }
    let state = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || ServerState::open(&config, models, addr)).await??
    };
    let state = Arc::new(state);
    // A rollout interrupted by a stop or crash resumes its backfill or gate.
    state.rollout.spawn_driver(&state);
    let live = state.live();
    tracing::info!(
        %addr,
        generation = live.generation,
        serving = live.serving.as_ref().map(ToString::to_string).unwrap_or_else(|| "(none)".into()),
        tls = config.tls.is_some(),
        tokens = config.auth.tokens.len(),
        "vitrine serving"
    );
    log_exposure(addr, &config);

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<VisualSearchServer<VisualSearchService>>().await;
    let integrity = if state.problems().is_empty() {
        tonic_health::ServingStatus::Serving
    } else {
        tonic_health::ServingStatus::NotServing
    };
    health_reporter.set_service_status(INTEGRITY_HEALTH, integrity).await;
    let (stopping_tx, stopping_rx) = tokio::sync::oneshot::channel::<()>();
    let shutdown = async move {
        not_serving_then(health_reporter, shutdown).await;
        let _ = stopping_tx.send(());
    };
    let metrics_task = metrics.map(|l| metrics_http::spawn(l, Arc::downgrade(&state)));
    // Reflection in both versions: older clients (grpcurl 1.8) only speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let service = VisualSearchServer::new(VisualSearchService::new(Arc::clone(&state)))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let rollouts = per_method::RolloutsByMethod::new(
        RolloutsService { state: Arc::clone(&state) },
        MAX_GOLDEN_BYTES,
        MAX_REQUEST_BYTES,
    );
    let serving = builder
        .layer(observe::ObserveLayer::new(Arc::clone(&state.metrics)))
        .layer(auth::AuthLayer::new(Arc::clone(&config.auth)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(rollouts)
        .serve_with_incoming_shutdown(conn::incoming(listener, config.connections), shutdown);
    // The drain ends when the last call does, or SHUTDOWN_GRACE after the stop began.
    let grace = async move {
        if stopping_rx.await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let (result, cut_off) = tokio::select! {
        r = serving => (r, false),
        () = grace => (Ok(()), true),
    };
    if let Some(task) = &metrics_task {
        task.abort();
    }
    if cut_off {
        // The connections still open belong to calls that did not end in time; they end with
        // the process. The writer is closed when the last of them lets go of the state.
        state.closing.store(true, std::sync::atomic::Ordering::Release);
        tracing::warn!(
            "calls still running {}s after the stop began (a stalled client stream?); stopping without them: \
             every acknowledged write is in the log",
            SHUTDOWN_GRACE.as_secs()
        );
        tracing::info!("vitrine stopped");
        return Ok(());
    }
    // Stop background work, wait for what still holds the state (a shadow query, a backfill
    // step, a blocking search), then stop the writer (it finishes a seal in progress) and
    // release the lock, so that the next writer can open the directory at once.
    state.closing.store(true, std::sync::atomic::Ordering::Release);
    let deadline = std::time::Instant::now() + SHUTDOWN_DRAIN;
    let mut state = state;
    loop {
        match Arc::try_unwrap(state) {
            Ok(state) => {
                match Arc::try_unwrap(state.writer) {
                    Ok(writer) => tokio::task::spawn_blocking(move || writer.close()).await?,
                    Err(_) => {
                        tracing::warn!("the index writer is still shared at shutdown; it stops when dropped")
                    }
                }
                break;
            }
            Err(shared) if std::time::Instant::now() < deadline => {
                state = shared;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => {
                tracing::warn!(
                    "work still running {}s after shutdown; the writer stops when it ends",
                    SHUTDOWN_DRAIN.as_secs()
                );
                break;
            }
        }
    }
    result?;
    tracing::info!("vitrine stopped");
    Ok(())
}

/// Says in the log who can reach the server and what they may do.
fn log_exposure(addr: SocketAddr, config: &ServeConfig) {
    if config.auth.tokens.is_empty() {
        if addr.ip().is_loopback() {
            tracing::warn!(%addr, "no tokens configured: every client on this host may search and write (loopback only; see --tokens)");
        } else {
            tracing::warn!(%addr, "no tokens configured and --insecure: anyone who can reach this address may search and write");
        }
    } else if config.auth.allow_anonymous_read {
        tracing::info!("calls without a token may read (--allow-anonymous-read); writes need a write token");
    }
    if config.tls.is_none() && !config.auth.tokens.is_empty() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "tokens travel in plaintext: serve TLS (--tls-cert, --tls-key)");
    }
}

/// Resolves after `shutdown`, once health reports NOT_SERVING (for the whole server and the
/// search service), so that health checks see the stop before the server drains.
async fn not_serving_then(
    reporter: tonic_health::server::HealthReporter,
    shutdown: impl std::future::Future<Output = ()>,
) {
    shutdown.await;
    reporter.set_not_serving::<VisualSearchServer<VisualSearchService>>().await;
    reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
    tracing::info!("shutting down: health is NOT_SERVING; draining requests");
}

/// The architecture's name as model manifests spell it.
fn architecture_name(a: crate::encoder::Architecture) -> String {
    serde_json::to_value(a).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}
