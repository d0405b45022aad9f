//! The gRPC service: `vitrine.v1.VisualSearch`, plus `grpc.health.v1` and server reflection.
//!
//! Handlers are thin: validate the request, call the index (and the encoder for image
//! queries, on the blocking pool), convert back. The index is an [`IndexSnapshot`] behind an
//! `ArcSwap`: a watcher re-reads the manifest and swaps in a new snapshot, fully opened
//! first, when its generation moves, so ingests become visible without a restart.

pub mod attrs;
pub mod error;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tonic::{Request, Response, Status};

use crate::ids::ModelVersion;
use crate::index::manifest::Manifest;
use crate::index::store::DataDir;
use crate::index::{IndexSnapshot, ModelIndexView, ScoredSku};
use crate::models::ModelRegistry;
use crate::proto;
use crate::proto::visual_search_server::{VisualSearch, VisualSearchServer};
pub use error::ServiceError;

/// Largest `k` a request may ask for.
pub const MAX_K: u32 = 1000;
/// Largest `ef` a request may ask for.
pub const MAX_EF: u32 = 10_000;
/// Default number of hits.
pub const DEFAULT_K: u32 = 10;
/// Largest request (an encoded image), in bytes.
pub const MAX_REQUEST_BYTES: usize = 32 << 20;

/// Settings of a running server.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    /// How often to look for a new manifest generation; `None` disables reloading.
    pub reload_interval: Option<Duration>,
    /// Image queries embedded at once (each uses the encoder's threads).
    pub max_concurrent_embeds: usize,
}

/// State shared by all handlers.
pub struct ServerState {
    data: DataDir,
    index: ArcSwap<IndexSnapshot>,
    models: Arc<ModelRegistry>,
    embed_slots: Semaphore,
}

impl ServerState {
    /// Opens the data directory's current snapshot and loads the serving model's encoder.
    pub fn open(config: &ServeConfig, models: Arc<ModelRegistry>) -> Result<Self, anyhow::Error> {
        let data = DataDir::open_reader(&config.data_dir)?;
        let manifest = data.load_manifest()?;
        let snapshot = open_snapshot(&data, &manifest, &models)?;
        Ok(Self {
            data,
            index: ArcSwap::from_pointee(snapshot),
            models,
            embed_slots: Semaphore::new(config.max_concurrent_embeds.max(1)),
        })
    }

    pub fn snapshot(&self) -> Arc<IndexSnapshot> {
        self.index.load_full()
    }

    /// Re-reads the manifest; swaps in a new snapshot if its generation moved.
    /// Returns the generation now served.
    pub fn reload(&self) -> Result<u64, anyhow::Error> {
        let manifest = self.data.load_manifest()?;
        let current = self.index.load();
        if manifest.generation == current.generation {
            return Ok(current.generation);
        }
        let snapshot = open_snapshot(&self.data, &manifest, &self.models)?;
        let generation = snapshot.generation;
        self.index.store(Arc::new(snapshot));
        tracing::info!(generation, "serving a new manifest generation");
        Ok(generation)
    }
}

/// Maps what `manifest` names, reads the catalogue attributes, loads the serving model's
/// encoder and starts reading the segments ahead: everything a snapshot needs before it may
/// serve.
fn open_snapshot(
    data: &DataDir,
    manifest: &Manifest,
    models: &ModelRegistry,
) -> Result<IndexSnapshot, anyhow::Error> {
    let mut snapshot = IndexSnapshot::open(data, manifest)?;
    snapshot.load_attrs(data, manifest)?;
    if let Some(v) = &snapshot.serving {
        models.get(v).map_err(|e| anyhow::anyhow!("cannot load serving model {v}: {e}"))?;
    }
    snapshot.warm();
    Ok(snapshot)
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
fn options(o: Option<proto::SearchOptions>) -> Result<(usize, usize), ServiceError> {
    let o = o.unwrap_or_default();
    let k = if o.k == 0 { DEFAULT_K } else { o.k };
    if k > MAX_K {
        return Err(ServiceError::InvalidArgument(format!("k = {k} is above the limit of {MAX_K}")));
    }
    if o.ef > MAX_EF {
        return Err(ServiceError::InvalidArgument(format!("ef = {} is above the limit of {MAX_EF}", o.ef)));
    }
    Ok((k as usize, o.ef as usize))
}

/// The answer, with each hit's catalogue attributes from `snapshot`.
fn response(
    snapshot: &IndexSnapshot,
    version: &ModelVersion,
    hits: Vec<ScoredSku>,
) -> Response<proto::SearchResponse> {
    let hit = |h: ScoredSku| proto::Hit {
        attrs: snapshot.attrs.get(&h.sku).and_then(attrs::to_struct),
        sku: h.sku.to_string(),
        score: h.score,
    };
    Response::new(proto::SearchResponse {
        model_version: version.to_string(),
        hits: hits.into_iter().map(hit).collect(),
    })
}

fn serving(snapshot: &IndexSnapshot) -> Result<Arc<ModelIndexView>, ServiceError> {
    snapshot.serving_index().cloned().ok_or(ServiceError::NoIndex)
}

#[tonic::async_trait]
impl VisualSearch for VisualSearchService {
    async fn search_by_image(
        &self,
        request: Request<proto::SearchByImageRequest>,
    ) -> Result<Response<proto::SearchResponse>, Status> {
        let req = request.into_inner();
        let (k, ef) = options(req.options)?;
        if req.image.is_empty() {
            return Err(ServiceError::InvalidArgument("image is empty".into()).into());
        }
        let snapshot = self.state.snapshot();
        let view = serving(&snapshot)?;
        let encoder = self.state.models.get(&view.version).map_err(ServiceError::from)?;
        let _permit = self
            .state
            .embed_slots
            .acquire()
            .await
            .map_err(|_| ServiceError::Internal("server is shutting down".into()))?;
        let result = tokio::task::spawn_blocking(move || -> Result<_, ServiceError> {
            let prepared = encoder.preprocess(&req.image)?;
            let mut emb = encoder.embed(std::slice::from_ref(&prepared))?;
            let q =
                emb.pop().ok_or_else(|| ServiceError::Internal("encoder returned no embedding".into()))?;
            let hits = view.search(&q, k, ef, None)?;
            Ok((view, hits))
        })
        .await
        .map_err(|e| ServiceError::Internal(format!("embedding task failed: {e}")))?;
        let (view, hits) = result?;
        Ok(response(&snapshot, &view.version, hits))
    }

    async fn search_by_vector(
        &self,
        request: Request<proto::SearchByVectorRequest>,
    ) -> Result<Response<proto::SearchResponse>, Status> {
        let req = request.into_inner();
        let (k, ef) = options(req.options)?;
        if req.model_version.is_empty() {
            return Err(ServiceError::InvalidArgument("model_version is required".into()).into());
        }
        let version =
            ModelVersion::new(req.model_version).map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        let snapshot = self.state.snapshot();
        let view = snapshot.model(&version).map_err(ServiceError::from)?;
        let hits = view.search(&req.vector, k, ef, None).map_err(ServiceError::from)?;
        Ok(response(&snapshot, &view.version, hits))
    }

    async fn search_by_sku(
        &self,
        request: Request<proto::SearchBySkuRequest>,
    ) -> Result<Response<proto::SearchResponse>, Status> {
        let req = request.into_inner();
        let (k, ef) = options(req.options)?;
        if req.sku.is_empty() {
            return Err(ServiceError::InvalidArgument("sku is required".into()).into());
        }
        let snapshot = self.state.snapshot();
        let view = serving(&snapshot)?;
        let q = view
            .vector_of(&req.sku)
            .ok_or_else(|| ServiceError::NotFound(format!("sku {:?} is not in the index", req.sku)))?
            .to_vec();
        let hits = view.search(&q, k, ef, Some(&req.sku)).map_err(ServiceError::from)?;
        Ok(response(&snapshot, &view.version, hits))
    }

    async fn get_index_info(
        &self,
        _request: Request<proto::GetIndexInfoRequest>,
    ) -> Result<Response<proto::IndexInfo>, Status> {
        let snapshot = self.state.snapshot();
        let mut models = Vec::new();
        for (version, view) in &snapshot.models {
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
                    .segments
                    .iter()
                    .map(|s| proto::SegmentInfo {
                        id: s.entry.id.0,
                        count: s.entry.count,
                        deleted: s.entry.deleted.len() as u64,
                        bytes: s.entry.bytes,
                    })
                    .collect(),
                serving: snapshot.serving.as_ref() == Some(version),
            });
        }
        Ok(Response::new(proto::IndexInfo {
            serving_model_version: snapshot.serving.as_ref().map(ToString::to_string).unwrap_or_default(),
            models,
            manifest_generation: snapshot.generation,
        }))
    }
}

/// Runs the server on `listener` until `shutdown` resolves.
pub async fn serve(
    config: ServeConfig,
    models: Arc<ModelRegistry>,
    listener: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), anyhow::Error> {
    let state = Arc::new(ServerState::open(&config, models)?);
    let addr: SocketAddr = listener.local_addr()?;
    let snapshot = state.snapshot();
    tracing::info!(
        %addr,
        generation = snapshot.generation,
        serving = snapshot.serving.as_ref().map(ToString::to_string).unwrap_or_else(|| "(none)".into()),
        "vitrine serving"
    );

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter.set_serving::<VisualSearchServer<VisualSearchService>>().await;
    // Reflection in both versions: older clients (grpcurl 1.8) only speak v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let watcher = config.reload_interval.map(|every| {
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let s = Arc::clone(&state);
                match tokio::task::spawn_blocking(move || s.reload()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!("manifest reload failed, still serving the old snapshot: {e:#}")
                    }
                    Err(e) => tracing::warn!("manifest reload task failed: {e}"),
                }
            }
        })
    });

    let service = VisualSearchServer::new(VisualSearchService::new(Arc::clone(&state)))
        .max_decoding_message_size(MAX_REQUEST_BYTES);
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    if let Some(w) = watcher {
        w.abort();
    }
    result?;
    tracing::info!("vitrine stopped");
    Ok(())
}

/// The architecture's name as model manifests spell it.
fn architecture_name(a: crate::encoder::Architecture) -> String {
    serde_json::to_value(a).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}
