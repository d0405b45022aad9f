//! Builds a vitrine segment from raw f32 vectors and measures single-thread search QPS and
//! recall@k at several ef values; prints one JSON object. Used by tools/ann_compare.py.
//!
//! Files are raw little-endian arrays: base and queries f32 `[rows][dim]`, ground truth u32
//! `[queries][>=k]` (exact neighbours, best first). Without `--gt`, ground truth comes from
//! `Segment::brute_force`. `--synthetic N` generates structured data instead of reading files.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use vitrine::ids::SkuId;
use vitrine::segment::synth::Structured;
use vitrine::segment::{HnswParams, Segment, write_segment, write_segment_hnsw_rs};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    dim: usize,
    #[arg(long)]
    base: Option<PathBuf>,
    #[arg(long)]
    queries: Option<PathBuf>,
    #[arg(long)]
    gt: Option<PathBuf>,
    /// Columns per ground-truth row (defaults to k).
    #[arg(long)]
    gt_k: Option<usize>,
    /// Generate this many structured base vectors instead of reading --base.
    #[arg(long)]
    synthetic: Option<usize>,
    #[arg(long, default_value_t = 1000)]
    nq: usize,
    #[arg(long, default_value_t = 12)]
    latent: usize,
    #[arg(long, default_value_t = 0.15)]
    noise: f64,
    #[arg(long, default_value_t = 16)]
    m: usize,
    #[arg(long, default_value_t = 200)]
    ef_construction: usize,
    #[arg(long, value_delimiter = ',', default_value = "10,16,32,64,128,256")]
    ef: Vec<usize>,
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Timed passes over the queries per ef (the fastest is reported).
    #[arg(long, default_value_t = 3)]
    passes: usize,
    /// Graph builder: `native` (vitrine's, what the server writes) or `hnsw_rs` (the reference).
    #[arg(long, default_value = "native", value_parser = ["native", "hnsw_rs"])]
    builder: String,
    /// Where to write the segment (default: a temp dir). Reused if it exists.
    #[arg(long)]
    segment: Option<PathBuf>,
}

fn read_f32(path: &PathBuf) -> anyhow::Result<Vec<f32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if bytes.len() % 4 != 0 {
        bail!("{}: length is not a multiple of 4", path.display());
    }
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

fn read_u32(path: &PathBuf) -> anyhow::Result<Vec<u32>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// This thread's on-CPU time in seconds (Linux schedstat), to rate the search loop by CPU
/// time as well as wall time: on a shared machine the wall time includes waiting for a core.
fn thread_cpu_secs() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: f64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns / 1e9)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dim = args.dim;
    let (base, queries) = match args.synthetic {
        Some(n) => {
            let shape = Structured { dim, latent: args.latent, noise: args.noise, seed: 42 };
            (shape.rows(0, n), shape.rows(1 << 40, args.nq))
        }
        None => {
            let base = read_f32(args.base.as_ref().context("--base or --synthetic is required")?)?;
            let queries = read_f32(args.queries.as_ref().context("--queries is required with --base")?)?;
            (base, queries)
        }
    };
    let n = base.len() / dim;
    let nq = queries.len() / dim;
    let tmp = tempfile::tempdir()?;
    let path = args.segment.clone().unwrap_or_else(|| tmp.path().join("bench.vseg"));
    let mut build = serde_json::Value::Null;
    if !path.exists() {
        let skus: Vec<SkuId> = (0..n).map(|i| SkuId::new(format!("item-{i}"))).collect::<Result<_, _>>()?;
        let params = HnswParams { m: args.m, ef_construction: args.ef_construction };
        let write = if args.builder == "hnsw_rs" { write_segment_hnsw_rs } else { write_segment };
        let stats = write(&path, dim, &base, &skus, &params)?;
        build = serde_json::json!({
            "secs": stats.build_secs, "self_recall": stats.self_recall, "bytes": stats.bytes,
        });
    }
    drop(base);
    let seg = Segment::open(&path)?;
    let k = args.k;
    let truth: Vec<Vec<u32>> = match &args.gt {
        Some(gt) => {
            let cols = args.gt_k.unwrap_or(k);
            let raw = read_u32(gt)?;
            if raw.len() != nq * cols {
                bail!("ground truth has {} values, expected {nq} x {cols}", raw.len());
            }
            raw.chunks_exact(cols).map(|r| r[..k].to_vec()).collect()
        }
        None => queries
            .chunks_exact(dim)
            .map(|q| Ok(seg.brute_force(q, k, None)?.iter().map(|h| h.idx).collect()))
            .collect::<anyhow::Result<_>>()?,
    };
    let mut points = Vec::new();
    for &ef in &args.ef {
        let mut best = f64::INFINITY;
        let mut best_cpu = f64::INFINITY;
        let mut found = 0usize;
        for _ in 0..args.passes.max(1) {
            found = 0;
            let cpu = thread_cpu_secs();
            let t = Instant::now();
            for (q, want) in queries.chunks_exact(dim).zip(&truth) {
                let hits = seg.search(q, k, ef, None)?;
                found += hits.iter().filter(|h| want.contains(&h.idx)).count();
            }
            best = best.min(t.elapsed().as_secs_f64());
            if let (Some(a), Some(b)) = (cpu, thread_cpu_secs()) {
                best_cpu = best_cpu.min(b - a);
            }
        }
        points.push(serde_json::json!({
            "ef": ef,
            "qps": nq as f64 / best,
            // null when the thread clock is unavailable or too coarse for this run.
            "cpu_qps": if best_cpu.is_finite() && best_cpu > 0.0 { Some(nq as f64 / best_cpu) } else { None },
            "recall": found as f64 / (nq * k) as f64,
        }));
    }
    let out = serde_json::json!({
        "engine": "vitrine", "builder": args.builder, "n": n, "dim": dim, "nq": nq, "k": k, "m": args.m,
        "ef_construction": args.ef_construction, "build": build, "points": points,
    });
    println!("{out}");
    Ok(())
}
