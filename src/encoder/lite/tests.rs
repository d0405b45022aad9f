//! The CPU kernels against candle's own operations and the generic path, batch-norm folding,
//! and refusing weights of another shape.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::candle_path::depthwise_conv2d_nhwc_shifted;
use super::kernels::same_padding;
use super::layers::{DenseConv, bias_act};
use super::ops::DepthwiseOp;
use super::weights::{BN_EPS, Folded, WeightsError, fold_bn};
use super::{Activation, Kernels, LiteNet};
use crate::encoder::Pooling;
use crate::encoder::fused::{Nhwc, Plan};

/// Depthwise 2-D convolution with TF "same" padding on channels-last data, `x` `(n, h, w, c)`
/// and `weight` `(k, k, c)`, by either path (the tests' entry point to both): on the CPU the
/// dedicated kernel, otherwise a sum of shifted slices.
pub(super) fn depthwise_conv2d_nhwc(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    if kernels == Kernels::Cpu {
        let x = x.contiguous()?;
        let weight = weight.contiguous()?;
        let zeros = Tensor::zeros(weight.dims().last().copied().unwrap_or(0), DType::F32, weight.device())?;
        x.apply_op3_no_bwd(&weight, &zeros, &DepthwiseOp { stride, relu6: false })
    } else {
        depthwise_conv2d_nhwc_shifted(x, weight, stride)
    }
}

#[test]
fn same_padding_matches_tensorflow() {
    // (input, kernel, stride) -> (out, before, after)
    assert_eq!(same_padding(224, 3, 2), (112, 0, 1));
    assert_eq!(same_padding(112, 3, 1), (112, 1, 1));
    assert_eq!(same_padding(56, 5, 2), (28, 1, 2));
    assert_eq!(same_padding(14, 5, 1), (14, 2, 2));
    assert_eq!(same_padding(7, 3, 2), (4, 1, 1));
    assert_eq!(same_padding(1, 5, 1), (1, 2, 2));
    assert_eq!(same_padding(5, 1, 1), (5, 0, 0));
    // Output is always ceil(input / stride).
    for input in 1..40 {
        for kernel in [1, 3, 5, 7] {
            for stride in [1, 2, 3] {
                let (out, before, after) = same_padding(input, kernel, stride);
                assert_eq!(out, input.div_ceil(stride));
                assert!(after == before || after == before + 1);
                assert!((out - 1) * stride + kernel <= input + before + after);
            }
        }
    }
}

/// Depthwise with candle's grouped conv2d on an explicitly padded NCHW input: the reference.
fn reference_nchw(x: &Tensor, w: &Tensor, stride: usize) -> Tensor {
    let (_, c, h, wd) = x.dims4().unwrap();
    let k = w.dim(2).unwrap();
    let (_, top, bottom) = same_padding(h, k, stride);
    let (_, left, right) = same_padding(wd, k, stride);
    let xp = x.pad_with_zeros(2, top, bottom).unwrap().pad_with_zeros(3, left, right).unwrap();
    xp.conv2d(w, 0, stride, 1, c).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
}

fn nhwc(t: &Tensor) -> Tensor {
    t.permute((0, 2, 3, 1)).unwrap().contiguous().unwrap()
}

#[test]
fn depthwise_kernels_match_grouped_conv2d() {
    let dev = Device::Cpu;
    for (n, c, h, w, k, stride) in [
        (2, 5, 9, 11, 3, 1),
        (1, 4, 10, 10, 3, 2),
        (2, 3, 13, 8, 5, 2),
        (1, 6, 7, 7, 5, 1),
        (1, 2, 4, 3, 5, 2),
        (3, 1, 1, 1, 3, 1),
        (1, 17, 6, 5, 3, 2),
        // Multiples of 16 channels take the blocked, tiled kernel: tiles and edge pixels,
        // both strides and kernel sizes, maps narrower than a tile.
        (2, 32, 9, 11, 3, 1),
        (1, 16, 10, 13, 3, 2),
        (1, 48, 13, 8, 5, 2),
        (2, 16, 12, 17, 5, 1),
        (1, 32, 3, 3, 5, 1),
        (1, 16, 1, 1, 3, 1),
        (1, 16, 14, 14, 5, 2),
        // Rows wide enough for the AVX-512 kernel's tiles of 8 pixels, with tiles of 4 after.
        (1, 16, 5, 45, 3, 2),
        (1, 32, 6, 27, 5, 1),
        (1, 16, 7, 44, 5, 2),
    ] {
        let x = Tensor::randn(0f32, 1.0, (n, c, h, w), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1.0, (c, 1, k, k), &dev).unwrap();
        let want = nhwc(&reference_nchw(&x, &wt, stride));
        let wt_kkc = wt.squeeze(1).unwrap().permute((1, 2, 0)).unwrap().contiguous().unwrap();
        let fast = depthwise_conv2d_nhwc(&nhwc(&x), &wt_kkc, stride, Kernels::Cpu).unwrap();
        let shifted = depthwise_conv2d_nhwc_shifted(&nhwc(&x), &wt_kkc, stride).unwrap();
        let case = format!("{:?}", (n, c, h, w, k, stride));
        assert!(max_abs_diff(&fast, &want) < 1e-5, "cpu kernel {case}");
        assert!(max_abs_diff(&shifted, &want) < 1e-5, "shifted {case}");
    }
}

#[test]
fn stem_kernel_matches_candle_conv2d() {
    let dev = Device::Cpu;
    for (n, cin, h, w, k, cout, stride) in
        // Channel counts that take the 32-, 16- and 1-wide paths; widths with interior groups
        // of pixels and edge pixels on both sides.
        [
            (2, 3, 16, 12, 3, 8, 2),
            (1, 3, 9, 9, 3, 5, 2),
            (1, 2, 7, 10, 5, 3, 1),
            (1, 3, 1, 1, 3, 4, 2),
            (1, 3, 21, 37, 3, 32, 2),
            (2, 3, 11, 29, 5, 49, 1),
            (1, 3, 30, 30, 3, 64, 2),
            (2, 3, 17, 40, 3, 40, 2),
        ]
    {
        let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev).unwrap();
        let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev).unwrap();
        let bias = Tensor::randn(0f32, 1.0, cout, &dev).unwrap();
        let conv = DenseConv::new(Folded { weight: wt.clone(), bias: bias.clone() }, stride).unwrap();
        let want = conv.forward(&x, Kernels::Generic).unwrap();
        let got = conv.forward(&x, Kernels::Cpu).unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-5, "{:?}", (n, cin, h, w, k, cout, stride));
    }
}

#[test]
fn depthwise_rejects_mismatched_shapes() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((1, 4, 4, 3), DType::F32, &dev).unwrap();
    let w = Tensor::zeros((3, 3, 2), DType::F32, &dev).unwrap();
    assert!(depthwise_conv2d_nhwc(&x, &w, 1, Kernels::Cpu).is_err());
    assert!(depthwise_conv2d_nhwc_shifted(&x, &w, 1).is_err());
    let w = Tensor::zeros((3, 3, 3), DType::F32, &dev).unwrap();
    assert!(depthwise_conv2d_nhwc(&x, &w, 0, Kernels::Cpu).is_err());
}

#[test]
fn depthwise_accepts_non_contiguous_input() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (1, 6, 6, 4), &dev).unwrap().transpose(1, 2).unwrap();
    let wt = Tensor::randn(0f32, 1.0, (3, 3, 4), &dev).unwrap();
    let fast = depthwise_conv2d_nhwc(&x, &wt, 1, Kernels::Cpu).unwrap();
    let want = depthwise_conv2d_nhwc_shifted(&x.contiguous().unwrap(), &wt, 1).unwrap();
    assert!(max_abs_diff(&fast, &want) < 1e-5);
}

#[test]
fn bias_act_in_place_matches_candle_ops() {
    let dev = Device::Cpu;
    for act in [Activation::None, Activation::Relu6] {
        let y = (Tensor::randn(0f32, 1.0, (2, 7, 5, 3), &dev).unwrap() * 5.0).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 3, &dev).unwrap();
        let want = bias_act(y.copy().unwrap(), &bias, act, Kernels::Generic).unwrap();
        let got = bias_act(y.copy().unwrap(), &bias, act, Kernels::Cpu).unwrap();
        assert_eq!(max_abs_diff(&got, &want), 0.0, "{act:?}");
    }
}

#[test]
fn batch_norm_folding_equals_conv_then_bn() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (2, 3, 5, 5), &dev).unwrap();
    let w = Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev).unwrap();
    let gamma = Tensor::new(&[1.5f32, -0.5, 2.0, 0.1], &dev).unwrap();
    let beta = Tensor::new(&[0.1f32, 0.2, -0.3, 0.0], &dev).unwrap();
    let mean = Tensor::new(&[0.5f32, -1.0, 0.0, 3.0], &dev).unwrap();
    let var = Tensor::new(&[1.0f32, 0.25, 4.0, 0.01], &dev).unwrap();
    let folded = fold_bn(&w, &gamma, &beta, &mean, &var).unwrap();
    let r = |t: &Tensor| t.reshape((1, 4, 1, 1)).unwrap();
    let got = x.conv2d(&folded.weight, 1, 1, 1, 1).unwrap().broadcast_add(&r(&folded.bias)).unwrap();
    let y = x.conv2d(&w, 1, 1, 1, 1).unwrap();
    let want = y
        .broadcast_sub(&r(&mean))
        .unwrap()
        .broadcast_div(&r(&(var + BN_EPS).unwrap().sqrt().unwrap()))
        .unwrap()
        .broadcast_mul(&r(&gamma))
        .unwrap()
        .broadcast_add(&r(&beta))
        .unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-4);
}

/// Every block of the shipped network, fused by bands where the plan allows it, equals the
/// plain candle path, on map sizes that cut bands unevenly and at image edges.
/// The bundled Lite0 network on the CPU.
pub(super) fn lite0() -> LiteNet {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/efficientnet-lite0/model.safetensors");
    LiteNet::from_tensors(candle_core::safetensors::load(&path, &Device::Cpu).unwrap()).unwrap()
}

/// Pooling straight from the CPU pass's buffers, images read where they are, gives the bits
/// of the tensor path (the feature map as a tensor, then pooled), at batch 1 and above, for
/// both kinds of pooling.
#[test]
fn pooling_from_the_buffers_gives_the_tensor_paths_bits() {
    let net = lite0();
    assert!(net.pools_on_buffers());
    let plane = 3 * 224 * 224;
    for n in [1usize, 3] {
        let x = Tensor::randn(0f32, 1.0, (n, 3, 224, 224), &Device::Cpu).unwrap();
        let data = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let images: Vec<&[f32]> = data.chunks_exact(plane).collect();
        for pooling in [Pooling::Average, Pooling::Gem { p: 3.0, sqrt: true }] {
            let map = net.feature_map(&x).unwrap();
            let want = net.pool(&map, pooling).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let got = net.pooled_cpu(&images, (3, 224, 224), pooling).unwrap();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(got.len(), n * net.feature_dim());
            assert!(bits(&got) == bits(&want), "batch {n}, {pooling:?}");
        }
    }
    let short = vec![0.5f32; plane - 1];
    assert!(net.pooled_cpu(&[&short], (3, 224, 224), Pooling::Average).is_err(), "a short image");
    assert!(net.pooled_cpu(&[], (3, 224, 224), Pooling::Average).is_err(), "no image");
}

#[test]
fn fused_blocks_match_the_unfused_path() {
    let net = lite0();
    // The band plan depends on the thread count: fix it so the same blocks fuse anywhere.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let fused = pool.install(|| check_blocks(&net));
    assert!(fused >= 16, "only {fused} block runs were fused");
}

/// The blocked depthwise layout is used where tiles cover at least half of each row.
#[test]
fn blocked_layout_only_where_tiles_cover_the_rows() {
    use super::kernels::{Geometry, blocked_pays, same_padding};
    let geometry = |side: usize, k: usize, stride: usize| {
        let (_, top, _) = same_padding(side, k, stride);
        Geometry { h: side, w: side, c: 16, k, stride, top, left: top, relu6: true, blocked: false }
    };
    assert!(blocked_pays(geometry(14, 5, 1)));
    assert!(blocked_pays(geometry(56, 3, 2)));
    assert!(blocked_pays(geometry(7, 3, 1)));
    assert!(!blocked_pays(geometry(7, 5, 1)), "a 7-wide row has no 4 pixels with all 5x5 taps inside");
    assert!(!blocked_pays(geometry(8, 5, 2)));
    assert!(!blocked_pays(geometry(28, 7, 1)), "no tiled form for 7x7 kernels");
}

/// At batch 1 on 2 threads, a 14x14 map fuses as two bands of 7 rows (one per thread), and
/// the 7x7 maps with 5x5 kernels find no band plan (each would expand shared rows twice over)
/// and run by channel groups, as does the last block, whose bands would overlap; on one thread,
/// as one band.
#[test]
fn band_plans_share_small_maps_evenly() {
    let net = lite0();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let plan = |i: usize, n: usize, side: usize| {
        pool.install(|| net.blocks[i].cpu.as_ref().unwrap().band_rows(n, side, side))
    };
    assert_eq!(plan(6, 1, 14), Some(7));
    assert!(plan(6, 4, 14).is_some());
    assert_eq!(plan(12, 1, 7), None);
    let cpu = net.blocks[12].cpu.as_ref().unwrap();
    assert_eq!(pool.install(|| cpu.plan(1, 7, 7)), Some(Plan::Channels), "7x7 by channel groups");
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    assert_eq!(one.install(|| cpu.plan(1, 7, 7)), Some(Plan::Bands(7)), "one band on one thread");
    // The last block (3x3 kernel) finds bands of 4 and 3 rows, which expand 9 of 7 input rows:
    // by channel groups instead, its expansion being small; not so at batch 4, nor at 14x14.
    let last = net.blocks[15].cpu.as_ref().unwrap();
    assert_eq!(plan(15, 1, 7), Some(4));
    assert_eq!(pool.install(|| last.plan(1, 7, 7)), Some(Plan::Channels));
    assert!(matches!(pool.install(|| last.plan(4, 7, 7)), Some(Plan::Bands(_))));
    let wide = net.blocks[9].cpu.as_ref().unwrap();
    assert_eq!(pool.install(|| wide.plan(1, 14, 14)), Some(Plan::Bands(7)));
    assert_eq!(one.install(|| last.plan(1, 7, 7)), Some(Plan::Bands(7)));
}

/// The channel-group plan (7x7 maps at batch 1 on several threads) gives exactly the values of
/// the fused bands, for every block with an expansion and maps of other sizes and batches.
#[test]
fn channel_groups_equal_the_fused_bands_bit_for_bit() {
    let net = lite0();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let mut checked = 0;
    for (i, block) in net.blocks.iter().enumerate() {
        let (cpu, Some(expand)) = (block.cpu.as_ref().unwrap(), &block.expand) else { continue };
        let cin = expand.weight_t.dims()[0];
        for (n, h, w) in [(1, 7, 7), (2, 5, 9), (1, 14, 14)] {
            let x = Tensor::randn(0f32, 1.0, (n, h, w, cin), &Device::Cpu).unwrap();
            let x: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let input = Nhwc { data: &x, n, h, w, c: cin };
            let (by_channels, oh, ..) = pool.install(|| cpu.run(Plan::Channels, input)).unwrap();
            let (bands, ..) = cpu.run(Plan::Bands(oh), input).unwrap();
            assert_eq!(by_channels.len(), bands.len(), "block {i}");
            let same = by_channels.iter().zip(&bands).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "block {i}, {n} x {h} x {w}: channel groups differ from the bands");
            checked += 1;
        }
    }
    assert_eq!(checked, 15 * 3, "every block but the first has an expansion");
}

/// Runs every block both ways; returns how many runs took the fused path.
fn check_blocks(net: &LiteNet) -> usize {
    let mut fused = 0;
    for (i, block) in net.blocks.iter().enumerate() {
        let cpu = block.cpu.as_ref().expect("loaded on the CPU, so the fused form exists");
        let cin = block.expand.as_ref().map_or(cpu.dw_bias.len(), |e| e.weight_t.dims()[0]);
        for (n, side) in [(1, 29), (3, 13), (2, 56)] {
            let x = Tensor::randn(0f32, 1.0, (n, side, side + 3, cin), &Device::Cpu).unwrap();
            let want = block.forward_unfused(&x, Kernels::Generic).unwrap();
            if cpu.band_rows(n, side, side + 3).is_some() {
                fused += 1;
            }
            let got = block.forward(&x, Kernels::Cpu).unwrap();
            assert_eq!(got.dims(), want.dims(), "block {i}");
            let diff = max_abs_diff(&got, &want);
            assert!(diff < 1e-4, "block {i}, {n} x {side}: differs by {diff}");
        }
    }
    fused
}

#[test]
fn refuses_weights_of_another_shape() {
    let dev = Device::Cpu;
    let mut map = HashMap::new();
    map.insert("_conv_stem.weight".to_string(), Tensor::zeros((32, 1, 3, 3), DType::F32, &dev).unwrap());
    assert!(matches!(LiteNet::from_tensors(map), Err(WeightsError::Shape { .. })));
    assert!(matches!(LiteNet::from_tensors(HashMap::new()), Err(WeightsError::Missing { .. })));
}

/// A batch runs its early layers image by image and the rest batched: every image's features
/// must be exactly those of the image alone, whatever the batch and image size.
#[test]
fn batched_features_equal_each_image_alone() {
    let net = lite0();
    for (n, h, w) in [(3, 64, 48), (2, 224, 224)] {
        let x = Tensor::randn(0f32, 1.0, (n, 3, h, w), &Device::Cpu).unwrap();
        let (_, first_batched) = net.early_layers_per_image(&x).unwrap();
        let batch = net.pooled_features(&x).unwrap().to_vec2::<f32>().unwrap();
        for (i, row) in batch.iter().enumerate() {
            let alone = net.pooled_features(&x.narrow(0, i, 1).unwrap()).unwrap().to_vec2::<f32>().unwrap();
            let same = row.iter().zip(&alone[0]).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{h}x{w}: image {i} of the batch differs from the image alone");
        }
        // At 224x224 the large early maps (blocks 0-3) run image by image.
        assert_eq!(first_batched > 0, h == 224, "{h}x{w}: {first_batched} blocks image by image");
    }
}

/// The first block (no expansion, no residual) takes its input already blocked, as the stem
/// writes it in the pass: the same bits as from channels-last input, for maps with and
/// without tiles and at batch 2 (planes per image); blocks with an expansion refuse it.
#[test]
fn blocked_input_gives_the_bits_of_channels_last_input() {
    use crate::encoder::lite::kernels::to_blocked;
    let net = lite0();
    let first = net.blocks[0].cpu.as_ref().unwrap();
    let c = first.dw_weight.len() / (first.k * first.k);
    let mut checked = 0;
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for (n, h, w) in [(1, 112, 112), (2, 40, 36), (1, 17, 23)] {
            let Some(band) = pool.install(|| first.blocked_band(n, h, w)) else { continue };
            assert_eq!(pool.install(|| first.plan(n, h, w)), Some(Plan::Bands(band)));
            let x: Vec<f32> = Tensor::randn(0f32, 1.0, (n, h, w, c), &Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut blocked = vec![0f32; x.len()];
            for (src, dst) in x.chunks_exact(h * w * c).zip(blocked.chunks_exact_mut(h * w * c)) {
                to_blocked(src, c, dst);
            }
            let (oh, ow, cout) = first.out_shape(h, w);
            let (mut want, mut got) = (vec![0f32; n * oh * ow * cout], vec![1f32; n * oh * ow * cout]);
            pool.install(|| first.forward_to(Nhwc { data: &x, n, h, w, c }, band, &mut want)).unwrap();
            let input = Nhwc { data: &blocked, n, h, w, c };
            pool.install(|| first.forward_blocked_to(input, band, &mut got)).unwrap();
            let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(same, "{threads} threads, {n} x {h} x {w}: blocked input differs");
            checked += 1;
        }
    }
    assert!(checked >= 4, "the 112x112 map and at least one other take blocked input");
    let second = net.blocks[1].cpu.as_ref().unwrap();
    assert_eq!(second.blocked_band(1, 112, 112), None, "a block with an expansion repacks what it expands");
    let x = vec![0f32; 112 * 112 * 16];
    let mut out = vec![0f32; 56 * 56 * 24];
    assert!(second.forward_blocked_to(Nhwc { data: &x, n: 1, h: 112, w: 112, c: 16 }, 7, &mut out).is_err());
}

/// The pass over recycled buffers computes what the candle ops compute, bit for bit, at batch
/// 1 and in batches (early layers image by image), on one thread and on several; repeated
/// passes reuse buffers whose stale values (NaN under debug assertions) must all be overwritten.
#[test]
fn the_pass_over_buffers_equals_the_candle_ops_bit_for_bit() {
    let net = lite0();
    assert!(net.runs_on_buffers());
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for (n, h, w) in [(1, 224, 224), (3, 224, 224), (2, 61, 47), (1, 32, 32)] {
            let x = Tensor::randn(0f32, 1.0, (n, 3, h, w), &Device::Cpu).unwrap();
            let bits = |t: Tensor| -> Vec<u32> {
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
            };
            let want = pool.install(|| net.feature_map_ops(&x)).unwrap();
            let dims = want.dims().to_vec();
            let want = bits(want);
            for pass in 0..2 {
                let got = pool.install(|| net.feature_map_cpu(&x)).unwrap();
                assert_eq!(got.dims(), dims, "{n} x {h} x {w}");
                assert!(bits(got) == want, "{threads} threads, {n} x {h} x {w}, pass {pass}: differs");
            }
        }
    }
}

/// Passes from several threads at once on one 2-thread pool, each keeping the other thread
/// awake while its keepers meet the other passes' work: every pass finishes, with the same
/// features as its image alone.
#[test]
fn concurrent_passes_on_one_pool_finish_with_the_features_of_each_alone() {
    let net = lite0();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let features = |x: &Tensor| -> Vec<u32> {
        let y = pool.install(|| net.pooled_features(x)).unwrap();
        y.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    };
    let inputs: Vec<Tensor> =
        (0..4).map(|_| Tensor::randn(0f32, 1.0, (1, 3, 64, 64), &Device::Cpu).unwrap()).collect();
    let alone: Vec<Vec<u32>> = inputs.iter().map(features).collect();
    std::thread::scope(|s| {
        let runs: Vec<_> =
            inputs.iter().map(|x| s.spawn(move || (0..5).map(|_| features(x)).collect::<Vec<_>>())).collect();
        for (i, (run, want)) in runs.into_iter().zip(&alone).enumerate() {
            for got in run.join().unwrap() {
                assert!(got == *want, "input {i}: a concurrent pass differs from the pass alone");
            }
        }
    });
}
