//! The isotropic standard normal prior, with temperature for sampling.

use candle_core::{DType, Device, Result, Tensor};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal as Normal01};

/// `log N(z; 0, I) = −½ Σ z² − ½ D log 2π`, per sample.
#[derive(Debug, Clone, Copy, Default)]
pub struct StandardNormal;

impl StandardNormal {
    /// Log-density per sample of `z` (N, ..).
    pub fn log_prob(&self, z: &Tensor) -> Result<Tensor> {
        let d = z.elem_count() / z.dim(0)?;
        let half_log_2pi = 0.5 * (2.0 * std::f64::consts::PI).ln();
        z.flatten_from(1)?
            .sqr()?
            .sum(1)?
            .affine(-0.5, -half_log_2pi * d as f64)
    }

    /// `z ~ N(0, T² I)` of the given shape, drawn from `rng`: one standard normal `f64`
    /// per element in order, times `T`, rounded once to `dtype` (an f64 model gets the
    /// f64 draws unrounded; an f32 one the same values as `(z·T) as f32`).
    pub fn sample<R: Rng + ?Sized>(
        &self,
        shape: &[usize],
        temperature: f64,
        rng: &mut R,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let draw = |rng: &mut R| -> f64 {
            let z: f64 = Normal01.sample(rng);
            z * temperature
        };
        let t = if dtype == DType::F64 {
            let v: Vec<f64> = (0..n).map(|_| draw(rng)).collect();
            Tensor::from_vec(v, shape, &Device::Cpu)?
        } else {
            let v: Vec<f32> = (0..n).map(|_| draw(rng) as f32).collect();
            Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(dtype)?
        };
        t.to_device(device)
    }
}
