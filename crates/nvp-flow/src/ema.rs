//! Polyak averaging: an exponential moving average of a model's trainable parameters,
//! kept as a second [`ParamStore`] of the same model, so that the averaged model is
//! built, evaluated, sampled and saved like the trained one.
//!
//! After each optimizer step, [`Ema::update`] sets every averaged parameter to
//! `avg·d + p·(1 − d)` and copies the buffers (batch-norm running statistics) as they
//! are. The decay ramps up as in TensorFlow's `ExponentialMovingAverage` with
//! `num_updates`: update `t` (from 1) uses `d = min(decay, (1 + t) / (10 + t))`, so
//! the first updates do not keep the initial parameters for thousands of steps.
//! Averaging changes which parameters are scored, not how: the averaged model is an
//! exact bijection with exact log-determinants like any other.

use candle_core::{Result, Var};

use crate::params::{is_buffer, ParamStore};

/// The decay of update `t` (from 1): `min(decay, (1 + t) / (10 + t))`.
pub fn decay_at(decay: f64, t: u64) -> f64 {
    decay.min((1.0 + t as f64) / (10.0 + t as f64))
}

/// An exponential moving average of the trainable variables of one [`ParamStore`],
/// held in another.
pub struct Ema {
    decay: f64,
    /// (live, averaged) trainable variables, by name.
    params: Vec<(Var, Var)>,
    /// (live, copy) buffers.
    buffers: Vec<(Var, Var)>,
    updates: u64,
}

impl Ema {
    /// Averages the variables of `live` into `avg`, a store of the same model (every
    /// name, with the same shapes), which starts as a copy of `live`. `decay` must be
    /// in `[0, 1)`.
    pub fn new(live: &ParamStore, avg: &ParamStore, decay: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&decay) {
            candle_core::bail!("Ema: decay must be in [0, 1), got {decay}");
        }
        avg.load_tensors(&live.tensors())?;
        let avg_vars: std::collections::HashMap<String, Var> =
            avg.named_vars().into_iter().collect();
        let (mut params, mut buffers) = (Vec::new(), Vec::new());
        for (name, var) in live.named_vars() {
            // load_tensors above checked the tensors by name; the variables still
            // differ where one store is packed and the other not.
            let Some(a) = avg_vars.get(&name).cloned() else {
                candle_core::bail!(
                    "Ema: `{name}` is a variable of the trained store but not of the \
                     averaged one (pack both the same way: ParamStore::pack)"
                );
            };
            if a.shape() != var.shape() {
                candle_core::bail!(
                    "Ema: `{name}` has shape {:?} in the trained store, {:?} in the averaged one",
                    var.dims(),
                    a.dims()
                );
            }
            if is_buffer(&name) {
                buffers.push((var, a));
            } else {
                params.push((var, a));
            }
        }
        Ok(Self {
            decay,
            params,
            buffers,
            updates: 0,
        })
    }

    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// Updates made (one per optimizer step).
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Sets the count of updates made (when the average is restored from a checkpoint).
    pub fn set_updates(&mut self, updates: u64) {
        self.updates = updates;
    }

    /// One update, after an optimizer step.
    pub fn update(&mut self) -> Result<()> {
        self.updates += 1;
        let d = decay_at(self.decay, self.updates);
        for (live, avg) in &self.params {
            let p = live.as_tensor();
            let in_place = nvp_kernels::fast_cpu_enabled()
                && nvp_kernels::adam_update_applies(p.dtype(), p.device())
                && p.is_contiguous()
                && avg.as_tensor().is_contiguous();
            if in_place {
                nvp_kernels::ema_update(avg.as_tensor(), p, d)?;
            } else {
                avg.set(&((avg.as_tensor() * d)? + (p * (1.0 - d))?)?)?;
            }
        }
        for (live, copy) in &self.buffers {
            copy.set(live.as_tensor())?;
        }
        Ok(())
    }
}
