//! The rollout controller: runs a canary rollout's side effects around the pure state machine
//! in `rollout::state`. It adds the challenger's index, backfills it from the stored images
//! in the background (through the index writer, resumable), evaluates the gate on the golden
//! set, routes image and SKU queries between the arms (sticky by routing key), shadows a
//! sample of queries on the other arm off the response path, feeds the guardrail window and
//! trips the breaker, and commits every transition (with its serving switch or index drop) in
//! one manifest commit. A restart resumes a backfill or a gate from the persisted state.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use tokio::sync::Semaphore;

use crate::ids::{ModelVersion, SkuId};
use crate::index::writer::AdminOp;
use crate::index::{LiveSet, ModelSpec, Query, VersionLive, WriteOp};
use crate::proto;
use crate::rollout::guardrail::{GuardrailConfig, Window};
use crate::rollout::metrics::{DEFAULT_RBO_P, GoldenResult, gate_figures, jaccard, rbo};
use crate::rollout::router::{Arm, Fraction, Router, sample};
use crate::rollout::state::{ArmFigures, Effect, Phase, Rollout, Settings, TransitionError};

use super::{ServerState, ServiceError, blocking};

/// Images per backfill batch on the CPU (small, so serving keeps the cores between batches);
/// on a GPU a whole forward pass, [`crate::encoder::GPU_FORWARD_BATCH`].
const BACKFILL_BATCH: usize = 16;
/// Hits compared per arm by the gate and the shadow.
const COMPARE_K: usize = 10;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// A golden query: image bytes and the SKUs it should find.
type GoldenQuery = (Vec<u8>, Vec<String>);

/// Backfill progress, kept in memory (a restart recounts it from the index).
#[derive(Debug, Default, Clone)]
struct Progress {
    done: u64,
    total: u64,
    embedded: u64,
    /// SKUs without a stored image (nothing to embed: vectors only).
    without_image: u64,
    /// Stored images that could not be read or embedded.
    failed: u64,
    started: Option<Instant>,
    /// When the backfill ended (the rate is over started..finished).
    finished: Option<Instant>,
}

/// What a backfill has to do: stored images in all, SKUs without one the challenger lacks,
/// and the (SKU, image sha256) pairs the challenger lacks.
struct BackfillPlan {
    total: u64,
    without_image: u64,
    todo: Vec<(SkuId, String)>,
}

/// The kind of query: latencies are only comparable within one kind (an image query embeds,
/// a SKU query does not), so each kind has its own guardrail window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Image = 0,
    Sku = 1,
}

/// Which version answers a query, and whether to shadow it on the other arm.
pub struct Route {
    pub primary: Arc<VersionLive>,
    pub arm: Arm,
    pub shadow: Option<Arc<VersionLive>>,
    /// Whether a canary takes traffic (the arm is then a label of the request metrics).
    pub canary: bool,
}

pub struct RolloutController {
    current: ArcSwapOption<Rollout>,
    /// Serialises transitions.
    transitions: tokio::sync::Mutex<()>,
    /// One window per query kind, while a canary takes traffic.
    windows: Mutex<Option<[Window; 2]>>,
    guardrail: GuardrailConfig,
    progress: Mutex<Progress>,
    shadow_slots: Arc<Semaphore>,
    data_dir: PathBuf,
    /// Tests: share of canary requests that fail on purpose.
    fault_rate: f64,
}

impl RolloutController {
    pub fn new(live: &LiveSet, data_dir: PathBuf, guardrail: GuardrailConfig, fault_rate: f64) -> Self {
        let current =
            live.rollout.as_ref().and_then(|v| match serde_json::from_value::<Rollout>(v.clone()) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    tracing::error!("the manifest's rollout state cannot be read ({e}); ignoring it");
                    None
                }
            });
        let windows =
            current.as_ref().filter(|r| r.phase == Phase::Canary).and_then(|_| new_windows(guardrail));
        Self {
            current: ArcSwapOption::new(current),
            transitions: tokio::sync::Mutex::new(()),
            windows: Mutex::new(windows),
            guardrail,
            progress: Mutex::new(Progress::default()),
            shadow_slots: Arc::new(Semaphore::new(1)),
            data_dir,
            fault_rate,
        }
    }

    pub fn current(&self) -> Option<Arc<Rollout>> {
        self.current.load_full()
    }

    fn golden_dir(&self) -> PathBuf {
        self.data_dir.join("golden")
    }

    /// Appends one line to the rollout log in the data directory (best effort).
    fn log(&self, event: &str, detail: serde_json::Value) {
        let line = serde_json::json!({"at_unix_ms": now_ms(), "event": event, "detail": detail});
        let path = self.data_dir.join("rollout.log");
        let res = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = res {
            tracing::warn!(path = %path.display(), "cannot append to the rollout log: {e}");
        }
    }

    /// The arm for an image or SKU query.
    pub fn route(&self, live: &LiveSet, key: &str) -> Result<Route, ServiceError> {
        let serving = live.serving_version().cloned().ok_or(ServiceError::NoIndex)?;
        let Some(r) = self.current().filter(|r| r.phase == Phase::Canary) else {
            return Ok(Route { primary: serving, arm: Arm::Champion, shadow: None, canary: false });
        };
        let (Ok(champion), Ok(canary)) = (live.version(&r.champion), live.version(&r.challenger)) else {
            return Ok(Route { primary: serving, arm: Arm::Champion, shadow: None, canary: false });
        };
        let router = Router::new(r.id);
        let fraction = Fraction::new(r.live_fraction()).unwrap_or(Fraction::ZERO);
        let key = (!key.is_empty()).then_some(key);
        let arm = router.route(key, fraction, rand_unit());
        let (primary, other) = match arm {
            Arm::Champion => (champion, canary),
            Arm::Canary => (canary, champion),
        };
        let shadow_share = Fraction::new(r.settings.shadow).unwrap_or(Fraction::ZERO);
        let shadow = sample(shadow_share, rand_unit()).then(|| Arc::clone(other));
        Ok(Route { primary: Arc::clone(primary), arm, shadow, canary: true })
    }

    /// Whether a canary request should fail (fault injection for tests).
    pub fn inject_fault(&self, arm: Arm) -> bool {
        arm == Arm::Canary && self.fault_rate > 0.0 && rand_unit() < self.fault_rate
    }

    /// Records one answered request; trips the breaker if a limit broke.
    pub fn observe(
        self: &Arc<Self>,
        state: &Arc<ServerState>,
        kind: Kind,
        arm: Arm,
        latency: Duration,
        ok: bool,
    ) {
        let trip = {
            let mut w = self.windows.lock();
            let Some(w) = w.as_mut() else { return };
            let w = &mut w[kind as usize];
            let now = now_ms();
            w.record_request(now, arm, latency.as_secs_f64() * 1e3, ok);
            w.check(now)
        };
        self.maybe_trip(state, trip);
    }

    fn maybe_trip(self: &Arc<Self>, state: &Arc<ServerState>, trip: Option<crate::rollout::guardrail::Trip>) {
        if let Some(t) = trip {
            let (this, state) = (Arc::clone(self), Arc::clone(state));
            tokio::spawn(async move {
                let res = this
                    .transition(&state, |r| {
                        r.trip(t.limit.as_str(), &t.reason, now_ms()).map(|()| Effect::None)
                    })
                    .await;
                match res {
                    Ok(_) => {
                        tracing::warn!(reason = %t.reason, "guardrail tripped: the canary is out of traffic")
                    }
                    Err(e) => tracing::debug!("breaker not applied: {}", crate::report::Chain(&e)),
                }
            });
        }
    }

    /// Runs `query` on the other arm off the response path and records the overlap of the two
    /// answers (its latency is not a served request's, so it does not enter the latency figures).
    pub fn shadow<F>(
        self: &Arc<Self>,
        state: &Arc<ServerState>,
        kind: Kind,
        primary_hits: Vec<String>,
        run: F,
    ) where
        F: FnOnce() -> Result<Vec<String>, ServiceError> + Send + 'static,
    {
        if state.closing() {
            return;
        }
        let Ok(permit) = Arc::clone(&self.shadow_slots).try_acquire_owned() else { return };
        let (this, state) = (Arc::clone(self), Arc::clone(state));
        tokio::spawn(async move {
            let result = tokio::task::spawn_blocking(run).await;
            drop(permit);
            match result {
                Ok(Ok(other)) => {
                    let (j, r) = (jaccard(&primary_hits, &other), rbo(&primary_hits, &other, DEFAULT_RBO_P));
                    let trip = this.windows.lock().as_mut().and_then(|w| {
                        let w = &mut w[kind as usize];
                        let now = now_ms();
                        w.record_shadow(now, j, r);
                        w.check(now)
                    });
                    this.maybe_trip(&state, trip);
                }
                Ok(Err(e)) => tracing::debug!("shadow query failed: {}", crate::report::Chain(&e)),
                Err(e) => tracing::warn!("shadow task failed: {e}"),
            }
        });
    }

    /// Applies one transition: the pure rule, then its effect and the new state in one
    /// manifest commit.
    async fn transition(
        &self,
        state: &ServerState,
        f: impl FnOnce(&mut Rollout) -> Result<Effect, TransitionError>,
    ) -> Result<Arc<Rollout>, ServiceError> {
        let _guard = self.transitions.lock().await;
        let mut r = (*self
            .current()
            .ok_or_else(|| ServiceError::FailedPrecondition("no rollout has been started".into()))?)
        .clone();
        let effect = f(&mut r).map_err(|e| match e {
            TransitionError::OutOfRange { .. } => ServiceError::InvalidArgument(e.to_string()),
            _ => ServiceError::FailedPrecondition(e.to_string()),
        })?;
        self.commit(state, r, effect).await
    }

    /// A [`transition`](Self::transition) of rollout `id` only: `Ok(false)`, and nothing
    /// changed, once a newer rollout has replaced it (an abort and a new start while this one's
    /// driver was still embedding or gating).
    async fn transition_of(
        &self,
        state: &ServerState,
        id: u64,
        f: impl FnOnce(&mut Rollout) -> Result<Effect, TransitionError>,
    ) -> Result<bool, ServiceError> {
        let res = self
            .transition(state, |r| if r.id == id { f(r) } else { Err(TransitionError::Superseded) })
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(_) if self.current().is_none_or(|c| c.id != id) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn commit(
        &self,
        state: &ServerState,
        r: Rollout,
        effect: Effect,
    ) -> Result<Arc<Rollout>, ServiceError> {
        let (serve, drop) = match &effect {
            Effect::None => (None, None),
            Effect::Serve(v) => (Some(v.clone()), None),
            Effect::Drop(v) => (None, Some(v.clone())),
        };
        let value = serde_json::to_value(&r).expect("rollout state serialises");
        state.writer().admin(AdminOp::SetRollout { state: Some(value.clone()), serve, drop }).await?;
        if r.phase == Phase::Canary {
            let mut w = self.windows.lock();
            if w.is_none() {
                *w = new_windows(self.guardrail);
            }
        } else {
            *self.windows.lock() = None;
        }
        self.log(r.phase.as_str(), value);
        let r = Arc::new(r);
        self.current.store(Some(Arc::clone(&r)));
        Ok(r)
    }

    /// Starts a rollout of `req.model_version`; the backfill and gate run in the background.
    pub async fn start(
        self: &Arc<Self>,
        state: &Arc<ServerState>,
        mut req: proto::RolloutStartRequest,
    ) -> Result<(), ServiceError> {
        let challenger = ModelVersion::new(req.model_version.clone())
            .map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        let settings = Settings {
            fraction: req.fraction.unwrap_or(Settings::default().fraction),
            shadow: req.shadow.unwrap_or(Settings::default().shadow),
            tolerance: req.tolerance.unwrap_or(Settings::default().tolerance),
            force: req.force,
            backfill_throttle_ms: req.backfill_throttle_ms,
        };
        settings.validate().map_err(|e| ServiceError::InvalidArgument(e.to_string()))?;
        let live = state.live();
        let champion = live.serving.clone().ok_or(ServiceError::NoIndex)?;
        let enc = state.models.get(&challenger).map_err(|e| {
            ServiceError::InvalidArgument(format!(
                "cannot load model {challenger}: {}",
                crate::report::Chain(&e)
            ))
        })?;
        if req.golden.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "a rollout needs a golden set for its gate (vitrine rollout start --golden FILE)".into(),
            ));
        }
        // Every golden image must decode, or the gate would count it as found by neither arm.
        let golden = Arc::new(std::mem::take(&mut req.golden));
        let (check, check_enc) = (Arc::clone(&golden), Arc::clone(&enc));
        blocking("golden", move || {
            for (i, q) in check.iter().enumerate() {
                if let Err(e) = check_enc.preprocess(&q.image) {
                    return Err(ServiceError::InvalidArgument(format!(
                        "golden query {} ({}): its image cannot be read: {}",
                        i + 1,
                        q.name,
                        crate::report::Chain(&e)
                    )));
                }
            }
            Ok(())
        })
        .await??;
        let _guard = self.transitions.lock().await;
        let current = self.current();
        // Unique per start: a driver of an earlier rollout (of the same model, say) still
        // running stops when it sees another id.
        let id = now_ms().max(current.as_ref().map_or(0, |c| c.id + 1));
        let rollout = Rollout::start(current.as_deref(), id, champion, challenger.clone(), settings)
            .map_err(|e| ServiceError::FailedPrecondition(e.to_string()))?;
        *self.progress.lock() = Progress::default();
        self.store_golden(&golden)?;
        let spec =
            ModelSpec { version: challenger, dim: enc.dim(), weights_sha256: enc.manifest().sha256.clone() };
        state.writer().admin(AdminOp::AddVersion(spec)).await?;
        self.commit(state, rollout, Effect::None).await?;
        drop(_guard);
        self.spawn_driver(state);
        Ok(())
    }

    /// Keeps the golden set in the data directory (for a restart mid-gate and later runs).
    fn store_golden(&self, golden: &[proto::GoldenQuery]) -> Result<(), ServiceError> {
        let dir = self.golden_dir();
        let io = |e: std::io::Error| {
            ServiceError::Internal(format!("cannot store the golden set in {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let mut index = String::new();
        for (i, q) in golden.iter().enumerate() {
            if q.image.is_empty() || q.expected.is_empty() {
                return Err(ServiceError::InvalidArgument(format!(
                    "golden query {i} ({}) needs an image and at least one expected SKU",
                    q.name
                )));
            }
            let file = format!("q{i:05}.img");
            crate::fsutil::atomic_write(&dir.join(&file), &q.image).map_err(io)?;
            let line = serde_json::json!({"image": file, "expected": q.expected, "name": q.name});
            index.push_str(&format!("{line}\n"));
        }
        crate::fsutil::atomic_write(&dir.join("golden.jsonl"), index.as_bytes()).map_err(io)
    }

    fn load_golden(&self) -> Result<Vec<GoldenQuery>, ServiceError> {
        let dir = self.golden_dir();
        let text = match std::fs::read_to_string(dir.join("golden.jsonl")) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(ServiceError::Internal(format!("cannot read the golden set: {e}"))),
        };
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| ServiceError::Internal(format!("golden.jsonl line {}: {e}", i + 1)))?;
            let image = std::fs::read(dir.join(v["image"].as_str().unwrap_or_default()))
                .map_err(|e| ServiceError::Internal(format!("golden.jsonl line {}: {e}", i + 1)))?;
            let expected = v["expected"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            out.push((image, expected));
        }
        Ok(out)
    }

    /// Continues a rollout that needs background work (after a start or a restart).
    pub fn spawn_driver(self: &Arc<Self>, state: &Arc<ServerState>) {
        let (this, state) = (Arc::clone(self), Arc::clone(state));
        tokio::spawn(async move {
            if let Err(e) = this.drive(&state).await {
                let e = crate::report::chain(&e);
                tracing::error!("rollout stopped: {e}");
                this.log("error", serde_json::json!({"error": e}));
            }
        });
    }

    async fn drive(self: &Arc<Self>, state: &Arc<ServerState>) -> Result<(), ServiceError> {
        loop {
            let Some(r) = self.current() else { return Ok(()) };
            match r.phase {
                Phase::Backfilling => {
                    if !self.backfill(state, &r).await?
                        || !self.transition_of(state, r.id, |r| r.backfilled().map(|()| Effect::None)).await?
                    {
                        return Ok(());
                    }
                }
                Phase::Gating => {
                    let (champion, challenger) = self.gate(state, &r).await?;
                    let gated = |r: &mut Rollout| r.gated(champion, challenger).map(|()| Effect::None);
                    if !self.transition_of(state, r.id, gated).await? {
                        return Ok(());
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    /// Embeds every stored image the challenger lacks; false if the rollout was stopped.
    async fn backfill(&self, state: &Arc<ServerState>, r: &Rollout) -> Result<bool, ServiceError> {
        let version = r.challenger.clone();
        let writer = Arc::clone(state.writer());
        let todo = {
            let writer = Arc::clone(&writer);
            let version = version.clone();
            blocking("backfill", move || -> Result<BackfillPlan, ServiceError> {
                let live = writer.live();
                let view = live.version(&version).map_err(ServiceError::from)?;
                let (mut total, mut without_image) = (0u64, 0u64);
                let mut todo = Vec::new();
                writer.for_each_record(|sku, rec| match &rec.image_sha256 {
                    Some(sha) => {
                        total += 1;
                        if !view.holds(sku.as_str()) {
                            todo.push((sku.clone(), sha.clone()));
                        }
                    }
                    None if !view.holds(sku.as_str()) => without_image += 1,
                    None => {}
                })?;
                Ok(BackfillPlan { total, without_image, todo })
            })
            .await??
        };
        let BackfillPlan { total, without_image, todo } = todo;
        if without_image > 0 {
            tracing::warn!(
                %version, without_image,
                "SKUs without a stored image (upserted as vectors only) cannot be backfilled: the challenger \
                 lacks them until they are upserted with an image or a vector for it, and a promotion refuses \
                 unless forced"
            );
        }
        *self.progress.lock() = Progress {
            done: total - todo.len() as u64,
            total,
            embedded: 0,
            without_image,
            failed: 0,
            started: Some(Instant::now()),
            finished: None,
        };
        let batch_size =
            if state.models.device().is_cpu() { BACKFILL_BATCH } else { crate::encoder::GPU_FORWARD_BATCH };
        tracing::info!(%version, total, todo = todo.len(), batch_size, "backfilling");
        for batch in todo.chunks(batch_size) {
            if state.closing() || self.current().is_none_or(|c| c.id != r.id || c.phase != Phase::Backfilling)
            {
                return Ok(false);
            }
            let read: Vec<Result<Vec<u8>, String>> = {
                let writer = Arc::clone(&writer);
                let shas: Vec<String> = batch.iter().map(|(_, s)| s.clone()).collect();
                blocking("backfill", move || {
                    shas.iter()
                        .map(|s| writer.data().read_blob(s).map_err(|e| crate::report::chain(&e)))
                        .collect()
                })
                .await?
            };
            let mut items = Vec::with_capacity(batch.len());
            let mut images = Vec::with_capacity(batch.len());
            for ((sku, sha), bytes) in batch.iter().zip(read) {
                match bytes {
                    Ok(b) => {
                        items.push((sku, sha));
                        images.push(b);
                    }
                    Err(e) => {
                        self.progress.lock().failed += 1;
                        tracing::warn!(%sku, "backfill cannot read the stored image: {e}");
                    }
                }
            }
            // The same embedding path as upserts: one of the server's embed slots, blocking pool.
            let vectors = state.embed(images, vec![version.clone()], true).await?;
            let mut ops = Vec::with_capacity(items.len());
            for ((sku, sha), v) in items.into_iter().zip(vectors) {
                match v.map(|mut per_version| per_version.pop()) {
                    Ok(Some((_, vector))) => ops.push(WriteOp::Backfill {
                        sku: sku.clone(),
                        version: version.clone(),
                        image_sha256: sha.clone(),
                        vector,
                    }),
                    Ok(None) => {}
                    Err(e) => {
                        self.progress.lock().failed += 1;
                        tracing::warn!(%sku, "backfill cannot embed the stored image: {e}");
                    }
                }
            }
            let n = ops.len() as u64;
            writer.write(ops).await?;
            if self.current().is_none_or(|c| c.id != r.id) {
                return Ok(false);
            }
            {
                let mut p = self.progress.lock();
                p.done += batch.len() as u64;
                p.embedded += n;
            }
            // From the persisted settings, so a backfill resumed after a restart keeps it.
            let pause = Duration::from_millis(u64::from(r.settings.backfill_throttle_ms));
            if !pause.is_zero() {
                tokio::time::sleep(pause).await;
            }
        }
        self.progress.lock().finished = Some(Instant::now());
        Ok(true)
    }

    /// Both arms answer every golden query through the normal search path.
    async fn gate(
        &self,
        state: &Arc<ServerState>,
        r: &Rollout,
    ) -> Result<(ArmFigures, ArmFigures), ServiceError> {
        let golden = self.load_golden()?;
        let mut figures = Vec::new();
        for version in [&r.champion, &r.challenger] {
            let enc = state.models.get(version).map_err(ServiceError::from)?;
            let view = state.live().version(version).map_err(ServiceError::from)?.clone();
            let golden = golden.clone();
            let attrs_state = Arc::clone(state);
            let results = blocking("gate", move || -> Vec<(Vec<String>, Vec<String>)> {
                golden
                    .into_iter()
                    .map(|(image, expected)| {
                        let hits = enc
                            .preprocess(&image)
                            .ok()
                            .and_then(|p| enc.embed_one(&p).ok())
                            .and_then(|q| {
                                let query =
                                    Query { vector: &q, k: COMPARE_K, ef: 0, exclude: None, filter: None };
                                view.search(&query, attrs_state.writer().attrs()).ok()
                            })
                            .map(|h| h.into_iter().map(|s| s.sku.to_string()).collect())
                            .unwrap_or_default();
                        (hits, expected)
                    })
                    .collect()
            })
            .await?;
            let golden_results: Vec<GoldenResult<'_>> =
                results.iter().map(|(hits, expected)| GoldenResult { hits, expected }).collect();
            let f = gate_figures(&golden_results);
            figures.push(ArmFigures { queries: f.queries, recall_at_10: f.recall_at_10, mrr: f.mrr });
        }
        tracing::info!(champion = ?figures[0], challenger = ?figures[1], "gate evaluated");
        Ok((figures[0], figures[1]))
    }

    pub async fn set(&self, state: &ServerState, fraction: f64) -> Result<(), ServiceError> {
        self.transition(state, |r| r.set_fraction(fraction).map(|()| Effect::None)).await.map(|_| ())
    }

    /// Promotes the challenger, refused while it lacks SKUs the champion serves unless `force`.
    pub async fn promote(&self, state: &ServerState, force: bool) -> Result<(), ServiceError> {
        if !force && let Some(r) = self.current().filter(|r| r.phase == Phase::Canary) {
            let (missing, examples) = uncovered(state, &r.champion, &r.challenger).await?;
            if missing > 0 {
                return Err(ServiceError::FailedPrecondition(format!(
                    "{} lacks {missing} SKU(s) that {} serves (e.g. {}): upserted as vectors only, or their \
                     stored image could not be embedded (see the server log), so a promotion would drop them \
                     from search. Upsert them with an image (or a vector for {}), or promote with --force",
                    r.challenger,
                    r.champion,
                    examples.join(", "),
                    r.challenger,
                )));
            }
        }
        self.act(state, "promote").await
    }

    pub async fn act(&self, state: &ServerState, action: &str) -> Result<(), ServiceError> {
        let r = self
            .transition(state, |r| match action {
                "promote" => r.promote(),
                "rollback" => r.rollback(),
                "abort" => r.abort(),
                _ => r.gc(),
            })
            .await?;
        tracing::info!(action, phase = r.phase.as_str(), "rollout");
        Ok(())
    }

    /// The status message.
    pub fn status(&self, live: &LiveSet) -> proto::RolloutStatus {
        let serving = live.serving.as_ref().map(ToString::to_string).unwrap_or_default();
        let Some(r) = self.current() else {
            return proto::RolloutStatus { state: "none".into(), serving, ..Default::default() };
        };
        let p = self.progress.lock().clone();
        let mut backfill = proto::BackfillStatus {
            done: p.done,
            total: p.total,
            embedded: p.embedded,
            without_image: p.without_image,
            failed: p.failed,
            ..Default::default()
        };
        if r.phase != Phase::Backfilling && p.total == 0 {
            // After a restart past the backfill: it is complete.
            let n = live.version(&r.challenger).map_or(0, |v| v.live_items());
            backfill.done = n;
            backfill.total = n;
        }
        if let Some(started) = p.started {
            let secs =
                p.finished.unwrap_or_else(Instant::now).duration_since(started).as_secs_f64().max(1e-3);
            backfill.images_per_second = p.embedded as f64 / secs;
            if backfill.images_per_second > 0.0 {
                backfill.eta_seconds = (p.total - p.done.min(p.total)) as f64 / backfill.images_per_second;
            }
        }
        let gate = r.gate.as_ref().map_or_else(proto::GateStatus::default, |g| proto::GateStatus {
            evaluated: true,
            champion: Some(arm_gate(&g.champion)),
            challenger: Some(arm_gate(&g.challenger)),
            passed: g.passed,
            forced: g.forced,
        });
        // The kind with more canary traffic is shown; shadow counts cover both.
        let (stats, compared) = {
            let w = self.windows.lock();
            match w.as_ref() {
                None => (None, 0),
                Some(w) => {
                    let snaps = [w[0].snapshot(now_ms()), w[1].snapshot(now_ms())];
                    let compared = snaps[0].shadow.count + snaps[1].shadow.count;
                    let busiest = if snaps[0].canary.requests >= snaps[1].canary.requests { 0 } else { 1 };
                    let [a, b] = snaps;
                    (Some(if busiest == 0 { a } else { b }), compared)
                }
            }
        };
        let arm_live = |a: &crate::rollout::guardrail::ArmStats| proto::ArmLive {
            requests: a.requests,
            errors: a.errors,
            p50_ms: a.p50_ms.unwrap_or(0.0),
            p99_ms: a.p99_ms.unwrap_or(0.0),
        };
        let shadow = proto::ShadowStatus {
            shadow_fraction: r.settings.shadow,
            compared,
            mean_jaccard: stats.as_ref().and_then(|s| s.shadow.mean_jaccard).unwrap_or(0.0),
            mean_rbo: stats.as_ref().and_then(|s| s.shadow.mean_rbo).unwrap_or(0.0),
            champion: stats.as_ref().map(|s| arm_live(&s.champion)),
            canary: stats.as_ref().map(|s| arm_live(&s.canary)),
            window_seconds: self.guardrail.window_ms as f64 / 1e3,
        };
        let guardrail = proto::GuardrailStatus {
            tripped: r.breaker.is_some(),
            limit: r.breaker.as_ref().map(|b| b.limit.clone()).unwrap_or_default(),
            reason: r.breaker.as_ref().map(|b| b.reason.clone()).unwrap_or_default(),
            at_unix_ms: r.breaker.as_ref().map_or(0, |b| b.at_unix_ms),
            max_canary_error_rate: self.guardrail.max_canary_error_rate,
            max_p99_ratio: self.guardrail.max_p99_ratio,
            min_shadow_overlap: self.guardrail.min_shadow_overlap,
        };
        proto::RolloutStatus {
            state: r.phase.as_str().into(),
            champion: r.champion.to_string(),
            challenger: r.challenger.to_string(),
            fraction: r.live_fraction(),
            backfill: Some(backfill),
            gate: Some(gate),
            shadow: Some(shadow),
            guardrail: Some(guardrail),
            serving,
            retired: r.retired.as_ref().map(ToString::to_string).unwrap_or_default(),
            collected: r.collected,
        }
    }
}

fn new_windows(cfg: GuardrailConfig) -> Option<[Window; 2]> {
    Some([Window::new(cfg).ok()?, Window::new(cfg).ok()?])
}

/// How many SKUs `champion` holds a live vector of and `challenger` does not, and up to five
/// of them: what a promotion would drop from search. O(catalogue), on the blocking pool.
async fn uncovered(
    state: &ServerState,
    champion: &ModelVersion,
    challenger: &ModelVersion,
) -> Result<(u64, Vec<String>), ServiceError> {
    let writer = Arc::clone(state.writer());
    let (champion, challenger) = (champion.clone(), challenger.clone());
    blocking("promote", move || -> Result<(u64, Vec<String>), ServiceError> {
        let live = writer.live();
        let old = live.version(&champion).map_err(ServiceError::from)?;
        let new = live.version(&challenger).map_err(ServiceError::from)?;
        let (mut missing, mut examples) = (0u64, Vec::new());
        writer.for_each_record(|sku, _| {
            if old.holds(sku.as_str()) && !new.holds(sku.as_str()) {
                missing += 1;
                if examples.len() < 5 {
                    examples.push(sku.to_string());
                }
            }
        })?;
        Ok((missing, examples))
    })
    .await?
}

fn arm_gate(f: &ArmFigures) -> proto::ArmGate {
    proto::ArmGate { queries: f.queries as u64, recall_at_10: f.recall_at_10, mrr: f.mrr }
}

/// A uniform draw in [0, 1) from a thread-local xorshift seeded by the clock and thread.
fn rand_unit() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
            let addr = &t as *const u64 as u64;
            (t ^ addr.rotate_left(32)) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}
