//! Per-layer timings; run with
//! `cargo test --release --lib encoder::lite::profile -- --ignored --nocapture`.

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::tests::depthwise_conv2d_nhwc;
use super::{Activation, Kernels, LiteNet};

const K: Kernels = Kernels::Cpu;

#[test]
#[ignore = "timing printout, not a test"]
fn profile_forward() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet-lite0/model.safetensors");
    let net = LiteNet::from_tensors(candle_core::safetensors::load(&path, &Device::Cpu).unwrap()).unwrap();
    let dev = Device::Cpu;
    dev.with_context(|| {
        let mut x = net.stem.forward(&Tensor::randn(0f32, 1.0, (1, 3, 224, 224), &dev).unwrap(), K).unwrap();
        for (i, b) in net.blocks.iter().enumerate() {
            let y = match &b.expand {
                Some(e) => e.forward(&x, Activation::Relu6, K).unwrap(),
                None => x.clone(),
            };
            let reps = 50;
            let t = Instant::now();
            for _ in 0..reps {
                depthwise_conv2d_nhwc(&y, &b.depthwise.weight, b.depthwise.stride, K).unwrap();
            }
            let dt = t.elapsed().as_secs_f64() / f64::from(reps);
            println!(
                "block {i}: in {:?} k {} s {} depthwise {:.3} ms",
                y.dims(),
                b.depthwise.weight.dims()[0],
                b.depthwise.stride,
                dt * 1e3
            );
            x = b.forward(&x, K).unwrap();
        }
        {
            let x = Tensor::randn(0f32, 1.0, (1, 3, 224, 224), &dev).unwrap();
            let mut y = net.stem.forward(&x, K).unwrap();
            for (i, b) in net.blocks.iter().enumerate() {
                let reps = 40;
                let (n, h, w, _) = y.dims4().unwrap();
                let fused = b.cpu.as_ref().and_then(|c| c.band_rows(n, h, w));
                let t = Instant::now();
                for _ in 0..reps {
                    b.forward(&y, K).unwrap();
                }
                let dt = t.elapsed().as_secs_f64() / f64::from(reps);
                println!("batch 1 block {i}: in {:?} band {fused:?} {:.3} ms", y.dims(), dt * 1e3);
                y = b.forward(&y, K).unwrap();
            }
        }
        for n in [1usize, 4, 8, 32] {
            let x = Tensor::randn(0f32, 1.0, (n, 3, 224, 224), &dev).unwrap();
            net.pooled_features(&x).unwrap();
            let mut t = [0f64; 5];
            let reps = if n == 1 { 10 } else { 2 };
            let start = Instant::now();
            for _ in 0..reps {
                let s = Instant::now();
                let mut y = net.stem.forward(&x, K).unwrap();
                t[0] += s.elapsed().as_secs_f64();
                for (i, b) in net.blocks.iter().enumerate() {
                    let s = Instant::now();
                    y = b.forward(&y, K).unwrap();
                    t[1 + usize::from(i >= 3) + usize::from(i >= 8)] += s.elapsed().as_secs_f64();
                }
                let s = Instant::now();
                let h = net.head.forward(&y, Activation::Relu6, K).unwrap();
                let (a, hh, ww, c) = h.dims4().unwrap();
                let _p = h.reshape((a, hh * ww, c)).unwrap().mean(1).unwrap();
                t[4] += s.elapsed().as_secs_f64();
            }
            let ms = |v: f64| v * 1e3 / (reps * n) as f64;
            println!(
                "batch {n}: total {:.2} ms/img | stem {:.2} blocks 0-2 {:.2} 3-7 {:.2} 8-15 {:.2} head {:.2}",
                ms(start.elapsed().as_secs_f64()),
                ms(t[0]),
                ms(t[1]),
                ms(t[2]),
                ms(t[3]),
                ms(t[4])
            );
        }
    });
}
