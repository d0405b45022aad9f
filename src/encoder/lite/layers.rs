//! The network's layers (stem, 1x1 convolution, depthwise convolution, inverted-residual
//! block), built from folded weights, and each layer's forward pass: this crate's CPU kernels
//! under [`Kernels::Cpu`], its CUDA kernels (and cuBLAS for the 1x1 products) under
//! [`Kernels::Cuda`], plain candle ops under [`Kernels::Generic`].

use std::sync::Arc;

use candle_core::Tensor;

use super::candle_path::{bias_act_candle, dense_conv2d_candle, depthwise_conv2d_nhwc_shifted};
use super::ops::{BiasAct, BiasResidualAct, DenseConvOp, DepthwiseOp, FusedBlockOp, PointwiseOp};
use super::weights::Folded;
use super::{Activation, Kernels};
use crate::encoder::fused::CpuBlock;
use crate::encoder::pointwise::{PackedWeights, PointwiseLayer};

/// The stem: a dense kxk convolution on the NCHW image, ending in NHWC.
#[derive(Debug, Clone)]
pub(super) struct DenseConv {
    /// `(out, in, k, k)`, for candle's conv2d off the CPU.
    pub(super) weight: Tensor,
    /// `(k, k, in, out)`, contiguous, for the CPU kernel.
    pub(super) weight_kkio: Tensor,
    pub(super) bias: Tensor,
    pub(super) stride: usize,
    /// `weight_kkio` and `bias` in host memory, for the CPU pass over buffers (present when
    /// loaded on the CPU).
    pub(super) cpu: Option<(Vec<f32>, Vec<f32>)>,
}

/// 1x1 convolution on NHWC activations, run as one matrix product `(n*h*w, in) x (in, out)`.
#[derive(Debug, Clone)]
pub(super) struct Pointwise {
    /// `(in, out)`, contiguous.
    pub(super) weight_t: Tensor,
    pub(super) bias: Tensor,
    /// The same weights packed for the CPU kernel (present when loaded on the CPU).
    pub(super) cpu: Option<Arc<PointwiseLayer>>,
}

/// Depthwise convolution on NHWC activations.
#[derive(Debug, Clone)]
pub(super) struct Depthwise {
    /// `(k, k, c)`, contiguous: one row of channel weights per tap.
    pub(super) weight: Tensor,
    pub(super) bias: Tensor,
    pub(super) stride: usize,
}

/// One inverted-residual block: optional 1x1 expand, depthwise, 1x1 project, and the input
/// added back when `residual`.
#[derive(Debug, Clone)]
pub(super) struct Block {
    pub(super) expand: Option<Pointwise>,
    pub(super) depthwise: Depthwise,
    pub(super) project: Pointwise,
    pub(super) residual: bool,
    /// The whole block for the fused CPU kernel (present when loaded on the CPU).
    pub(super) cpu: Option<Arc<CpuBlock>>,
}

/// A folded 1x1 convolution `(out, in, 1, 1)` as the matrix `(in, out)`.
pub(super) fn pointwise(f: Folded) -> candle_core::Result<Pointwise> {
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

impl DenseConv {
    pub(super) fn new(f: Folded, stride: usize) -> candle_core::Result<Self> {
        let weight_kkio = f.weight.permute((2, 3, 1, 0))?.contiguous()?;
        let cpu = if weight_kkio.device().is_cpu() {
            Some((weight_kkio.flatten_all()?.to_vec1()?, f.bias.to_vec1()?))
        } else {
            None
        };
        Ok(Self { weight: f.weight, weight_kkio, bias: f.bias, stride, cpu })
    }

    /// `(n, in, h, w)` -> `(n, oh, ow, out)` with bias and ReLU6.
    pub(super) fn forward(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        if kernels.own() {
            let op = DenseConvOp { stride: self.stride };
            x.contiguous()?.apply_op3_no_bwd(&self.weight_kkio, &self.bias, &op)
        } else {
            let y = dense_conv2d_candle(x, &self.weight, self.stride)?;
            bias_act_candle(&y, &self.bias, Activation::Relu6)
        }
    }
}

impl Depthwise {
    /// From a folded `(c, 1, k, k)` weight.
    pub(super) fn new(f: Folded, stride: usize) -> candle_core::Result<Self> {
        Ok(Self { weight: f.weight.squeeze(1)?.permute((1, 2, 0))?.contiguous()?, bias: f.bias, stride })
    }

    /// Convolution, bias and ReLU6; on the CPU in one pass over the output.
    pub(super) fn forward(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        if kernels.own() {
            let op = DepthwiseOp { stride: self.stride, relu6: true };
            x.contiguous()?.apply_op3_no_bwd(&self.weight, &self.bias, &op)
        } else {
            let y = depthwise_conv2d_nhwc_shifted(x, &self.weight, self.stride)?;
            bias_act_candle(&y, &self.bias, Activation::Relu6)
        }
    }
}

impl Pointwise {
    /// `(n, h, w, in)` -> `(n, h, w, out)`, bias and `act` applied.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        act: Activation,
        kernels: Kernels,
    ) -> candle_core::Result<Tensor> {
        self.forward_add(x, None, act, kernels)
    }

    /// [`forward`](Self::forward) with `residual` (shaped like the output) added before `act`.
    pub(super) fn forward_add(
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
        if let (Kernels::Cuda, Some(r)) = (kernels, residual) {
            y.inplace_op3(&self.bias, &r.contiguous()?, &BiasResidualAct { act })?;
            return Ok(y);
        }
        match residual {
            Some(r) => bias_act((y + r)?, &self.bias, act, kernels),
            None => bias_act(y, &self.bias, act, kernels),
        }
    }
}

impl Block {
    /// The fused CPU form, when every part was loaded on the CPU.
    pub(super) fn cpu_block(&self) -> candle_core::Result<Option<Arc<CpuBlock>>> {
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
        Ok(Some(Arc::new(CpuBlock::new(
            expand,
            self.depthwise.weight.flatten_all()?.to_vec1()?,
            self.depthwise.bias.to_vec1()?,
            k,
            self.depthwise.stride,
            project.clone(),
            self.residual,
        ))))
    }

    pub(super) fn forward(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        if let (Kernels::Cpu, Some(cpu)) = (kernels, &self.cpu) {
            let (n, h, w, _) = x.dims4()?;
            if let Some(plan) = cpu.plan(n, h, w) {
                return x.contiguous()?.apply_op1_no_bwd(&FusedBlockOp { block: cpu.clone(), plan });
            }
        }
        self.forward_unfused(x, kernels)
    }

    /// Expand, depthwise and project as three separate operations (any device).
    pub(super) fn forward_unfused(&self, x: &Tensor, kernels: Kernels) -> candle_core::Result<Tensor> {
        let y = match &self.expand {
            Some(e) => e.forward(x, Activation::Relu6, kernels)?,
            None => x.clone(),
        };
        let y = self.depthwise.forward(&y, kernels)?;
        let residual = if self.residual { Some(x) } else { None };
        self.project.forward_add(&y, residual, Activation::None, kernels)
    }
}

/// `y + bias` per channel, then `act`; `y` is channels-last `(..., c)`, `bias` `(c,)`. The CPU
/// and CUDA kernels are one pass in place over the freshly computed `y`.
pub(super) fn bias_act(
    y: Tensor,
    bias: &Tensor,
    act: Activation,
    kernels: Kernels,
) -> candle_core::Result<Tensor> {
    if kernels.own() {
        let y = y.contiguous()?;
        y.inplace_op2(&bias.contiguous()?, &BiasAct { act })?;
        Ok(y)
    } else {
        bias_act_candle(&y, bias, act)
    }
}
