//! Candle custom ops that hand CPU tensors to this crate's kernels: each checks the shapes and
//! layouts, takes the f32 slices and runs the kernel (the convolutions one parallel task per
//! output row).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, InplaceOp2, InplaceOp3, Layout, Shape};
use rayon::prelude::*;

use super::Activation;
use super::kernels::{
    BLOCK, DenseGeometry, Geometry, add_bias_row, blocked_pays, dense_row, depthwise_dims, depthwise_row,
    same_padding, to_blocked, to_blocked_plane,
};
use crate::encoder::fused::{CpuBlock, Nhwc, Plan};
use crate::encoder::pointwise::{self, Epilogue, PointwiseLayer};

/// The CPU stem kernel: NCHW input `(n, in, h, w)`, weight `(k, k, in, out)`, bias `(out,)`,
/// TF-"same" padding, NHWC output `(n, oh, ow, out)` with bias and ReLU6 applied.
pub(super) struct DenseConvOp {
    pub(super) stride: usize,
}

impl DenseConvOp {
    /// Checks the input `(n, in, h, w)`, weight `(k, k, in, out)` and bias `(out,)` shapes:
    /// the batch size, the geometry and the output side lengths.
    pub(super) fn geometry(
        &self,
        x: &[usize],
        wt: &[usize],
        bias: &[usize],
    ) -> candle_core::Result<(usize, DenseGeometry, usize, usize)> {
        let (n, cin, h, w, k, cout) = match (x, wt) {
            ([n, cin, h, w], [k, k2, wcin, cout]) if k == k2 && cin == wcin && *k > 0 && self.stride > 0 => {
                (*n, *cin, *h, *w, *k, *cout)
            }
            (x, wt) => candle_core::bail!("dense conv: input {x:?} and weight {wt:?} do not match"),
        };
        if bias != [cout] {
            candle_core::bail!("dense conv: bias {bias:?} for {cout} channels");
        }
        let (oh, top, _) = same_padding(h, k, self.stride);
        let (ow, left, _) = same_padding(w, k, self.stride);
        Ok((n, DenseGeometry { cin, h, w, k, cout, stride: self.stride, top, left }, oh, ow))
    }
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
        let (n, g, oh, ow) = self.geometry(l1.dims(), l2.dims(), l3.dims())?;
        let (Some((x0, x1)), Some((w0, w1)), Some((b0, b1))) =
            (l1.contiguous_offsets(), l2.contiguous_offsets(), l3.contiguous_offsets())
        else {
            candle_core::bail!("dense conv: inputs must be contiguous");
        };
        let x = &s1.as_slice::<f32>()?[x0..x1];
        let wt = &s2.as_slice::<f32>()?[w0..w1];
        let bias = &s3.as_slice::<f32>()?[b0..b1];
        let mut out = crate::encoder::zeroed(n * oh * ow * g.cout);
        stem_to(x, wt, bias, g, (oh, ow), &mut out);
        Ok((CpuStorage::F32(out), Shape::from((n, oh, ow, g.cout))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, g, oh, ow) = self.geometry(l1.dims(), l2.dims(), l3.dims())?;
        super::cuda::stem([(s1, l1), (s2, l2), (s3, l3)], n, g, (oh, ow))
    }
}

/// The CPU stem on NCHW images `x` (checked by [`DenseConvOp::geometry`]), into `out`, NHWC
/// `(n, oh, ow, g.cout)`, every value of which it writes: one task per output row.
pub(super) fn stem_to(
    x: &[f32],
    wt: &[f32],
    bias: &[f32],
    g: DenseGeometry,
    (oh, ow): (usize, usize),
    out: &mut [f32],
) {
    stem_into(x, wt, bias, g, (oh, ow), StemOut::ChannelsLast(out))
}

/// Where [`stem_into`] writes.
pub(super) enum StemOut<'a> {
    /// NHWC, `(n, oh, ow, g.cout)`.
    ChannelsLast(&'a mut [f32]),
    /// One image in the blocked layout (`g.cout / BLOCK` planes of `(oh, ow, BLOCK)`, see
    /// [`to_blocked`]) that the first block's bands read without a repack
    /// ([`CpuBlock::blocked_band`]).
    Blocked(&'a mut [f32]),
}

/// [`stem_to`], into either layout. Blocked: each task computes its row channels-last into a
/// per-thread row (in L1) and copies it into the planes; the same values, placed apart.
pub(super) fn stem_into(
    x: &[f32],
    wt: &[f32],
    bias: &[f32],
    g: DenseGeometry,
    (oh, ow): (usize, usize),
    out: StemOut<'_>,
) {
    thread_local! {
        static ROW: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let out = match out {
        StemOut::ChannelsLast(out) => out,
        StemOut::Blocked(out) => {
            debug_assert!(g.cout.is_multiple_of(BLOCK) && out.len() == oh * ow * g.cout);
            // Row `oy`'s part of every plane: disjoint slices, one list per task.
            let mut rows: Vec<Vec<&mut [f32]>> =
                (0..oh).map(|_| Vec::with_capacity(g.cout / BLOCK)).collect();
            for plane in out.chunks_exact_mut(oh * ow * BLOCK) {
                for (parts, part) in rows.iter_mut().zip(plane.chunks_exact_mut(ow * BLOCK)) {
                    parts.push(part);
                }
            }
            rows.into_par_iter().enumerate().for_each(|(oy, parts)| {
                crate::background::yield_point();
                ROW.with_borrow_mut(|row| {
                    let row = pointwise::scratch(row, ow * g.cout);
                    dense_row(x, wt, bias, row, oy, g);
                    for (cb, part) in parts.into_iter().enumerate() {
                        to_blocked_plane(row, g.cout, cb, part);
                    }
                });
            });
            return;
        }
    };
    if out.is_empty() {
        return;
    }
    out.par_chunks_mut(ow * g.cout).enumerate().for_each(|(row, dst)| {
        crate::background::yield_point();
        let (image, oy) = (row / oh, row % oh);
        let plane = g.cin * g.h * g.w;
        dense_row(&x[image * plane..(image + 1) * plane], wt, bias, dst, oy, g);
    });
}

/// The CPU 1x1 convolution (see [`crate::encoder::pointwise`]): input `(..., in)` contiguous, output
/// `(rows, out)`; as a two-input op the second input is the residual.
pub(super) struct PointwiseOp {
    pub(super) cpu: Arc<PointwiseLayer>,
    pub(super) relu6: bool,
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
        let y = pointwise::matmul(x, &self.cpu.weights, epilogue);
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

/// The fused CPU block (see [`crate::encoder::fused`]) on NHWC `(n, h, w, in)`.
pub(super) struct FusedBlockOp {
    pub(super) block: Arc<CpuBlock>,
    /// How it runs, from [`CpuBlock::plan`].
    pub(super) plan: Plan,
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
        let input = Nhwc { data: &s.as_slice::<f32>()?[x0..x1], n, h, w, c };
        let (y, oh, ow, cout) = self.block.run(self.plan, input)?;
        Ok((CpuStorage::F32(y), Shape::from((n, oh, ow, cout))))
    }
}

/// The CPU half of [`bias_act`](super::layers::bias_act).
pub(super) struct BiasAct {
    pub(super) act: Activation,
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
            crate::background::yield_point();
            for row in chunk.chunks_exact_mut(c) {
                add_bias_row(row, bias, relu6);
            }
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        super::cuda::bias_act((s1, l1), (s2, l2), None, self.act == Activation::Relu6)
    }
}

/// `y = act(y + bias + residual)` in place, for 1x1 convolutions that end a residual block (the
/// GPU path; the CPU fuses this into its matrix product).
pub(super) struct BiasResidualAct {
    pub(super) act: Activation,
}

impl InplaceOp3 for BiasResidualAct {
    fn name(&self) -> &'static str {
        "bias-residual-act"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((y0, y1)), Some((b0, b1)), Some((r0, r1))) =
            (l1.contiguous_offsets(), l2.contiguous_offsets(), l3.contiguous_offsets())
        else {
            candle_core::bail!("bias-residual-act: operands must be contiguous");
        };
        let bias = &s2.as_slice::<f32>()?[b0..b1];
        let residual = &s3.as_slice::<f32>()?[r0..r1];
        let CpuStorage::F32(y) = s1 else {
            candle_core::bail!("bias-residual-act: expected f32 data");
        };
        let y = &mut y[y0..y1];
        let c = bias.len();
        if c == 0 || l1.dims().last() != Some(&c) || residual.len() != y.len() {
            candle_core::bail!(
                "bias-residual-act: bias {c} and residual {} for {:?}",
                residual.len(),
                l1.dims()
            );
        }
        let relu6 = self.act == Activation::Relu6;
        for (row, res) in y.chunks_exact_mut(c).zip(residual.chunks_exact(c)) {
            row.iter_mut().zip(res).for_each(|(v, &r)| *v += r);
            add_bias_row(row, bias, relu6);
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        super::cuda::bias_act((s1, l1), (s2, l2), Some((s3, l3)), self.act == Activation::Relu6)
    }
}

/// The CPU depthwise convolution (see [`depthwise_row`]); inputs `x`, weight, bias `(c,)`,
/// with ReLU6 applied when `relu6`.
pub(super) struct DepthwiseOp {
    pub(super) stride: usize,
    pub(super) relu6: bool,
}

/// Sizes of one depthwise convolution, checked against the layouts by [`DepthwiseOp`].
#[derive(Debug, Clone, Copy)]
pub(super) struct DepthwiseSizes {
    pub(super) n: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) c: usize,
    pub(super) k: usize,
    pub(super) stride: usize,
    pub(super) top: usize,
    pub(super) left: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    pub(super) relu6: bool,
}

impl DepthwiseOp {
    /// Checks the input `(n, h, w, c)`, weight `(k, k, c)` and bias `(c,)` layouts.
    fn sizes(&self, x: &Layout, wt: &Layout, bias: &Layout) -> candle_core::Result<DepthwiseSizes> {
        let (n, h, w, c, k) = depthwise_dims(x.dims(), wt.dims(), self.stride)?;
        if bias.dims() != [c] {
            candle_core::bail!("depthwise: bias {:?} for {c} channels", bias.dims());
        }
        let (oh, top, _) = same_padding(h, k, self.stride);
        let (ow, left, _) = same_padding(w, k, self.stride);
        Ok(DepthwiseSizes { n, h, w, c, k, stride: self.stride, top, left, oh, ow, relu6: self.relu6 })
    }
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
        let s = self.sizes(l1, l2, l3)?;
        let (Some((x0, x1)), Some((w0, w1)), Some((b0, b1))) =
            (l1.contiguous_offsets(), l2.contiguous_offsets(), l3.contiguous_offsets())
        else {
            candle_core::bail!("depthwise: inputs must be contiguous");
        };
        let x = &s1.as_slice::<f32>()?[x0..x1];
        let wt = &s2.as_slice::<f32>()?[w0..w1];
        let bias = &s3.as_slice::<f32>()?[b0..b1];
        let DepthwiseSizes { n, h, w, c, k, oh, ow, .. } = s;
        let g = Geometry {
            h,
            w,
            c,
            k,
            stride: s.stride,
            top: s.top,
            left: s.left,
            relu6: s.relu6,
            blocked: false,
        };
        let g = Geometry { blocked: blocked_pays(g), ..g };
        let mut out = crate::encoder::zeroed(n * oh * ow * c);
        if out.is_empty() {
            return Ok((CpuStorage::F32(out), Shape::from((n, oh, ow, c))));
        }
        // The tiled kernel reads input and weights in the blocked layout (see `to_blocked`),
        // repacked one channel block of each image per task (a whole image is too few tasks
        // at batch 1).
        let (mut blocked_x, mut blocked_wt): (Vec<f32>, Vec<f32>);
        let (x, wt) = if g.blocked {
            blocked_wt = vec![0f32; wt.len()];
            to_blocked(wt, c, &mut blocked_wt);
            blocked_x = crate::encoder::zeroed(x.len());
            blocked_x.par_chunks_mut(h * w * BLOCK).enumerate().for_each(|(plane, dst)| {
                let (image, cb) = (plane / (c / BLOCK), plane % (c / BLOCK));
                to_blocked_plane(&x[image * h * w * c..(image + 1) * h * w * c], c, cb, dst);
            });
            (&blocked_x[..], &blocked_wt[..])
        } else {
            (x, wt)
        };
        // One task per output row.
        out.par_chunks_mut(ow * c).enumerate().for_each(|(row, dst)| {
            crate::background::yield_point();
            let (image, oy) = (row / oh, row % oh);
            depthwise_row(&x[image * h * w * c..(image + 1) * h * w * c], wt, bias, dst, oy, g);
        });
        Ok((CpuStorage::F32(out), Shape::from((n, oh, ow, c))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let s = self.sizes(l1, l2, l3)?;
        super::cuda::depthwise([(s1, l1), (s2, l2), (s3, l3)], s)
    }
}
