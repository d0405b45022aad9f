//! The fused CPU inverted-residual block: expand (1x1), depthwise and project (1x1) computed
//! one band of output rows at a time, so the wide expanded activations only ever exist as a
//! per-thread scratch that stays in cache, instead of making full-size trips through memory.
//!
//! A band of output rows needs input rows `[oy0 * s - top, oy_last * s - top + k)` (clipped to
//! the image); those are expanded into the scratch, the depthwise kernel reads them with its
//! geometry shifted to the band, and the project kernel writes the band's output rows with bias
//! and residual. Rows shared by neighbouring bands are expanded twice; the band height keeps
//! that overlap small while the scratch fits [`SCRATCH_BYTES`].

use std::cell::RefCell;
use std::sync::Arc;

use rayon::prelude::*;

use super::arena::Buffer;

use super::lite::kernels::{BLOCK, Geometry, blocked_pays, depthwise_row, same_padding, to_blocked};
use super::pointwise::{
    Epilogue, NR, OUT_BLOCK, PointwiseLayer, balanced_rows, matmul_into, matmul_into_blocked,
    matmul_into_panels, scratch,
};

// The expand writes the blocks the depthwise kernel reads.
const _: () = assert!(OUT_BLOCK == BLOCK);

/// Target size of one band's expanded input rows, per thread: within a 1-2 MiB L2 cache
/// with the band's depthwise output beside it. (384 KiB kept Lite0's 14x14x672 blocks from
/// fusing at batch 1 on 2 threads: two bands of 7 rows need 9 expanded rows each.)
const SCRATCH_BYTES: usize = 768 * 1024;
/// Most expanded rows per input row that fusing may cost (rows shared by bands count twice).
const MAX_OVERLAP: f64 = 1.4;
/// Largest whole expansion (`4 * n * h * w * mid` bytes) for which [`CpuBlock::plan`] prefers
/// channel groups to overlapping bands (a 7x7x1152 map is 226 KiB, a 14x14x480 one 376 KiB).
const CHANNELS_BYTES: usize = 256 * 1024;
/// Expanded channels per task of [`CpuBlock::forward_by_channels`]: three 1x1 panels.
const GROUP_CHANNELS: usize = 3 * NR;

/// How a block runs on the CPU, chosen by [`CpuBlock::plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Fused, in bands of this many output rows ([`CpuBlock::forward`]).
    Bands(usize),
    /// Expand and depthwise by groups of channels, then project by rows
    /// ([`CpuBlock::forward_by_channels`]).
    Channels,
}

/// A block's input: NHWC activations `(n, h, w, c)`.
#[derive(Debug, Clone, Copy)]
pub struct Nhwc<'a> {
    pub data: &'a [f32],
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

/// A block's sizes for one input (see [`CpuBlock::shapes`]).
struct Shapes {
    mid: usize,
    cout: usize,
    oh: usize,
    ow: usize,
    top: usize,
    left: usize,
}

/// One block's weights for the CPU: folded, packed, in host memory.
#[derive(Debug)]
pub struct CpuBlock {
    pub expand: Option<Arc<PointwiseLayer>>,
    /// `(k, k, mid)`.
    pub dw_weight: Vec<f32>,
    /// `(mid,)`.
    pub dw_bias: Vec<f32>,
    pub k: usize,
    pub stride: usize,
    pub project: Arc<PointwiseLayer>,
    pub residual: bool,
    /// `dw_weight` in the blocked layout of [`depthwise_row`], when `mid` is a multiple of
    /// [`BLOCK`] (else empty, and bands read channels-last input).
    dw_blocked: Vec<f32>,
    /// `dw_weight` by groups of [`GROUP_CHANNELS`] channels: group `j`, `(k, k, width)`, starts
    /// at `k * k * j * GROUP_CHANNELS` (empty for a block without an expansion).
    dw_groups: Vec<f32>,
}

thread_local! {
    /// Expanded input rows, the same in the blocked layout, and depthwise output rows of the
    /// band being computed.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>, Vec<f32>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Checks that an output buffer holds `len` values.
fn check_out(out: &[f32], len: usize) -> candle_core::Result<()> {
    if out.len() != len {
        candle_core::bail!("fused block: an output of {} values for {len}", out.len());
    }
    Ok(())
}

/// When the last of `images` x `costs` tasks (in that order) finishes, each taken by the first
/// of `threads` threads to come free.
fn finish_time(costs: &[usize], images: usize, threads: usize) -> usize {
    let mut free = vec![0usize; threads.max(1)];
    for &cost in costs.iter().cycle().take(costs.len() * images) {
        let first = free.iter_mut().min().expect("at least one thread");
        *first += cost;
    }
    free.into_iter().max().unwrap_or(0)
}

impl CpuBlock {
    /// A block from its folded weights: `dw_weight` `(k, k, mid)`, `dw_bias` `(mid,)`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        expand: Option<Arc<PointwiseLayer>>,
        dw_weight: Vec<f32>,
        dw_bias: Vec<f32>,
        k: usize,
        stride: usize,
        project: Arc<PointwiseLayer>,
        residual: bool,
    ) -> Self {
        let mid = dw_bias.len();
        let mut dw_blocked = Vec::new();
        if mid > 0 && mid.is_multiple_of(BLOCK) && dw_weight.len() == k * k * mid {
            dw_blocked = vec![0f32; dw_weight.len()];
            to_blocked(&dw_weight, mid, &mut dw_blocked);
        }
        // Only a block with an expansion runs by channel groups (see `plan`).
        let mut dw_groups = Vec::new();
        if expand.is_some() {
            for c0 in (0..mid).step_by(GROUP_CHANNELS) {
                for tap in dw_weight.chunks_exact(mid) {
                    dw_groups.extend_from_slice(&tap[c0..(c0 + GROUP_CHANNELS).min(mid)]);
                }
            }
        }
        Self { expand, dw_weight, dw_bias, k, stride, project, residual, dw_blocked, dw_groups }
    }

    /// `input` -> `out`, `(n, oh, ow, cout)` (see [`out_shape`](Self::out_shape)),
    /// every value of which it writes, in bands of `band` output rows (as planned by
    /// [`band_rows`](Self::band_rows)).
    pub fn forward_to(&self, input: Nhwc<'_>, band: usize, out: &mut [f32]) -> candle_core::Result<()> {
        self.bands_to(input, band, false, out)
    }

    /// The depthwise geometry of the bands for an `h` x `w` input, `blocked` where the
    /// blocked layout serves it.
    fn band_geometry(&self, h: usize, w: usize) -> Geometry {
        let (_, top, _) = same_padding(h, self.k, self.stride);
        let (_, left, _) = same_padding(w, self.k, self.stride);
        let c = self.dw_bias.len();
        let g = Geometry { h, w, c, k: self.k, stride: self.stride, top, left, relu6: true, blocked: false };
        Geometry { blocked: !self.dw_blocked.is_empty() && blocked_pays(g), ..g }
    }

    /// Whether [`forward_blocked_to`](Self::forward_blocked_to) takes an `h` x `w` input: a
    /// block with no expansion and no residual (Lite0's first) whose bands read the blocked
    /// layout, which the layer before can then write directly instead of each band repacking
    /// its rows (block 0's repack was 0.19 of its 0.66 ms on one thread).
    fn reads_blocked(&self, h: usize, w: usize) -> bool {
        self.expand.is_none() && !self.residual && self.band_geometry(h, w).blocked
    }

    /// The band height at which `n` images of `h` x `w` run from blocked input
    /// ([`forward_blocked_to`](Self::forward_blocked_to)), where the block reads it and its
    /// plan is bands; else `None`.
    pub fn blocked_band(&self, n: usize, h: usize, w: usize) -> Option<usize> {
        match self.plan(n, h, w) {
            Some(Plan::Bands(band)) if self.reads_blocked(h, w) => Some(band),
            _ => None,
        }
    }

    /// [`forward_to`](Self::forward_to) for input in the blocked layout (each image `c /
    /// BLOCK` planes of `(h, w, BLOCK)`), in bands of `band` output rows (as
    /// [`blocked_band`](Self::blocked_band) gives them).
    pub fn forward_blocked_to(
        &self,
        input: Nhwc<'_>,
        band: usize,
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        if !self.reads_blocked(input.h, input.w) {
            candle_core::bail!("fused block: this block does not take blocked input");
        }
        self.bands_to(input, band, true, out)
    }

    /// The bands of [`forward_to`](Self::forward_to), from input in the blocked layout
    /// (`blocked_input`, only where [`reads_blocked`](Self::reads_blocked)) or channels-last.
    fn bands_to(
        &self,
        input: Nhwc<'_>,
        band: usize,
        blocked_input: bool,
        out: &mut [f32],
    ) -> candle_core::Result<()> {
        let Nhwc { data: x, n, h, w, c: cin } = input;
        let Shapes { cout, oh, ow, .. } = self.shapes(input)?;
        check_out(out, n * oh * ow * cout)?;
        if out.is_empty() {
            return Ok(());
        }
        if band == 0 {
            candle_core::bail!("fused block: bands of 0 rows");
        }
        let g = self.band_geometry(h, w);
        out.par_chunks_mut(oh * ow * cout).enumerate().for_each(|(image, image_out)| {
            let image_in = &x[image * h * w * cin..(image + 1) * h * w * cin];
            image_out.par_chunks_mut(band * ow * cout).enumerate().for_each(|(b, dst)| {
                crate::background::yield_point();
                self.band(image_in, blocked_input, band * b, dst, g, ow, cin);
            });
        });
        Ok(())
    }

    /// The output's `(oh, ow, cout)` for an `h` x `w` input.
    pub fn out_shape(&self, h: usize, w: usize) -> (usize, usize, usize) {
        let (oh, _, _) = same_padding(h, self.k, self.stride);
        let (ow, _, _) = same_padding(w, self.k, self.stride);
        (oh, ow, self.project.weights.n())
    }

    /// Checks that `input` fits the block; returns its sizes.
    fn shapes(&self, input: Nhwc<'_>) -> candle_core::Result<Shapes> {
        let Nhwc { data: x, n, h, w, c: cin } = input;
        let mid = self.dw_bias.len();
        let cout = self.project.weights.n();
        let expand_in = self.expand.as_ref().map_or(mid, |e| e.weights.k());
        if x.len() != n * h * w * cin || expand_in != cin || self.project.weights.k() != mid {
            candle_core::bail!("fused block: input ({n}, {h}, {w}, {cin}) does not fit the block's weights");
        }
        if self.k == 0 || self.stride == 0 || self.dw_weight.len() != self.k * self.k * mid {
            candle_core::bail!("fused block: bad depthwise geometry");
        }
        let (oh, top, _) = same_padding(h, self.k, self.stride);
        let (ow, left, _) = same_padding(w, self.k, self.stride);
        if self.residual && (oh, ow, cout) != (h, w, cin) {
            candle_core::bail!("fused block: residual needs equal input and output shapes");
        }
        Ok(Shapes { mid, cout, oh, ow, top, left })
    }

    /// How to run `n` images of `h` x `w` on the current pool: in bands where
    /// [`band_rows`](Self::band_rows) finds a height, unless those bands expand shared rows twice
    /// and the whole expansion fits in [`CHANNELS_BYTES`]; then (and where no band height is
    /// found), for a block with an expansion and more than one thread, [`Plan::Channels`]; else
    /// `None` (three separate layers).
    pub fn plan(&self, n: usize, h: usize, w: usize) -> Option<Plan> {
        let channels = self.expand.is_some() && rayon::current_num_threads() > 1;
        match self.band_rows(n, h, w) {
            Some(band) if !(channels && self.channels_pay(n, h, w, band)) => Some(Plan::Bands(band)),
            _ => channels.then_some(Plan::Channels),
        }
    }

    /// Whether channel groups beat bands of `band` output rows: the bands overlap (neighbours
    /// expand the rows they share each) and the channel groups' whole expansion is small enough
    /// to stay in cache between their two steps. Lite0's last block (7x7, 3x3 kernel) at batch
    /// 1 on 2 threads: bands of 4 and 3 rows expand 5 and 4 of the 7 input rows, 0.34 ms; by
    /// channel groups 0.29-0.31 ms. The 14x14 blocks, whose expansion is 2-3 times larger, stay
    /// faster in bands (e.g. 0.33 against 0.41 ms).
    fn channels_pay(&self, n: usize, h: usize, w: usize, band: usize) -> bool {
        let (oh, _, _) = same_padding(h, self.k, self.stride);
        let overlap = band < oh && self.k > self.stride;
        overlap && 4 * n * h * w * self.dw_bias.len() <= CHANNELS_BYTES
    }

    /// Runs the block as [`plan`](Self::plan) chose, into a new output: `(output, oh, ow,
    /// cout)`.
    pub fn run(&self, plan: Plan, input: Nhwc<'_>) -> candle_core::Result<(Vec<f32>, usize, usize, usize)> {
        let (oh, ow, cout) = self.out_shape(input.h, input.w);
        let mut out = super::zeroed(input.n * oh * ow * cout);
        self.run_to(plan, input, &mut out)?;
        Ok((out, oh, ow, cout))
    }

    /// Runs the block as [`plan`](Self::plan) chose, into `out` (`n` times
    /// [`out_shape`](Self::out_shape)), every value of which it writes.
    pub fn run_to(&self, plan: Plan, input: Nhwc<'_>, out: &mut [f32]) -> candle_core::Result<()> {
        match plan {
            Plan::Bands(band) => self.forward_to(input, band, out),
            Plan::Channels => self.forward_by_channels_to(input, out),
        }
    }

    /// The block for maps too small to cut into a band per thread (7x7 at batch 1): each task
    /// expands the whole map into one group of [`GROUP_CHANNELS`] channels and runs the
    /// depthwise convolution on them while they are in its cache; then each task projects a
    /// share of the output rows. Two parallel steps instead of three separate layers', and each
    /// thread reads only its part of the expansion's weights. Every value is computed as in
    /// [`forward_to`](Self::forward_to), so the output is the same.
    pub fn forward_by_channels_to(&self, input: Nhwc<'_>, out: &mut [f32]) -> candle_core::Result<()> {
        let Nhwc { data: x, n, h, w, .. } = input;
        let Shapes { mid, cout, oh, ow, top, left } = self.shapes(input)?;
        let Some(expand) = &self.expand else {
            candle_core::bail!("fused block: channel groups need an expansion");
        };
        check_out(out, n * oh * ow * cout)?;
        let (pixels, out_pixels, k) = (h * w, oh * ow, self.k);
        let rows = n * out_pixels;
        if rows == 0 || mid == 0 {
            out.fill(0.0);
            return Ok(());
        }
        // The depthwise output by groups: group `j`'s `(rows, width)` values start at
        // `rows * j * GROUP_CHANNELS`.
        let mut grouped = Buffer::take(rows * mid);
        let grouped = grouped.as_mut_slice();
        let panels = expand.weights.n().div_ceil(NR);
        let expand_epilogue = Epilogue { bias: &expand.bias, residual: None, relu6: true };
        grouped.par_chunks_mut(rows * GROUP_CHANNELS).enumerate().for_each(|(j, dst)| {
            crate::background::yield_point();
            let (c0, width) = (j * GROUP_CHANNELS, dst.len() / rows);
            let g =
                Geometry { h, w, c: width, k, stride: self.stride, top, left, relu6: true, blocked: false };
            let weights = &self.dw_groups[k * k * c0..k * k * (c0 + width)];
            let bias = &self.dw_bias[c0..c0 + width];
            SCRATCH.with_borrow_mut(|(expanded, _, _)| {
                let expanded = scratch(expanded, n * pixels * width);
                let group_panels = c0 / NR..((c0 + GROUP_CHANNELS) / NR).min(panels);
                matmul_into_panels(x, &expand.weights, group_panels, expand_epilogue, expanded);
                for (image, out) in dst.chunks_exact_mut(out_pixels * width).enumerate() {
                    let src = &expanded[image * pixels * width..(image + 1) * pixels * width];
                    for (oy, row) in out.chunks_exact_mut(ow * width).enumerate() {
                        depthwise_row(src, weights, bias, row, oy, g);
                    }
                }
            });
        });
        let grouped = &*grouped;
        let per_task = balanced_rows(rows, rayon::current_num_threads());
        out.par_chunks_mut(per_task * cout).enumerate().for_each(|(task, dst)| {
            crate::background::yield_point();
            let (first, count) = (task * per_task, dst.len() / cout);
            SCRATCH.with_borrow_mut(|(_, _, gathered)| {
                let gathered = scratch(gathered, count * mid);
                for c0 in (0..mid).step_by(GROUP_CHANNELS) {
                    let width = GROUP_CHANNELS.min(mid - c0);
                    let group = &grouped[rows * c0..rows * (c0 + width)];
                    let part = &group[first * width..(first + count) * width];
                    for (row, from) in gathered.chunks_exact_mut(mid).zip(part.chunks_exact(width)) {
                        row[c0..c0 + width].copy_from_slice(from);
                    }
                }
                let residual = self.residual.then(|| &x[first * cout..(first + count) * cout]);
                let epilogue = Epilogue { bias: &self.project.bias, residual, relu6: false };
                matmul_into(gathered, &self.project.weights, epilogue, dst);
            });
        });
        Ok(())
    }

    /// Output rows per band for `n` images of `h` x `w`, or `None` when fusing does not pay
    /// and the block should run unfused: when every band small enough for the scratch would
    /// expand shared rows more than [`MAX_OVERLAP`] times over, or there are fewer bands than
    /// threads (small late-stage maps at batch 1; they fit in cache anyway).
    ///
    /// Among the band heights that qualify, the one that finishes soonest when the threads
    /// take the bands in order as they come free, each band costing its input rows (the
    /// expansion, the bulk of the work). At 14x14 on 2 threads that is two bands of 7 rows,
    /// where a fixed split into at least two bands per thread would make 4, 4, 4 and 2.
    pub fn band_rows(&self, n: usize, h: usize, w: usize) -> Option<usize> {
        let mid = self.dw_bias.len();
        let (oh, top, _) = same_padding(h, self.k, self.stride);
        if oh == 0 || n == 0 {
            return None;
        }
        let rows_in = SCRATCH_BYTES / (4 * w * mid).max(1);
        let by_cache = (rows_in.saturating_sub(self.k) / self.stride + 1).clamp(1, oh);
        let threads = rayon::current_num_threads();
        (1..=by_cache)
            .rev()
            .filter_map(|band| {
                // Input rows each band of one image expands, clipped to the image.
                let rows: Vec<usize> = (0..oh)
                    .step_by(band)
                    .map(|oy0| {
                        let last = (oy0 + band).min(oh) - 1;
                        h.min(last * self.stride + self.k - top) - (oy0 * self.stride).saturating_sub(top)
                    })
                    .collect();
                let fits = rows.iter().sum::<usize>() as f64 <= MAX_OVERLAP * h as f64;
                (fits && n * rows.len() >= threads).then(|| (finish_time(&rows, n, threads), band))
            })
            .min_by_key(|&(time, band)| (time, std::cmp::Reverse(band)))
            .map(|(_, band)| band)
    }

    /// Computes output rows `oy0..` of one image into `dst` (whole rows of `ow * cout`);
    /// `x` in the blocked layout where `blocked_input`.
    #[allow(clippy::too_many_arguments)]
    fn band(
        &self,
        x: &[f32],
        blocked_input: bool,
        oy0: usize,
        dst: &mut [f32],
        g: Geometry,
        ow: usize,
        cin: usize,
    ) {
        let mid = g.c;
        let cout = self.project.weights.n();
        let rows_out = dst.len() / (ow * cout);
        let last = oy0 + rows_out - 1;
        let first_in = (oy0 * g.stride).saturating_sub(g.top);
        let end_in = g.h.min(last * g.stride + g.k - g.top);
        SCRATCH.with_borrow_mut(|(expanded, blocked, dw)| {
            let src = &x[first_in * g.w * cin..end_in * g.w * cin];
            let expand = Epilogue {
                bias: self.expand.as_ref().map_or(&[][..], |e| &e.bias),
                residual: None,
                relu6: true,
            };
            let pixels = (end_in - first_in) * g.w;
            // The band's input rows, expanded, in the layout the depthwise kernel reads.
            // The depthwise kernel sees only the band's rows: its geometry shifted to match.
            let band_g = Geometry { h: end_in - first_in, top: g.top + first_in, ..g };
            let (rows, weights, band_g): (&[f32], &[f32], Geometry) = match (&self.expand, g.blocked) {
                // The whole image, already blocked: the kernel reads the band's rows in place.
                (None, true) if blocked_input => (x, &self.dw_blocked, g),
                (Some(e), false) => {
                    let expanded = scratch(expanded, pixels * mid);
                    matmul_into(src, &e.weights, expand, expanded);
                    (expanded, &self.dw_weight, band_g)
                }
                (Some(e), true) => {
                    let blocked = scratch(blocked, pixels * mid);
                    matmul_into_blocked(src, &e.weights, expand, blocked);
                    (blocked, &self.dw_blocked, band_g)
                }
                (None, false) => (src, &self.dw_weight, band_g),
                (None, true) => {
                    let blocked = scratch(blocked, src.len());
                    to_blocked(src, mid, blocked);
                    (blocked, &self.dw_blocked, band_g)
                }
            };
            let dw = scratch(dw, rows_out * ow * mid);
            for (r, row) in dw.chunks_exact_mut(ow * mid).enumerate() {
                depthwise_row(rows, weights, &self.dw_bias, row, oy0 + r, band_g);
            }
            let residual = self.residual.then(|| &x[oy0 * ow * cout..(oy0 + rows_out) * ow * cout]);
            let epilogue = Epilogue { bias: &self.project.bias, residual, relu6: false };
            matmul_into(dw, &self.project.weights, epilogue, dst);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::finish_time;

    #[test]
    fn bands_are_timed_as_threads_take_them() {
        assert_eq!(finish_time(&[9, 9], 1, 2), 9);
        // 4, 4, 4 and 2 rows on 2 threads: one thread does two bands of 4 (plus overlap).
        assert_eq!(finish_time(&[6, 8, 8, 4], 1, 2), 14);
        assert_eq!(finish_time(&[6, 8, 8, 4], 2, 2), 26);
        assert_eq!(finish_time(&[5], 3, 1), 15);
    }
}
