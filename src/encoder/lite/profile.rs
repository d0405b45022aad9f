//! Per-layer timings; run with
//! `cargo test --release --lib encoder::lite::profile -- --ignored --nocapture`.

use std::time::Instant;

use candle_core::{Device, Tensor};

use super::kernels::{Geometry, depthwise_row, same_padding, to_blocked};
use super::tests::{depthwise_conv2d_nhwc, lite0};
use super::{Activation, Kernels};

const K: Kernels = Kernels::Cpu;

#[test]
#[ignore = "timing printout, not a test"]
fn profile_forward() {
    let net = lite0();
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
                let fused = b.cpu.as_ref().and_then(|c| c.plan(n, h, w));
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
            let mut seq = [0f64; 16];
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
                    seq[i] += s.elapsed().as_secs_f64();
                }
                let s = Instant::now();
                let h = net.head.forward(&y, Activation::Relu6, K).unwrap();
                let _p = net.pool(&h, crate::encoder::Pooling::Average).unwrap();
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
            println!(
                "  in sequence: {:?}",
                seq.iter().map(|&v| (ms(v) * 1000.0).round()).collect::<Vec<_>>()
            );
        }
    });
}

/// The depthwise kernels alone, one image row at a time on one thread: the channels-last
/// kernel against the blocked one (including the repack), on Lite0's shapes. Run with
/// `cargo test --release --lib encoder::lite::profile::depthwise -- --ignored --nocapture`.
#[test]
#[ignore = "timing printout, not a test"]
fn depthwise_kernels() {
    let shapes = [
        (112, 32, 3, 1),
        (112, 96, 3, 2),
        (56, 144, 3, 1),
        (56, 144, 5, 2),
        (28, 240, 5, 1),
        (14, 480, 3, 1),
        (14, 672, 5, 1),
        (7, 1152, 5, 1),
    ];
    let (mut tot, mut totb) = (0.0, 0.0);
    for (h, c, k, s) in shapes {
        let src: Vec<f32> = (0..h * h * c).map(|i| (i % 7) as f32 * 0.1).collect();
        let wt: Vec<f32> = (0..k * k * c).map(|i| (i % 5) as f32 * 0.1).collect();
        let bias = vec![0.1f32; c];
        let (oh, top, _) = same_padding(h, k, s);
        let g = Geometry { h, w: h, c, k, stride: s, top, left: top, relu6: true, blocked: false };
        let gb = Geometry { blocked: true, ..g };
        let mut dst = vec![0f32; oh * oh * c];
        let mut dst2 = vec![0f32; oh * oh * c];
        let mut blocked = vec![0f32; src.len()];
        let mut wtb = vec![0f32; wt.len()];
        to_blocked(&wt, c, &mut wtb);
        let time = |f: &mut dyn FnMut()| {
            let mut best = f64::MAX;
            for _ in 0..30 {
                let t = std::time::Instant::now();
                for _ in 0..5 {
                    f();
                }
                best = best.min(t.elapsed().as_secs_f64() / 5.0);
            }
            best
        };
        let a = time(&mut || {
            for (oy, row) in dst.chunks_exact_mut(oh * c).enumerate() {
                depthwise_row(&src, &wt, &bias, row, oy, g);
            }
        });
        let b = time(&mut || {
            to_blocked(&src, c, &mut blocked);
            for (oy, row) in dst2.chunks_exact_mut(oh * c).enumerate() {
                depthwise_row(&blocked, &wtb, &bias, row, oy, gb);
            }
        });
        assert!(
            dst.iter().zip(&dst2).all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + x.abs())),
            "{h} {c} {k} {s}"
        );
        tot += a;
        totb += b;
        let macs = (oh * oh * c * k * k) as f64;
        println!(
            "{h:>4}x{c:>5} k{k} s{s}: {:8.1} us {:6.1} GMAC/s | blocked incl. repack {:8.1} us {:6.1} GMAC/s",
            a * 1e6,
            macs / a / 1e9,
            b * 1e6,
            macs / b / 1e9
        );
    }
    println!("total {:.1} us, blocked {:.1} us", tot * 1e6, totb * 1e6);
}

#[test]
#[ignore = "timing printout, not a test"]
fn head_parts() {
    let net = lite0();
    for n in [1usize, 4, 32] {
        let y = Tensor::randn(0f32, 1.0, (n, 7, 7, 320), &Device::Cpu).unwrap();
        let h = net.head.forward(&y, Activation::Relu6, K).unwrap();
        let reps = 200;
        let t = Instant::now();
        for _ in 0..reps {
            net.head.forward(&y, Activation::Relu6, K).unwrap();
        }
        let a = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            crate::encoder::pool::pool(&h, crate::encoder::Pooling::Average, K).unwrap();
        }
        let b = t.elapsed().as_secs_f64() / reps as f64;
        println!("batch {n}: head matmul {:.3} ms, average pool {:.3} ms", a * 1e3, b * 1e3);
    }
}

#[test]
#[ignore = "timing printout, not a test"]
fn unfused_parts() {
    let net = lite0();
    // Inside the pool, as `feature_map` runs the network.
    rayon::scope(|_| unfused_parts_in_pool(&net));
}

fn unfused_parts_in_pool(net: &super::LiteNet) {
    for (i, side, cin) in [(12usize, 7usize, 192usize), (11, 14, 112), (0, 112, 32)] {
        let b = &net.blocks[i];
        let x = Tensor::randn(0f32, 1.0, (1, side, side, cin), &Device::Cpu).unwrap();
        let reps = 300;
        let time = |f: &dyn Fn() -> Tensor| {
            f();
            let t = Instant::now();
            for _ in 0..reps {
                f();
            }
            t.elapsed().as_secs_f64() / reps as f64 * 1e3
        };
        let e = b.expand.as_ref().map(|e| e.forward(&x, Activation::Relu6, K).unwrap()).unwrap_or(x.clone());
        let d = b.depthwise.forward(&e, K).unwrap();
        let te = b.expand.as_ref().map_or(0.0, |ex| time(&|| ex.forward(&x, Activation::Relu6, K).unwrap()));
        let td = time(&|| b.depthwise.forward(&e, K).unwrap());
        let tp = time(&|| b.project.forward(&d, Activation::None, K).unwrap());
        let tf = time(&|| b.forward(&x, K).unwrap());
        println!(
            "block {i}: expand {te:.3} depthwise {td:.3} project {tp:.3} sum {:.3} | block {tf:.3} ms",
            te + td + tp
        );
    }
}

/// The 1x1 kernel alone on one thread, on Lite0's batch-1 shapes `(rows, in, out)`. Run with
/// `cargo test --release --lib encoder::lite::profile::pointwise -- --ignored --nocapture`
/// (`NARROW=1`: only the outputs under 64 channels, for `perf record`).
#[test]
#[ignore = "timing printout, not a test"]
fn pointwise_kernel() {
    use crate::encoder::pointwise::{Epilogue, PackedWeights, matmul_into};
    let shapes = [
        (12544, 32, 16),
        (12544, 16, 96),
        (3136, 96, 24),
        (3136, 24, 144),
        (3136, 144, 24),
        (784, 144, 40),
        (784, 40, 240),
        (784, 240, 40),
        (196, 240, 80),
        (196, 80, 480),
        (196, 480, 80),
        (196, 480, 112),
        (196, 112, 672),
        (196, 672, 112),
        (49, 672, 192),
        (49, 192, 1152),
        (49, 1152, 192),
        (49, 1152, 320),
        (49, 320, 1280),
        // The late layers at batch 32.
        (1568, 192, 1152),
        (1568, 1152, 192),
        (1568, 1152, 320),
        (1568, 320, 1280),
    ];
    let (mut total, mut macs_total) = (0.0, 0.0);
    let narrow = std::env::var("NARROW").is_ok();
    for (m, k, n) in shapes {
        if narrow && n >= 64 {
            continue;
        }
        let x: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.01).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.01).collect();
        let bias = vec![0.1f32; n];
        let packed = PackedWeights::pack(&w, k, n);
        let mut dst = vec![0f32; m * n];
        let e = Epilogue { bias: &bias, residual: None, relu6: true };
        let mut best = f64::MAX;
        for _ in 0..20 {
            let t = Instant::now();
            for _ in 0..5 {
                matmul_into(&x, &packed, e, &mut dst);
            }
            best = best.min(t.elapsed().as_secs_f64() / 5.0);
        }
        let macs = (m * k * n) as f64;
        total += best;
        macs_total += macs;
        println!("{m:>6} x {k:>5} -> {n:>5}: {:8.1} us {:6.1} GMAC/s", best * 1e6, macs / best / 1e9);
    }
    println!("total {:.1} us, {:.1} GMAC/s", total * 1e6, macs_total / total / 1e9);
}

/// One block (or the stem) of the batch-1 network run over and over for 4 s, for `perf
/// record`: `BLOCK=1 RAYON_NUM_THREADS=1 perf record -e cpu-clock <test binary>
/// encoder::lite::profile::one_block --ignored --nocapture` (`BLOCK=stem` for the stem).
#[test]
#[ignore = "timing printout, not a test"]
fn one_block() {
    let net = lite0();
    let which = std::env::var("BLOCK").unwrap_or_else(|_| "0".into());
    let block: Option<usize> =
        (which != "stem").then(|| which.parse().expect("BLOCK: a block index or stem"));
    let x = Tensor::randn(0f32, 1.0, (1, 3, 224, 224), &Device::Cpu).unwrap();
    let mut y = net.stem.forward(&x, K).unwrap();
    for b in &net.blocks[..block.unwrap_or(0)] {
        y = b.forward(&y, K).unwrap();
    }
    // Inside the pool with the other threads kept awake, as `feature_map` runs the network
    // (from outside, or with them asleep, every parallel loop would also pay for waking a pool
    // thread: blocks 12-14 on 2 threads measured 0.30-0.33 ms that way against 0.24-0.26).
    rayon::scope(|scope| {
        super::keep_awake(scope, || {
            let (start, mut reps) = (Instant::now(), 0);
            while start.elapsed().as_secs_f64() < 4.0 {
                match block {
                    Some(i) => net.blocks[i].forward(&y, K).unwrap(),
                    None => net.stem.forward(&x, K).unwrap(),
                };
                reps += 1;
            }
            println!("{which}: {:.3} ms", start.elapsed().as_secs_f64() / f64::from(reps) * 1e3);
        })
    });
}

/// The whole network (`pooled_features`) at batch 1 to 32: images/s, best of 5 rounds. Run
/// with `cargo test --release --lib encoder::lite::profile::network -- --ignored --nocapture`
/// (`BATCHES=1` for batch 1 alone).
#[test]
#[ignore = "timing printout, not a test"]
fn network() {
    let net = lite0();
    let batches: Vec<usize> = match std::env::var("BATCHES") {
        Ok(list) => list.split(',').map(|b| b.parse().expect("BATCHES: e.g. 1,32")).collect(),
        Err(_) => vec![1, 4, 8, 16, 32],
    };
    for n in batches {
        let x = Tensor::randn(0f32, 1.0, (n, 3, 224, 224), &Device::Cpu).unwrap();
        net.pooled_features(&x).unwrap();
        let reps = if n == 1 { 40 } else { 2 };
        let best = (0..5)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..reps {
                    net.pooled_features(&x).unwrap();
                }
                t.elapsed().as_secs_f64() / (reps * n) as f64
            })
            .fold(f64::MAX, f64::min);
        println!("batch {n}: {:.1} images/s", 1.0 / best);
    }
}

/// The batch-1 network block by block in sequence (each layer's weights cold from the layers
/// before it, unlike [`one_block`]'s), inside the pool with the other threads kept awake: mean
/// milliseconds per stem, block and head over 200 passes. Each layer runs as its candle op, not
/// as the buffer pass runs it: there the stem writes block 0's blocked layout and block 0 reads
/// it in place, here block 0 repacks its channels-last input (about 0.15 ms more on 2 threads),
/// and the head's output is pooled through a tensor. Run with
/// `RAYON_NUM_THREADS=2 cargo test --release --lib encoder::lite::profile::sequence --
/// --ignored --nocapture`.
#[test]
#[ignore = "timing printout, not a test"]
fn sequence() {
    let net = lite0();
    let x = Tensor::randn(0f32, 1.0, (1, 3, 224, 224), &Device::Cpu).unwrap();
    let reps = 200;
    let mut times = vec![0f64; net.blocks.len() + 2];
    rayon::scope(|scope| {
        super::keep_awake(scope, || {
            for rep in 0..reps + 20 {
                let warm = rep >= 20;
                let s = Instant::now();
                let mut y = net.stem.forward(&x, K).unwrap();
                if warm {
                    times[0] += s.elapsed().as_secs_f64();
                }
                for (i, b) in net.blocks.iter().enumerate() {
                    let s = Instant::now();
                    y = b.forward(&y, K).unwrap();
                    if warm {
                        times[i + 1] += s.elapsed().as_secs_f64();
                    }
                }
                let s = Instant::now();
                let h = net.head.forward(&y, Activation::Relu6, K).unwrap();
                let _p = net.pool(&h, crate::encoder::Pooling::Average).unwrap();
                if warm {
                    times[net.blocks.len() + 1] += s.elapsed().as_secs_f64();
                }
            }
        })
    });
    let ms: Vec<String> = times.iter().map(|t| format!("{:.3}", t * 1e3 / f64::from(reps))).collect();
    println!("stem, blocks 0-15, head (ms): {}", ms.join(" "));
    println!("total {:.3} ms", times.iter().sum::<f64>() * 1e3 / f64::from(reps));
}
