//! Squeeze: `(N, C, H, W) → (N, 4C, H/2, W/2)`, each 2×2 sub-square of a
//! channel becomes 4 channels. Output channel `(di·2 + dj)·C + c` holds
//! `x[c, 2i + di, 2j + dj]`, so the channel mask's halves are the top and the
//! bottom row of each 2×2 block (not the checkerboard partition again).
//! An exact permutation: log-det 0; its inverse is [`unsqueeze`].

use candle_core::{Result, Tensor};

use crate::flow::{zero_logdet, Flow, Mode};

pub fn squeeze(x: &Tensor) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if h % 2 != 0 || w % 2 != 0 {
        candle_core::bail!("squeeze needs an even height and width, got {h}×{w}");
    }
    x.reshape(vec![n, c, h / 2, 2, w / 2, 2])?
        .permute(vec![0, 3, 5, 1, 2, 4])?
        .reshape((n, 4 * c, h / 2, w / 2))
}

pub fn unsqueeze(x: &Tensor) -> Result<Tensor> {
    let (n, c4, h, w) = x.dims4()?;
    if c4 % 4 != 0 {
        candle_core::bail!("unsqueeze needs a multiple of 4 channels, got {c4}");
    }
    let c = c4 / 4;
    x.reshape(vec![n, 2, 2, c, h, w])?
        .permute(vec![0, 3, 4, 1, 5, 2])?
        .reshape((n, c, 2 * h, 2 * w))
}

/// Squeeze as a [`Flow`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Squeeze;

impl Flow for Squeeze {
    fn forward(&self, x: &Tensor, _mode: Mode) -> Result<(Tensor, Tensor)> {
        Ok((squeeze(x)?, zero_logdet(x)?))
    }

    fn inverse(&self, y: &Tensor) -> Result<Tensor> {
        unsqueeze(y)
    }
}
