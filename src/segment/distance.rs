//! Dot product of f32 vectors, vectorised per CPU with runtime dispatch (multiversion).
//!
//! [`dot_body`] is `#[inline(always)]` so that multiversioned callers (the search loops)
//! inline it and get the SIMD width of the target they were compiled for, without a dispatch
//! per call. [`dot`] is the stand-alone, dispatched entry point.

use multiversion::multiversion;
use multiversion::target::target_cfg_f;

/// Lanes in one block of independent accumulators: 4 AVX-512 or 8 AVX2 registers.
const BLOCK: usize = 64;
/// Lanes for the tail that does not fill a whole block.
const SMALL: usize = 16;

/// `sum(a[i] * b[i])` over the common length. `FMA` selects fused multiply-add, which is
/// only fast when the caller was compiled with the `fma` target feature.
#[inline(always)]
pub(crate) fn dot_body<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let (a_blocks, a_rest) = a.as_chunks::<BLOCK>();
    let (b_blocks, b_rest) = b.as_chunks::<BLOCK>();
    let mut acc = [0.0f32; BLOCK];
    for (x, y) in a_blocks.iter().zip(b_blocks) {
        for i in 0..BLOCK {
            acc[i] = if FMA { x[i].mul_add(y[i], acc[i]) } else { acc[i] + x[i] * y[i] };
        }
    }
    let (a_small, a_tail) = a_rest.as_chunks::<SMALL>();
    let (b_small, b_tail) = b_rest.as_chunks::<SMALL>();
    let mut acc16 = [0.0f32; SMALL];
    for (x, y) in a_small.iter().zip(b_small) {
        for i in 0..SMALL {
            acc16[i] = if FMA { x[i].mul_add(y[i], acc16[i]) } else { acc16[i] + x[i] * y[i] };
        }
    }
    // Pairwise reduction: 64 -> 16 lanes, fold in the small accumulator, then 16 -> 1.
    for i in 0..SMALL {
        acc16[i] += (acc[i] + acc[i + SMALL]) + (acc[i + 2 * SMALL] + acc[i + 3 * SMALL]);
    }
    let mut lanes = acc16;
    let mut width = SMALL / 2;
    while width > 0 {
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
        width /= 2;
    }
    let mut sum = lanes[0];
    for (x, y) in a_tail.iter().zip(b_tail) {
        sum += x * y;
    }
    sum
}

/// Dot product of two vectors (over the shorter length), dispatched to the best SIMD
/// implementation for this CPU.
#[multiversion(targets("x86_64+avx512f+avx2+fma", "x86_64+avx2+fma", "aarch64+neon"))]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    if target_cfg_f!(target_feature = "fma") { dot_body::<true>(a, b) } else { dot_body::<false>(a, b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum()
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
