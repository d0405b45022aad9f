//! End to end on real parts: the bundled catalogue is ingested with the real encoder, served
//! by the real gRPC server on a loopback socket and queried through a tonic client.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use tonic::Code;
use tonic::transport::Channel;
use vitrine::ids::ModelVersion;
use vitrine::index::manifest::Manifest;
use vitrine::index::store::DataDir;
use vitrine::ingest::{IngestOptions, IngestReport, ingest};
use vitrine::models::{DEFAULT_MODEL, ModelRegistry};
use vitrine::proto::visual_search_client::VisualSearchClient;
use vitrine::proto::{self, SearchOptions};
use vitrine::segment::HnswParams;
use vitrine::server::{ServeConfig, attrs, serve};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn registry() -> Arc<ModelRegistry> {
    let device = vitrine::encoder::default_device().unwrap();
    Arc::new(ModelRegistry::new(repo().join("models"), device))
}

fn ingest_into(dir: &Path, catalog: &Path, models: &ModelRegistry) -> IngestReport {
    ingest_with(dir, catalog, models, vitrine::ingest::DEFAULT_MAX_SEGMENT_ITEMS)
}

fn ingest_with(dir: &Path, catalog: &Path, models: &ModelRegistry, max_segment_items: usize) -> IngestReport {
    let opts = IngestOptions {
        format: None,
        batch_size: 16,
        hnsw: HnswParams::default(),
        progress: false,
        default_model: ModelVersion::new(DEFAULT_MODEL).unwrap(),
        max_segment_items,
        // Test catalogues in temp dirs name the repository's images.
        image_roots: vec![repo().join("data")],
        max_image_bytes: vitrine::ingest::image_file::DEFAULT_MAX_IMAGE_BYTES,
    };
    ingest(dir, models, catalog, &opts).unwrap()
}

/// A server on an ephemeral loopback port, stopped on drop.
struct Server {
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Server {
    async fn start(dir: &Path, models: Arc<ModelRegistry>) -> Self {
        Self::start_with(ServeConfig::new(dir), models).await
    }

    async fn start_with(config: ServeConfig, models: Arc<ModelRegistry>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(config, models, listener, async move {
            let _ = rx.await;
        }));
        Self { addr, stop: Some(tx), task: Some(task) }
    }

    async fn client(&self) -> VisualSearchClient<Channel> {
        let url = format!("http://{}", self.addr);
        for _ in 0..600 {
            if let Ok(c) = VisualSearchClient::connect(url.clone()).await {
                return c;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("server at {url} never came up");
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

fn catalog_items() -> Vec<(String, PathBuf)> {
    let text = std::fs::read_to_string(repo().join("data/catalog.jsonl")).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["sku"].as_str().unwrap().to_string(), repo().join("data").join(v["image"].as_str().unwrap()))
        })
        .collect()
}

/// Each SKU's `attrs` object in the bundled catalogue (`{}` when it has none).
fn catalog_attrs() -> BTreeMap<String, serde_json::Value> {
    let text = std::fs::read_to_string(repo().join("data/catalog.jsonl")).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["sku"].as_str().unwrap().to_string(), v.get("attrs").cloned().unwrap_or(serde_json::json!({})))
        })
        .collect()
}

/// The issue's near-duplicate: resized to 60%, central 85% crop, JPEG quality 70.
fn near_duplicate(path: &Path) -> Vec<u8> {
    // Flatten alpha over white first: a JPEG has no alpha channel.
    let rgb = vitrine::encoder::preprocess::flatten_on_white(image::open(path).unwrap());
    let img = image::DynamicImage::ImageRgb8(rgb);
    let (w, h) = (img.width() * 6 / 10, img.height() * 6 / 10);
    let small = img.resize_exact(w.max(1), h.max(1), image::imageops::FilterType::Triangle);
    let (cw, ch) = ((w * 85 / 100).max(1), (h * 85 / 100).max(1));
    let crop = small.crop_imm((w - cw) / 2, (h - ch) / 2, cw, ch);
    let mut out = Vec::new();
    let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(Cursor::new(&mut out), 70);
    crop.write_with_encoder(enc).unwrap();
    out
}

fn opts(k: u32) -> Option<SearchOptions> {
    Some(SearchOptions { k, ..Default::default() })
}

async fn search_image(c: &mut VisualSearchClient<Channel>, image: Vec<u8>, k: u32) -> proto::SearchResponse {
    c.search_by_image(proto::SearchByImageRequest { image, options: opts(k), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundled_catalogue_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let models = registry();
    let catalog = repo().join("data/catalog.jsonl");
    let items = catalog_items();
    assert!(items.len() >= 50, "bundled catalogue is too small: {}", items.len());

    // Small segments, so that searches fan out over several and merge.
    let first = ingest_with(dir.path(), &catalog, &models, 64);
    assert_eq!(first.added, items.len(), "rejected: {:?}", first.rejected);
    assert!(first.rejected.is_empty());
    assert_eq!(first.embedded, items.len());
    // --max-segment-items is a maximum: full segments of exactly 64, then the rest.
    let manifest = Manifest::load(dir.path()).unwrap();
    let counts: Vec<u64> = manifest.serving().unwrap().1.segments.iter().map(|s| s.count).collect();
    let mut expected = vec![64u64; items.len() / 64];
    expected.push((items.len() % 64) as u64);
    assert_eq!(counts, expected);
    assert_eq!(manifest.wal_checkpoint, items.len() as u64, "a finished ingest leaves no log to replay");

    // Re-running the same catalogue changes nothing and embeds nothing.
    let again = ingest_into(dir.path(), &catalog, &models);
    assert_eq!((again.added, again.updated, again.unchanged), (0, 0, items.len()));
    assert_eq!(again.embedded, 0);
    assert_eq!(again.generation, first.generation);

    let server = Server::start(dir.path(), Arc::clone(&models)).await;
    let mut c = server.client().await;

    // Health and index info.
    let mut health = tonic_health::pb::health_client::HealthClient::new(
        Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.unwrap(),
    );
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "vitrine.v1.VisualSearch".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
    let info = c.get_index_info(proto::GetIndexInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.serving_model_version, DEFAULT_MODEL);
    assert_eq!(info.models.len(), 1);
    assert_eq!(info.models[0].live_items, items.len() as u64);
    assert_eq!(info.models[0].segments.len(), counts.len());
    assert_eq!(info.models[0].dim, 1280);

    // Near-duplicate retrieval through the server.
    let mut rank1 = 0;
    let mut misses = Vec::new();
    let mut before: BTreeMap<String, proto::SearchResponse> = BTreeMap::new();
    for (sku, path) in &items {
        let resp = search_image(&mut c, near_duplicate(path), 10).await;
        assert_eq!(resp.model_version, DEFAULT_MODEL);
        assert_eq!(resp.hits.len(), 10);
        assert!(resp.hits.windows(2).all(|w| w[0].score >= w[1].score));
        if resp.hits[0].sku == *sku {
            rank1 += 1;
        } else {
            misses.push((sku.clone(), resp.hits[0].sku.clone()));
        }
        before.insert(sku.clone(), resp);
    }
    let rate = rank1 as f64 / items.len() as f64;
    println!("near-duplicate rank-1: {rank1}/{} = {rate:.3}; misses {misses:?}", items.len());
    assert!(rate >= 0.95, "near-duplicate rank-1 rate {rate:.3} < 0.95; misses {misses:?}");

    // Every hit carries its SKU's catalogue attributes.
    let attrs_by_sku = catalog_attrs();
    for resp in before.values() {
        for h in &resp.hits {
            assert_eq!(attrs::to_json(h.attrs.as_ref()), attrs_by_sku[&h.sku], "attrs of {}", h.sku);
        }
    }

    // More like this: the item itself is left out; an unknown SKU is NOT_FOUND.
    let (sku0, _) = &items[0];
    let mlt = c
        .search_by_sku(proto::SearchBySkuRequest {
            sku: sku0.clone(),
            options: opts(5),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mlt.hits.len(), 5);
    assert!(mlt.hits.iter().all(|h| h.sku != *sku0));
    let err = c
        .search_by_sku(proto::SearchBySkuRequest { sku: "NO-SUCH-SKU".into(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound, "{err:?}");

    // Bad input gets INVALID_ARGUMENT / NOT_FOUND with a reason.
    let err = c
        .search_by_image(proto::SearchByImageRequest {
            image: b"\xff\xd8\xffnot really a jpeg".to_vec(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(!err.message().is_empty());
    let err = c
        .search_by_image(proto::SearchByImageRequest { image: vec![], ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .search_by_image(proto::SearchByImageRequest {
            image: vec![1, 2, 3],
            options: opts(5000),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("k = 5000"), "{}", err.message());
    let err = c
        .search_by_vector(proto::SearchByVectorRequest {
            model_version: DEFAULT_MODEL.into(),
            vector: vec![0.5; 7],
            options: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("1280"), "{}", err.message());
    let err = c
        .search_by_vector(proto::SearchByVectorRequest {
            model_version: "no-such-model".into(),
            vector: vec![1.0; 1280],
            options: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .search_by_vector(proto::SearchByVectorRequest {
            model_version: String::new(),
            vector: vec![1.0; 1280],
            options: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Search by vector with an item's own embedding finds that item first.
    let models_enc = models.get(&ModelVersion::new(DEFAULT_MODEL).unwrap()).unwrap();
    let bytes = std::fs::read(&items[3].1).unwrap();
    let prepared = models_enc.preprocess(&bytes).unwrap();
    let v = models_enc.embed(std::slice::from_ref(&prepared)).unwrap().remove(0);
    let by_vec = c
        .search_by_vector(proto::SearchByVectorRequest {
            model_version: DEFAULT_MODEL.into(),
            vector: v,
            options: opts(3),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(by_vec.hits[0].sku, items[3].0);
    assert!(by_vec.hits[0].score > 0.999, "{}", by_vec.hits[0].score);

    // Restart: the same queries give identical answers.
    drop(c);
    server.stop().await;
    let server = Server::start(dir.path(), Arc::clone(&models)).await;
    let mut c = server.client().await;
    for (sku, path) in items.iter().take(40) {
        let resp = search_image(&mut c, near_duplicate(path), 10).await;
        assert_eq!(&resp, &before[sku], "answer for {sku} changed across a restart");
    }
    server.stop().await;

    // An attributes-only update embeds nothing and shows in the answers of the next server.
    let (sku0, path0) = &items[0];
    let update = dir.path().join("update.jsonl");
    let row = serde_json::json!({"sku": sku0, "image": path0, "attrs": {"title": "renamed", "price": 9.5}});
    std::fs::write(&update, format!("{row}\n")).unwrap();
    let report = ingest_into(dir.path(), &update, &models);
    assert_eq!((report.added, report.updated, report.unchanged), (0, 1, 0), "{report:?}");
    assert_eq!(report.embedded, 0);
    let server = Server::start(dir.path(), Arc::clone(&models)).await;
    let mut c = server.client().await;
    let resp = search_image(&mut c, near_duplicate(path0), 10).await;
    assert_eq!(resp.hits[0].sku, *sku0);
    assert_eq!(resp.hits[0].score, before[sku0].hits[0].score);
    assert_eq!(
        attrs::to_json(resp.hits[0].attrs.as_ref()),
        serde_json::json!({"title": "renamed", "price": 9.5})
    );
    server.stop().await;
}

#[test]
fn ingest_reports_bad_rows_and_cli_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let models = registry();
    let bad = repo().join("data/bad/catalog_with_errors.jsonl");
    let report = ingest_into(dir.path(), &bad, &models);
    assert!(report.added >= 1, "{report:?}");
    assert!(report.rejected.len() >= 4, "{:?}", report.rejected);
    for r in &report.rejected {
        let text = r.to_string();
        assert!(text.starts_with(&format!("{}:{}:", bad.display(), r.line)), "{text}");
    }

    // The binary: a catalogue with no usable row exits non-zero and names the file and line.
    let exe = env!("CARGO_BIN_EXE_vitrine");
    let only_bad = dir.path().join("only_bad.jsonl");
    std::fs::write(&only_bad, "{\"sku\": \"X\", \"image\": \"missing.jpg\"}\nnot json\n").unwrap();
    let out = Command::new(exe)
        .args(["ingest", "--quiet", "--data-dir"])
        .arg(dir.path().join("other"))
        .arg("--catalog")
        .arg(&only_bad)
        .arg("--models")
        .arg(repo().join("models"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("only_bad.jsonl:1:") && stderr.contains("only_bad.jsonl:2:"), "{stderr}");
    assert!(stderr.contains("nothing could be ingested"), "{stderr}");
}

/// Writes `n` distinct synthetic product images and their catalogue; returns its path.
fn synthetic_catalog(dir: &Path, n: usize) -> PathBuf {
    std::fs::create_dir_all(dir.join("img")).unwrap();
    let mut cat = String::new();
    for i in 0..n {
        let mut rng = vitrine::segment::synth::SplitMix64::new(0xC0FFEE ^ i as u64);
        let blocks: Vec<[u8; 3]> =
            (0..16).map(|_| [rng.below(256) as u8, rng.below(256) as u8, rng.below(256) as u8]).collect();
        let img = image::RgbImage::from_fn(64, 64, |x, y| {
            image::Rgb(blocks[(y as usize / 16) * 4 + x as usize / 16])
        });
        img.save(dir.join(format!("img/{i}.png"))).unwrap();
        cat.push_str(&format!(
            "{{\"sku\": \"SYN-{i:05}\", \"image\": \"img/{i}.png\", \"attrs\": {{\"n\": {i}}}}}\n"
        ));
    }
    let path = dir.join("catalog.jsonl");
    std::fs::write(&path, cat).unwrap();
    path
}

/// `vitrine ingest` killed with SIGKILL in the middle of a catalogue: every row committed
/// before the kill survives, the re-run skips exactly those (embedding only the rest), and the
/// index ends with every row once.
#[test]
fn killed_ingest_resumes_without_embedding_committed_rows_again() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let n = 200;
    let catalog = synthetic_catalog(&dir.path().join("cat"), n);
    let models = registry();
    let exe = env!("CARGO_BIN_EXE_vitrine");
    let mut child = Command::new(exe)
        .args(["ingest", "--quiet", "--batch-size", "4", "--data-dir"])
        .arg(&data_dir)
        .arg("--catalog")
        .arg(&catalog)
        .arg("--models")
        .arg(repo().join("models"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once some rows are committed (the log has grown past a few records; its files
    // hold zeros written ahead of the records, which do not count).
    let wal = data_dir.join("wal");
    let written = |path: std::path::PathBuf| {
        std::fs::read(path).map_or(0, |b| b.iter().rposition(|&x| x != 0).map_or(0, |i| i as u64 + 1))
    };
    let started = std::time::Instant::now();
    loop {
        let logged: u64 = std::fs::read_dir(&wal)
            .map(|rd| rd.filter_map(Result::ok).map(|e| written(e.path())).sum())
            .unwrap_or(0);
        if logged > 40 * 5_200 || started.elapsed().as_secs() > 120 {
            break;
        }
        if child.try_wait().unwrap().is_some() {
            panic!("ingest finished before it could be killed");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // What survived: open the directory (the log is replayed) and count the committed rows.
    let committed = {
        let w =
            vitrine::index::IndexWriter::open(&data_dir, vitrine::index::WriterConfig::default()).unwrap();
        let c = (0..n).filter(|i| w.record(&format!("SYN-{i:05}")).unwrap().is_some()).count();
        let live = w.live();
        assert_eq!(live.serving_version().unwrap().live_items(), c as u64, "records and vectors agree");
        w.close();
        c
    };
    assert!(committed >= 40 && committed < n, "killed mid-run: {committed} of {n} committed");

    let report = ingest_into(&data_dir, &catalog, &models);
    println!("after the kill: {committed} rows committed; the re-run: {report:?}");
    assert_eq!(report.unchanged, committed, "committed rows are skipped");
    assert_eq!(report.added, n - committed);
    assert_eq!(report.embedded, n - committed, "only the rest is embedded");
    let manifest = Manifest::load(&data_dir).unwrap();
    assert_eq!(manifest.serving().unwrap().1.live_items(), n as u64);
    // No stray files: every file on disk is a segment or deletion file the manifest names.
    let data = DataDir::open_reader(&data_dir).unwrap();
    let ix_dir = data.index_dir(&ModelVersion::new(DEFAULT_MODEL).unwrap());
    let on_disk = std::fs::read_dir(&ix_dir).unwrap().count();
    let segments = &manifest.serving().unwrap().1.segments;
    assert_eq!(on_disk, segments.len() + segments.iter().filter(|s| s.deletes.is_some()).count());
}

/// `vitrine verify` passes on a healthy directory and names what is damaged.
#[test]
fn verify_command_finds_damage() {
    let dir = tempfile::tempdir().unwrap();
    let models = registry();
    ingest_into(dir.path(), &repo().join("data/bad/catalog_with_errors.jsonl"), &models);
    let exe = env!("CARGO_BIN_EXE_vitrine");
    let verify = || Command::new(exe).arg("verify").arg("--data-dir").arg(dir.path()).output().unwrap();
    let out = verify();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(": ok"));

    // The skew check: the shipped encoder reproduces the stored vectors...
    let skew = |models: &Path| {
        Command::new(exe)
            .args(["verify", "--skew", "3", "--data-dir"])
            .arg(dir.path())
            .arg("--models")
            .arg(models)
            .output()
            .unwrap()
    };
    let out = skew(&repo().join("models"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("3 stored images re-embedded"), "{stdout}");
    // ...and a folder whose preprocessing changed under the same name and weights does not.
    let changed = dir.path().join("changed-models");
    let folder = changed.join(DEFAULT_MODEL);
    std::fs::create_dir_all(&folder).unwrap();
    for f in ["model.safetensors", "LICENSE.md"] {
        std::fs::copy(repo().join("models").join(DEFAULT_MODEL).join(f), folder.join(f)).unwrap();
    }
    let mut m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("models/efficientnet-lite0-gem/manifest.json")).unwrap(),
    )
    .unwrap();
    m["version"] = DEFAULT_MODEL.into();
    std::fs::write(folder.join("manifest.json"), m.to_string()).unwrap();
    let out = skew(&changed);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && stdout.contains("BEYOND"), "{stdout}");

    // Flip one byte inside the vector section of the segment.
    let data = DataDir::open_reader(dir.path()).unwrap();
    let manifest = data.load_manifest().unwrap();
    let (version, ix) = manifest.serving().unwrap();
    let seg = data.segment_path(version, ix.segments[0].id);
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[256 + 100] ^= 0x40;
    std::fs::write(&seg, &bytes).unwrap();
    // And lose one image blob.
    let mut victim = None;
    vitrine::index::records::RecordStore::open(&data.records_path())
        .unwrap()
        .for_each(|sku, rec| {
            victim.get_or_insert((sku.clone(), rec.image_sha256.clone().unwrap()));
        })
        .unwrap();
    let (victim_sku, victim_sha) = victim.unwrap();
    std::fs::remove_file(data.blob_path(&victim_sha)).unwrap();

    let out = verify();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&ix.segments[0].id.to_string()), "{stderr}");
    assert!(stderr.contains(victim_sku.as_str()), "{stderr}");
}

fn image_upsert(sku: &str, image: Vec<u8>, attrs_json: Option<serde_json::Value>) -> proto::UpsertRequest {
    proto::UpsertRequest {
        sku: sku.into(),
        attrs: attrs_json.map(|a| attrs::json_to_struct(&a).unwrap()),
        payload: Some(proto::upsert_request::Payload::Image(image)),
    }
}

fn vector_upsert(sku: &str, model_version: &str, values: Vec<f32>) -> proto::UpsertRequest {
    proto::UpsertRequest {
        sku: sku.into(),
        attrs: None,
        payload: Some(proto::upsert_request::Payload::Vector(proto::VectorPayload {
            model_version: model_version.into(),
            values,
        })),
    }
}

/// Runs the CLI off the async workers; returns (success, stdout, stderr).
async fn cli(args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = Command::new(env!("CARGO_BIN_EXE_vitrine")).args(&args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    })
    .await
    .unwrap()
}

/// The live catalogue through gRPC and the CLI: upserts (unary and streamed, image and
/// vector), visible at once; attribute updates; Get; Delete; filters; bad items refused with
/// their reason; a second writer refused while the server holds the directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_writes_through_grpc_and_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let models = registry();
    let mut config = ServeConfig::new(dir.path());
    config.writer.seal_items = 8;
    config.writer.merge.max_segments = 2;
    let server = Server::start_with(config, Arc::clone(&models)).await;
    let mut c = server.client().await;
    let url = format!("http://{}", server.addr);
    let items: Vec<(String, PathBuf)> = catalog_items().into_iter().take(24).collect();
    let all_attrs = catalog_attrs();

    // A stream of upserts with three bad items among them: each fails alone, with its reason.
    let mut reqs: Vec<proto::UpsertRequest> = items
        .iter()
        .map(|(sku, path)| image_upsert(sku, std::fs::read(path).unwrap(), Some(all_attrs[sku].clone())))
        .collect();
    reqs.insert(
        3,
        image_upsert("BAD-IMAGE", std::fs::read(repo().join("data/bad/corrupt.jpg")).unwrap(), None),
    );
    reqs.insert(7, image_upsert("bad\nsku", vec![1, 2, 3], None));
    reqs.insert(9, vector_upsert("BAD-VECTOR", DEFAULT_MODEL, vec![f32::NAN; 1280]));
    let resp = c.upsert_stream(tokio_stream::iter(reqs)).await.unwrap().into_inner();
    assert_eq!((resp.added, resp.failed), (items.len() as u64, 3), "{resp:?}");
    let failed: Vec<(u32, &str)> =
        resp.items.iter().filter(|i| i.code != 0).map(|i| (i.index, i.message.as_str())).collect();
    assert_eq!(failed.iter().map(|f| f.0).collect::<Vec<_>>(), vec![3, 7, 9]);
    assert!(failed[0].1.contains("image"), "{failed:?}");
    assert!(failed[1].1.contains("sku"), "{failed:?}");
    assert!(failed[2].1.contains("non-finite"), "{failed:?}");

    // Visible on acknowledgement, across the mutable and sealed segments.
    for (sku, path) in items.iter().step_by(5) {
        let r = search_image(&mut c, near_duplicate(path), 3).await;
        assert_eq!(r.hits[0].sku, *sku);
        assert_eq!(attrs::to_json(r.hits[0].attrs.as_ref()), all_attrs[sku]);
    }

    // Unary upserts: bad input is INVALID_ARGUMENT naming the SKU and the reason.
    for (req, why) in [
        (image_upsert("X-1", std::fs::read(repo().join("data/bad/corrupt.jpg")).unwrap(), None), "image"),
        (vector_upsert("X-2", DEFAULT_MODEL, vec![0.5; 7]), "dimensions"),
        (vector_upsert("X-3", DEFAULT_MODEL, vec![0.0; 1280]), "zero"),
        (vector_upsert("X-4", "no-such-model", vec![0.5; 1280]), "no-such-model"),
        (
            proto::UpsertRequest { sku: "NEW".into(), attrs: None, payload: None },
            "needs an image or a vector",
        ),
        (image_upsert("", vec![1], None), "sku"),
    ] {
        let err = c.upsert(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(why), "{:?} should mention {why}", err.message());
    }

    // Same image and attributes: unchanged; new attributes only: updated, same vector.
    let (sku0, path0) = &items[0];
    let before = search_image(&mut c, near_duplicate(path0), 1).await;
    let same = image_upsert(sku0, std::fs::read(path0).unwrap(), Some(all_attrs[sku0].clone()));
    let r = c.upsert(same).await.unwrap().into_inner();
    assert_eq!(r.outcome, proto::UpsertOutcome::Unchanged as i32);
    let renamed =
        image_upsert(sku0, std::fs::read(path0).unwrap(), Some(serde_json::json!({"title": "renamed"})));
    let r = c.upsert(renamed).await.unwrap().into_inner();
    assert_eq!(r.outcome, proto::UpsertOutcome::Updated as i32);
    let after = search_image(&mut c, near_duplicate(path0), 1).await;
    assert_eq!(after.hits[0].score, before.hits[0].score);
    assert_eq!(attrs::to_json(after.hits[0].attrs.as_ref()), serde_json::json!({"title": "renamed"}));

    // Get: records in request order, unknown SKUs as missing.
    let got = c
        .get(proto::GetRequest { skus: vec![sku0.clone(), "NOPE".into(), items[1].0.clone()] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.records.iter().map(|r| r.sku.as_str()).collect::<Vec<_>>(),
        vec![sku0.as_str(), items[1].0.as_str()]
    );
    assert_eq!(got.missing, vec!["NOPE".to_string()]);
    assert_eq!(got.records[0].model_versions, vec![DEFAULT_MODEL.to_string()]);
    let sha = vitrine::index::store::sha256_hex(&std::fs::read(path0).unwrap());
    assert_eq!(got.records[0].image_sha256, sha);

    // Filters: every hit passes; a bad filter is INVALID_ARGUMENT.
    let filtered = c
        .search_by_image(proto::SearchByImageRequest {
            image: near_duplicate(&items[2].1),
            options: Some(SearchOptions {
                k: 10,
                filter_exprs: vec!["category!=clothing".into()],
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!filtered.hits.is_empty());
    for h in &filtered.hits {
        assert_ne!(attrs::to_json(h.attrs.as_ref())["category"], "clothing", "{h:?}");
    }
    let err = c
        .search_by_sku(proto::SearchBySkuRequest {
            sku: items[2].0.clone(),
            options: Some(SearchOptions { filter_exprs: vec!["price<".into()], ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("price<"), "{}", err.message());

    // Delete: gone from every answer at once; unknown SKUs reported missing.
    let (victim, vpath) = &items[4];
    let del = c
        .delete(proto::DeleteRequest {
            skus: vec![victim.clone(), "NOPE".into(), victim.clone(), "NOPE".into()],
        })
        .await
        .unwrap()
        .into_inner();
    // Each SKU answered once, however often the request names it.
    assert_eq!((del.deleted, del.missing), (vec![victim.clone()], vec!["NOPE".to_string()]));
    let r = search_image(&mut c, near_duplicate(vpath), 24).await;
    assert!(r.hits.iter().all(|h| h.sku != *victim));
    let err = c
        .search_by_sku(proto::SearchBySkuRequest { sku: victim.clone(), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // The CLI: upsert, get, delete, search --filter, ingest --addr; each exits 0 once answered.
    let (ok, out, err) = cli(vec![
        "upsert".into(),
        "--addr".into(),
        url.clone(),
        "--sku".into(),
        "CLI-1".into(),
        "--image".into(),
        repo().join("data/bad/ok-1.png").display().to_string(),
        "--attrs".into(),
        r#"{"category": "cli", "price": 12.5}"#.into(),
    ])
    .await;
    assert!(ok && out.contains("CLI-1: added"), "{out}{err}");
    let (ok, out, err) = cli(vec![
        "get".into(),
        "--addr".into(),
        url.clone(),
        "--sku".into(),
        "CLI-1".into(),
        "--json".into(),
    ])
    .await;
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["records"][0]["attrs"], serde_json::json!({"category": "cli", "price": 12.5}));
    let (ok, out, _) = cli(vec![
        "search".into(),
        "--addr".into(),
        url.clone(),
        "--image".into(),
        repo().join("data/bad/ok-1.png").display().to_string(),
        "--filter".into(),
        "category=cli".into(),
        "--filter".into(),
        "price<20".into(),
        "--json".into(),
    ])
    .await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["hits"].as_array().unwrap().len(), 1, "{v}");
    let (ok, out, _) =
        cli(vec!["delete".into(), "--addr".into(), url.clone(), "--sku".into(), "CLI-1".into()]).await;
    assert!(ok && out.contains("deleted 1"), "{out}");
    let (ok, out, _) =
        cli(vec!["get".into(), "--addr".into(), url.clone(), "--sku".into(), "CLI-1".into()]).await;
    assert!(!ok && out.contains("missing"), "get of a missing SKU exits non-zero: {out}");
    let (ok, _, err) = cli(vec![
        "search".into(),
        "--addr".into(),
        url.clone(),
        "--sku".into(),
        sku0.clone(),
        "--filter".into(),
        "price<abc".into(),
    ])
    .await;
    assert!(!ok && err.contains("price<abc"), "{err}");

    // A second writer is refused, naming the server.
    let (ok, _, err) = cli(vec![
        "ingest".into(),
        "--quiet".into(),
        "--data-dir".into(),
        dir.path().display().to_string(),
        "--catalog".into(),
        repo().join("data/bad/catalog_with_errors.jsonl").display().to_string(),
        "--models".into(),
        repo().join("models").display().to_string(),
    ])
    .await;
    assert!(!ok);
    assert!(
        err.contains("vitrine serve") && err.contains(&server.addr.to_string()) && err.contains("--addr"),
        "{err}"
    );

    // Streaming a catalogue to the server: bad rows named by file and line, good ones added,
    // and a re-run embeds nothing.
    let bad_catalog = repo().join("data/bad/catalog_with_errors.jsonl");
    let ingest_args = vec![
        "ingest".into(),
        "--quiet".into(),
        "--addr".into(),
        url.clone(),
        "--catalog".into(),
        bad_catalog.display().to_string(),
    ];
    let (ok, out, err) = cli(ingest_args.clone()).await;
    assert!(ok, "{err}");
    assert!(out.contains("3 added"), "{out}");
    assert!(err.contains("catalog_with_errors.jsonl:"), "{err}");
    let (ok, out, _) = cli(ingest_args).await;
    assert!(ok && out.contains("0 added, 0 updated, 3 unchanged"), "{out}");

    // Everything acknowledged survives a restart (the log is replayed).
    drop(c);
    server.stop().await;
    let server = Server::start(dir.path(), Arc::clone(&models)).await;
    let mut c = server.client().await;
    let got =
        c.get(proto::GetRequest { skus: vec![sku0.clone(), victim.clone()] }).await.unwrap().into_inner();
    assert_eq!(got.missing, vec![victim.clone()]);
    assert_eq!(attrs::to_json(got.records[0].attrs.as_ref()), serde_json::json!({"title": "renamed"}));
    let info = c.get_index_info(proto::GetIndexInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.models[0].live_items, items.len() as u64 - 1 + 3);
    assert!(info.models[0].segments.len() <= 3, "merging bounds the segments: {:?}", info.models[0].segments);
    server.stop().await;
}

/// Admission control on a real server: with one image-embedding slot, a one-place queue and a
/// short wait, a burst of image queries is partly shed with RESOURCE_EXHAUSTED (at once, with
/// the reason), every admitted query is answered correctly, SKU queries (their own limit) are
/// untouched, and the server serves normally after the burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_limits_is_shed_not_queued() {
    let dir = tempfile::tempdir().unwrap();
    let models = registry();
    let catalog = repo().join("data/catalog.csv");
    ingest_into(dir.path(), &catalog, &models);
    let mut config = ServeConfig::new(dir.path());
    config.admission.embed = vitrine::server::admission::Limit { running: 1, queued: 1 };
    config.admission.max_wait = std::time::Duration::from_millis(20);
    let server = Server::start_with(config, Arc::clone(&models)).await;
    let c = server.client().await;
    let (sku, path) = catalog_items().into_iter().next().unwrap();
    let image = near_duplicate(&path);
    let mut burst = Vec::new();
    for _ in 0..24 {
        let (mut c, image) = (c.clone(), image.clone());
        burst.push(tokio::spawn(async move {
            c.search_by_image(proto::SearchByImageRequest { image, options: opts(1), ..Default::default() })
                .await
        }));
    }
    let (mut ok, mut shed) = (0, 0);
    for h in burst {
        match h.await.unwrap() {
            Ok(r) => {
                assert_eq!(r.into_inner().hits[0].sku, sku);
                ok += 1;
            }
            Err(s) => {
                assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
                assert!(s.message().contains("overloaded"), "{}", s.message());
                shed += 1;
            }
        }
    }
    assert!(
        ok >= 1 && shed >= 1,
        "ok {ok}, shed {shed}: a 24-query burst into 1 slot + 1 queue place must shed"
    );
    let mut c2 = c.clone();
    let r = c2
        .search_by_sku(proto::SearchBySkuRequest { sku: sku.clone(), options: opts(3), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(r.into_inner().hits.len(), 3);
    let r = search_image(&mut c2, image, 1).await;
    assert_eq!(r.hits[0].sku, sku);
    server.stop().await;
}

/// A hostile catalogue through the real CLI: image paths outside the catalogue's folder
/// (`..`, absolute, a symlink out), a device, a FIFO and an oversized file are each rejected
/// on their own line with the reason, nothing hangs or floods memory, the good rows are
/// ingested, and `--strict` turns any rejection into a failing exit status.
#[test]
fn hostile_catalogue_paths_are_rejected_per_row() {
    let dir = tempfile::tempdir().unwrap();
    let cat_dir = dir.path().join("supplier");
    std::fs::create_dir_all(cat_dir.join("img")).unwrap();
    let (good_sku, good_path) = catalog_items().into_iter().next().unwrap();
    std::fs::copy(&good_path, cat_dir.join("img/good.jpg")).unwrap();
    std::fs::copy(&good_path, dir.path().join("outside.jpg")).unwrap();
    let limit = std::fs::metadata(&good_path).unwrap().len() + 1000;
    std::fs::write(cat_dir.join("img/huge.jpg"), vec![0xFFu8; limit as usize + 4096]).unwrap();
    std::os::unix::fs::symlink("/etc/shadow", cat_dir.join("img/shadow.jpg")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("outside.jpg"), cat_dir.join("img/link.jpg")).unwrap();
    let fifo = cat_dir.join("img/pipe.jpg");
    let have_fifo = Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success());
    let rows = [
        (good_sku.as_str(), "img/good.jpg"),
        ("OUT-DOTDOT", "../outside.jpg"),
        ("OUT-ABS", "/etc/passwd"),
        ("OUT-LINK", "img/link.jpg"),
        ("OUT-SHADOW", "img/shadow.jpg"),
        ("DEV-ZERO", "/dev/zero"),
        ("PROC", "/proc/self/environ"),
        ("HUGE", "img/huge.jpg"),
        ("FIFO", if have_fifo { "img/pipe.jpg" } else { "img/missing.jpg" }),
    ];
    let catalog = cat_dir.join("catalog.jsonl");
    let text: String =
        rows.iter().map(|(s, p)| format!("{{\"sku\": \"{s}\", \"image\": \"{p}\"}}\n")).collect();
    std::fs::write(&catalog, text).unwrap();
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vitrine"))
            .args(["ingest", "--quiet", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--catalog")
            .arg(&catalog)
            .arg("--models")
            .arg(repo().join("models"))
            .args(extra)
            .output()
            .unwrap()
    };
    // huge.jpg is over the limit, the good image under it.
    let out = run(&["--max-image-bytes", &limit.to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("1 added") && stdout.contains("8 rejected"), "{stdout}");
    for (line, why) in [
        (2, "outside the catalogue's folder"),
        (3, "outside the catalogue's folder"),
        (4, "outside the catalogue's folder"),
        (5, "outside the catalogue's folder"),
        (6, "outside the catalogue's folder"),
        (7, "outside the catalogue's folder"),
        (8, "byte limit"),
    ] {
        let tag = format!("catalog.jsonl:{line}:");
        let l =
            stderr.lines().find(|l| l.contains(&tag)).unwrap_or_else(|| panic!("no line {line}: {stderr}"));
        assert!(l.contains(why), "line {line}: {l}");
    }
    if have_fifo {
        assert!(stderr.contains("a FIFO"), "{stderr}");
    }
    // --strict fails the run; an allowed root admits the symlinked file outside the folder.
    let out = run(&["--strict", "--allow-image-root", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("2 added"), "OUT-DOTDOT and OUT-LINK are inside the allowed root: {stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("--strict"));
}

/// Query micro-batching on a real server (on by default on a GPU; switched on here on the CPU):
/// concurrent image queries that share forward passes get the answers they get one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_image_queries_answer_as_single_ones() {
    let dir = tempfile::tempdir().unwrap();
    let models = registry();
    ingest_into(dir.path(), &repo().join("data/catalog.csv"), &models);
    let mut config = ServeConfig::new(dir.path());
    config.admission.embed = vitrine::server::admission::Limit { running: 16, queued: 16 };
    config.admission.max_wait = std::time::Duration::from_secs(30);
    config.query_batch = Some(vitrine::server::batcher::BatchPolicy {
        max_batch: 8,
        max_wait: std::time::Duration::from_millis(100),
    });
    let server = Server::start_with(config, Arc::clone(&models)).await;
    let c = server.client().await;
    let items: Vec<(String, Vec<u8>)> = catalog_items()
        .into_iter()
        .step_by(17)
        .take(8)
        .map(|(sku, path)| (sku, near_duplicate(&path)))
        .collect();
    // One at a time: each query is a batch of one.
    let mut single = Vec::new();
    for (_, image) in &items {
        single.push(search_image(&mut c.clone(), image.clone(), 5).await);
    }
    // All at once, twice over: they share forward passes.
    let mut burst = Vec::new();
    for _ in 0..2 {
        for (_, image) in &items {
            let (mut c, image) = (c.clone(), image.clone());
            burst.push(tokio::spawn(async move { search_image(&mut c, image, 5).await }));
        }
    }
    for (i, h) in burst.into_iter().enumerate() {
        let got = h.await.unwrap();
        let want = &single[i % items.len()];
        assert_eq!(got.hits[0].sku, items[i % items.len()].0, "query {i} finds its own item");
        let skus = |r: &proto::SearchResponse| r.hits.iter().map(|h| h.sku.clone()).collect::<Vec<_>>();
        assert_eq!(skus(&got), skus(want), "query {i}");
        for (g, w) in got.hits.iter().zip(&want.hits) {
            assert!((g.score - w.score).abs() < 1e-4, "query {i}: score {} vs {}", g.score, w.score);
        }
    }
    server.stop().await;
}
