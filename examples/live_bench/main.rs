//! Benchmarks the live write path end to end: a real vitrine server in this process (on
//! 127.0.0.1:0, over a fresh temporary data directory), driven only through real gRPC clients,
//! one HTTP/2 channel per simulated client.
//!
//! Phases (each prints a line; `--json` prints one JSON object at the end instead, the lines
//! going to stderr):
//! 0. fsync baseline: append a 5 KiB record to a file in the temp dir and `sync_data`, the
//!    floor under every durable acknowledgement.
//! 1. vector upserts, one client, sequential: ack latency and upserts/s. In this phase and in
//!    2a a disk watch appends 5 KiB and syncs on a file of its own every 10 ms
//!    (`--disk-watch-ms`) and its line says how often the disk itself took over 5 ms and how
//!    many acks over 5 ms were in flight during such a sync.
//! 2. (first, before 2a; `--no-floor` skips it) phase 2f, the floor under 2a: the same paced
//!    clients against a bare gRPC server in this process (`floor.rs`) that only group-commits
//!    their records, with the disk watch beside it; 2a's lines then give its p99 as a ratio to
//!    the floor's.
//! 2. vector upserts, N concurrent clients (default 16): (a) paced at `--paced-rate` (default
//!    5,000/s, the target's throughput) in total, open loop, latency from each request's
//!    scheduled send when its client was behind (a slow answer counts against the ones
//!    queued behind it), else from when the timer woke the client (tokio's timer wakes up to
//!    about a millisecond late; at most 1 ms of that is not counted, and the line below gives
//!    the latency from the scheduled send as well), the vectors drawn before the phase; (b)
//!    closed loop for a fixed time, flat out: ack latency and total upserts/s, plus frames vs
//!    records in the log files left on disk. A burst beyond what merges sustain meets the
//!    writer's backpressure in (b), and its p99 shows it.
//! 3. image upserts of every bundled catalogue image under a new SKU: ack latency, and the
//!    encoder's own time (preprocess + embed of that image, in-process, same run) next to it.
//! 4. SearchByVector k=10 from one client: idle; idle with a nearly full mutable segment;
//!    idle while one segment seals; for 30 s (8 with `--quick`) while 4 other clients upsert
//!    vectors, paced at `--write-rate` in total (default 1000/s); idle on the index that round
//!    left; 30 s with the 4 writers flat out (closed loop, for comparison); idle again
//!    afterwards. The paced round grows the index by tens of thousands of items while it is
//!    measured, so the target's ratio compares it with idle on the same index: the mean of
//!    the idle p99s before and after it (both printed, and the ratio to each). The paced
//!    writers' vectors are drawn before their round (real clients draw theirs on their own
//!    machines); each line gives the sealed segments' sizes.
//! 5. restart: 100k vector upserts logged through an `IndexWriter` opened directly, closed
//!    without a checkpoint, then the time of `IndexWriter::open` replaying the whole log (page
//!    cache warm, then with the log evicted).
//!
//! Vectors are uniform random unit vectors in 1,280 dimensions unless `--latent N` asks for
//! points of intrinsic dimension N (`synth::Structured`, like real embeddings): uniform random
//! vectors have no neighbourhood structure, so graph search on them costs nearly a scan.
//!
//! `--seal-items`, `--ef-construction`, `--max-pending-seals` and `--max-segments` change the
//! server's writer settings, to tell group commit from sealing and merging;
//! `RUST_LOG=vitrine=info` shows seal and merge times.
//! `--only-writes` stops after phase 2, and `--ack-trace FILE` writes its every ack (time,
//! latency) to correlate slow ones with seals (time 0 is logged as `upserts start` with
//! `RUST_LOG=live_bench=info`; `vitrine::index::wal=debug` logs every log sync over 8 ms, and
//! `vitrine::index::writer=debug` every write group the backpressure delays);
//! `--search-trace FILE` writes phase 4's searches while writing (time, latency, sealed
//! segments then), to see where in the round slow ones fall
//! (`RUST_LOG=vitrine=info,vitrine::request=warn` for seals and merges without a line per
//! request).
//!
//! Run: `cargo run --release --example live_bench -- [--quick] [--json]`
//! (or `tools/live_bench.sh`). Absolute numbers on a shared 2-core machine are noisy.

use std::collections::VecDeque;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};
use vitrine::ids::{ModelVersion, SegmentId, SkuId};
use vitrine::index::merge_policy::{MergePolicy, SegmentStat};
use vitrine::index::writer::{DEFAULT_SEAL_ITEMS, FLAT_SEGMENT_ITEMS};
use vitrine::index::{IndexWriter, ModelSpec, Outcome, Upsert, WriteOp, WriterConfig};
use vitrine::models::{DEFAULT_MODEL, ModelRegistry};
use vitrine::proto;
use vitrine::proto::visual_search_client::VisualSearchClient;
use vitrine::segment::synth::{Sampler, SplitMix64, Structured};
use vitrine::server::{ServeConfig, serve};

mod floor;
use floor::Floor;

/// EfficientNet-Lite0's embedding length.
const DIM: usize = 1280;
/// Records per `write_blocking` call while filling the restart log.
const RESTART_BATCH: usize = 256;

#[derive(Parser)]
#[command(
    about = "Benchmark vitrine's live write path (ack latency, group commit, image upserts, search while writing, restart)"
)]
struct Args {
    /// A shorter run: fewer upserts and queries, 3 s of concurrent writes, a 20k-record log.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object at the end (progress lines go to stderr).
    #[arg(long)]
    json: bool,
    /// Concurrent clients in phase 2.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds of concurrent writes in phase 2 (default 10; 3 with --quick).
    #[arg(long)]
    seconds: Option<f64>,
    /// Records in the phase-5 log (default 100000; 20000 with --quick).
    #[arg(long)]
    restart_items: Option<usize>,
    /// Diagnostic: the server's seal size (default: the server's own, 4096). A huge value
    /// (no seals during the run) separates group commit from sealing.
    #[arg(long)]
    seal_items: Option<usize>,
    /// Diagnostic: the server's HNSW ef_construction for seals and merges (default 200).
    #[arg(long)]
    ef_construction: Option<usize>,
    /// Phase 2a: total upserts/s of the paced clients (the target's throughput).
    #[arg(long, default_value_t = 5000.0)]
    paced_rate: f64,
    /// Phase 4: total upserts/s of the 4 writers in the paced round (a closed-loop round,
    /// flat out, follows it).
    #[arg(long, default_value_t = 1000.0)]
    write_rate: f64,
    /// Diagnostic: frozen segments queued for the sealer before writes wait (default: the
    /// server's own).
    #[arg(long)]
    max_pending_seals: Option<usize>,
    /// Diagnostic: frozen segments queued for the sealer before write groups are delayed
    /// (default: the server's own; `--max-pending-seals` or more turns the slowdown off).
    #[arg(long)]
    slowdown_pending_seals: Option<usize>,
    /// Diagnostic: the merge policy's segment count per version (default: the server's own).
    #[arg(long)]
    max_segments: Option<usize>,
    /// Diagnostic: the merge policy's limit on live items in flat (graph-less) segments per
    /// version (default: the server's own). With a large `--max-segments` too, a huge value
    /// turns merging off and separates seals from merges.
    #[arg(long)]
    max_flat_items: Option<u64>,
    /// Diagnostic: threads of merges and of seals with none waiting behind them (default:
    /// the server's own, half the cores).
    #[arg(long)]
    build_threads: Option<usize>,
    /// Steps of `nice` the runtime's threads run below the searches (`vitrine serve
    /// --io-nice`; 0: all at one priority, as before it existed).
    #[arg(long, default_value_t = vitrine::server::priority::DEFAULT_IO_NICE)]
    io_nice: i32,
    /// Diagnostic: write phase 2b's acknowledgements to this file (2a's to the same name with
    /// the extension `.paced`), one line each: seconds since the phase started when the ack
    /// arrived, then its latency in milliseconds.
    #[arg(long)]
    ack_trace: Option<PathBuf>,
    /// Diagnostic: write phase 4's searches while writing to this file (the paced round; the
    /// closed-loop one to the same name with the extension `.closed`), one line each: seconds
    /// since the round started when the search was sent, its latency in milliseconds, and the
    /// number of sealed segments then (sampled every 0.5 s).
    #[arg(long)]
    search_trace: Option<PathBuf>,
    /// Diagnostic: stop after phase 2 (skip images, searches and the restart).
    #[arg(long)]
    only_writes: bool,
    /// Skip phase 2f (the floor under 2a: the same paced clients against a bare gRPC server
    /// that only group-commits their records).
    #[arg(long)]
    no_floor: bool,
    /// Diagnostic: during phase 2f, a thread rewrites a file of this many MiB of zeros
    /// through vitrine's paced writer, over and over (as spare log files and segments are
    /// written while vitrine acknowledges writes); 0, the default: none.
    #[arg(long, default_value_t = 0)]
    floor_background_mib: u64,
    /// Diagnostic: during phase 2f, this many idle-class threads compute (as seals and merges
    /// do, yielding as they do) beside the floor.
    #[arg(long, default_value_t = 0)]
    floor_background_cpu: usize,
    /// Diagnostic: stop after phase 2f.
    #[arg(long)]
    only_floor: bool,
    /// Milliseconds between the disk watch's syncs during phases 1 and 2a (an append of 5 KiB
    /// and `sync_data` on a file of its own beside the server's data directory); 0 turns the
    /// watch off.
    #[arg(long, default_value_t = 10)]
    disk_watch_ms: u64,
    /// Vectors of this intrinsic dimension (a Gaussian latent mapped into 1,280 dimensions plus
    /// noise, like real embeddings) instead of uniform random ones (0, the default: a worst case
    /// for graph search, whose idle time then grows almost linearly with the index).
    #[arg(long, default_value_t = 0)]
    latent: usize,
    /// With `--latent`: the noise's standard deviation relative to the signal's.
    #[arg(long, default_value_t = 0.15)]
    noise: f64,
}

/// Sizes of one run.
struct Plan {
    sequential: usize,
    concurrent_secs: f64,
    images: usize,
    queries: usize,
    /// Phase 4: seconds each round of searches while 4 clients write lasts (a fixed time, so
    /// that the writes grow the index by the same amount however fast the searches run).
    write_round_secs: f64,
    restart_items: usize,
}

/// splitmix64: reproducible, fast, no dependency.
struct Rng(u64);

/// `--max-segments`, when given (the settled shape [`wait_quiet`] waits for).
static MAX_SEGMENTS: OnceLock<usize> = OnceLock::new();
/// `--max-flat-items`, for the same reason.
static MAX_FLAT_ITEMS: OnceLock<u64> = OnceLock::new();

/// The `--latent` data shape, when one was asked for (set once, before any vector is drawn).
static SHAPE: OnceLock<Sampler> = OnceLock::new();

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// A random unit vector: of the `--latent` shape if one was given, else with coordinates
    /// uniform in [-1, 1), then normalised.
    fn unit_vector(&mut self, dim: usize) -> Vec<f32> {
        if let Some(sampler) = SHAPE.get().filter(|_| dim == DIM) {
            return sampler.sample(&mut SplitMix64::new(self.next_u64()));
        }
        let mut v: Vec<f32> =
            (0..dim).map(|_| (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
        v.iter_mut().for_each(|x| *x /= norm);
        v
    }
}

/// Latency summary, in milliseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Lat {
    n: usize,
    mean: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    max: f64,
}

impl Lat {
    fn of(samples: &[Duration]) -> Self {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let n = ms.len();
        if n == 0 {
            return Self::default();
        }
        // Nearest rank on the sorted samples.
        let pct = |p: f64| ms[((p * n as f64).ceil() as usize).clamp(1, n) - 1];
        Self {
            n,
            mean: ms.iter().sum::<f64>() / n as f64,
            p50: pct(0.50),
            p99: pct(0.99),
            p999: pct(0.999),
            max: ms[n - 1],
        }
    }

    fn line(&self) -> String {
        format!(
            "p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms, mean {:.3} ms (n={})",
            self.p50, self.p99, self.p999, self.max, self.mean, self.n
        )
    }

    fn json(&self) -> Value {
        let r = |x: f64| (x * 1e4).round() / 1e4;
        json!({"n": self.n, "mean_ms": r(self.mean), "p50_ms": r(self.p50), "p99_ms": r(self.p99),
               "p999_ms": r(self.p999), "max_ms": r(self.max)})
    }
}

/// Where progress lines go: stdout, or stderr when stdout carries the JSON report.
struct Out {
    json: bool,
}

impl Out {
    fn line(&self, s: impl AsRef<str>) {
        if self.json {
            eprintln!("{}", s.as_ref());
        } else {
            println!("{}", s.as_ref());
            let _ = std::io::stdout().flush();
        }
    }
}

/// One target of the issue: what was measured against what limit.
struct Target {
    name: &'static str,
    measured: f64,
    limit: f64,
    unit: &'static str,
    higher_is_better: bool,
}

impl Target {
    fn met(&self) -> bool {
        if self.higher_is_better { self.measured >= self.limit } else { self.measured <= self.limit }
    }
}

type Client = VisualSearchClient<Channel>;

/// A server running in this process, stopped gracefully by [`Server::stop`].
struct Server {
    url: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(dir: &Path, models: Arc<ModelRegistry>, args: &Args) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let mut config = ServeConfig::new(dir);
        if let Some(n) = args.seal_items {
            config.writer.seal_items = n;
        }
        if let Some(ef) = args.ef_construction {
            config.writer.hnsw.ef_construction = ef;
        }
        if let Some(n) = args.max_segments {
            config.writer.merge.max_segments = n;
            let _ = MAX_SEGMENTS.set(n);
        }
        if let Some(n) = args.max_flat_items {
            config.writer.merge.max_flat_items = n;
            let _ = MAX_FLAT_ITEMS.set(n);
        }
        if let Some(n) = args.build_threads {
            config.writer.build_threads = n;
        }
        if let Some(n) = args.slowdown_pending_seals {
            config.writer.slowdown_pending_seals = n;
        }
        if let Some(n) = args.max_pending_seals {
            config.writer.max_pending_seals = n;
        }
        let task = tokio::spawn(serve(config, models, listener, async move {
            let _ = rx.await;
        }));
        let server = Self { url, stop, task };
        // Up once it answers a real RPC (the listener accepts before the writer is open).
        let started = Instant::now();
        loop {
            if let Ok(mut c) = server.client().await
                && c.get_index_info(proto::GetIndexInfoRequest {}).await.is_ok()
            {
                return Ok(server);
            }
            if server.task.is_finished() || started.elapsed() > Duration::from_secs(120) {
                let Server { task, .. } = server;
                task.await??;
                bail!("the server did not come up");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new client on its own HTTP/2 connection.
    async fn client(&self) -> anyhow::Result<Client> {
        connect(&self.url).await
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.task.await.context("server task")?
    }
}

/// A new client of the server at `url` on its own HTTP/2 connection.
async fn connect(url: &str) -> anyhow::Result<Client> {
    let channel = Endpoint::from_shared(url.to_string())?.tcp_nodelay(true).connect().await?;
    Ok(VisualSearchClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20))
}

fn vector_upsert(sku: String, version: &str, values: Vec<f32>) -> proto::UpsertRequest {
    proto::UpsertRequest {
        sku,
        attrs: None,
        payload: Some(proto::upsert_request::Payload::Vector(proto::VectorPayload {
            model_version: version.to_string(),
            values,
        })),
    }
}

/// One acknowledged upsert; fails unless the server added or updated the SKU.
async fn upsert(client: &mut Client, req: proto::UpsertRequest) -> anyhow::Result<()> {
    let sku = req.sku.clone();
    let resp = client.upsert(req).await.with_context(|| format!("upsert of {sku}"))?.into_inner();
    let ok = [proto::UpsertOutcome::Added as i32, proto::UpsertOutcome::Updated as i32];
    if !ok.contains(&resp.outcome) {
        bail!("upsert of {sku}: unexpected outcome {}", resp.outcome);
    }
    Ok(())
}

/// What GetIndexInfo says about the serving model's index.
#[derive(Debug, Clone, PartialEq)]
struct IndexShape {
    live_items: u64,
    /// Sealed segment ids with their item counts.
    segments: Vec<(u64, u64)>,
    generation: u64,
}

impl IndexShape {
    /// Live items not yet in a sealed segment (mutable plus frozen).
    fn unsealed(&self) -> u64 {
        self.live_items.saturating_sub(self.segments.iter().map(|s| s.1).sum())
    }

    /// "N live items, S sealed segments (their live items, largest first), U unsealed".
    fn line(&self) -> String {
        let mut sizes: Vec<u64> = self.segments.iter().map(|s| s.1).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let sizes: Vec<String> = sizes.iter().map(u64::to_string).collect();
        format!(
            "{} live items, {} sealed segments ({}), {} unsealed",
            self.live_items,
            self.segments.len(),
            sizes.join("/"),
            self.unsealed()
        )
    }
}

async fn shape(client: &mut Client) -> anyhow::Result<IndexShape> {
    let info = client.get_index_info(proto::GetIndexInfoRequest {}).await?.into_inner();
    let m = info.models.iter().find(|m| m.serving).context("no serving model")?;
    Ok(IndexShape {
        live_items: m.live_items,
        segments: m.segments.iter().map(|s| (s.id, s.count - s.deleted)).collect(),
        generation: info.manifest_generation,
    })
}

/// Writes `--ack-trace` lines: seconds since the phase started when the ack arrived, then its
/// latency in milliseconds.
fn write_ack_trace<'a>(
    path: &Path,
    acks: impl Iterator<Item = &'a (Duration, Duration)>,
) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for (lat, at) in acks {
        writeln!(f, "{:.6} {:.3}", at.as_secs_f64(), lat.as_secs_f64() * 1e3)?;
    }
    Ok(f.flush()?)
}

/// Vector upserts from every client for `secs` seconds: closed loop (each client sends its
/// next request when the last is answered), or paced at `rate` requests/s in total, each
/// client on its own fixed schedule, its latency measured from the scheduled send time (a
/// client behind schedule sends at once, and the wait counts; a client on time whose timer
/// wakes it late counts from when it woke, or from 1 ms after the scheduled time if it woke
/// later than that).
async fn drive_upserts(
    clients: &[Client],
    version: &str,
    prefix: &str,
    secs: f64,
    rate: Option<f64>,
) -> anyhow::Result<Sent> {
    let n = clients.len() as f64;
    // A paced client's vectors are drawn before the phase starts, as in phase 4: drawing one
    // (`--latent`: 1,328 Gaussians and a projection) on the runtime threads the in-process
    // server shares took a third of their CPU at 5,000/s (`perf`), a cost real clients put on
    // their own machines. The closed loop draws as it goes.
    let ahead = rate.map_or(0, |r| (secs * r / n).ceil() as usize + 1);
    let drawn: Vec<(Rng, VecDeque<Vec<f32>>)> = (0..clients.len())
        .map(|ci| {
            let mut rng = Rng(0xC0FFEE + ci as u64 + prefix.len() as u64 * 1000);
            let drawn = (0..ahead).map(|_| rng.unit_vector(DIM)).collect();
            (rng, drawn)
        })
        .collect();
    // Time 0 of `--ack-trace`, to line its slow acks up with the server's log lines.
    tracing::info!(prefix, "upserts start");
    let started = tokio::time::Instant::now();
    let deadline = started + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for ((ci, cl), (mut rng, mut drawn)) in clients.iter().enumerate().zip(drawn) {
        let (mut cl, v, prefix) = (cl.clone(), version.to_string(), prefix.to_string());
        tasks.push(tokio::spawn(async move {
            let (mut lats, mut late, mut strict) = (Vec::new(), Vec::new(), Vec::new());
            let mut prev_done = started;
            for i in 0usize.. {
                let scheduled = match rate {
                    Some(r) => started + Duration::from_secs_f64((ci as f64 + i as f64 * n) / r),
                    None => tokio::time::Instant::now(),
                };
                if scheduled >= deadline {
                    break;
                }
                let values = drawn.pop_front().unwrap_or_else(|| rng.unit_vector(DIM));
                let req = vector_upsert(format!("{prefix}-{ci:02}-{i:07}"), &v, values);
                tokio::time::sleep_until(scheduled).await;
                let sent = tokio::time::Instant::now();
                // Behind schedule (the last answer came after this send was due): the wait
                // counts. On time: the timer's own lateness does not, up to its 1 ms
                // resolution (tokio rounds a sleep up to the next millisecond tick), as the
                // client would have sent then; any lateness beyond that still counts.
                let from = if rate.is_some() && prev_done <= scheduled {
                    late.push(sent - scheduled);
                    scheduled + (sent - scheduled).min(TIMER_TICK)
                } else {
                    scheduled
                };
                upsert(&mut cl, req).await?;
                let now = tokio::time::Instant::now();
                lats.push((now - from, now - started));
                strict.push(now - scheduled);
                prev_done = now;
            }
            anyhow::Ok((lats, late, strict))
        }));
    }
    let (mut out, mut late, mut strict) = (Vec::new(), Vec::new(), Vec::new());
    for t in tasks {
        let (l, d, s) = t.await??;
        out.push(l);
        late.extend(d);
        strict.extend(s);
    }
    Ok(Sent { started: started.into_std(), lats: out, late, from_scheduled: strict })
}

/// What [`drive_upserts`] measured.
struct Sent {
    /// When the phase started (time 0 of `lats`).
    started: Instant,
    /// Per client: (latency, time since the start when the answer came).
    lats: Vec<Vec<(Duration, Duration)>>,
    /// Paced: how late the timer woke each client that was on time (empty when closed loop).
    late: Vec<Duration>,
    /// Every latency from the scheduled send time, timer lateness included.
    from_scheduled: Vec<Duration>,
}

/// The resolution of tokio's timer: a paced client's oversleep up to this is not counted.
const TIMER_TICK: Duration = Duration::from_millis(1);

/// Waits (with the server's seal size `seal_items`) until no seal can be pending (fewer unsealed items than a segment holds) and no merge
/// is due (at most the merge policy's segment limit), and nothing changed for 2 s. Returns the
/// seconds waited.
/// Waits for seals and merges to finish, then times `queries` searches (`one` runs one) and
/// prints a line starting with `label`: their latencies, the index's shape they ran on and
/// the seconds waited, which are returned.
async fn idle_round<F, Fut>(
    client: &mut Client,
    out: &Out,
    label: &str,
    seal_items: usize,
    queries: usize,
    mut one: F,
) -> anyhow::Result<(Lat, IndexShape, f64)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Duration>>,
{
    let quiet = wait_quiet(client, seal_items, Duration::from_secs(300)).await?;
    let shape = shape(client).await?;
    let mut lats = Vec::with_capacity(queries);
    for _ in 0..queries {
        lats.push(one().await?);
    }
    let lat = Lat::of(&lats);
    out.line(format!("{label} ({}; waited {quiet:.1} s): {}", shape.line(), lat.line()));
    Ok((lat, shape, quiet))
}

async fn wait_quiet(client: &mut Client, seal_items: usize, limit: Duration) -> anyhow::Result<f64> {
    let started = Instant::now();
    let defaults = MergePolicy::default();
    let policy = MergePolicy {
        max_segments: MAX_SEGMENTS.get().copied().unwrap_or(defaults.max_segments),
        max_flat_items: MAX_FLAT_ITEMS.get().copied().unwrap_or(defaults.max_flat_items),
        ..defaults
    };
    let mut last = shape(client).await?;
    let mut stable_since = Instant::now();
    while started.elapsed() < limit {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = shape(client).await?;
        if now != last {
            last = now;
            stable_since = Instant::now();
            continue;
        }
        // Settled: nothing left to seal, and the server's merge policy plans no merge on this
        // shape (segments of up to FLAT_SEGMENT_ITEMS are written flat, without a graph).
        let stats: Vec<SegmentStat> = last
            .segments
            .iter()
            .map(|&(id, live)| SegmentStat {
                id: SegmentId(id),
                count: live,
                live,
                graph: live > FLAT_SEGMENT_ITEMS as u64,
            })
            .collect();
        let settled = last.unsealed() < seal_items as u64 && policy.plan(&stats).is_none();
        if settled && stable_since.elapsed() >= Duration::from_secs(2) {
            break;
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

/// What the log files in a data directory hold (read from disk, in the log's frame format).
#[derive(Debug, Default, Clone, Copy)]
struct LogScan {
    /// Frames (each one `sync_data`) whose records all have seq > the scan's `after`.
    frames: u64,
    records: u64,
    /// Bytes of every log file.
    bytes: u64,
    /// The highest seq in the log.
    last_seq: u64,
}

/// Scans the log files now in `wal_dir`, counting frames of records after seq `after`.
fn scan_log(wal_dir: &Path, after: u64) -> anyhow::Result<LogScan> {
    const HEADER: usize = 24;
    let mut scan = LogScan::default();
    for entry in std::fs::read_dir(wal_dir)? {
        // The server keeps writing while this reads: a spare renamed into the log, or a
        // retired file, can go between the listing and the read.
        let data = match std::fs::read(entry?.path()) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            read => read?,
        };
        scan.bytes += data.len() as u64;
        let mut off = 0;
        while off + HEADER <= data.len() && &data[off..off + 4] == b"VWAL" {
            let body = u32::from_le_bytes(data[off + 4..off + 8].try_into()?) as usize;
            let first_seq = u64::from_le_bytes(data[off + 8..off + 16].try_into()?);
            let count = u32::from_le_bytes(data[off + 16..off + 20].try_into()?);
            if off + HEADER + body > data.len() || count == 0 {
                break;
            }
            if first_seq > after {
                scan.frames += 1;
                scan.records += u64::from(count);
            }
            scan.last_seq = scan.last_seq.max(first_seq + u64::from(count) - 1);
            off += HEADER + body;
        }
    }
    Ok(scan)
}

/// The floor under a durable ack on this disk: append `bytes` and `sync_data`, `n` times.
fn fsync_baseline(dir: &Path, n: usize, bytes: usize) -> anyhow::Result<Lat> {
    let path = dir.join("fsync-probe");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    let buf = vec![0x5au8; bytes];
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f.write_all(&buf)?;
        f.sync_data()?;
        samples.push(t.elapsed());
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(Lat::of(&samples))
}

/// The disk during a phase: a thread appends 5 KiB and calls `sync_data` on a file of its own
/// in the same file system every `every`, so that a run shows, next to its acknowledgements,
/// whether the disk itself stalled while they were measured (a durable ack cannot be faster
/// than the sync it waits for). Its load is small beside the log's own: at 5,000 upserts/s the
/// log syncs about 1,800 times a second, the watch 100 times.
struct DiskWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<anyhow::Result<Vec<(Instant, Duration)>>>,
}

/// A sync slower than this is a stall (the 16-client target's own limit).
const STALL: Duration = Duration::from_millis(5);

impl DiskWatch {
    fn start(dir: &Path, every: Duration) -> anyhow::Result<Option<Self>> {
        if every.is_zero() {
            return Ok(None);
        }
        let path = dir.join("disk-watch");
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new().name("disk-watch".into()).spawn(move || {
            let buf = vec![0x5au8; 5 * 1024 + 64];
            let mut syncs = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                f.write_all(&buf)?;
                f.sync_data()?;
                syncs.push((t, t.elapsed()));
                std::thread::sleep(every.saturating_sub(t.elapsed()));
            }
            drop(f);
            std::fs::remove_file(&path)?;
            Ok(syncs)
        })?;
        Ok(Some(Self { stop, thread }))
    }

    fn finish(self) -> anyhow::Result<Vec<(Instant, Duration)>> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| anyhow::anyhow!("the disk watch panicked"))?
    }
}

/// What the disk watch saw, and how many acks over [`STALL`] were in flight while one of its
/// syncs took longer than that. `acks`: (when the ack came, its latency).
fn disk_report(
    syncs: &[(Instant, Duration)],
    acks: impl Iterator<Item = (Instant, Duration)>,
) -> (String, Value) {
    let lat = Lat::of(&syncs.iter().map(|s| s.1).collect::<Vec<_>>());
    let stalls: Vec<(Instant, Instant)> =
        syncs.iter().filter(|s| s.1 > STALL).map(|&(t, d)| (t, t + d)).collect();
    let over = |ms: u64| syncs.iter().filter(|s| s.1 > Duration::from_millis(ms)).count();
    let (mut slow, mut during) = (0usize, 0usize);
    for (done, l) in acks.filter(|a| a.1 > STALL) {
        slow += 1;
        if stalls.iter().any(|&(a, b)| a < done && done - l < b) {
            during += 1;
        }
    }
    let line = format!(
        "   the disk meanwhile (a 5 KiB append + sync_data on its own file every {:.0} ms): p50 {:.3} ms, \
         p99 {:.3} ms, max {:.1} ms (n={}); {} syncs over 5 ms, {} over 20 ms; of the {slow} acks over 5 ms, \
         {during} were in flight during such a sync",
        syncs.windows(2).map(|w| (w[1].0 - w[0].0).as_secs_f64()).sum::<f64>() * 1e3
            / syncs.len().saturating_sub(1).max(1) as f64,
        lat.p50,
        lat.p99,
        lat.max,
        lat.n,
        stalls.len(),
        over(20)
    );
    let json = json!({"sync": lat.json(), "over_5ms": stalls.len(), "over_20ms": over(20),
                      "acks_over_5ms": slow, "acks_over_5ms_during_a_stall": during});
    (line, json)
}

/// Catalogue images (path, bytes), in catalogue order.
fn catalogue_images(repo: &Path) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    let catalog = repo.join("data/catalog.jsonl");
    let text = std::fs::read_to_string(&catalog).with_context(|| format!("reading {}", catalog.display()))?;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let v: Value = serde_json::from_str(line)?;
        let rel = v["image"].as_str().context("catalogue line without an image")?;
        let path = repo.join("data").join(rel);
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        out.push((path, bytes));
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.latent > 0 {
        let shape = Structured { dim: DIM, latent: args.latent, noise: args.noise, seed: 42 };
        let _ = SHAPE.set(shape.sampler());
    }
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let plan = if args.quick {
        Plan {
            sequential: 1000,
            concurrent_secs: 3.0,
            images: 40,
            queries: 1000,
            write_round_secs: 8.0,
            restart_items: 20_000,
        }
    } else {
        Plan {
            sequential: 3000,
            concurrent_secs: 10.0,
            images: usize::MAX,
            queries: 3000,
            write_round_secs: 30.0,
            restart_items: 100_000,
        }
    };
    let plan = Plan {
        concurrent_secs: args.seconds.unwrap_or(plan.concurrent_secs),
        restart_items: args.restart_items.unwrap_or(plan.restart_items),
        ..plan
    };
    let out = Out { json: args.json };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    out.line(format!(
        "live_bench: {cores} cores{}; vectors {}; absolute numbers on a shared 2-core machine are noisy, \
         ratios measured in one run less so",
        if args.quick { ", --quick" } else { "" },
        if args.latent > 0 {
            format!("of intrinsic dimension {} (noise {})", args.latent, args.noise)
        } else {
            "uniform random".into()
        }
    ));

    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let device = vitrine::encoder::default_device()?;
    let models = Arc::new(ModelRegistry::new(repo.join("models"), device));
    let version = ModelVersion::new(DEFAULT_MODEL)?;
    let encoder = models.get(&version)?;
    if encoder.dim() != DIM {
        bail!("{version} has dimension {}, expected {DIM}", encoder.dim());
    }
    let tmp = tempfile::tempdir()?;
    out.line(format!("data directories under {}", tmp.path().display()));
    let mut report = serde_json::Map::new();
    report.insert("cores".into(), json!(cores));
    report.insert(
        "vectors".into(),
        json!({"latent": args.latent, "noise": (args.latent > 0).then_some(args.noise)}),
    );
    report.insert("quick".into(), json!(args.quick));
    let mut targets: Vec<Target> = Vec::new();

    // Phase 0: the disk's fsync floor.
    let fsync = fsync_baseline(tmp.path(), if args.quick { 100 } else { 300 }, 5 * 1024 + 64)?;
    out.line(format!("0. fsync baseline (append 5 KiB + sync_data): {}", fsync.line()));
    report.insert("fsync_baseline".into(), fsync.json());

    // As `vitrine serve` runs: searches on the query pool, the runtime's threads (this bench's
    // clients too, as if on other machines) below it.
    let rt = vitrine::server::priority::runtime(args.io_nice)?;
    let server_dir = tmp.path().join("server");
    rt.block_on(async {
        let server = Server::start(&server_dir, Arc::clone(&models), &args).await?;
        let v = version.as_str();
        let mut rng = Rng(0x5EED);
        let seal_items = args.seal_items.unwrap_or(DEFAULT_SEAL_ITEMS);

        // Phase 1: one client, sequential.
        let mut c = server.client().await?;
        for i in 0..50 {
            upsert(&mut c, vector_upsert(format!("WARM-{i}"), v, rng.unit_vector(DIM))).await?;
        }
        let mut stored: Vec<Vec<f32>> = Vec::with_capacity(plan.sequential);
        let mut lats = Vec::with_capacity(plan.sequential);
        let mut done = Vec::with_capacity(plan.sequential);
        let watch_every = Duration::from_millis(args.disk_watch_ms);
        let watch = DiskWatch::start(tmp.path(), watch_every)?;
        let started = Instant::now();
        for i in 0..plan.sequential {
            let vec = rng.unit_vector(DIM);
            let req = vector_upsert(format!("P1-{i:06}"), v, vec.clone());
            let t = Instant::now();
            upsert(&mut c, req).await?;
            lats.push(t.elapsed());
            done.push(Instant::now());
            stored.push(vec);
        }
        let secs = started.elapsed().as_secs_f64();
        let l1 = Lat::of(&lats);
        let rate1 = plan.sequential as f64 / secs;
        out.line(format!("1. vector upsert, 1 client, sequential: {}; {rate1:.0} upserts/s", l1.line()));
        let mut seq_report = json!({"ack": l1.json(), "upserts_per_sec": rate1.round()});
        if let Some(w) = watch {
            let (line, disk) = disk_report(&w.finish()?, done.iter().copied().zip(lats.iter().copied()));
            out.line(line);
            seq_report["disk"] = disk;
        }
        report.insert("sequential".into(), seq_report);
        targets.push(Target {
            name: "vector upsert ack p99, 1 client",
            measured: l1.p99,
            limit: 2.0,
            unit: "ms",
            higher_is_better: false,
        });

        // Phase 2f: the floor under 2a (`floor.rs`): the same paced clients against a bare
        // server that only group-commits, run first, while vitrine's server is idle.
        let floor_p99 = if args.no_floor {
            None
        } else {
            let bytes = (args.paced_rate * plan.concurrent_secs * (DIM * 4 + 64) as f64) as u64;
            let floor = Floor::start(tmp.path(), bytes).await?;
            let mut floor_clients = Vec::with_capacity(args.clients);
            for _ in 0..args.clients {
                floor_clients.push(connect(&floor.url).await?);
            }
            let watch = DiskWatch::start(tmp.path(), watch_every)?;
            let stop_bg = Arc::new(AtomicBool::new(false));
            let bg = (args.floor_background_mib > 0)
                .then(|| floor::background_writer(tmp.path(), args.floor_background_mib << 20, Arc::clone(&stop_bg)))
                .transpose()?;
            let spinners: Vec<_> = (0..args.floor_background_cpu)
                .map(|_| floor::background_spinner(Arc::clone(&stop_bg)))
                .collect::<Result<_, _>>()?;
            let sent = drive_upserts(&floor_clients, v, "P2F", plan.concurrent_secs, Some(args.paced_rate)).await?;
            stop_bg.store(true, Ordering::Relaxed);
            for s in spinners {
                let _ = s.join();
            }
            if let Some(bg) = bg {
                let files = bg.join().map_err(|_| anyhow::anyhow!("the floor's background writer panicked"))??;
                out.line(format!(
                    "   (diagnostic) beside it, {files} files of {} MiB written through the paced writer",
                    args.floor_background_mib
                ));
            }
            let disk = watch.map(DiskWatch::finish).transpose()?;
            drop(floor_clients);
            let syncs = floor.stop().await?;
            let lat = Lat::of(&sent.lats.iter().flatten().map(|x| x.0).collect::<Vec<_>>());
            out.line(format!(
                "2f. the floor: the same {} clients at {:.0}/s against a bare gRPC server that only group-commits \
                 (tonic, one write + sync_data per group, nothing else): {}; {:.1} records per sync",
                args.clients,
                args.paced_rate,
                lat.line(),
                lat.n as f64 / syncs.max(1) as f64
            ));
            let mut floor_report = json!({"ack": lat.json(), "syncs": syncs});
            if let Some(syncs) = &disk {
                let acks = sent.lats.iter().flatten().map(|&(l, at)| (sent.started + at, l));
                let (line, disk) = disk_report(syncs, acks);
                out.line(line);
                floor_report["disk"] = disk;
            }
            report.insert("paced_floor".into(), floor_report);
            if args.only_floor {
                server.stop().await?;
                let _ = std::fs::remove_dir_all(tmp.path());
                std::process::exit(0);
            }
            Some(lat.p99)
        };

        // Phase 2a: N clients paced at the target rate in total (open loop, latency from each
        // request's scheduled time, so a slow answer also counts against the ones behind it).
        let mut clients = Vec::with_capacity(args.clients);
        for _ in 0..args.clients {
            clients.push(server.client().await?);
        }
        let watch = DiskWatch::start(tmp.path(), watch_every)?;
        let sent = drive_upserts(&clients, v, "P2A", plan.concurrent_secs, Some(args.paced_rate)).await?;
        let disk = watch.map(DiskWatch::finish).transpose()?;
        let paced = &sent.lats;
        let paced_lat = Lat::of(&paced.iter().flatten().map(|x| x.0).collect::<Vec<_>>());
        let strict = Lat::of(&sent.from_scheduled);
        let late = Lat::of(&sent.late);
        let paced_count: usize = paced.iter().map(Vec::len).sum();
        let paced_rate = paced_count as f64 / plan.concurrent_secs;
        out.line(format!(
            "2a. vector upsert, {} clients paced at {:.0}/s in total for {:.1} s (latency from the send, or from \
             the scheduled send when behind): {}; {paced_rate:.0} upserts/s",
            args.clients,
            args.paced_rate,
            plan.concurrent_secs,
            paced_lat.line()
        ));
        out.line(format!(
            "   from the scheduled send, the timer's lateness included: {}; the timer woke clients on \
             time late by p50 {:.3} ms, p99 {:.3} ms ({} sends)",
            strict.line(),
            late.p50,
            late.p99,
            late.n
        ));
        let mut paced_report = json!({"clients": args.clients, "rate": args.paced_rate, "achieved": paced_rate.round(),
                   "ack": paced_lat.json(), "ack_from_scheduled": strict.json(), "timer_late": late.json()});
        if let Some(syncs) = &disk {
            let acks = paced.iter().flatten().map(|&(l, at)| (sent.started + at, l));
            let (line, disk) = disk_report(syncs, acks);
            out.line(line);
            paced_report["disk"] = disk;
        }
        if let Some(floor) = floor_p99 {
            let ratio = paced_lat.p99 / floor.max(1e-9);
            out.line(format!("   p99 {:.2} ms against the floor's {floor:.2} ms (2f): {ratio:.2}x", paced_lat.p99));
            paced_report["p99_over_floor"] = json!(ratio);
        }
        report.insert("paced".into(), paced_report);
        targets.push(Target {
            name: "vector upsert ack p99, 16 clients at 5000/s",
            measured: paced_lat.p99,
            limit: 5.0,
            unit: "ms",
            higher_is_better: false,
        });
        if let Some(path) = &args.ack_trace {
            write_ack_trace(&path.with_extension("paced"), paced.iter().flatten())?;
        }
        let quiet2 = wait_quiet(&mut c, seal_items, Duration::from_secs(300)).await?;
        out.line(format!("   waited {quiet2:.1} s for seals/merges after it"));

        // Phase 2b: the same clients, closed loop, fixed duration.
        let before = shape(&mut c).await?;
        let log_before = scan_log(&server_dir.join("wal"), 0)?;
        let started = Instant::now();
        let lats = drive_upserts(&clients, v, "P2", plan.concurrent_secs, None).await?.lats;
        let mut all = Vec::new();
        let mut done_at = Vec::new();
        let mut per_client = Vec::new();
        for l in &lats {
            per_client.push(l.len());
            all.extend(l.iter().map(|x| x.0));
            done_at.extend(l.iter().map(|x| x.1));
        }
        let secs = started.elapsed().as_secs_f64();
        let l2 = Lat::of(&all);
        // The longest time in which no client got an answer (a writer stall).
        done_at.sort();
        let (mut gap, mut gap_at, mut prev) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for &d in &done_at {
            if d - prev > gap {
                (gap, gap_at) = (d - prev, prev);
            }
            prev = d;
        }
        let rate2 = all.len() as f64 / secs;
        let after = shape(&mut c).await?;
        let log = scan_log(&server_dir.join("wal"), log_before.last_seq)?;
        let (frames, records) = (log.frames, log.records);
        out.line(format!(
            "2b. vector upsert, {} clients, closed loop {:.1} s: {}; {rate2:.0} upserts/s total \
             (per client {}..{}); longest time without any ack {:.3} s (from {:.2} s)",
            args.clients,
            secs,
            l2.line(),
            per_client.iter().min().unwrap_or(&0),
            per_client.iter().max().unwrap_or(&0),
            gap.as_secs_f64(),
            gap_at.as_secs_f64()
        ));
        let seconds = (secs.ceil() as usize).max(1);
        let mut per_sec = vec![0u64; seconds];
        for d in &done_at {
            per_sec[(d.as_secs_f64() as usize).min(seconds - 1)] += 1;
        }
        out.line(format!("   acks per second: {per_sec:?}"));
        if let Some(path) = &args.ack_trace {
            write_ack_trace(path, lats.iter().flatten())?;
        }
        out.line(format!(
            "   this phase's records still in the log: {records} in {frames} frames (one fdatasync each, \
             {:.1} records/frame); sealed segments {} -> {}, unsealed items {} -> {}",
            records as f64 / frames.max(1) as f64,
            before.segments.len(),
            after.segments.len(),
            before.unsealed(),
            after.unsealed()
        ));
        report.insert(
            "concurrent".into(),
            json!({"clients": args.clients, "secs": secs, "ack": l2.json(), "upserts_per_sec": rate2.round(),
                   "log_frames": frames, "log_records": records,
                   "longest_no_ack_secs": gap.as_secs_f64(), "acks_per_sec": per_sec,
                   "segments_before": before.segments.len(), "segments_after": after.segments.len()}),
        );
        targets.push(Target {
            name: "vector upserts/s with group commit",
            measured: rate2,
            limit: 5000.0,
            unit: "/s",
            higher_is_better: true,
        });

        if args.only_writes {
            server.stop().await?;
            for t in &targets {
                out.line(format!("   {:<44} {:>10.3} {} (target {})", t.name, t.measured, t.unit, t.limit));
            }
            // `exit` skips the temporary directory's drop: without this each run left its
            // data directory (over a gigabyte) behind.
            let _ = std::fs::remove_dir_all(tmp.path());
            std::process::exit(0);
        }

        // Phase 3: image upserts vs the encoder's own time for the same image.
        let quiet3 = wait_quiet(&mut c, seal_items, Duration::from_secs(300)).await?;
        let images: Vec<(PathBuf, Vec<u8>)> = catalogue_images(&repo)?.into_iter().take(plan.images).collect();
        let encode = |bytes: Vec<u8>| {
            let enc = Arc::clone(&encoder);
            tokio::task::spawn_blocking(move || -> anyhow::Result<(Duration, Duration)> {
                let t = Instant::now();
                let prepared = enc.preprocess(&bytes)?;
                let pre = t.elapsed();
                let e = enc.embed(std::slice::from_ref(&prepared))?;
                std::hint::black_box(e);
                Ok((pre, t.elapsed()))
            })
        };
        // Warm-up: the encoder and one image upsert of a query image (not in the catalogue).
        let warm = std::fs::read(repo.join("data/queries/coffee-crop-rotated.jpg"))?;
        encode(warm.clone()).await??;
        let warm_req = proto::UpsertRequest {
            sku: "WARM-IMAGE".into(),
            attrs: None,
            payload: Some(proto::upsert_request::Payload::Image(warm)),
        };
        upsert(&mut c, warm_req).await?;
        let (mut acks, mut encs, mut pres, mut ratios, mut over) = (vec![], vec![], vec![], vec![], vec![]);
        for (i, (_, bytes)) in images.iter().enumerate() {
            let (pre, enc) = encode(bytes.clone()).await??;
            let req = proto::UpsertRequest {
                sku: format!("P3-IMG-{i:04}"),
                attrs: None,
                payload: Some(proto::upsert_request::Payload::Image(bytes.clone())),
            };
            let t = Instant::now();
            upsert(&mut c, req).await?;
            let ack = t.elapsed();
            acks.push(ack);
            encs.push(enc);
            pres.push(pre);
            ratios.push(ack.as_secs_f64() / enc.as_secs_f64());
            over.push(ack.saturating_sub(enc));
        }
        ratios.sort_by(f64::total_cmp);
        let ratio_median = ratios.get(ratios.len() / 2).copied().unwrap_or(0.0);
        let (la, le, lp, lo) = (Lat::of(&acks), Lat::of(&encs), Lat::of(&pres), Lat::of(&over));
        let ratio_p50 = la.p50 / le.p50;
        out.line(format!("3. image upsert ack, {} new images, 1 client: {}", acks.len(), la.line()));
        out.line(format!("   encoder alone (preprocess + embed, in-process): {}", le.line()));
        out.line(format!("   of which preprocess: {}", lp.line()));
        out.line(format!(
            "   ack - encoder per image: {}; ratio ack/encoder: {ratio_p50:.2} (p50s), {ratio_median:.2} \
             (median per image); waited {quiet3:.1} s for seals/merges first",
            lo.line()
        ));
        report.insert(
            "image_upsert".into(),
            json!({"images": acks.len(), "ack": la.json(), "encoder": le.json(), "preprocess": lp.json(),
                   "ack_minus_encoder": lo.json(), "ratio_p50": ratio_p50, "ratio_median_per_image": ratio_median,
                   "waited_for_quiet_secs": quiet3}),
        );
        targets.push(Target {
            name: "image upsert ack / encoder time (p50s)",
            measured: ratio_p50,
            limit: 1.5,
            unit: "x",
            higher_is_better: false,
        });

        // Phase 4: search latency, idle and while 4 clients write.
        let mut s = server.client().await?;
        let search_req = |q: &[f32]| proto::SearchByVectorRequest {
            model_version: v.to_string(),
            vector: q.to_vec(),
            options: Some(proto::SearchOptions { k: 10, ..Default::default() }),
        };
        for _ in 0..100 {
            let q = &stored[rng.below(stored.len())];
            s.search_by_vector(search_req(q)).await?;
        }
        let search = |s: &mut Client, rng: &mut Rng| {
            let q = search_req(&stored[rng.below(stored.len())]);
            let mut s = s.clone();
            async move {
                let t = Instant::now();
                let resp = s.search_by_vector(q).await?.into_inner();
                if resp.hits.len() != 10 {
                    bail!("search returned {} hits", resp.hits.len());
                }
                anyhow::Ok(t.elapsed())
            }
        };
        let label = "4. SearchByVector k=10, idle";
        let (li, idle_shape, quiet4) =
            idle_round(&mut c, &out, label, seal_items, plan.queries, || search(&mut s, &mut rng)).await?;
        // The same, idle, with the mutable segment (searched by exact scan) nearly full: what
        // writing costs a search through the index's shape alone, without CPU contention.
        let fill = (seal_items.min(2 * DEFAULT_SEAL_ITEMS) as u64).saturating_sub(idle_shape.unsealed() + 16);
        for i in 0..fill {
            upsert(&mut c, vector_upsert(format!("P4-FILL-{i:05}"), v, rng.unit_vector(DIM))).await?;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let full_shape = shape(&mut c).await?;
        let mut full = Vec::with_capacity(plan.queries);
        for _ in 0..plan.queries {
            full.push(search(&mut s, &mut rng).await?);
        }
        let lf = Lat::of(&full);
        out.line(format!(
            "   idle, mutable segment nearly full ({} unsealed, seals at {seal_items}; {} sealed segments): {}",
            full_shape.unsealed(),
            full_shape.segments.len(),
            lf.line()
        ));
        // No writes, one segment being sealed: the sealer's HNSW build alone (it runs on every
        // core) against searches. The upserts that cross the seal size start it.
        let mut sealing = Vec::new();
        let mut seal_secs = 0.0;
        if seal_items <= 2 * DEFAULT_SEAL_ITEMS {
            let before = shape(&mut c).await?;
            let cross = (seal_items as u64).saturating_sub(before.unsealed()) + 1;
            for i in 0..cross {
                upsert(&mut c, vector_upsert(format!("P4-SEAL-{i:05}"), v, rng.unit_vector(DIM))).await?;
            }
            let started = Instant::now();
            while sealing.len() < 20 * plan.queries {
                sealing.push(search(&mut s, &mut rng).await?);
                if sealing.len() % 25 == 0 && shape(&mut c).await?.segments.len() > before.segments.len() {
                    break;
                }
            }
            seal_secs = started.elapsed().as_secs_f64();
        }
        let ls = Lat::of(&sealing);
        out.line(format!(
            "   idle but sealing one segment (measured until its commit, {seal_secs:.1} s): {}",
            ls.line()
        ));
        // Searches while 4 clients upsert: first paced at `--write-rate` in total (the
        // target's figure: a sustained write load the index keeps up with), then flat out
        // (closed loop: the clients, the server and its seals and merges share both cores).
        let mut during = Vec::new();
        let mut idle_paced_after = None;
        for (label, rate) in [("paced", args.write_rate), ("closed loop", 0.0)] {
            let stop = Arc::new(AtomicBool::new(false));
            let mut writers = Vec::new();
            for wi in 0..4 {
                let mut cl = server.client().await?;
                let stop = Arc::clone(&stop);
                let v = v.to_string();
                let tag = if rate > 0.0 { "P" } else { "C" };
                let mut rng = Rng(0xBEEF + wi as u64 + if rate > 0.0 { 0 } else { 100 });
                // The paced writers' vectors are drawn before the round: drawing one (`--latent`
                // takes 1,328 Gaussians and a projection) would otherwise run on the runtime
                // threads the in-process server shares, a cost real clients put on their own
                // machines (measured: 10% of the round's CPU). The closed loop draws as it goes.
                let ahead = if rate > 0.0 { (rate / 4.0 * (plan.write_round_secs + 2.0)).ceil() as usize } else { 0 };
                let mut drawn: VecDeque<Vec<f32>> =
                    (0..ahead).map(|_| rng.unit_vector(DIM)).collect();
                writers.push(tokio::spawn(async move {
                    let mut lats = Vec::new();
                    let mut tick = (rate > 0.0).then(|| {
                        let mut t = tokio::time::interval(Duration::from_secs_f64(4.0 / rate));
                        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        t
                    });
                    while !stop.load(Ordering::Relaxed) {
                        if let Some(t) = tick.as_mut() {
                            t.tick().await;
                        }
                        let values = drawn.pop_front().unwrap_or_else(|| rng.unit_vector(DIM));
                        let req = vector_upsert(format!("P4{tag}-{wi}-{:07}", lats.len()), &v, values);
                        let t = Instant::now();
                        upsert(&mut cl, req).await?;
                        lats.push(t.elapsed());
                    }
                    anyhow::Ok(lats)
                }));
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            let started = Instant::now();
            let mut busy = Vec::with_capacity(plan.queries);
            let mut trace = Vec::new();
            let (mut segments, mut sampled) = (0, f64::NEG_INFINITY);
            while started.elapsed().as_secs_f64() < plan.write_round_secs {
                let at = started.elapsed().as_secs_f64();
                if args.search_trace.is_some() && at - sampled >= 0.5 {
                    segments = shape(&mut c).await?.segments.len();
                    sampled = at;
                }
                let lat = search(&mut s, &mut rng).await?;
                busy.push(lat);
                if args.search_trace.is_some() {
                    trace.push((at, lat, segments));
                }
            }
            if let Some(path) = &args.search_trace {
                let path = if rate > 0.0 { path.clone() } else { path.with_extension("closed") };
                let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
                for (at, lat, segments) in &trace {
                    writeln!(f, "{at:.6} {:.3} {segments}", lat.as_secs_f64() * 1e3)?;
                }
                f.flush()?;
            }
            let busy_secs = started.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            let mut wlats = Vec::new();
            for w in writers {
                wlats.extend(w.await??);
            }
            let written = wlats.len();
            let lw = Lat::of(&wlats);
            let busy_shape = shape(&mut c).await?;
            let lb = Lat::of(&busy);
            out.line(format!(
                "   while 4 clients upsert, {label} ({written} upserts, ~{:.0}/s; now {}): {}",
                written as f64 / (busy_secs + 0.5),
                busy_shape.line(),
                lb.line()
            ));
            out.line(format!("   those 4 writers' upsert acks: {}", lw.line()));
            during.push((lb, lw, written as f64 / (busy_secs + 0.5)));
            if rate > 0.0 {
                // Let the sealer catch up before the closed-loop round, then search the index
                // the paced writes left, idle: the round grew it (tens of thousands of new
                // items, more segments), so idle before and idle after bracket the index the
                // searches during the round ran on.
                let label = "   idle on the index the paced round left";
                let (lg, grown, _) =
                    idle_round(&mut c, &out, label, seal_items, plan.queries, || search(&mut s, &mut rng)).await?;
                idle_paced_after = Some((lg, grown));
            }
        }
        let (lb, lw, write_rate) = during[0];
        let (lc, lcw, closed_rate) = during[1];
        let (lg, grown) = idle_paced_after.context("the paced round measures the grown index")?;
        // The target's ratio: while writing against idle on the same index, i.e. the mean of
        // the idle p99s before and after the round (the index grew between them while the
        // searches ran). Against the smaller index alone it is `ratio_before`.
        let idle_same_index_p99 = (li.p99 + lg.p99) / 2.0;
        let ratio4 = lb.p99 / idle_same_index_p99;
        let ratio_before = lb.p99 / li.p99;
        // Idle again on the index the writes left (more items, more segments): what the index's
        // growth alone costs a search.
        let (la, after_shape, _) =
            idle_round(&mut c, &out, "   idle again afterwards", seal_items, plan.queries, || search(&mut s, &mut rng))
                .await?;
        out.line(format!(
            "   p99 while writing at {write_rate:.0}/s / idle on the same index (mean of the idle p99s before and after, {idle_same_index_p99:.2} ms): \
             {ratio4:.2}x; / idle before: {ratio_before:.2}x (p50 {:.2}x); / idle after: {:.2}x; flat out at {closed_rate:.0}/s / idle: \
             {:.2}x (p50 {:.2}x); p99 idle with a full mutable segment / idle: {:.2}x; \
             idle while sealing / idle: {:.2}x; idle afterwards / idle: {:.2}x; while writing / idle afterwards: {:.2}x; \
             waited {quiet4:.1} s for seals/merges first",
            lb.p50 / li.p50,
            lb.p99 / lg.p99,
            lc.p99 / li.p99,
            lc.p50 / li.p50,
            lf.p99 / li.p99,
            ls.p99 / li.p99,
            la.p99 / li.p99,
            lb.p99 / la.p99
        ));
        report.insert(
            "search".into(),
            json!({"idle": li.json(), "while_writing": lb.json(), "idle_full_mutable": lf.json(), "idle_full_unsealed": full_shape.unsealed(),
                   "idle_while_sealing": ls.json(), "seal_secs": seal_secs, "p99_ratio": ratio4, "p99_ratio_vs_idle_before": ratio_before,
                   "p50_ratio": lb.p50 / li.p50, "idle_after_paced": lg.json(), "idle_after_paced_live_items": grown.live_items,
                   "idle_after_paced_segments": grown.segments.len(), "idle_same_index_p99_ms": idle_same_index_p99,
                   "write_rate": write_rate.round(), "while_writing_flat_out": lc.json(), "flat_out_rate": closed_rate.round(),
                   "flat_out_writer_ack": lcw.json(), "flat_out_p99_ratio": lc.p99 / li.p99,
                   "idle_live_items": idle_shape.live_items, "idle_segments": idle_shape.segments.len(),
                   "writer_ack": lw.json(), "idle_after": la.json(),
                   "idle_after_segments": after_shape.segments.len(), "idle_after_live_items": after_shape.live_items, "waited_for_quiet_secs": quiet4}),
        );
        targets.push(Target {
            name: "search p99 while writing (paced) / idle on the same index",
            measured: ratio4,
            limit: 1.5,
            unit: "x",
            higher_is_better: false,
        });

        let t = Instant::now();
        server.stop().await?;
        out.line(format!("   server stopped gracefully in {:.2} s", t.elapsed().as_secs_f64()));
        anyhow::Ok(())
    })?;
    drop(rt);

    // Phase 5: restart with a large log.
    let spec =
        ModelSpec { version: version.clone(), dim: DIM, weights_sha256: encoder.manifest().sha256.clone() };
    let cfg = WriterConfig {
        seal_items: 1_000_000,
        // Never checkpoint on log size: every record must stay in the log.
        checkpoint_wal_bytes: u64::MAX,
        default_model: Some(spec),
        ..WriterConfig::default()
    };
    let dir = tmp.path().join("restart");
    let n = plan.restart_items;
    let writer = IndexWriter::open(&dir, cfg.clone())?;
    let mut rng = Rng(0xABCD);
    let started = Instant::now();
    let mut written = 0usize;
    while written < n {
        let batch: Vec<WriteOp> = (written..(written + RESTART_BATCH).min(n))
            .map(|i| {
                Ok(WriteOp::Upsert(Upsert {
                    sku: SkuId::new(format!("R-{i:07}"))?,
                    attrs: None,
                    image_sha256: None,
                    vectors: vec![(version.clone(), rng.unit_vector(DIM))],
                }))
            })
            .collect::<anyhow::Result<_>>()?;
        let len = batch.len();
        for o in writer.write_blocking(batch)? {
            if o != Outcome::Added {
                bail!("restart fill: unexpected outcome {o:?}");
            }
        }
        written += len;
    }
    let fill_secs = started.elapsed().as_secs_f64();
    writer.close();
    let LogScan { frames, records, bytes: log_bytes, .. } = scan_log(&dir.join("wal"), 0)?;
    if records != n as u64 {
        bail!("the log holds {records} records, expected {n} (was a checkpoint taken?)");
    }
    let t = Instant::now();
    let writer = IndexWriter::open(&dir, cfg.clone())?;
    let open_secs = t.elapsed().as_secs_f64();
    let replayed = writer.open_report().replayed;
    let live = writer.live().versions.get(&version).map_or(0, |v| v.live_items());
    let t = Instant::now();
    writer.close();
    let close_secs = t.elapsed().as_secs_f64();
    // Again with the log out of the page cache (GNU dd's iflag=nocache: POSIX_FADV_DONTNEED on
    // the clean, fsynced files; no root needed), as after a machine restart.
    let mut evicted = true;
    for entry in std::fs::read_dir(dir.join("wal"))? {
        let path = entry?.path();
        let ok = std::process::Command::new("dd")
            .arg(format!("if={}", path.display()))
            .args(["iflag=nocache", "count=0", "status=none"])
            .status()
            .is_ok_and(|s| s.success());
        evicted &= ok;
    }
    let cold_secs = if evicted {
        let t = Instant::now();
        let writer = IndexWriter::open(&dir, cfg)?;
        let secs = t.elapsed().as_secs_f64();
        writer.close();
        Some(secs)
    } else {
        None
    };
    out.line(format!(
        "5. restart: {n} vector upserts logged in {fill_secs:.1} s ({frames} frames, {:.0} MiB, \
         closed without a checkpoint); IndexWriter::open replayed {replayed} records in {open_secs:.2} s \
         ({live} live items after; log in the page cache); close {close_secs:.2} s; open with the log \
         evicted from the page cache: {}",
        log_bytes as f64 / (1 << 20) as f64,
        cold_secs.map_or("not measured (dd iflag=nocache failed)".to_string(), |s| format!("{s:.2} s"))
    ));
    report.insert(
        "restart".into(),
        json!({"items": n, "fill_secs": fill_secs, "log_frames": frames, "log_bytes": log_bytes,
               "open_secs": open_secs, "open_cold_secs": cold_secs, "replayed": replayed, "live_items": live}),
    );
    if live != n as u64 || replayed != n {
        bail!("restart: {replayed} records replayed and {live} live items, expected {n}");
    }
    let hundred_k = n == 100_000;
    targets.push(Target {
        name: if hundred_k {
            "restart, 100k-item log, page cache warm"
        } else {
            "restart, log warm (target is for 100k)"
        },
        measured: open_secs,
        limit: 5.0,
        unit: "s",
        higher_is_better: false,
    });
    if let Some(cold) = cold_secs {
        targets.push(Target {
            name: if hundred_k {
                "restart, 100k-item log, page cache cold"
            } else {
                "restart, log cold (target is for 100k)"
            },
            measured: cold,
            limit: 5.0,
            unit: "s",
            higher_is_better: false,
        });
    }

    out.line("targets:");
    let mut tj = Vec::new();
    for t in &targets {
        let cmp = if t.higher_is_better { ">=" } else { "<=" };
        out.line(format!(
            "   {:<44} {:>10.3} {} (target {cmp} {} {}) {}",
            t.name,
            t.measured,
            t.unit,
            t.limit,
            t.unit,
            if t.met() { "MET" } else { "MISSED" }
        ));
        tj.push(
            json!({"name": t.name, "measured": t.measured, "limit": t.limit, "unit": t.unit, "met": t.met()}),
        );
    }
    report.insert("targets".into(), Value::Array(tj));
    if args.json {
        println!("{}", Value::Object(report));
    }
    Ok(())
}
