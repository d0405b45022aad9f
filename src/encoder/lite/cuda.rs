//! Launches this crate's CUDA kernels (`kernels.cu`, compiled to PTX by build.rs under the
//! `cuda` feature) for [`Kernels::Cuda`](super::Kernels::Cuda): the stem and depthwise
//! convolutions and the 1x1 convolutions' bias/residual/ReLU6 epilogue, each one pass over its
//! output (the generic candle path takes k*k passes for a depthwise layer).
//!
//! Kernel launches are foreign calls, so this module holds the crate's only `unsafe` outside
//! the mmap reader; each block says why it is sound.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage, WrapErr};
use candle_core::{Layout, Result, Shape};

use super::kernels::DenseGeometry;
use super::ops::DepthwiseSizes;

/// The kernels as PTX; the driver compiles it for the GPU at first use (once per process).
const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/encoder_kernels.ptx"));
/// The name candle caches the loaded module under.
const MODULE: &str = "vitrine-encoder-kernels";
/// Threads per block; every kernel is a grid-stride loop over its outputs.
const THREADS: u32 = 256;

fn launch_config(total: usize) -> LaunchConfig {
    let blocks = total.div_ceil(THREADS as usize).clamp(1, 1 << 20) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// The contiguous f32 values of `s` that `l` describes.
fn view<'a>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<CudaView<'a, f32>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{what} must be contiguous");
    };
    Ok(s.as_cuda_slice::<f32>()?.slice(start..end))
}

/// Sizes as the kernels' `int` parameters.
fn ints<const N: usize>(values: [usize; N]) -> Result<[i32; N]> {
    let mut out = [0i32; N];
    for (o, v) in out.iter_mut().zip(values) {
        *o = i32::try_from(v)
            .map_err(|_| candle_core::Error::Msg(format!("size {v} too large for a kernel")))?;
    }
    Ok(out)
}

/// A fresh device buffer of `len` values, every one of which the caller's kernel writes.
fn output(dev: &CudaDevice, len: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: the memory is uninitialised, and each caller launches a kernel whose grid-stride
    // loop writes every index below `len` before anything reads the buffer (launches on the
    // device's one stream run in order).
    unsafe { dev.alloc::<f32>(len.max(1)) }
}

/// Runs convolution kernel `name` (parameters: input, weight, bias, output, eleven ints) over
/// `(input, weight, bias)` into a fresh output of `shape`.
fn convolution(
    name: &str,
    [(x, xl), (wt, wl), (bias, bl)]: [(&CudaStorage, &Layout); 3],
    args: [usize; 11],
    shape: Shape,
) -> Result<(CudaStorage, Shape)> {
    let dev = &x.device;
    let (x, wt, bias) = (
        view(x, xl, "convolution input")?,
        view(wt, wl, "convolution weight")?,
        view(bias, bl, "convolution bias")?,
    );
    let total = shape.elem_count();
    let mut y = output(dev, total)?;
    let args = ints(args)?;
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&x).arg(&wt).arg(&bias).arg(&mut y);
    for a in &args {
        b.arg(a);
    }
    // SAFETY: both convolution kernels take three input pointers, the output and eleven ints,
    // in that order; the callers pass the sizes their layouts were checked against
    // (`DenseConvOp::geometry`, `DepthwiseOp::sizes`), so the kernel reads only inside the
    // three inputs, and it writes the `total` values of `y` and nothing else.
    unsafe { b.launch(launch_config(total)) }.w()?;
    Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), shape))
}

/// The stem: NCHW `x`, `(k, k, in, out)` weight, bias -> NHWC `(n, oh, ow, out)`, ReLU6 applied.
pub(super) fn stem(
    inputs: [(&CudaStorage, &Layout); 3],
    n: usize,
    g: DenseGeometry,
    (oh, ow): (usize, usize),
) -> Result<(CudaStorage, Shape)> {
    let args = [n, g.cin, g.h, g.w, g.k, g.cout, g.stride, g.top, g.left, oh, ow];
    convolution("vitrine_stem_conv", inputs, args, Shape::from((n, oh, ow, g.cout)))
}

/// Depthwise convolution: NHWC `x`, `(k, k, c)` weight, bias -> NHWC `(n, oh, ow, c)`.
pub(super) fn depthwise(
    inputs: [(&CudaStorage, &Layout); 3],
    s: DepthwiseSizes,
) -> Result<(CudaStorage, Shape)> {
    let args = [s.n, s.h, s.w, s.c, s.k, s.stride, s.top, s.left, s.oh, s.ow, usize::from(s.relu6)];
    convolution("vitrine_depthwise_conv", inputs, args, Shape::from((s.n, s.oh, s.ow, s.c)))
}

/// In place: `y = act(y + bias (+ residual))` over rows of `bias.len()` channels.
pub(super) fn bias_act(
    (y, yl): (&mut CudaStorage, &Layout),
    (bias, bl): (&CudaStorage, &Layout),
    residual: Option<(&CudaStorage, &Layout)>,
    relu6: bool,
) -> Result<()> {
    let dev = y.device.clone();
    let bias = view(bias, bl, "bias")?;
    let c = bias.len();
    let total = yl.shape().elem_count();
    if yl.dims().last() != Some(&c) || c == 0 {
        candle_core::bail!("bias-act: bias of {c} for shape {:?}", yl.dims());
    }
    let Some((start, end)) = yl.contiguous_offsets() else {
        candle_core::bail!("bias-act: output must be contiguous");
    };
    let residual = match residual {
        Some((r, rl)) => {
            let r = view(r, rl, "residual")?;
            if r.len() != total {
                candle_core::bail!("bias-act: residual of {} values for {total}", r.len());
            }
            Some(r)
        }
        None => None,
    };
    if total == 0 {
        return Ok(());
    }
    let mut y = y.as_cuda_slice_mut::<f32>()?.slice_mut(start..end);
    let [c, act] = ints([c, usize::from(relu6)])?;
    let total64 = total as u64;
    let name = if residual.is_some() { "vitrine_bias_residual_act" } else { "vitrine_bias_act" };
    let func = dev.get_or_load_custom_func(name, MODULE, PTX)?;
    let mut b = func.builder();
    b.arg(&mut y).arg(&bias);
    if let Some(r) = &residual {
        b.arg(r);
    }
    b.arg(&total64).arg(&c).arg(&act);
    // SAFETY: the arguments match the kernel's parameters in order and type (the output, the
    // bias, the residual for the residual kernel, a size_t count, two ints); `y` and the
    // residual hold `total` values and the bias `c`, and the kernel reads `bias[i % c]` and
    // element `i < total` of the others only.
    unsafe { b.launch(launch_config(total)) }.w()?;
    Ok(())
}
