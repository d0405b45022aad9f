//! Builds a data directory holding `--n` vectors for the scale figures (issue: serving at
//! catalogue scale), and measures what can be measured in process. Serve the directory with
//! `vitrine serve --data-dir DIR` and drive it with `examples/loadgen` (`--mix vector=1`) for
//! the server's RSS and gRPC latency.
//!
//! The vectors are `synth::Structured` rows (a `--latent`-dimensional signal in `--dim`
//! dimensions plus noise, seeded), written as one segment of the bundled
//! `efficientnet-lite0` version (1280-d; its weights' sha256 is recorded, so `vitrine serve`
//! accepts the index) by vitrine's own graph builder with the server's defaults (M=16,
//! ef_construction=200). Prints one JSON object: build time, bytes on disk, `Segment::open`
//! and `IndexWriter::open` times (page cache warm), and recall@10 against exact search for
//! `--queries` held-out rows of the same distribution at the segment's calibrated default ef
//! (`segment::calibrate`; what a query with ef 0 gets) and at the fixed 64.
//!
//! Run: `cargo run --release --example scale_build -- --n 1000000 --dir /path/with/7GB`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use rayon::prelude::*;
use vitrine::ids::{ModelVersion, SegmentId, SkuId};
use vitrine::index::manifest::{Manifest, ModelIndex, SegmentEntry};
use vitrine::index::{IndexWriter, Query, WriterConfig};
use vitrine::models::DEFAULT_MODEL;
use vitrine::segment::synth::Structured;
use vitrine::segment::{DEFAULT_EF_SEARCH, HnswParams, Segment, write_segment};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1_000_000)]
    n: usize,
    /// Where the data directory is made (removed first if it exists; needs about
    /// n * dim * 5.2 bytes).
    #[arg(long)]
    dir: PathBuf,
    #[arg(long, default_value_t = 64)]
    latent: usize,
    #[arg(long, default_value_t = 0.15)]
    noise: f64,
    /// Also writes this many further held-out rows to FILE (raw little-endian f32), for
    /// `examples/loadgen --vectors FILE`: in-distribution queries for the served figures.
    #[arg(long, num_args = 2, value_names = ["FILE", "N"])]
    write_queries: Vec<String>,
    /// Held-out queries for the recall figure.
    #[arg(long, default_value_t = 200)]
    queries: usize,
}

/// Rows generated per parallel task.
const CHUNK: usize = 8192;

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let version = ModelVersion::new(DEFAULT_MODEL)?;
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let manifest_path = repo.join("models").join(DEFAULT_MODEL).join("manifest.json");
    let model: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&manifest_path).with_context(|| format!("reading {}", manifest_path.display()))?,
    )?;
    let dim = model["dim"].as_u64().context("manifest dim")? as usize;
    let sha = model["sha256"].as_str().context("manifest sha256")?.to_string();
    let shape = Structured { dim, latent: a.latent, noise: a.noise, seed: 42 };

    let t = Instant::now();
    let chunks: Vec<Vec<f32>> = (0..a.n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|c| shape.rows((c * CHUNK) as u64, CHUNK.min(a.n - c * CHUNK)))
        .collect();
    let mut base = Vec::with_capacity(a.n * dim);
    for c in chunks {
        base.extend_from_slice(&c);
    }
    let gen_s = t.elapsed().as_secs_f64();
    eprintln!("generated {} x {dim} in {gen_s:.1} s", a.n);

    let _ = std::fs::remove_dir_all(&a.dir);
    let id = SegmentId(1);
    let seg_path = a.dir.join("indexes").join(version.as_str()).join(id.file_name());
    std::fs::create_dir_all(seg_path.parent().context("segment folder")?)?;
    let skus: Vec<SkuId> = (0..a.n).map(|i| SkuId::new(format!("item-{i:07}"))).collect::<Result<_, _>>()?;
    let stats = write_segment(&seg_path, dim, &base, &skus, &HnswParams::default())?;
    drop(base);
    eprintln!("built and wrote the segment in {:.1} s", stats.build_secs);
    let mut m =
        Manifest { next_id: 2, generation: 1, serving_model: Some(version.clone()), ..Manifest::default() };
    m.indexes.insert(
        version.clone(),
        ModelIndex {
            dim: dim as u32,
            weights_sha256: sha,
            segments: vec![SegmentEntry::written(id, &stats)],
        },
    );
    m.store(&a.dir)?;

    let t = Instant::now();
    let seg = Segment::open(&seg_path)?;
    let segment_open_ms = t.elapsed().as_secs_f64() * 1e3;
    let queries = shape.rows(1 << 40, a.queries);
    if let [file, n] = a.write_queries.as_slice() {
        let n: usize = n.parse().context("--write-queries N")?;
        let rows = shape.rows((1 << 40) + (1 << 30), n);
        let bytes: Vec<u8> = rows.iter().flat_map(|x| x.to_le_bytes()).collect();
        std::fs::write(file, bytes).with_context(|| format!("writing {file}"))?;
    }
    let (mut found, mut found_64, mut exact_s, mut hnsw_s) = (0usize, 0usize, 0.0, 0.0);
    for q in queries.chunks_exact(dim) {
        let t = Instant::now();
        let truth = seg.brute_force(q, 10, None)?;
        exact_s += t.elapsed().as_secs_f64();
        let t = Instant::now();
        let hits = seg.search(q, 10, stats.default_ef, None)?;
        hnsw_s += t.elapsed().as_secs_f64();
        found += hits.iter().filter(|h| truth.iter().any(|t| t.idx == h.idx)).count();
        let hits = seg.search(q, 10, DEFAULT_EF_SEARCH, None)?;
        found_64 += hits.iter().filter(|h| truth.iter().any(|t| t.idx == h.idx)).count();
    }
    drop(seg);
    let recall = found as f64 / (a.queries * 10) as f64;
    let recall_64 = found_64 as f64 / (a.queries * 10) as f64;

    let t = Instant::now();
    let writer =
        IndexWriter::open(&a.dir, WriterConfig { holder: "scale_build".into(), ..WriterConfig::default() })?;
    let writer_open_s = t.elapsed().as_secs_f64();
    anyhow::ensure!(writer.open_report().integrity.is_empty(), "{:?}", writer.open_report().integrity);
    let live = writer.live();
    let q = Query { vector: &queries[..dim], k: 10, ef: 0, exclude: None, filter: None };
    let first = live.version(&version)?.search(&q, writer.attrs())?;
    let first_query_s = t.elapsed().as_secs_f64();
    drop(live);
    writer.close();

    let disk: u64 = walk_bytes(&a.dir)?;
    let out = serde_json::json!({
        "n": a.n, "dim": dim, "latent": a.latent, "noise": a.noise,
        "generate_secs": gen_s,
        "build_secs": stats.build_secs,
        "self_recall": stats.self_recall,
        "segment_bytes": stats.bytes,
        "dir_bytes": disk,
        "segment_open_ms": segment_open_ms,
        "writer_open_secs": writer_open_s,
        "time_to_first_query_secs": first_query_s,
        "first_hit": first.first().map(|h| h.sku.to_string()),
        "recall_at_10": recall,
        "queries": a.queries,
        "ef": stats.default_ef,
        "recall_at_10_ef_64": recall_64,
        "hnsw_ms_per_query_in_process": hnsw_s / a.queries as f64 * 1e3,
        "exact_ms_per_query_in_process": exact_s / a.queries as f64 * 1e3,
    });
    println!("{out}");
    Ok(())
}

/// Bytes of every file under `dir`.
fn walk_bytes(dir: &std::path::Path) -> anyhow::Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let meta = e.metadata()?;
        total += if meta.is_dir() { walk_bytes(&e.path())? } else { meta.len() };
    }
    Ok(total)
}
