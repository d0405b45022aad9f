//! The depthwise kernels' and the stem's AVX-512 forms, written with pulp's safe `V4` vectors
//! (the stem: [`stem_tiles`]). Blocked layout:
//! one channel block ([`BLOCK`] = 16 channels) is one vector, so a tile of 8 pixels holds 8
//! accumulators where the AVX2 tiles hold 4 pixels in 8. Channels-last layout: a pixel's 64
//! channels are 4 vectors where AVX2 needs 8 (half the loads per tap). Same products in the
//! same order as the AVX2 kernels (bias first, then taps row by row), so the output is
//! bit-identical.

use pulp::f32x16;
use pulp::x86::V4;

use super::{BLOCK, ChannelBlock, Geometry, channel_blocks, inner_columns, tap_range};

const _: () = assert!(BLOCK == 16);

/// The AVX-512 tiles if this CPU has them (pulp's `V4`: AVX-512 F, BW, CD, DQ, VL).
pub(super) fn available() -> Option<V4> {
    V4::try_new()
}

/// [`super::depthwise_row`] on AVX-512: the blocked layout when `g.blocked`, else
/// channels-last (`g.c` a multiple of [`BLOCK`]).
pub(super) fn depthwise_row(
    simd: V4,
    src: &[f32],
    wt: &[f32],
    bias: &[f32],
    dst: &mut [f32],
    oy: usize,
    g: Geometry,
) {
    // `dst` is moved into the call (not reborrowed), so the closure is `FnOnce` only and its
    // body is what pulp inlines under AVX-512. A closure that only reborrows is also `Fn`,
    // called through a shim that LLVM may leave out of line, compiled without AVX-512: then
    // every vector operation became a function call (measured: 55 instead of 200 images/s).
    simd.vectorize(
        #[inline(always)]
        move || {
            let dst = dst;
            if g.blocked {
                blocked_inner(simd, src, wt, bias, dst, oy, g)
            } else {
                channels_last_inner(simd, src, wt, bias, dst, oy, g)
            }
        },
    )
}

#[inline(always)]
fn blocked_inner(simd: V4, src: &[f32], wt: &[f32], bias: &[f32], dst: &mut [f32], oy: usize, g: Geometry) {
    let ow = dst.len() / g.c;
    let ky = tap_range(oy, g.stride, g.top, g.h, g.k);
    let (inner_start, inner_end) = inner_columns(ow, g.w, g.left, g.k, g.stride);
    for ChannelBlock { cb, input, weights, bias } in channel_blocks(src, wt, bias, g) {
        let t = Row { simd, input, weights, bias: pulp::cast(*bias), ky: ky.clone(), oy, g };
        let mut ox = 0;
        while ox < ow {
            let inner = ox >= inner_start;
            let done = match (g.k, g.stride) {
                (3, 1) if inner && ox + 8 <= inner_end => t.tile::<8, 3, 1, 10>(ox, dst, cb),
                (5, 1) if inner && ox + 8 <= inner_end => t.tile::<8, 5, 1, 12>(ox, dst, cb),
                (3, 2) if inner && ox + 8 <= inner_end => t.tile::<8, 3, 2, 17>(ox, dst, cb),
                (5, 2) if inner && ox + 8 <= inner_end => t.tile::<8, 5, 2, 19>(ox, dst, cb),
                (3, 1) if inner && ox + 4 <= inner_end => t.tile::<4, 3, 1, 6>(ox, dst, cb),
                (5, 1) if inner && ox + 4 <= inner_end => t.tile::<4, 5, 1, 8>(ox, dst, cb),
                (3, 2) if inner && ox + 4 <= inner_end => t.tile::<4, 3, 2, 9>(ox, dst, cb),
                (5, 2) if inner && ox + 4 <= inner_end => t.tile::<4, 5, 2, 11>(ox, dst, cb),
                _ => t.pixel(ox, dst, cb),
            };
            ox += done;
        }
    }
}

/// Vectors of [`BLOCK`] channels accumulated together per pixel: 128 channels. Each tap adds
/// one product to each accumulator, so the accumulators are independent chains of
/// multiply-adds; 8 of them keep both FMA units busy through the 4-cycle latency, where 4
/// (64 channels, the AVX2 kernel's `DEPTHWISE_LANES` in half as many registers) ran at half
/// that rate.
const PIXEL_VECTORS: usize = 8;

#[inline(always)]
fn channels_last_inner(
    simd: V4,
    src: &[f32],
    wt: &[f32],
    bias: &[f32],
    dst: &mut [f32],
    oy: usize,
    g: Geometry,
) {
    assert!(g.c.is_multiple_of(BLOCK), "{} channels are not whole vectors", g.c);
    let blocks = g.c / BLOCK;
    let src: &[[f32; BLOCK]] = bytemuck::cast_slice(src);
    let wt: &[[f32; BLOCK]] = bytemuck::cast_slice(wt);
    let bias: &[[f32; BLOCK]] = bytemuck::cast_slice(bias);
    let dst: &mut [[f32; BLOCK]] = bytemuck::cast_slice_mut(dst);
    let ky = tap_range(oy, g.stride, g.top, g.h, g.k);
    // Channel groups outside, pixels inside: a group's input rows and taps (at 7x7 x 1,152
    // channels with 5x5 taps, 18 KiB and 13 KiB of 128 channels) stay in L1 across the row's
    // pixels, where pixel by pixel over all channels read them from L2 at every pixel.
    // Groups of at most PIXEL_VECTORS vectors, as even as can be (144 channels: 5 + 4 vectors,
    // not 8 + 1 whose last group would be one chain waiting on its own latency).
    let groups = blocks.div_ceil(PIXEL_VECTORS);
    let mut b0 = 0;
    for group in 0..groups {
        let v = (blocks - b0).div_ceil(groups - group);
        let bias = &bias[b0..b0 + v];
        for (ox, out) in dst.chunks_exact_mut(blocks).enumerate() {
            let kx = tap_range(ox, g.stride, g.left, g.w, g.k);
            let t = Pixel { simd, src, wt, ky: ky.clone(), kx, oy, ox, g };
            let out = &mut out[b0..b0 + v];
            // As many independent chains as there are vectors in the group.
            match v {
                PIXEL_VECTORS => t.vectors::<PIXEL_VECTORS>(b0, bias, out),
                1 => t.vectors::<1>(b0, bias, out),
                2 => t.vectors::<2>(b0, bias, out),
                3 => t.vectors::<3>(b0, bias, out),
                4 => t.vectors::<4>(b0, bias, out),
                5 => t.vectors::<5>(b0, bias, out),
                6 => t.vectors::<6>(b0, bias, out),
                _ => t.vectors::<7>(b0, bias, out),
            }
        }
        b0 += v;
    }
}

/// The taps of one output pixel of a channels-last depthwise convolution.
struct Pixel<'a> {
    simd: V4,
    src: &'a [[f32; BLOCK]],
    wt: &'a [[f32; BLOCK]],
    ky: std::ops::Range<usize>,
    kx: std::ops::Range<usize>,
    oy: usize,
    ox: usize,
    g: Geometry,
}

impl Pixel<'_> {
    /// Channel vectors `b0..b0 + V` of the pixel into `out` (`bias` and `out`: those `V`).
    #[inline(always)]
    fn vectors<const V: usize>(&self, b0: usize, bias: &[[f32; BLOCK]], out: &mut [[f32; BLOCK]]) {
        let (simd, g) = (self.simd, self.g);
        let blocks = g.c / BLOCK;
        let mut acc: [f32x16; V] = std::array::from_fn(|v| pulp::cast(bias[v]));
        for ky in self.ky.clone() {
            let iy = self.oy * g.stride + ky - g.top;
            for kx in self.kx.clone() {
                let ix = self.ox * g.stride + kx - g.left;
                let x: &[[f32; BLOCK]; V] =
                    self.src[(iy * g.w + ix) * blocks + b0..][..V].try_into().expect("V");
                let w: &[[f32; BLOCK]; V] =
                    self.wt[(ky * g.k + kx) * blocks + b0..][..V].try_into().expect("V");
                for v in 0..V {
                    acc[v] = simd.mul_add_f32x16(pulp::cast(x[v]), pulp::cast(w[v]), acc[v]);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(acc) {
            store_vector(a, o, g.relu6);
        }
    }
}

/// One output row's view of one channel block.
struct Row<'a> {
    simd: V4,
    input: &'a [[f32; BLOCK]],
    weights: &'a [[f32; BLOCK]],
    bias: f32x16,
    ky: std::ops::Range<usize>,
    oy: usize,
    g: Geometry,
}

impl Row<'_> {
    /// Pixels `ox..ox + P`, all of whose horizontal taps are inside the row (`N = (P - 1) * S +
    /// K` inputs per row of taps); returns `P`.
    #[inline(always)]
    fn tile<const P: usize, const K: usize, const S: usize, const N: usize>(
        &self,
        ox: usize,
        dst: &mut [f32],
        cb: usize,
    ) -> usize {
        const { assert!(N == (P - 1) * S + K) };
        let (simd, g) = (self.simd, self.g);
        let mut acc = [self.bias; P];
        for ky in self.ky.clone() {
            let iy = self.oy * S + ky - g.top;
            let start = iy * g.w + ox * S - g.left;
            let row: &[[f32; BLOCK]; N] = self.input[start..start + N].try_into().expect("N pixels");
            let taps: &[[f32; BLOCK]; K] = self.weights[ky * K..ky * K + K].try_into().expect("K taps");
            let taps: [f32x16; K] = taps.map(pulp::cast);
            for (p, a) in acc.iter_mut().enumerate() {
                for (kx, &w) in taps.iter().enumerate() {
                    *a = simd.mul_add_f32x16(pulp::cast(row[p * S + kx]), w, *a);
                }
            }
        }
        for (p, a) in acc.iter().enumerate() {
            self.store(*a, ox + p, dst, cb);
        }
        P
    }

    /// Pixel `ox`, any taps; returns 1.
    #[inline(always)]
    fn pixel(&self, ox: usize, dst: &mut [f32], cb: usize) -> usize {
        let g = self.g;
        let kx = tap_range(ox, g.stride, g.left, g.w, g.k);
        let mut a = self.bias;
        for ky in self.ky.clone() {
            let iy = self.oy * g.stride + ky - g.top;
            for kx in kx.clone() {
                let x = self.input[iy * g.w + ox * g.stride + kx - g.left];
                let w = self.weights[ky * g.k + kx];
                a = self.simd.mul_add_f32x16(pulp::cast(x), pulp::cast(w), a);
            }
        }
        self.store(a, ox, dst, cb);
        1
    }

    #[inline(always)]
    fn store(&self, a: f32x16, ox: usize, dst: &mut [f32], cb: usize) {
        let out = &mut dst[ox * self.g.c + cb * BLOCK..ox * self.g.c + (cb + 1) * BLOCK];
        store_vector(a, out, self.g.relu6);
    }
}

/// One vector of [`BLOCK`] channels into `out`, clamped to `[0, 6]` when `relu6` (both
/// layouts' kernels, as the AVX2 kernels store them).
#[inline(always)]
fn store_vector(a: f32x16, out: &mut [f32], relu6: bool) {
    let a: [f32; BLOCK] = pulp::cast(a);
    for (o, &v) in out.iter_mut().zip(&a) {
        *o = if relu6 { v.clamp(0.0, 6.0) } else { v };
    }
}

/// Output pixels of one full AVX-512 stem tile (narrower tiles cover a row's last interior
/// pixels, see [`stem_tiles`]).
pub(in crate::encoder::lite) const STEM_PIXELS: usize = 8;
/// Output channels of one AVX-512 stem tile (two vectors).
pub(in crate::encoder::lite) const STEM_CHANNELS: usize = 2 * BLOCK;

/// The usual stem geometry (3 input channels, 3x3 taps, stride 2) for whole tiles of `P`
/// output pixels from `(oy, ox)` on, all of whose horizontal taps are inside the row; `out`
/// holds those pixels (`g.cout` values each, a multiple of [`STEM_CHANNELS`]). A full tile
/// ([`STEM_PIXELS`]) is 8 pixels x 32 channels: 16 accumulators of the 32 registers, each input
/// broadcast once per tap and channel pair, where the AVX2 tile (6 x 16) holds 12 of 16; a
/// row's last few interior pixels run as one tile each of 4, 2 and 1 pixels (through the AVX2
/// kernel, those 7 of Lite0's 112 pixels per row took as long as the other 104). Bias first,
/// then the taps by row, column and input channel, as the AVX2 kernel sums them: the same bits.
pub(in crate::encoder::lite) fn stem_tiles<const P: usize>(
    simd: V4,
    src: &[f32],
    wt: &[f32],
    bias: &[f32],
    out: &mut [f32],
    (oy, ox): (usize, usize),
    g: super::DenseGeometry,
) {
    const CIN: usize = 3;
    let ky = tap_range(oy, 2, g.top, g.h, 3);
    // `out` moved in: an `FnOnce` closure, inlined under AVX-512 (see `depthwise_row`).
    simd.vectorize(
        #[inline(always)]
        move || {
            let out = out;
            let cout = g.cout;
            for (tile, out) in out.chunks_exact_mut(P * cout).enumerate() {
                let x0 = (ox + tile * P) * 2 - g.left;
                for c0 in (0..cout).step_by(STEM_CHANNELS) {
                    let vector = |v: &[f32], at: usize| -> f32x16 {
                        pulp::cast(*<&[f32; BLOCK]>::try_from(&v[at..at + BLOCK]).expect("a vector"))
                    };
                    let mut acc = [[vector(bias, c0), vector(bias, c0 + BLOCK)]; P];
                    for ky in ky.clone() {
                        let iy = oy * 2 + ky - g.top;
                        // The input values the tile reads from this row of each input channel.
                        let rows: [&[f32]; CIN] =
                            std::array::from_fn(|i| &src[(i * g.h + iy) * g.w + x0..][..(P - 1) * 2 + 3]);
                        for kx in 0..3 {
                            for (i, row) in rows.iter().enumerate() {
                                let at = ((ky * 3 + kx) * CIN + i) * cout + c0;
                                let taps = [vector(wt, at), vector(wt, at + BLOCK)];
                                for (p, acc) in acc.iter_mut().enumerate() {
                                    let v = simd.splat_f32x16(row[p * 2 + kx]);
                                    acc[0] = simd.mul_add_f32x16(v, taps[0], acc[0]);
                                    acc[1] = simd.mul_add_f32x16(v, taps[1], acc[1]);
                                }
                            }
                        }
                    }
                    for (p, acc) in acc.iter().enumerate() {
                        let pixel = &mut out[p * cout + c0..p * cout + c0 + STEM_CHANNELS];
                        let (low, high) = pixel.split_at_mut(BLOCK);
                        store_vector(acc[0], low, true);
                        store_vector(acc[1], high, true);
                    }
                }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::super::{
        DenseGeometry, DenseRow, Geometry, dense_row, dense_row_simd, depthwise_row_simd, same_padding,
        to_blocked,
    };
    use super::{available, depthwise_row};

    /// The stem with AVX-512 tiles (`dense_row`) and the AVX2 kernel alone, row by row, on
    /// widths with and without a partial last tile, odd sizes (padding on both sides or only
    /// after) and 32 or 64 output channels: the same bits.
    #[test]
    fn avx512_stem_equals_the_avx2_kernel_bit_for_bit() {
        if available().is_none() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for (h, w, cout) in [(224, 224, 32), (31, 37, 32), (9, 18, 64), (5, 4, 32), (1, 3, 32)] {
            let (k, stride, cin) = (3, 2, 3);
            let (oh, top, _) = same_padding(h, k, stride);
            let (ow, left, _) = same_padding(w, k, stride);
            let g = DenseGeometry { cin, h, w, k, cout, stride, top, left };
            let x: Vec<f32> = (0..cin * h * w).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
            let wt: Vec<f32> =
                (0..k * k * cin * cout).map(|i| ((i * 11 % 23) as f32 - 11.0) * 0.07).collect();
            let bias: Vec<f32> = (0..cout).map(|i| (i % 13) as f32 * 0.1 - 0.7).collect();
            for oy in 0..oh {
                let (mut want, mut got) = (vec![0f32; ow * cout], vec![1f32; ow * cout]);
                let row = DenseRow { src: &x, wt: &wt, bias: &bias, oy, g };
                dense_row_simd(&row, &mut want, 0..ow);
                dense_row(&x, &wt, &bias, &mut got, oy, g);
                let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{h} x {w} x {cout}, row {oy}");
            }
        }
    }

    /// Shapes as `(h, w, c, k, stride, relu6)`.
    type Shape = (usize, usize, usize, usize, usize, bool);

    /// Every row of every shape through the AVX-512 kernel of the layout and the AVX2 kernel:
    /// the same bits.
    fn same_bits_as_the_avx2_kernel(shapes: &[Shape], blocked: bool) {
        let Some(simd) = available() else {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        };
        for &(h, w, c, k, stride, relu6) in shapes {
            let (oh, top, _) = same_padding(h, k, stride);
            let (ow, left, _) = same_padding(w, k, stride);
            let mut x: Vec<f32> = (0..h * w * c).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
            let mut wt: Vec<f32> = (0..k * k * c).map(|i| ((i * 11 % 23) as f32 - 11.0) * 0.07).collect();
            let bias: Vec<f32> = (0..c).map(|i| (i % 13) as f32 * 0.1 - 0.7).collect();
            if blocked {
                let (mut xb, mut wb) = (vec![0f32; x.len()], vec![0f32; wt.len()]);
                to_blocked(&x, c, &mut xb);
                to_blocked(&wt, c, &mut wb);
                (x, wt) = (xb, wb);
            }
            let g = Geometry { h, w, c, k, stride, top, left, relu6, blocked };
            for oy in 0..oh {
                let (mut want, mut got) = (vec![0f32; ow * c], vec![1f32; ow * c]);
                depthwise_row_simd(&x, &wt, &bias, &mut want, oy, g);
                depthwise_row(simd, &x, &wt, &bias, &mut got, oy, g);
                let same = want.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{:?} row {oy}", (h, w, c, k, stride, relu6));
            }
        }
    }

    /// Every kernel size and stride of the tiles, rows with tiles of 8, of 4 and edge pixels,
    /// several channel blocks, with and without ReLU6.
    #[test]
    fn avx512_depthwise_equals_the_avx2_kernel_bit_for_bit() {
        let shapes = [
            (9, 45, 16, 3, 1, true),
            (7, 27, 32, 5, 1, false),
            (10, 44, 16, 3, 2, true),
            (11, 47, 48, 5, 2, true),
            (4, 3, 16, 5, 1, false),
            (1, 1, 16, 3, 2, true),
        ];
        same_bits_as_the_avx2_kernel(&shapes, true);
    }

    /// The channels-last kernel: groups of 8 vectors and every smaller group (1 to 7 vectors),
    /// edge and inner pixels, strides 1 and 2.
    #[test]
    fn avx512_channels_last_depthwise_equals_the_avx2_kernel_bit_for_bit() {
        let shapes = [
            (7, 7, 1152, 5, 1, true),
            (7, 7, 96, 3, 1, false),
            (6, 5, 208, 3, 1, true),
            (3, 3, 32, 3, 1, true),
            (5, 4, 112, 5, 2, false),
            (9, 11, 80, 3, 2, true),
            (5, 6, 16, 5, 2, true),
            (4, 3, 48, 5, 1, false),
            (1, 1, 64, 3, 2, true),
        ];
        same_bits_as_the_avx2_kernel(&shapes, false);
    }
}
