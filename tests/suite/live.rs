//! The index writer on real files, with synthetic vectors (no encoder): writes visible on
//! acknowledgement, durable across a reopen, seal and merge, concurrent searches, log damage,
//! filters, and the migration of a format-1 directory.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use parking_lot::Mutex;
use vitrine::ids::{ModelVersion, SkuId};
use vitrine::index::filter::Filter;
use vitrine::index::manifest::Manifest;
use vitrine::index::merge_policy::MergePolicy;
use vitrine::index::store::Attrs;
use vitrine::index::writer::FLAT_SEGMENT_ITEMS;
use vitrine::index::{IndexWriter, ModelSpec, Outcome, Query, Upsert, WriteOp, WriterConfig, WriterError};
use vitrine::segment::synth::{SplitMix64, Structured};
use vitrine::segment::{HnswParams, dot};

const DIM: usize = 32;

fn version() -> ModelVersion {
    ModelVersion::new("synth-v1").unwrap()
}

fn config(seal_items: usize) -> WriterConfig {
    WriterConfig {
        holder: "live test".into(),
        default_model: Some(ModelSpec { version: version(), dim: DIM, weights_sha256: "00".into() }),
        seal_items,
        hnsw: HnswParams { m: 12, ef_construction: 100 },
        merge: MergePolicy { max_segments: 4, ..MergePolicy::default() },
        ..WriterConfig::default()
    }
}

fn data() -> Structured {
    Structured { dim: DIM, latent: 8, noise: 0.05, seed: 11 }
}

fn sku(i: usize) -> SkuId {
    SkuId::new(format!("SKU-{i:06}")).unwrap()
}

fn attrs(pairs: &[(&str, serde_json::Value)]) -> Attrs {
    pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
}

fn upsert(i: usize, v: &[f32], a: Attrs) -> WriteOp {
    WriteOp::Upsert(Upsert {
        sku: sku(i),
        attrs: Some(a),
        image_sha256: None,
        vectors: vec![(version(), v.to_vec())],
    })
}

fn search(w: &IndexWriter, q: &[f32], k: usize, filter: Option<&Filter>) -> Vec<String> {
    let live = w.live();
    let view = live.version(&version()).unwrap();
    let query = Query { vector: q, k, ef: 0, exclude: None, filter };
    view.search(&query, w.attrs()).unwrap().into_iter().map(|h| h.sku.to_string()).collect()
}

#[test]
fn writes_are_visible_on_ack_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let rows = data().rows(0, 300);
    let vec_of = |i: usize| &rows[i * DIM..(i + 1) * DIM];
    {
        let w = IndexWriter::open(dir.path(), config(10_000)).unwrap();
        let ops: Vec<WriteOp> = (0..300).map(|i| upsert(i, vec_of(i), attrs(&[("n", i.into())]))).collect();
        let out = w.write_blocking(ops).unwrap();
        assert!(out.iter().all(|o| *o == Outcome::Added), "{out:?}");
        // Read-your-writes: every item finds itself first.
        for i in (0..300).step_by(37) {
            assert_eq!(search(&w, vec_of(i), 1, None), vec![sku(i).to_string()]);
        }
        // Delete, replace, attributes-only, and the outcomes say so.
        let out = w
            .write_blocking(vec![
                WriteOp::Delete(sku(5)),
                WriteOp::Delete(sku(5)),
                upsert(6, vec_of(7), attrs(&[("n", 6.into())])),
                WriteOp::Upsert(Upsert {
                    sku: sku(8),
                    attrs: Some(attrs(&[("n", 80.into())])),
                    image_sha256: None,
                    vectors: vec![],
                }),
                WriteOp::Upsert(Upsert { sku: sku(9), attrs: None, image_sha256: None, vectors: vec![] }),
                WriteOp::Upsert(Upsert { sku: sku(999), attrs: None, image_sha256: None, vectors: vec![] }),
                WriteOp::Upsert(Upsert {
                    sku: sku(1000),
                    attrs: None,
                    image_sha256: None,
                    vectors: vec![(version(), vec![0.0; DIM])],
                }),
                WriteOp::Upsert(Upsert {
                    sku: sku(1001),
                    attrs: None,
                    image_sha256: None,
                    vectors: vec![(version(), vec![1.0; DIM + 1])],
                }),
                WriteOp::Upsert(Upsert {
                    sku: sku(1002),
                    attrs: None,
                    image_sha256: None,
                    vectors: vec![(ModelVersion::new("other").unwrap(), vec![1.0; DIM])],
                }),
            ])
            .unwrap();
        assert_eq!(
            &out[..5],
            &[Outcome::Deleted, Outcome::NotFound, Outcome::Updated, Outcome::Updated, Outcome::Unchanged]
        );
        for (o, what) in out[5..].iter().zip(["no such SKU", "unusable", "dimensions", "no index"]) {
            assert!(matches!(o, Outcome::Rejected(why) if why.contains(what)), "{o:?} should say {what}");
        }
        assert!(!search(&w, vec_of(5), 10, None).contains(&sku(5).to_string()));
        let hits = search(&w, vec_of(7), 2, None);
        assert_eq!(hits.len(), 2);
        assert!(hits.contains(&sku(6).to_string()) && hits.contains(&sku(7).to_string()), "{hits:?}");
        assert_eq!(w.record(sku(8).as_str()).unwrap().unwrap().attrs["n"], serde_json::json!(80));
        // Closed without a checkpoint: everything is only in the log.
        w.close();
    }
    let w = IndexWriter::open(dir.path(), config(10_000)).unwrap();
    assert_eq!(w.open_report().replayed, 303, "300 adds, a delete, a replacement, an attributes update");
    assert_eq!(search(&w, vec_of(0), 1, None), vec![sku(0).to_string()]);
    assert!(!search(&w, vec_of(5), 10, None).contains(&sku(5).to_string()));
    assert!(w.record(sku(5).as_str()).unwrap().is_none());
    assert_eq!(w.record(sku(8).as_str()).unwrap().unwrap().attrs["n"], serde_json::json!(80));
    assert_eq!(w.live().version(&version()).unwrap().live_items(), 299);
}

#[test]
fn seal_and_merge_keep_every_item_once_and_bound_the_segments() {
    let dir = tempfile::tempdir().unwrap();
    let rows = data().rows(0, 1200);
    let vec_of = |i: usize| &rows[i * DIM..(i + 1) * DIM];
    let w = IndexWriter::open(dir.path(), config(100)).unwrap();
    let mut rng = SplitMix64::new(3);
    let mut live: BTreeMap<usize, usize> = BTreeMap::new(); // sku -> row of its vector
    for round in 0..12 {
        let mut ops = Vec::new();
        let mut expect = Vec::new();
        for _ in 0..100 {
            let i = rng.below(400) as usize;
            if rng.below(5) == 0 {
                ops.push(WriteOp::Delete(sku(i)));
                expect.push((i, None));
            } else {
                let row = (round * 100 + rng.below(100) as usize) % 1200;
                ops.push(upsert(i, vec_of(row), Attrs::new()));
                expect.push((i, Some(row)));
            }
        }
        w.write_blocking(ops).unwrap();
        for (i, row) in expect {
            match row {
                Some(r) => live.insert(i, r),
                None => live.remove(&i),
            };
        }
    }
    w.checkpoint_blocking().unwrap();
    // Let merges settle (polling, generous for a loaded machine).
    for _ in 0..2400 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let m = Manifest::load(dir.path()).unwrap();
        if m.indexes[&version()].segments.len() <= 4 {
            break;
        }
    }
    let view_live = w.live();
    let view = view_live.version(&version()).unwrap();
    assert!(view.sealed.len() <= 4, "{} segments after merging", view.sealed.len());
    assert_eq!(view.live_items(), live.len() as u64);
    // Every live SKU once, with its latest vector; every deleted one gone.
    for (&i, &row) in &live {
        assert_eq!(view.vector_of(sku(i).as_str()).unwrap(), vec_of(row).to_vec(), "sku {i}");
    }
    for i in 0..400 {
        assert_eq!(view.holds(sku(i).as_str()), live.contains_key(&i), "sku {i}");
    }
    let hits = search(&w, vec_of(0), 400, None);
    let unique: HashSet<&String> = hits.iter().collect();
    assert_eq!(unique.len(), hits.len(), "duplicates in {hits:?}");
    w.close();
    // The directory holds only what the manifest names, and reopens to the same state.
    let w = IndexWriter::open(dir.path(), config(100)).unwrap();
    assert_eq!(w.open_report().orphans_removed, 0);
    assert_eq!(w.open_report().replayed, 0);
    assert_eq!(w.live().version(&version()).unwrap().live_items(), live.len() as u64);
}

/// Waits (polling, generous for a loaded machine) until the version has at most `max` sealed
/// segments and nothing frozen.
fn settle(w: &IndexWriter, max: usize) {
    for _ in 0..2400 {
        let live = w.live();
        let view = live.version(&version()).unwrap();
        if view.sealed.len() <= max && view.frozen.is_empty() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("segments did not settle to {max}");
}

/// A search splits its segments over the pool it runs on: on four threads it answers exactly
/// what it answers on one (same SKUs, same scores, same order), with nothing twice and no
/// deleted SKU, over graph, flat, frozen-or-mutable segments and a filter.
#[test]
fn a_search_split_over_threads_answers_as_on_one_thread() {
    let parity =
        |i: usize| attrs(&[("parity", serde_json::json!(if i.is_multiple_of(2) { "even" } else { "odd" }))]);
    let dir = tempfile::tempdir().unwrap();
    let rows = data().rows(0, 1300);
    let vec_of = |i: usize| &rows[i * DIM..(i + 1) * DIM];
    let w = IndexWriter::open(dir.path(), config(150)).unwrap();
    for round in 0..8 {
        let ops = (round * 150..(round + 1) * 150).map(|i| upsert(i, vec_of(i), parity(i))).collect();
        w.write_blocking(ops).unwrap();
    }
    settle(&w, 4);
    // Some items still in the mutable segment, some deleted from sealed ones.
    let tail = (1200..1300).map(|i| upsert(i, vec_of(i), parity(i)));
    w.write_blocking(tail.collect()).unwrap();
    let deleted: Vec<usize> = (0..1300).step_by(7).collect();
    w.write_blocking(deleted.iter().map(|&i| WriteOp::Delete(sku(i))).collect()).unwrap();
    let live = w.live();
    let view = live.version(&version()).unwrap();
    assert!(view.sealed.len() >= 2, "{} sealed segments", view.sealed.len());
    let even = Filter::parse(["parity=even"]).unwrap();
    let pools = [1, 4].map(|n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap());
    for qi in 0..24 {
        let q = vec_of(qi * 53 + 1);
        let filter = (qi % 3 == 0).then_some(&even);
        let query = Query { vector: q, k: 40, ef: 0, exclude: None, filter };
        let answers = pools.each_ref().map(|pool| {
            pool.install(|| view.search(&query, w.attrs()).unwrap())
                .into_iter()
                .map(|h| (h.sku.to_string(), h.score.to_bits()))
                .collect::<Vec<_>>()
        });
        assert_eq!(answers[0], answers[1], "query {qi}");
        let skus: HashSet<&String> = answers[1].iter().map(|(s, _)| s).collect();
        assert_eq!(skus.len(), answers[1].len(), "query {qi}: duplicates");
        assert_eq!(answers[1].len(), 40, "query {qi}");
        for &i in &deleted {
            assert!(!skus.contains(&sku(i).to_string()), "query {qi}: deleted sku {i}");
        }
    }
    drop(live);
    w.close();
}

/// Seals small enough to be scanned at the default ef are written flat (no graph build on
/// the write path); flat segments holding more than `max_flat_items` merge, whatever the segment
/// count, and a merge that outgrows the flat size builds the graph; every item stays findable.
#[test]
fn small_seals_are_flat_and_merges_build_the_graph() {
    let dir = tempfile::tempdir().unwrap();
    let n = 7_500;
    let rows = data().rows(0, n);
    let vec_of = |i: usize| &rows[i * DIM..(i + 1) * DIM];
    let write = |w: &IndexWriter, range: std::ops::Range<usize>| {
        for chunk in range.collect::<Vec<_>>().chunks(500) {
            w.write_blocking(chunk.iter().map(|&i| upsert(i, vec_of(i), Attrs::new())).collect()).unwrap();
        }
    };
    let mut cfg = config(1_500);
    cfg.merge.max_segments = 100;
    cfg.merge.max_flat_items = 100_000;
    let w = IndexWriter::open(dir.path(), cfg.clone()).unwrap();
    write(&w, 0..6_000);
    settle(&w, 4);
    {
        let live = w.live();
        let view = live.version(&version()).unwrap();
        assert_eq!(view.sealed.len(), 4);
        assert!(view.sealed.iter().all(|s| !s.segment.has_graph() && s.segment.len() == 1_500));
    }
    w.close();
    // 6,000 flat items, 3,000 allowed: the four merge on open, though the count is far below
    // its limit, into one graph.
    cfg.merge.max_flat_items = 3_000;
    let w = IndexWriter::open(dir.path(), cfg.clone()).unwrap();
    settle(&w, 1);
    {
        let live = w.live();
        let view = live.version(&version()).unwrap();
        assert!(view.sealed[0].segment.has_graph() && view.sealed[0].segment.len() == 6_000);
    }
    w.close();
    cfg.merge.max_segments = 1;
    let w = IndexWriter::open(dir.path(), cfg).unwrap();
    write(&w, 6_000..n);
    w.checkpoint_blocking().unwrap();
    settle(&w, 1);
    let live = w.live();
    let view = live.version(&version()).unwrap();
    let merged = &view.sealed[0].segment;
    assert_eq!(merged.len(), n);
    assert!(merged.has_graph() && merged.len() > FLAT_SEGMENT_ITEMS);
    let found =
        (0..n).step_by(37).filter(|&i| search(&w, vec_of(i), 1, None) == [sku(i).to_string()]).count();
    let asked = (0..n).step_by(37).count();
    assert!(found as f64 >= 0.99 * asked as f64, "{found} of {asked} found themselves at rank 1");
}

#[test]
fn searches_during_writes_seals_and_merges_never_fail_duplicate_or_resurrect() {
    let dir = tempfile::tempdir().unwrap();
    let rows = Arc::new(data().rows(0, 2000));
    let w = Arc::new(IndexWriter::open(dir.path(), config(150)).unwrap());
    // SKUs 0..500 are written once then deleted for good; 500..1000 churn.
    let deleted_for_good: Arc<Mutex<HashSet<String>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let searches = Arc::new(AtomicUsize::new(0));
    let mut searchers = Vec::new();
    for t in 0..3 {
        let (w, rows, gone, stop, searches) = (
            Arc::clone(&w),
            Arc::clone(&rows),
            Arc::clone(&deleted_for_good),
            Arc::clone(&stop),
            Arc::clone(&searches),
        );
        searchers.push(std::thread::spawn(move || {
            let mut rng = SplitMix64::new(100 + t);
            while !stop.load(Ordering::Acquire) {
                let before: HashSet<String> = gone.lock().clone();
                let r = rng.below(2000) as usize;
                let hits = search(&w, &rows[r * DIM..(r + 1) * DIM], 20, None);
                let unique: HashSet<&String> = hits.iter().collect();
                assert_eq!(unique.len(), hits.len(), "duplicate SKU in {hits:?}");
                for h in &hits {
                    assert!(!before.contains(h), "{h} was deleted before this search started");
                }
                searches.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut rng = SplitMix64::new(9);
    for i in 0..500 {
        w.write_blocking(vec![upsert(i, &rows[i * DIM..(i + 1) * DIM], Attrs::new())]).unwrap();
    }
    for round in 0..40 {
        let mut ops = Vec::new();
        for _ in 0..30 {
            let i = 500 + rng.below(500) as usize;
            let r = rng.below(2000) as usize;
            ops.push(upsert(i, &rows[r * DIM..(r + 1) * DIM], Attrs::new()));
        }
        let victims: Vec<usize> = (round * 12..round * 12 + 12).filter(|&i| i < 500).collect();
        ops.extend(victims.iter().map(|&i| WriteOp::Delete(sku(i))));
        w.write_blocking(ops).unwrap();
        deleted_for_good.lock().extend(victims.iter().map(|&i| sku(i).to_string()));
    }
    w.checkpoint_blocking().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    for s in searchers {
        s.join().expect("a searcher failed");
    }
    assert!(searches.load(Ordering::Relaxed) > 50, "too few searches ran");
    let m = Manifest::load(dir.path()).unwrap();
    assert!(m.generation > 3, "seals and merges committed: generation {}", m.generation);
}

#[test]
fn a_torn_log_tail_is_dropped_and_a_damaged_middle_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let rows = data().rows(0, 20);
    {
        let w = IndexWriter::open(dir.path(), config(10_000)).unwrap();
        for i in 0..20 {
            w.write_blocking(vec![upsert(i, &rows[i * DIM..(i + 1) * DIM], Attrs::new())]).unwrap();
        }
        w.close();
    }
    let log = std::fs::read_dir(dir.path().join("wal")).unwrap().next().unwrap().unwrap().path();
    let good = std::fs::read(&log).unwrap();
    // A torn last write: half a frame of garbage at the end.
    let mut torn = good.clone();
    torn.extend_from_slice(&good[..good.len() / 30]);
    std::fs::write(&log, &torn).unwrap();
    {
        let w = IndexWriter::open(dir.path(), config(10_000)).unwrap();
        assert_eq!(w.open_report().replayed, 20);
        assert!(w.open_report().dropped_tail_bytes > 0);
        assert_eq!(w.live().version(&version()).unwrap().live_items(), 20);
    }
    // A flipped byte in an early record, with acknowledged records after it: refuse to start.
    let mut bad = std::fs::read(&log).unwrap();
    bad[40] ^= 0x55;
    std::fs::write(&log, &bad).unwrap();
    match IndexWriter::open(dir.path(), config(10_000)) {
        Err(WriterError::Wal(e)) => println!("refused as expected: {e}"),
        Err(e) => panic!("expected a log error, got {e}"),
        Ok(_) => panic!("a damaged log in the middle must stop the start"),
    }
}

#[test]
fn filtered_search_keeps_its_recall_at_every_selectivity() {
    let dir = tempfile::tempdir().unwrap();
    let n = 20_000;
    let shape = Structured { dim: DIM, latent: 12, noise: 0.1, seed: 21 };
    let rows = shape.rows(0, n);
    let mut cfg = config(5_000);
    cfg.merge.max_segments = 8;
    let w = IndexWriter::open(dir.path(), cfg).unwrap();
    // half: 50%; twentieth: 5%; rare: 0.1%; price: a number; late: the last quarter written
    // (25%, all in the newest segments: planned per segment, the others are skipped).
    let attrs_of = |i: usize| {
        attrs(&[
            ("late", (i >= n / 4 * 3).into()),
            ("half", (if i.is_multiple_of(2) { "yes" } else { "no" }).into()),
            ("twentieth", (if i % 20 == 3 { "in" } else { "out" }).into()),
            ("rare", (i % 1000 == 7).into()),
            ("price", ((i % 100) as f64).into()),
        ])
    };
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        w.write_blocking(
            chunk.iter().map(|&i| upsert(i, &rows[i * DIM..(i + 1) * DIM], attrs_of(i))).collect(),
        )
        .unwrap();
    }
    w.checkpoint_blocking().unwrap();
    let queries = shape.rows(n as u64 + 1, 100);
    for (exprs, share) in [
        (vec!["half=yes"], 0.5),
        (vec!["twentieth=in"], 0.05),
        (vec!["rare=true"], 0.001),
        (vec!["half!=yes", "price<50"], 0.25),
        (vec!["late=true"], 0.25),
        (vec!["late=true", "half=yes"], 0.125),
    ] {
        let filter = Filter::parse(&exprs).unwrap();
        let mut found = 0usize;
        let mut wanted = 0usize;
        for q in queries.chunks_exact(DIM) {
            // Exact filtered answer.
            let mut exact: Vec<(f32, usize)> = (0..n)
                .filter(|&i| filter.matches(&attrs_of(i)))
                .map(|i| (dot(q, &rows[i * DIM..(i + 1) * DIM]), i))
                .collect();
            assert!((exact.len() as f64 - share * n as f64).abs() <= 0.01 * n as f64 + 2.0);
            exact.sort_by(|a, b| b.0.total_cmp(&a.0));
            let truth: HashSet<String> = exact.iter().take(10).map(|&(_, i)| sku(i).to_string()).collect();
            let got = search(&w, q, 10, Some(&filter));
            for h in &got {
                let i: usize = h[4..].parse().unwrap();
                assert!(filter.matches(&attrs_of(i)), "{h} does not pass {exprs:?}");
            }
            wanted += truth.len();
            found += got.iter().filter(|h| truth.contains(*h)).count();
        }
        let recall = found as f64 / wanted as f64;
        println!("filter {exprs:?} (~{:.1}%): recall@10 {recall:.4}", share * 100.0);
        assert!(recall >= 0.95, "filter {exprs:?}: recall@10 {recall:.4} < 0.95");
    }
}

#[test]
fn a_second_writer_is_refused_with_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let _w = IndexWriter::open(dir.path(), config(100)).unwrap();
    let mut cfg = config(100);
    cfg.holder = "second".into();
    match IndexWriter::open(dir.path(), cfg) {
        Err(e) => assert!(e.to_string().contains("live test"), "{e}"),
        Ok(_) => panic!("two writers on one directory"),
    }
}

/// Writes a format-1 directory (the layout before the index writer) by hand.
fn write_format_1(dir: &Path, rows: &[f32], n: usize) {
    let v = version();
    std::fs::create_dir_all(dir.join("indexes").join(v.as_str())).unwrap();
    std::fs::create_dir_all(dir.join("catalog")).unwrap();
    let skus: Vec<SkuId> = (0..n).map(sku).collect();
    let seg = dir.join("indexes").join(v.as_str()).join(vitrine::ids::SegmentId(1).file_name());
    let stats =
        vitrine::segment::write_segment(&seg, DIM, &rows[..n * DIM], &skus, &HnswParams::default()).unwrap();
    let mut cat = String::new();
    for i in 0..n {
        cat.push_str(&format!(
            "{{\"sku\":\"{}\",\"image_sha256\":\"ab{i}\",\"attrs\":{{\"n\":{i}}}}}\n",
            sku(i)
        ));
    }
    std::fs::write(dir.join("catalog/cat-000000000002.jsonl"), cat).unwrap();
    let manifest = serde_json::json!({
        "format": 1, "generation": 1, "next_id": 3, "serving_model": v.as_str(),
        "catalog": [{"id": 2, "count": n}],
        "indexes": {v.as_str(): {"dim": DIM, "weights_sha256": "00",
            "segments": [{"id": 1, "count": n, "bytes": stats.bytes, "deleted": [3, 4]}]}}
    });
    std::fs::write(dir.join("MANIFEST.json"), manifest.to_string()).unwrap();
}

#[test]
fn a_format_1_directory_is_migrated_on_first_open() {
    let dir = tempfile::tempdir().unwrap();
    let rows = data().rows(0, 50);
    write_format_1(dir.path(), &rows, 50);
    let w = IndexWriter::open(dir.path(), config(100)).unwrap();
    assert!(w.open_report().migrated);
    let m = Manifest::load(dir.path()).unwrap();
    assert_eq!(m.format, 2);
    assert_eq!(m.indexes[&version()].segments[0].deleted(), 2);
    assert!(!dir.path().join("catalog").exists());
    assert_eq!(w.live().version(&version()).unwrap().live_items(), 48);
    assert!(!search(&w, &rows[3 * DIM..4 * DIM], 5, None).contains(&sku(3).to_string()));
    assert_eq!(w.record(sku(10).as_str()).unwrap().unwrap().attrs["n"], serde_json::json!(10));
    assert_eq!(w.record(sku(10).as_str()).unwrap().unwrap().image_sha256.as_deref(), Some("ab10"));
}

/// A second model version added to a live directory: image upserts then need its vector, a
/// backfill fills it without overwriting newer writes, serving switches in one commit, and the
/// old version can be dropped.
#[test]
fn the_stored_image_sent_again_replaces_a_vector_sent_since() {
    let dir = tempfile::tempdir().unwrap();
    let rows = data().rows(0, 2);
    let (from_image, sent) = (rows[..DIM].to_vec(), rows[DIM..].to_vec());
    let image = |vectors: Vec<(ModelVersion, Vec<f32>)>| {
        WriteOp::Upsert(Upsert { sku: sku(1), attrs: None, image_sha256: Some("img1".into()), vectors })
    };
    let held = |w: &IndexWriter| w.live().version(&version()).unwrap().vector_of(sku(1).as_str()).unwrap();
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5);
    {
        let w = IndexWriter::open(dir.path(), config(10_000)).unwrap();
        assert_eq!(
            w.write_blocking(vec![image(vec![(version(), from_image.clone())])]).unwrap(),
            [Outcome::Added]
        );
        // The same image again: nothing to embed.
        assert_eq!(w.write_blocking(vec![image(vec![])]).unwrap(), [Outcome::Unchanged]);
        // A vector sent for the SKU replaces the image's embedding...
        let out = w.write_blocking(vec![upsert(1, &sent, Attrs::new())]).unwrap();
        assert_eq!(out, [Outcome::Updated]);
        assert!(close(&held(&w), &sent));
        w.close();
    }
    // ...and, across a restart (the log's record says the vector was sent), the stored image
    // sent again asks to be embedded and then replaces the sent vector.
    let w = IndexWriter::open(dir.path(), config(10_000)).unwrap();
    assert_eq!(
        w.write_blocking(vec![image(vec![])]).unwrap(),
        [Outcome::NeedsEmbedding { missing: vec![version()] }]
    );
    assert_eq!(
        w.write_blocking(vec![image(vec![(version(), from_image.clone())])]).unwrap(),
        [Outcome::Updated]
    );
    assert!(close(&held(&w), &from_image));
    assert_eq!(w.write_blocking(vec![image(vec![])]).unwrap(), [Outcome::Unchanged]);
    assert!(w.record(sku(1).as_str()).unwrap().unwrap().supplied.is_empty());
    // After a checkpoint the record store keeps it too.
    w.write_blocking(vec![upsert(1, &sent, Attrs::new())]).unwrap();
    w.checkpoint_blocking().unwrap();
    w.close();
    let w = IndexWriter::open(dir.path(), config(10_000)).unwrap();
    assert_eq!(w.open_report().replayed, 0);
    assert_eq!(
        w.write_blocking(vec![image(vec![])]).unwrap(),
        [Outcome::NeedsEmbedding { missing: vec![version()] }]
    );
}

#[test]
fn versions_are_added_backfilled_switched_and_dropped() {
    use vitrine::index::writer::AdminOp;
    let dir = tempfile::tempdir().unwrap();
    let rows = data().rows(0, 40);
    let v2 = ModelVersion::new("synth-v2").unwrap();
    let v2_spec = ModelSpec { version: v2.clone(), dim: 8, weights_sha256: "02".into() };
    let image_upsert = |i: usize, sha: &str, vectors: Vec<(ModelVersion, Vec<f32>)>| {
        WriteOp::Upsert(Upsert { sku: sku(i), attrs: None, image_sha256: Some(sha.into()), vectors })
    };
    let w = IndexWriter::open(dir.path(), config(16)).unwrap();
    let ops = (0..20).map(|i| {
        image_upsert(i, &format!("img{i}"), vec![(version(), rows[i * DIM..(i + 1) * DIM].to_vec())])
    });
    assert!(w.write_blocking(ops.collect()).unwrap().iter().all(|o| *o == Outcome::Added));

    w.admin_blocking(AdminOp::AddVersion(v2_spec.clone())).unwrap();
    // Adding the same version again is a no-op; other weights under the same name are refused.
    w.admin_blocking(AdminOp::AddVersion(v2_spec.clone())).unwrap();
    let conflict = ModelSpec { weights_sha256: "other".into(), ..v2_spec.clone() };
    assert!(matches!(
        w.admin_blocking(AdminOp::AddVersion(conflict)),
        Err(WriterError::VersionConflict { .. })
    ));
    // A new image now needs a vector of both versions.
    let out =
        w.write_blocking(vec![image_upsert(30, "img30", vec![(version(), rows[..DIM].to_vec())])]).unwrap();
    assert_eq!(out, vec![Outcome::NeedsEmbedding { missing: vec![v2.clone()] }]);

    let unit8 = |k: usize| {
        let mut v = vec![0.0f32; 8];
        v[k % 8] = 1.0;
        v
    };
    let backfill = |i: usize, sha: &str| WriteOp::Backfill {
        sku: sku(i),
        version: v2.clone(),
        image_sha256: sha.into(),
        vector: unit8(i),
    };
    // SKU 1 got a new image meanwhile (with both vectors): its stale backfill is skipped.
    w.write_blocking(vec![image_upsert(
        1,
        "new1",
        vec![(version(), rows[..DIM].to_vec()), (v2.clone(), unit8(7))],
    )])
    .unwrap();
    let out = w.write_blocking((0..20).map(|i| backfill(i, &format!("img{i}"))).collect()).unwrap();
    assert_eq!(out[1], Outcome::Unchanged, "a stale backfill must not overwrite a newer image");
    assert!(out.iter().enumerate().all(|(i, o)| i == 1 || *o == Outcome::Updated), "{out:?}");
    // Again: everything is held already.
    let out = w.write_blocking((0..20).map(|i| backfill(i, &format!("img{i}"))).collect()).unwrap();
    assert!(out.iter().all(|o| *o == Outcome::Unchanged));
    let live = w.live();
    assert_eq!(live.version(&v2).unwrap().live_items(), 20);
    assert_eq!(live.version(&v2).unwrap().vector_of(sku(1).as_str()).unwrap(), unit8(7));

    w.admin_blocking(AdminOp::SetServing(v2.clone())).unwrap();
    assert_eq!(w.live().serving.as_ref(), Some(&v2));
    assert!(matches!(w.admin_blocking(AdminOp::DropVersion(v2.clone())), Err(WriterError::DropServing(_))));
    w.admin_blocking(AdminOp::DropVersion(version())).unwrap();
    // Its files go once no seal or merge (which may be writing one) is under way.
    let dropped = dir.path().join("indexes").join(version().as_str());
    for _ in 0..600 {
        if !dropped.exists() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!dropped.exists(), "a dropped version's directory stays");
    let state = serde_json::json!({"phase": "promoted", "challenger": "synth-v2"});
    w.admin_blocking(AdminOp::SetRollout { state: Some(state.clone()), serve: None, drop: None }).unwrap();
    assert!(w.live().version(&version()).is_err());
    w.close();
    let w = IndexWriter::open(dir.path(), config(16)).unwrap();
    assert_eq!(w.live().serving.as_ref(), Some(&v2));
    assert_eq!(w.live().rollout, Some(state), "the rollout state is committed with the manifest");
    assert_eq!(w.live().versions.len(), 1);
    assert_eq!(w.live().version(&v2).unwrap().live_items(), 20);
}
