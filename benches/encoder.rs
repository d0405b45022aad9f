//! Encoder throughput on the CPU with the real EfficientNet-Lite0 weights: preprocessing alone
//! (decode + resize + normalise of a 600x400 PNG), and embedding batches of 1 and 32; and the
//! resize to 224x224 alone at three photo sizes, vitrine's (`preprocess::resize_and_crop`)
//! beside the `image` crate's resize it reproduces bit for bit, in the same run.
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

/// vitrine's shorter-side resize and centre crop against `image`'s own (`thumbnail_exact` for
/// the pre-shrink of large photos, then `resize_to_fill`), which give identical pixels.
fn bench_resize(c: &mut Criterion) {
    use image::{Rgb, RgbImage};
    use vitrine::encoder::preprocess::{resize_and_crop, resize_and_crop_with_image_crate};

    let mut group = c.benchmark_group("resize_to_224");
    group.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4));
    for (w, h) in [(451, 300), (800, 800), (1200, 900), (2000, 2000)] {
        let photo = RgbImage::from_fn(w, h, |x, y| {
            Rgb([(x * 7 % 256) as u8, (y * 3 % 256) as u8, ((x ^ y) % 256) as u8])
        });
        group.bench_function(format!("vitrine_{w}x{h}"), |b| {
            b.iter(|| resize_and_crop(black_box(photo.clone()), 224))
        });
        group.bench_function(format!("image_crate_{w}x{h}"), |b| {
            b.iter(|| resize_and_crop_with_image_crate(black_box(photo.clone()), 224))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_encoder, bench_resize);
criterion_main!(benches);
