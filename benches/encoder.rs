//! Encoder throughput on the CPU with the real EfficientNet-Lite0 weights: preprocessing alone
//! (decode + resize + normalise of a 600x400 PNG), and embedding batches of 1 and 32.
//!
//! Run: `cargo bench --bench encoder` (needs models/efficientnet-lite0 and tests/fixtures).

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use candle_core::Device;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vitrine::encoder::Encoder;

const MODEL_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/models/efficientnet-lite0");
const PHOTO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/coffee.png");

fn bench_encoder(c: &mut Criterion) {
    let encoder = match Encoder::load(Path::new(MODEL_DIR), &Device::Cpu) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("skipping encoder bench: {e}");
            return;
        }
    };
    let bytes = match std::fs::read(PHOTO) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("skipping encoder bench: {PHOTO}: {e}");
            return;
        }
    };
    let prepared = match encoder.preprocess(&bytes) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("skipping encoder bench: {e}");
            return;
        }
    };

    let mut group = c.benchmark_group("encoder");
    group.sample_size(10).warm_up_time(Duration::from_secs(2));

    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    group.bench_function("preprocess_600x400_png", |b| b.iter(|| encoder.preprocess(black_box(&bytes))));

    group.bench_function("embed_batch_1", |b| {
        let batch = vec![prepared.clone()];
        b.iter(|| encoder.embed(black_box(&batch)))
    });

    group.throughput(Throughput::Elements(32));
    group.measurement_time(Duration::from_secs(20));
    group.bench_function("embed_batch_32", |b| {
        let batch = vec![prepared.clone(); 32];
        b.iter(|| encoder.embed(black_box(&batch)))
    });
    group.finish();
}

criterion_group!(benches, bench_encoder);
criterion_main!(benches);
