//! The CPU 1x1 convolution: a matrix product `(m, k) x (k, n)` over channels-last activations
//! with packed weights and register tiles, and the bias, ReLU6 and residual add applied as each
//! tile is stored, so the output is written once instead of being swept again per epilogue.
//!
//! Weights are packed once at load into panels of [`NR`] output channels, each panel `k` rows
//! of `NR` contiguous values (zero-padded past `n`). A register tile is a few activation rows
//! by a panel or half a panel, accumulated over all of `k`, its size set by the vector
//! registers there are (see `rows_kernel`). For outputs of at least [`PACK_FROM_COLUMNS`]
//! channels the rows are first interleaved tile by tile (`pack_rows`), so the inner loop
//! reads one pointer. Rows are split into parallel tasks of [`ROWS_PER_TASK`]; within a task
//! each panel is reused across all the task's rows while it is hot in cache.

use std::cell::RefCell;
use std::ops::Range;

use multiversion::multiversion;
use multiversion::target::target_cfg_f;
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
mod avx512;

/// Output channels per packed panel (four AVX2 vectors).
pub const NR: usize = 32;
/// Rows per thread below which [`matmul`] splits the work by panels instead of by rows is
/// `2 * MR`.
pub const MR: usize = 4;
/// Activation rows per parallel task.
pub const ROWS_PER_TASK: usize = 64;

/// A `(k, n)` weight matrix in panel order (see the module docs).
#[derive(Debug, Clone)]
pub struct PackedWeights {
    k: usize,
    n: usize,
    panels: Vec<Line>,
}

/// Sixteen values on a 64-byte boundary, the unit the panels are stored in: every panel
/// starts a line (its size, `k` times 16 or 32 values, is whole lines), so no vector load of a
/// panel row straddles two cache lines (a split 512-bit load costs two of the core's loads).
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Line([f32; 16]);

impl PackedWeights {
    /// Packs a row-major `(k, n)` matrix. The last panel is half wide ([`OUT_BLOCK`] columns)
    /// when at most that many columns are left for it, so narrow outputs (16, 40, 80, 112,
    /// 144 channels) do not multiply a half panel of zeros.
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight matrix is not {k}x{n}");
        let panels_len: usize = (0..n.div_ceil(NR)).map(|p| k * panel_width(n, p)).sum();
        let mut lines = vec![Line([0.0; 16]); panels_len / 16];
        let panels: &mut [f32] = bytemuck::cast_slice_mut(&mut lines);
        for p in 0..n.div_ceil(NR) {
            let width = panel_width(n, p);
            let cols = (n - p * NR).min(width);
            let panel = &mut panels[p * k * NR..p * k * NR + k * width];
            for (row, dst) in panel.chunks_exact_mut(width).enumerate() {
                dst[..cols].copy_from_slice(&w[row * n + p * NR..][..cols]);
            }
        }
        Self { k, n, panels: lines }
    }

    /// The packed values (see the module docs).
    fn values(&self) -> &[f32] {
        bytemuck::cast_slice(&self.panels)
    }

    /// Panel `p`: its `k` rows of [`panel_width`] values, and the output columns it holds.
    fn panel(&self, p: usize) -> (&[f32], Columns) {
        let width = panel_width(self.n, p);
        let at = Columns { first: p * NR, count: (self.n - p * NR).min(width), n: self.n };
        (&self.values()[p * self.k * NR..p * self.k * NR + self.k * width], at)
    }

    /// Input channels.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output channels.
    pub fn n(&self) -> usize {
        self.n
    }
}

/// Columns of panel `p` of an `n`-column matrix: [`NR`], or half that for a last panel of at
/// most [`OUT_BLOCK`] columns. Every panel before the last is full, so panel `p` starts at
/// column `p * NR` and at `p * k * NR` in the packed values.
fn panel_width(n: usize, p: usize) -> usize {
    if n - p * NR <= OUT_BLOCK { OUT_BLOCK } else { NR }
}

/// A 1x1 convolution ready for [`matmul`]: packed weights and the per-channel bias.
#[derive(Debug, Clone)]
pub struct PointwiseLayer {
    pub weights: PackedWeights,
    pub bias: Vec<f32>,
}

/// What is applied to each output value after the product.
#[derive(Debug, Clone, Copy)]
pub struct Epilogue<'a> {
    /// Added per output channel (`n` values).
    pub bias: &'a [f32],
    /// Added element-wise (`m * n` values, the same layout as the output).
    pub residual: Option<&'a [f32]>,
    /// Clamp to `[0, 6]` after the additions.
    pub relu6: bool,
}

/// `epilogue(x . w)` for row-major `x` of `m` rows by `w.k()`; returns `m` rows by `w.n()`.
///
/// Work is split across threads by rows, or, when there are too few rows to keep every thread
/// busy (small late-stage feature maps), by groups of output-channel panels.
pub fn matmul(x: &[f32], w: &PackedWeights, epilogue: Epilogue<'_>) -> Vec<f32> {
    let mut out = super::zeroed(x.len() / w.k.max(1) * w.n);
    matmul_to(x, w, epilogue, &mut out);
    out
}

/// [`matmul`] into `out` (`x.len() / w.k()` rows by `w.n()`), every value of which it writes.
pub fn matmul_to(x: &[f32], w: &PackedWeights, epilogue: Epilogue<'_>, out: &mut [f32]) {
    let (k, n) = (w.k, w.n);
    assert!(k > 0 && n > 0, "empty weight matrix");
    assert_eq!(x.len() % k, 0, "input is not a whole number of rows of {k}");
    assert_eq!(epilogue.bias.len(), n, "bias length");
    let m = x.len() / k;
    if let Some(r) = epilogue.residual {
        assert_eq!(r.len(), m * n, "residual shape");
    }
    assert_eq!(out.len(), m * n, "output shape");
    let threads = rayon::current_num_threads();
    let panels = n.div_ceil(NR);
    if m >= 2 * MR * threads || panels < 2 {
        let rows_per_task = balanced_rows(m, threads);
        out.par_chunks_mut(rows_per_task * n).enumerate().for_each(|(task, dst)| {
            crate::background::yield_point();
            let first = task * rows_per_task;
            let rows = dst.len() / n;
            let src = &x[first * k..(first + rows) * k];
            let residual = epilogue.residual.map(|r| &r[first * n..(first + rows) * n]);
            matmul_into(src, w, Epilogue { residual, ..epilogue }, dst);
        });
        return;
    }
    let per_task = panels.div_ceil(2 * threads);
    let parts: Vec<(usize, usize, Vec<f32>)> = (0..panels.div_ceil(per_task))
        .into_par_iter()
        .map(|task| {
            crate::background::yield_point();
            let range = task * per_task..((task + 1) * per_task).min(panels);
            let col0 = range.start * NR;
            let cols = (range.end * NR).min(n) - col0;
            let mut dst = vec![0f32; m * cols];
            rows_kernel(x, w, range, epilogue, Out { dst: &mut dst, ld: cols, col0, block_rows: 0 });
            (col0, cols, dst)
        })
        .collect();
    for (col0, cols, part) in parts {
        for (row, src) in out.chunks_exact_mut(n).zip(part.chunks_exact(cols)) {
            row[col0..col0 + cols].copy_from_slice(src);
        }
    }
}

/// Rows per parallel task for `m` rows on `threads` threads: about [`ROWS_PER_TASK`], with a
/// task count that is a multiple of `threads` and tasks of equal size, so that no thread is
/// left with one task more than the others (at 14x14 = 196 rows on 2 threads, tasks of 64
/// rows would give one thread 128 rows and the other 68).
pub fn balanced_rows(m: usize, threads: usize) -> usize {
    let threads = threads.max(1);
    let tasks = m.div_ceil(ROWS_PER_TASK).div_ceil(threads).max(1) * threads;
    m.div_ceil(tasks).max(1)
}

/// [`matmul`] on the calling thread, into `dst` (`x.len() / w.k()` rows by `w.n()`).
pub fn matmul_into(x: &[f32], w: &PackedWeights, epilogue: Epilogue<'_>, dst: &mut [f32]) {
    let rows = x.len() / w.k;
    assert_eq!(dst.len(), rows * w.n, "output shape");
    assert_eq!(epilogue.bias.len(), w.n, "bias length");
    if let Some(r) = epilogue.residual {
        assert_eq!(r.len(), dst.len(), "residual shape");
    }
    let panels = w.n.div_ceil(NR);
    rows_kernel(&x[..rows * w.k], w, 0..panels, epilogue, Out { dst, ld: w.n, col0: 0, block_rows: 0 });
}

/// [`matmul_into`] for the output columns of `panels` only: `dst` holds `x.len() / w.k()` rows
/// of those columns, side by side (no residual). Each value is the same as in the full product.
pub fn matmul_into_panels(
    x: &[f32],
    w: &PackedWeights,
    panels: Range<usize>,
    epilogue: Epilogue<'_>,
    dst: &mut [f32],
) {
    let rows = x.len() / w.k;
    assert!(panels.start < panels.end && panels.end <= w.n.div_ceil(NR), "panels {panels:?}");
    let col0 = panels.start * NR;
    let cols = (panels.end * NR).min(w.n) - col0;
    assert_eq!(dst.len(), rows * cols, "output shape");
    assert_eq!(epilogue.bias.len(), w.n, "bias length");
    assert!(epilogue.residual.is_none(), "no residual for a part of the columns");
    rows_kernel(&x[..rows * w.k], w, panels, epilogue, Out { dst, ld: cols, col0, block_rows: 0 });
}

/// [`matmul_into`] with the output in blocks of [`OUT_BLOCK`] channels: `w.n() / OUT_BLOCK`
/// planes of `(rows, OUT_BLOCK)`, the layout the depthwise kernel's tiles read (no
/// residual; `w.n()` a multiple of [`OUT_BLOCK`]).
pub fn matmul_into_blocked(x: &[f32], w: &PackedWeights, epilogue: Epilogue<'_>, dst: &mut [f32]) {
    let rows = x.len() / w.k;
    assert_eq!(dst.len(), rows * w.n, "output shape");
    assert_eq!(epilogue.bias.len(), w.n, "bias length");
    assert!(epilogue.residual.is_none(), "no residual in the blocked layout");
    assert!(w.n.is_multiple_of(OUT_BLOCK), "{} channels are not whole blocks", w.n);
    let panels = w.n.div_ceil(NR);
    rows_kernel(&x[..rows * w.k], w, 0..panels, epilogue, Out { dst, ld: w.n, col0: 0, block_rows: rows });
}

/// Channels per block of [`matmul_into_blocked`]'s output (half a panel).
pub const OUT_BLOCK: usize = NR / 2;

/// Where a kernel call writes: rows of `ld` values holding output columns `col0..`, or, when
/// `block_rows` is not 0, planes of `(block_rows, OUT_BLOCK)` (see [`matmul_into_blocked`]).
struct Out<'a> {
    dst: &'a mut [f32],
    ld: usize,
    col0: usize,
    block_rows: usize,
}

/// Every row of `src` times the given panels: the AVX-512 tiles where the CPU has them
/// ([`avx512`]), else the best of [`rows_simd`]'s builds.
fn rows_kernel(src: &[f32], w: &PackedWeights, panels: Range<usize>, epilogue: Epilogue<'_>, out: Out<'_>) {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = avx512::available() {
        return avx512::rows(simd, src, w, panels, epilogue, out);
    }
    rows_simd(src, w, panels, epilogue, out)
}

#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
fn rows_simd(src: &[f32], w: &PackedWeights, panels: Range<usize>, epilogue: Epilogue<'_>, out: Out<'_>) {
    // Register tiles sized to AVX2's 16 registers (and NEON's): 4 x 32 would not fit (16
    // accumulators alone: the compiler spills), so a tile is 6 rows by half a panel: 12
    // accumulators, 2 weight vectors and the broadcast, 15 registers. (AVX-512 is not a
    // target here: on an AVX-512 Xeon, LLVM compiled an 8-row by whole-panel tile's
    // accumulators to gathers and scatters, 15 images/s against 158 for this tile, and this
    // tile built with AVX-512 ran at 0.85x the AVX2 build; [`avx512`] has explicit vectors.)
    if target_cfg_f!(target_feature = "fma") {
        rows_body::<6, true>(src, w, panels, epilogue, out)
    } else {
        rows_body::<6, false>(src, w, panels, epilogue, out)
    }
}

thread_local! {
    /// The activation rows of the current call, interleaved by [`pack_rows`].
    static PACKED_ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Outputs at least this wide read packed rows ([`pack_rows`]); narrower ones read the rows
/// where they are. Since the in-place tiles take [`UNPACKED_STEPS`] values per row and bounds
/// check, packing pays only where many panels reuse the packed rows: one thread, Lite0's
/// shapes, in place against packed: 196 x 480 -> 80 148 vs 170 us, 196 x 672 -> 112 305 vs 325,
/// 12544 x 16 -> 96 758 vs 835; but 1568 x 192 -> 1152 8.5 vs 8.1 ms and 1568 x 320 -> 1280
/// 15.4 vs 14.7 ms (the 1152- and 1280-channel layers at batch 32).
pub const PACK_FROM_COLUMNS: usize = 1024;

/// The first `len` values of a scratch buffer the caller overwrites in full: it grows when
/// needed and never shrinks, so a buffer reused by layers of different sizes is zero-filled
/// only when it grows, not each time.
pub fn scratch(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// One step of [`tile`]: `R` row values times row `kk` of the panel's `W` columns. (A function,
/// not a closure: closures are not compiled with the caller's target features.)
#[inline(always)]
fn step<const R: usize, const W: usize, const OFF: usize, const FMA: bool>(
    acc: &mut [[f32; W]; R],
    av: &[f32; R],
    panel_row: &[f32],
) {
    let b: &[f32; W] = panel_row[OFF..OFF + W].try_into().expect("W columns");
    for i in 0..R {
        let v = av[i];
        for j in 0..W {
            acc[i][j] = if FMA { v.mul_add(b[j], acc[i][j]) } else { acc[i][j] + v * b[j] };
        }
    }
}

/// Copies the rows of `src` (each `k` long) into `dst` in the tiles [`tile_rows`] cuts (`R`
/// rows, the last one the rows left), each tile `k` steps of its rows' values side by side. A
/// tile's inner loop then reads one pointer forward instead of `R` row pointers with a bounds
/// check each, which on AVX2 leaves the registers for the accumulators and weights.
#[inline(always)]
fn pack_rows<const R: usize>(src: &[f32], k: usize, dst: &mut [f32]) {
    let rows = src.len() / k;
    let mut r = 0;
    while r < rows {
        let count = tile_rows::<R>(rows - r);
        let (tile, out) = (&src[r * k..(r + count) * k], &mut dst[r * k..(r + count) * k]);
        if count == R {
            let from: [&[f32]; R] = std::array::from_fn(|i| &tile[i * k..(i + 1) * k]);
            for (kk, step) in out.chunks_exact_mut(R).enumerate() {
                for (o, row) in step.iter_mut().zip(&from) {
                    *o = row[kk];
                }
            }
        } else {
            for (kk, step) in out.chunks_exact_mut(count).enumerate() {
                for (i, o) in step.iter_mut().enumerate() {
                    *o = tile[i * k + kk];
                }
            }
        }
        r += count;
    }
}

/// Rows of the next register tile when `left` rows remain, for tiles of `R` rows: `R`, or the
/// rows left when fewer; but with 8-row tiles (the AVX-512 kernel's), a last 1 to 4 rows join
/// the tile before them (9 to 12 rows: 24 accumulators at most, within the 32 registers). A
/// tile of one to four rows has too few accumulators to hide the multiply-add's latency (one
/// row by a panel is two chains: half the speed of a whole 8-row tile per step, for an eighth
/// of its work), and Lite0's 7x7 maps at batch 1 end in one (49 rows, or 25 per thread). Each
/// output is still summed over `k` in the same order, so the values do not change.
#[inline(always)]
fn tile_rows<const R: usize>(left: usize) -> usize {
    match left.checked_sub(R) {
        Some(tail) if R == 8 && tail <= 4 => left,
        Some(_) => R,
        None => left,
    }
}

/// Every row of `src` times the given panels in tiles of `R` rows by half panels
/// ([`OUT_BLOCK`] columns). The residual, if any, is indexed like the
/// full output (`rows` by `n`).
#[inline(always)]
fn rows_body<const R: usize, const FMA: bool>(
    src: &[f32],
    w: &PackedWeights,
    panels: Range<usize>,
    epilogue: Epilogue<'_>,
    out: Out<'_>,
) {
    each_row_tile::<R, _>(&HalfPanels::<R, FMA>, src, w, panels, epilogue, out);
}

/// The tiles of [`rows_body`]: `R` rows by half panels.
struct HalfPanels<const R: usize, const FMA: bool>;

impl<const R: usize, const FMA: bool> PanelLoop for HalfPanels<R, FMA> {
    #[inline(always)]
    fn panels<const PACKED: bool>(
        &self,
        tiles: &mut Tiles<'_, '_, '_>,
        w: &PackedWeights,
        panels: Range<usize>,
    ) {
        tiles.panels::<R, PACKED, FMA>(w, panels);
    }
}

/// A loop of register tiles over a call's panels, on activation rows as they are (`PACKED`
/// false) or interleaved by [`pack_rows`].
trait PanelLoop {
    fn panels<const PACKED: bool>(
        &self,
        tiles: &mut Tiles<'_, '_, '_>,
        w: &PackedWeights,
        panels: Range<usize>,
    );
}

/// Every row of `src` times the given panels through `tiles` (tiles of `R` rows): the rows
/// read in place for outputs under [`PACK_FROM_COLUMNS`] channels, else first interleaved
/// into the thread's [`PACKED_ROWS`] scratch.
#[inline(always)]
fn each_row_tile<const R: usize, L: PanelLoop>(
    tiles: &L,
    src: &[f32],
    w: &PackedWeights,
    panels: Range<usize>,
    epilogue: Epilogue<'_>,
    mut out: Out<'_>,
) {
    let rows = src.len() / w.k;
    if w.n < PACK_FROM_COLUMNS {
        tiles.panels::<false>(&mut Tiles { a: src, rows, k: w.k, out: &mut out, epilogue }, w, panels);
        return;
    }
    // Taken out and put back rather than borrowed in a closure: a closure is not compiled
    // with this function's target features (its multiply-adds became calls).
    let mut packed = PACKED_ROWS.take();
    let a = scratch(&mut packed, src.len());
    pack_rows::<R>(src, w.k, a);
    tiles.panels::<true>(&mut Tiles { a, rows, k: w.k, out: &mut out, epilogue }, w, panels);
    PACKED_ROWS.set(packed);
}

/// Output columns `first..first + count` of `n`.
#[derive(Clone, Copy)]
struct Columns {
    first: usize,
    count: usize,
    n: usize,
}

/// The activation rows of one call (as they are, or packed by [`pack_rows`]) and where their
/// products go.
struct Tiles<'a, 'o, 'e> {
    a: &'a [f32],
    rows: usize,
    k: usize,
    out: &'a mut Out<'o>,
    epilogue: Epilogue<'e>,
}

impl Tiles<'_, '_, '_> {
    /// Every row times the given panels.
    #[inline(always)]
    fn panels<const R: usize, const PACKED: bool, const FMA: bool>(
        &mut self,
        w: &PackedWeights,
        panels: Range<usize>,
    ) {
        for p in panels {
            let (panel, Columns { count: cols, .. }) = w.panel(p);
            if panel.len() == w.k * NR {
                let at = Columns { first: p * NR, count: OUT_BLOCK, n: w.n };
                self.run::<R, OUT_BLOCK, NR, 0, PACKED, FMA>(panel, at, 0);
                let at = Columns { first: p * NR + OUT_BLOCK, count: cols - OUT_BLOCK, n: w.n };
                if self.narrow_tail::<PACKED>(at.count) {
                    self.run_narrow::<NR, OUT_BLOCK, FMA>(panel, at);
                } else {
                    self.run::<R, OUT_BLOCK, NR, OUT_BLOCK, PACKED, FMA>(panel, at, 0);
                }
            } else {
                let at = Columns { first: p * NR, count: cols, n: w.n };
                if self.narrow_tail::<PACKED>(at.count) {
                    self.run_narrow::<OUT_BLOCK, 0, FMA>(panel, at);
                } else {
                    self.run::<R, OUT_BLOCK, OUT_BLOCK, 0, PACKED, FMA>(panel, at, 0);
                }
            }
        }
    }

    /// Whether `cols` columns of a half panel (where half panels are the tiles' width) are
    /// few enough for [`run_narrow`](Self::run_narrow): rows read in place and stored
    /// channels-last (the narrow tile's rows are not those [`pack_rows`] interleaved).
    #[inline(always)]
    fn narrow_tail<const PACKED: bool>(&self, cols: usize) -> bool {
        !PACKED && cols <= NARROW_COLUMNS && self.out.block_rows == 0
    }

    /// Every row times the first [`NARROW_COLUMNS`] columns of a half panel, for a last half
    /// panel with no more valid columns than that (Lite0's 24- and 40-channel projections):
    /// tiles of 12 rows by one vector (12 accumulators, the weight vector, the broadcast),
    /// then 6-row tiles, instead of 6 rows by a half panel whose second vector multiplies
    /// padding. The same products in the same order.
    #[inline(always)]
    fn run_narrow<const S: usize, const OFF: usize, const FMA: bool>(&mut self, panel: &[f32], at: Columns) {
        const ROWS: usize = 12;
        let k = self.k;
        let mut r = 0;
        while r + ROWS <= self.rows {
            let acc =
                tile::<ROWS, NARROW_COLUMNS, S, OFF, false, FMA>(&self.a[r * k..(r + ROWS) * k], k, panel);
            store(&Loops, &acc, r, at, self.epilogue, self.out);
            r += ROWS;
        }
        self.run::<6, NARROW_COLUMNS, S, OFF, false, FMA>(panel, at, r);
    }

    /// Rows `first..` times `W` columns of one panel (`S` values a row, the columns from
    /// `OFF`): the tiles [`tile_rows`] cuts.
    #[inline(always)]
    fn run<
        const R: usize,
        const W: usize,
        const S: usize,
        const OFF: usize,
        const PACKED: bool,
        const FMA: bool,
    >(
        &mut self,
        panel: &[f32],
        at: Columns,
        first: usize,
    ) {
        let rows = (self.a, self.rows, self.k, first);
        run_rows::<R, W, _>(&Plain::<S, OFF, PACKED, FMA>, rows, panel, at, self.epilogue, self.out);
    }
}

/// Makes the tiles of one panel's `W` columns, for any number of rows up to 12.
trait Tiler<const W: usize>: Finish {
    fn tile<const R: usize>(&self, a: &[f32], k: usize, panel: &[f32]) -> [[f32; W]; R];
}

/// How a kernel applies the epilogue to a tile's values as it stores them: [`add_activate`]'s
/// loops, unless the kernel has a form of its own (the same operations in the same order).
trait Finish {
    #[inline(always)]
    fn add_activate<const N: usize>(
        &self,
        dst: &mut [f32; N],
        values: &[f32; N],
        bias: &[f32; N],
        residual: Option<&[f32; N]>,
        relu6: bool,
    ) {
        add_activate(dst, values, bias, residual, relu6)
    }
}

/// [`add_activate`]'s loops, for the tiles that have no other form.
struct Loops;

impl Finish for Loops {}

/// The plain-loop tiles ([`tile`]).
struct Plain<const S: usize, const OFF: usize, const PACKED: bool, const FMA: bool>;

impl<const S: usize, const OFF: usize, const PACKED: bool, const FMA: bool> Finish
    for Plain<S, OFF, PACKED, FMA>
{
}

impl<const W: usize, const S: usize, const OFF: usize, const PACKED: bool, const FMA: bool> Tiler<W>
    for Plain<S, OFF, PACKED, FMA>
{
    #[inline(always)]
    fn tile<const R: usize>(&self, a: &[f32], k: usize, panel: &[f32]) -> [[f32; W]; R] {
        tile::<R, W, S, OFF, PACKED, FMA>(a, k, panel)
    }
}

/// The rows `(a, rows, k, first)` (each `k` long, or packed; from row `first`) times one panel:
/// the tiles [`tile_rows`] cuts, each stored with the epilogue.
#[inline(always)]
fn run_rows<const R: usize, const W: usize, T: Tiler<W>>(
    tiler: &T,
    (a, rows, k, first): (&[f32], usize, usize, usize),
    panel: &[f32],
    at: Columns,
    e: Epilogue<'_>,
    out: &mut Out<'_>,
) {
    let mut r = first;
    while r < rows {
        let count = tile_rows::<R>(rows - r);
        let a = &a[r * k..];
        match count {
            _ if count == R => store(tiler, &tiler.tile::<R>(a, k, panel), r, at, e, out),
            12 => store(tiler, &tiler.tile::<12>(a, k, panel), r, at, e, out),
            11 => store(tiler, &tiler.tile::<11>(a, k, panel), r, at, e, out),
            10 => store(tiler, &tiler.tile::<10>(a, k, panel), r, at, e, out),
            9 => store(tiler, &tiler.tile::<9>(a, k, panel), r, at, e, out),
            7 => store(tiler, &tiler.tile::<7>(a, k, panel), r, at, e, out),
            6 => store(tiler, &tiler.tile::<6>(a, k, panel), r, at, e, out),
            5 => store(tiler, &tiler.tile::<5>(a, k, panel), r, at, e, out),
            4 => store(tiler, &tiler.tile::<4>(a, k, panel), r, at, e, out),
            3 => store(tiler, &tiler.tile::<3>(a, k, panel), r, at, e, out),
            2 => store(tiler, &tiler.tile::<2>(a, k, panel), r, at, e, out),
            1 => store(tiler, &tiler.tile::<1>(a, k, panel), r, at, e, out),
            _ => unreachable!("a tile of {count} rows"),
        }
        r += count;
    }
}

/// A tile's accumulators: `R` rows times some of a panel's columns, fed one step of `k` at a
/// time (a function of a type, not a closure: closures are not compiled with the caller's
/// target features).
trait Accumulate<const R: usize> {
    /// Adds row values `av` times the panel row `panel_row` (`S` values).
    fn step(&mut self, av: &[f32; R], panel_row: &[f32]);
}

/// The plain-loop accumulators: `W` columns from column `OFF` of each panel row, kept in
/// registers because every loop runs over fixed-length arrays and unrolls.
struct Lanes<const R: usize, const W: usize, const OFF: usize, const FMA: bool>([[f32; W]; R]);

impl<const R: usize, const W: usize, const OFF: usize, const FMA: bool> Accumulate<R>
    for Lanes<R, W, OFF, FMA>
{
    #[inline(always)]
    fn step(&mut self, av: &[f32; R], panel_row: &[f32]) {
        step::<R, W, OFF, FMA>(&mut self.0, av, panel_row);
    }
}

/// Feeds a tile's `k` steps into `acc`: `a` holds the rows one after the other (each `k`
/// long) or, with `PACKED`, interleaved by [`pack_rows`]; the panel has `S` values a row.
#[inline(always)]
fn feed<const R: usize, const S: usize, const PACKED: bool, A: Accumulate<R>>(
    acc: &mut A,
    a: &[f32],
    k: usize,
    panel: &[f32],
) {
    // The panel's rows come from `chunks_exact(S)` and each activation row is sliced to
    // exactly `k` values before a `0..k` loop: that lets the compiler drop every bounds
    // check from the inner loop (indexing `R` row slices of unknown length by `kk` left
    // `R` compares and branches per step, and a scalar load plus a register broadcast per
    // row instead of one broadcast load: the narrow projections ran at half the speed of
    // the packed ones).
    let panel = &panel[..k * S];
    if PACKED {
        for (av, b) in a[..R * k].chunks_exact(R).zip(panel.chunks_exact(S)) {
            acc.step(av.try_into().expect("chunks of R"), b);
        }
    } else {
        let rows: [&[f32]; R] = std::array::from_fn(|i| &a[i * k..][..k]);
        let whole = k / UNPACKED_STEPS * UNPACKED_STEPS;
        let (blocks, tail) = panel.split_at(whole * S);
        for (kb, block) in blocks.chunks_exact(UNPACKED_STEPS * S).enumerate() {
            let kk = kb * UNPACKED_STEPS;
            let values: [&[f32; UNPACKED_STEPS]; R] = std::array::from_fn(|i| {
                rows[i][kk..kk + UNPACKED_STEPS].try_into().expect("a block of steps")
            });
            for (u, b) in block.chunks_exact(S).enumerate() {
                acc.step(&std::array::from_fn(|i| values[i][u]), b);
            }
        }
        for (kk, b) in (whole..k).zip(tail.chunks_exact(S)) {
            acc.step(&std::array::from_fn(|i| rows[i][kk]), b);
        }
    }
}

/// `R` rows times `W` columns of one panel (`S` values a row, from column `OFF`), accumulated
/// in registers ([`feed`]).
#[inline(always)]
fn tile<
    const R: usize,
    const W: usize,
    const S: usize,
    const OFF: usize,
    const PACKED: bool,
    const FMA: bool,
>(
    a: &[f32],
    k: usize,
    panel: &[f32],
) -> [[f32; W]; R] {
    let mut acc = Lanes::<R, W, OFF, FMA>([[0f32; W]; R]);
    feed::<R, S, PACKED, _>(&mut acc, a, k, panel);
    acc.0
}

/// Columns of [`Tiles::run_narrow`]'s tiles: one AVX2 vector.
const NARROW_COLUMNS: usize = 8;

/// Steps of `k` that an unpacked tile takes from each row per bounds check: each row's next
/// values are taken as one fixed-length array, and the steps over it have no checks left.
const UNPACKED_STEPS: usize = 8;

/// Writes a tile's valid columns (`at`) with the epilogue applied.
#[inline(always)]
fn store<const R: usize, const W: usize>(
    finish: &impl Finish,
    acc: &[[f32; W]; R],
    row: usize,
    at: Columns,
    epilogue: Epilogue<'_>,
    out: &mut Out<'_>,
) {
    let Columns { first: col, count: cols, n } = at;
    if cols == W {
        store_full(finish, acc, row, at, epilogue, out);
        return;
    }
    let bias = &epilogue.bias[col..col + cols];
    if out.block_rows > 0 {
        // `col` starts a panel, so each half of the tile is one block's row.
        for (i, acc_row) in acc.iter().enumerate() {
            for (half, (values, bias)) in
                acc_row[..cols].chunks(OUT_BLOCK).zip(bias.chunks(OUT_BLOCK)).enumerate()
            {
                let at = ((col / OUT_BLOCK + half) * out.block_rows + row + i) * OUT_BLOCK;
                for ((o, &s), &b) in out.dst[at..at + values.len()].iter_mut().zip(values).zip(bias) {
                    *o = activate(s + b, epilogue.relu6);
                }
            }
        }
        return;
    }
    for (i, acc_row) in acc.iter().enumerate() {
        let at = (row + i) * out.ld + col - out.col0;
        let dst = &mut out.dst[at..at + cols];
        for ((o, &s), &b) in dst.iter_mut().zip(acc_row).zip(bias) {
            *o = s + b;
        }
        if let Some(res) = epilogue.residual {
            let at = (row + i) * n + col;
            for (o, &r) in dst.iter_mut().zip(&res[at..at + cols]) {
                *o += r;
            }
        }
        for o in dst.iter_mut() {
            *o = activate(*o, epilogue.relu6);
        }
    }
}

/// ReLU6's clamp when `relu6`, for one value after its additions (the partial tiles' stores).
/// (A function, not a closure, so that it is compiled with the calling kernel's target
/// features. Written per value like this in `store_full`'s loops, it left them scalar: see
/// [`add_activate`].)
#[inline(always)]
fn activate(v: f32, relu6: bool) -> f32 {
    if relu6 { v.clamp(0.0, 6.0) } else { v }
}

/// [`store`] when all `W` columns are valid (every tile but those of a narrow last panel):
/// fixed-length loops, no closures (a closure is not compiled with the kernel's target
/// features), the same additions in the same order.
#[inline(always)]
fn store_full<const R: usize, const W: usize>(
    finish: &impl Finish,
    acc: &[[f32; W]; R],
    row: usize,
    at: Columns,
    epilogue: Epilogue<'_>,
    out: &mut Out<'_>,
) {
    let Columns { first: col, n, .. } = at;
    let bias: &[f32; W] = epilogue.bias[col..col + W].try_into().expect("W bias values");
    for (i, acc_row) in acc.iter().enumerate() {
        if out.block_rows > 0 {
            for (h, (values, bias)) in
                acc_row.chunks_exact(OUT_BLOCK).zip(bias.chunks_exact(OUT_BLOCK)).enumerate()
            {
                let at = ((col / OUT_BLOCK + h) * out.block_rows + row + i) * OUT_BLOCK;
                let dst: &mut [f32; OUT_BLOCK] =
                    (&mut out.dst[at..at + OUT_BLOCK]).try_into().expect("a block row");
                let values: &[f32; OUT_BLOCK] = values.try_into().expect("a block row");
                let bias: &[f32; OUT_BLOCK] = bias.try_into().expect("a block row");
                finish.add_activate(dst, values, bias, None, epilogue.relu6);
            }
            continue;
        }
        let at = (row + i) * out.ld + col - out.col0;
        let dst: &mut [f32; W] = (&mut out.dst[at..at + W]).try_into().expect("W output values");
        let res = epilogue.residual.map(|res| {
            let at = (row + i) * n + col;
            <&[f32; W]>::try_from(&res[at..at + W]).expect("W residual values")
        });
        finish.add_activate(dst, acc_row, bias, res, epilogue.relu6);
    }
}

/// The epilogue's one rule: `dst = values + bias [+ residual]`, then ReLU6's clamp when
/// `relu6`, on `W` values. The choice is made outside the loops: made per value inside them,
/// LLVM left the loops scalar (every tile's store was 16 scalar adds and clamps per row: the
/// expand of Lite0's block 1 took 1.7 ms instead of 1.1).
#[inline(always)]
fn add_activate<const W: usize>(
    dst: &mut [f32; W],
    values: &[f32; W],
    bias: &[f32; W],
    residual: Option<&[f32; W]>,
    relu6: bool,
) {
    match (residual, relu6) {
        (None, false) => {
            for j in 0..W {
                dst[j] = values[j] + bias[j];
            }
        }
        (None, true) => {
            for j in 0..W {
                dst[j] = (values[j] + bias[j]).clamp(0.0, 6.0);
            }
        }
        (Some(res), false) => {
            for j in 0..W {
                dst[j] = values[j] + bias[j] + res[j];
            }
        }
        (Some(res), true) => {
            for j in 0..W {
                dst[j] = (values[j] + bias[j] + res[j]).clamp(0.0, 6.0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], k: usize, n: usize, e: Epilogue<'_>) -> Vec<f32> {
        let m = x.len() / k;
        let mut out = vec![0f32; m * n];
        for r in 0..m {
            for c in 0..n {
                let mut s = 0f64;
                for i in 0..k {
                    s += f64::from(x[r * k + i]) * f64::from(w[i * n + c]);
                }
                let mut v = s as f32 + e.bias[c] + e.residual.map_or(0.0, |res| res[r * n + c]);
                if e.relu6 {
                    v = v.clamp(0.0, 6.0);
                }
                out[r * n + c] = v;
            }
        }
        out
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 - 500.0) / 250.0).collect()
    }

    /// The blocked layout holds exactly the channels-last values, half panels included.
    #[test]
    fn blocked_output_holds_the_same_values() {
        for (m, k, n) in [(1, 3, 16), (7, 24, 48), (13, 40, 96), (5, 8, 144)] {
            let (x, w, bias) = (values(m * k, 1), values(k * n, 2), values(n, 3));
            let packed = PackedWeights::pack(&w, k, n);
            for relu6 in [false, true] {
                let e = Epilogue { bias: &bias, residual: None, relu6 };
                let mut flat = vec![0f32; m * n];
                matmul_into(&x, &packed, e, &mut flat);
                let mut blocked = vec![f32::NAN; m * n];
                matmul_into_blocked(&x, &packed, e, &mut blocked);
                for r in 0..m {
                    for c in 0..n {
                        let b = blocked[((c / OUT_BLOCK) * m + r) * OUT_BLOCK + c % OUT_BLOCK];
                        assert_eq!(b.to_bits(), flat[r * n + c].to_bits(), "{m}x{k}x{n} [{r}][{c}]");
                    }
                }
            }
        }
    }

    #[test]
    fn row_tasks_are_balanced() {
        for threads in 1..=8 {
            for m in 1..2000 {
                let rows = balanced_rows(m, threads);
                let tasks = m.div_ceil(rows);
                assert!(rows >= 1 && tasks * rows >= m, "{m} rows, {threads} threads");
                // Every task but the last is full, and the last is not much smaller.
                assert!(m - (tasks - 1) * rows + tasks > rows, "{m} rows on {threads}: {rows} per task");
            }
        }
        assert_eq!(balanced_rows(196, 2), 49);
        assert_eq!(balanced_rows(49, 2), 25);
    }

    /// `(rows, k, n)` of the tile tests: every tail of rows (alone, or joining an 8-row tile
    /// as 9 to 12), narrow and half panels, packed rows (`n` of at least `PACK_FROM_COLUMNS`)
    /// and rows in place.
    const TILE_SHAPES: &[(usize, usize, usize)] = &[
        (1, 3, 16),
        (13, 5, 40),
        (49, 24, 64),
        (23, 9, 200),
        (8, 16, 96),
        (7, 1, 65),
        (11, 7, 24),
        (17, 12, 56),
        (10, 43, 48),
        (30, 17, 20),
        (25, 9, 4),
        (9, 19, 1040),
        (12, 5, 1056),
        (28, 6, 72),
        (14, 8, 1024),
        (33, 40, 1280),
    ];

    /// The AVX-512 tiles compute the AVX2 tiles' products in the same order: the same bits,
    /// for packed and in-place rows, every tail of rows, half panels, residuals, and both
    /// output layouts. Runs only on a CPU with AVX-512 (it says so otherwise).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx512_tiles_equal_the_avx2_tiles_bit_for_bit() {
        let Some(simd) = avx512::available() else {
            eprintln!("no AVX-512 on this CPU: the AVX-512 tiles are not exercised");
            return;
        };
        // Every AVX-512 CPU has FMA, so `rows_simd` runs its fused multiply-add tiles.
        for &(m, k, n) in TILE_SHAPES {
            let (x, w, bias, res) = (values(m * k, 1), values(k * n, 2), values(n, 3), values(m * n, 4));
            let packed = PackedWeights::pack(&w, k, n);
            for (residual, relu6) in
                [(None, false), (None, true), (Some(&res[..]), false), (Some(&res[..]), true)]
            {
                let e = Epilogue { bias: &bias, residual, relu6 };
                let panels = 0..n.div_ceil(NR);
                for block_rows in [0, m] {
                    if block_rows > 0 && (residual.is_some() || n % OUT_BLOCK != 0) {
                        continue;
                    }
                    let mut want = vec![f32::NAN; m * n];
                    rows_simd(
                        &x,
                        &packed,
                        panels.clone(),
                        e,
                        Out { dst: &mut want, ld: n, col0: 0, block_rows },
                    );
                    let mut got = vec![f32::NAN; m * n];
                    avx512::rows(
                        simd,
                        &x,
                        &packed,
                        panels.clone(),
                        e,
                        Out { dst: &mut got, ld: n, col0: 0, block_rows },
                    );
                    let (g, w): (Vec<u32>, Vec<u32>) = (
                        got.iter().map(|v| v.to_bits()).collect(),
                        want.iter().map(|v| v.to_bits()).collect(),
                    );
                    assert!(g == w, "{m}x{k}x{n}, residual {}, blocked {block_rows}", residual.is_some());
                }
            }
        }
    }

    /// Every register-tile configuration, whichever this CPU dispatches to: 6 rows by half
    /// panels, with and without fused multiply-adds, packed rows (outputs of at least `PACK_FROM_COLUMNS`) and rows in place.
    #[test]
    fn every_tile_configuration_matches_a_naive_product() {
        for &(m, k, n) in TILE_SHAPES {
            let (x, w, bias, res) = (values(m * k, 1), values(k * n, 2), values(n, 3), values(m * n, 4));
            let packed = PackedWeights::pack(&w, k, n);
            for (residual, relu6) in [(None, false), (Some(&res[..]), true)] {
                let e = Epilogue { bias: &bias, residual, relu6 };
                let want = naive(&x, &w, k, n, e);
                let panels = 0..n.div_ceil(NR);
                type Body = fn(&[f32], &PackedWeights, Range<usize>, Epilogue<'_>, Out<'_>);
                let run: [Body; 2] = [rows_body::<6, true>, rows_body::<6, false>];
                for (config, body) in run.iter().enumerate() {
                    let mut got = vec![f32::NAN; m * n];
                    body(
                        &x,
                        &packed,
                        panels.clone(),
                        e,
                        Out { dst: &mut got, ld: n, col0: 0, block_rows: 0 },
                    );
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                            "config {config} {m}x{k}x{n} [{i}]: {g} vs {w}"
                        );
                    }
                }
            }
        }
    }

    /// Odd sizes on every axis: partial panels, remainder rows, several tasks, k of 1.
    #[test]
    fn matches_a_naive_product_with_every_epilogue() {
        for (m, k, n) in
            [(1, 1, 1), (3, 5, 7), (4, 16, 32), (67, 24, 40), (130, 96, 24), (9, 33, 65), (49, 40, 300)]
        {
            let x = values(m * k, 1);
            let w = values(k * n, 2);
            let bias = values(n, 3);
            let res = values(m * n, 4);
            let packed = PackedWeights::pack(&w, k, n);
            for (residual, relu6) in
                [(None, false), (None, true), (Some(&res[..]), false), (Some(&res[..]), true)]
            {
                let e = Epilogue { bias: &bias, residual, relu6 };
                let got = matmul(&x, &packed, e);
                let want = naive(&x, &w, k, n, e);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{m}x{k}x{n} [{i}]: {g} vs {w}");
                }
            }
        }
    }
}
