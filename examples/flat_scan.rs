//! Where the exact int8 scan of a sealed segment beats its graph walk: for segments of
//! growing size, the time per query of `SearchPlan::Graph` and `SearchPlan::Exact` (one
//! thread, same queries, alternating rounds), the walk's recall@10, and how many queries' scan
//! results differ from the f32 brute force's (`scan!=f32`: the scan of a segment of at least
//! `segment::SKETCH_MIN_ITEMS` starts from one-bit sketches, exact unless an estimate misses its
//! margin). The crossover sets `segment::FLAT_SCAN_FACTOR` (`Auto` scans up to that many times
//! `ef` items).
//!
//! The rows are `synth::Structured` (a latent signal plus noise, seeded); the queries are
//! held-out rows of the same distribution.
//!
//! `--copies N` builds N segments of each size (same distribution, other rows) and sends
//! query `i` to segment `i % N`, as a server with N segments searches each of them: with
//! enough copies their codes no longer fit in the last-level cache, and each scan streams
//! from memory, while a walk reads only the rows it scores. One copy measures the
//! cache-resident case.
//!
//! Run: `cargo run --release --example flat_scan -- [--dim 1280] [--ef 64] [--copies 8]`.

use std::time::Instant;

use clap::Parser;
use vitrine::ids::SkuId;
use vitrine::segment::synth::Structured;
use vitrine::segment::{FLAT_SCAN_FACTOR, HnswParams, SearchPlan, Segment, write_segment};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1280)]
    dim: usize,
    #[arg(long, default_value_t = 64)]
    ef: usize,
    #[arg(long, default_value_t = 48)]
    latent: usize,
    #[arg(long, default_value_t = 0.15)]
    noise: f64,
    /// Segment sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1024usize, 2048, 4096, 8192, 16384, 32768])]
    sizes: Vec<usize>,
    #[arg(long, default_value_t = 200)]
    queries: usize,
    /// Segments of each size, searched in turn (see the module docs).
    #[arg(long, default_value_t = 1)]
    copies: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    println!(
        "dim {}, ef {}, latent {}, noise {}, {} segment(s) per size; Auto scans up to {} items",
        args.dim,
        args.ef,
        args.latent,
        args.noise,
        args.copies,
        FLAT_SCAN_FACTOR * args.ef
    );
    println!(
        "{:>8} {:>12} {:>12} {:>8} {:>12} {:>10}",
        "items", "graph ms/q", "scan ms/q", "scan/graph", "graph r@10", "scan!=f32"
    );
    for &n in &args.sizes {
        let shape = Structured { dim: args.dim, latent: args.latent, noise: args.noise, seed: 7 };
        let queries = shape.rows(10_000_000, args.queries);
        let skus: Vec<SkuId> = (0..n).map(|i| SkuId::new(format!("i{i}")).expect("sku")).collect();
        let copies = args.copies.max(1);
        let mut segs = Vec::with_capacity(copies);
        for c in 0..copies {
            let rows = shape.rows((c * n) as u64, n);
            let path = dir.path().join(format!("s{n}-{c}.vseg"));
            write_segment(&path, args.dim, &rows, &skus, &HnswParams::default())?;
            let seg = Segment::open(&path)?;
            // Sketches built now, not by the first timed query's background thread.
            seg.prepare_scan();
            segs.push(seg);
        }
        let mut times = [0.0f64; 2];
        let mut found = 0usize;
        let mut differ = 0usize;
        for round in 0..4 {
            for (slot, plan) in [SearchPlan::Graph, SearchPlan::Exact].into_iter().enumerate() {
                let started = Instant::now();
                for (i, q) in queries.chunks_exact(args.dim).enumerate() {
                    std::hint::black_box(segs[i % segs.len()].search_as(q, 10, args.ef, None, plan)?);
                }
                if round > 0 {
                    times[slot] += started.elapsed().as_secs_f64();
                }
            }
        }
        for (i, q) in queries.chunks_exact(args.dim).enumerate() {
            let seg = &segs[i % segs.len()];
            let exact = seg.search_as(q, 10, args.ef, None, SearchPlan::Exact)?;
            let walk = seg.search_as(q, 10, args.ef, None, SearchPlan::Graph)?;
            differ += usize::from(exact != seg.brute_force(q, 10, None)?);
            found += walk.iter().filter(|h| exact.iter().any(|e| e.idx == h.idx)).count();
        }
        let per = |t: f64| t * 1e3 / (3 * args.queries) as f64;
        println!(
            "{n:>8} {:>12.3} {:>12.3} {:>8.2} {:>12.3} {differ:>10}",
            per(times[0]),
            per(times[1]),
            times[1] / times[0],
            found as f64 / (10 * args.queries) as f64
        );
    }
    Ok(())
}
