//! Damage found before serving: a segment with any damaged byte (every header field, every
//! section, the footer) is left out and the rest serves; damaged records and a model whose
//! weights differ from the index's make the server degraded (writes refused, reported by
//! `GetIndexInfo` and the `vitrine.integrity` health service); `verify` finds a lost manifest.

use crate::common::{self, Server};

use std::path::{Path, PathBuf};
use std::process::Command;

use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use vitrine::ids::{ModelVersion, SkuId};
use vitrine::index::manifest::Manifest;
use vitrine::index::merge_policy::MergePolicy;
use vitrine::index::store::DataDir;
use vitrine::index::{IndexWriter, ModelSpec, Upsert, WriteOp, WriterConfig, WriterError};
use vitrine::models::DEFAULT_MODEL;
use vitrine::proto::visual_search_client::VisualSearchClient;
use vitrine::proto::{self, SearchOptions};
use vitrine::segment::format::{FOOTER_LEN, HEADER_LEN};
use vitrine::segment::synth::Structured;
use vitrine::segment::{HnswParams, Segment};
use vitrine::server::{INTEGRITY_HEALTH, ServeConfig};

const PER_SEGMENT: usize = 60;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn version() -> ModelVersion {
    ModelVersion::new(DEFAULT_MODEL).unwrap()
}

/// The shipped default model's dimension and weights hash, read from its manifest.
fn spec(weights: Option<&str>) -> ModelSpec {
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("models").join(DEFAULT_MODEL).join("manifest.json")).unwrap(),
    )
    .unwrap();
    ModelSpec {
        version: version(),
        dim: m["dim"].as_u64().unwrap() as usize,
        weights_sha256: weights.map_or_else(|| m["sha256"].as_str().unwrap().to_string(), str::to_string),
    }
}

fn config(spec: ModelSpec) -> WriterConfig {
    WriterConfig {
        holder: "integrity test".into(),
        default_model: Some(spec),
        seal_items: 1_000_000,
        hnsw: HnswParams { m: 8, ef_construction: 40 },
        merge: MergePolicy { max_segments: 100, ..MergePolicy::default() },
        ..WriterConfig::default()
    }
}

fn sku(i: usize) -> SkuId {
    SkuId::new(format!("SKU-{i:04}")).unwrap()
}

fn rows(dim: usize) -> Vec<f32> {
    Structured { dim, latent: 16, noise: 0.05, seed: 3 }.rows(0, 2 * PER_SEGMENT)
}

fn upsert(i: usize, v: &[f32]) -> WriteOp {
    WriteOp::Upsert(Upsert {
        sku: sku(i),
        attrs: None,
        image_sha256: None,
        vectors: vec![(version(), v.to_vec())],
    })
}

/// Two sealed segments of `PER_SEGMENT` items each: SKU-0000.. in the first, the rest in the
/// second. Returns the first segment's path.
fn build(dir: &Path, spec: ModelSpec) -> PathBuf {
    let dim = spec.dim;
    let rows = rows(dim);
    let w = IndexWriter::open(dir, config(spec)).unwrap();
    for part in 0..2 {
        let ops = (part * PER_SEGMENT..(part + 1) * PER_SEGMENT)
            .map(|i| upsert(i, &rows[i * dim..(i + 1) * dim]))
            .collect();
        w.write_blocking(ops).unwrap();
        w.checkpoint_blocking().unwrap();
    }
    w.close();
    let manifest = Manifest::load(dir).unwrap();
    let segments = &manifest.indexes[&version()].segments;
    assert_eq!(segments.len(), 2);
    DataDir::open_reader(dir).unwrap().segment_path(&version(), segments[0].id)
}

fn top(w: &IndexWriter, q: &[f32]) -> Vec<String> {
    let live = w.live();
    let view = live.version(&version()).unwrap();
    let query = vitrine::index::Query { vector: q, k: 5, ef: 0, exclude: None, filter: None };
    view.search(&query, w.attrs()).unwrap().into_iter().map(|h| h.sku.to_string()).collect()
}

/// Offsets to damage: one byte in every 4-byte header field, the first, middle and last byte
/// of every non-empty section, and one byte in every 4-byte footer field.
fn damage_points(seg: &Path) -> Vec<(String, usize)> {
    let s = Segment::open(seg).unwrap();
    let mut points: Vec<(String, usize)> =
        (0..HEADER_LEN as usize).step_by(4).map(|o| (format!("header byte {o}"), o)).collect();
    for (name, r) in s.sections() {
        if r.is_empty() {
            continue;
        }
        for o in [r.start, (r.start + r.end) / 2, r.end - 1] {
            points.push((format!("section {name} byte {o}"), o));
        }
    }
    let len = s.file_len() as usize;
    for o in (len - FOOTER_LEN as usize..len).step_by(4) {
        points.push((format!("footer byte {o}"), o));
    }
    points
}

#[test]
fn a_segment_with_any_damaged_byte_is_left_out_and_the_rest_serves() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(None);
    let dim = spec.dim;
    let seg = build(dir.path(), spec.clone());
    let rows = rows(dim);
    let good = std::fs::read(&seg).unwrap();
    let points = damage_points(&seg);
    assert!(points.len() > 80, "{}", points.len());
    for (what, at) in points {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        std::fs::write(&seg, &bad).unwrap();
        let w = IndexWriter::open(dir.path(), config(spec.clone())).unwrap();
        let problems = &w.open_report().integrity;
        assert_eq!(problems.len(), 1, "{what}: {problems:?}");
        assert!(
            problems[0].segment.is_some() && problems[0].reason.contains("segment"),
            "{what}: {problems:?}"
        );
        let live = w.live();
        assert_eq!(
            live.version(&version()).unwrap().sealed.len(),
            1,
            "{what}: the damaged segment is left out"
        );
        // The intact segment answers; nothing of the damaged one is ever returned.
        for i in [0, PER_SEGMENT - 1, PER_SEGMENT, 2 * PER_SEGMENT - 1] {
            let hits = top(&w, &rows[i * dim..(i + 1) * dim]);
            if i >= PER_SEGMENT {
                assert_eq!(hits[0], sku(i).to_string(), "{what}");
            }
            assert!(hits.iter().all(|h| h.as_str() >= sku(PER_SEGMENT).as_str()), "{what}: {hits:?}");
        }
        let err = w.write_blocking(vec![upsert(0, &rows[..dim])]).unwrap_err();
        assert!(
            matches!(err, WriterError::Poisoned { .. }) && err.to_string().contains("integrity"),
            "{err}"
        );
        w.close();
    }
    // Restored: everything serves again, and nothing was changed by the damaged runs.
    std::fs::write(&seg, &good).unwrap();
    let w = IndexWriter::open(dir.path(), config(spec)).unwrap();
    assert!(w.open_report().integrity.is_empty());
    assert_eq!(top(&w, &rows[..dim])[0], sku(0).to_string());
    assert_eq!(w.live().version(&version()).unwrap().live_items(), 2 * PER_SEGMENT as u64);
}

#[test]
fn a_damaged_record_is_reported_and_writes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(None);
    build(dir.path(), spec.clone());
    {
        let db = redb::Database::create(dir.path().join("records.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            use redb::ReadableTable;
            let mut t = txn.open_table(redb::TableDefinition::<&str, &[u8]>::new("records")).unwrap();
            let stored = t.get("SKU-0003").unwrap().unwrap().value().to_vec();
            let mut bad = stored.clone();
            *bad.last_mut().unwrap() ^= 0x01;
            t.insert("SKU-0003", bad.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let w = IndexWriter::open(dir.path(), config(spec)).unwrap();
    let problems = &w.open_report().integrity;
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].reason.contains("SKU-0003") && problems[0].reason.contains("checksum"),
        "{problems:?}"
    );
    assert!(w.write_blocking(vec![WriteOp::Delete(sku(1))]).is_err());
    w.close();
    let (ok, stderr) = verify(dir.path());
    assert!(!ok && stderr.contains("SKU-0003"), "{stderr}");
}

#[test]
fn verify_reads_the_log_as_a_start_would() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(None);
    build(dir.path(), spec.clone());
    let dim = spec.dim;
    let rows = rows(dim);
    // Three frames in the log after the checkpoint, closed without another.
    let w = IndexWriter::open(dir.path(), config(spec.clone())).unwrap();
    for i in 0..3 {
        w.write_blocking(vec![upsert(i, &rows[(i + 1) * dim..(i + 2) * dim])]).unwrap();
    }
    // Held by a writer: verify names it instead of failing on the open record store.
    let (ok, stderr) = verify(dir.path());
    assert!(!ok && stderr.contains("is held by") && stderr.contains("integrity test"), "{stderr}");
    w.close();
    let (ok, stdout, _) = verify_all(dir.path());
    assert!(ok && stdout.contains("3 log records after checkpoint"), "{stdout}");
    let log = std::fs::read_dir(dir.path().join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .max()
        .unwrap();
    let good = std::fs::read(&log).unwrap();
    let frames: Vec<usize> =
        good.windows(4).enumerate().filter(|(_, w)| *w == b"VWAL").map(|(i, _)| i).collect();
    assert!(frames.len() >= 3, "{frames:?}");
    // A damaged frame with a valid one after it stops a start: verify fails and says so.
    let mut bad = good.clone();
    bad[frames[frames.len() - 2] + 30] ^= 0x40;
    std::fs::write(&log, &bad).unwrap();
    let (ok, stderr) = verify(dir.path());
    assert!(!ok && stderr.contains("corrupt") && stderr.contains("would not start"), "{stderr}");
    assert_eq!(std::fs::read(&log).unwrap(), bad, "verify changed the log");
    // A torn last frame is what a crash leaves: verify passes and says a start drops it.
    let mut torn = good.clone();
    torn[frames[frames.len() - 1] + 30] ^= 0x40;
    std::fs::write(&log, &torn).unwrap();
    let (ok, stdout, _) = verify_all(dir.path());
    assert!(ok && stdout.contains("2 log records") && stdout.contains("torn write"), "{stdout}");
}

/// Runs `vitrine verify` on `dir`: (passed, stderr).
fn verify(dir: &Path) -> (bool, String) {
    let (ok, _, stderr) = verify_all(dir);
    (ok, stderr)
}

/// Runs `vitrine verify` on `dir`: (passed, stdout, stderr).
fn verify_all(dir: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vitrine"))
        .arg("verify")
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

async fn health(c: &Channel, service: &str) -> i32 {
    tonic_health::pb::health_client::HealthClient::new(c.clone())
        .check(tonic_health::pb::HealthCheckRequest { service: service.into() })
        .await
        .unwrap()
        .into_inner()
        .status
}

async fn search(c: &mut VisualSearchClient<Channel>, v: &[f32]) -> Result<Vec<String>, tonic::Status> {
    let r = c
        .search_by_vector(proto::SearchByVectorRequest {
            model_version: DEFAULT_MODEL.into(),
            vector: v.to_vec(),
            options: Some(SearchOptions { k: 5, ..Default::default() }),
        })
        .await?;
    Ok(r.into_inner().hits.into_iter().map(|h| h.sku).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_serves_what_is_intact_and_says_it_is_degraded() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(None);
    let dim = spec.dim;
    let seg = build(dir.path(), spec);
    let rows = rows(dim);
    let good = std::fs::read(&seg).unwrap();
    let mut bad = good.clone();
    bad[HEADER_LEN as usize + 1000] ^= 0x40; // a float of the vectors section
    std::fs::write(&seg, &bad).unwrap();

    let mut server = Server::start(ServeConfig::new(dir.path()), common::models()).await;
    let channel = server.channel().await;
    let mut c = VisualSearchClient::new(channel.clone());
    let info = c.get_index_info(proto::GetIndexInfoRequest {}).await.unwrap().into_inner();
    assert!(info.degraded && info.problems.len() == 1 && info.problems[0].contains("checksum"), "{info:?}");
    assert_eq!(health(&channel, INTEGRITY_HEALTH).await, ServingStatus::NotServing as i32);
    assert_eq!(health(&channel, "vitrine.v1.VisualSearch").await, ServingStatus::Serving as i32);
    let hits = search(&mut c, &rows[PER_SEGMENT * dim..(PER_SEGMENT + 1) * dim]).await.unwrap();
    assert_eq!(hits[0], sku(PER_SEGMENT).to_string());
    let hits = search(&mut c, &rows[..dim]).await.unwrap();
    assert!(!hits.contains(&sku(0).to_string()), "{hits:?}");
    let err = c
        .delete(proto::DeleteRequest { skus: vec![sku(70).to_string()] })
        .await
        .expect_err("writes are refused while degraded");
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert!(err.message().contains("integrity"), "{}", err.message());
    drop(c);
    server.stop().await;

    // Restored: not degraded.
    std::fs::write(&seg, &good).unwrap();
    let mut server = Server::start(ServeConfig::new(dir.path()), common::models()).await;
    let channel = server.channel().await;
    let info = VisualSearchClient::new(channel.clone())
        .get_index_info(proto::GetIndexInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!info.degraded && info.problems.is_empty(), "{info:?}");
    assert_eq!(health(&channel, INTEGRITY_HEALTH).await, ServingStatus::Serving as i32);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_of_other_weights_is_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(Some(&"0".repeat(64)));
    let dim = spec.dim;
    build(dir.path(), spec);
    let mut server = Server::start(ServeConfig::new(dir.path()), common::models()).await;
    let channel = server.channel().await;
    let mut c = VisualSearchClient::new(channel.clone());
    let info = c.get_index_info(proto::GetIndexInfoRequest {}).await.unwrap().into_inner();
    assert!(
        info.degraded && info.problems[0].contains("is not the one its index was built with"),
        "{info:?}"
    );
    let err = search(&mut c, &rows(dim)[..dim]).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    drop(c);
    server.stop().await;
    let (ok, stderr) = verify(dir.path());
    assert!(!ok && stderr.contains("would not be served"), "{stderr}");
}

#[test]
fn a_lost_manifest_or_a_foreign_folder_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    build(dir.path(), spec(None));
    std::fs::remove_file(Manifest::path(dir.path())).unwrap();
    let (ok, stderr) = verify(dir.path());
    assert!(!ok && stderr.contains("lost its MANIFEST.json"), "{stderr}");
    let err = IndexWriter::open(dir.path(), config(spec(None))).unwrap_err();
    assert!(err.to_string().contains("lost its MANIFEST.json"), "{err}");
    assert!(dir.path().join("indexes").read_dir().unwrap().next().is_some(), "nothing was removed");

    let foreign = tempfile::tempdir().unwrap();
    std::fs::write(foreign.path().join("notes.txt"), "mine").unwrap();
    let err = IndexWriter::open(foreign.path(), config(spec(None))).unwrap_err();
    assert!(err.to_string().contains("not a vitrine data directory"), "{err}");
    assert!(!foreign.path().join("wal").exists(), "nothing was created");
}
