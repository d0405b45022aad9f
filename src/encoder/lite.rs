//! The EfficientNet-Lite network in Candle: weight loading with batch norm folded into the
//! convolutions, TensorFlow "same" padding, and the forward pass to pooled features and
//! classifier logits.
//!
//! Lite differs from EfficientNet B0-B7: ReLU6 instead of swish, no squeeze-excite, and a fixed
//! stem (32) and head (1280). Blocks come in seven stages; the first block of a stage changes
//! the channel count and carries the stage's stride, the others are residual.
//!
//! Activations are channels-last (NHWC) after the stem. On the CPU, kernels of this crate do
//! the work: the stem convolution and the depthwise convolution here (candle's grouped conv2d
//! loops over every channel), 1x1 convolutions in [`super::pointwise`] (packed weights, bias,
//! residual and ReLU6 fused into the store), and whole blocks fused band by band in
//! [`super::fused`] where that pays. Off the CPU ([`Kernels::Generic`]) the same maths runs as
//! plain candle ops; tests check both paths agree.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, InplaceOp2, Layout, Shape, Tensor};
use multiversion::multiversion;
use multiversion::target::target_cfg_f;
use rayon::prelude::*;

use super::fused::CpuBlock;
use super::manifest::Pooling;
use super::pointwise::{Epilogue, PackedWeights, PointwiseLayer};

/// Batch-norm epsilon of the TensorFlow Lite models.
pub const BN_EPS: f64 = 1e-3;
/// Stride of the first block of each of the seven stages (EfficientNet-B0 layout).
pub const STAGE_STRIDES: [usize; 7] = [1, 2, 2, 2, 1, 2, 1];

/// The weights file does not describe an EfficientNet-Lite network this loader understands.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("tensor {name:?} is missing")]
    Missing { name: String },
    #[error("tensor {name:?} has shape {actual:?}; expected {expected}")]
    Shape { name: String, actual: Vec<usize>, expected: String },
    #[error("tensor {name:?} has dtype {dtype:?}; expected f32")]
    DType { name: String, dtype: DType },
    #[error("no blocks found (`_blocks.N.*` tensors)")]
    NoBlocks,
    #[error("found {found} stages (channel changes between blocks); EfficientNet-Lite has 7")]
    Stages { found: usize },
    #[error("{count} tensors were not used, e.g. {example:?}")]
    Unused { count: usize, example: String },
    #[error("while preparing tensor {name:?}")]
    Candle {
        name: String,
        #[source]
        source: candle_core::Error,
    },
}

/// TF "same" padding along one axis: output length and the zeros added before and after
/// (the odd one goes after).
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize, usize) {
    let out = input.div_ceil(stride);
    let needed = (out.saturating_sub(1) * stride + kernel).saturating_sub(input);
    let before = needed / 2;
    (out, before, needed - before)
}

/// A convolution with batch norm folded in: weight `(out, in, k, k)` and bias `(out,)`.
#[derive(Debug, Clone)]
struct Folded {
    weight: Tensor,
    bias: Tensor,
}

/// The stem: a dense kxk convolution on the NCHW image, ending in NHWC.
#[derive(Debug, Clone)]
struct DenseConv {
    /// `(out, in, k, k)`, for candle's conv2d off the CPU.
    weight: Tensor,
    /// `(k, k, in, out)`, contiguous, for the CPU kernel.
    weight_kkio: Tensor,
    bias: Tensor,
    stride: usize,
}

/// 1x1 convolution on NHWC activations, run as one matrix product `(n*h*w, in) x (in, out)`.
#[derive(Debug, Clone)]
struct Pointwise {
    /// `(in, out)`, contiguous.
    weight_t: Tensor,
    bias: Tensor,
    /// The same weights packed for the CPU kernel (present when loaded on the CPU).
    cpu: Option<Arc<PointwiseLayer>>,
}

/// Depthwise convolution on NHWC activations.
#[derive(Debug, Clone)]
struct Depthwise {
    /// `(k, k, c)`, contiguous: one row of channel weights per tap.
    weight: Tensor,
    bias: Tensor,
    stride: usize,
}

#[derive(Debug, Clone)]
struct Block {
    expand: Option<Pointwise>,
    depthwise: Depthwise,
    project: Pointwise,
    residual: bool,
    /// The whole block for the fused CPU kernel (present when loaded on the CPU).
    cpu: Option<Arc<CpuBlock>>,
}

/// One EfficientNet-Lite network with folded weights on one device. Activations between layers
/// are NHWC (channels last): 1x1 convolutions become plain matrix products and the depthwise
/// kernel vectorises over channels.
#[derive(Debug, Clone)]
pub struct LiteNet {
    stem: DenseConv,
    blocks: Vec<Block>,
    head: Pointwise,
    fc_weight_t: Tensor,
    fc_bias: Tensor,
    features: usize,
    classes: usize,
    kernels: Kernels,
}

/// Removes named tensors from the loaded map, checking dtype and shape.
struct Tensors {
    map: HashMap<String, Tensor>,
}

impl Tensors {
    fn take(&mut self, name: &str) -> Result<Tensor, WeightsError> {
        let t = self.map.remove(name).ok_or_else(|| WeightsError::Missing { name: name.into() })?;
        if t.dtype() != DType::F32 {
            return Err(WeightsError::DType { name: name.into(), dtype: t.dtype() });
        }
        Ok(t)
    }

    fn take_shaped(&mut self, name: &str, expected: &[Option<usize>]) -> Result<Tensor, WeightsError> {
        let t = self.take(name)?;
        let dims = t.dims();
        let ok =
            dims.len() == expected.len() && dims.iter().zip(expected).all(|(d, e)| e.is_none_or(|e| e == *d));
        if !ok {
            let expected = expected
                .iter()
                .map(|e| e.map_or("_".to_string(), |v| v.to_string()))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(WeightsError::Shape {
                name: name.into(),
                actual: dims.to_vec(),
                expected: format!("[{expected}]"),
            });
        }
        Ok(t)
    }

    fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// Loads `{conv}.weight` (shape `(out, in_per_group, k, k)`) and folds `{bn}` into it.
    fn conv_bn(&mut self, conv: &str, bn: &str, shape: [Option<usize>; 4]) -> Result<Folded, WeightsError> {
        let wname = format!("{conv}.weight");
        let weight = self.take_shaped(&wname, &shape)?;
        let out = weight.dims()[0];
        let vec = [Some(out)];
        let gamma = self.take_shaped(&format!("{bn}.weight"), &vec)?;
        let beta = self.take_shaped(&format!("{bn}.bias"), &vec)?;
        let mean = self.take_shaped(&format!("{bn}.running_mean"), &vec)?;
        let var = self.take_shaped(&format!("{bn}.running_var"), &vec)?;
        fold_bn(&weight, &gamma, &beta, &mean, &var)
            .map_err(|source| WeightsError::Candle { name: wname, source })
    }
}

/// `w' = w * g / sqrt(v + eps)`, `b' = beta - mean * g / sqrt(v + eps)`, computed in f64.
fn fold_bn(
    weight: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    mean: &Tensor,
    var: &Tensor,
) -> candle_core::Result<Folded> {
    let f64s = |t: &Tensor| t.to_dtype(DType::F64);
    let scale = f64s(gamma)?.div(&(f64s(var)? + BN_EPS)?.sqrt()?)?;
    let out = weight.dims()[0];
    let w = f64s(weight)?.broadcast_mul(&scale.reshape((out, 1, 1, 1))?)?;
    let b = (f64s(beta)? - f64s(mean)?.mul(&scale)?)?;
    Ok(Folded { weight: w.to_dtype(DType::F32)?, bias: b.to_dtype(DType::F32)? })
}

impl LiteNet {
    /// Builds the network from safetensors tensors (on any device; folding runs where they are).
    /// Every tensor must be used, so a file of another architecture is refused.
    pub fn from_tensors(map: HashMap<String, Tensor>) -> Result<Self, WeightsError> {
        let mut ts = Tensors { map };
        let stem_dims = ts
            .map
            .get("_conv_stem.weight")
            .map(|t| t.dims().to_vec())
            .ok_or_else(|| WeightsError::Missing { name: "_conv_stem.weight".into() })?;
        let (stem_out, k) = match stem_dims[..] {
            [out, 3, k, k2] if k == k2 => (out, k),
            _ => {
                return Err(WeightsError::Shape {
                    name: "_conv_stem.weight".into(),
                    actual: stem_dims,
                    expected: "[_, 3, k, k]".into(),
                });
            }
        };
        let stem = ts.conv_bn("_conv_stem", "_bn0", [Some(stem_out), Some(3), Some(k), Some(k)])?;
        let stem = DenseConv::new(stem, 2)
            .map_err(|source| WeightsError::Candle { name: "_conv_stem.weight".into(), source })?;

        let mut blocks = Vec::new();
        let mut channels = stem_out;
        let mut stage = 0usize;
        let mut n = 0usize;
        while ts.has(&format!("_blocks.{n}._depthwise_conv.weight")) {
            let p = format!("_blocks.{n}");
            let expand = if ts.has(&format!("{p}._expand_conv.weight")) {
                let conv = ts.conv_bn(
                    &format!("{p}._expand_conv"),
                    &format!("{p}._bn0"),
                    [None, Some(channels), Some(1), Some(1)],
                )?;
                Some(conv)
            } else {
                None
            };
            let mid = expand.as_ref().map_or(channels, |e| e.weight.dims()[0]);
            let dw_name = format!("{p}._depthwise_conv.weight");
            let dw_kernel = ts.map.get(&dw_name).map_or(0, |t| t.dims().get(2).copied().unwrap_or(0));
            let depthwise = ts.conv_bn(
                &format!("{p}._depthwise_conv"),
                &format!("{p}._bn1"),
                [Some(mid), Some(1), Some(dw_kernel), Some(dw_kernel)],
            )?;
            let project = ts.conv_bn(
                &format!("{p}._project_conv"),
                &format!("{p}._bn2"),
                [None, Some(mid), Some(1), Some(1)],
            )?;
            let out = project.weight.dims()[0];
            let starts_stage = n == 0 || out != channels;
            if starts_stage && n > 0 {
                stage += 1;
            }
            let stride = if starts_stage {
                *STAGE_STRIDES.get(stage).ok_or(WeightsError::Stages { found: stage + 1 })?
            } else {
                1
            };
            let mut block = Block {
                expand: expand.map(pointwise).transpose().map_err(|source| WeightsError::Candle {
                    name: format!("{p}._expand_conv.weight"),
                    source,
                })?,
                depthwise: Depthwise::new(depthwise, stride)
                    .map_err(|source| WeightsError::Candle { name: dw_name.clone(), source })?,
                project: pointwise(project).map_err(|source| WeightsError::Candle {
                    name: format!("{p}._project_conv.weight"),
                    source,
                })?,
                residual: stride == 1 && out == channels,
                cpu: None,
            };
            block.cpu = block.cpu_block().map_err(|source| WeightsError::Candle { name: dw_name, source })?;
            blocks.push(block);
            channels = out;
            n += 1;
        }
        if blocks.is_empty() {
            return Err(WeightsError::NoBlocks);
        }
        if stage + 1 != STAGE_STRIDES.len() {
            return Err(WeightsError::Stages { found: stage + 1 });
        }

        let head = ts.conv_bn("_conv_head", "_bn1", [None, Some(channels), Some(1), Some(1)])?;
        let features = head.weight.dims()[0];
        let head = pointwise(head)
            .map_err(|source| WeightsError::Candle { name: "_conv_head.weight".into(), source })?;
        let fc_weight = ts.take_shaped("_fc.weight", &[None, Some(features)])?;
        let classes = fc_weight.dims()[0];
        let fc_bias = ts.take_shaped("_fc.bias", &[Some(classes)])?;
        let fc_weight_t = fc_weight
            .t()
            .and_then(|t| t.contiguous())
            .map_err(|source| WeightsError::Candle { name: "_fc.weight".into(), source })?;

        let mut left: Vec<&String> = ts.map.keys().collect();
        left.sort();
        if let Some(example) = left.first() {
            return Err(WeightsError::Unused { count: left.len(), example: (*example).clone() });
        }
        let kernels = Kernels::for_device(fc_bias.device());
        Ok(Self { stem, blocks, head, fc_weight_t, fc_bias, features, classes, kernels })
    }

    /// Runs the forward pass with `kernels` instead of those chosen for the weights' device
    /// (tests run the generic GPU path on the CPU this way).
    pub fn with_kernels(mut self, kernels: Kernels) -> Self {
        self.kernels = kernels;
        self
    }

    /// Length of the pooled feature vector.
    pub fn feature_dim(&self) -> usize {
        self.features
    }

    /// Number of classifier outputs.
    pub fn num_classes(&self) -> usize {
        self.classes
    }

    /// Number of inverted-residual blocks.
    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// Channels out of the last block (into the head).
    pub fn last_block_channels(&self) -> usize {
        self.head.weight_t.dims()[0]
    }

    /// Side of the final feature map for a `size` x `size` input: every stride-2 layer (the
    /// stem and the first block of four stages) takes `ceil(side / 2)`.
    pub fn feature_map_side(&self, size: usize) -> usize {
        let side = size.div_ceil(self.stem.stride);
        self.blocks.iter().fold(side, |side, b| side.div_ceil(b.depthwise.stride))
    }

    /// `(n, 3, s, s)` normalised images (NCHW) -> the head's feature map `(n, h, w, features)`
    /// (NHWC, after ReLU6), before any pooling.
    pub fn feature_map(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let kernels = self.kernels;
        let mut x = self.stem.forward(x, kernels)?;
        for block in &self.blocks {
            x = block.forward(&x, kernels)?;
        }
        self.head.forward(&x, Activation::Relu6, kernels)
    }

    /// `(n, 3, s, s)` normalised images (NCHW) -> `(n, features)` globally average-pooled
    /// features (what the classifier takes).
    pub fn pooled_features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.pool(&self.feature_map(x)?, Pooling::Average)
    }

    /// A feature map from [`feature_map`](Self::feature_map) -> `(n, features)` with `pooling`.
    pub fn pool(&self, map: &Tensor, pooling: Pooling) -> candle_core::Result<Tensor> {
        super::pool::pool(map, pooling, self.kernels)
    }

    /// `(n, features)` pooled features -> `(n, classes)` logits.
    pub fn logits(&self, pooled: &Tensor) -> candle_core::Result<Tensor> {
        pooled.matmul(&self.fc_weight_t)?.broadcast_add(&self.fc_bias)
    }
}

/// A folded 1x1 convolution `(out, in, 1, 1)` as the matrix `(in, out)`.
fn pointwise(f: Folded) -> candle_core::Result<Pointwise> {
    let (out, inp, _, _) = f.weight.dims4()?;
    let weight_t = f.weight.reshape((out, inp))?.t()?.contiguous()?;
    let cpu = if weight_t.device().is_cpu() {
        let w = weight_t.flatten_all()?.to_vec1::<f32>()?;
        let bias = f.bias.to_vec1::<f32>()?;
        Some(Arc::new(PointwiseLayer { weights: PackedWeights::pack(&w, inp, out), bias }))
    } else {
        None
    };
    Ok(Pointwise { weight_t, bias: f.bias, cpu })
}

impl Depthwise {
    /// From a folded `(c, 1, k, k)` weight.
    fn new(f: Folded, stride: usize) -> candle_core::Result<Self> {
        Ok(Self { weight: f.weight.squeeze(1)?.permute((1, 2, 0))?.contiguous()?, bias: f.bias, stride })
    }

    /// Convolution, bias and ReLU6; on the CPU in one pass over the output.
    fn forward(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        if kernels == Kernels::Cpu {
            let op = DepthwiseOp { stride: self.stride, relu6: true };
            x.contiguous()?.apply_op3_no_bwd(&self.weight, &self.bias, &op)
        } else {
            let y = depthwise_conv2d_nhwc_shifted(x, &self.weight, self.stride)?;
            bias_act_candle(&y, &self.bias, Activation::Relu6)
        }
    }
}

impl DenseConv {
    fn new(f: Folded, stride: usize) -> candle_core::Result<Self> {
        let weight_kkio = f.weight.permute((2, 3, 1, 0))?.contiguous()?;
        Ok(Self { weight: f.weight, weight_kkio, bias: f.bias, stride })
    }

    /// `(n, in, h, w)` -> `(n, oh, ow, out)` with bias and ReLU6.
    fn forward(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        if kernels == Kernels::Cpu {
            let op = DenseConvOp { stride: self.stride };
            x.contiguous()?.apply_op3_no_bwd(&self.weight_kkio, &self.bias, &op)
        } else {
            let y = dense_conv2d_candle(x, &self.weight, self.stride)?;
            bias_act_candle(&y, &self.bias, Activation::Relu6)
        }
    }
}

/// TF-"same" dense convolution with candle's conv2d: NCHW `x`, `(out, in, k, k)` weight, NHWC
/// result.
fn dense_conv2d_candle(x: &Tensor, weight: &Tensor, stride: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let k = weight.dim(2)?;
    let (_, top, bottom) = same_padding(h, k, stride);
    let (_, left, right) = same_padding(w, k, stride);
    let x = x.pad_with_zeros(2, top, bottom)?.pad_with_zeros(3, left, right)?;
    x.conv2d(weight, 0, stride, 1, 1)?.permute((0, 2, 3, 1))?.contiguous()
}

/// The CPU stem kernel: NCHW input `(n, in, h, w)`, weight `(k, k, in, out)`, bias `(out,)`,
/// TF-"same" padding, NHWC output `(n, oh, ow, out)` with bias and ReLU6 applied.
struct DenseConvOp {
    stride: usize,
}

impl CustomOp3 for DenseConvOp {
    fn name(&self) -> &'static str {
        "dense-conv2d-nchw-to-nhwc-same-relu6"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, cin, h, w, k, cout) = match (l1.dims(), l2.dims()) {
            ([n, cin, h, w], [k, k2, wcin, cout]) if k == k2 && cin == wcin && *k > 0 && self.stride > 0 => {
                (*n, *cin, *h, *w, *k, *cout)
            }
            (x, wt) => candle_core::bail!("dense conv: input {x:?} and weight {wt:?} do not match"),
        };
        let (Some((x0, x1)), Some((w0, w1)), Some((b0, b1))) =
            (l1.contiguous_offsets(), l2.contiguous_offsets(), l3.contiguous_offsets())
        else {
            candle_core::bail!("dense conv: inputs must be contiguous");
        };
        let x = &s1.as_slice::<f32>()?[x0..x1];
        let wt = &s2.as_slice::<f32>()?[w0..w1];
        let bias = &s3.as_slice::<f32>()?[b0..b1];
        if bias.len() != cout {
            candle_core::bail!("dense conv: bias of {} for {cout} channels", bias.len());
        }
        let (oh, top, _) = same_padding(h, k, self.stride);
        let (ow, left, _) = same_padding(w, k, self.stride);
        let g = DenseGeometry { cin, h, w, k, cout, stride: self.stride, top, left };
        let mut out = vec![0f32; n * oh * ow * cout];
        if !out.is_empty() {
            out.par_chunks_mut(ow * cout).enumerate().for_each(|(row, dst)| {
                let (image, oy) = (row / oh, row % oh);
                let plane = cin * h * w;
                dense_row(&x[image * plane..(image + 1) * plane], wt, bias, dst, oy, g);
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, oh, ow, cout))))
    }
}

#[derive(Debug, Clone, Copy)]
struct DenseGeometry {
    cin: usize,
    h: usize,
    w: usize,
    k: usize,
    cout: usize,
    stride: usize,
    top: usize,
    left: usize,
}

/// The taps `0..k` of output position `out` along one axis whose source position
/// `out * stride + tap - before` lies inside `0..len` (TF "same" padding puts `before` zeros
/// first).
fn tap_range(out: usize, stride: usize, before: usize, len: usize, k: usize) -> std::ops::Range<usize> {
    let first = out * stride;
    before.saturating_sub(first)..k.min((before + len).saturating_sub(first))
}

/// Output pixels computed together by the stem kernel where none of them touches the padding.
const STEM_PIXELS: usize = 4;

/// Output row `oy` of one image of the stem: `dst[ox][o] = relu6(bias[o] + sum_{ky,kx,i}
/// wt[ky][kx][i][o] * src[i][oy*s+ky-top][ox*s+kx-left])`. Vectorised over output channels,
/// [`STEM_PIXELS`] pixels at a time away from the left and right edges, accumulated in
/// registers over all taps.
#[multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx+avx2+fma", "aarch64+neon"))]
fn dense_row(src: &[f32], wt: &[f32], bias: &[f32], dst: &mut [f32], oy: usize, g: DenseGeometry) {
    if target_cfg_f!(target_feature = "fma") {
        dense_row_body::<true>(src, wt, bias, dst, oy, g)
    } else {
        dense_row_body::<false>(src, wt, bias, dst, oy, g)
    }
}

#[inline(always)]
fn dense_row_body<const FMA: bool>(
    src: &[f32],
    wt: &[f32],
    bias: &[f32],
    dst: &mut [f32],
    oy: usize,
    g: DenseGeometry,
) {
    let ky = tap_range(oy, g.stride, g.top, g.h, g.k);
    let ow = dst.len() / g.cout;
    let kx_of = |ox: usize| tap_range(ox, g.stride, g.left, g.w, g.k);
    let mut ox = 0;
    while ox < ow {
        let group = ox + STEM_PIXELS <= ow && (ox..ox + STEM_PIXELS).all(|p| kx_of(p) == (0..g.k));
        let pixels = if group { STEM_PIXELS } else { 1 };
        let out = &mut dst[ox * g.cout..(ox + pixels) * g.cout];
        let taps = StemTaps { ky: ky.clone(), kx: kx_of(ox), oy, ox, g };
        let mut c0 = 0;
        while c0 < g.cout {
            let width = if c0 + 32 <= g.cout {
                32
            } else if c0 + 16 <= g.cout {
                16
            } else {
                1
            };
            match (group, width) {
                (true, 32) => stem_pixels::<STEM_PIXELS, 32, FMA>(src, wt, bias, out, c0, &taps),
                (true, 16) => stem_pixels::<STEM_PIXELS, 16, FMA>(src, wt, bias, out, c0, &taps),
                (true, _) => stem_pixels::<STEM_PIXELS, 1, FMA>(src, wt, bias, out, c0, &taps),
                (false, 32) => stem_pixels::<1, 32, FMA>(src, wt, bias, out, c0, &taps),
                (false, 16) => stem_pixels::<1, 16, FMA>(src, wt, bias, out, c0, &taps),
                (false, _) => stem_pixels::<1, 1, FMA>(src, wt, bias, out, c0, &taps),
            }
            c0 += width;
        }
        ox += pixels;
    }
}

/// The taps inside the source for output pixels `ox..` of row `oy` (`kx` is that of `ox`; with
/// several pixels, every one of them has the full range).
struct StemTaps {
    ky: std::ops::Range<usize>,
    kx: std::ops::Range<usize>,
    oy: usize,
    ox: usize,
    g: DenseGeometry,
}

/// Channels `c0..c0 + W` of `P` neighbouring output pixels.
#[inline(always)]
fn stem_pixels<const P: usize, const W: usize, const FMA: bool>(
    src: &[f32],
    wt: &[f32],
    bias: &[f32],
    out: &mut [f32],
    c0: usize,
    t: &StemTaps,
) {
    let g = t.g;
    let mut acc = [[0f32; W]; P];
    for a in &mut acc {
        a.copy_from_slice(&bias[c0..c0 + W]);
    }
    for ky in t.ky.clone() {
        let iy = t.oy * g.stride + ky - g.top;
        for kx in t.kx.clone() {
            for i in 0..g.cin {
                let taps = &wt[((ky * g.k + kx) * g.cin + i) * g.cout + c0..][..W];
                let row = &src[(i * g.h + iy) * g.w..][..g.w];
                for (p, a) in acc.iter_mut().enumerate() {
                    let v = row[(t.ox + p) * g.stride + kx - g.left];
                    for (s, &w) in a.iter_mut().zip(taps) {
                        *s = if FMA { v.mul_add(w, *s) } else { *s + v * w };
                    }
                }
            }
        }
    }
    for (p, a) in acc.iter().enumerate() {
        let dst = &mut out[p * g.cout + c0..p * g.cout + c0 + W];
        for (d, &v) in dst.iter_mut().zip(a) {
            *d = v.clamp(0.0, 6.0);
        }
    }
}

impl Pointwise {
    /// `(n, h, w, in)` -> `(n, h, w, out)`, bias and `act` applied.
    fn forward(&self, x: &Tensor, act: Activation, kernels: Kernels) -> candle_core::Result<Tensor> {
        self.forward_add(x, None, act, kernels)
    }

    /// [`forward`](Self::forward) with `residual` (shaped like the output) added before `act`.
    fn forward_add(
        &self,
        x: &Tensor,
        residual: Option<&Tensor>,
        act: Activation,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        let (n, h, w, c) = x.dims4()?;
        let out = self.weight_t.dim(1)?;
        if let (Kernels::Cpu, Some(cpu)) = (kernels, &self.cpu) {
            let op = PointwiseOp { cpu: cpu.clone(), relu6: act == Activation::Relu6 };
            let x = x.contiguous()?;
            let y = match residual {
                Some(r) => x.apply_op2_no_bwd(&r.contiguous()?, &op)?,
                None => x.apply_op1_no_bwd(&op)?,
            };
            return y.reshape((n, h, w, out));
        }
        let y = x.reshape((n * h * w, c))?.matmul(&self.weight_t)?.reshape((n, h, w, out))?;
        match residual {
            Some(r) => bias_act((y + r)?, &self.bias, act, kernels),
            None => bias_act(y, &self.bias, act, kernels),
        }
    }
}

/// The CPU 1x1 convolution (see [`super::pointwise`]): input `(..., in)` contiguous, output
/// `(rows, out)`; as a two-input op the second input is the residual.
struct PointwiseOp {
    cpu: Arc<PointwiseLayer>,
    relu6: bool,
}

impl PointwiseOp {
    fn run(
        &self,
        s: &CpuStorage,
        l: &Layout,
        residual: Option<&[f32]>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (k, n) = (self.cpu.weights.k(), self.cpu.weights.n());
        let Some((x0, x1)) = l.contiguous_offsets() else {
            candle_core::bail!("pointwise: input must be contiguous");
        };
        if l.dims().last() != Some(&k) {
            candle_core::bail!("pointwise: input {:?} does not end in {k} channels", l.dims());
        }
        let x = &s.as_slice::<f32>()?[x0..x1];
        let rows = x.len() / k;
        if residual.is_some_and(|r| r.len() != rows * n) {
            candle_core::bail!("pointwise: residual does not have {rows}x{n} values");
        }
        let epilogue = Epilogue { bias: &self.cpu.bias, residual, relu6: self.relu6 };
        let y = super::pointwise::matmul(x, &self.cpu.weights, epilogue);
        Ok((CpuStorage::F32(y), Shape::from((rows, n))))
    }
}

impl CustomOp1 for PointwiseOp {
    fn name(&self) -> &'static str {
        "pointwise-conv-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.run(s, l, None)
    }
}

impl CustomOp2 for PointwiseOp {
    fn name(&self) -> &'static str {
        "pointwise-conv-nhwc-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((r0, r1)) = l2.contiguous_offsets() else {
            candle_core::bail!("pointwise: residual must be contiguous");
        };
        self.run(s1, l1, Some(&s2.as_slice::<f32>()?[r0..r1]))
    }
}

impl Block {
    /// The fused CPU form, when every part was loaded on the CPU.
    fn cpu_block(&self) -> candle_core::Result<Option<Arc<CpuBlock>>> {
        let (Some(project), true) = (&self.project.cpu, self.depthwise.weight.device().is_cpu()) else {
            return Ok(None);
        };
        let expand = match &self.expand {
            Some(e) => match &e.cpu {
                Some(cpu) => Some(cpu.clone()),
                None => return Ok(None),
            },
            None => None,
        };
        let k = self.depthwise.weight.dim(0)?;
        Ok(Some(Arc::new(CpuBlock {
            expand,
            dw_weight: self.depthwise.weight.flatten_all()?.to_vec1()?,
            dw_bias: self.depthwise.bias.to_vec1()?,
            k,
            stride: self.depthwise.stride,
            project: project.clone(),
            residual: self.residual,
        })))
    }

    fn forward(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        if let (Kernels::Cpu, Some(cpu)) = (kernels, &self.cpu) {
            let (n, h, w, _) = x.dims4()?;
            if let Some(band) = cpu.band_rows(n, h, w) {
                return x.contiguous()?.apply_op1_no_bwd(&FusedBlockOp { block: cpu.clone(), band });
            }
        }
        self.forward_unfused(x, kernels)
    }

    /// Expand, depthwise and project as three separate operations (any device).
    fn forward_unfused(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        let y = match &self.expand {
            Some(e) => e.forward(x, Activation::Relu6, kernels)?,
            None => x.clone(),
        };
        let y = self.depthwise.forward(&y, kernels)?;
        let residual = if self.residual { Some(x) } else { None };
        self.project.forward_add(&y, residual, Activation::None, kernels)
    }
}

/// The fused CPU block (see [`super::fused`]) on NHWC `(n, h, w, in)`.
struct FusedBlockOp {
    block: Arc<CpuBlock>,
    /// Output rows per band, from [`CpuBlock::band_rows`].
    band: usize,
}

impl CustomOp1 for FusedBlockOp {
    fn name(&self) -> &'static str {
        "mbconv-fused-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((x0, x1)) = l.contiguous_offsets() else {
            candle_core::bail!("fused block: input must be contiguous");
        };
        let [n, h, w, c] = *l.dims() else {
            candle_core::bail!("fused block: input {:?} is not NHWC", l.dims());
        };
        let (y, oh, ow, cout) = self.block.forward(&s.as_slice::<f32>()?[x0..x1], n, h, w, c, self.band)?;
        Ok((CpuStorage::F32(y), Shape::from((n, oh, ow, cout))))
    }
}

/// What follows a convolution's bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    None,
    Relu6,
}

/// Which implementation of the hot operations runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// This module's CPU kernels (tensors must be on the CPU).
    Cpu,
    /// Plain candle operations, for any device.
    Generic,
}

impl Kernels {
    /// The fastest kernels for `device`.
    pub fn for_device(device: &candle_core::Device) -> Self {
        if device.is_cpu() { Self::Cpu } else { Self::Generic }
    }
}

/// `y + bias` per channel, then `act`; `y` is channels-last `(..., c)`, `bias` `(c,)`. The CPU
/// kernel is one parallel pass in place over the freshly computed `y`.
fn bias_act(y: Tensor, bias: &Tensor, act: Activation, kernels: Kernels) -> candle_core::Result<Tensor> {
    if kernels == Kernels::Cpu {
        let y = y.contiguous()?;
        y.inplace_op2(&bias.contiguous()?, &BiasAct { act })?;
        Ok(y)
    } else {
        bias_act_candle(&y, bias, act)
    }
}

/// [`bias_act`] with candle's broadcasting ops (any device).
fn bias_act_candle(y: &Tensor, bias: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    let y = y.broadcast_add(bias)?;
    match act {
        Activation::None => Ok(y),
        Activation::Relu6 => y.clamp(0f32, 6f32),
    }
}

/// The CPU half of [`bias_act`].
struct BiasAct {
    act: Activation,
}

impl InplaceOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let dims = l1.dims();
        let (Some((y0, y1)), Some((b0, b1))) = (l1.contiguous_offsets(), l2.contiguous_offsets()) else {
            candle_core::bail!("bias-act: operands must be contiguous");
        };
        let bias = &s2.as_slice::<f32>()?[b0..b1];
        let CpuStorage::F32(y) = s1 else {
            candle_core::bail!("bias-act: expected f32 data");
        };
        let y = &mut y[y0..y1];
        let Some(&c) = dims.last() else {
            candle_core::bail!("bias-act: scalar input");
        };
        if y.is_empty() {
            return Ok(());
        }
        if bias.len() != c || c == 0 {
            candle_core::bail!("bias-act: bias of {} for shape {dims:?}", bias.len());
        }
        let relu6 = self.act == Activation::Relu6;
        // Rows of `c` channels, a few thousand values per task.
        let rows = (4096 / c).max(1);
        y.par_chunks_mut(rows * c).for_each(|chunk| {
            for row in chunk.chunks_exact_mut(c) {
                add_bias_row(row, bias, relu6);
            }
        });
        Ok(())
    }
}

#[multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx+avx2+fma", "aarch64+neon"))]
fn add_bias_row(row: &mut [f32], bias: &[f32], relu6: bool) {
    if relu6 {
        row.iter_mut().zip(bias).for_each(|(v, &b)| *v = (*v + b).clamp(0.0, 6.0));
    } else {
        row.iter_mut().zip(bias).for_each(|(v, &b)| *v += b);
    }
}

/// Depthwise 2-D convolution with TF "same" padding on channels-last data: `x` `(n, h, w, c)`,
/// `weight` `(k, k, c)`. On the CPU a dedicated kernel; elsewhere a sum of shifted slices
/// (candle's grouped conv2d loops over every channel and is very slow).
#[cfg(test)]
pub fn depthwise_conv2d_nhwc(
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

/// Checks shapes; returns `(n, h, w, c, k)`.
fn depthwise_dims(
    x: &[usize],
    w: &[usize],
    stride: usize,
) -> candle_core::Result<(usize, usize, usize, usize, usize)> {
    match (x, w) {
        ([n, h, wd, c], [k, k2, wc]) if k == k2 && c == wc && *k > 0 && stride > 0 => {
            Ok((*n, *h, *wd, *c, *k))
        }
        _ => candle_core::bail!("depthwise: input {x:?} and weight {w:?} (stride {stride}) do not match"),
    }
}

/// Device-independent depthwise convolution: for each kernel tap, a strided window of the padded
/// input times that tap's channel weights, summed.
pub fn depthwise_conv2d_nhwc_shifted(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let (n, h, w, c, k) = depthwise_dims(x.dims(), weight.dims(), stride)?;
    let (oh, top, _) = same_padding(h, k, stride);
    let (ow, left, _) = same_padding(w, k, stride);
    // Pad so that every tap can take `o * stride` rows/columns starting at its offset.
    let ph = (k - 1) + oh * stride;
    let pw = (k - 1) + ow * stride;
    let x = x.pad_with_zeros(1, top, ph - h - top)?.pad_with_zeros(2, left, pw - w - left)?;
    let mut acc: Option<Tensor> = None;
    for ky in 0..k {
        let rows = x.narrow(1, ky, oh * stride)?;
        let rows = if stride == 1 {
            rows
        } else {
            rows.reshape((n, oh, stride, pw, c))?.narrow(2, 0, 1)?.squeeze(2)?
        };
        for kx in 0..k {
            let win = rows.narrow(2, kx, ow * stride)?;
            let win = if stride == 1 {
                win
            } else {
                win.reshape((n, oh, ow, stride, c))?.narrow(3, 0, 1)?.squeeze(3)?
            };
            let tap = weight.narrow(0, ky, 1)?.narrow(1, kx, 1)?.reshape((1, 1, 1, c))?;
            let term = win.broadcast_mul(&tap)?;
            acc = Some(match acc {
                Some(a) => (a + term)?,
                None => term,
            });
        }
    }
    match acc {
        Some(a) => Ok(a),
        None => candle_core::bail!("depthwise: empty kernel"),
    }
}

/// The CPU depthwise kernel (see [`depthwise_conv2d_nhwc`]); inputs `x`, weight, bias `(c,)`,
/// with ReLU6 applied when `relu6`.
struct DepthwiseOp {
    stride: usize,
    relu6: bool,
}

/// Sizes of one depthwise convolution.
#[derive(Debug, Clone, Copy)]
pub(super) struct Geometry {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub k: usize,
    pub stride: usize,
    pub top: usize,
    pub left: usize,
    pub relu6: bool,
}

impl CustomOp3 for DepthwiseOp {
    fn name(&self) -> &'static str {
        "depthwise-conv2d-nhwc-same"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, h, w, c, k) = depthwise_dims(l1.dims(), l2.dims(), self.stride)?;
        let (Some((x0, x1)), Some((w0, w1)), Some((b0, b1))) =
            (l1.contiguous_offsets(), l2.contiguous_offsets(), l3.contiguous_offsets())
        else {
            candle_core::bail!("depthwise: inputs must be contiguous");
        };
        let x = &s1.as_slice::<f32>()?[x0..x1];
        let wt = &s2.as_slice::<f32>()?[w0..w1];
        let bias = &s3.as_slice::<f32>()?[b0..b1];
        if bias.len() != c {
            candle_core::bail!("depthwise: bias of {} for {c} channels", bias.len());
        }
        let (oh, top, _) = same_padding(h, k, self.stride);
        let (ow, left, _) = same_padding(w, k, self.stride);
        let g = Geometry { h, w, c, k, stride: self.stride, top, left, relu6: self.relu6 };
        let mut out = vec![0f32; n * oh * ow * c];
        if !out.is_empty() {
            // One task per output row.
            out.par_chunks_mut(ow * c).enumerate().for_each(|(row, dst)| {
                let (image, oy) = (row / oh, row % oh);
                let src = &x[image * h * w * c..(image + 1) * h * w * c];
                depthwise_row(src, wt, bias, dst, oy, g);
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, oh, ow, c))))
    }
}

/// Channels accumulated together in registers by the depthwise kernel.
const DEPTHWISE_LANES: usize = 64;

/// Output row `oy` of one image: `dst[ox][ch] = act(bias[ch] + sum_{ky,kx} wt[ky][kx][ch] *
/// src[oy*s+ky-top][ox*s+kx-left][ch])`, zero outside the source. Each output pixel is
/// accumulated in registers over all taps, [`DEPTHWISE_LANES`] channels at a time.
#[multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx+avx2+fma", "aarch64+neon"))]
pub(super) fn depthwise_row(src: &[f32], wt: &[f32], bias: &[f32], dst: &mut [f32], oy: usize, g: Geometry) {
    if target_cfg_f!(target_feature = "fma") {
        depthwise_row_body::<true>(src, wt, bias, dst, oy, g)
    } else {
        depthwise_row_body::<false>(src, wt, bias, dst, oy, g)
    }
}

#[inline(always)]
fn depthwise_row_body<const FMA: bool>(
    src: &[f32],
    wt: &[f32],
    bias: &[f32],
    dst: &mut [f32],
    oy: usize,
    g: Geometry,
) {
    let c = g.c;
    let ky_range = tap_range(oy, g.stride, g.top, g.h, g.k);
    for (ox, out) in dst.chunks_exact_mut(c).enumerate() {
        let kx_range = tap_range(ox, g.stride, g.left, g.w, g.k);
        let taps = Taps { ky: ky_range.clone(), kx: kx_range, oy, ox, g };
        let mut c0 = 0;
        while c0 + DEPTHWISE_LANES <= c {
            depthwise_pixel::<DEPTHWISE_LANES, FMA>(src, wt, bias, out, c0, &taps);
            c0 += DEPTHWISE_LANES;
        }
        while c0 + 16 <= c {
            depthwise_pixel::<16, FMA>(src, wt, bias, out, c0, &taps);
            c0 += 16;
        }
        while c0 < c {
            depthwise_pixel::<1, FMA>(src, wt, bias, out, c0, &taps);
            c0 += 1;
        }
    }
}

/// The taps of one output pixel that fall inside the source.
struct Taps {
    ky: std::ops::Range<usize>,
    kx: std::ops::Range<usize>,
    oy: usize,
    ox: usize,
    g: Geometry,
}

/// Channels `c0..c0 + W` of one output pixel.
#[inline(always)]
fn depthwise_pixel<const W: usize, const FMA: bool>(
    src: &[f32],
    wt: &[f32],
    bias: &[f32],
    out: &mut [f32],
    c0: usize,
    t: &Taps,
) {
    let g = t.g;
    let c = g.c;
    let mut acc = [0f32; W];
    acc.copy_from_slice(&bias[c0..c0 + W]);
    for ky in t.ky.clone() {
        let iy = t.oy * g.stride + ky - g.top;
        for kx in t.kx.clone() {
            let ix = t.ox * g.stride + kx - g.left;
            let pixel = &src[(iy * g.w + ix) * c + c0..][..W];
            let taps = &wt[(ky * g.k + kx) * c + c0..][..W];
            for ((a, &v), &w) in acc.iter_mut().zip(pixel).zip(taps) {
                *a = if FMA { v.mul_add(w, *a) } else { *a + v * w };
            }
        }
    }
    if g.relu6 {
        for a in &mut acc {
            *a = a.clamp(0.0, 6.0);
        }
    }
    out[c0..c0 + W].copy_from_slice(&acc);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
    #[test]
    fn fused_blocks_match_the_unfused_path() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/efficientnet-lite0/model.safetensors");
        let net =
            LiteNet::from_tensors(candle_core::safetensors::load(&path, &Device::Cpu).unwrap()).unwrap();
        // The band plan depends on the thread count: fix it so the same blocks fuse anywhere.
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let fused = pool.install(|| check_blocks(&net));
        assert!(fused >= 16, "only {fused} block runs were fused");
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
}

#[cfg(test)]
mod profile {
    //! Per-layer timings; run with
    //! `cargo test --release --lib encoder::lite::profile -- --ignored --nocapture`.
    use super::*;
    use candle_core::Device;
    use std::time::Instant;

    const K: Kernels = Kernels::Cpu;

    #[test]
    #[ignore = "timing printout, not a test"]
    fn profile_forward() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models/efficientnet-lite0/model.safetensors");
        let net =
            LiteNet::from_tensors(candle_core::safetensors::load(&path, &Device::Cpu).unwrap()).unwrap();
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
                println!("block {i}: in {:?} k {} s {} depthwise {:.3} ms", y.dims(), b.depthwise.weight.dims()[0], b.depthwise.stride, dt * 1e3);
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
                    ms(start.elapsed().as_secs_f64()), ms(t[0]), ms(t[1]), ms(t[2]), ms(t[3]), ms(t[4])
                );
            }
        });
    }
}
