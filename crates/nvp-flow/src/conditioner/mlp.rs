//! An MLP conditioner for vector couplings (2-D toy flows, tabular data):
//! `Linear(D→H)`, ReLU, `hidden_layers − 1` × `Linear(H→H)`, ReLU,
//! `Linear(H→2D)` starting at zero (identity coupling).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::Conditioner;
use crate::flow::Mode;
use crate::nn::Linear;

#[derive(Debug, Clone, Copy)]
pub struct MlpConfig {
    /// Input features `D`; the output has `2D`.
    pub features: usize,
    pub hidden: usize,
    pub hidden_layers: usize,
}

impl Default for MlpConfig {
    fn default() -> Self {
        Self {
            features: 2,
            hidden: 64,
            hidden_layers: 2,
        }
    }
}

/// Parameter names: `layers.{i}.{weight,bias}`, `out.{weight,bias}`.
#[derive(Debug, Clone)]
pub struct Mlp {
    layers: Vec<Linear>,
    out: Linear,
}

impl Mlp {
    pub fn new(cfg: MlpConfig, vb: VarBuilder) -> Result<Self> {
        let n = cfg.hidden_layers.max(1);
        let layers = (0..n)
            .map(|i| {
                let din = if i == 0 { cfg.features } else { cfg.hidden };
                Linear::new(din, cfg.hidden, false, vb.pp("layers").pp(i))
            })
            .collect::<Result<Vec<_>>>()?;
        let out = Linear::new(cfg.hidden, 2 * cfg.features, true, vb.pp("out"))?;
        Ok(Self { layers, out })
    }
}

impl Conditioner for Mlp {
    fn forward_t(&self, x: &Tensor, _mode: Mode) -> Result<Tensor> {
        let mut h = x.clone();
        for l in &self.layers {
            h = l.forward(&h)?.relu()?;
        }
        self.out.forward(&h)
    }
}
