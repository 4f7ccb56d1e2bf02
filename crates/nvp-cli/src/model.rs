//! Building the model of a run.

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use nvp_flow::{ParamStore, RealNvp};

use crate::settings::Settings;

/// A freshly initialised model for training (seeded by `train.seed`). Each s/t
/// network's parameters are packed into one flat variable where its training runs as
/// one op (`nvp_kernels::resnet_one_node_enabled`: f32 on the CPU by default; on a GPU
/// with `NVP_RESNET_OPS=1`; `NVP_PACK_PARAMS=0` never packs); checkpoints hold the same
/// names either way.
pub fn build(s: &Settings, device: &Device) -> Result<(ParamStore, RealNvp)> {
    let pack = nvp_kernels::pack_params_enabled()
        && nvp_kernels::resnet_one_node_enabled(device, DType::F32);
    build_with(s, device, pack)
}

/// A freshly initialised model for evaluation and sampling only: its parameters are
/// never packed (packing serves a training step; here it would only copy them once
/// more at load time).
pub fn build_for_inference(s: &Settings, device: &Device) -> Result<(ParamStore, RealNvp)> {
    build_with(s, device, false)
}

fn build_with(s: &Settings, device: &Device, pack: bool) -> Result<(ParamStore, RealNvp)> {
    let store = ParamStore::new(s.train.seed);
    let model = if pack {
        RealNvp::new_packed(&s.model, &store, DType::F32, device)
    } else {
        RealNvp::new(&s.model, store.var_builder(DType::F32, device))
    }
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
