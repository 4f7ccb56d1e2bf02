//! Conditioners: the networks that compute `s` and `t` of a coupling layer
//! from its masked input. They are never inverted, so they may be anything;
//! their output has twice the input's features (`raw_s`, `t`).

pub mod mlp;
pub mod resnet;

pub use mlp::{Mlp, MlpConfig};
pub use resnet::{ResNet, ResNetConfig};

use candle_core::{Result, Tensor};

use crate::flow::Mode;

/// A network from the masked input `b ⊙ x` (N, C, ..) to (N, 2C, ..).
pub trait Conditioner: Send + Sync {
    fn forward_t(&self, x: &Tensor, mode: Mode) -> Result<Tensor>;

    /// Parameters that get the L2 penalty (weight-norm gains).
    fn scale_parameters(&self) -> Vec<Tensor> {
        Vec::new()
    }

    /// Flat variables that may hold this network's tensors: each one's name and its
    /// members' names in its order (see [`crate::ParamStore::pack`]); none (the
    /// default) for a network that gains nothing from them.
    fn param_groups(&self) -> Vec<(String, Vec<String>)> {
        Vec::new()
    }

    /// Computes derived weights (weight normalisation) once, for a network whose
    /// parameters no longer change; see [`crate::RealNvp::fix_weights`]. Nothing by
    /// default.
    fn fix_weights(&mut self) -> Result<()> {
        Ok(())
    }
}
