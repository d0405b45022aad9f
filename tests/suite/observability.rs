//! Observability end to end on real parts: the real `vitrine serve` binary, configured by a
//! TOML file, answers gRPC requests, serves Prometheus metrics on its own listener and logs one
//! line per request (JSON or plain text on a pipe); health turns NOT_SERVING when shutdown
//! starts.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use tonic::Code;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use vitrine::models::{DEFAULT_MODEL, ModelRegistry};
use vitrine::proto::visual_search_client::VisualSearchClient;
use vitrine::proto::{self, upsert_request::Payload};
use vitrine::server::{ServeConfig, serve};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The first `n` SKUs of the bundled catalogue with their image files.
fn catalog(n: usize) -> Vec<(String, PathBuf)> {
    let text = std::fs::read_to_string(repo().join("data/catalog.jsonl")).unwrap();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .take(n)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["sku"].as_str().unwrap().to_string(), repo().join("data").join(v["image"].as_str().unwrap()))
        })
        .collect()
}

/// A `vitrine serve` process whose stderr is read line by line on a thread.
struct Served {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Served {
    fn start(config: &Path) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vitrine"));
        cmd.args(["serve", "--config"]).arg(config).env_remove("RUST_LOG");
        // The file's settings, not the caller's VITRINE_* variables.
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("VITRINE_")) {
            cmd.env_remove(k);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    /// Reads stderr until a line contains `needle` (fails after a minute without one).
    fn wait_for(&mut self, needle: &str) -> String {
        loop {
            match self.lines.recv_timeout(Duration::from_secs(60)) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => {
                    panic!("no log line with {needle:?} ({e}); stderr so far:\n{}", self.seen.join("\n"))
                }
            }
        }
    }

    /// SIGTERM, then every remaining line of stderr.
    fn stop(mut self) -> Vec<String> {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        let status = self.child.wait().unwrap();
        self.seen.extend(self.lines.iter());
        assert!(status.success(), "serve exited with {status}; stderr:\n{}", self.seen.join("\n"));
        self.seen
    }
}

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let path = dir.join("vitrine.toml");
    let text = format!(
        "data_dir = {:?}\nlisten = \"127.0.0.1:0\"\nmodels = {:?}\n{extra}",
        dir.join("data").display().to_string(),
        repo().join("models").display().to_string(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

async fn client(addr: &str) -> VisualSearchClient<tonic::transport::Channel> {
    VisualSearchClient::connect(format!("http://{addr}")).await.unwrap()
}

/// `GET /metrics` over a plain socket: the status line and the body.
fn scrape(addr: &str) -> (String, String) {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: vitrine\r\n\r\n").unwrap();
    let mut raw = String::new();
    conn.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (head.lines().next().unwrap().to_string(), body.to_string())
}

/// Each sample line of an exposition: series (name and labels) → value.
fn samples(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_string(), value.parse().unwrap_or_else(|_| panic!("bad sample {l:?}")))
        })
        .collect()
}

#[test]
fn metrics_and_json_request_logs_of_a_configured_server() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "metrics-listen = \"127.0.0.1:0\"\nlog_format = \"json\"\nseal_items = 1000\n",
    );
    let mut server = Served::start(&config);
    let serving: serde_json::Value = serde_json::from_str(&server.wait_for("vitrine serving")).unwrap();
    let addr = serving["addr"].as_str().unwrap().to_string();
    let metrics_line: serde_json::Value = serde_json::from_str(&server.wait_for("metrics at")).unwrap();
    let metrics_addr = metrics_line["addr"].as_str().unwrap().to_string();

    let items = catalog(3);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = client(&addr).await;
        for (sku, image) in &items {
            let req = proto::UpsertRequest {
                sku: sku.clone(),
                attrs: None,
                payload: Some(Payload::Image(std::fs::read(image).unwrap())),
            };
            c.upsert(req).await.unwrap();
        }
        for (sku, _) in &items {
            let req = proto::SearchBySkuRequest { sku: sku.clone(), ..Default::default() };
            let resp = c.search_by_sku(req).await.unwrap().into_inner();
            assert_eq!(resp.model_version, DEFAULT_MODEL);
        }
        let missing = proto::SearchBySkuRequest { sku: "NO-SUCH-SKU".into(), ..Default::default() };
        assert_eq!(c.search_by_sku(missing).await.unwrap_err().code(), Code::NotFound);
        let empty = proto::SearchByImageRequest::default();
        assert_eq!(c.search_by_image(empty).await.unwrap_err().code(), Code::InvalidArgument);
        let query =
            proto::SearchByImageRequest { image: std::fs::read(&items[0].1).unwrap(), ..Default::default() };
        let hits = c.search_by_image(query).await.unwrap().into_inner().hits;
        assert_eq!(hits[0].sku, items[0].0);
    });

    let (status, body) = scrape(&metrics_addr);
    assert_eq!(status, "HTTP/1.1 200 OK");
    let m = samples(&body);
    let get = |series: &str| *m.get(series).unwrap_or_else(|| panic!("no {series} in\n{body}"));
    let mv = format!("model_version=\"{DEFAULT_MODEL}\"");
    assert_eq!(get(&format!("vitrine_requests_total{{rpc=\"SearchBySku\",code=\"OK\",{mv}}}")), 3.0);
    assert_eq!(get(&format!("vitrine_requests_total{{rpc=\"SearchBySku\",code=\"NOT_FOUND\",{mv}}}")), 1.0);
    assert_eq!(get(&format!("vitrine_requests_total{{rpc=\"SearchByImage\",code=\"OK\",{mv}}}")), 1.0);
    assert_eq!(get("vitrine_requests_total{rpc=\"SearchByImage\",code=\"INVALID_ARGUMENT\"}"), 1.0);
    assert_eq!(get("vitrine_requests_total{rpc=\"Upsert\",code=\"OK\"}"), 3.0);
    let h = "vitrine_request_duration_seconds";
    assert_eq!(get(&format!("{h}_count{{rpc=\"SearchBySku\",{mv}}}")), 4.0);
    assert_eq!(get(&format!("{h}_bucket{{rpc=\"SearchBySku\",{mv},le=\"+Inf\"}}")), 4.0);
    assert!(get(&format!("{h}_sum{{rpc=\"SearchBySku\",{mv}}}")) > 0.0);
    // Three upserts (one batch each) and one image query went through the encoder.
    assert_eq!(get(&format!("vitrine_encode_seconds_count{{{mv}}}")), 4.0);
    assert_eq!(get(&format!("vitrine_encoded_images_total{{{mv}}}")), 4.0);
    assert!(get(&format!("vitrine_encode_seconds_sum{{{mv}}}")) > 0.0);
    assert_eq!(get(&format!("vitrine_items{{{mv}}}")), 3.0);
    assert_eq!(get(&format!("vitrine_unsealed_items{{{mv}}}")), 3.0);
    assert_eq!(get(&format!("vitrine_segments{{{mv}}}")), 0.0);
    assert_eq!(get(&format!("vitrine_model_serving{{{mv}}}")), 1.0);
    assert!(get("vitrine_wal_bytes") > 0.0);
    for work in ["embed", "search", "write"] {
        assert_eq!(get(&format!("vitrine_admission_queue_depth{{work=\"{work}\"}}")), 0.0);
        assert_eq!(get(&format!("vitrine_admission_shed_total{{work=\"{work}\"}}")), 0.0);
    }
    assert!(body.contains("# TYPE vitrine_request_duration_seconds histogram"), "{body}");
    let mut other = std::net::TcpStream::connect(&metrics_addr).unwrap();
    other.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = String::new();
    other.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    let lines = server.stop();
    let events: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object per line ({e}): {l:?}"))
        })
        .collect();
    let requests: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["target"] == "vitrine::request" && e["message"] == "request").collect();
    let by_sku = |code: &str| {
        requests
            .iter()
            .filter(|e| e["method"] == "/vitrine.v1.VisualSearch/SearchBySku" && e["code"] == code)
            .collect::<Vec<_>>()
    };
    assert_eq!(by_sku("OK").len(), 3, "{lines:#?}");
    let not_found = by_sku("NOT_FOUND");
    assert_eq!(not_found.len(), 1, "{lines:#?}");
    assert_eq!(not_found[0]["model_version"], DEFAULT_MODEL);
    assert!(not_found[0]["latency_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(not_found[0]["error"], "sku \"NO-SUCH-SKU\" is not in the index", "{:?}", not_found[0]);
    let upserts: Vec<_> =
        requests.iter().filter(|e| e["method"] == "/vitrine.v1.VisualSearch/Upsert").collect();
    assert_eq!(upserts.len(), 3);
    assert!(
        upserts.iter().all(|e| e.get("model_version").is_none() && e.get("error").is_none()),
        "{upserts:?}"
    );
    // Never the image bytes: every request line is short.
    assert!(requests.iter().all(|e| e.to_string().len() < 600), "{requests:#?}");
    let at = |m: &str| events.iter().position(|e| e["message"].as_str().is_some_and(|s| s.starts_with(m)));
    let (draining, stopped) = (at("shutting down: health is NOT_SERVING"), at("vitrine stopped"));
    assert!(draining.is_some() && draining < stopped, "{lines:#?}");
}

#[test]
fn text_logs_on_a_pipe_have_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let mut server = Served::start(&config);
    let serving = server.wait_for("vitrine serving");
    let addr = serving.split_whitespace().find_map(|w| w.strip_prefix("addr=")).unwrap().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = client(&addr).await;
        c.get_index_info(proto::GetIndexInfoRequest::default()).await.unwrap();
    });
    server.wait_for("GetIndexInfo");
    let lines = server.stop();
    let request = lines.iter().find(|l| l.contains("GetIndexInfo")).unwrap();
    assert!(
        request.contains("INFO") && request.contains("OK") && request.contains("latency_ms="),
        "{request}"
    );
    let text = lines.join("\n");
    assert!(!text.contains("\x1b["), "ANSI codes on a pipe:\n{text:?}");
}

/// A watch's next status; the timeout only turns a missing update into a failure, not a hang.
async fn next(s: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) -> ServingStatus {
    let m = tokio::time::timeout(Duration::from_secs(60), s.message()).await;
    m.expect("no health update after the shutdown signal").unwrap().unwrap().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_goes_not_serving_when_shutdown_starts() {
    let dir = tempfile::tempdir().unwrap();
    let device = vitrine::encoder::default_device().unwrap();
    let models = Arc::new(ModelRegistry::new(repo().join("models"), device));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve(ServeConfig::new(dir.path()), models, listener, async move {
        let _ = stopped.await;
    }));
    let mut health = loop {
        match tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await {
            Ok(channel) => break HealthClient::new(channel),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let service = "vitrine.v1.VisualSearch".to_string();
    let check = health.check(HealthCheckRequest { service: service.clone() }).await.unwrap();
    assert_eq!(check.into_inner().status(), ServingStatus::Serving);
    let mut watch = health.watch(HealthCheckRequest { service }).await.unwrap().into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status(), ServingStatus::Serving);
    let mut whole = health.watch(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
    assert_eq!(whole.message().await.unwrap().unwrap().status(), ServingStatus::Serving);

    stop.send(()).unwrap();
    // The open watches hear of the stop while the server drains (it waits for them). The
    // timeout only turns a missing update into a failure instead of a hang.
    assert_eq!(next(&mut watch).await, ServingStatus::NotServing);
    assert_eq!(next(&mut whole).await, ServingStatus::NotServing);
    drop((watch, whole, health));
    task.await.unwrap().unwrap();
}
