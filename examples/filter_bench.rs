//! Filtered search through the index layer (`VersionLive::search`, as the server calls it):
//! time per query and recall@10 against the exact filtered answer, for filters that match
//! the same share of the catalogue spread evenly (`spread`) or clustered in the newest
//! segments (`recent`, e.g. a new season's items) or the oldest (`old`), next to the
//! unfiltered search. The filter planner decides per sealed segment from that segment's own
//! matches (`index::live`), so a clustered filter should cost no more than a spread one.
//!
//! The rows are `synth::Structured` (a latent signal plus noise); queries are held-out rows.
//! Segments are kept apart (no merges) so that the clustering survives.
//!
//! Run: `cargo run --release --example filter_bench -- [--items 60000] [--segments 4] [--share 0.35]`.

use std::time::{Duration, Instant};

use clap::Parser;
use vitrine::ids::{ModelVersion, SkuId};
use vitrine::index::filter::Filter;
use vitrine::index::merge_policy::MergePolicy;
use vitrine::index::store::Attrs;
use vitrine::index::{IndexWriter, ModelSpec, Query, Upsert, WriteOp, WriterConfig};
use vitrine::segment::synth::Structured;
use vitrine::segment::{HnswParams, dot};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 256)]
    dim: usize,
    #[arg(long, default_value_t = 60_000)]
    items: usize,
    /// Sealed segments the items are cut into.
    #[arg(long, default_value_t = 4)]
    segments: usize,
    /// Share of the items each filter matches.
    #[arg(long, default_value_t = 0.35)]
    share: f64,
    #[arg(long, default_value_t = 300)]
    queries: usize,
    /// Rounds over the queries (filters alternate within each round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dir = tempfile::tempdir()?;
    let version = ModelVersion::new("synth")?;
    let per_segment = a.items.div_ceil(a.segments);
    let cfg = WriterConfig {
        holder: "filter_bench".into(),
        default_model: Some(ModelSpec { version: version.clone(), dim: a.dim, weights_sha256: "00".into() }),
        seal_items: per_segment,
        hnsw: HnswParams::default(),
        merge: MergePolicy { max_segments: 1000, max_flat_items: u64::MAX, ..MergePolicy::default() },
        ..WriterConfig::default()
    };
    let shape = Structured { dim: a.dim, latent: 24, noise: 0.1, seed: 5 };
    let rows = shape.rows(0, a.items);
    let n = a.items;
    let cut = (a.share * n as f64) as usize;
    let attrs_of = |i: usize| -> Attrs {
        let spread = (i * 7919 % 1000) < (a.share * 1000.0) as usize;
        [
            ("spread".to_string(), serde_json::json!(spread)),
            ("recent".to_string(), serde_json::json!(i >= n - cut)),
            ("old".to_string(), serde_json::json!(i < cut)),
        ]
        .into_iter()
        .collect()
    };
    let started = Instant::now();
    let w = IndexWriter::open(dir.path(), cfg)?;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let ops = chunk
            .iter()
            .map(|&i| {
                WriteOp::Upsert(Upsert {
                    sku: SkuId::new(format!("S{i:07}")).unwrap(),
                    attrs: Some(attrs_of(i)),
                    image_sha256: None,
                    vectors: vec![(version.clone(), rows[i * a.dim..(i + 1) * a.dim].to_vec())],
                })
            })
            .collect();
        w.write_blocking(ops)?;
    }
    w.checkpoint_blocking()?;
    let live = w.live();
    let view = live.version(&version)?;
    println!(
        "{} items of dimension {} in {} sealed segments (built in {:.1} s); filters match {:.0}%",
        n,
        a.dim,
        view.sealed.len(),
        started.elapsed().as_secs_f64(),
        a.share * 100.0
    );

    let queries = shape.rows(n as u64 + 1, a.queries);
    let names = ["none", "spread=true", "recent=true", "old=true"];
    let filters: Vec<Option<Filter>> =
        names.iter().map(|f| (*f != "none").then(|| Filter::parse([*f]).unwrap())).collect();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); names.len()];
    let mut recall = vec![(0usize, 0usize); names.len()];
    for round in 0..a.rounds {
        for (qi, q) in queries.chunks_exact(a.dim).enumerate() {
            for (fi, filter) in filters.iter().enumerate() {
                let query = Query { vector: q, k: 10, ef: 0, exclude: None, filter: filter.as_ref() };
                let t = Instant::now();
                let hits = view.search(&query, w.attrs())?;
                times[fi].push(t.elapsed());
                if round == 0 && qi < 100 {
                    let mut exact: Vec<(f32, usize)> = (0..n)
                        .filter(|&i| filter.as_ref().is_none_or(|f| f.matches(&attrs_of(i))))
                        .map(|i| (dot(q, &rows[i * a.dim..(i + 1) * a.dim]), i))
                        .collect();
                    exact.sort_by(|x, y| y.0.total_cmp(&x.0));
                    let truth: Vec<String> =
                        exact.iter().take(10).map(|&(_, i)| format!("S{i:07}")).collect();
                    recall[fi].0 += hits.iter().filter(|h| truth.contains(&h.sku.to_string())).count();
                    recall[fi].1 += truth.len();
                }
            }
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p = |v: &mut Vec<Duration>, q: f64| {
        v.sort();
        v[((v.len() - 1) as f64 * q) as usize]
    };
    let base = {
        let mut v = times[0].clone();
        ms(p(&mut v, 0.5))
    };
    println!("{:>14} {:>9} {:>9} {:>10} {:>10}", "filter", "p50 ms", "p99 ms", "p50/none", "recall@10");
    for (fi, name) in names.iter().enumerate() {
        let (p50, p99) = (ms(p(&mut times[fi], 0.5)), ms(p(&mut times[fi], 0.99)));
        let r = recall[fi].0 as f64 / recall[fi].1.max(1) as f64;
        println!("{name:>14} {p50:>9.3} {p99:>9.3} {:>10.2} {r:>10.4}", p50 / base);
    }
    w.close();
    Ok(())
}
