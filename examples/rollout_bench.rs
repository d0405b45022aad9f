//! Measures canary rollouts on the bundled catalogue, with the real `vitrine` binary:
//!
//! A. the gate figures (recall@10, MRR) of every shipped model version on the bundled golden
//!    set (exact search over the catalogue embedded with that version), and each version's own
//!    batch embedding rate (images/s at batch 32, preprocessing included, same threads);
//! B. a rollout of `--model` (default efficientnet-lite2) on a running server: SearchBySku
//!    p50/p99 idle and during the backfill, the backfill's images/s against the model's own
//!    batch rate, a SIGKILL of the server mid-backfill and the restart's resume (how many
//!    images were not embedded again), every SKU in both versions at the end;
//! C. promote and rollback under continuous search load from 4 clients: p99 before and
//!    during each swap, failed and empty responses.
//!
//! Run: `cargo build --release && cargo run --release --example rollout_bench -- [--json]`.
//! Absolute times on a shared 2-core machine are noise; compare within one run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::json;
use tonic::transport::Channel;
use vitrine::models::{DEFAULT_MODEL, ModelRegistry};
use vitrine::proto;
use vitrine::proto::rollouts_client::RolloutsClient;
use vitrine::proto::visual_search_client::VisualSearchClient;
use vitrine::rollout::metrics::{GoldenResult, gate_figures};

#[derive(Parser)]
struct Args {
    /// The model version to roll out in part B.
    #[arg(long, default_value = "efficientnet-lite2")]
    model: String,
    /// Print one JSON object at the end.
    #[arg(long)]
    json: bool,
    /// Seconds of search load per measurement window.
    #[arg(long, default_value_t = 4.0)]
    seconds: f64,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

fn catalogue() -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let text = std::fs::read_to_string(repo().join("data/catalog.jsonl"))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            let img = std::fs::read(repo().join("data").join(v["image"].as_str().unwrap_or_default()))?;
            Ok((v["sku"].as_str().unwrap_or_default().to_string(), img))
        })
        .collect()
}

fn golden() -> anyhow::Result<Vec<(Vec<u8>, Vec<String>)>> {
    let text = std::fs::read_to_string(repo().join("data/golden.jsonl"))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l)?;
            let img = std::fs::read(repo().join("data").join(v["image"].as_str().unwrap_or_default()))?;
            let expected =
                v["expected"].as_array().into_iter().flatten().filter_map(|x| x.as_str()).map(String::from);
            Ok((img, expected.collect()))
        })
        .collect()
}

/// Part A: per version, gate figures by exact search and the batch embedding rate.
fn part_a(versions: &[&str]) -> anyhow::Result<Vec<serde_json::Value>> {
    let models = ModelRegistry::new(repo().join("models"), vitrine::encoder::default_device()?);
    let cat = catalogue()?;
    let gold = golden()?;
    let mut out = Vec::new();
    for v in versions {
        let enc = models.get(&vitrine::ids::ModelVersion::new(*v)?)?;
        // The model's own batch rate on the threads a backfill gets (the server's backfill
        // pool size), so the backfill's share of it compares like with like.
        let pool =
            rayon::ThreadPoolBuilder::new().num_threads(vitrine::background::backfill_threads()).build()?;
        let started = Instant::now();
        let mut vectors = Vec::new();
        for chunk in cat.chunks(32) {
            let prepared =
                pool.install(|| chunk.iter().map(|(_, b)| enc.preprocess(b)).collect::<Result<Vec<_>, _>>())?;
            vectors.extend(pool.install(|| enc.embed(&prepared))?);
        }
        let rate = cat.len() as f64 / started.elapsed().as_secs_f64();
        let mut results = Vec::new();
        for (img, expected) in &gold {
            let q = enc.embed(&[enc.preprocess(img)?])?.remove(0);
            let mut scored: Vec<(f32, &str)> = vectors
                .iter()
                .zip(&cat)
                .map(|(x, (sku, _))| (vitrine::segment::dot(&q, x), sku.as_str()))
                .collect();
            scored.sort_by(|a, b| b.0.total_cmp(&a.0));
            let hits: Vec<String> = scored.iter().take(10).map(|(_, s)| s.to_string()).collect();
            results.push((hits, expected.clone()));
        }
        let gr: Vec<GoldenResult<'_>> =
            results.iter().map(|(h, e)| GoldenResult { hits: h, expected: e }).collect();
        let f = gate_figures(&gr);
        eprintln!(
            "A {v}: recall@10 {:.3}, MRR {:.3} over {} golden queries; batch-32 embedding {rate:.1} images/s on {} thread(s) (the backfill pool's size)",
            f.recall_at_10,
            f.mrr,
            f.queries,
            vitrine::background::backfill_threads()
        );
        out.push(json!({"version": v, "recall_at_10": f.recall_at_10, "mrr": f.mrr, "queries": f.queries,
            "batch_images_per_second": rate}));
    }
    Ok(out)
}

struct Server {
    child: Child,
    addr: String,
}

fn exe() -> PathBuf {
    repo().join("target/release/vitrine")
}

fn start_server(dir: &Path, port: u16) -> anyhow::Result<Server> {
    let log = std::fs::File::create(dir.with_extension(format!("serve-{port}.log")))?;
    let child = Command::new(exe())
        .args(["serve", "--data-dir"])
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--models"])
        .arg(repo().join("models"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("start vitrine serve (build it first: cargo build --release)")?;
    Ok(Server { child, addr: format!("http://127.0.0.1:{port}") })
}

async fn connect(addr: &str) -> anyhow::Result<Channel> {
    for _ in 0..400 {
        if let Ok(ch) = Channel::from_shared(addr.to_string())?.connect().await {
            let mut c = VisualSearchClient::new(ch.clone());
            if c.get_index_info(proto::GetIndexInfoRequest {}).await.is_ok() {
                return Ok(ch);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("server at {addr} did not come up")
}

/// SearchBySku load from `clients` tasks for `secs`: latencies (ms), failures, empty answers.
async fn load(
    ch: &Channel,
    skus: &[String],
    clients: usize,
    secs: f64,
    stop_early: Option<Arc<AtomicBool>>,
) -> (Vec<f64>, u64, u64) {
    let failures = Arc::new(AtomicU64::new(0));
    let empties = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let mut client = VisualSearchClient::new(ch.clone());
        let skus = skus.to_vec();
        let (failures, empties, stop) = (Arc::clone(&failures), Arc::clone(&empties), stop_early.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let end = Instant::now() + Duration::from_secs_f64(secs);
            let mut i = c;
            while Instant::now() < end && !stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
                let t = Instant::now();
                let r = client
                    .search_by_sku(proto::SearchBySkuRequest {
                        sku: skus[i % skus.len()].clone(),
                        routing_key: format!("shopper-{}", i % 97),
                        ..Default::default()
                    })
                    .await;
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                match r {
                    Ok(resp) if resp.get_ref().hits.is_empty() => {
                        empties.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(_) => {}
                    Err(_) => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += clients;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    (all, failures.load(Ordering::Relaxed), empties.load(Ordering::Relaxed))
}

async fn status(ch: &Channel) -> anyhow::Result<proto::RolloutStatus> {
    Ok(RolloutsClient::new(ch.clone()).status(proto::RolloutActionRequest::default()).await?.into_inner())
}

fn p(v: &mut [f64]) -> (f64, f64) {
    (percentile(v, 0.5), percentile(v, 0.99))
}

/// Runs a swap (`act`) while 4 clients search; p99 before and during, failures, empties.
async fn swap_under_load(
    ch: &Channel,
    skus: &[String],
    secs: f64,
    act: &str,
) -> anyhow::Result<serde_json::Value> {
    let (mut before, f0, e0) = load(ch, skus, 4, secs, None).await;
    let ch2 = ch.clone();
    let skus2 = skus.to_vec();
    let during = tokio::spawn(async move { load(&ch2, &skus2, 4, secs, None).await });
    tokio::time::sleep(Duration::from_secs_f64(secs / 2.0)).await;
    let mut r = RolloutsClient::new(ch.clone());
    let t = Instant::now();
    let s = match act {
        "promote" => r.promote(proto::RolloutActionRequest::default()).await?,
        _ => r.rollback(proto::RolloutActionRequest::default()).await?,
    }
    .into_inner();
    let swap_ms = t.elapsed().as_secs_f64() * 1e3;
    let (mut dur, f1, e1) = during.await?;
    let (b50, b99) = p(&mut before);
    let (d50, d99) = p(&mut dur);
    eprintln!(
        "C {act}: serving {} after {swap_ms:.1} ms; p50/p99 before {b50:.2}/{b99:.2} ms, during {d50:.2}/{d99:.2} ms \
         (ratio {:.2}); failed {}, empty {} of {} responses",
        s.serving,
        d99 / b99,
        f0 + f1,
        e0 + e1,
        before.len() + dur.len()
    );
    Ok(
        json!({"action": act, "swap_ms": swap_ms, "p50_before_ms": b50, "p99_before_ms": b99, "p50_during_ms": d50,
        "p99_during_ms": d99, "p99_ratio": d99 / b99, "failed": f0 + f1, "empty": e0 + e1,
        "responses": before.len() + dur.len()}),
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    eprintln!("rollout_bench on {} cores; absolute times are noisy, compare within this run", num_cpus());
    let a = part_a(&[DEFAULT_MODEL, "efficientnet-lite2", "efficientnet-lite0-gem"])?;
    let own_rate = a
        .iter()
        .find(|r| r["version"] == args.model.as_str())
        .and_then(|r| r["batch_images_per_second"].as_f64());

    // B. A live rollout on the real binary.
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("data");
    let st = Command::new(exe())
        .args(["ingest", "--quiet", "--data-dir"])
        .arg(&dir)
        .arg("--catalog")
        .arg(repo().join("data/catalog.jsonl"))
        .arg("--models")
        .arg(repo().join("models"))
        .status()?;
    if !st.success() {
        bail!("ingest failed");
    }
    let skus: Vec<String> = catalogue()?.into_iter().map(|(s, _)| s).collect();
    let port = 50_700 + (std::process::id() % 200) as u16;
    let mut server = start_server(&dir, port)?;
    let ch = connect(&server.addr).await?;
    let (mut idle, _, _) = load(&ch, &skus, 2, args.seconds, None).await;
    let (i50, i99) = p(&mut idle);
    let golden: Vec<proto::GoldenQuery> = golden()?
        .into_iter()
        .map(|(image, expected)| proto::GoldenQuery { image, expected, name: String::new() })
        .collect();
    let mut r = RolloutsClient::new(ch.clone()).max_encoding_message_size(256 << 20);
    let t0 = Instant::now();
    r.start(proto::RolloutStartRequest {
        model_version: args.model.clone(),
        fraction: Some(0.5),
        shadow: Some(0.2),
        tolerance: Some(1.0),
        force: true,
        golden,
        backfill_throttle_ms: 0,
    })
    .await?;
    // Search load while the backfill runs (stopped when it is done).
    let done_flag = Arc::new(AtomicBool::new(false));
    let (ch2, skus2, flag2) = (ch.clone(), skus.clone(), Arc::clone(&done_flag));
    let during = tokio::spawn(async move { load(&ch2, &skus2, 2, 3600.0, Some(flag2)).await });
    // Kill the server once 40% is backfilled.
    let mut killed_at = 0u64;
    let total;
    loop {
        let s = status(&ch).await?;
        let b = s.backfill.unwrap_or_default();
        if b.total > 0 && b.done * 10 >= b.total * 4 {
            killed_at = b.done;
            total = b.total;
            break;
        }
        if s.state != "backfilling" {
            total = b.total;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_leg = t0.elapsed().as_secs_f64();
    done_flag.store(true, Ordering::Relaxed);
    let (mut during_lat, during_fail, _) = during.await?;
    let (b50, b99) = p(&mut during_lat);
    server.child.kill()?;
    server.child.wait()?;
    eprintln!("B killed the server with SIGKILL at {killed_at}/{total} backfilled ({first_leg:.1} s)");
    let mut server = start_server(&dir, port + 1)?;
    let ch = connect(&server.addr).await?;
    let resumed_from = status(&ch).await?.backfill.unwrap_or_default().done;
    let t1 = Instant::now();
    let mut last;
    loop {
        last = status(&ch).await?;
        if last.state != "backfilling" && last.state != "gating" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = last.backfill.unwrap_or_default();
    let second_leg = t1.elapsed().as_secs_f64();
    let rate = b.images_per_second;
    let mut missing = 0;
    let mut c = VisualSearchClient::new(ch.clone());
    let got = c.get(proto::GetRequest { skus: skus.clone() }).await?.into_inner();
    for rec in &got.records {
        if rec.model_versions.len() != 2 {
            missing += 1;
        }
    }
    eprintln!(
        "B after the restart the backfill resumed at {resumed_from}/{total}: {} images embedded after the restart, \
         {resumed_from} not embedded again; {missing} SKUs lack a version at the end; state {}",
        b.embedded, last.state
    );
    eprintln!(
        "B backfill {rate:.1} images/s (second leg, {second_leg:.1} s incl. the gate) vs the model's own batch rate {:.1} \
         images/s: {:.0}%; SearchBySku p50/p99 idle {i50:.2}/{i99:.2} ms, during backfill {b50:.2}/{b99:.2} ms \
         (p99 ratio {:.2}, {during_fail} failed)",
        own_rate.unwrap_or(f64::NAN),
        100.0 * rate / own_rate.unwrap_or(f64::NAN),
        b99 / i99
    );

    // C. Swaps under load.
    let s = status(&ch).await?;
    let g = s.guardrail.clone().unwrap_or_default();
    let sh = s.shadow.unwrap_or_default();
    eprintln!(
        "B status before the swaps: {} (shadow: {} compared, Jaccard {:.3}, RBO {:.3}; guardrail tripped {}: {})",
        s.state, sh.compared, sh.mean_jaccard, sh.mean_rbo, g.tripped, g.reason
    );
    if s.state != "canary" {
        bail!("the canary left traffic before the swaps: {}", g.reason);
    }
    let promote = swap_under_load(&ch, &skus, args.seconds, "promote").await?;
    let rollback = swap_under_load(&ch, &skus, args.seconds, "rollback").await?;
    server.child.kill()?;
    server.child.wait()?;
    if args.json {
        println!(
            "{}",
            json!({"gate": a, "backfill": {"model": args.model, "total": total, "killed_at": killed_at,
                "resumed_from": resumed_from, "embedded_after_restart": b.embedded, "not_reembedded": resumed_from,
                "skus_missing_a_version": missing, "images_per_second": rate, "own_batch_rate": own_rate,
                "p99_idle_ms": i99, "p99_during_ms": b99, "p50_idle_ms": i50, "p50_during_ms": b50},
                "promote": promote, "rollback": rollback})
        );
    }
    Ok(())
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
