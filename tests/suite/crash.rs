//! "An acknowledged write survives a crash", against the real server binary.
//!
//! Each round starts `vitrine serve` on a temporary data directory (small `--seal-items` and
//! `--max-segments`, so seals and merges run all the time), lets concurrent gRPC clients send a
//! random mix of vector upserts (single and streamed), image upserts, attribute-only updates
//! and deletes, and SIGKILLs the server after a random delay while they are still sending. The
//! server is then restarted on the same directory and every SKU's last acknowledged write is
//! checked: `Get` returns it (attributes, image sha256) and it is found first by a search with
//! its own vector or image; an acknowledged delete is missing and found by no search.
//!
//! A SKU whose last request was in flight at the kill (sent, not acknowledged) may or may not
//! have been applied: it is left out of that round's check and its state is taken from `Get`
//! after the restart. SKUs are partitioned between the clients, so each SKU's acknowledged
//! writes have one order.
//!
//! `VITRINE_CRASH_ROUNDS` sets the number of rounds (default 20), `VITRINE_CRASH_SEED` the
//! random seed (default: from the clock; printed). `tools/crash_loop.sh N` runs N rounds in
//! release.

// Request messages are built with `..Default::default()` so that fields added to the proto later
// do not break this test.
#![allow(clippy::needless_update)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint};
use vitrine::proto::visual_search_client::VisualSearchClient;
use vitrine::proto::{self, SearchOptions, UpsertOutcome, upsert_request::Payload};
use vitrine::server::attrs::{json_to_struct, to_json};

const MODEL: &str = "efficientnet-lite0";
const DIM: usize = 1280;
const CLIENTS: usize = 4;
const SKUS_PER_CLIENT: usize = 75;
/// Only the first few SKUs of each client get image upserts (each costs an embedding at
/// upsert and a second one at every check).
const IMAGE_SKUS_PER_CLIENT: usize = 6;
/// Image upserts per client per round, at most.
const IMAGES_PER_CLIENT_ROUND: usize = 2;
const SEAL_ITEMS: usize = 40;
const MAX_SEGMENTS: usize = 3;
const KILL_AFTER_MS: std::ops::RangeInclusive<u64> = 100..=1500;
/// Rounds whose restart is itself killed, and when.
const RECOVERY_KILL_PERCENT: u64 = 25;
const RECOVERY_KILL_AFTER_MS: std::ops::RangeInclusive<u64> = 0..=400;
const SEARCH_K: u32 = 10;
/// Above any segment's size here, so the HNSW searches are in effect exhaustive.
const SEARCH_EF: u32 = 256;

// ---------------------------------------------------------------------------------------------
// Randomness (no rand crate among the dependencies).

#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    fn range(&mut self, r: std::ops::RangeInclusive<u64>) -> u64 {
        r.start() + self.below(r.end() - r.start() + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// Uniform in [-1, 1).
    fn signed(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

// ---------------------------------------------------------------------------------------------
// The model: per SKU, what its last acknowledged write left.

/// What a search with the SKU's own query should find.
#[derive(Clone, Debug)]
enum Target {
    Vector(Arc<Vec<f32>>),
    Image(Arc<Vec<u8>>),
    /// An unacknowledged vector upsert may or may not have replaced it.
    Unknown,
}

#[derive(Clone, Debug)]
enum State {
    /// Never written, or deleted; `ghost` is the vector or image it last had (searched for to
    /// check it is gone).
    Absent {
        ghost: Target,
    },
    Present {
        attrs: Value,
        image_sha: Option<String>,
        target: Target,
    },
}

#[derive(Clone, Debug)]
enum Op {
    Vector { vector: Arc<Vec<f32>>, attrs: Option<Value> },
    Image { bytes: Arc<Vec<u8>>, sha: String, attrs: Option<Value> },
    Attrs { attrs: Value },
    Delete,
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Vector { .. } => "vector upsert",
            Op::Image { .. } => "image upsert",
            Op::Attrs { .. } => "attributes update",
            Op::Delete => "delete",
        }
    }
}

#[derive(Debug)]
struct Entry {
    state: State,
    /// Sent and not (yet) acknowledged.
    in_flight: Option<Op>,
    /// Acknowledged writes of this SKU, all rounds.
    acked: u64,
    /// The last acknowledged write, for failure messages.
    last_ack: Option<(usize, &'static str)>,
}

type Model = Arc<Mutex<BTreeMap<String, Entry>>>;

fn sku_name(client: usize, i: usize) -> String {
    format!("C{client}-SKU-{i:03}")
}

/// Attributes as the server returns them (whole numbers as integers).
fn normalised(attrs: &Value) -> Value {
    to_json(Some(&json_to_struct(attrs).expect("valid attributes")))
}

impl State {
    fn present(&self) -> bool {
        matches!(self, State::Present { .. })
    }

    fn attrs(&self) -> Value {
        match self {
            State::Present { attrs, .. } => attrs.clone(),
            State::Absent { .. } => json!({}),
        }
    }

    fn target(&self) -> Target {
        match self {
            State::Present { target, .. } => target.clone(),
            State::Absent { ghost } => ghost.clone(),
        }
    }

    /// The state after `op` is acknowledged.
    fn after(&self, op: &Op) -> State {
        let keep = |a: &Option<Value>| a.as_ref().map(normalised).unwrap_or_else(|| self.attrs());
        let image_sha = match self {
            State::Present { image_sha, .. } => image_sha.clone(),
            State::Absent { .. } => None,
        };
        match op {
            Op::Vector { vector, attrs } => {
                State::Present { attrs: keep(attrs), image_sha, target: Target::Vector(Arc::clone(vector)) }
            }
            Op::Image { bytes, sha, attrs } => State::Present {
                attrs: keep(attrs),
                image_sha: Some(sha.clone()),
                target: Target::Image(Arc::clone(bytes)),
            },
            Op::Attrs { attrs } => {
                State::Present { attrs: normalised(attrs), image_sha, target: self.target() }
            }
            Op::Delete => State::Absent { ghost: self.target() },
        }
    }

    /// The state after `op` was in flight at a crash, from the record `Get` returns after the
    /// restart (`None`: missing).
    fn resynced(&self, op: &Op, rec: Option<&proto::SkuRecord>) -> State {
        let Some(rec) = rec else { return State::Absent { ghost: self.target() } };
        let target = match op {
            Op::Image { bytes, sha, .. } if rec.image_sha256 == *sha => Target::Image(Arc::clone(bytes)),
            // The old vector or the new one.
            Op::Vector { .. } => Target::Unknown,
            _ if self.present() => self.target(),
            _ => Target::Unknown,
        };
        State::Present {
            attrs: to_json(rec.attrs.as_ref()),
            image_sha: Some(rec.image_sha256.clone()).filter(|s| !s.is_empty()),
            target,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Payloads.

fn random_vector(rng: &mut Rng) -> Arc<Vec<f32>> {
    Arc::new((0..DIM).map(|_| rng.signed()).collect())
}

fn random_attrs(rng: &mut Rng) -> Value {
    if rng.chance(8) {
        return json!({});
    }
    let colours = ["red", "green", "blue", "black", "white"];
    let mut a = json!({
        "title": format!("item {}", rng.below(100_000)),
        "price": rng.below(4000) as f64 / 2.0,
        "colour": colours[rng.below(colours.len() as u64) as usize],
    });
    if rng.chance(50) {
        a["stock"] = json!(rng.below(500));
    }
    if rng.chance(30) {
        a["eco"] = json!(rng.chance(50));
    }
    if rng.chance(30) {
        a["tags"] = json!(["t", rng.below(10)]);
    }
    a
}

/// A 48x48 PNG of 6x6 random colour blocks: distinct for every seed.
fn synthetic_png(seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed ^ 0x5eed_1a9e_u64);
    let blocks: Vec<[u8; 3]> = (0..36)
        .map(|_| {
            let c = rng.next_u64();
            [c as u8, (c >> 8) as u8, (c >> 16) as u8]
        })
        .collect();
    let img = image::RgbImage::from_fn(48, 48, |x, y| image::Rgb(blocks[(y / 8 * 6 + x / 8) as usize]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn struct_of(attrs: &Option<Value>) -> Option<prost_types::Struct> {
    attrs.as_ref().map(|a| json_to_struct(a).expect("valid attributes"))
}

fn upsert_request(sku: &str, op: &Op) -> proto::UpsertRequest {
    match op {
        Op::Vector { vector, attrs } => proto::UpsertRequest {
            sku: sku.into(),
            attrs: struct_of(attrs),
            payload: Some(Payload::Vector(proto::VectorPayload {
                model_version: MODEL.into(),
                values: vector.to_vec(),
                ..Default::default()
            })),
            ..Default::default()
        },
        Op::Image { bytes, attrs, .. } => proto::UpsertRequest {
            sku: sku.into(),
            attrs: struct_of(attrs),
            payload: Some(Payload::Image(bytes.to_vec())),
            ..Default::default()
        },
        Op::Attrs { attrs } => proto::UpsertRequest {
            sku: sku.into(),
            attrs: struct_of(&Some(attrs.clone())),
            payload: None,
            ..Default::default()
        },
        Op::Delete => unreachable!("a delete is not an upsert"),
    }
}

// ---------------------------------------------------------------------------------------------
// The server process.

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A `vitrine serve` child process, SIGKILLed on drop.
struct Server {
    child: Child,
    url: String,
    log: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn connect(url: &str) -> Result<VisualSearchClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(url.to_string())
        .expect("valid url")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .connect()
        .await?;
    Ok(VisualSearchClient::new(channel))
}

impl Server {
    /// Starts `vitrine serve` on `dir` and a free port, without waiting for it; `log` gets its
    /// stderr.
    fn spawn(dir: &Path, log: PathBuf) -> Server {
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_vitrine"))
            .arg("serve")
            .arg("--data-dir")
            .arg(dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--models")
            .arg(repo().join("models"))
            .arg("--seal-items")
            .arg(SEAL_ITEMS.to_string())
            .arg("--max-segments")
            .arg(MAX_SEGMENTS.to_string())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,hnsw_rs=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("cannot start the server");
        Server { child, url: format!("http://127.0.0.1:{port}"), log }
    }

    /// Starts the server and waits until it answers `GetIndexInfo`.
    async fn start(dir: &Path, log: PathBuf) -> Server {
        for _attempt in 0..5 {
            let mut server = Server::spawn(dir, log.clone());
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                if let Some(status) = server.child.try_wait().unwrap() {
                    let stderr = std::fs::read_to_string(&log).unwrap_or_default();
                    if stderr.contains("cannot listen") {
                        break; // the port was taken meanwhile: another one
                    }
                    panic!("the server exited at start ({status}):\n{stderr}");
                }
                if let Ok(mut c) = connect(&server.url).await
                    && c.get_index_info(proto::GetIndexInfoRequest::default()).await.is_ok()
                {
                    return server;
                }
                assert!(
                    Instant::now() < deadline,
                    "the server did not answer within 120 s:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        panic!("could not find a free port for the server");
    }

    /// SIGKILLs the server; returns its stderr (and removes the file).
    fn kill(mut self) -> String {
        self.child.kill().expect("SIGKILL the server");
        self.child.wait().unwrap();
        let stderr = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::remove_file(&self.log);
        stderr
    }
}

/// The value of `key=` in the first stderr line holding `message`.
fn log_field(stderr: &str, message: &str, key: &str) -> Option<u64> {
    let line = stderr.lines().find(|l| l.contains(message))?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..].split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Panics and errors logged by a server, if any.
fn log_problems(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| l.contains("panicked") || l.contains(" ERROR "))
        .map(|l| l.to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The clients.

#[derive(Default)]
struct ClientReport {
    acked: u64,
    /// Something the model says cannot happen (a refused write, an unexpected outcome, an error
    /// before the kill).
    anomalies: Vec<String>,
}

struct Client {
    id: usize,
    rng: Rng,
    model: Model,
    report: ClientReport,
    /// Image generation counter, so that every image upsert sends new bytes.
    images: u64,
}

impl Client {
    fn state(&self, sku: &str) -> State {
        self.model.lock().unwrap()[sku].state.clone()
    }

    fn start(&self, sku: &str, op: &Op) {
        self.model.lock().unwrap().get_mut(sku).unwrap().in_flight = Some(op.clone());
    }

    /// `op` on `sku` was acknowledged.
    fn acked(&mut self, round: usize, sku: &str, op: &Op) {
        let mut m = self.model.lock().unwrap();
        let e = m.get_mut(sku).unwrap();
        e.state = e.state.after(op);
        e.in_flight = None;
        e.acked += 1;
        e.last_ack = Some((round, op.name()));
        self.report.acked += 1;
    }

    /// `op` on `sku` was refused as a whole: nothing was written.
    fn refused(&mut self, sku: &str, op: &Op, why: String) {
        self.model.lock().unwrap().get_mut(sku).unwrap().in_flight = None;
        self.report.anomalies.push(format!("{sku}: {} refused: {why}", op.name()));
    }

    fn pick(&mut self, n: usize) -> String {
        sku_name(self.id, self.rng.below(n as u64) as usize)
    }

    fn new_image(&mut self) -> Op {
        self.images += 1;
        let seed = self.rng.next_u64() ^ ((self.id as u64) << 56) ^ self.images;
        let bytes = synthetic_png(seed);
        let attrs = self.rng.chance(80).then(|| random_attrs(&mut self.rng));
        Op::Image { sha: sha256_hex(&bytes), bytes: Arc::new(bytes), attrs }
    }

    fn new_vector(&mut self) -> Op {
        let attrs = self.rng.chance(70).then(|| random_attrs(&mut self.rng));
        Op::Vector { vector: random_vector(&mut self.rng), attrs }
    }

    /// Sends writes until `stop`, or until a request fails (after the kill, or an anomaly).
    async fn run(
        mut self,
        round: usize,
        url: String,
        stop: Arc<AtomicBool>,
        killed: Arc<AtomicBool>,
    ) -> ClientReport {
        let mut c = match connect(&url).await {
            Ok(c) => c,
            Err(e) => {
                self.report.anomalies.push(format!("client {}: cannot connect: {e}", self.id));
                return self.report;
            }
        };
        let image_at: Vec<u64> = (0..IMAGES_PER_CLIENT_ROUND).map(|_| self.rng.below(40)).collect();
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            let failed = if image_at.contains(&n) {
                let sku = self.pick(IMAGE_SKUS_PER_CLIENT);
                let op = self.new_image();
                self.upsert(&mut c, round, &sku, op).await
            } else {
                match self.rng.below(100) {
                    0..50 => {
                        let sku = self.pick(SKUS_PER_CLIENT);
                        let op = self.new_vector();
                        self.upsert(&mut c, round, &sku, op).await
                    }
                    50..62 => self.stream(&mut c, round).await,
                    62..82 => {
                        let sku = self.pick(SKUS_PER_CLIENT);
                        let op = if self.state(&sku).present() {
                            Op::Attrs { attrs: random_attrs(&mut self.rng) }
                        } else {
                            self.new_vector()
                        };
                        self.upsert(&mut c, round, &sku, op).await
                    }
                    _ => self.delete(&mut c, round).await,
                }
            };
            n += 1;
            if let Some(status) = failed {
                if !killed.load(Ordering::SeqCst) {
                    self.report
                        .anomalies
                        .push(format!("client {}: request failed before the kill: {status}", self.id));
                }
                break;
            }
        }
        self.report
    }

    /// One `Upsert`; the status if the request failed (the SKU stays in flight).
    async fn upsert(
        &mut self,
        c: &mut VisualSearchClient<Channel>,
        round: usize,
        sku: &str,
        op: Op,
    ) -> Option<tonic::Status> {
        let before = self.state(sku);
        self.start(sku, &op);
        match c.upsert(upsert_request(sku, &op)).await {
            Ok(resp) => {
                let outcome = resp.into_inner().outcome;
                self.check_outcome(sku, &before, &op, outcome);
                self.acked(round, sku, &op);
                None
            }
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                self.refused(sku, &op, status.message().to_string());
                None
            }
            Err(status) => Some(status),
        }
    }

    fn check_outcome(&mut self, sku: &str, before: &State, op: &Op, outcome: i32) {
        let expected: &[UpsertOutcome] = match (op, before) {
            (Op::Attrs { attrs }, State::Present { attrs: cur, .. }) if normalised(attrs) == *cur => {
                &[UpsertOutcome::Unchanged]
            }
            (_, State::Present { .. }) => &[UpsertOutcome::Updated],
            (_, State::Absent { .. }) => &[UpsertOutcome::Added],
        };
        if !expected.iter().any(|&o| o as i32 == outcome) {
            self.report.anomalies.push(format!(
                "{sku}: {} answered outcome {outcome}, expected {expected:?} (the SKU was {})",
                op.name(),
                if before.present() { "present" } else { "absent" }
            ));
        }
    }

    /// An `UpsertStream` of vector upserts to distinct SKUs.
    async fn stream(&mut self, c: &mut VisualSearchClient<Channel>, round: usize) -> Option<tonic::Status> {
        let n = self.rng.range(2..=6) as usize;
        let mut skus = BTreeSet::new();
        while skus.len() < n {
            skus.insert(self.pick(SKUS_PER_CLIENT));
        }
        let items: Vec<(String, State, Op)> = skus
            .into_iter()
            .map(|sku| {
                let op = self.new_vector();
                (sku.clone(), self.state(&sku), op)
            })
            .collect();
        for (sku, _, op) in &items {
            self.start(sku, op);
        }
        let requests: Vec<proto::UpsertRequest> =
            items.iter().map(|(sku, _, op)| upsert_request(sku, op)).collect();
        match c.upsert_stream(tokio_stream::iter(requests)).await {
            Ok(resp) => {
                let resp = resp.into_inner();
                if resp.items.len() != items.len() {
                    self.report.anomalies.push(format!(
                        "UpsertStream of {} items answered {} statuses",
                        items.len(),
                        resp.items.len()
                    ));
                }
                for (status, (sku, before, op)) in resp.items.iter().zip(&items) {
                    if status.sku != *sku {
                        self.report
                            .anomalies
                            .push(format!("UpsertStream status for {} says {}", sku, status.sku));
                    }
                    if status.code == 0 {
                        self.check_outcome(sku, before, op, status.outcome);
                        self.acked(round, sku, op);
                    } else {
                        self.refused(sku, op, status.message.clone());
                    }
                }
                None
            }
            Err(status) => Some(status),
        }
    }

    /// A `Delete` of one to three SKUs.
    async fn delete(&mut self, c: &mut VisualSearchClient<Channel>, round: usize) -> Option<tonic::Status> {
        let n = self.rng.range(1..=3) as usize;
        let mut skus = BTreeSet::new();
        while skus.len() < n {
            skus.insert(self.pick(SKUS_PER_CLIENT));
        }
        let before: Vec<(String, bool)> = skus.iter().map(|s| (s.clone(), self.state(s).present())).collect();
        for sku in &skus {
            self.start(sku, &Op::Delete);
        }
        match c
            .delete(proto::DeleteRequest { skus: skus.iter().cloned().collect(), ..Default::default() })
            .await
        {
            Ok(resp) => {
                let resp = resp.into_inner();
                for (sku, present) in before {
                    let said_deleted = resp.deleted.contains(&sku);
                    let said_missing = resp.missing.contains(&sku);
                    if said_deleted != present || said_missing == present {
                        self.report.anomalies.push(format!(
                            "{sku}: delete answered deleted={said_deleted} missing={said_missing}, but the SKU was {}",
                            if present { "present" } else { "absent" }
                        ));
                    }
                    self.acked(round, &sku, &Op::Delete);
                }
                None
            }
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                for sku in &skus {
                    self.refused(sku, &Op::Delete, status.message().to_string());
                }
                None
            }
            Err(status) => Some(status),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The check after a restart.

#[derive(Default)]
struct CheckReport {
    checked: usize,
    resynced: usize,
    /// SKU -> what is wrong with it.
    lost: BTreeMap<String, BTreeSet<String>>,
    searches: usize,
}

impl CheckReport {
    fn fail(&mut self, sku: &str, why: String) {
        self.lost.entry(sku.to_string()).or_default().insert(why);
    }
}

enum Probe {
    /// Must be the first hit.
    Found(Target),
    /// Must not be among the hits.
    Gone(Target),
}

async fn search(
    c: &mut VisualSearchClient<Channel>,
    target: &Target,
) -> Result<Vec<proto::Hit>, tonic::Status> {
    let options = Some(SearchOptions { k: SEARCH_K, ef: SEARCH_EF, ..Default::default() });
    let resp = match target {
        Target::Vector(v) => {
            c.search_by_vector(proto::SearchByVectorRequest {
                model_version: MODEL.into(),
                vector: v.to_vec(),
                options,
                ..Default::default()
            })
            .await?
        }
        Target::Image(bytes) => {
            c.search_by_image(proto::SearchByImageRequest {
                image: bytes.to_vec(),
                options,
                ..Default::default()
            })
            .await?
        }
        Target::Unknown => unreachable!("no query for an unknown target"),
    };
    Ok(resp.into_inner().hits)
}

/// Checks every SKU of the model against the restarted server; SKUs that were in flight at the
/// kill are taken over from `Get` instead.
async fn check(url: &str, data_dir: &Path, model: &Model) -> CheckReport {
    let mut report = CheckReport::default();
    let mut c = connect(url).await.expect("connect to the restarted server");
    let skus: Vec<String> = model.lock().unwrap().keys().cloned().collect();
    let resp = c
        .get(proto::GetRequest { skus: skus.clone(), ..Default::default() })
        .await
        .expect("Get")
        .into_inner();
    let records: HashMap<&str, &proto::SkuRecord> =
        resp.records.iter().map(|r| (r.sku.as_str(), r)).collect();
    let missing: BTreeSet<&str> = resp.missing.iter().map(String::as_str).collect();
    let mut probes: Vec<(String, Probe)> = Vec::new();
    {
        let mut m = model.lock().unwrap();
        for sku in &skus {
            let e = m.get_mut(sku).unwrap();
            let rec = records.get(sku.as_str()).copied();
            if rec.is_none() && !missing.contains(sku.as_str()) {
                report.fail(sku, "Get reported it neither found nor missing".into());
            }
            if let Some(op) = e.in_flight.take() {
                e.state = e.state.resynced(&op, rec);
                report.resynced += 1;
                continue;
            }
            report.checked += 1;
            match (&e.state, rec) {
                (State::Present { attrs, image_sha, target }, Some(rec)) => {
                    let got = to_json(rec.attrs.as_ref());
                    if got != *attrs {
                        report.fail(
                            sku,
                            format!("attributes are {got}, the last acknowledged write set {attrs}"),
                        );
                    }
                    let want_sha = image_sha.clone().unwrap_or_default();
                    if rec.image_sha256 != want_sha {
                        report.fail(
                            sku,
                            format!("image sha256 is {:?}, expected {want_sha:?}", rec.image_sha256),
                        );
                    }
                    if !rec.model_versions.iter().any(|v| v == MODEL) {
                        report.fail(sku, format!("no vector in {MODEL} (versions {:?})", rec.model_versions));
                    }
                    if let Some(sha) = image_sha {
                        let blob = data_dir.join("blobs").join(&sha[..2]).join(sha);
                        match std::fs::read(&blob) {
                            Ok(b) if sha256_hex(&b) == *sha => {}
                            Ok(_) => report
                                .fail(sku, format!("image blob {} does not match its hash", blob.display())),
                            Err(e) => report.fail(sku, format!("image blob {}: {e}", blob.display())),
                        }
                    }
                    if !matches!(target, Target::Unknown) {
                        probes.push((sku.clone(), Probe::Found(target.clone())));
                    }
                }
                (State::Present { .. }, None) => {
                    report.fail(sku, "acknowledged upsert: Get says missing".into())
                }
                (State::Absent { ghost }, rec) => {
                    if rec.is_some() {
                        report
                            .fail(sku, "acknowledged delete (or never written): Get returns a record".into());
                    }
                    if !matches!(ghost, Target::Unknown) {
                        probes.push((sku.clone(), Probe::Gone(ghost.clone())));
                    }
                }
            }
        }
    }
    // Searches: each SKU is found first with its own vector or image, a deleted one never.
    let states: HashMap<String, State> =
        model.lock().unwrap().iter().map(|(k, e)| (k.clone(), e.state.clone())).collect();
    for (sku, probe) in probes {
        let (target, want_found) = match &probe {
            Probe::Found(t) => (t, true),
            Probe::Gone(t) => (t, false),
        };
        let hits = match search(&mut c, target).await {
            Ok(h) => h,
            Err(status) => {
                report.fail(&sku, format!("search failed: {status}"));
                continue;
            }
        };
        report.searches += 1;
        let min_score = if matches!(target, Target::Image(_)) { 0.99 } else { 0.999 };
        if want_found {
            match hits.first() {
                Some(h) if h.sku == sku && h.score >= min_score => {}
                first => {
                    let rank = hits.iter().position(|h| h.sku == sku).map(|r| r + 1);
                    report.fail(
                        &sku,
                        format!(
                            "search with its {} finds it at rank {rank:?}; first hit {:?}",
                            if matches!(target, Target::Image(_)) { "image" } else { "vector" },
                            first.map(|h| (&h.sku, h.score))
                        ),
                    );
                }
            }
        } else if hits.iter().any(|h| h.sku == sku) {
            report.fail(&sku, "deleted, yet a search with its last vector or image returns it".into());
        }
        for h in &hits {
            match states.get(&h.sku) {
                Some(State::Absent { .. }) => {
                    report.fail(&h.sku, format!("deleted, yet it is a hit (of the search for {sku})"))
                }
                Some(State::Present { attrs, .. }) => {
                    let got = to_json(h.attrs.as_ref());
                    if got != *attrs {
                        report.fail(&h.sku, format!("a hit carries attributes {got}, expected {attrs}"));
                    }
                }
                None => report.fail(&h.sku, "a hit that no client ever wrote".into()),
            }
        }
    }
    report
}

// ---------------------------------------------------------------------------------------------

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let rounds = env_u64("VITRINE_CRASH_ROUNDS").unwrap_or(20) as usize;
    let seed = env_u64("VITRINE_CRASH_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    println!("crash test: {rounds} rounds, VITRINE_CRASH_SEED={seed}");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(run(rounds, seed));
}

async fn run(rounds: usize, seed: u64) {
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let data_dir = tmp.path().join("data");
    let log = |n: usize| tmp.path().join(format!("server-{n}.log"));
    let model: Model = Arc::new(Mutex::new(
        (0..CLIENTS)
            .flat_map(|c| (0..SKUS_PER_CLIENT).map(move |i| sku_name(c, i)))
            .map(|sku| {
                let e = Entry {
                    state: State::Absent { ghost: Target::Unknown },
                    in_flight: None,
                    acked: 0,
                    last_ack: None,
                };
                (sku, e)
            })
            .collect(),
    ));
    let mut rng = Rng(seed);
    let mut failures: Vec<String> = Vec::new();
    let (mut acked_total, mut lost_total, mut orphan_rounds) = (0u64, 0usize, 0usize);
    let mut server = Server::start(&data_dir, log(0)).await;
    for round in 1..=rounds {
        // Writers, then a SIGKILL while they are still at it.
        let stop = Arc::new(AtomicBool::new(false));
        let killed = Arc::new(AtomicBool::new(false));
        let clients: Vec<_> = (0..CLIENTS)
            .map(|id| {
                let client = Client {
                    id,
                    rng: Rng(rng.next_u64()),
                    model: Arc::clone(&model),
                    report: ClientReport::default(),
                    images: round as u64 * 1000,
                };
                tokio::spawn(client.run(round, server.url.clone(), Arc::clone(&stop), Arc::clone(&killed)))
            })
            .collect();
        let delay = rng.range(KILL_AFTER_MS);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        killed.store(true, Ordering::SeqCst);
        let stderr = server.kill();
        stop.store(true, Ordering::SeqCst);
        let mut acked = 0;
        for c in clients {
            let r = c.await.expect("client task");
            acked += r.acked;
            failures.extend(r.anomalies.into_iter().map(|a| format!("round {round}: {a}")));
        }
        failures.extend(log_problems(&stderr).into_iter().map(|l| format!("round {round}: server log: {l}")));
        let seals = stderr.matches("sealed a segment").count();
        let merges = stderr.matches("merged segments").count();
        let in_flight = model.lock().unwrap().values().filter(|e| e.in_flight.is_some()).count();

        // Sometimes a second crash during recovery (log replay, seals of the replayed items).
        let mut recovery_kill = String::new();
        let mut orphans = 0;
        if rng.chance(RECOVERY_KILL_PERCENT) {
            let early = Server::spawn(&data_dir, log(round));
            let after = rng.range(RECOVERY_KILL_AFTER_MS);
            tokio::time::sleep(Duration::from_millis(after)).await;
            let stderr = early.kill();
            orphans +=
                log_field(&stderr, "removed files left by an interrupted writer", "count").unwrap_or(0);
            failures
                .extend(log_problems(&stderr).into_iter().map(|l| format!("round {round}: server log: {l}")));
            let stage = if stderr.contains("vitrine serving") {
                "serving"
            } else if stderr.contains("index writer open") {
                "recovered"
            } else {
                "starting"
            };
            recovery_kill = format!("; killed again {after} ms into the restart ({stage})");
        }

        // Restart on the same directory and compare.
        server = Server::start(&data_dir, log(round)).await;
        let report = check(&server.url, &data_dir, &model).await;
        let restart_log = std::fs::read_to_string(&server.log).unwrap_or_default();
        let replayed = log_field(&restart_log, "index writer open", "replayed").unwrap_or(0);
        orphans +=
            log_field(&restart_log, "removed files left by an interrupted writer", "count").unwrap_or(0);
        orphan_rounds += usize::from(orphans > 0);
        acked_total += acked;
        lost_total += report.lost.len();
        {
            let m = model.lock().unwrap();
            for (sku, whys) in &report.lost {
                let last = m
                    .get(sku)
                    .and_then(|e| e.last_ack)
                    .map_or("none".to_string(), |(r, what)| format!("{what} in round {r}"));
                for why in whys {
                    failures
                        .push(format!("round {round}: LOST {sku} (last acknowledged write: {last}): {why}"));
                }
            }
        }
        println!(
            "round {round}/{rounds}: killed after {delay} ms ({seals} seals, {merges} merges); acknowledged {acked}, \
             {in_flight} in flight{recovery_kill}; restart replayed {replayed} log records, removed {orphans} orphan \
             files; checked {} skus with {} searches, {} re-read; lost {}",
            report.checked,
            report.searches,
            report.resynced,
            report.lost.len()
        );
    }
    let stderr = server.kill();
    failures.extend(log_problems(&stderr).into_iter().map(|l| format!("last server log: {l}")));
    let acked_skus = model.lock().unwrap().values().filter(|e| e.acked > 0).count();
    println!(
        "{rounds} rounds in {:.1} s; {acked_skus} skus written; {orphan_rounds} restarts removed files of a seal or merge cut short",
        started.elapsed().as_secs_f64()
    );
    println!("rounds {rounds} / acknowledged {acked_total} / lost {lost_total}");
    assert!(
        failures.is_empty(),
        "{} problems (VITRINE_CRASH_SEED={seed}):\n{}",
        failures.len(),
        failures.iter().take(40).cloned().collect::<Vec<_>>().join("\n")
    );
}
