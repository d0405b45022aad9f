//! Times vitrine's Candle encoder on given images and writes its pooled features; prints one
//! JSON object. Used by tools/encoder_compare.py, which runs onnxruntime on the same inputs.
//!
//! Every image is preprocessed with the encoder's own function (a 224x224 input is taken as it
//! is, so a caller that sends 224x224 PNGs gives both engines identical tensors). Embedding is
//! timed per batch size over whole passes through the images, after one warm-up pass. It runs
//! on `--device` (auto: GPU 0 in a `--features cuda` build with a GPU, else the CPU), with
//! vitrine's own kernels or, with `--generic`, plain candle operations.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use vitrine::encoder::{DeviceChoice, Encoder, Kernels, PreparedImage};

#[derive(Parser)]
struct Args {
    /// Model folder (models/<version>).
    #[arg(long)]
    model: PathBuf,
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batches: Vec<usize>,
    /// Seconds to spend timing each batch size (at least one pass).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Where to write the pooled features (f32 little-endian, `[images][dim]`).
    #[arg(long)]
    features_out: Option<PathBuf>,
    /// Where to run: auto (GPU 0 in a `--features cuda` build with a usable GPU), cpu, cuda.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    device: DeviceChoice,
    /// Run the plain-candle operations instead of vitrine's own kernels (CPU or CUDA), to
    /// compare the two on one device.
    #[arg(long)]
    generic: bool,
    /// Also report each image's top ImageNet class (the classifier's argmax).
    #[arg(long)]
    top1: bool,
    /// Image files.
    images: Vec<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.images.is_empty() {
        bail!("give at least one image");
    }
    let device = vitrine::encoder::select_device(args.device)?;
    let mut encoder = Encoder::load(&args.model, &device)?;
    if args.generic {
        encoder = encoder.with_kernels(Kernels::Generic);
    }
    let started = Instant::now();
    let prepared = args
        .images
        .iter()
        .map(|p| {
            let bytes = std::fs::read(p).with_context(|| format!("reading {}", p.display()))?;
            encoder.preprocess(&bytes).with_context(|| format!("preprocessing {}", p.display()))
        })
        .collect::<anyhow::Result<Vec<PreparedImage>>>()?;
    let preprocess_ms = started.elapsed().as_secs_f64() * 1e3 / prepared.len() as f64;

    if let Some(out) = &args.features_out {
        let features = encoder.pooled_features(&prepared)?;
        let mut file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
        for row in &features {
            file.write_all(bytemuck::cast_slice(row))?;
        }
    }

    let mut top1 = String::new();
    if args.top1 {
        let classes: Vec<String> = encoder
            .classify(&prepared)?
            .iter()
            .map(|logits| {
                let best = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i);
                best.to_string()
            })
            .collect();
        top1 = format!(r#", "top1": [{}]"#, classes.join(", "));
    }

    let mut rates = Vec::new();
    for &batch in &args.batches {
        if batch == 0 {
            bail!("batch size 0");
        }
        // Inputs cycle through the images so each batch is full.
        let inputs: Vec<PreparedImage> =
            prepared.iter().cycle().take(batch.max(prepared.len())).cloned().collect();
        let chunks: Vec<&[PreparedImage]> = inputs.chunks_exact(batch).collect();
        for chunk in &chunks {
            encoder.pooled_features(chunk)?;
        }
        let (mut images, started) = (0usize, Instant::now());
        while images == 0 || started.elapsed().as_secs_f64() < args.seconds {
            for chunk in &chunks {
                std::hint::black_box(encoder.pooled_features(chunk)?);
                images += chunk.len();
            }
        }
        let secs = started.elapsed().as_secs_f64();
        rates.push(format!(r#""{batch}": {:.2}"#, images as f64 / secs));
    }
    println!(
        r#"{{"engine": "vitrine-candle", "device": "{}", "kernels": "{}", "images": {}, "preprocess_ms_per_image": {preprocess_ms:.3}, "images_per_sec": {{{}}}{top1}}}"#,
        if device.is_cuda() { "cuda" } else { "cpu" },
        if args.generic { "generic" } else { "own" },
        prepared.len(),
        rates.join(", ")
    );
    Ok(())
}
