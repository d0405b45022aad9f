//! Deterministic synthetic embeddings for tests, benchmarks and comparisons: points of low
//! intrinsic dimension mapped into a high-dimensional space, plus noise, L2-normalised.
//!
//! Uniform random vectors make any ANN index look broken (no neighbourhood structure); real
//! embeddings live near a low-dimensional manifold, which this imitates.

use std::path::Path;

use super::{GraphLayout, SegmentError, SegmentStats, write_segment_with_graph};
use crate::ids::SkuId;

/// SplitMix64: a tiny, seedable, well-mixed PRNG (no external crate needed).
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in 0..bound (bound > 0).
    pub fn below(&mut self, bound: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(bound)) >> 64) as u64
    }

    /// Standard normal (Box-Muller).
    pub fn gaussian(&mut self) -> f64 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]
        let u2 = self.next_f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}

/// Shape of a synthetic data set.
#[derive(Debug, Clone, Copy)]
pub struct Structured {
    pub dim: usize,
    /// Intrinsic dimension of the latent space.
    pub latent: usize,
    /// Standard deviation of the per-coordinate noise relative to the signal's.
    pub noise: f64,
    pub seed: u64,
}

impl Structured {
    /// A fixed random linear map `latent -> dim` derived from the seed.
    fn projection(&self) -> Vec<f64> {
        let mut rng = SplitMix64::new(self.seed ^ 0xA5A5_5A5A_C3C3_3C3C);
        (0..self.latent * self.dim).map(|_| rng.gaussian()).collect()
    }

    /// Rows `start..start+count` of the data set (row i depends only on the seed and i, so
    /// base and query sets can be cut from disjoint ranges of one distribution).
    pub fn rows(&self, start: u64, count: usize) -> Vec<f32> {
        let sampler = self.sampler();
        let mut out = Vec::with_capacity(count * self.dim);
        for i in 0..count as u64 {
            let mut rng = SplitMix64::new(self.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (start + i));
            out.extend(sampler.sample(&mut rng));
        }
        out
    }

    /// Draws points of this shape from any [`SplitMix64`] (the projection is computed once).
    pub fn sampler(&self) -> Sampler {
        let noise = self.noise * (self.latent as f64).sqrt();
        Sampler { dim: self.dim, latent: self.latent, noise, proj: self.projection() }
    }
}

/// Draws unit vectors of one [`Structured`] shape ([`Structured::sampler`]).
#[derive(Debug, Clone)]
pub struct Sampler {
    dim: usize,
    latent: usize,
    /// The noise's standard deviation per coordinate (the shape's relative noise, scaled).
    noise: f64,
    proj: Vec<f64>,
}

impl Sampler {
    /// One point: a Gaussian latent vector projected to `dim`, plus noise, L2-normalised.
    pub fn sample(&self, rng: &mut SplitMix64) -> Vec<f32> {
        let z: Vec<f64> = (0..self.latent).map(|_| rng.gaussian()).collect();
        let mut x: Vec<f64> = (0..self.dim).map(|_| self.noise * rng.gaussian()).collect();
        for (zi, row) in z.iter().zip(self.proj.chunks_exact(self.dim)) {
            for (xv, p) in x.iter_mut().zip(row) {
                *xv += zi * p;
            }
        }
        let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt().max(f64::MIN_POSITIVE);
        x.iter().map(|v| (v / norm) as f32).collect()
    }
}

/// Random unit vectors and a random graph with HNSW's shape (geometric levels, degree 2M on
/// layer 0, M above).
pub fn random_segment(
    path: &Path,
    n: usize,
    dim: usize,
    m: usize,
    seed: u64,
) -> Result<SegmentStats, SegmentError> {
    let mut rng = SplitMix64::new(seed);
    let mut vectors = Vec::with_capacity(n * dim);
    for _ in 0..n {
        let row: Vec<f64> = (0..dim).map(|_| rng.gaussian()).collect();
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        vectors.extend(row.iter().map(|x| (x / norm) as f32));
    }
    let inv_ln_m = 1.0 / (m as f64).ln();
    let levels: Vec<u8> =
        (0..n).map(|_| ((-(1.0 - rng.next_f64()).ln() * inv_ln_m).floor() as u8).min(15)).collect();
    let max_level = *levels.iter().max().expect("n > 0");
    let on_layer: Vec<Vec<u32>> =
        (0..=max_level).map(|l| (0..n as u32).filter(|&i| levels[i as usize] >= l).collect()).collect();
    let mut pick = |pool: &[u32], me: u32, slots: usize, out: &mut Vec<u32>| {
        let start = out.len();
        for _ in 0..slots {
            let cand = pool[rng.below(pool.len() as u64) as usize];
            if cand != me && !out[start..].contains(&cand) {
                out.push(cand);
            }
        }
        out.resize(start + slots, u32::MAX);
    };
    let mut layer0 = Vec::with_capacity(n * 2 * m);
    let mut upper = Vec::new();
    for i in 0..n as u32 {
        pick(&on_layer[0], i, 2 * m, &mut layer0);
        for l in 1..=levels[i as usize] {
            pick(&on_layer[l as usize], i, m, &mut upper);
        }
    }
    let entry_point = on_layer[max_level as usize][0];
    let graph = GraphLayout {
        dim,
        m,
        ef_construction: 0,
        vectors: &vectors,
        levels: &levels,
        layer0: &layer0,
        upper: &upper,
        entry_point,
    };
    let skus: Vec<SkuId> = (0..n).map(|i| SkuId::new(format!("sku-{i:08}")).expect("valid sku")).collect();
    write_segment_with_graph(path, &graph, &skus)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_deterministic_normalised_and_sliceable() {
        let s = Structured { dim: 32, latent: 4, noise: 0.1, seed: 7 };
        let all = s.rows(0, 10);
        assert_eq!(all, s.rows(0, 10));
        assert_eq!(&all[5 * 32..], &s.rows(5, 5)[..]);
        for row in all.chunks_exact(32) {
            let n: f32 = row.iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-4);
        }
        assert_ne!(all, Structured { seed: 8, ..s }.rows(0, 10));
    }

    #[test]
    fn below_stays_in_range() {
        let mut r = SplitMix64::new(1);
        assert!((0..1000).all(|_| r.below(7) < 7));
    }
}
