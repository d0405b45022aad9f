//! Dot product of f32 vectors, vectorised per CPU with runtime dispatch (multiversion), and
//! the one L2 normalisation used for stored vectors and queries alike.
//!
//! [`dot_body`] is `#[inline(always)]` so that multiversioned callers (the search loops)
//! inline it and get the SIMD width of the target they were compiled for, without a dispatch
//! per call. [`dot`] is the stand-alone, dispatched entry point.

use multiversion::multiversion;
use multiversion::target::target_cfg_f;

/// Appends `v` scaled to unit length (computed in f64) to `out`. Rejects non-finite
/// components and a zero (or empty, or overflowing) norm, with the reason.
pub fn normalise_into(v: &[f32], out: &mut Vec<f32>) -> Result<(), &'static str> {
    let mut norm2 = 0.0f64;
    for &x in v {
        if !x.is_finite() {
            return Err("non-finite component");
        }
        norm2 += f64::from(x) * f64::from(x);
    }
    if norm2 == 0.0 || !norm2.is_finite() {
        return Err("zero or overflowing norm");
    }
    let inv = 1.0 / norm2.sqrt();
    out.extend(v.iter().map(|&x| (f64::from(x) * inv) as f32));
    Ok(())
}

/// Lanes per block: eight AVX2 registers of independent accumulators, which hides the FMA
/// latency.
const BLOCK: usize = 64;

#[inline(always)]
fn block<const FMA: bool>(acc: &mut [f32; BLOCK], x: &[f32; BLOCK], y: &[f32; BLOCK]) {
    for i in 0..BLOCK {
        acc[i] = if FMA { x[i].mul_add(y[i], acc[i]) } else { acc[i] + x[i] * y[i] };
    }
}

/// `sum(a[i] * b[i])` over the common length. `FMA` selects fused multiply-add, which is
/// only fast when the caller was compiled with the `fma` target feature.
///
/// Only fixed-size loops with constant indices after unrolling, so the accumulators stay in
/// registers (a loop with a variable index sends them to the stack). Everything called from
/// the multiversioned functions is a plain loop or an `#[inline(always)]` helper: a generic
/// std adaptor (`array::from_fn`, `Iterator::map`...) may stay out of line, compiled without
/// the target's features (`mul_add` then becomes a libm call).
#[inline(always)]
pub(crate) fn dot_body<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let (a_blocks, a_rest) = a.as_chunks::<BLOCK>();
    let (b_blocks, b_rest) = b.as_chunks::<BLOCK>();
    let mut acc = [0.0f32; BLOCK];
    for (x, y) in a_blocks.iter().zip(b_blocks) {
        block::<FMA>(&mut acc, x, y);
    }
    if !a_rest.is_empty() {
        // Zero-padded last block (dimensions that are not a multiple of 64).
        let (mut x, mut y) = ([0.0f32; BLOCK], [0.0f32; BLOCK]);
        x[..a_rest.len()].copy_from_slice(a_rest);
        y[..b_rest.len()].copy_from_slice(b_rest);
        block::<FMA>(&mut acc, &x, &y);
    }
    reduce(&acc)
}

/// Reads one byte of each 64-byte cache line of `bytes`: independent loads that the CPU
/// issues together, so the cache misses of a whole neighbour list overlap before any of them
/// is scored (a safe stand-in for a software prefetch). The caller passes the result to
/// `std::hint::black_box` so that the loads are not optimised away.
#[inline(always)]
pub(crate) fn touch_lines(bytes: &[u8]) -> u8 {
    let mut x = 0u8;
    for line in bytes.chunks(64) {
        x ^= line[0];
    }
    x
}

/// Dimensions per `i32` partial sum in [`dot_wide_body`]: `512 * 32767 * 127 < i32::MAX`, so
/// no partial sum can overflow whatever the dimension.
const WIDE_CHUNK: usize = 512;

/// Largest magnitude of a [`quantise_scaled`] value.
const WIDE_MAX: f32 = 32767.0;

/// Quantises a query for the int8 walk: `v[i] * scales[i]` (the query times the codes'
/// per-dimension scales) to `i16` with one factor, written to `out`; returns the factor. The
/// walk's approximate score is then `dot_wide_body(out, code) * factor`: integer
/// multiply-adds (`pmaddwd`), about 2.5 times the speed of widening the codes to f32. Fifteen
/// bits keep the query's own rounding error (at most `factor / 2` per component) far below
/// the codes' eight. `scales` must be at least as long as `v`.
///
/// `#[inline(always)]` with plain loops, like [`dot_body`], so that it is vectorised with the
/// caller's target features (rounding is then one instruction, not a libm call).
#[inline(always)]
pub(crate) fn quantise_scaled(v: &[f32], scales: &[f32], out: &mut Vec<i16>) -> f32 {
    let scales = &scales[..v.len()];
    // Sixteen running maxima, one per lane, so the loop vectorises without reassociation.
    let mut lanes = [0.0f32; 16];
    let (blocks, rest) = v.as_chunks::<16>();
    let (scale_blocks, scale_rest) = scales.as_chunks::<16>();
    for (b, s) in blocks.iter().zip(scale_blocks) {
        for i in 0..16 {
            let a = (b[i] * s[i]).abs();
            lanes[i] = if a > lanes[i] { a } else { lanes[i] };
        }
    }
    let mut max = 0.0f32;
    for (&x, &s) in rest.iter().zip(scale_rest) {
        let a = (x * s).abs();
        max = if a > max { a } else { max };
    }
    for a in lanes {
        max = if a > max { a } else { max };
    }
    out.clear();
    out.resize(v.len(), 0);
    if !(max > 0.0 && max.is_finite()) {
        return 0.0;
    }
    let inv = WIDE_MAX / max;
    let dst = &mut out[..v.len()];
    for i in 0..dst.len() {
        dst[i] = (v[i] * scales[i] * inv).round_ties_even().clamp(-WIDE_MAX, WIDE_MAX) as i16;
    }
    max / WIDE_MAX
}

/// `sum(q[i] * c[i])` of a [`quantise_scaled`] query and int8 codes, exact in integers (the
/// caller multiplies by the query's factor). Plain indexed loops over equal-length slices,
/// which the compiler turns into `pmaddwd` (see [`dot_body`] on why no iterator adaptors).
#[inline(always)]
pub(crate) fn dot_wide_body(q: &[i16], c: &[i8]) -> i64 {
    let n = q.len().min(c.len());
    let (q, c) = (&q[..n], &c[..n]);
    let mut total = 0i64;
    let mut at = 0;
    while at < n {
        let end = (at + WIDE_CHUNK).min(n);
        let (qc, cc) = (&q[at..end], &c[at..end]);
        let mut s = 0i32;
        for i in 0..qc.len() {
            s += i32::from(qc[i]) * i32::from(cc[i]);
        }
        total += i64::from(s);
        at = end;
    }
    total
}

/// [`dot_wide_body`] on the widest integer vectors this CPU has. On AVX-512 (pulp's safe `V4`)
/// each step widens 32 codes to `i16` and multiplies-adds them with 32 query values in one
/// 512-bit register; on AVX2 (`V3`) 16 in a 256-bit one. LLVM's own vectorisation of
/// [`dot_wide_body`] for AVX2 used 128-bit operations (8 codes per step), and the walks,
/// builds and scans of the int8 codes spent most of their arithmetic there. Elsewhere it is
/// [`dot_wide_body`], inlined into the caller's target. All are exact in integers, so they
/// give the same value (tested). The AVX-512 form is a call into a function compiled for
/// AVX-512 (it cannot be inlined into the AVX2 callers), a few nanoseconds against the tens a
/// 1,280-dimension product takes.
#[derive(Clone, Copy)]
pub(crate) struct WideDot {
    #[cfg(target_arch = "x86_64")]
    v4: Option<pulp::x86::V4>,
    #[cfg(target_arch = "x86_64")]
    v3: Option<pulp::x86::V3>,
}

impl WideDot {
    /// The widest form this CPU runs (pulp caches the feature check: a load per call).
    #[inline]
    pub(crate) fn detect() -> Self {
        WideDot {
            #[cfg(target_arch = "x86_64")]
            v4: pulp::x86::V4::try_new(),
            #[cfg(target_arch = "x86_64")]
            v3: pulp::x86::V3::try_new(),
        }
    }

    /// Every form this CPU runs, narrowest first: [`dot_wide_body`] as the callers' target
    /// compiles it (the reference), then AVX2, then AVX-512 (for tests).
    #[cfg(test)]
    pub(crate) fn each() -> Vec<Self> {
        #[cfg(target_arch = "x86_64")]
        let all = {
            let WideDot { v4, v3 } = Self::detect();
            let mut all = vec![WideDot { v4: None, v3: None }];
            all.extend(v3.map(|v3| WideDot { v4: None, v3: Some(v3) }));
            all.extend(v4.map(|v4| WideDot { v4: Some(v4), v3: None }));
            all
        };
        #[cfg(not(target_arch = "x86_64"))]
        let all = vec![Self::detect()];
        all
    }

    /// `sum(q[i] * c[i])` over the shorter length, exact.
    #[inline(always)]
    pub(crate) fn dot(self, q: &[i16], c: &[i8]) -> i64 {
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = self.v4 {
            return simd.vectorize(WideOp { simd, q, c });
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(simd) = self.v3 {
            return simd.vectorize(WideOp { simd, q, c });
        }
        dot_wide_body(q, c)
    }
}

/// [`WideDot::dot`] in one of pulp's SIMD types (`V4`, `V3`): handed to its `vectorize` as a
/// struct, not a closure, so it is `FnOnce` only and its body is compiled inside pulp's
/// function for those features (see `encoder::lite::kernels::avx512` on closures that LLVM
/// compiled without them).
#[cfg(target_arch = "x86_64")]
struct WideOp<'a, S> {
    simd: S,
    q: &'a [i16],
    c: &'a [i8],
}

/// AVX-512: 32 dimensions per step; each [`WIDE_CHUNK`] dimensions, the 16 `i32` lanes hold
/// 32 products of at most `32767 * 127` each, and all 16 together 512 of them: below
/// `i32::MAX`, as in [`dot_wide_body`].
#[cfg(target_arch = "x86_64")]
impl pulp::NullaryFnOnce for WideOp<'_, pulp::x86::V4> {
    type Output = i64;
    #[inline(always)]
    fn call(self) -> i64 {
        let WideOp { simd, q, c } = self;
        wide_chunks::<32, std::arch::x86_64::__m512i>(
            q,
            c,
            simd.avx512f._mm512_setzero_si512(),
            #[inline(always)]
            |acc, q, c| {
                let wide = simd.avx512bw._mm512_cvtepi8_epi16(pulp::cast(*c));
                simd.avx512f._mm512_add_epi32(acc, simd.avx512bw._mm512_madd_epi16(pulp::cast(*q), wide))
            },
            #[inline(always)]
            |acc| i64::from(simd.avx512f._mm512_reduce_add_epi32(acc)),
        )
    }
}

/// AVX2: 16 dimensions per step (8 lanes of 64 products per [`WIDE_CHUNK`]).
#[cfg(target_arch = "x86_64")]
impl pulp::NullaryFnOnce for WideOp<'_, pulp::x86::V3> {
    type Output = i64;
    #[inline(always)]
    fn call(self) -> i64 {
        let WideOp { simd, q, c } = self;
        wide_chunks::<16, std::arch::x86_64::__m256i>(
            q,
            c,
            simd.avx._mm256_setzero_si256(),
            #[inline(always)]
            |acc, q, c| {
                let wide = simd.avx2._mm256_cvtepi8_epi16(pulp::cast(*c));
                simd.avx2._mm256_add_epi32(acc, simd.avx2._mm256_madd_epi16(pulp::cast(*q), wide))
            },
            #[inline(always)]
            |acc| pulp::cast::<_, [i32; 8]>(acc).iter().map(|&l| i64::from(l)).sum(),
        )
    }
}

/// The loop both SIMD forms share: `W` dimensions per `step` into an accumulator that is
/// summed (`sum`) and restarted every [`WIDE_CHUNK`] dimensions; the tail by
/// [`dot_wide_body`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn wide_chunks<const W: usize, A: Copy>(
    q: &[i16],
    c: &[i8],
    zero: A,
    step: impl Fn(A, &[i16; W], &[i8; W]) -> A,
    sum: impl Fn(A) -> i64,
) -> i64 {
    let n = q.len().min(c.len());
    let (qb, q_rest) = q[..n].as_chunks::<W>();
    let (cb, c_rest) = c[..n].as_chunks::<W>();
    let mut total = 0i64;
    for (qs, cs) in qb.chunks(WIDE_CHUNK / W).zip(cb.chunks(WIDE_CHUNK / W)) {
        let mut acc = zero;
        for (qv, cv) in qs.iter().zip(cs) {
            acc = step(acc, qv, cv);
        }
        total += sum(acc);
    }
    total + dot_wide_body(q_rest, c_rest)
}

/// Codes one row with a scale of its own, for the in-memory mutable segment (whose rows arrive
/// one at a time, so no per-dimension scale can be fitted): `scale = max |v| / 127`, codes
/// `round(v / scale)` in -127..=127, written to `out`; returns the scale (0 for a zero row,
/// coded all 0). Each component's error is at most `scale / 2`. Multiversioned: rounding is
/// then one instruction, not a libm call (every upsert and every replayed log record codes
/// its row).
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub fn quantise_row(v: &[f32], out: &mut Vec<i8>) -> f32 {
    let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    out.clear();
    if !(max > 0.0 && max.is_finite()) {
        out.resize(v.len(), 0);
        return 0.0;
    }
    let inv = 127.0 / max;
    out.extend(v.iter().map(|&x| (x * inv).round_ties_even().clamp(-127.0, 127.0) as i8));
    max / 127.0
}

/// A query for [`dot_wide`] against rows coded by [`quantise_row`]: `v` to `i16` with one
/// factor, `max |v| / 32767` (see [`quantise_scaled`]), written to `out`; returns the factor
/// (0 for a zero query). Each component's error is at most `factor / 2`.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub fn quantise_query(v: &[f32], out: &mut Vec<i16>) -> f32 {
    let max = v.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    out.clear();
    if !(max > 0.0 && max.is_finite()) {
        out.resize(v.len(), 0);
        return 0.0;
    }
    let inv = WIDE_MAX / max;
    out.extend(v.iter().map(|&x| (x * inv).round_ties_even().clamp(-WIDE_MAX, WIDE_MAX) as i16));
    max / WIDE_MAX
}

/// `sum(q[i] * c[i])` of a [`quantise_query`] query and [`quantise_row`] codes, exact in
/// integers: [`WideDot::dot`] for callers outside the crate (which picks this CPU's widest
/// vectors itself, so this needs no build per target of its own).
pub fn dot_wide(q: &[i16], c: &[i8]) -> i64 {
    WideDot::detect().dot(q, c)
}

/// Fixed pairwise reduction 64 -> 16 -> 8 -> 4 -> 1.
#[inline(always)]
fn reduce(acc: &[f32; BLOCK]) -> f32 {
    let mut h = [0.0f32; 16];
    for i in 0..16 {
        h[i] = (acc[i] + acc[i + 16]) + (acc[i + 32] + acc[i + 48]);
    }
    let mut e = [0.0f32; 8];
    for i in 0..8 {
        e[i] = h[i] + h[i + 8];
    }
    let mut f = [0.0f32; 4];
    for i in 0..4 {
        f[i] = e[i] + e[i + 4];
    }
    (f[0] + f[2]) + (f[1] + f[3])
}

/// Dot product of two vectors (over the shorter length), dispatched to the best SIMD
/// implementation for this CPU.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    if target_cfg_f!(target_feature = "fma") { dot_body::<true>(a, b) } else { dot_body::<false>(a, b) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn normalise_into_scales_and_rejects_degenerate_vectors() {
        let mut out = vec![9.0];
        super::normalise_into(&[3.0, 4.0], &mut out).unwrap();
        assert_eq!(out.len(), 3);
        assert!((out[1] - 0.6).abs() < 1e-6 && (out[2] - 0.8).abs() < 1e-6);
        assert!(super::normalise_into(&[0.0, 0.0], &mut out).is_err());
        assert!(super::normalise_into(&[f32::NAN, 1.0], &mut out).is_err());
        assert!(super::normalise_into(&[], &mut out).is_err());
        assert_eq!(out.len(), 3, "a rejected vector appends nothing");
    }

    use super::*;

    fn naive(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum()
    }

    #[test]
    fn wide_dot_matches_the_exact_f32_int8_dot() {
        for n in [0usize, 1, 7, 64, 100, 511, 512, 513, 1280, 3000] {
            let scaled: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.003).collect();
            let c: Vec<i8> = (0..n).map(|i| ((i * 37 % 255) as i32 - 127) as i8).collect();
            let want: f64 = scaled.iter().zip(&c).map(|(a, &b)| f64::from(*a) * f64::from(b)).sum();
            let mut w = Vec::new();
            let factor = quantise_scaled(&scaled, &vec![1.0; n], &mut w);
            assert_eq!(w.len(), n);
            let got = dot_wide_body(&w, &c) as f64 * f64::from(factor);
            let bound: f64 = c.iter().map(|&x| f64::from(x).abs()).sum::<f64>() * f64::from(factor) * 0.5;
            assert!((got - want).abs() <= bound + 1e-4 * (1.0 + want.abs()), "n={n}: {got} vs {want}");
        }
        // The extremes never overflow: every product at its largest, over many chunks.
        let q = vec![i16::MAX; 4096];
        let c = vec![-127i8; 4096];
        assert_eq!(dot_wide_body(&q, &c), -127 * 32767 * 4096);
        let mut w = Vec::new();
        assert_eq!(quantise_scaled(&[0.0, 0.0], &[1.0, 1.0], &mut w), 0.0);
        assert_eq!(w, vec![0, 0]);
    }

    #[test]
    fn every_wide_dot_form_equals_the_plain_loop() {
        use super::{WideDot, dot_wide_body};
        let forms = WideDot::each();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Every tail length around the vector widths, several chunks of 512, and the extremes
        // (all products at +-32767 * 127, the sums' worst case for overflow).
        let lens = (0..80).chain([511, 512, 513, 1024, 1279, 1280, 1281, 2048, 4097]);
        for n in lens {
            for extreme in [false, true] {
                let q: Vec<i16> =
                    (0..n)
                        .map(|_| {
                            if extreme { if next() & 1 == 0 { 32767 } else { -32767 } } else { next() as i16 }
                        })
                        .collect();
                let c: Vec<i8> =
                    (0..n)
                        .map(|i| {
                            if extreme { if q[i] > 0 { 127 } else { -127 } } else { (next() as i8).max(-127) }
                        })
                        .collect();
                let want = dot_wide_body(&q, &c);
                for form in &forms {
                    assert_eq!(form.dot(&q, &c), want, "n {n}, extreme {extreme}");
                    // Unequal lengths: the shorter one counts.
                    assert_eq!(form.dot(&q, &c[..n / 2]), dot_wide_body(&q[..n / 2], &c[..n / 2]));
                }
            }
        }
    }

    #[test]
    fn matches_naive_for_all_tail_lengths() {
        for n in 0..300 {
            let a: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.2).collect();
            let want = naive(&a, &b);
            for got in [dot(&a, &b), dot_body::<false>(&a, &b), dot_body::<true>(&a, &b)] {
                assert!((f64::from(got) - want).abs() < 1e-3 * (1.0 + want.abs()), "n={n}: {got} vs {want}");
            }
        }
    }
}
