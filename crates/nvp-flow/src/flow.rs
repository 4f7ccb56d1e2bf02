//! The [`Flow`] trait: a bijection with its log-determinant.

use candle_core::{Result, Tensor};

/// Train or evaluation mode.
///
/// In [`Mode::Train`] batch-norm layers (inside the s/t networks and on the
/// coupling outputs) normalise with the statistics of the current batch and
/// update their running averages; in [`Mode::Eval`] they use the running
/// averages and change nothing. Inverses always run in evaluation mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

impl Mode {
    pub fn is_train(self) -> bool {
        matches!(self, Mode::Train)
    }
}

/// An invertible map with a tractable log-determinant.
///
/// `forward` maps `x` to `y = f(x)` and returns `log |det ∂f/∂x|` per sample
/// (a tensor of shape `(N,)`); `inverse` maps `y` back to `x` (evaluation
/// mode: `inverse(forward(x, Eval).0) == x` up to rounding).
pub trait Flow: Send + Sync {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)>;
    fn inverse(&self, y: &Tensor) -> Result<Tensor>;
}

/// Zero log-determinant of the right length, dtype and device for `x`.
pub(crate) fn zero_logdet(x: &Tensor) -> Result<Tensor> {
    Tensor::zeros(x.dim(0)?, x.dtype(), x.device())
}

/// A chain of flows: log-dets add (eq. 10–12), the inverse runs backwards.
#[derive(Default)]
pub struct Sequential {
    layers: Vec<Box<dyn Flow>>,
}

impl Sequential {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push<F: Flow + 'static>(&mut self, f: F) {
        self.layers.push(Box::new(f));
    }

    pub fn push_boxed(&mut self, f: Box<dyn Flow>) {
        self.layers.push(f);
    }

    pub fn len(&self) -> usize {
        self.layers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.layers.is_empty()
    }
}

impl Flow for Sequential {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        let mut h = x.clone();
        let mut ld = zero_logdet(x)?;
        for l in &self.layers {
            let (y, l_ld) = l.forward(&h, mode)?;
            h = y;
            ld = (ld + l_ld)?;
        }
        Ok((h, ld))
    }

    fn inverse(&self, y: &Tensor) -> Result<Tensor> {
        let mut h = y.clone();
        for l in self.layers.iter().rev() {
            h = l.inverse(&h)?;
        }
        Ok(h)
    }
}
