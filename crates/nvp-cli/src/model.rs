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
