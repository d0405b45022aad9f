//! The EfficientNet-Lite network in Candle: the [`LiteNet`] type and its forward pass to feature
//! maps, pooled features and classifier logits, and the choice of [`Kernels`].
//!
//! Lite differs from EfficientNet B0-B7: ReLU6 instead of swish, no squeeze-excite, and a fixed
//! stem (32) and head (1280). Blocks come in seven stages; the first block of a stage changes
//! the channel count and carries the stage's stride, the others are residual.
//!
//! Activations are channels-last (NHWC) after the stem. The parts:
//! - [`weights`]: safetensors tensors -> a checked network, batch norm folded into the convolutions;
//! - [`layers`]: the stem, 1x1, depthwise and block layers, and which path each forward takes;
//! - [`ops`] and [`kernels`]: on the CPU, kernels of this crate do the work (candle's grouped
//!   conv2d loops over every channel): `ops` hands tensors to the stem, depthwise and bias
//!   kernels of `kernels`, to the 1x1 convolutions of [`super::pointwise`] (packed weights,
//!   bias, residual and ReLU6 fused into the store) and to whole blocks fused band by band in
//!   [`super::fused`] where that pays;
//! - `cuda` (the `cuda` feature): on a GPU ([`Kernels::Cuda`]) the same custom ops launch the
//!   kernels of `kernels.cu` (compiled to PTX by build.rs); the 1x1 products are cuBLAS's;
//! - [`candle_path`]: [`Kernels::Generic`], the same maths as plain candle ops on any device;
//!   tests check the paths agree.

mod candle_path;
#[cfg(feature = "cuda")]
mod cuda;
pub(super) mod kernels;
mod layers;
mod ops;
mod pass;
mod weights;

use candle_core::Tensor;
use rayon::prelude::*;

use super::manifest::Pooling;
use layers::{Block, DenseConv, Pointwise};
pub use weights::WeightsError;

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

impl LiteNet {
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
    ///
    /// On the CPU, called from outside a rayon pool, the whole pass runs on a thread of the
    /// global pool (from inside one, on that pool): every layer's parallel loop then starts
    /// from inside the pool, where the other threads are still awake from the layer before,
    /// instead of being sent into the pool from outside and waited for, which woke a thread
    /// and put the caller to sleep at every layer (`profile::network`, batch 1, six
    /// alternating pairs on 2 threads: 121-133 -> 130-150 images/s; one thread 77 -> 87).
    ///
    /// The pool's other threads are kept looking for work for the length of the pass
    /// ([`keep_awake`]). With the weights in host memory the pass runs over recycled buffers
    /// (`feature_map_cpu`, [`pass`]), else as candle ops.
    pub fn feature_map(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.kernels == Kernels::Cpu {
            // In the current pool, or the global one from outside any.
            return rayon::scope(|scope| keep_awake(scope, || self.feature_map_in_pool(x)));
        }
        self.feature_map_in_pool(x)
    }

    /// [`feature_map`](Self::feature_map) on the current thread.
    fn feature_map_in_pool(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.kernels == Kernels::Cpu && self.runs_on_buffers() {
            return self.feature_map_cpu(x);
        }
        self.feature_map_ops(x)
    }

    /// [`feature_map`](Self::feature_map) as one candle op per layer, on the current thread.
    fn feature_map_ops(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let kernels = self.kernels;
        let (mut x, first_batched) = if kernels == Kernels::Cpu && x.dim(0)? > 1 {
            self.early_layers_per_image(x)?
        } else {
            (self.stem.forward(x, kernels)?, 0)
        };
        for block in &self.blocks[first_batched..] {
            x = block.forward(&x, kernels)?;
        }
        self.head.forward(&x, Activation::Relu6, kernels)
    }

    /// The stem and the blocks whose input map is at least [`PER_IMAGE_BYTES`] per image, run
    /// one image at a time (on the CPU, for batches): each image's large early activations
    /// then stay in cache from one layer to the next, where a whole batch of them (51 MB out
    /// of the stem at batch 32) goes through memory. The images are spread over the threads
    /// (each layer's own parallel split then mostly stays on the thread that took the image):
    /// every core works through its own image with no wait between layers, where splitting
    /// each image's layers across the cores made them meet at every layer (batch 32 on 2
    /// threads: 156-157 -> 173-175 images/s). Returns the batch's activations after those
    /// blocks and the index of the first block left to run.
    fn early_layers_per_image(&self, x: &Tensor) -> candle_core::Result<(Tensor, usize)> {
        let outputs = (0..x.dim(0)?)
            .into_par_iter()
            .map(|image| {
                let mut y = self.stem.forward(&x.narrow(0, image, 1)?, self.kernels)?;
                let mut b = 0;
                while b < self.blocks.len() && runs_per_image(y.elem_count()) {
                    y = self.blocks[b].forward(&y, self.kernels)?;
                    b += 1;
                }
                Ok((y, b))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let first_batched = outputs.first().map_or(0, |o| o.1);
        let outputs: Vec<Tensor> = outputs.into_iter().map(|o| o.0).collect();
        Ok((Tensor::cat(&outputs, 0)?, first_batched))
    }

    /// `(n, 3, s, s)` normalised images (NCHW) -> `(n, features)` globally average-pooled
    /// features (what the classifier takes).
    pub fn pooled_features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.pool(&self.feature_map(x)?, Pooling::Average)
    }

    /// Whether [`pooled_cpu`](Self::pooled_cpu) runs: the own CPU kernels, every layer's
    /// weights on the CPU. It pools straight from the CPU pass's buffers, images read where
    /// they are: the values of [`pool`](Self::pool) of [`feature_map`](Self::feature_map),
    /// without a batch tensor assembled or the feature map copied out.
    pub fn pools_on_buffers(&self) -> bool {
        self.kernels == Kernels::Cpu && self.runs_on_buffers()
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

/// Runs `f` on this pool thread while every other thread of the pool runs a keeper job that
/// takes the pool's pending work (`rayon::yield_now`) and, finding none, yields the CPU
/// (`sched_yield`) and looks again, until `f` returns.
///
/// Why: an idle rayon thread looks for work for about 32 rounds of `sched_yield`, then sleeps.
/// A batch-1 pass has dozens of parallel steps, each a fraction of a millisecond, and between
/// them the other thread often went to sleep: the next step then waited for a futex wake-up
/// (an inter-processor interrupt, slow in a virtual machine) or ran on one thread (`perf stat`
/// on one 7x7 block on 2 threads: 97 `sched_yield` and 2.5 context switches per pass). A
/// keeper never sleeps, and still yields the CPU to any other runnable thread.
///
/// A keeper that starts on a thread in the middle of a pass (`f`'s own thread, which took it
/// from its queue while waiting for a join, or a thread running another request's pass)
/// returns at once: it would otherwise hold that pass up until this one ends. Keepers stop
/// when `f` returns or unwinds.
fn keep_awake<'scope, R>(scope: &rayon::Scope<'scope>, f: impl FnOnce() -> R) -> R {
    use std::cell::Cell;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    thread_local! {
        /// Passes under way on this thread (nested when a pass waiting for a join takes
        /// another request's work).
        static PASSES: Cell<usize> = const { Cell::new(0) };
    }

    /// Ends the pass when dropped, also if `f` unwinds: stops its keepers.
    struct Pass(Arc<AtomicBool>);
    impl Drop for Pass {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Release);
            PASSES.set(PASSES.get() - 1);
        }
    }

    PASSES.set(PASSES.get() + 1);
    let pass = Pass(Arc::new(AtomicBool::new(false)));
    for _ in 1..rayon::current_num_threads() {
        let done = pass.0.clone();
        scope.spawn(move |_| {
            while PASSES.get() == 0 && !done.load(Ordering::Acquire) {
                if rayon::yield_now() != Some(rayon::Yield::Executed) {
                    std::thread::yield_now();
                }
            }
        });
    }
    let result = f();
    drop(pass);
    result
}

/// Early activations at least this large per image are computed image by image (see
/// `early_layers_per_image`).
const PER_IMAGE_BYTES: usize = 256 * 1024;

/// Whether a block whose input holds `values` f32 values per image runs image by image.
fn runs_per_image(values: usize) -> bool {
    values * 4 >= PER_IMAGE_BYTES
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
    /// This module's CUDA kernels, with cuBLAS for the 1x1 convolutions (tensors must be on a
    /// CUDA device of a `cuda` build).
    Cuda,
    /// Plain candle operations, for any device.
    Generic,
}

impl Kernels {
    /// The fastest kernels for `device`.
    pub fn for_device(device: &candle_core::Device) -> Self {
        if device.is_cpu() {
            Self::Cpu
        } else if cfg!(feature = "cuda") && device.is_cuda() {
            Self::Cuda
        } else {
            Self::Generic
        }
    }

    /// Whether the stem, depthwise and bias operations run this crate's own kernels (the
    /// custom ops of [`ops`], which pick the CPU or CUDA code by the tensors' device).
    fn own(self) -> bool {
        matches!(self, Self::Cpu | Self::Cuda)
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod profile;
