//! The batch-norm bijection on coupling outputs (eq. 17–18):
//! `y = (x − μ̃) / sqrt(σ̃² + ε)` per channel, with
//! `log |det| = −½ · (H·W) · Σ_c log(σ̃²_c + ε)` per sample.
//!
//! Train mode normalises with the batch statistics (biased variance; the
//! gradient flows through them, the log-det treats them as the layer's
//! parameters, as in the paper) and updates the running averages; eval mode
//! and the inverse use the running averages.
//! [`BatchNormVariant::RunningAverage`] is Appendix E's variant: training
//! normalises with `μ̃ = ρ·μ̃_prev + (1 − ρ)·μ̂_batch` (likewise σ̃²),
//! gradients flowing only through the current batch's part, and stores that
//! as the new running average (`ρ = 1 − momentum`).
//! With `affine`, a learned per-channel scale and shift follow:
//! `y = exp(log_scale) ⊙ x̂ + shift`, adding `(H·W) · Σ_c log_scale_c` to the log-det
//! (§3.7: "plus the log of any learned scale"); both start at zero (the identity).
//! Buffers: `running_mean`, `running_var`; with `affine`, parameters `log_scale`,
//! `shift`.

use candle_core::{Result, Tensor};
use candle_nn::init::Init;
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::flow::{Flow, Mode};
use crate::nn::{batch_stats, feature_shape, update_running};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BatchNormVariant {
    /// Batch statistics in training, exponential running averages for eval.
    #[default]
    Batch,
    /// Appendix E: normalise with the running average of recent batches.
    RunningAverage,
}

#[derive(Debug, Clone, Copy)]
pub struct FlowBatchNormConfig {
    pub momentum: f64,
    pub eps: f64,
    pub variant: BatchNormVariant,
    /// A learned scale (as its log) and shift per channel after the normalisation.
    pub affine: bool,
}

impl Default for FlowBatchNormConfig {
    fn default() -> Self {
        Self {
            momentum: 0.1,
            eps: 1e-5,
            variant: BatchNormVariant::Batch,
            affine: false,
        }
    }
}

/// The learned affine of [`FlowBatchNormConfig::affine`], each `(C)`.
struct Affine {
    log_scale: Tensor,
    shift: Tensor,
}

pub struct FlowBatchNorm {
    running_mean: Tensor,
    running_var: Tensor,
    affine: Option<Affine>,
    cfg: FlowBatchNormConfig,
}

impl FlowBatchNorm {
    pub fn new(channels: usize, cfg: FlowBatchNormConfig, vb: VarBuilder) -> Result<Self> {
        let affine = if cfg.affine {
            Some(Affine {
                log_scale: vb.get_with_hints(channels, "log_scale", Init::Const(0.0))?,
                shift: vb.get_with_hints(channels, "shift", Init::Const(0.0))?,
            })
        } else {
            None
        };
        Ok(Self {
            running_mean: vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?,
            running_var: vb.get_with_hints(channels, "running_var", Init::Const(1.0))?,
            affine,
            cfg,
        })
    }

    /// The learned `(log_scale, shift)`, where the layer has them.
    pub fn affine(&self) -> Option<(&Tensor, &Tensor)> {
        self.affine.as_ref().map(|a| (&a.log_scale, &a.shift))
    }

    /// `(y · exp(log_scale) + shift, ld + (H·W) · Σ log_scale)` with the affine, else
    /// the inputs unchanged.
    fn apply_affine(&self, y: Tensor, ld: Tensor) -> Result<(Tensor, Tensor)> {
        let Some(a) = &self.affine else {
            return Ok((y, ld));
        };
        let fs = feature_shape(y.dim(1)?, y.rank());
        let scale = a.log_scale.exp()?.reshape(fs.clone())?;
        let y = y
            .broadcast_mul(&scale)?
            .broadcast_add(&a.shift.reshape(fs)?)?;
        let ld_aff = (a.log_scale.sum_all()? * per_channel(&y)? as f64)?;
        let ld = ld.broadcast_add(&ld_aff)?;
        Ok((y, ld))
    }

    /// The inverse of [`FlowBatchNorm::apply_affine`] on `y`.
    fn undo_affine(&self, y: &Tensor) -> Result<Tensor> {
        let Some(a) = &self.affine else {
            return Ok(y.clone());
        };
        let fs = feature_shape(y.dim(1)?, y.rank());
        let inv_scale = a.log_scale.neg()?.exp()?.reshape(fs.clone())?;
        y.broadcast_sub(&a.shift.reshape(fs)?)?
            .broadcast_mul(&inv_scale)
    }

    pub fn running_mean(&self) -> &Tensor {
        &self.running_mean
    }

    pub fn running_var(&self) -> &Tensor {
        &self.running_var
    }

    /// Mean and variance used to normalise in `mode`, shaped `(1, C, 1, ..)`.
    /// Updates the running statistics in train mode.
    pub fn statistics(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        let fs = feature_shape(x.dim(1)?, x.rank());
        let rm = self.running_mean.reshape(fs.clone())?;
        let rv = self.running_var.reshape(fs)?;
        match mode {
            Mode::Eval => Ok((rm, rv)),
            Mode::Train => {
                let (mean, var) = batch_stats(x)?;
                let m = self.cfg.momentum;
                let (mean, var) = match self.cfg.variant {
                    BatchNormVariant::Batch => (mean, var),
                    BatchNormVariant::RunningAverage => (
                        ((rm.detach() * (1.0 - m))? + (mean * m)?)?,
                        ((rv.detach() * (1.0 - m))? + (var * m)?)?,
                    ),
                };
                match self.cfg.variant {
                    BatchNormVariant::Batch => {
                        update_running(&self.running_mean, &mean, m)?;
                        update_running(&self.running_var, &var, m)?;
                    }
                    BatchNormVariant::RunningAverage => {
                        update_running(&self.running_mean, &mean, 1.0)?;
                        update_running(&self.running_var, &var, 1.0)?;
                    }
                }
                Ok((mean, var))
            }
        }
    }
}

impl FlowBatchNorm {
    /// Whether the fused f32 CPU ops of `nvp_kernels` apply (every variant, both
    /// modes, and the inverse).
    fn fast(&self, x: &Tensor) -> bool {
        nvp_kernels::batch_norm_uses_fast_path(x, &[&self.running_mean, &self.running_var])
    }

    /// `−½ · (H·W) · Σ_c log(var_c + ε)`, broadcast to the batch.
    fn log_det(&self, x: &Tensor, var: &Tensor) -> Result<Tensor> {
        let ld = ((var + self.cfg.eps)?.log()?.sum_all()? * (-0.5 * per_channel(x)? as f64))?;
        ld.broadcast_as(x.dim(0)?)?.contiguous()
    }

    /// The fused path: one op for the statistics and the normalisation, the
    /// batch variance as a differentiable `(C)` output for the log-det.
    fn forward_fast(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        let eps = self.cfg.eps;
        match mode {
            Mode::Train if self.cfg.variant == BatchNormVariant::Batch => {
                let out = nvp_kernels::batch_norm(x, None, None, eps, false, true)?;
                let m = self.cfg.momentum;
                update_running(&self.running_mean, &out.mean, m)?;
                update_running(&self.running_var, &out.var, m)?;
                let ld = self.log_det(x, &out.var)?;
                Ok((out.y, ld))
            }
            Mode::Train => {
                // Appendix E: normalised with σ̃² = (1 − m)·running + m·batch (likewise
                // the mean), which become the new running averages.
                let m = self.cfg.momentum;
                let running = (&self.running_mean, &self.running_var);
                let out = nvp_kernels::batch_norm_blended(x, running, m, eps)?;
                let var = ((self.running_var.detach() * (1.0 - m))? + (&out.var * m)?)?;
                let ld = self.log_det(x, &var)?;
                update_running(&self.running_mean, &out.mean, m)?;
                update_running(&self.running_var, &out.var, m)?;
                Ok((out.y, ld))
            }
            Mode::Eval => {
                let running = Some((&self.running_mean, &self.running_var));
                let out = nvp_kernels::batch_norm(x, None, running, eps, false, false)?;
                let ld = self.log_det(x, &self.running_var)?;
                Ok((out.y, ld))
            }
        }
    }
}

impl Flow for FlowBatchNorm {
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        let (y, ld) = self.normalise(x, mode)?;
        self.apply_affine(y, ld)
    }

    fn inverse(&self, y: &Tensor) -> Result<Tensor> {
        let y = self.undo_affine(y)?;
        if self.fast(&y) {
            let eps = self.cfg.eps;
            return nvp_kernels::batch_norm_inverse(&y, &self.running_mean, &self.running_var, eps);
        }
        let (mean, var) = self.statistics(&y, Mode::Eval)?;
        let std = (var + self.cfg.eps)?.sqrt()?;
        y.broadcast_mul(&std)?.broadcast_add(&mean)
    }
}

impl FlowBatchNorm {
    /// The normalisation and its log-det, before the learned affine.
    fn normalise(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        if self.fast(x) {
            return self.forward_fast(x, mode);
        }
        let (mean, var) = self.statistics(x, mode)?;
        let log_var = (var + self.cfg.eps)?.log()?;
        let inv_std = (log_var.clone() * -0.5)?.exp()?;
        let y = x.broadcast_sub(&mean)?.broadcast_mul(&inv_std)?;
        let ld = (log_var.sum_all()? * (-0.5 * per_channel(x)? as f64))?;
        let ld = ld.broadcast_as(x.dim(0)?)?.contiguous()?;
        Ok((y, ld))
    }
}

/// Values per channel in one sample of `x` (`H·W` for images, 1 for vectors).
fn per_channel(x: &Tensor) -> Result<usize> {
    Ok(x.elem_count() / (x.dim(0)? * x.dim(1)?).max(1))
}
