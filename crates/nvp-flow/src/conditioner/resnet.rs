//! The s/t residual network of the image couplings (§3.7 of the paper):
//! `WN-conv3×3(C→F)` → `n` pre-activation blocks
//! `[BN, ReLU, WN-conv3×3, BN, ReLU, WN-conv3×3] + skip` → `BN` → `ReLU` →
//! `WN-conv3×3(F→2C)` with a zero gain, so every coupling starts at the identity.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::Conditioner;
use crate::flow::Mode;
use crate::nn::{record_running, BatchNorm, BatchNormConfig, WnConv2d, WnConvConfig};

/// Shape of a [`ResNet`].
#[derive(Debug, Clone, Copy)]
pub struct ResNetConfig {
    /// Input channels `C`; the output has `2C`.
    pub channels: usize,
    /// Extra input channels after the `C` (a class-conditional coupling's label
    /// planes); the output still has `2C`.
    pub cond_channels: usize,
    /// Hidden feature maps `F`.
    pub features: usize,
    /// Residual blocks.
    pub blocks: usize,
    pub bn: BatchNormConfig,
}

impl Default for ResNetConfig {
    fn default() -> Self {
        Self {
            channels: 3,
            cond_channels: 0,
            features: 64,
            blocks: 8,
            bn: BatchNormConfig::default(),
        }
    }
}

#[derive(Debug, Clone)]
struct ResBlock {
    bn1: BatchNorm,
    conv1: WnConv2d,
    bn2: BatchNorm,
    conv2: WnConv2d,
}

impl ResBlock {
    fn new(f: usize, bn: BatchNormConfig, vb: VarBuilder) -> Result<Self> {
        let wn = WnConvConfig { zero_init: false };
        Ok(Self {
            bn1: BatchNorm::new(f, bn, vb.pp("bn1"))?,
            conv1: WnConv2d::new(f, f, wn, vb.pp("conv1"))?,
            bn2: BatchNorm::new(f, bn, vb.pp("bn2"))?,
            conv2: WnConv2d::new(f, f, wn, vb.pp("conv2"))?,
        })
    }

    fn forward(&self, h: &Tensor, mode: Mode) -> Result<Tensor> {
        let r = self.conv1.forward_after(&self.bn1, h, mode, None)?;
        self.conv2.forward_after(&self.bn2, &r, mode, Some(h))
    }
}

/// The names of a network's packed variables, under its prefix: the trainable
/// parameters, and the batch norms' running means and variances (buffers).
const PACKED: &str = "packed";
const PACKED_MEAN: &str = "packed_running_mean";
const PACKED_VAR: &str = "packed_running_var";

/// A train-mode network as one op: `(x, packed parameters, shape, eps)`.
type Fused =
    fn(&Tensor, &Tensor, nvp_kernels::ResNetShape, f64) -> Result<nvp_kernels::ResNetTrainOutput>;

/// The residual s/t network. Parameter names: `inp.{v,g,bias}`,
/// `blocks.{i}.{bn1,conv1,bn2,conv2}.*`, `bn_out.*`, `out.{v,g,bias}`.
///
/// Its trainable parameters can live in one flat variable, `packed` under the
/// network's prefix, and its batch norms' running means and variances in two more
/// (`packed_running_mean`, `packed_running_var`; [`ResNet::param_groups`],
/// [`crate::ParamStore::pack`]). Built over such a store, the network hands the first
/// to its one-node training op as it is, where it would otherwise concatenate the ~90
/// tensors in every step (autograd and the optimizer see one tensor), and moves all
/// its running averages in one update per step instead of one per batch norm.
#[derive(Debug, Clone)]
pub struct ResNet {
    inp: WnConv2d,
    blocks: Vec<ResBlock>,
    bn_out: BatchNorm,
    out: WnConv2d,
    /// The builder's prefix (this network's parameter names start with it).
    prefix: String,
    /// The packed variable, where the store holds one.
    packed: Option<Tensor>,
    /// The packed running means and variances, where the store holds them.
    running: Option<(Tensor, Tensor)>,
}

impl ResNet {
    pub fn new(cfg: ResNetConfig, vb: VarBuilder) -> Result<Self> {
        let f = cfg.features;
        let inp = WnConv2d::new(
            cfg.channels + cfg.cond_channels,
            f,
            WnConvConfig { zero_init: false },
            vb.pp("inp"),
        )?;
        let blocks = (0..cfg.blocks)
            .map(|i| ResBlock::new(f, cfg.bn, vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let bn_out = BatchNorm::new(f, cfg.bn, vb.pp("bn_out"))?;
        let out = WnConv2d::new(
            f,
            2 * cfg.channels,
            WnConvConfig { zero_init: true },
            vb.pp("out"),
        )?;
        let mut net = Self {
            inp,
            blocks,
            bn_out,
            out,
            prefix: vb.prefix(),
            packed: None,
            running: None,
        };
        if vb.contains_tensor(PACKED) {
            net.packed = Some(vb.get(net.shape().param_len_weight_norm(), PACKED)?);
        }
        if vb.contains_tensor(PACKED_MEAN) && vb.contains_tensor(PACKED_VAR) {
            let len = net.norm_names().len() * f;
            net.running = Some((vb.get(len, PACKED_MEAN)?, vb.get(len, PACKED_VAR)?));
        }
        Ok(net)
    }

    fn shape(&self) -> nvp_kernels::ResNetShape {
        nvp_kernels::ResNetShape {
            cin: self.inp.in_channels(),
            features: self.inp.bias().dims()[0],
            blocks: self.blocks.len(),
            cout: self.out.bias().dims()[0],
        }
    }

    /// The packed variables' names and their members' names (see
    /// [`crate::ParamStore::pack`]): the trainable parameters in the packed order of
    /// `nvp_kernels::ResNetShape::param_len_weight_norm`, then the batch norms'
    /// running means and running variances, each in the order of the batch statistics
    /// the one-node ops return.
    pub fn param_groups(&self) -> Vec<(String, Vec<String>)> {
        let names = self.raw_params().into_iter().map(|(n, _)| n).collect();
        let running = |stat: &str| -> Vec<String> {
            self.norm_names()
                .iter()
                .map(|n| self.full_name(&format!("{n}.{stat}")))
                .collect()
        };
        vec![
            (self.full_name(PACKED), names),
            (self.full_name(PACKED_MEAN), running("running_mean")),
            (self.full_name(PACKED_VAR), running("running_var")),
        ]
    }

    /// The batch norms' names under this network, in [`ResNet::batch_norms`]' order.
    fn norm_names(&self) -> Vec<String> {
        (0..self.blocks.len())
            .flat_map(|i| [format!("blocks.{i}.bn1"), format!("blocks.{i}.bn2")])
            .chain(std::iter::once("bn_out".to_string()))
            .collect()
    }

    /// `name` under this network's prefix.
    fn full_name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// The trainable parameters by full name, in the weight-normalised packed order of
    /// `nvp_kernels::ResNetShape::param_len_weight_norm`: the input convolution's `v`,
    /// `g` and bias; the inner convolutions' grouped (all `v`, all `g`, all biases);
    /// the batch norms' weights and biases; the output convolution's `v`, `g`, bias.
    /// The one layout both of [`ResNet::param_groups`] and
    /// [`ResNet::packed_raw_params`].
    fn raw_params(&self) -> Vec<(String, &Tensor)> {
        fn conv<'a>(name: &str, c: &'a WnConv2d) -> [(String, &'a Tensor); 3] {
            [
                (format!("{name}.v"), c.direction()),
                (format!("{name}.g"), c.gain()),
                (format!("{name}.bias"), c.bias()),
            ]
        }
        let inner: Vec<[(String, &Tensor); 3]> = self
            .blocks
            .iter()
            .enumerate()
            .flat_map(|(i, b)| {
                [
                    conv(&format!("blocks.{i}.conv1"), &b.conv1),
                    conv(&format!("blocks.{i}.conv2"), &b.conv2),
                ]
            })
            .collect();
        let mut out: Vec<(String, &Tensor)> = Vec::with_capacity(6 + 10 * self.blocks.len());
        out.extend(conv("inp", &self.inp));
        for k in 0..3 {
            out.extend(inner.iter().map(|c| c[k].clone()));
        }
        for (name, n) in self.norm_names().into_iter().zip(self.batch_norms()) {
            let (w, b) = n.affine();
            out.extend([(format!("{name}.weight"), w), (format!("{name}.bias"), b)]);
        }
        out.extend(conv("out", &self.out));
        out.into_iter()
            .map(|(n, t)| (self.full_name(&n), t))
            .collect()
    }

    /// All parameters concatenated in [`ResNet::raw_params`]' order, directions
    /// flattened. Both one-node training paths take it (`nvp_kernels::resnet_train`,
    /// `nvp_kernels::resnet_train_ops`); each normalises the weights itself.
    fn packed_raw_params(&self) -> Result<Tensor> {
        let parts = self
            .raw_params()
            .into_iter()
            .map(|(_, t)| t.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)
    }

    fn batch_norms(&self) -> impl Iterator<Item = &BatchNorm> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.bn1, &b.bn2])
            .chain(std::iter::once(&self.bn_out))
    }

    /// Train mode as one autograd node, where it applies: the fused f32 CPU op
    /// (`nvp_kernels::resnet_train`: the same kernels and results as the
    /// layer-by-layer network), or, where switched on (`NVP_RESNET_OPS=1`), the
    /// device's own ops with a written-out backward, weight normalisation included
    /// (`nvp_kernels::resnet_train_ops`: the same values, gradients equal up to
    /// rounding). `None` where neither applies.
    fn forward_train_fused(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let eps = self.bn_out.config().eps;
        // The packed vector has the parameters' device and dtype (those of `inp.bias`).
        let params = self.inp.bias();
        let run: Fused = if nvp_kernels::resnet_train_applies(x, params) {
            nvp_kernels::resnet_train
        } else if nvp_kernels::resnet_train_ops_applies(x, params) {
            nvp_kernels::resnet_train_ops
        } else {
            return Ok(None);
        };
        if self.batch_norms().any(|n| n.config().eps != eps) {
            return Ok(None);
        }
        let (n, _, h, w) = x.dims4()?;
        let packed = match &self.packed {
            Some(p) => p.clone(),
            None => self.packed_raw_params()?,
        };
        let shape = self.shape();
        let out = run(x, &packed, shape, eps)?;
        let momentum = self.bn_out.config().momentum;
        match &self.running {
            // One update of all the running averages, side by side as in the store.
            Some((rm, rv)) if self.batch_norms().all(|b| b.config().momentum == momentum) => {
                let (means, vars): (Vec<&Tensor>, Vec<&Tensor>) =
                    out.stats.iter().map(|(m, v)| (m, v)).unzip();
                let (means, vars) = (Tensor::cat(&means, 0)?, Tensor::cat(&vars, 0)?);
                record_running((rm, rv), &means, &vars, n * h * w, momentum)?;
            }
            _ => {
                for (bn, (mean, var)) in self.batch_norms().zip(&out.stats) {
                    bn.record_batch_stats(mean, var, n * h * w)?;
                }
            }
        }
        Ok(Some(out.y))
    }
}

impl Conditioner for ResNet {
    fn forward_t(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if mode == Mode::Train && x.rank() == 4 {
            if let Some(y) = self.forward_train_fused(x)? {
                return Ok(y);
            }
        }
        let mut h = self.inp.forward(x)?;
        for b in &self.blocks {
            h = b.forward(&h, mode)?;
        }
        self.out.forward_after(&self.bn_out, &h, mode, None)
    }

    fn fix_weights(&mut self) -> Result<()> {
        self.inp.fix_weight()?;
        for b in &mut self.blocks {
            b.conv1.fix_weight()?;
            b.conv2.fix_weight()?;
        }
        self.out.fix_weight()
    }

    fn param_groups(&self) -> Vec<(String, Vec<String>)> {
        ResNet::param_groups(self)
    }

    fn scale_parameters(&self) -> Vec<Tensor> {
        let mut v = vec![self.inp.gain().clone()];
        for b in &self.blocks {
            v.push(b.conv1.gain().clone());
            v.push(b.conv2.gain().clone());
        }
        v.push(self.out.gain().clone());
        v
    }
}
