//! Segment benchmarks: (a) open time at 10k, 100k and 1M vectors (must stay flat in N);
//! (b) single-thread search throughput at several ef on a structured 50k set.
//!
//! Segment files are created once under `$TMPDIR/vitrine-bench-segments/` and reused.
//! The open-time files use random vectors and a random graph written with
//! `write_segment_with_graph` (building HNSW over 1M vectors would take far longer than the
//! measurement, and open time does not depend on the graph's quality).

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vitrine::ids::SkuId;
use vitrine::segment::synth::{Structured, random_segment};
use vitrine::segment::{DEFAULT_EF_SEARCH, HnswParams, Segment, write_segment};

const DIM: usize = 128;
const M: usize = 16;

fn bench_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("vitrine-bench-segments");
    std::fs::create_dir_all(&dir).expect("create bench dir");
    dir
}

fn skus(n: usize) -> Vec<SkuId> {
    (0..n).map(|i| SkuId::new(format!("sku-{i:08}")).expect("valid sku")).collect()
}

/// Reuses `path` if it opens and verifies, otherwise (re)creates it with `make`.
fn cached(path: &Path, make: impl FnOnce(&Path)) {
    if Segment::open(path).is_ok() {
        return;
    }
    let _ = std::fs::remove_file(path);
    make(path);
}

fn write_random_segment(path: &Path, n: usize) {
    random_segment(path, n, DIM, M, n as u64).expect("write random segment");
}

fn open_time(c: &mut Criterion) {
    let mut group = c.benchmark_group("segment_open");
    for n in [10_000usize, 100_000, 1_000_000] {
        let path = bench_dir().join(format!("open-{n}-d{DIM}.vseg"));
        cached(&path, |p| write_random_segment(p, n));
        let bytes = std::fs::metadata(&path).expect("stat").len();
        eprintln!("open bench file: {} ({:.1} MB)", path.display(), bytes as f64 / 1e6);
        group.bench_with_input(BenchmarkId::from_parameter(n), &path, |b, path| {
            b.iter(|| black_box(Segment::open(path).expect("open")));
        });
    }
    group.finish();
}

fn search_qps(c: &mut Criterion) {
    let shape = Structured { dim: DIM, latent: 16, noise: 0.3, seed: 42 };
    let n = 50_000;
    let path = bench_dir().join(format!("search-{n}-d{DIM}.vseg"));
    cached(&path, |p| {
        let stats = write_segment(p, DIM, &shape.rows(0, n), &skus(n), &HnswParams::default())
            .expect("write structured segment");
        eprintln!("built {n} x {DIM} in {:.1}s, self-recall {}", stats.build_secs, stats.self_recall);
    });
    let seg = Segment::open(&path).expect("open");
    let queries = shape.rows(1 << 40, 500);
    let mut group = c.benchmark_group("segment_search_k10");
    group.throughput(Throughput::Elements(1));
    for ef in [16usize, 32, DEFAULT_EF_SEARCH, 128, 256] {
        let mut found = 0usize;
        for q in queries.chunks_exact(DIM) {
            let exact = seg.brute_force(q, 10, None).expect("brute force");
            let hits = seg.search(q, 10, ef, None).expect("search");
            found += hits.iter().filter(|h| exact.iter().any(|e| e.idx == h.idx)).count();
        }
        eprintln!("ef={ef}: recall@10 {:.4}", found as f64 / (10 * queries.len() / DIM) as f64);
        let mut next = queries.chunks_exact(DIM).cycle();
        group.bench_with_input(BenchmarkId::from_parameter(ef), &ef, |b, &ef| {
            b.iter(|| black_box(seg.search(next.next().expect("cycle"), 10, ef, None).expect("search")));
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = open_time, search_qps
}
criterion_main!(benches);
