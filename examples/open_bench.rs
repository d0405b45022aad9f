//! Time to first query of a data directory holding one large segment: the segment's checksums
//! are verified before it serves (issue: integrity before serving), so this is the price of
//! that check at scale.
//!
//! It writes a data directory with one segment of `--n` random unit vectors of `--dim`
//! dimensions and a random HNSW-shaped graph (`synth::random_segment`: open and checksum time
//! do not depend on the graph's quality), then measures, with the file in the page cache and
//! again evicted from it (`dd iflag=nocache`):
//! * `Segment::open` alone (header, footer, layout: O(1));
//! * `Segment::verify_checksums` alone (every section's crc32, parallel chunks);
//! * `IndexWriter::open` (lock, manifest, the check above, record store, log) plus the first
//!   search answered from the live set: the server's time to first query, less loading the
//!   model and binding the socket.
//!
//! Run: `cargo run --release --example open_bench -- --n 1000000 --dim 1280 --dir /path/with/space`
//! (1M x 1280 is a 6.6 GB file; it is reused by later runs and removed with `--clean`).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use vitrine::ids::{ModelVersion, SegmentId};
use vitrine::index::manifest::{Manifest, ModelIndex, SegmentEntry};
use vitrine::index::{IndexWriter, Query, WriterConfig};
use vitrine::segment::Segment;
use vitrine::segment::synth::random_segment;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1_000_000)]
    n: usize,
    #[arg(long, default_value_t = 1280)]
    dim: usize,
    /// Where the data directory is made (needs about n * dim * 5 bytes).
    #[arg(long)]
    dir: PathBuf,
    /// Remove the data directory at the end.
    #[arg(long)]
    clean: bool,
}

const VERSION: &str = "open-bench";

fn evict(path: &Path) -> bool {
    std::process::Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["iflag=nocache", "count=0", "status=none"])
        .status()
        .is_ok_and(|s| s.success())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let version = ModelVersion::new(VERSION)?;
    let id = SegmentId(1);
    let seg_path = a.dir.join("indexes").join(VERSION).join(id.file_name());
    let fresh = Segment::open(&seg_path).is_ok_and(|s| s.len() == a.n && s.dim() == a.dim);
    if !fresh {
        let _ = std::fs::remove_dir_all(&a.dir);
        std::fs::create_dir_all(seg_path.parent().expect("parent"))?;
        let t = Instant::now();
        let stats = random_segment(&seg_path, a.n, a.dim, 16, 7).context("write the segment")?;
        let mut m = Manifest {
            next_id: 2,
            generation: 1,
            serving_model: Some(version.clone()),
            ..Manifest::default()
        };
        m.indexes.insert(
            version.clone(),
            ModelIndex {
                dim: a.dim as u32,
                weights_sha256: "synthetic".into(),
                segments: vec![SegmentEntry::written(id, &stats)],
            },
        );
        m.store(&a.dir)?;
        println!(
            "wrote {} ({:.2} GB) in {:.1} s",
            seg_path.display(),
            stats.bytes as f64 / 1e9,
            t.elapsed().as_secs_f64()
        );
    }
    let query: Vec<f32> = Segment::open(&seg_path)?.vector(12_345 % a.n as u32).to_vec();
    for cache in ["page cache warm", "evicted from the page cache"] {
        if cache.starts_with("evicted") && !evict(&seg_path) {
            println!("cannot evict the file (dd iflag=nocache failed): cold figures not measured");
            break;
        }
        let t = Instant::now();
        let seg = Segment::open(&seg_path)?;
        let open_ms = t.elapsed().as_secs_f64() * 1e3;
        let t = Instant::now();
        seg.verify_checksums()?;
        let crc_s = t.elapsed().as_secs_f64();
        drop(seg);
        if cache.starts_with("evicted") {
            evict(&seg_path);
        }
        let t = Instant::now();
        let writer = IndexWriter::open(
            &a.dir,
            WriterConfig { holder: "open_bench".into(), ..WriterConfig::default() },
        )?;
        let open_s = t.elapsed().as_secs_f64();
        assert!(writer.open_report().integrity.is_empty(), "{:?}", writer.open_report().integrity);
        let live = writer.live();
        let view = live.version(&version)?;
        let q = Query { vector: &query, k: 10, ef: 0, exclude: None, filter: None };
        let hits = view.search(&q, writer.attrs())?;
        let first_s = t.elapsed().as_secs_f64();
        let bytes = std::fs::metadata(&seg_path)?.len() as f64;
        println!(
            "{} x {} ({cache}): Segment::open {open_ms:.2} ms; verify_checksums {crc_s:.2} s ({:.1} GB/s); \
             IndexWriter::open {open_s:.2} s; time to first query {first_s:.2} s (random graph: the hit {} is not checked)",
            a.n,
            a.dim,
            bytes / crc_s / 1e9,
            hits.first().map_or("none".to_string(), |h| h.sku.to_string())
        );
        writer.close();
    }
    if a.clean {
        std::fs::remove_dir_all(&a.dir)?;
    }
    Ok(())
}
