//! Augmentation: random horizontal flips (the paper's only augmentation), seeded.

use crate::error::{Error, Result};
use rand::Rng;

/// The paper's flip probability.
pub const DEFAULT_FLIP_P: f64 = 0.5;

fn check_shape(len: usize, channels: usize, height: usize, width: usize) -> Result<()> {
    if channels
        .checked_mul(height)
        .and_then(|v| v.checked_mul(width))
        != Some(len)
    {
        return Err(Error::arg(format!(
            "image of {len} bytes is not {channels}x{height}x{width}"
        )));
    }
    Ok(())
}

/// Mirrors a `C × H × W` image left–right in place.
pub fn flip_horizontal<T>(
    image: &mut [T],
    channels: usize,
    height: usize,
    width: usize,
) -> Result<()> {
    check_shape(image.len(), channels, height, width)?;
    if width > 0 {
        for row in image.chunks_exact_mut(width) {
            row.reverse();
        }
    }
    Ok(())
}

/// Random horizontal flips with probability `p`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomFlip {
    /// Probability of a flip, in `[0, 1]`.
    pub p: f64,
}

impl Default for RandomFlip {
    fn default() -> Self {
        RandomFlip { p: DEFAULT_FLIP_P }
    }
}

impl RandomFlip {
    /// A checked `RandomFlip`.
    pub fn new(p: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::arg(format!("flip probability {p} is not in [0, 1]")));
        }
        Ok(RandomFlip { p })
    }

    /// Draws one decision from `rng` (always exactly one `f64` draw, whatever `p`).
    pub fn decide<R: Rng + ?Sized>(&self, rng: &mut R) -> bool {
        rng.random::<f64>() < self.p
    }

    /// Flips `image` with probability `p`; returns whether it did.
    pub fn apply<R: Rng + ?Sized>(
        &self,
        image: &mut [u8],
        channels: usize,
        height: usize,
        width: usize,
        rng: &mut R,
    ) -> Result<bool> {
        check_shape(image.len(), channels, height, width)?;
        let flip = self.decide(rng);
        if flip {
            flip_horizontal(image, channels, height, width)?;
        }
        Ok(flip)
    }
}
