//! Segment files end to end: HNSW recall against brute force, round trips through the file,
//! SKU lookup, damaged files, tiny segments and crash-safe writing.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use vitrine::ids::SkuId;
use vitrine::segment::format::{FOOTER_LEN, Footer, HEADER_LEN, Header, SectionId};
use vitrine::segment::synth::{SplitMix64, Structured};
use vitrine::segment::{
    DEFAULT_EF_SEARCH, Hit, HnswParams, SearchPlan, Segment, SegmentError, SegmentStats, write_flat_segment,
    write_segment, write_segment_extending, write_segment_hnsw_rs,
};

fn skus(n: usize, prefix: &str) -> Vec<SkuId> {
    (0..n).map(|i| SkuId::new(format!("{prefix}-{i:06}")).unwrap()).collect()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// 20k structured vectors (16-d latent through a random map to 128-d, plus noise), built once
/// and shared by the tests that need a realistic segment.
struct Big {
    _dir: tempfile::TempDir,
    path: PathBuf,
    stats: SegmentStats,
    queries: Vec<f32>,
    dim: usize,
}

fn big() -> &'static Big {
    static BIG: OnceLock<Big> = OnceLock::new();
    BIG.get_or_init(|| {
        let shape = Structured { dim: 128, latent: 16, noise: 0.3, seed: 42 };
        let n = 20_000;
        let base = shape.rows(0, n);
        let queries = shape.rows(1_000_000, 200);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.vseg");
        let stats = write_segment(&path, shape.dim, &base, &skus(n, "big"), &HnswParams::default()).unwrap();
        Big { _dir: dir, path, stats, queries, dim: shape.dim }
    })
}

fn recall(approx: &[Hit], exact: &[Hit]) -> f64 {
    let truth: HashSet<u32> = exact.iter().map(|h| h.idx).collect();
    approx.iter().filter(|h| truth.contains(&h.idx)).count() as f64 / exact.len().max(1) as f64
}

#[test]
fn recall_at_default_ef_is_at_least_095() {
    let big = big();
    assert_eq!(big.stats.count, 20_000);
    assert_eq!(big.stats.dim, 128);
    assert!(big.stats.self_recall >= 0.99, "self-recall {}", big.stats.self_recall);
    let seg = Segment::open(&big.path).unwrap();
    let mut total = 0.0;
    let mut count = 0;
    for q in big.queries.chunks_exact(big.dim) {
        let exact = seg.brute_force(q, 10, None).unwrap();
        let approx = seg.search(q, 10, DEFAULT_EF_SEARCH, None).unwrap();
        assert_eq!(approx.len(), 10);
        assert!(approx.windows(2).all(|w| w[0].score >= w[1].score), "hits not sorted: {approx:?}");
        total += recall(&approx, &exact);
        count += 1;
    }
    let r = total / f64::from(count);
    eprintln!("recall@10 at ef={DEFAULT_EF_SEARCH}: {r:.4}");
    assert!(r >= 0.95, "recall@10 {r} at ef={DEFAULT_EF_SEARCH}");
}

#[test]
fn brute_force_matches_a_naive_scan() {
    let big = big();
    let seg = Segment::open(&big.path).unwrap();
    for q in big.queries.chunks_exact(big.dim).take(5) {
        let norm = q.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        let mut naive: Vec<(f64, u32)> = (0..seg.len() as u32)
            .map(|i| {
                (
                    seg.vector(i).iter().zip(q).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum::<f64>()
                        / norm,
                    i,
                )
            })
            .collect();
        naive.sort_by(|a, b| b.0.total_cmp(&a.0));
        let hits = seg.brute_force(q, 10, None).unwrap();
        for (h, (s, _)) in hits.iter().zip(&naive) {
            assert!((f64::from(h.score) - s).abs() < 1e-4, "{} vs {}", h.score, s);
        }
        // Same set, up to ties within float error.
        let kth = naive[9].0;
        assert!(hits.iter().all(|h| f64::from(h.score) >= kth - 1e-4));
    }
}

#[test]
fn results_are_identical_after_reopening() {
    let big = big();
    let first = Segment::open(&big.path).unwrap();
    let before: Vec<Vec<Hit>> =
        big.queries.chunks_exact(big.dim).map(|q| first.search(q, 10, 40, None).unwrap()).collect();
    drop(first);
    let second = Segment::open(&big.path).unwrap();
    let after: Vec<Vec<Hit>> =
        big.queries.chunks_exact(big.dim).map(|q| second.search(q, 10, 40, None).unwrap()).collect();
    assert_eq!(before, after);
    second.verify().unwrap();
}

#[test]
fn filter_hides_tombstones_but_keeps_recall() {
    let big = big();
    let seg = Segment::open(&big.path).unwrap();
    let live = |i: u32| !i.is_multiple_of(3);
    let mut total = 0.0;
    for q in big.queries.chunks_exact(big.dim).take(50) {
        let hits = seg.search(q, 10, DEFAULT_EF_SEARCH, Some(&live)).unwrap();
        assert_eq!(hits.len(), 10);
        assert!(hits.iter().all(|h| live(h.idx)), "tombstoned item returned: {hits:?}");
        let exact = seg.brute_force(q, 10, Some(&live)).unwrap();
        assert!(exact.iter().all(|h| live(h.idx)));
        total += recall(&hits, &exact);
    }
    assert!(total / 50.0 >= 0.9, "filtered recall {}", total / 50.0);
    // Everything filtered out: no hits, no hang.
    let none = |_: u32| false;
    assert!(seg.search(&big.queries[..big.dim], 10, 64, Some(&none)).unwrap().is_empty());
}

#[test]
fn find_sku_locates_every_item() {
    let big = big();
    let seg = Segment::open(&big.path).unwrap();
    for i in (0..seg.len() as u32).step_by(97) {
        let sku = format!("big-{i:06}");
        assert_eq!(seg.sku(i), sku);
        assert_eq!(seg.find_sku(&sku), Some(i));
    }
    assert_eq!(seg.find_sku("big-"), None);
    assert_eq!(seg.find_sku("big-0000000"), None);
    assert_eq!(seg.find_sku("zzz"), None);
    assert_eq!(seg.find_sku(""), None);
}

#[test]
fn bad_queries_are_errors() {
    let big = big();
    let seg = Segment::open(&big.path).unwrap();
    let wrong_dim = vec![0.1f32; big.dim - 1];
    assert!(matches!(
        seg.search(&wrong_dim, 5, 64, None),
        Err(SegmentError::DimMismatch { expected: 128, actual: 127, .. })
    ));
    assert!(matches!(seg.brute_force(&wrong_dim, 5, None), Err(SegmentError::DimMismatch { .. })));
    let mut nan = big.queries[..big.dim].to_vec();
    nan[3] = f32::NAN;
    assert!(matches!(seg.search(&nan, 5, 64, None), Err(SegmentError::InvalidQuery { .. })));
    let zero = vec![0.0f32; big.dim];
    assert!(matches!(seg.search(&zero, 5, 64, None), Err(SegmentError::InvalidQuery { .. })));
    assert!(seg.search(&big.queries[..big.dim], 0, 64, None).unwrap().is_empty());
    // ef below k is raised to k.
    assert_eq!(seg.search(&big.queries[..big.dim], 30, 1, None).unwrap().len(), 30);
    // An unnormalised query scores like its normalised self.
    let q = &big.queries[..big.dim];
    let scaled: Vec<f32> = q.iter().map(|x| x * 7.5).collect();
    assert_eq!(
        seg.search(q, 5, 64, None).unwrap().iter().map(|h| h.idx).collect::<Vec<_>>(),
        seg.search(&scaled, 5, 64, None).unwrap().iter().map(|h| h.idx).collect::<Vec<_>>()
    );
}

/// A small segment on disk, returned as (dir, path, bytes).
fn small_segment() -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let shape = Structured { dim: 16, latent: 4, noise: 0.1, seed: 9 };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("small.vseg");
    write_segment(&path, 16, &shape.rows(0, 300), &skus(300, "s"), &HnswParams::default()).unwrap();
    let bytes = fs::read(&path).unwrap();
    (dir, path, bytes)
}

fn rewrite(path: &Path, bytes: &[u8]) {
    // Tests replace the file (new inode), as a real corruption would not be mapped concurrently.
    let _ = fs::remove_file(path);
    fs::write(path, bytes).unwrap();
}

#[test]
fn truncated_files_are_rejected() {
    let (_dir, path, bytes) = small_segment();
    for len in
        [0, 7, 100, HEADER_LEN as usize, bytes.len() / 2, bytes.len() - FOOTER_LEN as usize, bytes.len() - 1]
    {
        rewrite(&path, &bytes[..len]);
        match Segment::open(&path) {
            Err(SegmentError::Truncated { .. }) => {}
            other => panic!("len {len}: expected Truncated, got {other:?}"),
        }
    }
    let mut longer = bytes.clone();
    longer.extend_from_slice(&[0; 64]);
    rewrite(&path, &longer);
    assert!(matches!(Segment::open(&path), Err(SegmentError::Truncated { .. })));
}

#[test]
fn every_flipped_header_or_footer_byte_is_caught_at_open() {
    let (_dir, path, bytes) = small_segment();
    let footer_at = bytes.len() - FOOTER_LEN as usize;
    for pos in (0..HEADER_LEN as usize).chain(footer_at..bytes.len()) {
        let mut damaged = bytes.clone();
        damaged[pos] ^= 0x10;
        rewrite(&path, &damaged);
        assert!(Segment::open(&path).is_err(), "flip at byte {pos} went unnoticed");
    }
}

#[test]
fn wrong_magic_and_version_are_named() {
    let (_dir, path, bytes) = small_segment();
    let mut damaged = bytes.clone();
    damaged[..8].copy_from_slice(b"NOTASEG\0");
    rewrite(&path, &damaged);
    assert!(matches!(Segment::open(&path), Err(SegmentError::BadMagic { which: "header", .. })));

    let mut damaged = bytes.clone();
    damaged[8..12].copy_from_slice(&4u32.to_le_bytes());
    rewrite(&path, &damaged);
    assert!(matches!(
        Segment::open(&path),
        Err(SegmentError::UnsupportedVersion { found: 4, supported: 3, .. })
    ));

    rewrite(&path, b"this is a text file, long enough to have a header of sorts................................................................................................................................................................................................................................................................................................");
    assert!(matches!(Segment::open(&path), Err(SegmentError::BadMagic { .. })));
    rewrite(&path, b"short");
    assert!(matches!(Segment::open(&path), Err(SegmentError::Truncated { .. })));
    fs::remove_file(&path).unwrap();
    assert!(matches!(Segment::open(&path), Err(SegmentError::Io { .. })));
}

#[test]
fn damaged_sections_are_caught_by_verify_and_never_panic() {
    let (_dir, path, bytes) = small_segment();
    let header: Header = bytemuck::pod_read_unaligned(&bytes[..HEADER_LEN as usize]);
    let query = Structured { dim: 16, latent: 4, noise: 0.1, seed: 9 }.rows(5_000, 1);
    let mut rng = SplitMix64::new(3);
    let (mut refused_at_open, mut caught_by_verify) = (0, 0);
    for id in SectionId::ALL {
        let s = header.section(id);
        if s.len == 0 {
            continue;
        }
        for _ in 0..8 {
            let pos = (s.offset + rng.below(s.len)) as usize;
            let mut damaged = bytes.clone();
            damaged[pos] ^= 1 << rng.below(8);
            rewrite(&path, &damaged);
            // Opening reads the header, footer and a few scalars (the entry point's level, the
            // last SKU and upper-layer offsets), so a flip there may already be refused at open,
            // as a layout error. Anything else must open and then be caught by `verify`.
            let seg = match Segment::open(&path) {
                Ok(seg) => seg,
                Err(SegmentError::BadLayout { .. }) => {
                    refused_at_open += 1;
                    continue;
                }
                Err(e) => panic!("{}: flip at {pos} gave an unexpected open error: {e}", id.name()),
            };
            match seg.verify() {
                Err(SegmentError::Checksum { section, .. }) => {
                    assert_eq!(section, id.name());
                    caught_by_verify += 1;
                }
                other => panic!("{}: flip at {pos} not caught: {other:?}", id.name()),
            }
            // Searching a damaged graph returns something or an error, but does not panic.
            let _ = seg.search(&query, 10, 64, None);
            let _ = seg.brute_force(&query, 10, None);
            for i in 0..seg.len() as u32 {
                let _ = seg.sku(i);
            }
            let _ = seg.find_sku("s-000010");
        }
    }
    // The O(1) open checks cover a few scalars only: nearly every flip must reach `verify`.
    assert!(caught_by_verify > 4 * refused_at_open, "{caught_by_verify} vs {refused_at_open}");
    // The vector section case named in the format docs.
    let v = header.section(SectionId::Vectors);
    let mut damaged = bytes.clone();
    damaged[v.offset as usize + 5] ^= 0x01;
    rewrite(&path, &damaged);
    assert!(matches!(
        Segment::open(&path).unwrap().verify(),
        Err(SegmentError::Checksum { section: "vectors", .. })
    ));
}

/// Flat segments (format 3, `m = 0`): no graph, and every search, whatever its plan or ef,
/// is the exact answer. Graph segments are still written as version 2.
#[test]
fn flat_segments_have_no_graph_and_search_exactly() {
    let shape = Structured { dim: 32, latent: 8, noise: 0.2, seed: 21 };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("flat.vseg");
    let n = 3000;
    let stats = write_flat_segment(&path, 32, &shape.rows(0, n), &skus(n, "f")).unwrap();
    assert_eq!((stats.count, stats.self_recall, stats.default_ef), (n, 1.0, DEFAULT_EF_SEARCH));
    let seg = Segment::open(&path).unwrap();
    assert_eq!((seg.format_version(), seg.m(), seg.has_graph(), seg.max_level()), (3, 0, false, 0));
    assert!(seg.is_quantised());
    seg.verify().unwrap();
    let even = |i: u32| i.is_multiple_of(2);
    for j in 0..20 {
        let q = shape.rows(50_000 + j, 1);
        for filter in [None, Some(&even as &dyn Fn(u32) -> bool)] {
            let exact = seg.brute_force(&q, 10, filter).unwrap();
            assert_eq!(exact.len(), 10);
            for ef in [10, DEFAULT_EF_SEARCH, 400] {
                for plan in [SearchPlan::Auto, SearchPlan::Graph, SearchPlan::Exact] {
                    let got = seg.search_as(&q, 10, ef, filter, plan).unwrap();
                    let ids = |h: &[Hit]| h.iter().map(|h| h.idx).collect::<Vec<_>>();
                    assert_eq!(ids(&got), ids(&exact), "query {j}, ef {ef}, {plan:?}");
                    for (g, e) in got.iter().zip(&exact) {
                        assert!((g.score - e.score).abs() < 1e-6);
                    }
                }
            }
        }
    }
    assert_eq!(seg.find_sku("f-002999").map(|i| seg.sku(i)), Some("f-002999"));

    let graph = dir.path().join("graph.vseg");
    write_segment(&graph, 32, &shape.rows(0, 100), &skus(100, "g"), &HnswParams::default()).unwrap();
    let g = Segment::open(&graph).unwrap();
    assert_eq!(
        (g.format_version(), g.has_graph()),
        (2, true),
        "graph segments stay readable by older builds"
    );

    // m = 0 is a version-3 feature: the same file claiming version 2 (checksums recomputed, so
    // only the rule can catch it) is refused at open.
    let mut bytes = fs::read(&path).unwrap();
    let mut header: Header = bytemuck::pod_read_unaligned(&bytes[..HEADER_LEN as usize]);
    header.version = 2;
    let footer_at = bytes.len() - FOOTER_LEN as usize;
    let mut footer: Footer = bytemuck::pod_read_unaligned(&bytes[footer_at..]);
    footer.version = 2;
    footer.header_crc = header.compute_crc();
    footer.footer_crc = footer.compute_crc();
    bytes[..HEADER_LEN as usize].copy_from_slice(bytemuck::bytes_of(&header));
    bytes[footer_at..].copy_from_slice(bytemuck::bytes_of(&footer));
    rewrite(&path, &bytes);
    match Segment::open(&path) {
        Err(SegmentError::BadLayout { section: "header", reason, .. }) => {
            assert!(reason.contains("m out of range"))
        }
        other => panic!("expected a layout error, got {other:?}"),
    }
}

#[test]
fn tiny_segments_work() {
    let dir = tempfile::tempdir().unwrap();
    for n in [1usize, 2, 5, 31, 40] {
        let shape = Structured { dim: 8, latent: 3, noise: 0.2, seed: n as u64 };
        let data = shape.rows(0, n);
        let path = dir.path().join(format!("tiny-{n}.vseg"));
        let stats = write_segment(&path, 8, &data, &skus(n, "t"), &HnswParams::default()).unwrap();
        assert_eq!(stats.count, n);
        assert_eq!(stats.self_recall, 1.0, "n={n}");
        let seg = Segment::open(&path).unwrap();
        assert_eq!(seg.len(), n);
        assert!(!seg.is_empty());
        for i in 0..n as u32 {
            let hits = seg.search(seg.vector(i), n + 5, 64, None).unwrap();
            assert_eq!(hits.len(), n, "n={n}: every item reachable");
            assert_eq!(hits[0].idx, i);
            assert!((hits[0].score - 1.0).abs() < 1e-5);
            assert_eq!(hits, seg.brute_force(seg.vector(i), n + 5, None).unwrap());
        }
    }
}

#[test]
fn invalid_batches_are_rejected_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.vseg");
    let p = HnswParams::default();
    let ok = Structured { dim: 4, latent: 2, noise: 0.1, seed: 1 }.rows(0, 10);
    let e = |r: Result<SegmentStats, SegmentError>| r.unwrap_err();
    assert!(matches!(e(write_segment(&path, 4, &[], &[], &p)), SegmentError::Empty { .. }));
    assert!(matches!(
        e(write_segment(&path, 4, &ok[..36], &skus(10, "a"), &p)),
        SegmentError::LengthMismatch { .. }
    ));
    assert!(matches!(
        e(write_segment(&path, 0, &[], &skus(1, "a"), &p)),
        SegmentError::InvalidParams { name: "dim", .. }
    ));
    for m in [0, 1, 257, 10_000] {
        let r = write_segment(&path, 4, &ok, &skus(10, "a"), &HnswParams { m, ef_construction: 100 });
        assert!(matches!(e(r), SegmentError::InvalidParams { name: "m", .. }), "m={m}");
    }
    let r = write_segment(&path, 4, &ok, &skus(10, "a"), &HnswParams { m: 16, ef_construction: 0 });
    assert!(matches!(e(r), SegmentError::InvalidParams { name: "ef_construction", .. }));
    let mut bad = ok.clone();
    bad[4 * 3 + 1] = f32::INFINITY;
    assert!(matches!(
        e(write_segment(&path, 4, &bad, &skus(10, "a"), &p)),
        SegmentError::InvalidVector { index: 3, .. }
    ));
    let mut zero = ok.clone();
    zero[4 * 7..4 * 8].fill(0.0);
    assert!(matches!(
        e(write_segment(&path, 4, &zero, &skus(10, "a"), &p)),
        SegmentError::InvalidVector { index: 7, .. }
    ));
    let mut dup = skus(10, "a");
    dup[6] = dup[2].clone();
    assert!(matches!(e(write_segment(&path, 4, &ok, &dup, &p)), SegmentError::DuplicateSku { .. }));
    assert!(file_names(dir.path()).is_empty(), "{:?}", file_names(dir.path()));
}

#[test]
fn writer_leaves_no_temp_files_and_never_replaces_a_segment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seg-000000000001.vseg");
    let data = Structured { dim: 8, latent: 3, noise: 0.1, seed: 5 }.rows(0, 50);
    write_segment(&path, 8, &data, &skus(50, "first"), &HnswParams::default()).unwrap();
    assert_eq!(file_names(dir.path()), vec!["seg-000000000001.vseg".to_string()]);
    let original = fs::read(&path).unwrap();

    let other = Structured { dim: 8, latent: 3, noise: 0.1, seed: 6 }.rows(0, 20);
    let r = write_segment(&path, 8, &other, &skus(20, "second"), &HnswParams::default());
    assert!(matches!(r, Err(SegmentError::AlreadyExists { .. })), "{r:?}");
    let mut bad = other.clone();
    bad[0] = f32::NAN;
    assert!(write_segment(&path, 8, &bad, &skus(20, "second"), &HnswParams::default()).is_err());
    assert_eq!(fs::read(&path).unwrap(), original);
    assert_eq!(file_names(dir.path()), vec!["seg-000000000001.vseg".to_string()]);
    let seg = Segment::open(&path).unwrap();
    assert_eq!(seg.find_sku("first-000049"), Some(49));
    assert_eq!(seg.find_sku("second-000001"), None);
}

#[test]
fn segment_is_send_and_sync_and_searchable_from_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Segment>();
    let big = big();
    let seg = Segment::open(&big.path).unwrap();
    let expected: Vec<Vec<Hit>> =
        big.queries.chunks_exact(big.dim).take(20).map(|q| seg.search(q, 10, 64, None).unwrap()).collect();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for (q, want) in big.queries.chunks_exact(big.dim).zip(&expected) {
                    assert_eq!(&seg.search(q, 10, 64, None).unwrap(), want);
                }
            });
        }
    });
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn format_round_trip(
        n in 1usize..30,
        dim in 1usize..12,
        seed in any::<u64>(),
        m in 2usize..20,
    ) {
        let mut rng = SplitMix64::new(seed);
        let mut data: Vec<f32> = (0..n * dim).map(|_| (rng.next_f64() * 2.0 - 1.0) as f32).collect();
        for row in data.chunks_exact_mut(dim) {
            row[0] += 3.0; // never a zero row
        }
        let names: Vec<SkuId> = (0..n).map(|i| SkuId::new(format!("é{}-{}", rng.next_u64() % 1000, i)).unwrap()).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.vseg");
        let stats = write_segment(&path, dim, &data, &names, &HnswParams { m, ef_construction: 50 }).unwrap();
        prop_assert_eq!(stats.count, n);
        prop_assert_eq!(stats.bytes, fs::metadata(&path).unwrap().len());
        let seg = Segment::open(&path).unwrap();
        seg.verify().unwrap();
        prop_assert_eq!((seg.len(), seg.dim(), seg.m()), (n, dim, m));
        for (i, row) in data.chunks_exact(dim).enumerate() {
            let norm = row.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
            for (stored, orig) in seg.vector(i as u32).iter().zip(row) {
                prop_assert!((f64::from(*stored) - f64::from(*orig) / norm).abs() < 1e-6);
            }
            prop_assert_eq!(seg.sku(i as u32), names[i].as_str());
            prop_assert_eq!(seg.find_sku(names[i].as_str()), Some(i as u32));
        }
        let q = &data[..dim];
        let exact = seg.brute_force(q, n, None).unwrap();
        let approx = seg.search(q, n, n.max(8), None).unwrap();
        if 2 * m >= n {
            // Layer 0 never prunes, so the graph is connected, and with ef >= n the search
            // never stops early: it must be exact.
            prop_assert_eq!(approx, exact);
        } else {
            // Otherwise: hits are a correctly scored, correctly ordered subset.
            for h in &approx {
                prop_assert!(exact.contains(h), "{:?} not in {:?}", h, exact);
            }
            prop_assert!(approx.windows(2).all(|w| w[0].score > w[1].score || (w[0].score == w[1].score && w[0].idx < w[1].idx)));
        }
        prop_assert_eq!(file_names(dir.path()), vec!["p.vseg".to_string()]);
    }
}

/// The same floor on harder data (a 32-d latent: more intrinsic dimensions, so recall at the
/// default ef is well below 1 and the floor has something to hold).
#[test]
fn recall_at_default_ef_on_harder_data_is_at_least_095() {
    let shape = Structured { dim: 128, latent: 32, noise: 0.3, seed: 7 };
    let n = 20_000;
    let base = shape.rows(0, n);
    let queries = shape.rows(1_000_000, 200);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hard.vseg");
    write_segment(&path, shape.dim, &base, &skus(n, "hard"), &HnswParams::default()).unwrap();
    let seg = Segment::open(&path).unwrap();
    let (r, r10) = (
        mean_recall(&seg, &queries, shape.dim, DEFAULT_EF_SEARCH),
        mean_recall(&seg, &queries, shape.dim, 10),
    );
    eprintln!("harder data: recall@10 at ef={DEFAULT_EF_SEARCH}: {r:.4}, at ef=10: {r10:.4}");
    assert!(r >= 0.95, "recall@10 {r} at ef={DEFAULT_EF_SEARCH}");
    assert!(r10 < r, "ef=10 ({r10}) should trail ef={DEFAULT_EF_SEARCH} ({r})");
}

/// Mean recall@10 of `seg` at `ef` against its own brute force, over `queries`.
fn mean_recall(seg: &Segment, queries: &[f32], dim: usize, ef: usize) -> f64 {
    let mut total = 0.0;
    let mut count = 0.0;
    for q in queries.chunks_exact(dim) {
        let exact = seg.brute_force(q, 10, None).unwrap();
        total += recall(&seg.search(q, 10, ef, None).unwrap(), &exact);
        count += 1.0;
    }
    total / count
}

/// vitrine's own builder against hnsw_rs (the reference) on the same data and parameters:
/// its graph must be at least as good at a low ef, where the graph's quality shows.
#[test]
fn native_builder_matches_the_hnsw_rs_reference() {
    let shape = Structured { dim: 64, latent: 24, noise: 0.3, seed: 11 };
    let n = 8_000;
    let base = shape.rows(0, n);
    let queries = shape.rows(1_000_000, 200);
    let dir = tempfile::tempdir().unwrap();
    let (native, reference) = (dir.path().join("native.vseg"), dir.path().join("hnsw_rs.vseg"));
    let params = HnswParams::default();
    let a = write_segment(&native, shape.dim, &base, &skus(n, "n"), &params).unwrap();
    let b = write_segment_hnsw_rs(&reference, shape.dim, &base, &skus(n, "n"), &params).unwrap();
    assert!(a.self_recall >= 0.99 && b.self_recall >= 0.99, "{a:?} {b:?}");
    let (native, reference) = (Segment::open(&native).unwrap(), Segment::open(&reference).unwrap());
    for ef in [16, DEFAULT_EF_SEARCH] {
        let (ra, rb) =
            (mean_recall(&native, &queries, shape.dim, ef), mean_recall(&reference, &queries, shape.dim, ef));
        eprintln!("ef={ef}: native {ra:.4}, hnsw_rs {rb:.4}");
        assert!(ra >= rb - 0.02, "ef={ef}: native {ra} trails hnsw_rs {rb}");
    }
}

/// A merge extends its largest input's graph: items of the base that are dropped (deleted)
/// leave links that are repaired, the base's entry point among them, and the extended graph
/// finds every item and keeps the recall of a fresh build.
#[test]
fn extending_a_graph_keeps_recall_and_repairs_dropped_links() {
    let shape = Structured { dim: 48, latent: 16, noise: 0.3, seed: 5 };
    let (n_base, n_new) = (6_000, 3_000);
    let rows = shape.rows(0, n_base + n_new);
    let queries = shape.rows(1_000_000, 200);
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.vseg");
    let names = skus(n_base + n_new, "x");
    write_segment(
        &base_path,
        shape.dim,
        &rows[..n_base * shape.dim],
        &names[..n_base],
        &HnswParams::default(),
    )
    .unwrap();
    let base = Segment::open(&base_path).unwrap();
    // Drop 15% of the base, always including the entry point (the node on the top layer
    // that every walk starts from).
    let entry = base.entry_point();
    let keep: Vec<u32> = (0..n_base as u32).filter(|&i| i % 7 != 0 && i != entry).collect();
    let mut vectors = Vec::new();
    let mut kept_names = Vec::new();
    for &k in &keep {
        vectors.extend_from_slice(&rows[k as usize * shape.dim..(k as usize + 1) * shape.dim]);
        kept_names.push(names[k as usize].clone());
    }
    vectors.extend_from_slice(&rows[n_base * shape.dim..]);
    kept_names.extend_from_slice(&names[n_base..]);
    let merged_path = dir.path().join("merged.vseg");
    let stats = write_segment_extending(
        &merged_path,
        shape.dim,
        &vectors,
        &kept_names,
        &HnswParams::default(),
        &base,
        &keep,
    )
    .unwrap();
    assert_eq!(stats.count, keep.len() + n_new);
    assert!(stats.self_recall >= 0.99, "self-recall {}", stats.self_recall);
    let merged = Segment::open(&merged_path).unwrap();
    merged.verify().unwrap();
    for (i, name) in kept_names.iter().enumerate() {
        assert_eq!(merged.sku(i as u32), name.as_str());
    }
    let fresh_path = dir.path().join("fresh.vseg");
    write_segment(&fresh_path, shape.dim, &vectors, &kept_names, &HnswParams::default()).unwrap();
    let fresh = Segment::open(&fresh_path).unwrap();
    let (re, rf) =
        (mean_recall(&merged, &queries, shape.dim, 16), mean_recall(&fresh, &queries, shape.dim, 16));
    eprintln!("ef=16: extended {re:.4}, fresh {rf:.4}");
    assert!(re >= rf - 0.03, "extended graph {re} trails a fresh build {rf}");
    assert!(mean_recall(&merged, &queries, shape.dim, DEFAULT_EF_SEARCH) >= 0.95);
    // Every item, old and new, is reachable: each finds itself.
    let lost = (0..merged.len() as u32)
        .filter(|&i| {
            !merged.search(merged.vector(i), 10, DEFAULT_EF_SEARCH, None).unwrap().iter().any(|h| h.idx == i)
        })
        .count();
    assert!(lost * 200 <= merged.len(), "{lost} of {} items do not find themselves", merged.len());
    // Bad keep lists are refused before anything is written.
    let bad = dir.path().join("bad.vseg");
    let unsorted = [2u32, 1];
    assert!(
        write_segment_extending(
            &bad,
            shape.dim,
            &vectors,
            &kept_names,
            &HnswParams::default(),
            &base,
            &unsorted
        )
        .is_err()
    );
    assert!(!bad.exists());
}

/// A version-1 segment (f32 only, written by the previous release and committed as a frozen
/// file) still opens, verifies and answers as it did: the same top-5 for the same queries.
#[test]
fn frozen_version_1_segment_still_opens_and_answers_the_same() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let seg = Segment::open(&dir.join("segment-v1.vseg")).unwrap();
    assert_eq!(seg.format_version(), 1);
    assert!(!seg.is_quantised());
    seg.verify().unwrap();
    assert_eq!((seg.len(), seg.dim()), (600, 16));
    let expected: Vec<Vec<String>> =
        serde_json::from_str(&fs::read_to_string(dir.join("segment-v1.expected.json")).unwrap()).unwrap();
    let shape = Structured { dim: 16, latent: 6, noise: 0.2, seed: 99 };
    for (j, want) in expected.iter().enumerate() {
        let q = shape.rows(10_000 + j as u64, 1);
        let got: Vec<&str> = seg.search(&q, 5, 64, None).unwrap().iter().map(|h| seg.sku(h.idx)).collect();
        assert_eq!(&got, want, "query {j}");
    }
    assert_eq!(seg.find_sku("v1-0333").map(|i| seg.sku(i)), Some("v1-0333"));
}

/// New segments are quantised: the walk reads int8 codes, the answer is rescored with the
/// exact vectors (so scores are exact), and recall stays at the floor.
#[test]
fn new_segments_walk_int8_codes_and_return_exact_scores() {
    let big = big();
    let seg = Segment::open(&big.path).unwrap();
    assert_eq!(seg.format_version(), 2);
    assert!(seg.is_quantised());
    seg.verify().unwrap();
    for q in big.queries.chunks_exact(big.dim).take(50) {
        let exact = seg.brute_force(q, 20_000, None).unwrap();
        for h in seg.search(q, 10, DEFAULT_EF_SEARCH, None).unwrap() {
            let truth = exact.iter().find(|e| e.idx == h.idx).unwrap();
            assert!((truth.score - h.score).abs() < 1e-6, "{h:?} vs {truth:?}");
        }
    }
}
