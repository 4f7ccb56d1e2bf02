//! The model's shape and hyper-parameters, with the paper's settings as
//! presets (§4.1): CIFAR-10 — 8 residual blocks, 64 features, one downscale;
//! 32×32 data — 4 blocks, 32 features; 64×64 data — 2 blocks, 32 features;
//! the multi-scale recursion goes on until the last scale's input is 4×4.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::batch_norm::{BatchNormVariant, FlowBatchNormConfig};
use crate::nn::BatchNormConfig;

/// A model configuration that cannot be built.
#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error("model.{key}: {msg}")]
    Invalid { key: &'static str, msg: String },
}

/// The most scales a model may have (2^16-pixel sides).
const MAX_SCALES: usize = 16;

/// The most parameters a model may have (about 8 GB of f32 weights; training holds
/// four times that with the gradients and Adam's moments).
const MAX_PARAMETERS: f64 = 2e9;

fn invalid(key: &'static str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        msg: msg.into(),
    }
}

/// Shape of a multi-scale Real NVP (§3.6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RealNvpConfig {
    /// Image channels (3 for RGB).
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Number of scales; each but the last squeezes and factors out half.
    pub scales: usize,
    /// Residual blocks in each s/t network.
    pub res_blocks: usize,
    /// Hidden feature maps at the first scale (doubled at each coarser scale).
    pub features: usize,
    /// Checkerboard couplings per scale before the squeeze.
    pub checkerboard_couplings: usize,
    /// Channel couplings per scale after the squeeze.
    pub channel_couplings: usize,
    /// Checkerboard couplings of the final scale.
    pub final_couplings: usize,
    /// Momentum of every running average (PyTorch convention: new-value weight).
    pub bn_momentum: f64,
    pub bn_eps: f64,
    /// Batch-norm on coupling outputs: `batch` or Appendix E's `running-average`.
    pub bn_variant: BatchNormVariant,
    /// A learned per-channel scale and shift after each coupling-output batch norm
    /// (§3.7's "learned scale", whose log enters the log-det). Off in the presets, as
    /// in the PyTorch peer.
    pub bn_affine: bool,
    /// Class-conditional on this many classes (App. F): every s/t network also sees
    /// the sample's one-hot label (or any `(N, classes)` condition vector) as constant
    /// input planes. 0: unconditional (the presets).
    pub classes: usize,
}

impl Default for RealNvpConfig {
    fn default() -> Self {
        Self::cifar10()
    }
}

impl RealNvpConfig {
    /// The paper's CIFAR-10 setting: 8 blocks, 64 features, downscale once.
    pub fn cifar10() -> Self {
        Self {
            channels: 3,
            height: 32,
            width: 32,
            scales: 2,
            res_blocks: 8,
            features: 64,
            checkerboard_couplings: 3,
            channel_couplings: 3,
            final_couplings: 4,
            bn_momentum: 0.1,
            bn_eps: 1e-5,
            bn_variant: BatchNormVariant::Batch,
            bn_affine: false,
            classes: 0,
        }
    }

    /// The PyTorch peer's 'small': CIFAR-10 with 4 blocks and 32 features.
    pub fn cifar10_small() -> Self {
        Self {
            res_blocks: 4,
            features: 32,
            ..Self::cifar10()
        }
    }

    /// 32×32 ImageNet: 4 blocks, 32 features, scales down to 4×4.
    pub fn imagenet32() -> Self {
        Self {
            scales: 4,
            res_blocks: 4,
            features: 32,
            ..Self::cifar10()
        }
    }

    /// 64×64 data (ImageNet 64, CelebA, LSUN): 2 blocks, 32 features,
    /// scales down to 4×4.
    pub fn size64() -> Self {
        Self {
            height: 64,
            width: 64,
            scales: 5,
            res_blocks: 2,
            features: 32,
            ..Self::cifar10()
        }
    }

    /// A preset by name: `cifar10`, `cifar10-small`, `imagenet32`,
    /// `imagenet64`, `celeba64`, `lsun`.
    pub fn preset(name: &str) -> Option<Self> {
        Some(match name {
            "cifar10" => Self::cifar10(),
            "cifar10-small" => Self::cifar10_small(),
            "imagenet32" => Self::imagenet32(),
            "imagenet64" | "celeba64" | "lsun" => Self::size64(),
            _ => return None,
        })
    }

    /// About how many parameters the model has: the 3×3 convolutions' weights of every
    /// s/t network (input, two per residual block, output), which are all but about 1 %
    /// of them (biases, batch-norm and weight-norm gains are left out). In f64, so
    /// that any configuration gives a number.
    pub fn approx_parameters(&self) -> f64 {
        let net = |cin: f64, f: f64, cout: f64| {
            9.0 * (cin * f + self.res_blocks as f64 * 2.0 * f * f + f * cout)
        };
        let k = self.classes as f64;
        let mut total = 0.0;
        for scale in 0..self.scales.min(64) {
            let c = self.channels as f64 * 2f64.powi(scale as i32);
            let f = self.features as f64 * 2f64.powi(scale as i32);
            if scale + 1 == self.scales {
                total += self.final_couplings as f64 * net(c + k, f, 2.0 * c);
            } else {
                total += self.checkerboard_couplings as f64 * net(c + k, f, 2.0 * c);
                total += self.channel_couplings as f64 * net(2.0 * c + k, f, 4.0 * c);
            }
        }
        total
    }

    /// Dimensions of one sample, `C·H·W`.
    pub fn dims(&self) -> usize {
        self.channels * self.height * self.width
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.channels == 0 {
            return Err(invalid("channels", "must be at least 1"));
        }
        if self.scales == 0 {
            return Err(invalid("scales", "must be at least 1"));
        }
        if self.features == 0 {
            return Err(invalid("features", "must be at least 1"));
        }
        if self.scales > MAX_SCALES {
            return Err(invalid(
                "scales",
                format!("must be at most {MAX_SCALES}, got {}", self.scales),
            ));
        }
        let params = self.approx_parameters();
        if params > MAX_PARAMETERS {
            return Err(invalid(
                "features",
                format!(
                    "with res-blocks = {} and features = {} the model would have about {params:.3e} \
                     parameters, more than {MAX_PARAMETERS:.0e} (the paper's CIFAR-10 model has 1.3e7)",
                    self.res_blocks, self.features
                ),
            ));
        }
        let f = 1usize << (self.scales - 1);
        if !self.height.is_multiple_of(f) || !self.width.is_multiple_of(f) {
            return Err(invalid(
                "scales",
                format!(
                    "{} scales halve the image {} times: {}×{} is not divisible by {f}",
                    self.scales,
                    self.scales - 1,
                    self.height,
                    self.width
                ),
            ));
        }
        if self.height / f < 2 || self.width / f < 2 {
            return Err(invalid(
                "scales",
                format!(
                    "the final scale would be {}×{}; a checkerboard needs at least 2×2",
                    self.height / f,
                    self.width / f
                ),
            ));
        }
        if self.final_couplings == 0 {
            return Err(invalid("final-couplings", "must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.bn_momentum) {
            return Err(invalid("bn-momentum", "must be in [0, 1]"));
        }
        if self.bn_eps.is_nan() || self.bn_eps <= 0.0 {
            return Err(invalid("bn-eps", "must be positive"));
        }
        Ok(())
    }

    pub(crate) fn inner_bn(&self) -> BatchNormConfig {
        BatchNormConfig {
            momentum: self.bn_momentum,
            eps: self.bn_eps,
        }
    }

    pub(crate) fn flow_bn(&self) -> FlowBatchNormConfig {
        FlowBatchNormConfig {
            momentum: self.bn_momentum,
            eps: self.bn_eps,
            variant: self.bn_variant,
            affine: self.bn_affine,
        }
    }
}
