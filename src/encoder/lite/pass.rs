//! The forward pass on the CPU over recycled buffers ([`crate::encoder::arena`]): the stem,
//! each block and the head write into buffers the layers before them gave back, so a warm
//! pass allocates and zeroes no activation and goes through no candle op; only the head's
//! output is copied into a tensor. The same kernels, in the same order, as the layers' candle
//! ops ([`super::ops`]): the values are the same.

use candle_core::{CpuStorage, Device, Storage, Tensor};
use rayon::prelude::*;

use super::kernels::BLOCK;
use super::ops::{DenseConvOp, StemOut, stem_into};
use super::{Block, Kernels, LiteNet, runs_per_image};
use crate::encoder::arena::Buffer;
use crate::encoder::fused::Nhwc;
use crate::encoder::pointwise::{Epilogue, matmul_to};

/// NHWC activations `(n, h, w, c)` in a recycled buffer (or, where `blocked_band` is a band
/// height, one image as `c / BLOCK` planes of `(h, w, BLOCK)`: the stem's output for a first
/// block that [reads it](crate::encoder::fused::CpuBlock::blocked_band) in bands of that height).
struct Map {
    buf: Buffer,
    n: usize,
    h: usize,
    w: usize,
    c: usize,
    blocked_band: Option<usize>,
}

impl Map {
    fn new(n: usize, h: usize, w: usize, c: usize) -> Self {
        Self { buf: Buffer::take(n * h * w * c), n, h, w, c, blocked_band: None }
    }
}

impl LiteNet {
    /// Whether every layer has its CPU form (weights loaded on the CPU), so that
    /// [`feature_map_cpu`](Self::feature_map_cpu) can run.
    pub(super) fn runs_on_buffers(&self) -> bool {
        self.stem.cpu.is_some() && self.head.cpu.is_some() && self.blocks.iter().all(|b| b.cpu.is_some())
    }

    /// [`feature_map`](Self::feature_map) on the CPU, over recycled buffers: `(n, 3, s, s)`
    /// NCHW images (f32, on the CPU) -> `(n, h, w, features)`.
    pub(super) fn feature_map_cpu(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let (Storage::Cpu(CpuStorage::F32(data)), Some((x0, x1)), &[_, c, h, w]) =
            (&*storage, layout.contiguous_offsets(), layout.dims())
        else {
            candle_core::bail!("the CPU pass takes contiguous f32 NCHW images on the CPU");
        };
        let images: Vec<&[f32]> = data[x0..x1].chunks_exact((c * h * w).max(1)).collect();
        let map = self.head_map_cpu(&images, (c, h, w))?;
        Tensor::from_slice(map.buf.as_slice(), (map.n, map.h, map.w, map.c), &Device::Cpu)
    }

    /// [`pool`](Self::pool) of [`feature_map`](Self::feature_map) on the CPU, straight from the
    /// head's buffer: one `(c, h, w)` NCHW plane per image, read where it is (no batch tensor
    /// is assembled and no feature map is copied out) -> `pooling`'s `features` values per
    /// image, the same values. Runs in the current pool with its other threads kept awake.
    /// Only where [`pools_on_buffers`](Self::pools_on_buffers).
    pub(in crate::encoder) fn pooled_cpu(
        &self,
        images: &[&[f32]],
        (c, h, w): (usize, usize, usize),
        pooling: crate::encoder::Pooling,
    ) -> candle_core::Result<Vec<f32>> {
        rayon::scope(|scope| {
            super::keep_awake(scope, || {
                let map = self.head_map_cpu(images, (c, h, w))?;
                let mut pooled = vec![0f32; map.n * map.c];
                crate::encoder::pool::pool_into(
                    map.buf.as_slice(),
                    map.h * map.w,
                    map.c,
                    pooling,
                    &mut pooled,
                );
                Ok(pooled)
            })
        })
    }

    /// The network up to the head's output, over recycled buffers: `images` one `(c, h, w)`
    /// NCHW plane each -> the head's `(n, h, w, features)` map.
    fn head_map_cpu(&self, images: &[&[f32]], (c, h, w): (usize, usize, usize)) -> candle_core::Result<Map> {
        let (Some((wt, bias)), Some(head)) = (&self.stem.cpu, &self.head.cpu) else {
            candle_core::bail!("the CPU pass needs the network loaded on the CPU");
        };
        let n = images.len();
        if n == 0 {
            candle_core::bail!("the CPU pass needs at least one image");
        }
        if let Some(bad) = images.iter().position(|image| image.len() != c * h * w) {
            candle_core::bail!("image {bad}: {} values, expected {c}x{h}x{w}", images[bad].len());
        }
        let (n, g, oh, ow) = DenseConvOp { stride: self.stem.stride }.geometry(
            &[n, c, h, w],
            self.stem.weight_kkio.dims(),
            &[bias.len()],
        )?;
        // One image whose first block follows at once may be written in that block's layout.
        let first_band = self
            .blocks
            .first()
            .and_then(|b| b.cpu.as_ref())
            .filter(|_| g.cout.is_multiple_of(BLOCK))
            .and_then(|b| b.blocked_band(1, oh, ow));
        let stem = |image: &[f32], block_follows: bool| {
            let mut map = Map::new(1, oh, ow, g.cout);
            map.blocked_band = first_band.filter(|_| block_follows);
            let out = map.buf.as_mut_slice();
            let out =
                if map.blocked_band.is_some() { StemOut::Blocked(out) } else { StemOut::ChannelsLast(out) };
            stem_into(image, wt, bias, g, (oh, ow), out);
            map
        };
        let (mut map, first_batched) = if n > 1 {
            self.early_layers_per_image_cpu(images, (oh, ow, g.cout), &stem)?
        } else {
            (stem(images[0], !self.blocks.is_empty()), 0)
        };
        for block in &self.blocks[first_batched..] {
            map = block_cpu(block, map)?;
        }
        let mut out = Map::new(map.n, map.h, map.w, head.weights.n());
        let epilogue = Epilogue { bias: &head.bias, residual: None, relu6: true };
        matmul_to(map.buf.as_slice(), &head.weights, epilogue, out.buf.as_mut_slice());
        Ok(out)
    }

    /// The stem and the early blocks image by image, as in `early_layers_per_image`, each
    /// image's output copied into its place in the batch's map; the stem's output for one
    /// image is `(h, w, c)`.
    fn early_layers_per_image_cpu(
        &self,
        images: &[&[f32]],
        (mut h, mut w, mut c): (usize, usize, usize),
        stem: &(dyn Fn(&[f32], bool) -> Map + Sync),
    ) -> candle_core::Result<(Map, usize)> {
        let n = images.len();
        // The shape after each early block (from the stem's), walked before any work is done.
        let mut early = 0;
        while early < self.blocks.len() && runs_per_image(h * w * c) {
            let cpu = self.blocks[early].cpu.as_ref().expect("checked by runs_on_buffers");
            (h, w, c) = cpu.out_shape(h, w);
            early += 1;
        }
        let mut batch = Map::new(n, h, w, c);
        batch.buf.as_mut_slice().par_chunks_mut(h * w * c).enumerate().try_for_each(|(i, dst)| {
            let mut map = stem(images[i], early > 0);
            for block in &self.blocks[..early] {
                map = block_cpu(block, map)?;
            }
            dst.copy_from_slice(map.buf.as_slice());
            candle_core::Result::Ok(())
        })?;
        Ok((batch, early))
    }
}

/// One block on the CPU: as its plan says, into a recycled buffer; a block with no plan runs
/// its three layers as candle ops.
fn block_cpu(block: &Block, x: Map) -> candle_core::Result<Map> {
    let cpu = block.cpu.as_ref().expect("checked by runs_on_buffers");
    let Map { n, h, w, c, .. } = x;
    let (oh, ow, cout) = cpu.out_shape(h, w);
    let mut out = Map::new(n, oh, ow, cout);
    if let Some(band) = x.blocked_band {
        let input = Nhwc { data: x.buf.as_slice(), n, h, w, c };
        cpu.forward_blocked_to(input, band, out.buf.as_mut_slice())?;
        return Ok(out);
    }
    match cpu.plan(n, h, w) {
        Some(plan) => {
            let input = Nhwc { data: x.buf.as_slice(), n, h, w, c };
            cpu.run_to(plan, input, out.buf.as_mut_slice())?
        }
        None => {
            let t = Tensor::from_slice(x.buf.as_slice(), (n, h, w, c), &Device::Cpu)?;
            let y = block.forward_unfused(&t, Kernels::Cpu)?;
            if y.dims() != [n, oh, ow, cout] {
                candle_core::bail!("block output {:?}, expected {:?}", y.dims(), [n, oh, ow, cout]);
            }
            out.buf.as_mut_slice().copy_from_slice(&y.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    Ok(out)
}
