//! The preprocessing bijection of Real NVP (§4.1), exact, and bits per dimension.
//!
//! Conventions (the flow and the CLI rely on them):
//! - dequantisation: `x = pixel + u`, `u ~ U[0, 1)` from a seeded RNG, so `x ∈ [0, 256)`;
//! - `p = α + (1 − 2α) · x / 256`, `y = logit(p) = ln p − ln(1 − p)`, default `α = 0.05`,
//!   `0 < α < 0.5` (α = 0 is an [`Error::InvalidArgument`]: it would send `x = 0` — pixel 0
//!   with noise 0 — and `x = 256` to `y = ∓∞`, `ld = +∞`), so `y` and `ld_pre` are finite
//!   for every `x ∈ [0, 256]`;
//! - per image `ld_pre = Σ_D [ln(1 − 2α) − ln 256 − ln p − ln(1 − p)]`, the log-determinant
//!   of `x ↦ y` *including* the `−D · ln 256` term, accumulated in f64;
//! - `bits/dim = −(log p(y) + ld_pre) / (D · ln 2)`: the model's log-density in logit space
//!   turned into bits per dimension of the discrete 8-bit data.
//!
//! Going back (sampling): `p = sigmoid(y)`, `x = (p − α) / (1 − 2α) · 256`, pixel =
//! `floor(x)` clamped to `0..=255`.
//!
//! All arithmetic is done in f64; the f32 entry points only round their outputs.

use crate::error::{Error, Result};
use rand::Rng;
use std::f64::consts::{LN_2, PI};

/// The paper's α.
pub const DEFAULT_ALPHA: f64 = 0.05;
/// `ln 256`.
pub const LN_256: f64 = 8.0 * LN_2;

/// Bits per dimension of the 8-bit data from a model log-density in logit space.
///
/// `log_p_y` is `log p(y)` of the flow (prior log-density plus the flow's log-det) for one
/// image, `ld_pre` that image's preprocessing log-det ([`Logit::log_det`]), `dims = C·H·W`.
pub fn bits_per_dim(log_p_y: f64, ld_pre: f64, dims: usize) -> f64 {
    -(log_p_y + ld_pre) / (dims as f64 * LN_2)
}

/// [`bits_per_dim`] per image of a batch.
pub fn bits_per_dim_batch(log_p_y: &[f64], ld_pre: &[f64], dims: usize) -> Result<Vec<f64>> {
    if log_p_y.len() != ld_pre.len() {
        return Err(Error::arg(format!(
            "{} log-densities but {} preprocessing log-dets",
            log_p_y.len(),
            ld_pre.len()
        )));
    }
    if dims == 0 {
        return Err(Error::arg("bits per dim of 0-dimensional data"));
    }
    Ok(log_p_y
        .iter()
        .zip(ld_pre)
        .map(|(&l, &d)| bits_per_dim(l, d, dims))
        .collect())
}

/// Mean of [`bits_per_dim_batch`] (an error for an empty batch).
pub fn mean_bits_per_dim(log_p_y: &[f64], ld_pre: &[f64], dims: usize) -> Result<f64> {
    let b = bits_per_dim_batch(log_p_y, ld_pre, dims)?;
    if b.is_empty() {
        return Err(Error::arg("mean bits per dim of an empty batch"));
    }
    Ok(b.iter().sum::<f64>() / b.len() as f64)
}

/// `Σ_k [−y_k²/2 − ln(2π)/2]`: the log-density of a standard normal at `y` (the identity
/// flow's `log p(y)`; a baseline and a test helper).
pub fn standard_normal_log_prob(y: &[f64]) -> f64 {
    let c = 0.5 * (2.0 * PI).ln();
    y.iter().map(|&v| -0.5 * v * v - c).sum()
}

/// The map `x ∈ [0, 256) ↦ y = logit(α + (1 − 2α) x / 256)` and its inverse.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Logit {
    /// α, in `(0, 0.5)`: private, so that every `Logit` comes from [`Logit::new`] (or
    /// `Default`) and every method, per value or per slice, may rely on it.
    alpha: f64,
}

impl Default for Logit {
    fn default() -> Self {
        Logit {
            alpha: DEFAULT_ALPHA,
        }
    }
}

/// Precomputed constants of one [`Logit`]: `(α, (1 − 2α)/256, ln(1 − 2α) − ln 256)`.
#[derive(Clone, Copy, Debug)]
struct Consts {
    alpha: f64,
    scale: f64,
    ld_const: f64,
}

impl Consts {
    /// The smallest factor `p(1 − p)` that [`Consts::run`] multiplies into its product
    /// of 8 (`TINY⁸ = 1e-304` is a normal f64).
    const TINY: f64 = 1e-38;

    #[inline]
    fn new(alpha: f64) -> Self {
        Consts {
            alpha,
            scale: (1.0 - 2.0 * alpha) / 256.0,
            ld_const: (1.0 - 2.0 * alpha).ln() - LN_256,
        }
    }

    /// `(y, ld)` at `x`; `1 − p` is computed as `α + (1 − 2α)(256 − x)/256` so that it
    /// keeps full precision near `x = 256`.
    #[inline(always)]
    fn forward(&self, x: f64) -> (f64, f64) {
        let p = self.alpha + self.scale * x;
        let q = self.alpha + self.scale * (256.0 - x);
        (p.ln() - q.ln(), self.ld_const - p.ln() - q.ln())
    }

    /// The vector kernel shared by every slice entry point: calls `put(y_k)` for each
    /// `x_k` and returns `Σ_k ld_k`. `−Σ ln p − Σ ln(1 − p)` is accumulated as `−ln` of
    /// products of 8 factors `p(1 − p)`, one logarithm per 8 values instead of two per
    /// value; rounding stays at the 1e-16 relative level. For `x ∈ [0, 256]` each factor
    /// is at least `α(1 − α) > 0`; factors of at least [`Consts::TINY`] (every factor
    /// when `α ≥ 1e-38`) keep a product of 8 above 1e-304, clear of underflow, and a
    /// smaller one (only for a smaller α) is taken as `ln p + ln(1 − p)` on its own, so
    /// the sum is finite for every `α > 0`.
    #[inline(always)]
    fn run(&self, xs: impl Iterator<Item = f64>, mut put: impl FnMut(f64)) -> f64 {
        let mut neg_ln_sum = 0.0f64;
        let mut prod = 1.0f64;
        let mut k = 0u32;
        let mut n = 0usize;
        for x in xs {
            let p = self.alpha + self.scale * x;
            let q = self.alpha + self.scale * (256.0 - x);
            put((p / q).ln());
            n += 1;
            let f = p * q;
            if f < Self::TINY {
                neg_ln_sum -= p.ln() + q.ln();
                continue;
            }
            prod *= f;
            k += 1;
            if k == 8 {
                neg_ln_sum -= prod.ln();
                prod = 1.0;
                k = 0;
            }
        }
        if k > 0 {
            neg_ln_sum -= prod.ln();
        }
        n as f64 * self.ld_const + neg_ln_sum
    }

    #[inline(always)]
    fn inverse(&self, y: f64) -> f64 {
        // sigmoid without overflow for large |y|
        let p = if y >= 0.0 {
            1.0 / (1.0 + (-y).exp())
        } else {
            let e = y.exp();
            e / (1.0 + e)
        };
        (p - self.alpha) / self.scale
    }
}

/// `floor(x)` clamped to `0..=255` (NaN gives 0).
#[inline]
fn pixel_of(x: f64) -> u8 {
    let f = x.floor();
    if f >= 255.0 {
        255
    } else if f >= 0.0 {
        f as u8
    } else {
        0
    }
}

fn check_x(x: f64, k: usize) -> Result<()> {
    if x.is_finite() && (0.0..=256.0).contains(&x) {
        Ok(())
    } else {
        Err(Error::arg(format!(
            "dequantised value {x} at index {k} is outside [0, 256]"
        )))
    }
}

fn check_noise(noise: &[f64]) -> Result<()> {
    match noise.iter().position(|u| !(0.0..1.0).contains(u)) {
        None => Ok(()),
        Some(k) => Err(Error::arg(format!(
            "dequantisation noise {} at index {k} is not in [0, 1)",
            noise[k]
        ))),
    }
}

impl Logit {
    /// A checked `Logit` (`0 < α < 0.5`).
    pub fn new(alpha: f64) -> Result<Self> {
        let l = Logit { alpha };
        l.validate()?;
        Ok(l)
    }

    /// α.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }

    /// Checks `0 < α < 0.5` ([`Error::InvalidArgument`] otherwise). α = 0 is refused:
    /// the map would send `x = 0` (pixel 0 with noise 0, which [`Dequantize::apply`] can
    /// draw) and `x = 256` to `y = ∓∞` with an infinite log-det.
    pub fn validate(&self) -> Result<()> {
        if self.alpha.is_finite() && self.alpha > 0.0 && self.alpha < 0.5 {
            Ok(())
        } else {
            Err(Error::arg(format!(
                "logit alpha {} is not in (0, 0.5) (α = 0 would map the dequantised values \
                 0 and 256 to an infinite logit)",
                self.alpha
            )))
        }
    }

    fn consts(&self) -> Result<Consts> {
        self.validate()?;
        Ok(Consts::new(self.alpha))
    }

    /// `p = α + (1 − 2α) x / 256`.
    pub fn p(&self, x: f64) -> f64 {
        self.alpha + (1.0 - 2.0 * self.alpha) * x / 256.0
    }

    /// `y(x)` for one value.
    pub fn forward_scalar(&self, x: f64) -> f64 {
        Consts::new(self.alpha).forward(x).0
    }

    /// `ln |dy/dx|` at `x`: `ln(1 − 2α) − ln 256 − ln p − ln(1 − p)`.
    pub fn log_det_scalar(&self, x: f64) -> f64 {
        Consts::new(self.alpha).forward(x).1
    }

    /// `x(y)` for one value.
    pub fn inverse_scalar(&self, y: f64) -> f64 {
        Consts::new(self.alpha).inverse(y)
    }

    /// The 8-bit pixel of `y`: `floor(x(y))` clamped to `0..=255`.
    pub fn pixel_scalar(&self, y: f64) -> u8 {
        pixel_of(self.inverse_scalar(y))
    }

    /// `y = logit(p(x))` element-wise and `ld_pre = Σ ln |dy/dx|` (f64). `x` must lie in
    /// `[0, 256]`.
    pub fn forward(&self, x: &[f32]) -> Result<(Vec<f32>, f64)> {
        let c = self.consts()?;
        for (k, &v) in x.iter().enumerate() {
            check_x(f64::from(v), k)?;
        }
        let mut y = Vec::with_capacity(x.len());
        let ld = c.run(x.iter().map(|&v| f64::from(v)), |v| y.push(v as f32));
        Ok((y, ld))
    }

    /// [`Logit::forward`] in f64.
    pub fn forward_f64(&self, x: &[f64]) -> Result<(Vec<f64>, f64)> {
        let c = self.consts()?;
        for (k, &v) in x.iter().enumerate() {
            check_x(v, k)?;
        }
        let mut y = Vec::with_capacity(x.len());
        let ld = c.run(x.iter().copied(), |v| y.push(v));
        Ok((y, ld))
    }

    /// `ld_pre` alone: `Σ ln |dy/dx|` over `x` (values in `[0, 256]`).
    pub fn log_det(&self, x: &[f64]) -> Result<f64> {
        let c = self.consts()?;
        for (k, &v) in x.iter().enumerate() {
            check_x(v, k)?;
        }
        Ok(c.run(x.iter().copied(), |_| {}))
    }

    /// `x(y)` element-wise (computed in f64, rounded to f32).
    pub fn inverse(&self, y: &[f32]) -> Vec<f32> {
        let c = Consts::new(self.alpha);
        y.iter().map(|&v| c.inverse(f64::from(v)) as f32).collect()
    }

    /// [`Logit::inverse`] in f64.
    pub fn inverse_f64(&self, y: &[f64]) -> Vec<f64> {
        let c = Consts::new(self.alpha);
        y.iter().map(|&v| c.inverse(v)).collect()
    }

    /// Pixels of `y`: sigmoid, undo the affine map, ×256, floor, clamp to `0..=255`.
    pub fn to_pixels(&self, y: &[f32]) -> Vec<u8> {
        let c = Consts::new(self.alpha);
        y.iter()
            .map(|&v| pixel_of(c.inverse(f64::from(v))))
            .collect()
    }

    /// [`Logit::to_pixels`] from f64 values.
    pub fn to_pixels_f64(&self, y: &[f64]) -> Vec<u8> {
        let c = Consts::new(self.alpha);
        y.iter().map(|&v| pixel_of(c.inverse(v))).collect()
    }
}

/// Uniform dequantisation followed by the [`Logit`] map: 8-bit pixels to `(y, ld_pre)`.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dequantize {
    /// The logit map applied after adding the noise.
    pub logit: Logit,
}

impl Dequantize {
    /// With the given α (checked: `0 < α < 0.5`).
    pub fn new(alpha: f64) -> Result<Self> {
        Ok(Dequantize {
            logit: Logit::new(alpha)?,
        })
    }

    /// Draws `n` noise values `u ~ U[0, 1)` the way [`Dequantize::apply`] does.
    pub fn noise<R: Rng + ?Sized>(rng: &mut R, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.random::<f64>()).collect()
    }

    /// `y = logit(p(pixel + u))` into `y` (f32) with explicit noise `u ∈ [0, 1)`; returns
    /// `ld_pre` (f64).
    pub fn apply_with_noise(&self, pixels: &[u8], noise: &[f64], y: &mut [f32]) -> Result<f64> {
        let c = self.logit.consts()?;
        if noise.len() != pixels.len() || y.len() != pixels.len() {
            return Err(Error::arg(format!(
                "dequantise: {} pixels, {} noise values, {} outputs",
                pixels.len(),
                noise.len(),
                y.len()
            )));
        }
        check_noise(noise)?;
        let mut out = y.iter_mut();
        let ld = c.run(
            pixels.iter().zip(noise).map(|(&px, &u)| f64::from(px) + u),
            |v| {
                if let Some(o) = out.next() {
                    *o = v as f32;
                }
            },
        );
        Ok(ld)
    }

    /// [`Dequantize::apply_with_noise`] in f64: returns `(y, ld_pre)`.
    pub fn apply_with_noise_f64(&self, pixels: &[u8], noise: &[f64]) -> Result<(Vec<f64>, f64)> {
        if noise.len() != pixels.len() {
            return Err(Error::arg(format!(
                "dequantise: {} pixels but {} noise values",
                pixels.len(),
                noise.len()
            )));
        }
        let c = self.logit.consts()?;
        check_noise(noise)?;
        let mut y = Vec::with_capacity(pixels.len());
        let ld = c.run(
            pixels.iter().zip(noise).map(|(&px, &u)| f64::from(px) + u),
            |v| y.push(v),
        );
        Ok((y, ld))
    }

    /// Dequantises with noise drawn from `rng` (one `f64` per sub-pixel, in order) and
    /// applies the logit map into `y`; returns `ld_pre`. Equal to
    /// `apply_with_noise(pixels, &Dequantize::noise(rng, n), y)`.
    pub fn apply<R: Rng + ?Sized>(&self, pixels: &[u8], rng: &mut R, y: &mut [f32]) -> Result<f64> {
        let c = self.logit.consts()?;
        if y.len() != pixels.len() {
            return Err(Error::arg(format!(
                "dequantise: {} pixels but {} outputs",
                pixels.len(),
                y.len()
            )));
        }
        let mut out = y.iter_mut();
        let ld = c.run(
            pixels.iter().map(|&px| f64::from(px) + rng.random::<f64>()),
            |v| {
                if let Some(o) = out.next() {
                    *o = v as f32;
                }
            },
        );
        Ok(ld)
    }
}
