//! The generic path: the stem, depthwise and bias operations as plain candle ops, for any
//! device (what GPUs run; [`Kernels::Generic`](super::Kernels::Generic) runs it on the CPU).

use candle_core::Tensor;

use super::Activation;
use super::kernels::{depthwise_dims, same_padding};

/// TF-"same" dense convolution with candle's conv2d: NCHW `x`, `(out, in, k, k)` weight, NHWC
/// result.
pub(super) fn dense_conv2d_candle(x: &Tensor, weight: &Tensor, stride: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let k = weight.dim(2)?;
    let (_, top, bottom) = same_padding(h, k, stride);
    let (_, left, right) = same_padding(w, k, stride);
    let x = x.pad_with_zeros(2, top, bottom)?.pad_with_zeros(3, left, right)?;
    x.conv2d(weight, 0, stride, 1, 1)?.permute((0, 2, 3, 1))?.contiguous()
}

/// Device-independent depthwise convolution: for each kernel tap, a strided window of the padded
/// input times that tap's channel weights, summed.
pub(super) fn depthwise_conv2d_nhwc_shifted(
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

/// [`bias_act`](super::layers::bias_act) with candle's broadcasting ops (any device).
pub(super) fn bias_act_candle(y: &Tensor, bias: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    let y = y.broadcast_add(bias)?;
    match act {
        Activation::None => Ok(y),
        Activation::Relu6 => y.clamp(0f32, 6f32),
    }
}
