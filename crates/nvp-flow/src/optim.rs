//! Adam (Kingma & Ba) with PyTorch's L2 convention and global gradient-norm
//! clipping, with its state exposed by name so that a training run can be
//! checkpointed and resumed exactly.
//!
//! candle-nn's `AdamW` has decoupled weight decay and keeps its moments
//! private; the paper uses plain Adam with an L2 penalty on some parameters,
//! which the caller adds to the loss.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    m: Var,
    v: Var,
}

/// Adam over named variables.
pub struct Adam {
    cfg: AdamConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl Adam {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let m = Var::zeros(var.shape(), var.dtype(), var.device())?;
                let v = Var::zeros(var.shape(), var.dtype(), var.device())?;
                Ok(Slot { name, var, m, v })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            cfg,
            slots,
            step: 0,
        })
    }

    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Number of steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Global L2 norm of the gradients of the optimised variables (f64;
    /// NaN or infinite if any gradient is).
    ///
    /// Each tensor's sum of squares stays on its device and all of them come back in
    /// one transfer (on a GPU: one synchronisation per step, not one per parameter
    /// tensor); they are added on the host in slot order, in f64.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let parts = self
            .slots
            .iter()
            .filter_map(|s| grads.get(s.var.as_tensor()))
            .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64))
            .collect::<Result<Vec<_>>>()?;
        if parts.is_empty() {
            return Ok(0.0);
        }
        let parts: Vec<f64> = Tensor::stack(&parts, 0)?.to_vec1()?;
        Ok(parts.iter().fold(0f64, |acc, p| acc + p).sqrt())
    }

    /// One Adam step; gradients are first scaled by `clip_scale` (use
    /// `min(1, max_norm / norm)` for norm clipping). Variables without a
    /// gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, clip_scale: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for s in &self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let g = if clip_scale != 1.0 {
                (g * clip_scale)?
            } else {
                g.clone()
            };
            let m = ((s.m.as_tensor() * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((s.v.as_tensor() * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
            let update = ((&m / bc1)? / denom)?;
            let new = (s.var.as_tensor() - (update * c.lr)?)?;
            s.m.set(&m)?;
            s.v.set(&v)?;
            s.var.set(&new)?;
        }
        Ok(())
    }

    /// The moments by name (`m.<param>`, `v.<param>`) for a checkpoint.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for s in &self.slots {
            out.insert(format!("m.{}", s.name), s.m.as_tensor().clone());
            out.insert(format!("v.{}", s.name), s.v.as_tensor().clone());
        }
        out
    }

    /// Restore the moments and the step count saved by [`Adam::state`].
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        for s in &self.slots {
            for (key, var) in [
                (format!("m.{}", s.name), &s.m),
                (format!("v.{}", s.name), &s.v),
            ] {
                let t = state.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state `{key}` is missing"))
                })?;
                if t.dims() != var.dims() {
                    candle_core::bail!(
                        "optimizer state `{key}` has shape {:?}, the parameter has {:?}",
                        t.dims(),
                        var.dims()
                    );
                }
                var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
            }
        }
        self.step = steps;
        Ok(())
    }
}
