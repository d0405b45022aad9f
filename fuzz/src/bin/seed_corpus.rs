//! Writes the checked-in seed corpus (`corpus/<target>/seed-*`): small valid inputs made with
//! vitrine's own writers and encoders, so each target starts from inputs that get past its
//! first checks. Run from `fuzz/` after `cargo fuzz build` (see README.md, "Fuzzing").
//!
//! Built by cargo-fuzz like the targets (every crate is instrumented, so it must link
//! libFuzzer), it does its work in the fuzzer's init hook and exits before any fuzzing.
#![no_main]

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageFormat, Rgb, RgbImage, Rgba, RgbaImage};
use prost::Message;
use vitrine::ids::{ModelVersion, SegmentId, SkuId};
use vitrine::index::entry::Change;
use vitrine::index::manifest::{Manifest, ModelIndex, SegmentEntry};
use vitrine::index::wal::Wal;
use vitrine::proto;
use vitrine::segment::{HnswParams, write_segment};

libfuzzer_sys::fuzz_target!(
    init: write_seeds_and_exit(),
    |_data: &[u8]| {}
);

fn write_seeds_and_exit() {
    let corpus = Path::new("corpus");
    segments(&corpus.join("segment_open"));
    manifests(&corpus.join("manifest_load"));
    wal(&corpus.join("wal_open"));
    catalogues(&corpus.join("catalog_parse"));
    images(&corpus.join("image_preprocess"));
    requests(&corpus.join("request_validation"));
    std::process::exit(0);
}

fn put(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).expect("corpus folder");
    std::fs::write(dir.join(format!("seed-{name}")), bytes).expect("write seed");
}

/// Deterministic unit-ish rows (the writer normalises nothing, so normalise here).
fn rows(n: usize, dim: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n * dim);
    for i in 0..n {
        let row: Vec<f32> = (0..dim).map(|j| (((i * 31 + j * 17) % 23) as f32 - 11.0) + 0.5).collect();
        let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        out.extend(row.iter().map(|x| x / norm));
    }
    out
}

fn segments(dir: &Path) {
    let tmp = tempfile::tempdir().expect("temporary folder");
    for (n, dim, m) in [(1, 1, 2), (6, 3, 2), (24, 4, 2), (40, 8, 4)] {
        let path = tmp.path().join(format!("n{n}.vseg"));
        let skus: Vec<SkuId> = (0..n).map(|i| SkuId::new(format!("SKU-{i:03}")).expect("sku")).collect();
        let params = HnswParams { m, ef_construction: 16 };
        write_segment(&path, dim, &rows(n, dim), &skus, &params).expect("write segment");
        put(dir, &format!("n{n}-d{dim}-m{m}.vseg"), &std::fs::read(&path).expect("read segment"));
    }
}

fn manifests(dir: &Path) {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let empty = Manifest::default();
    let mut full = Manifest::default();
    let version = ModelVersion::new("efficientnet-lite0").expect("version");
    let segment = |id, count| SegmentEntry { id: SegmentId(id), count, bytes: 4096, deletes: None, ef: None };
    full.indexes.insert(
        version.clone(),
        ModelIndex { dim: 8, weights_sha256: "ab".repeat(32), segments: vec![segment(1, 40), segment(2, 6)] },
    );
    full.serving_model = Some(version);
    full.next_id = 3;
    full.generation = 7;
    full.wal_checkpoint = 12;
    for (name, m) in [("empty", &empty), ("two-segments", &full)] {
        m.store(tmp.path()).expect("store manifest");
        put(dir, &format!("{name}.json"), &std::fs::read(Manifest::path(tmp.path())).expect("read"));
    }
}

fn changes() -> Vec<Change> {
    let mut attrs = vitrine::index::store::Attrs::new();
    attrs.insert("category".into(), serde_json::json!("kitchen"));
    attrs.insert("price".into(), serde_json::json!(9.5));
    attrs.insert("tags".into(), serde_json::json!(["eco", "sale"]));
    let version = ModelVersion::new("m1").expect("version");
    vec![
        Change::Upsert {
            sku: SkuId::new("MUG-1").expect("sku"),
            attrs: Some(attrs),
            image_sha256: Some("cd".repeat(32)),
            vectors: vec![(version, vec![0.6, 0.8])],
        },
        Change::Upsert {
            sku: SkuId::new("MUG-2").expect("sku"),
            attrs: None,
            image_sha256: None,
            vectors: vec![],
        },
        Change::Delete { sku: SkuId::new("MUG-1").expect("sku") },
    ]
}

fn wal(dir: &Path) {
    let tmp = tempfile::tempdir().expect("temporary folder");
    let (log, _) = Wal::open(tmp.path(), 0).expect("open log");
    let records: Vec<Vec<u8>> = changes().iter().map(Change::encode).collect();
    log.append(&records[0]).expect("append");
    let batch: Vec<&[u8]> = records[1..].iter().map(Vec::as_slice).collect();
    log.append_batch(&batch).expect("append batch");
    drop(log);
    let file = std::fs::read_dir(tmp.path()).expect("list").next().expect("a log file").expect("entry");
    let bytes = std::fs::read(file.path()).expect("read log");
    // Selector bytes: checkpoint 0, first seq 1, one file; then checkpoint 1 and two files.
    put(dir, "one-file", &[&[0u8, 1, 0][..], &bytes].concat());
    put(dir, "two-files", &[&[1u8, 1, 0x91][..], &bytes].concat());
    for (i, record) in records.iter().enumerate() {
        put(dir, &format!("record-{i}"), &[&[0u8, 1, 0][..], record].concat());
    }
}

fn catalogues(dir: &Path) {
    put(
        dir,
        "rows.txt",
        concat!(
            "{\"sku\": \"A-1\", \"image\": \"img/a1.jpg\", \"attrs\": {\"title\": \"Mug\", \"price\": 9.5, \"tags\": [\"eco\", true]}}\n",
            "# a comment\n\n",
            "{\"sku\": 42, \"image\": \"b.png\"}\n",
            "{\"sku\": \"A-1\", \"image\": \"dup.jpg\"}\n",
        )
        .as_bytes(),
    );
    put(
        dir,
        "csv.txt",
        concat!(
            "\u{feff}sku,image,title,attrs\r\n",
            "A-1,img/a1.jpg,Mug,\"{\"\"price\"\": 9.5}\"\r\n",
            "A-2,img/a2.jpg,\"two\nlines\",\n",
            "A-3,img/a3.jpg,\"stray quote,\n",
            "A-4,img/a4.jpg,,\n",
        )
        .as_bytes(),
    );
}

fn encode(image: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    image.write_to(&mut Cursor::new(&mut out), format).expect("encode image");
    out
}

fn images(dir: &Path) {
    let rgb =
        DynamicImage::ImageRgb8(RgbImage::from_fn(12, 8, |x, y| Rgb([(x * 20) as u8, (y * 30) as u8, 90])));
    let rgba = DynamicImage::ImageRgba8(RgbaImage::from_fn(5, 9, |x, y| {
        Rgba([200, (x * 40) as u8, 10, (y * 28) as u8])
    }));
    put(dir, "rgb.png", &encode(&rgb, ImageFormat::Png));
    put(dir, "rgba.png", &encode(&rgba, ImageFormat::Png));
    put(dir, "rgb.jpg", &encode(&rgb, ImageFormat::Jpeg));
    put(dir, "rgba.gif", &encode(&rgba, ImageFormat::Gif));
    put(dir, "rgba.webp", &encode(&rgba, ImageFormat::WebP));
}

fn requests(dir: &Path) {
    let options = proto::SearchOptions {
        k: 5,
        ef: 64,
        filter: Some(proto::Filter {
            must: vec![
                proto::Condition {
                    key: "brand".into(),
                    negate: true,
                    test: Some(proto::condition::Test::AnyOf(proto::ValueSet {
                        values: vec!["acme".into()],
                    })),
                },
                proto::Condition {
                    key: "price".into(),
                    negate: false,
                    test: Some(proto::condition::Test::Range(proto::Range {
                        min: Some(1.0),
                        min_inclusive: true,
                        max: Some(20.0),
                        max_inclusive: false,
                    })),
                },
            ],
        }),
        filter_exprs: vec!["category=kitchen,\"a, b\"".into(), "5<=price<20".into()],
    };
    let by_sku = proto::SearchBySkuRequest {
        sku: "MUG-1".into(),
        options: Some(options.clone()),
        routing_key: "s1".into(),
    };
    put(dir, "search-by-sku.pb", &by_sku.encode_to_vec());
    put(dir, "options.pb", &options.encode_to_vec());
    let attrs = prost_types::Struct {
        fields: [
            (
                "title".to_string(),
                prost_types::Value { kind: Some(prost_types::value::Kind::StringValue("Mug".into())) },
            ),
            (
                "price".to_string(),
                prost_types::Value { kind: Some(prost_types::value::Kind::NumberValue(9.5)) },
            ),
        ]
        .into_iter()
        .collect(),
    };
    let upsert = proto::UpsertRequest {
        sku: "MUG-2".into(),
        attrs: Some(attrs),
        payload: Some(proto::upsert_request::Payload::Vector(proto::VectorPayload {
            model_version: "m1".into(),
            values: vec![0.6, 0.8],
        })),
    };
    put(dir, "upsert.pb", &upsert.encode_to_vec());
    put(dir, "delete.pb", &proto::DeleteRequest { skus: vec!["A".into(), "B-2".into()] }.encode_to_vec());
    put(
        dir,
        "exprs.txt",
        b"price<20\ncategory!=\"a, b\",c\n5<=price<=20\ntitle=\"say \\\"hi\\\"\"\nx>=-1e3\n",
    );
}
