//! Canary rollouts end to end on the real server with real models: a degraded challenger is
//! refused by the gate and aborted; EfficientNet-Lite2 is backfilled, gated,
//! split sticky by routing key, shadowed, promoted, rolled back and collected, with writes
//! reaching both versions throughout; a failing canary is taken out of traffic by the
//! guardrail, with the reason in the status.

use crate::common::Server;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tonic::Code;
use tonic::transport::Channel;
use vitrine::ingest::{IngestOptions, ingest};
use vitrine::models::{DEFAULT_MODEL, ModelRegistry};
use vitrine::proto::rollouts_client::RolloutsClient;
use vitrine::proto::visual_search_client::VisualSearchClient;
use vitrine::proto::{self, SearchOptions};
use vitrine::rollout::guardrail::GuardrailConfig;
use vitrine::server::ServeConfig;

const GEM: &str = "efficientnet-lite0-gem";
const LITE2: &str = "efficientnet-lite2";
const DEGRADED: &str = "degraded-lite0";
/// Catalogue rows used (a subset keeps the backfills short in the debug test profile).
const ROWS: usize = 60;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// A models folder with Lite0, Lite2, Lite0-GeM and a deliberately degraded Lite0 (32-pixel inputs
/// shifted so far that most activations die: the same weights, poor embeddings).
fn models_dir(root: &Path) -> PathBuf {
    let dir = root.join("models");
    for v in [DEFAULT_MODEL, GEM, LITE2] {
        copy_dir(&repo().join("models").join(v), &dir.join(v));
    }
    let degraded = dir.join(DEGRADED);
    copy_dir(&repo().join("models").join(DEFAULT_MODEL), &degraded);
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(degraded.join("manifest.json")).unwrap()).unwrap();
    m["version"] = DEGRADED.into();
    m["name"] = "Lite0 with broken normalisation (test only)".into();
    m["normalisation"] = serde_json::json!({"mean": 255.0, "std": 1.0});
    m["input_size"] = 32.into();
    std::fs::write(degraded.join("manifest.json"), m.to_string()).unwrap();
    dir
}

/// The first ROWS catalogue rows, and the golden queries that expect one of them.
fn subset(root: &Path) -> (PathBuf, Vec<proto::GoldenQuery>) {
    let text = std::fs::read_to_string(repo().join("data/catalog.jsonl")).unwrap();
    let mut skus = std::collections::HashSet::new();
    let mut rows = String::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()).take(ROWS) {
        let mut v: serde_json::Value = serde_json::from_str(line).unwrap();
        skus.insert(v["sku"].as_str().unwrap().to_string());
        let abs = repo().join("data").join(v["image"].as_str().unwrap());
        v["image"] = abs.display().to_string().into();
        rows.push_str(&format!("{v}\n"));
    }
    let catalog = root.join("catalog.jsonl");
    std::fs::write(&catalog, rows).unwrap();
    let golden_text = std::fs::read_to_string(repo().join("data/golden.jsonl")).unwrap();
    let golden = golden_text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let expected: Vec<String> =
                v["expected"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
            expected.iter().any(|e| skus.contains(e)).then(|| proto::GoldenQuery {
                image: std::fs::read(repo().join("data").join(v["image"].as_str().unwrap())).unwrap(),
                expected,
                name: v["image"].as_str().unwrap().to_string(),
            })
        })
        .collect();
    (catalog, golden)
}

/// Polls the status until the rollout leaves `backfilling`/`gating`.
async fn settle(r: &mut RolloutsClient<Channel>) -> proto::RolloutStatus {
    for _ in 0..1200 {
        let s = r.status(proto::RolloutActionRequest::default()).await.unwrap().into_inner();
        if s.state != "backfilling" && s.state != "gating" {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("the rollout never finished its backfill and gate");
}

fn start_request(model: &str, golden: &[proto::GoldenQuery]) -> proto::RolloutStartRequest {
    proto::RolloutStartRequest {
        model_version: model.into(),
        fraction: Some(0.5),
        shadow: Some(1.0),
        tolerance: None,
        force: false,
        golden: golden.to_vec(),
        backfill_throttle_ms: 0,
    }
}

async fn versions_of(c: &mut VisualSearchClient<Channel>, sku: &str) -> Vec<String> {
    let got = c.get(proto::GetRequest { skus: vec![sku.into()] }).await.unwrap().into_inner();
    got.records.first().map(|r| r.model_versions.clone()).unwrap_or_default()
}

async fn upsert_image(c: &mut VisualSearchClient<Channel>, sku: &str, path: &Path) {
    c.upsert(proto::UpsertRequest {
        sku: sku.into(),
        attrs: None,
        payload: Some(proto::upsert_request::Payload::Image(std::fs::read(path).unwrap())),
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_rollout_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let models =
        Arc::new(ModelRegistry::new(models_dir(tmp.path()), vitrine::encoder::default_device().unwrap()));
    let data = tmp.path().join("data");
    let (catalog, golden) = subset(tmp.path());
    assert!(golden.len() >= 15, "golden queries for the subset: {}", golden.len());
    let opts = IngestOptions {
        format: None,
        batch_size: 16,
        hnsw: vitrine::segment::HnswParams::default(),
        progress: false,
        default_model: vitrine::ids::ModelVersion::new(DEFAULT_MODEL).unwrap(),
        max_segment_items: 32,
        // The subset catalogue in a temp dir names the repository's images.
        image_roots: vec![repo().join("data")],
        max_image_bytes: vitrine::ingest::image_file::DEFAULT_MAX_IMAGE_BYTES,
    };
    assert_eq!(ingest(&data, &models, &catalog, &opts).unwrap().added, ROWS);

    // Lite0 and Lite2 legitimately rank this 60-item catalogue differently (mean top-5 Jaccard
    // about 0.25): the shadow-overlap guardrail (unit-tested in src/rollout/guardrail.rs) would
    // roll the canary back in the middle of this walk through the rollout's states.
    let mut config = ServeConfig::new(&data);
    config.guardrail = GuardrailConfig { min_shadow_overlap: 0.0, ..GuardrailConfig::default() };
    let mut server = Server::start(config, Arc::clone(&models)).await;
    let channel = server.channel().await;
    let mut c = VisualSearchClient::new(channel.clone());
    let mut r = RolloutsClient::new(channel.clone()).max_encoding_message_size(64 << 20);
    assert_eq!(r.status(proto::RolloutActionRequest::default()).await.unwrap().into_inner().state, "none");

    // 1. A degraded challenger: backfilled, then refused by the gate; it never serves.
    r.start(start_request(DEGRADED, &golden)).await.unwrap();
    let s = settle(&mut r).await;
    let gate = s.gate.unwrap();
    let (champ, chall) = (gate.champion.unwrap(), gate.challenger.unwrap());
    println!("gate, degraded challenger: champion {champ:?}, challenger {chall:?}");
    assert_eq!(s.state, "refused", "{s:?}");
    assert!(!gate.passed && !gate.forced);
    assert!(chall.recall_at_10 < champ.recall_at_10 - 0.01);
    assert_eq!(s.backfill.unwrap().done, ROWS as u64);
    let err = r.set(proto::RolloutSetRequest { fraction: 0.5 }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    let resp = c
        .search_by_sku(proto::SearchBySkuRequest {
            sku: "SKIMG-COFFEE".into(),
            routing_key: "k".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.model_version, DEFAULT_MODEL, "a refused challenger serves nothing");
    let s = r.abort(proto::RolloutActionRequest::default()).await.unwrap().into_inner();
    assert_eq!(s.state, "aborted");
    assert!(!data.join("indexes").join(DEGRADED).exists());

    // 2. The real challenger: backfilled, gated, then half the traffic, sticky per key.
    let s = r.start(start_request(LITE2, &golden)).await.unwrap().into_inner();
    assert_eq!(s.state, "backfilling");
    // A write during the backfill reaches both versions.
    upsert_image(&mut c, "NEW-DURING-BACKFILL", &repo().join("data/bad/ok-1.png")).await;
    let s = settle(&mut r).await;
    let gate = s.gate.unwrap();
    println!("gate, {LITE2}: champion {:?}, challenger {:?}", gate.champion, gate.challenger);
    if s.state == "refused" {
        // The gate is the judge of whether GeM helps; let the test go on regardless.
        let forced = r.start(start_request(LITE2, &golden)).await;
        assert!(forced.is_err(), "a refused rollout must be aborted first");
        r.abort(proto::RolloutActionRequest::default()).await.unwrap();
        let mut req = start_request(LITE2, &golden);
        req.force = true;
        r.start(req).await.unwrap();
        let s = settle(&mut r).await;
        assert!(s.gate.unwrap().forced);
    }
    assert_eq!(
        versions_of(&mut c, "NEW-DURING-BACKFILL").await,
        vec![DEFAULT_MODEL.to_string(), LITE2.to_string()]
    );
    let mut arms = std::collections::HashMap::new();
    for k in 0..40 {
        let key = format!("shopper-{k}");
        let mut seen = Vec::new();
        for _ in 0..2 {
            let resp = c
                .search_by_sku(proto::SearchBySkuRequest {
                    sku: "SKIMG-COFFEE".into(),
                    options: Some(SearchOptions { k: 5, ..Default::default() }),
                    routing_key: key.clone(),
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(resp.hits.len(), 5);
            seen.push(resp.model_version);
        }
        assert_eq!(seen[0], seen[1], "key {key} switched arms");
        *arms.entry(seen[0].clone()).or_insert(0) += 1;
    }
    println!("arms at fraction 0.5: {arms:?}");
    assert!(arms.get(LITE2).copied().unwrap_or(0) >= 8 && arms.get(DEFAULT_MODEL).copied().unwrap_or(0) >= 8);
    // The metrics split the canary's requests by arm and model version; the backfill is done.
    let by_arm = server.metric("vitrine_requests_total{rpc=\"SearchBySku\",code=\"OK\"").await;
    println!("requests by arm: {by_arm:?}");
    let count = |v: &str, arm: &str| {
        let series = format!(
            "vitrine_requests_total{{rpc=\"SearchBySku\",code=\"OK\",model_version=\"{v}\",arm=\"{arm}\"}}"
        );
        by_arm.iter().find(|(s, _)| *s == series).map_or(0.0, |(_, n)| *n)
    };
    assert_eq!(count(LITE2, "challenger"), 2.0 * arms[LITE2] as f64, "{by_arm:?}");
    assert_eq!(count(DEFAULT_MODEL, "champion"), 2.0 * arms[DEFAULT_MODEL] as f64, "{by_arm:?}");
    let done = server.metric("vitrine_rollout_backfill_done").await;
    let total = server.metric("vitrine_rollout_backfill_total").await;
    assert_eq!(done, [(format!("vitrine_rollout_backfill_done{{challenger=\"{LITE2}\"}}"), ROWS as f64)]);
    assert_eq!(done[0].1, total[0].1);
    let image = std::fs::read(repo().join("data/queries/coffee-crop-rotated.jpg")).unwrap();
    for k in 0..6 {
        c.search_by_image(proto::SearchByImageRequest {
            image: image.clone(),
            routing_key: format!("img-{k}"),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    // Shadow queries run off the response path: wait for the first to be recorded (polling,
    // not a fixed sleep, so a slow machine does not fail the test).
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let s = loop {
        let s = r.status(proto::RolloutActionRequest::default()).await.unwrap().into_inner();
        if s.shadow.as_ref().is_some_and(|sh| sh.compared > 0) || std::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let shadow = s.shadow.unwrap();
    assert!(shadow.compared > 0, "shadow comparisons ran: {s:?}");
    assert!(shadow.mean_jaccard > 0.0 && shadow.mean_rbo > 0.0);

    // 3. Promote: refused while the challenger lacks a SKU the champion serves (a vector for
    // the champion only: nothing to backfill from), then forced; the challenger serves and
    // the old champion keeps receiving writes.
    let values: Vec<f32> = (0..1280).map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0).collect();
    c.upsert(proto::UpsertRequest {
        sku: "VECTOR-ONLY".into(),
        attrs: None,
        payload: Some(proto::upsert_request::Payload::Vector(proto::VectorPayload {
            model_version: DEFAULT_MODEL.into(),
            values,
        })),
    })
    .await
    .unwrap();
    let refused = r.promote(proto::RolloutActionRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("lacks 1 SKU") && refused.message().contains("VECTOR-ONLY"),
        "{}",
        refused.message()
    );
    let s = r.status(proto::RolloutActionRequest::default()).await.unwrap().into_inner();
    assert_eq!(s.state, "canary", "a refused promotion changes nothing");
    let s = r.promote(proto::RolloutActionRequest { force: true }).await.unwrap().into_inner();
    assert_eq!(
        (s.state.as_str(), s.serving.as_str(), s.retired.as_str()),
        ("promoted", LITE2, DEFAULT_MODEL)
    );
    let resp = c
        .search_by_sku(proto::SearchBySkuRequest {
            sku: "SKIMG-COFFEE".into(),
            routing_key: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.model_version, LITE2);
    upsert_image(&mut c, "NEW-AFTER-PROMOTE", &repo().join("data/bad/ok-2.jpg")).await;
    assert_eq!(versions_of(&mut c, "NEW-AFTER-PROMOTE").await.len(), 2);

    // 4. Roll back, then collect the loser; the state survives a restart.
    let s = r.rollback(proto::RolloutActionRequest::default()).await.unwrap().into_inner();
    assert_eq!((s.state.as_str(), s.serving.as_str()), ("rolled_back", DEFAULT_MODEL));
    drop((c, r));
    server.stop().await;
    let mut server = Server::start(ServeConfig::new(&data), Arc::clone(&models)).await;
    let channel = server.channel().await;
    let mut c = VisualSearchClient::new(channel.clone());
    let mut r = RolloutsClient::new(channel);
    let s = r.status(proto::RolloutActionRequest::default()).await.unwrap().into_inner();
    assert_eq!((s.state.as_str(), s.serving.as_str()), ("rolled_back", DEFAULT_MODEL));
    let s = r.gc(proto::RolloutActionRequest::default()).await.unwrap().into_inner();
    assert!(s.collected);
    assert!(!data.join("indexes").join(LITE2).exists());
    assert_eq!(versions_of(&mut c, "NEW-AFTER-PROMOTE").await, vec![DEFAULT_MODEL.to_string()]);
    drop((c, r));
    server.stop().await;

    // 5. A canary that fails is taken out of traffic by the guardrail, with the reason.
    let mut config = ServeConfig::new(&data);
    config.canary_fault_rate = 1.0;
    config.guardrail = GuardrailConfig { min_requests: 5, ..GuardrailConfig::default() };
    let mut server = Server::start(config, Arc::clone(&models)).await;
    let channel = server.channel().await;
    let mut c = VisualSearchClient::new(channel.clone());
    let mut r = RolloutsClient::new(channel).max_encoding_message_size(64 << 20);
    let mut req = start_request(GEM, &golden);
    req.fraction = Some(1.0);
    req.force = true;
    req.tolerance = Some(1.0);
    r.start(req).await.unwrap();
    assert_eq!(settle(&mut r).await.state, "canary");
    let mut failures = 0;
    for k in 0..40 {
        let res = c
            .search_by_sku(proto::SearchBySkuRequest {
                sku: "SKIMG-COFFEE".into(),
                routing_key: format!("g{k}"),
                ..Default::default()
            })
            .await;
        if res.is_err() {
            failures += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = r.status(proto::RolloutActionRequest::default()).await.unwrap().into_inner();
    let g = s.guardrail.clone().unwrap();
    println!("guardrail: {failures} failed requests before the trip; reason: {}", g.reason);
    assert_eq!(s.state, "rolled_back", "{s:?}");
    assert!(g.tripped && g.limit == "error_rate" && g.reason.contains("error rate"), "{g:?}");
    assert!(failures < 40, "after the trip the champion answers");
    let resp = c
        .search_by_sku(proto::SearchBySkuRequest {
            sku: "SKIMG-COFFEE".into(),
            routing_key: "g0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.model_version, DEFAULT_MODEL);
    drop((c, r));
    server.stop().await;
}
