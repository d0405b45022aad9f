//! The 1x1 kernel's AVX-512 tiles, written with pulp's safe `V4` vector type: 8 rows by a
//! whole 32-column panel (16 accumulators in the 32 vector registers), the same products in
//! the same order as the AVX2 tiles, so the output is bit-identical.
//!
//! Written with explicit vectors because LLVM's auto-vectoriser, given the AVX2 tiles' plain
//! loops with AVX-512 enabled, turned the accumulators into gathers and scatters (a tenth of
//! the AVX2 build's speed). pulp checks the CPU once and runs the closure with the features
//! enabled; on a CPU without AVX-512, [`rows`] is never called.

use std::ops::Range;

use pulp::f32x16;
use pulp::x86::V4;

use super::{Accumulate, Columns, Epilogue, NR, OUT_BLOCK, Out, PackedWeights, PanelLoop, Tiles};
use super::{Finish, Tiler, add_activate, each_row_tile, feed, run_rows};

/// Rows per tile: 8 rows by 2 vectors is 16 accumulators, plus 2 weight vectors and the
/// broadcast, of the 32 registers (a last 1 to 4 rows join the tile before them:
/// `super::tile_rows`).
const R: usize = 8;

/// The AVX-512 tiles if this CPU has them (pulp's `V4`: AVX-512 F, BW, CD, DQ, VL).
pub(super) fn available() -> Option<V4> {
    V4::try_new()
}

/// [`super::rows_body`] on AVX-512: every row of `src` times the given panels.
pub(super) fn rows(
    simd: V4,
    src: &[f32],
    w: &PackedWeights,
    panels: Range<usize>,
    epilogue: Epilogue<'_>,
    out: Out<'_>,
) {
    // `out` moves into the call, so the closure is `FnOnce` only and pulp inlines its body
    // under AVX-512 (see `lite::kernels::avx512::depthwise_row`).
    simd.vectorize(
        #[inline(always)]
        move || each_row_tile::<R, _>(&WholePanels { simd }, src, w, panels, epilogue, out),
    )
}

/// The tiles of [`rows`]: 8 rows by a whole panel as two vectors, a last half panel as one.
struct WholePanels {
    simd: V4,
}

impl PanelLoop for WholePanels {
    #[inline(always)]
    fn panels<const PACKED: bool>(
        &self,
        tiles: &mut Tiles<'_, '_, '_>,
        w: &PackedWeights,
        panels: Range<usize>,
    ) {
        for p in panels {
            let (panel, at) = w.panel(p);
            if panel.len() == w.k * NR {
                run::<2, NR, PACKED>(self.simd, tiles, panel, at);
            } else {
                run::<1, OUT_BLOCK, PACKED>(self.simd, tiles, panel, at);
            }
        }
    }
}

/// Every row of `tiles` times one panel of `V` vectors (`W = 16 V` columns).
#[inline(always)]
fn run<const V: usize, const W: usize, const PACKED: bool>(
    simd: V4,
    tiles: &mut Tiles<'_, '_, '_>,
    panel: &[f32],
    at: Columns,
) {
    let rows = (tiles.a, tiles.rows, tiles.k, 0);
    run_rows::<R, W, _>(&Vectors::<V, PACKED> { simd }, rows, panel, at, tiles.epilogue, tiles.out);
}

/// The tiles of a panel of `V` vectors.
struct Vectors<const V: usize, const PACKED: bool> {
    simd: V4,
}

impl<const V: usize, const W: usize, const PACKED: bool> Tiler<W> for Vectors<V, PACKED> {
    /// `RR` rows times the panel (`W = 16 V` columns, every panel row `W` long).
    #[inline(always)]
    fn tile<const RR: usize>(&self, a: &[f32], k: usize, panel: &[f32]) -> [[f32; W]; RR] {
        let simd = self.simd;
        let zero = simd.splat_f32x16(0.0);
        let mut acc = Accumulators { simd, acc: [[zero; V]; RR] };
        feed::<RR, W, PACKED, _>(&mut acc, a, k, panel);
        let mut out = [[0f32; W]; RR];
        for (o, a) in out.iter_mut().zip(&acc.acc) {
            for (lanes, v) in o.chunks_exact_mut(16).zip(a) {
                lanes.copy_from_slice(&pulp::cast::<f32x16, [f32; 16]>(*v));
            }
        }
        out
    }
}

impl<const V: usize, const PACKED: bool> Finish for Vectors<V, PACKED> {
    /// [`add_activate`] in 16-lane vectors: LLVM compiled its loops here to 128-bit operations
    /// and 8-byte stores, 43% of the kernel's time on Lite0's 16 -> 96 expansion. ReLU6's clamp
    /// is `max(0, v)` then `min(6, v)` with the constant first: `vmaxps`/`vminps` return their
    /// second operand when the comparison fails, so NaN and -0.0 pass as `f32::clamp` passes
    /// them (bit-identical, tested with the tiles).
    #[inline(always)]
    fn add_activate<const N: usize>(
        &self,
        dst: &mut [f32; N],
        values: &[f32; N],
        bias: &[f32; N],
        residual: Option<&[f32; N]>,
        relu6: bool,
    ) {
        if !N.is_multiple_of(16) {
            return add_activate(dst, values, bias, residual, relu6);
        }
        let simd = self.simd;
        let (zero, six) = (pulp::cast(simd.splat_f32x16(0.0)), pulp::cast(simd.splat_f32x16(6.0)));
        for (i, d) in dst.chunks_exact_mut(16).enumerate() {
            let mut v = simd.add_f32x16(lanes(values, i), lanes(bias, i));
            if let Some(r) = residual {
                v = simd.add_f32x16(v, lanes(r, i));
            }
            if relu6 {
                let low = simd.avx512f._mm512_max_ps(zero, pulp::cast(v));
                v = pulp::cast(simd.avx512f._mm512_min_ps(six, low));
            }
            d.copy_from_slice(&pulp::cast::<f32x16, [f32; 16]>(v));
        }
    }
}

/// Values `16 i..16 i + 16` of `s` as a vector.
#[inline(always)]
fn lanes(s: &[f32], i: usize) -> f32x16 {
    let lanes: &[f32; 16] = s[16 * i..16 * i + 16].try_into().expect("16 lanes");
    pulp::cast(*lanes)
}

/// `RR` rows by `V` vectors of accumulators.
struct Accumulators<const RR: usize, const V: usize> {
    simd: V4,
    acc: [[f32x16; V]; RR],
}

impl<const RR: usize, const V: usize> Accumulate<RR> for Accumulators<RR, V> {
    /// `RR` row values times one panel row of `V` vectors.
    #[inline(always)]
    fn step(&mut self, av: &[f32; RR], panel_row: &[f32]) {
        let simd = self.simd;
        let b: [f32x16; V] = std::array::from_fn(|j| lanes(panel_row, j));
        for (row, &x) in self.acc.iter_mut().zip(av) {
            let v = simd.splat_f32x16(x);
            for (acc, &bj) in row.iter_mut().zip(&b) {
                *acc = simd.mul_add_f32x16(v, bj, *acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Finish, Loops};
    use super::{Vectors, available};

    /// The vector epilogue against the loops on the values where a clamp can differ: signed
    /// zeros, NaN, infinities, the bounds and either side of them.
    #[test]
    fn vector_epilogue_equals_the_loops_bit_for_bit() {
        let Some(simd) = available() else {
            eprintln!("no AVX-512 on this CPU: the vector epilogue is not exercised");
            return;
        };
        let special =
            [-0.0, 0.0, f32::NAN, -f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 6.0, 6.0001, -1e-30, 5.9999];
        let values: [f32; 32] = std::array::from_fn(|i| special[i % special.len()]);
        let bias: [f32; 32] = std::array::from_fn(|i| if i < 16 { 0.0 } else { -0.0 });
        let residual: [f32; 32] = std::array::from_fn(|i| special[(i * 7) % special.len()]);
        for (residual, relu6) in
            [(None, false), (None, true), (Some(&residual), false), (Some(&residual), true)]
        {
            let (mut want, mut got) = ([1f32; 32], [2f32; 32]);
            Loops.add_activate(&mut want, &values, &bias, residual, relu6);
            Vectors::<2, false> { simd }.add_activate(&mut got, &values, &bias, residual, relu6);
            let bits = |v: &[f32; 32]| v.map(f32::to_bits);
            assert_eq!(bits(&got), bits(&want), "residual {}, relu6 {relu6}", residual.is_some());
        }
    }
}
