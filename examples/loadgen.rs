//! Open-loop load generator for a running vitrine server (gRPC only, no Python in the loop).
//!
//! Requests are scheduled at a fixed rate whatever the server does (open loop): request i is
//! due at `start + i / rate`, and its latency is measured from that due time, so time spent
//! queued behind a slow server counts (no coordinated omission). The mix of kinds is drawn per
//! request from `--mix` weights:
//! - `image`: SearchByImage with a catalogue image (read once from `--catalog`);
//! - `vector`: SearchByVector with a random unit vector of the serving model's dimension, or
//!   with a random row of `--vectors FILE` (raw little-endian f32 rows of that dimension, e.g.
//!   held-out rows from `examples/scale_build --write-queries`: in-distribution queries);
//! - `sku`: SearchBySku with a catalogue SKU.
//!
//! `--spike-rate R --spike-at S --spike-secs D` replaces the rate by R between S and S+D
//! seconds: a spike over the sustainable rate. Requests are spread over `--connections` HTTP/2
//! channels. At most `--max-in-flight` requests are outstanding; a request due beyond that is
//! counted as `client_dropped`, never sent (the client's own memory stays bounded).
//!
//! Prints, per kind and in total: sent, ok, shed (RESOURCE_EXHAUSTED), other errors by code,
//! achieved ok/s, and p50/p99/p99.9/max latency of the ok answers from their due time (plus
//! p50/p99 from the moment each was sent: the client's timer has about 1 ms resolution); `--json` prints one JSON
//! object instead.
//!
//! Run: `cargo run --release --example loadgen -- --addr http://127.0.0.1:50051 --rate 200
//! --duration 10 --mix vector=8,sku=1,image=1`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use parking_lot::Mutex;
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};
use vitrine::ingest::catalog::parse_catalog;
use vitrine::proto;
use vitrine::proto::visual_search_client::VisualSearchClient;
use vitrine::segment::synth::SplitMix64;

#[derive(Parser)]
#[command(about = "Open-loop gRPC load generator for vitrine (SearchByImage / SearchByVector / SearchBySku)")]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Requests per second (open loop).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seconds of load.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Weights of the request kinds, e.g. `vector=8,sku=1,image=1`.
    #[arg(long, default_value = "vector=1")]
    mix: String,
    /// HTTP/2 connections the requests are spread over.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Most requests outstanding at once; requests due beyond it are dropped by the client.
    #[arg(long, default_value_t = 20_000)]
    max_in_flight: usize,
    /// k of every query.
    #[arg(long, default_value_t = 10)]
    k: u32,
    /// Catalogue whose SKUs and images the `sku` and `image` queries use.
    #[arg(long, default_value = "data/catalog.csv")]
    catalog: PathBuf,
    /// Vector queries drawn from this file's rows (raw little-endian f32, the model's
    /// dimension per row) instead of random unit vectors.
    #[arg(long)]
    vectors: Option<PathBuf>,
    /// Model version of the vector queries (default: the serving one).
    #[arg(long)]
    model_version: Option<String>,
    /// A spike: this rate instead of `--rate` from `--spike-at` for `--spike-secs` seconds.
    #[arg(long)]
    spike_rate: Option<f64>,
    #[arg(long, default_value_t = 0.0)]
    spike_at: f64,
    #[arg(long, default_value_t = 0.0)]
    spike_secs: f64,
    /// Per-request deadline (the client gives up and counts a DeadlineExceeded).
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Image,
    Vector,
    Sku,
}

impl Kind {
    fn parse(s: &str) -> anyhow::Result<Kind> {
        Ok(match s {
            "image" => Kind::Image,
            "vector" => Kind::Vector,
            "sku" => Kind::Sku,
            other => bail!("--mix: unknown kind {other:?} (image, vector, sku)"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Image => "image",
            Kind::Vector => "vector",
            Kind::Sku => "sku",
        }
    }
}

/// What one kind of request did.
#[derive(Default)]
struct Tally {
    sent: u64,
    /// Latency of each ok answer from its due time (includes any client-side delay).
    ok_micros: Vec<u64>,
    /// The same from the moment the request was actually sent.
    ok_sent_micros: Vec<u64>,
    shed: u64,
    errors: BTreeMap<String, u64>,
    client_dropped: u64,
}

impl Tally {
    fn merge(&mut self, o: &Tally) {
        self.sent += o.sent;
        self.ok_micros.extend_from_slice(&o.ok_micros);
        self.ok_sent_micros.extend_from_slice(&o.ok_sent_micros);
        self.shed += o.shed;
        self.client_dropped += o.client_dropped;
        for (k, v) in &o.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }

    fn json(&mut self, secs: f64) -> Value {
        self.ok_micros.sort_unstable();
        self.ok_sent_micros.sort_unstable();
        let q = |v: &[u64], p: f64| -> Option<f64> {
            (!v.is_empty())
                .then(|| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1] as f64 / 1000.0)
        };
        let (due, sent) = (&self.ok_micros, &self.ok_sent_micros);
        json!({
            "sent": self.sent, "ok": due.len(), "shed": self.shed,
            "errors": self.errors, "client_dropped": self.client_dropped,
            "ok_per_sec": due.len() as f64 / secs,
            "p50_ms": q(due, 0.50), "p99_ms": q(due, 0.99), "p999_ms": q(due, 0.999), "max_ms": q(due, 1.0),
            "from_send": {"p50_ms": q(sent, 0.50), "p99_ms": q(sent, 0.99), "p999_ms": q(sent, 0.999)},
        })
    }
}

fn line(name: &str, v: &Value) -> String {
    let ms = |k: &str| v[k].as_f64().map_or("-".to_string(), |x| format!("{x:.2}"));
    format!(
        "{name:>7}: sent {} ok {} ({:.1}/s) shed {} errors {} client-dropped {} | from due time: p50 {} ms p99 {} ms p99.9 {} ms max {} ms | from send: p50 {} ms p99 {} ms",
        v["sent"],
        v["ok"],
        v["ok_per_sec"].as_f64().unwrap_or(0.0),
        v["shed"],
        v["errors"],
        v["client_dropped"],
        ms("p50_ms"),
        ms("p99_ms"),
        ms("p999_ms"),
        ms("max_ms"),
        v["from_send"]["p50_ms"].as_f64().map_or("-".to_string(), |x| format!("{x:.2}")),
        v["from_send"]["p99_ms"].as_f64().map_or("-".to_string(), |x| format!("{x:.2}")),
    )
}

struct Material {
    skus: Vec<String>,
    images: Vec<Arc<Vec<u8>>>,
    dim: usize,
    version: String,
    /// `--vectors` rows, `dim` values each (empty: random unit vectors).
    vectors: Vec<f32>,
}

fn parse_mix(mix: &str) -> anyhow::Result<Vec<(Kind, f64)>> {
    let mut out = Vec::new();
    for part in mix.split(',').filter(|p| !p.trim().is_empty()) {
        let (k, w) = part.split_once('=').unwrap_or((part, "1"));
        let w: f64 = w.trim().parse().with_context(|| format!("--mix: weight of {k:?}"))?;
        if !(w >= 0.0 && w.is_finite()) {
            bail!("--mix: weight of {k:?} must be a non-negative number");
        }
        out.push((Kind::parse(k.trim())?, w));
    }
    if out.iter().map(|(_, w)| w).sum::<f64>() <= 0.0 {
        bail!("--mix: no kind has a positive weight");
    }
    Ok(out)
}

async fn material(args: &Args, mix: &[(Kind, f64)], ch: Channel) -> anyhow::Result<Material> {
    let needs = |k: Kind| mix.iter().any(|&(m, w)| m == k && w > 0.0);
    let mut skus = Vec::new();
    let mut images = Vec::new();
    if needs(Kind::Sku) || needs(Kind::Image) {
        let parsed = parse_catalog(&args.catalog, None)
            .with_context(|| format!("reading {}", args.catalog.display()))?;
        for row in parsed.rows {
            skus.push(row.sku.to_string());
            if needs(Kind::Image) && images.len() < 64 {
                let bytes =
                    std::fs::read(&row.image).with_context(|| format!("reading {}", row.image.display()))?;
                images.push(Arc::new(bytes));
            }
        }
        if skus.is_empty() {
            bail!("{} has no valid rows", args.catalog.display());
        }
    }
    let info = VisualSearchClient::new(ch).get_index_info(proto::GetIndexInfoRequest {}).await?.into_inner();
    let version = args.model_version.clone().unwrap_or(info.serving_model_version);
    let dim = info
        .models
        .iter()
        .find(|m| m.model_version == version)
        .map(|m| m.dim as usize)
        .with_context(|| format!("the server has no model version {version:?}"))?;
    let vectors = match &args.vectors {
        None => Vec::new(),
        Some(path) => {
            let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let row = dim * 4;
            if bytes.is_empty() || bytes.len() % row != 0 {
                bail!("{}: {} bytes is not a whole number of {dim}-d f32 rows", path.display(), bytes.len());
            }
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
    };
    Ok(Material { skus, images, dim, version, vectors })
}

fn unit_vector(rng: &mut SplitMix64, dim: usize) -> Vec<f32> {
    let mut v: Vec<f32> = (0..dim).map(|_| rng.gaussian() as f32).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= n);
    v
}

async fn one(
    mut client: VisualSearchClient<Channel>,
    req: Req,
    k: u32,
    timeout: Duration,
) -> Result<(), tonic::Status> {
    let options = Some(proto::SearchOptions { k, ..Default::default() });
    let call = async {
        match req {
            Req::Image(image) => client
                .search_by_image(proto::SearchByImageRequest {
                    image: image.to_vec(),
                    options,
                    ..Default::default()
                })
                .await
                .map(drop),
            Req::Vector(vector, v) => client
                .search_by_vector(proto::SearchByVectorRequest { model_version: v, vector, options })
                .await
                .map(drop),
            Req::Sku(sku) => client
                .search_by_sku(proto::SearchBySkuRequest { sku, options, ..Default::default() })
                .await
                .map(drop),
        }
    };
    match tokio::time::timeout(timeout, call).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded("client timeout")),
    }
}

enum Req {
    Image(Arc<Vec<u8>>),
    Vector(Vec<f32>, String),
    Sku(String),
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let positive = |x: f64| x > 0.0 && x.is_finite();
    if !positive(args.rate) || !positive(args.duration) || args.spike_rate.is_some_and(|r| !positive(r)) {
        bail!("--rate, --duration and --spike-rate must be positive");
    }
    let mix = parse_mix(&args.mix)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = rt.block_on(async {
        let mut channels = Vec::new();
        for _ in 0..args.connections.max(1) {
            let ch = Endpoint::from_shared(args.addr.clone())?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("connecting to {}", args.addr))?;
            channels.push(ch);
        }
        let m = material(&args, &mix, channels[0].clone()).await?;
        let total_w: f64 = mix.iter().map(|(_, w)| w).sum();
        let tallies: Arc<Mutex<BTreeMap<Kind, Tally>>> = Arc::default();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let mut rng = SplitMix64::new(args.seed);
        let timeout = Duration::from_millis(args.timeout_ms);
        let start = Instant::now();
        let mut due = Duration::ZERO;
        let mut handles = Vec::new();
        let mut i = 0usize;
        while due.as_secs_f64() < args.duration {
            let now = start.elapsed();
            if due > now {
                tokio::time::sleep(due - now).await;
            }
            let mut pick = rng.next_f64() * total_w;
            let kind = mix.iter().find(|&&(_, w)| {
                pick -= w;
                pick < 0.0
            });
            let kind = kind.map_or(mix[0].0, |&(k, _)| k);
            let req = match kind {
                Kind::Image => Req::Image(Arc::clone(&m.images[rng.below(m.images.len() as u64) as usize])),
                Kind::Vector if !m.vectors.is_empty() => {
                    let row = rng.below((m.vectors.len() / m.dim) as u64) as usize;
                    Req::Vector(m.vectors[row * m.dim..(row + 1) * m.dim].to_vec(), m.version.clone())
                }
                Kind::Vector => Req::Vector(unit_vector(&mut rng, m.dim), m.version.clone()),
                Kind::Sku => Req::Sku(m.skus[rng.below(m.skus.len() as u64) as usize].clone()),
            };
            let sched = start + due;
            if in_flight.load(Ordering::Relaxed) >= args.max_in_flight {
                let mut t = tallies.lock();
                let e = t.entry(kind).or_default();
                e.sent += 1;
                e.client_dropped += 1;
            } else {
                in_flight.fetch_add(1, Ordering::Relaxed);
                let client = VisualSearchClient::new(channels[i % channels.len()].clone())
                    .max_decoding_message_size(64 << 20)
                    .max_encoding_message_size(64 << 20);
                let (tallies, in_flight, k) = (Arc::clone(&tallies), Arc::clone(&in_flight), args.k);
                handles.push(tokio::spawn(async move {
                    let sent_at = Instant::now();
                    let r = one(client, req, k, timeout).await;
                    let micros = sched.elapsed().as_micros() as u64;
                    let sent_micros = sent_at.elapsed().as_micros() as u64;
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    let mut t = tallies.lock();
                    let e = t.entry(kind).or_default();
                    e.sent += 1;
                    match r {
                        Ok(()) => {
                            e.ok_micros.push(micros);
                            e.ok_sent_micros.push(sent_micros);
                        }
                        Err(s) if s.code() == tonic::Code::ResourceExhausted => e.shed += 1,
                        Err(s) => *e.errors.entry(format!("{:?}", s.code())).or_default() += 1,
                    }
                }));
            }
            i += 1;
            let t = due.as_secs_f64();
            let rate = match args.spike_rate {
                Some(r) if t >= args.spike_at && t < args.spike_at + args.spike_secs => r,
                _ => args.rate,
            };
            due += Duration::from_secs_f64(1.0 / rate);
        }
        for h in handles {
            let _ = h.await;
        }
        let secs = args.duration;
        let mut t = std::mem::take(&mut *tallies.lock());
        let mut total = Tally::default();
        let mut kinds = serde_json::Map::new();
        for (kind, tally) in t.iter_mut() {
            total.merge(tally);
            kinds.insert(kind.name().into(), tally.json(secs));
        }
        anyhow::Ok(json!({
            "addr": args.addr, "rate": args.rate, "duration_s": secs, "mix": args.mix,
            "spike": args.spike_rate.map(|r| json!({"rate": r, "at_s": args.spike_at, "secs": args.spike_secs})),
            "connections": args.connections, "total": total.json(secs), "kinds": kinds,
        }))
    })?;
    if args.json {
        println!("{report}");
    } else {
        println!(
            "loadgen: {} req/s for {} s{} ({}), {} connections",
            args.rate,
            args.duration,
            args.spike_rate.map_or(String::new(), |r| format!(
                ", spike {r} req/s at {} s for {} s",
                args.spike_at, args.spike_secs
            )),
            args.mix,
            args.connections
        );
        if let Some(kinds) = report["kinds"].as_object() {
            for (name, v) in kinds {
                println!("{}", line(name, v));
            }
        }
        println!("{}", line("total", &report["total"]));
    }
    Ok(())
}
