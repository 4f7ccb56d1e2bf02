//! 2-D toy distributions for vector flows: two moons, concentric rings, 8 Gaussians,
//! checkerboard, two spirals. All roughly within `[-4, 4]²`, seeded through the RNG the
//! caller passes.

use crate::error::{Error, Result};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use std::f64::consts::{FRAC_1_SQRT_2, PI};
use std::str::FromStr;

/// A 2-D toy distribution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Toy2d {
    /// Two interleaved half circles (noise σ = 0.1 before scaling by 2).
    Moons,
    /// Concentric rings of radii 1, 2, 3 (points ∝ radius, noise σ = 0.08).
    Rings,
    /// Eight Gaussians (σ ≈ 0.35) on a circle of radius 2√2.
    EightGaussians,
    /// Uniform on the dark squares of a 4×4 checkerboard over `[-4, 4]²`.
    Checkerboard,
    /// Two interleaved spirals.
    Spiral,
}

impl Toy2d {
    /// All kinds.
    pub const ALL: [Toy2d; 5] = [
        Toy2d::Moons,
        Toy2d::Rings,
        Toy2d::EightGaussians,
        Toy2d::Checkerboard,
        Toy2d::Spiral,
    ];

    /// The canonical name (accepted by `FromStr`).
    pub fn name(&self) -> &'static str {
        match self {
            Toy2d::Moons => "moons",
            Toy2d::Rings => "rings",
            Toy2d::EightGaussians => "8gaussians",
            Toy2d::Checkerboard => "checkerboard",
            Toy2d::Spiral => "spiral",
        }
    }
}

impl std::fmt::Display for Toy2d {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Toy2d {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let k: String = s
            .to_ascii_lowercase()
            .chars()
            .filter(|c| !matches!(c, '-' | '_' | ' '))
            .collect();
        Ok(match k.as_str() {
            "moons" | "twomoons" | "2moons" => Toy2d::Moons,
            "rings" | "circles" | "concentricrings" => Toy2d::Rings,
            "8gaussians" | "eightgaussians" | "gaussians" => Toy2d::EightGaussians,
            "checkerboard" | "checker" => Toy2d::Checkerboard,
            "spiral" | "spirals" | "2spirals" | "twospirals" => Toy2d::Spiral,
            _ => {
                return Err(Error::UnknownToy {
                    name: s.to_string(),
                    known: Toy2d::ALL.map(|t| t.name()).join(", "),
                })
            }
        })
    }
}

fn normal<R: Rng + ?Sized>(rng: &mut R) -> f64 {
    StandardNormal.sample(rng)
}

fn one<R: Rng + ?Sized>(kind: Toy2d, rng: &mut R) -> [f64; 2] {
    match kind {
        Toy2d::Moons => {
            let t = rng.random_range(0.0..PI);
            let (x, y) = if rng.random::<bool>() {
                (t.cos(), t.sin())
            } else {
                (1.0 - t.cos(), 0.5 - t.sin())
            };
            let x = x + 0.1 * normal(rng);
            let y = y + 0.1 * normal(rng);
            [2.0 * x - 1.0, 2.0 * y - 0.5]
        }
        Toy2d::Rings => {
            // P(radius r) ∝ r: uniform density along the circumferences
            let u = rng.random_range(0.0..6.0);
            let r = if u < 1.0 {
                1.0
            } else if u < 3.0 {
                2.0
            } else {
                3.0
            };
            let a = rng.random_range(0.0..2.0 * PI);
            [
                r * a.cos() + 0.08 * normal(rng),
                r * a.sin() + 0.08 * normal(rng),
            ]
        }
        Toy2d::EightGaussians => {
            let k = rng.random_range(0..8u32);
            let a = f64::from(k) * PI / 4.0;
            let r = 4.0 * FRAC_1_SQRT_2;
            let sd = 0.5 * FRAC_1_SQRT_2;
            [
                r * a.cos() + sd * normal(rng),
                r * a.sin() + sd * normal(rng),
            ]
        }
        Toy2d::Checkerboard => {
            let x1 = rng.random_range(-2.0..2.0f64);
            let x2 = rng.random_range(0.0..1.0f64) - 2.0 * f64::from(rng.random_range(0..2u32));
            let x2 = x2 + (x1.floor().rem_euclid(2.0));
            [2.0 * x1, 2.0 * x2]
        }
        Toy2d::Spiral => {
            let n = rng.random::<f64>().sqrt() * 3.0 * PI;
            let sign = if rng.random::<bool>() { 1.0 } else { -1.0 };
            let x = sign * (-n.cos() * n) + 0.3 * normal(rng);
            let y = sign * (n.sin() * n) + 0.3 * normal(rng);
            [x / 2.5, y / 2.5]
        }
    }
}

/// `n` samples of `kind`.
pub fn sample<R: Rng + ?Sized>(kind: Toy2d, n: usize, rng: &mut R) -> Vec<[f32; 2]> {
    (0..n)
        .map(|_| {
            let [x, y] = one(kind, rng);
            [x as f32, y as f32]
        })
        .collect()
}

/// [`sample`] as a flat `[x0, y0, x1, y1, …]` vector (an `(n, 2)` row-major matrix).
pub fn sample_flat<R: Rng + ?Sized>(kind: Toy2d, n: usize, rng: &mut R) -> Vec<f32> {
    sample(kind, n, rng).into_iter().flatten().collect()
}

/// [`sample`] in f64.
pub fn sample_f64<R: Rng + ?Sized>(kind: Toy2d, n: usize, rng: &mut R) -> Vec<[f64; 2]> {
    (0..n).map(|_| one(kind, rng)).collect()
}
