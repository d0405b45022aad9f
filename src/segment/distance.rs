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
/// integers: the dispatched form of [`dot_wide_body`], for scans outside the graph walks.
#[multiversion(targets("x86_64+avx2+fma", "aarch64+neon"))]
pub fn dot_wide(q: &[i16], c: &[i8]) -> i64 {
    dot_wide_body(q, c)
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
