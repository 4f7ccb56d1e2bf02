//! Building the model of a run.

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use nvp_flow::{ParamStore, RealNvp};

use crate::settings::Settings;

/// A freshly initialised model (seeded by `train.seed`).
pub fn build(s: &Settings, device: &Device) -> Result<(ParamStore, RealNvp)> {
    let store = ParamStore::new(s.train.seed);
    let model = RealNvp::new(&s.model, store.var_builder(DType::F32, device))
        .context("cannot build the model")?;
    Ok((store, model))
}

/// A graph-free twin of a trained model for evaluation and sampling: it
/// shares `store`'s storage (so it follows training) but records no autograd
/// graph, so activations are freed as the forward pass goes.
pub fn frozen(s: &Settings, store: &ParamStore, device: &Device) -> Result<RealNvp> {
    RealNvp::new(&s.model, store.frozen_var_builder(DType::F32, device))
        .context("cannot build the evaluation model")
}
