//! The CPU kernels on raw f32 slices: the stem's dense convolution and the depthwise
//! convolution (TF "same" padding, one output row per call), and the per-channel bias + ReLU6.
//! (The 1x1 convolutions are in [`crate::encoder::pointwise`].)

use multiversion::multiversion;
use multiversion::target::target_cfg_f;

#[cfg(target_arch = "x86_64")]
mod avx512;

/// TF "same" padding along one axis: output length and the zeros added before and after
/// (the odd one goes after).
pub(in crate::encoder) fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize, usize) {
    let out = input.div_ceil(stride);
    let needed = (out.saturating_sub(1) * stride + kernel).saturating_sub(input);
    let before = needed / 2;
    (out, before, needed - before)
}

/// The taps `0..k` of output position `out` along one axis whose source position
/// `out * stride + tap - before` lies inside `0..len` (TF "same" padding puts `before` zeros
/// first).
fn tap_range(out: usize, stride: usize, before: usize, len: usize, k: usize) -> std::ops::Range<usize> {
    let first = out * stride;
    before.saturating_sub(first)..k.min((before + len).saturating_sub(first))
}

/// Sizes of one stem convolution.
#[derive(Debug, Clone, Copy)]
pub(super) struct DenseGeometry {
    pub(super) cin: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) k: usize,
    pub(super) cout: usize,
    pub(super) stride: usize,
    pub(super) top: usize,
    pub(super) left: usize,
}

/// Output pixels computed together by the stem kernel where none of them touches the padding.
const STEM_PIXELS: usize = 2;

/// Output pixels computed together, 16 channels at a time, for the usual stem geometry (3
/// channels, 3x3, stride 2): 6 x 16 accumulators are 12 AVX2 registers, enough independent
/// fused multiply-adds to cover their latency, with the two weight vectors and the broadcast
/// still in registers (Lite0's stem on one thread: 0.49-0.61 -> 0.40-0.52 ms against tiles of
/// 2 pixels x 32 channels, three alternating pairs; onnxruntime's stem node 0.42 ms).
const STEM3_PIXELS: usize = 6;

/// Output row `oy` of one image of the stem: `dst[ox][o] = relu6(bias[o] + sum_{ky,kx,i}
/// wt[ky][kx][i][o] * src[i][oy*s+ky-top][ox*s+kx-left])`. Vectorised over output channels,
/// [`STEM_PIXELS`] pixels at a time away from the left and right edges, accumulated in
/// registers over all taps.
///
/// On CPUs with AVX-512, the usual stem geometry's interior pixels run as
/// [`avx512::stem_tiles`] and only the edges here.
pub(super) fn dense_row(src: &[f32], wt: &[f32], bias: &[f32], dst: &mut [f32], oy: usize, g: DenseGeometry) {
    #[cfg(target_arch = "x86_64")]
    if (g.cin, g.k, g.stride) == (3, 3, 2)
        && g.cout.is_multiple_of(avx512::STEM_CHANNELS)
        && let Some(simd) = avx512::available()
    {
        let ow = dst.len() / g.cout;
        let (first, end) = inner_columns(ow, g.w, g.left, 3, 2);
        let (first, end) = (first.min(ow), end.min(ow));
        let row = DenseRow { src, wt, bias, oy, g };
        dense_row_simd(&row, dst, 0..first);
        // Full tiles, then one tile each of 4, 2 and 1 pixels as the interior's rest needs.
        let full = (end - first) / avx512::STEM_PIXELS * avx512::STEM_PIXELS;
        let mut ox = first + full;
        if full > 0 {
            let out = &mut dst[first * g.cout..ox * g.cout];
            avx512::stem_tiles::<{ avx512::STEM_PIXELS }>(simd, src, wt, bias, out, (oy, first), g);
        }
        for width in [4, 2, 1] {
            if end - ox >= width {
                let out = &mut dst[ox * g.cout..(ox + width) * g.cout];
                match width {
                    4 => avx512::stem_tiles::<4>(simd, src, wt, bias, out, (oy, ox), g),
                    2 => avx512::stem_tiles::<2>(simd, src, wt, bias, out, (oy, ox), g),
                    _ => avx512::stem_tiles::<1>(simd, src, wt, bias, out, (oy, ox), g),
                }
                ox += width;
            }
        }
        dense_row_simd(&row, dst, ox..ow);
        return;
    }
    let pixels = 0..dst.len() / g.cout.max(1);
    dense_row_simd(&DenseRow { src, wt, bias, oy, g }, dst, pixels)
}

/// One output row `oy` of the stem: its input, weights and bias.
struct DenseRow<'a> {
    src: &'a [f32],
    wt: &'a [f32],
    bias: &'a [f32],
    oy: usize,
    g: DenseGeometry,
}

/// [`dense_row`] for output pixels `pixels` only, on the best of the builds for this CPU's
/// vector units.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn dense_row_simd(row: &DenseRow<'_>, dst: &mut [f32], pixels: std::ops::Range<usize>) {
    if target_cfg_f!(target_feature = "fma") {
        dense_row_body::<true>(row, dst, pixels)
    } else {
        dense_row_body::<false>(row, dst, pixels)
    }
}

#[inline(always)]
fn dense_row_body<const FMA: bool>(row: &DenseRow<'_>, dst: &mut [f32], pixels: std::ops::Range<usize>) {
    let DenseRow { src, wt, bias, oy, g } = *row;
    let ky = tap_range(oy, g.stride, g.top, g.h, g.k);
    let ow = pixels.end;
    let kx_of = |ox: usize| tap_range(ox, g.stride, g.left, g.w, g.k);
    let interior = |ox: usize, n: usize| ox + n <= ow && (ox..ox + n).all(|p| kx_of(p) == (0..g.k));
    let stem3 = (g.cin, g.k, g.stride) == (3, 3, 2);
    let mut ox = pixels.start;
    while ox < ow {
        if stem3 && interior(ox, STEM3_PIXELS) {
            let out = &mut dst[ox * g.cout..(ox + STEM3_PIXELS) * g.cout];
            let taps = StemTaps { ky: ky.clone(), kx: kx_of(ox), oy, ox, g };
            let mut c0 = 0;
            while c0 < g.cout {
                if c0 + 16 <= g.cout {
                    stem_pixels_3x3s2::<STEM3_PIXELS, 16, { (STEM3_PIXELS - 1) * 2 + 3 }, FMA>(
                        src, wt, bias, out, c0, &taps,
                    );
                    c0 += 16;
                } else {
                    stem_pixels_3x3s2::<STEM3_PIXELS, 1, { (STEM3_PIXELS - 1) * 2 + 3 }, FMA>(
                        src, wt, bias, out, c0, &taps,
                    );
                    c0 += 1;
                }
            }
            ox += STEM3_PIXELS;
            continue;
        }
        let group = interior(ox, STEM_PIXELS);
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
                (true, 32) if stem3 => {
                    stem_pixels_3x3s2::<STEM_PIXELS, 32, { (STEM_PIXELS - 1) * 2 + 3 }, FMA>(
                        src, wt, bias, out, c0, &taps,
                    )
                }
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
    let mut acc = [*<&[f32; W]>::try_from(&bias[c0..c0 + W]).expect("W biases"); P];
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
    store_stem(&acc, out, c0, g.cout);
}

/// [`stem_pixels`] for the usual stem geometry (3 input channels, 3x3 taps, stride 2) and
/// pixels whose horizontal taps are all inside the row: the loops have fixed lengths and the
/// `N = (P - 1) * 2 + 3` input values each pixel group reads from a row are one array, so
/// they unroll without bounds checks. The same products summed in the same order.
#[inline(always)]
fn stem_pixels_3x3s2<const P: usize, const W: usize, const N: usize, const FMA: bool>(
    src: &[f32],
    wt: &[f32],
    bias: &[f32],
    out: &mut [f32],
    c0: usize,
    t: &StemTaps,
) {
    const { assert!(N == (P - 1) * 2 + 3) };
    const CIN: usize = 3;
    let g = t.g;
    let mut acc = [*<&[f32; W]>::try_from(&bias[c0..c0 + W]).expect("W biases"); P];
    let x0 = t.ox * 2 - g.left;
    for ky in t.ky.clone() {
        let iy = t.oy * 2 + ky - g.top;
        let rows: [&[f32; N]; CIN] =
            std::array::from_fn(|i| src[(i * g.h + iy) * g.w + x0..][..N].try_into().expect("N inputs"));
        for kx in 0..3 {
            for i in 0..CIN {
                let taps: &[f32; W] =
                    wt[((ky * 3 + kx) * CIN + i) * g.cout + c0..][..W].try_into().expect("W taps");
                for p in 0..P {
                    let v = rows[i][p * 2 + kx];
                    for j in 0..W {
                        acc[p][j] = if FMA { v.mul_add(taps[j], acc[p][j]) } else { acc[p][j] + v * taps[j] };
                    }
                }
            }
        }
    }
    store_stem(&acc, out, c0, g.cout);
}

/// Writes channels `c0..c0 + W` of `P` stem pixels (`cout` values apart), ReLU6 applied.
#[inline(always)]
fn store_stem<const P: usize, const W: usize>(acc: &[[f32; W]; P], out: &mut [f32], c0: usize, cout: usize) {
    for (p, a) in acc.iter().enumerate() {
        let dst: &mut [f32; W] = (&mut out[p * cout + c0..p * cout + c0 + W]).try_into().expect("W outputs");
        for j in 0..W {
            dst[j] = a[j].clamp(0.0, 6.0);
        }
    }
}

/// Sizes of one depthwise convolution.
#[derive(Debug, Clone, Copy)]
pub(in crate::encoder) struct Geometry {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub k: usize,
    pub stride: usize,
    pub top: usize,
    pub left: usize,
    pub relu6: bool,
    /// The input and weights are in the blocked layout (see [`depthwise_row`]).
    pub blocked: bool,
}

/// Checks shapes; returns `(n, h, w, c, k)`.
pub(super) fn depthwise_dims(
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

/// Channels accumulated together in registers by the depthwise kernel.
const DEPTHWISE_LANES: usize = 64;

/// Output row `oy` of one image: `dst[ox][ch] = act(bias[ch] + sum_{ky,kx} wt[ky][kx][ch] *
/// src[oy*s+ky-top][ox*s+kx-left][ch])`, zero outside the source, written channels-last.
///
/// With `g.blocked` the input is in the blocked layout of [`to_blocked`] and the weights are
/// `c / BLOCK` planes of `(k, k, BLOCK)`: neighbouring pixels of one channel block are then
/// [`BLOCK`] values apart, a constant, so a tile of pixels reads its inputs at fixed offsets
/// from one address, every input is loaded once per row of taps and the accumulators stay in
/// registers. Otherwise (channels-last input, `(k, k, c)` weights) each output pixel is
/// accumulated in registers over all taps, [`DEPTHWISE_LANES`] channels at a time. Both sum
/// the taps in the same order, so give the same values.
///
/// Both run on AVX-512 where the CPU has it ([`avx512`]; channels-last when `c` is a multiple of
/// [`BLOCK`]).
pub(in crate::encoder) fn depthwise_row(
    src: &[f32],
    wt: &[f32],
    bias: &[f32],
    dst: &mut [f32],
    oy: usize,
    g: Geometry,
) {
    #[cfg(target_arch = "x86_64")]
    if (g.blocked || g.c.is_multiple_of(BLOCK))
        && let Some(simd) = avx512::available()
    {
        return avx512::depthwise_row(simd, src, wt, bias, dst, oy, g);
    }
    depthwise_row_simd(src, wt, bias, dst, oy, g)
}

/// [`depthwise_row`] on the best of the builds for this CPU's vector units.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn depthwise_row_simd(src: &[f32], wt: &[f32], bias: &[f32], dst: &mut [f32], oy: usize, g: Geometry) {
    match (g.blocked, target_cfg_f!(target_feature = "fma")) {
        (false, true) => depthwise_row_body::<true>(src, wt, bias, dst, oy, g),
        (false, false) => depthwise_row_body::<false>(src, wt, bias, dst, oy, g),
        (true, true) => blocked_body::<true>(src, wt, bias, dst, oy, g),
        (true, false) => blocked_body::<false>(src, wt, bias, dst, oy, g),
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

/// Output columns `start..end` (of `ow`) whose horizontal taps `0..k` all lie inside a row of
/// `w` values padded by `left`: `ox * stride >= left` and `ox * stride + k - left <= w`.
fn inner_columns(ow: usize, w: usize, left: usize, k: usize, stride: usize) -> (usize, usize) {
    let start = left.div_ceil(stride);
    let end = if w + left >= k { ((w + left - k) / stride + 1).min(ow) } else { 0 };
    (start, end.max(start))
}

/// Whether the blocked layout serves a depthwise convolution of this geometry: `c` is a
/// multiple of [`BLOCK`] and tiles of 4 pixels cover at least half of each output row. On narrower maps (7x7 with a 5x5 kernel: no tile at all) the per-pixel blocked path
/// and the repack cost more than the channels-last kernel's 64-lane pixels.
pub(in crate::encoder) fn blocked_pays(g: Geometry) -> bool {
    let ow = g.w.div_ceil(g.stride);
    let (start, end) = inner_columns(ow, g.w, g.left, g.k, g.stride);
    g.c.is_multiple_of(BLOCK)
        && matches!((g.k, g.stride), (3 | 5, 1 | 2))
        && 2 * ((end - start) / 4 * 4) >= ow
}

/// Channels per block of the blocked layout the tiled depthwise kernel reads.
pub(in crate::encoder) const BLOCK: usize = 16;

/// `(rows, w, c)` channels-last values as `c / BLOCK` planes of `(rows, w, BLOCK)`, into
/// `out` (as long as `src`). `c` must be a multiple of [`BLOCK`].
pub(in crate::encoder) fn to_blocked(src: &[f32], c: usize, out: &mut [f32]) {
    debug_assert_eq!(src.len(), out.len());
    let pixels = src.len() / c;
    for (cb, plane) in out.chunks_exact_mut(pixels * BLOCK).enumerate() {
        to_blocked_plane(src, c, cb, plane);
    }
}

/// Plane `cb` of [`to_blocked`]'s output: channels `cb * BLOCK..` of every pixel of `src`.
pub(in crate::encoder) fn to_blocked_plane(src: &[f32], c: usize, cb: usize, plane: &mut [f32]) {
    debug_assert_eq!(c % BLOCK, 0);
    // As arrays, so that each pixel is one 64-byte move (a slice's `copy_from_slice` of a
    // length known only at run time was a `memcpy` call per pixel: block 0's repack on one
    // thread took 0.19 of its 0.66 ms).
    for (dst, px) in plane.as_chunks_mut::<BLOCK>().0.iter_mut().zip(src.chunks_exact(c)) {
        *dst = *px[cb * BLOCK..].first_chunk::<BLOCK>().expect("c is a multiple of BLOCK");
    }
}

#[inline(always)]
fn blocked_body<const FMA: bool>(
    src: &[f32],
    wt: &[f32],
    bias: &[f32],
    dst: &mut [f32],
    oy: usize,
    g: Geometry,
) {
    let ow = dst.len() / g.c;
    let ky = tap_range(oy, g.stride, g.top, g.h, g.k);
    let (inner_start, inner_end) = inner_columns(ow, g.w, g.left, g.k, g.stride);
    for ChannelBlock { cb, input, weights, bias: b } in channel_blocks(src, wt, bias, g) {
        let t = BlockedRow { input, weights, bias: b, ky: ky.clone(), oy, g };
        let mut ox = 0;
        while ox < ow {
            // Tiles of 4 pixels: 8 kept the compiler from holding the accumulators in registers
            // (10x slower).
            let done = if ox >= inner_start && ox + 4 <= inner_end {
                match (g.k, g.stride) {
                    (3, 1) => t.tile::<4, 3, 1, 6, FMA>(ox, dst, cb),
                    (5, 1) => t.tile::<4, 5, 1, 8, FMA>(ox, dst, cb),
                    (3, 2) => t.tile::<4, 3, 2, 9, FMA>(ox, dst, cb),
                    (5, 2) => t.tile::<4, 5, 2, 11, FMA>(ox, dst, cb),
                    _ => 0,
                }
            } else {
                0
            };
            if done == 0 {
                t.pixel::<FMA>(ox, dst, cb);
                ox += 1;
            } else {
                ox += done;
            }
        }
    }
}

/// One channel block of a blocked-layout depthwise convolution: its input plane, its
/// `(k, k)` taps and its bias.
struct ChannelBlock<'a> {
    cb: usize,
    input: &'a [[f32; BLOCK]],
    weights: &'a [[f32; BLOCK]],
    bias: &'a [f32; BLOCK],
}

/// The `g.c / BLOCK` channel blocks of blocked input `src`, weights `wt` and `bias`.
#[inline(always)]
fn channel_blocks<'a>(
    src: &'a [f32],
    wt: &'a [f32],
    bias: &'a [f32],
    g: Geometry,
) -> impl Iterator<Item = ChannelBlock<'a>> {
    let plane = g.h * g.w * BLOCK;
    let taps = g.k * g.k * BLOCK;
    (0..g.c / BLOCK).map(move |cb| ChannelBlock {
        cb,
        input: bytemuck::cast_slice(&src[cb * plane..(cb + 1) * plane]),
        weights: bytemuck::cast_slice(&wt[cb * taps..(cb + 1) * taps]),
        bias: bias[cb * BLOCK..(cb + 1) * BLOCK].try_into().expect("BLOCK lanes"),
    })
}

/// One output row's view of one channel block.
struct BlockedRow<'a> {
    input: &'a [[f32; BLOCK]],
    weights: &'a [[f32; BLOCK]],
    bias: &'a [f32; BLOCK],
    ky: std::ops::Range<usize>,
    oy: usize,
    g: Geometry,
}

impl BlockedRow<'_> {
    /// Pixels `ox..ox + P`, all of whose horizontal taps are inside the row (`N = (P - 1) * S +
    /// K` inputs per row of taps); returns `P`.
    #[inline(always)]
    fn tile<const P: usize, const K: usize, const S: usize, const N: usize, const FMA: bool>(
        &self,
        ox: usize,
        dst: &mut [f32],
        cb: usize,
    ) -> usize {
        const { assert!(N == (P - 1) * S + K) };
        let g = self.g;
        let mut acc = [*self.bias; P];
        for ky in self.ky.clone() {
            let iy = self.oy * S + ky - g.top;
            let start = iy * g.w + ox * S - g.left;
            let row: &[[f32; BLOCK]; N] = self.input[start..start + N].try_into().expect("N pixels");
            let taps: &[[f32; BLOCK]; K] = self.weights[ky * K..ky * K + K].try_into().expect("K taps");
            for (p, a) in acc.iter_mut().enumerate() {
                for (kx, w) in taps.iter().enumerate() {
                    for ((s, &x), &w) in a.iter_mut().zip(&row[p * S + kx]).zip(w) {
                        *s = if FMA { x.mul_add(w, *s) } else { *s + x * w };
                    }
                }
            }
        }
        for (p, a) in acc.iter().enumerate() {
            self.store(a, ox + p, dst, cb);
        }
        P
    }

    /// Pixel `ox`, any taps.
    #[inline(always)]
    fn pixel<const FMA: bool>(&self, ox: usize, dst: &mut [f32], cb: usize) {
        let g = self.g;
        let kx = tap_range(ox, g.stride, g.left, g.w, g.k);
        let mut a = *self.bias;
        for ky in self.ky.clone() {
            let iy = self.oy * g.stride + ky - g.top;
            for kx in kx.clone() {
                let x = &self.input[iy * g.w + ox * g.stride + kx - g.left];
                let w = &self.weights[ky * g.k + kx];
                for ((s, &x), &w) in a.iter_mut().zip(x).zip(w) {
                    *s = if FMA { x.mul_add(w, *s) } else { *s + x * w };
                }
            }
        }
        self.store(&a, ox, dst, cb);
    }

    #[inline(always)]
    fn store(&self, a: &[f32; BLOCK], ox: usize, dst: &mut [f32], cb: usize) {
        let out = &mut dst[ox * self.g.c + cb * BLOCK..ox * self.g.c + (cb + 1) * BLOCK];
        for (o, &v) in out.iter_mut().zip(a) {
            *o = if self.g.relu6 { v.clamp(0.0, 6.0) } else { v };
        }
    }
}

/// One row of channels: `row += bias`, then ReLU6 when `relu6`.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub(super) fn add_bias_row(row: &mut [f32], bias: &[f32], relu6: bool) {
    if relu6 {
        row.iter_mut().zip(bias).for_each(|(v, &b)| *v = (*v + b).clamp(0.0, 6.0));
    } else {
        row.iter_mut().zip(bias).for_each(|(v, &b)| *v += b);
    }
}
