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

/// Lanes per block: four independent accumulators of one AVX-512 (or two AVX2) register each,
/// which hides the FMA latency.
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

/// `sum(q[i] * c[i])` of an f32 query (already multiplied by the per-dimension scales) and
/// int8 codes: the approximate score of the quantised graph walk. Same structure as
/// [`dot_body`]; the codes are widened to f32 lane by lane.
#[inline(always)]
pub(crate) fn dot_i8_body<const FMA: bool>(q: &[f32], c: &[i8]) -> f32 {
    let n = q.len().min(c.len());
    let (q, c) = (&q[..n], &c[..n]);
    let (q_blocks, q_rest) = q.as_chunks::<BLOCK>();
    let (c_blocks, c_rest) = c.as_chunks::<BLOCK>();
    let mut acc = [0.0f32; BLOCK];
    for (x, y) in q_blocks.iter().zip(c_blocks) {
        block_i8::<FMA>(&mut acc, x, y);
    }
    if !q_rest.is_empty() {
        let (mut x, mut y) = ([0.0f32; BLOCK], [0i8; BLOCK]);
        x[..q_rest.len()].copy_from_slice(q_rest);
        y[..c_rest.len()].copy_from_slice(c_rest);
        block_i8::<FMA>(&mut acc, &x, &y);
    }
    reduce(&acc)
}

#[inline(always)]
fn block_i8<const FMA: bool>(acc: &mut [f32; BLOCK], x: &[f32; BLOCK], y: &[i8; BLOCK]) {
    for i in 0..BLOCK {
        let c = f32::from(y[i]);
        acc[i] = if FMA { x[i].mul_add(c, acc[i]) } else { acc[i] + x[i] * c };
    }
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
#[multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
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
    fn int8_dot_matches_naive_for_all_tail_lengths() {
        for n in 0..300 {
            let q: Vec<f32> = (0..n).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01).collect();
            let c: Vec<i8> = (0..n).map(|i| ((i * 37 % 255) - 127) as i8).collect();
            let want: f64 = q.iter().zip(&c).map(|(a, &b)| f64::from(*a) * f64::from(b)).sum();
            for got in [dot_i8_body::<false>(&q, &c), dot_i8_body::<true>(&q, &c)] {
                assert!((f64::from(got) - want).abs() < 1e-3 * (1.0 + want.abs()), "n={n}: {got} vs {want}");
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
