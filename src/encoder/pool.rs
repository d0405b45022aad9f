//! Global pooling of the head's NHWC feature map `(n, h, w, c)` into `(n, c)`: average pooling
//! and generalised-mean (GeM) pooling, each with a CPU kernel (sums in f64, one pass over the
//! map) and a plain-candle form for other devices that tests compare.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::lite::Kernels;
use super::manifest::Pooling;

/// `(n, h, w, c)` -> `(n, c)` with `pooling`.
pub fn pool(map: &Tensor, pooling: Pooling, kernels: Kernels) -> candle_core::Result<Tensor> {
    let (n, h, w, c) = map.dims4()?;
    match pooling {
        _ if kernels == Kernels::Cpu => map.contiguous()?.apply_op1_no_bwd(&PoolOp { pooling }),
        Pooling::Average => map.reshape((n, h * w, c))?.mean(1),
        Pooling::Gem { p, sqrt } => gem_candle(map, p, sqrt),
    }
}

/// GeM with candle operations (any device): `clamp_min(eps)^p`, mean over positions, `^(1/p)`,
/// then the optional square root.
pub fn gem_candle(map: &Tensor, p: f32, sqrt: bool) -> candle_core::Result<Tensor> {
    let (n, h, w, c) = map.dims4()?;
    let x = map.reshape((n, h * w, c))?.maximum(Pooling::GEM_EPS)?;
    let f = x.powf(f64::from(p))?.mean(1)?.powf(1.0 / f64::from(p))?;
    if sqrt { f.sqrt() } else { Ok(f) }
}

/// The CPU pooling kernel: accumulates in f64, one image per task. (candle's mean took 0.2 ms
/// per Lite0 image, 3% of the network.)
struct PoolOp {
    pooling: Pooling,
}

impl CustomOp1 for PoolOp {
    fn name(&self) -> &'static str {
        "global-pool-nhwc"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((x0, x1)) = l.contiguous_offsets() else {
            candle_core::bail!("pool: input must be contiguous");
        };
        let [n, h, w, c] = *l.dims() else {
            candle_core::bail!("pool: input {:?} is not NHWC", l.dims());
        };
        let x = &s.as_slice::<f32>()?[x0..x1];
        let positions = h * w;
        if positions == 0 || c == 0 {
            candle_core::bail!("pool: empty feature map {:?}", l.dims());
        }
        let mut out = vec![0f32; n * c];
        pool_into(x, positions, c, self.pooling, &mut out);
        Ok((CpuStorage::F32(out), Shape::from((n, c))))
    }
}

/// Pools NHWC maps of `positions` pixels by `c` channels (`x`) into `out`, `c` values per
/// map, one map per task, summing in f64: the CPU kernel of [`pool`], also run straight on
/// the head's output buffer ([`super::lite::LiteNet::pooled_cpu`]).
pub(in crate::encoder) fn pool_into(
    x: &[f32],
    positions: usize,
    c: usize,
    pooling: Pooling,
    out: &mut [f32],
) {
    assert!(positions > 0 && c > 0, "pool: empty feature map");
    assert_eq!(x.len() / positions, out.len(), "pool: {} outputs for {} values", out.len(), x.len());
    let eps = f64::from(Pooling::GEM_EPS);
    out.par_chunks_mut(c).enumerate().for_each(|(image, dst)| {
        crate::background::yield_point();
        let mut acc = vec![0f64; c];
        let rows = x[image * positions * c..(image + 1) * positions * c].chunks_exact(c);
        match pooling {
            Pooling::Average => {
                for row in rows {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += f64::from(v);
                    }
                }
                for (d, a) in dst.iter_mut().zip(acc) {
                    *d = (a / positions as f64) as f32;
                }
            }
            Pooling::Gem { p, sqrt } => {
                let p = f64::from(p);
                let cube = p == 3.0;
                for row in rows {
                    for (a, &v) in acc.iter_mut().zip(row) {
                        let v = f64::from(v);
                        // `<` rather than `max`, so a NaN stays a NaN.
                        let v = if v < eps { eps } else { v };
                        *a += if cube { v * v * v } else { v.powf(p) };
                    }
                }
                for (d, a) in dst.iter_mut().zip(acc) {
                    let f = (a / positions as f64).powf(1.0 / p);
                    *d = (if sqrt { f.sqrt() } else { f }) as f32;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// GeM of one channel's values, in f64, straight from the definition.
    fn gem_scalar(values: &[f32], p: f64, sqrt: bool) -> f64 {
        let eps = f64::from(Pooling::GEM_EPS);
        let m = values.iter().map(|&v| f64::from(v).max(eps).powf(p)).sum::<f64>() / values.len() as f64;
        let f = m.powf(1.0 / p);
        if sqrt { f.sqrt() } else { f }
    }

    #[test]
    fn gem_kernels_match_the_definition() {
        let dev = Device::Cpu;
        for (n, h, w, c, p, sqrt) in [
            (2, 3, 4, 5, 3.0f32, true),
            (1, 7, 7, 33, 3.0, false),
            (3, 1, 1, 2, 2.5, true),
            (1, 2, 9, 16, 1.0, false),
        ] {
            // Post-ReLU6-like values, with exact zeros (below eps) among them.
            let x = Tensor::randn(0f32, 2.0, (n, h, w, c), &dev).unwrap().clamp(0f32, 6f32).unwrap();
            let values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let cpu = pool(&x, Pooling::Gem { p, sqrt }, Kernels::Cpu).unwrap().to_vec2::<f32>().unwrap();
            let generic =
                pool(&x, Pooling::Gem { p, sqrt }, Kernels::Generic).unwrap().to_vec2::<f32>().unwrap();
            for image in 0..n {
                for ch in 0..c {
                    let column: Vec<f32> =
                        (0..h * w).map(|pos| values[(image * h * w + pos) * c + ch]).collect();
                    let want = gem_scalar(&column, f64::from(p), sqrt);
                    let case = format!("{:?} image {image} channel {ch}", (n, h, w, c, p, sqrt));
                    assert!((f64::from(cpu[image][ch]) - want).abs() <= 1e-6 * want.max(1.0), "cpu {case}");
                    assert!(
                        (f64::from(generic[image][ch]) - want).abs() <= 1e-5 * want.max(1.0),
                        "generic {case}"
                    );
                }
            }
        }
    }

    #[test]
    fn gem_of_a_constant_map_is_the_constant_and_p1_is_the_mean() {
        let dev = Device::Cpu;
        let x = (Tensor::ones((1, 3, 3, 4), candle_core::DType::F32, &dev).unwrap() * 2.5).unwrap();
        for kernels in [Kernels::Cpu, Kernels::Generic] {
            let f =
                pool(&x, Pooling::Gem { p: 3.0, sqrt: false }, kernels).unwrap().to_vec2::<f32>().unwrap();
            assert!(f[0].iter().all(|&v| (v - 2.5).abs() < 1e-6), "{kernels:?} {f:?}");
            let s = pool(&x, Pooling::Gem { p: 3.0, sqrt: true }, kernels).unwrap().to_vec2::<f32>().unwrap();
            assert!(s[0].iter().all(|&v| (v - 2.5f32.sqrt()).abs() < 1e-6), "{kernels:?} {s:?}");
        }
        let y = Tensor::rand(0f32, 6.0, (2, 4, 5, 3), &dev).unwrap();
        let avg = pool(&y, Pooling::Average, Kernels::Cpu).unwrap().to_vec2::<f32>().unwrap();
        let gem1 =
            pool(&y, Pooling::Gem { p: 1.0, sqrt: false }, Kernels::Cpu).unwrap().to_vec2::<f32>().unwrap();
        for (a, g) in avg.iter().flatten().zip(gem1.iter().flatten()) {
            assert!((a - g).abs() < 1e-5, "{a} vs {g}");
        }
    }

    #[test]
    fn average_kernel_matches_candle_mean() {
        let dev = Device::Cpu;
        for (n, h, w, c) in [(1, 7, 7, 1280), (3, 2, 5, 17), (2, 1, 1, 4)] {
            let x = Tensor::rand(0f32, 6.0, (n, h, w, c), &dev).unwrap();
            let cpu = pool(&x, Pooling::Average, Kernels::Cpu).unwrap().to_vec2::<f32>().unwrap();
            let generic = pool(&x, Pooling::Average, Kernels::Generic).unwrap().to_vec2::<f32>().unwrap();
            for (a, b) in cpu.iter().flatten().zip(generic.iter().flatten()) {
                assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{:?}: {a} vs {b}", (n, h, w, c));
            }
        }
    }

    #[test]
    fn gem_refuses_bad_shapes() {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), candle_core::DType::F32, &dev).unwrap();
        assert!(pool(&x, Pooling::Gem { p: 3.0, sqrt: true }, Kernels::Cpu).is_err());
        let empty = Tensor::zeros((1, 0, 3, 2), candle_core::DType::F32, &dev).unwrap();
        assert!(pool(&empty, Pooling::Gem { p: 3.0, sqrt: true }, Kernels::Cpu).is_err());
    }
}
