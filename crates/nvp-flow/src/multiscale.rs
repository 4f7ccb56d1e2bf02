//! The multi-scale architecture (§3.6, eq. 13–16).
//!
//! Each scale but the last: checkerboard couplings (alternating parity) →
//! squeeze → channel couplings (alternating) → factor out the second half of
//! the channels as that scale's latent `z⁽ⁱ⁾`; the first half goes on. The
//! final scale: checkerboard couplings only. Every coupling is followed by a
//! [`FlowBatchNorm`]. Hidden features double at each coarser scale.
//!
//! A class-conditional model (`classes = K > 0`, App. F) takes a condition `(N, K)`
//! (one-hot labels: [`RealNvp::one_hot`]) in the `*_cond` methods; every coupling's
//! s/t network sees it.
//!
//! Parameter names: `scale{k}.checker{i}.*`, `scale{k}.checker{i}_bn.*`,
//! `scale{k}.channel{i}.*`, `scale{k}.channel{i}_bn.*`.

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use rand::Rng;

use crate::batch_norm::FlowBatchNorm;
use crate::conditioner::ResNetConfig;
use crate::config::RealNvpConfig;
use crate::coupling::AffineCoupling;
use crate::flow::{zero_logdet, Flow, Mode};
use crate::mask::Mask;
use crate::params::ParamStore;
use crate::prior::StandardNormal;
use crate::squeeze::{squeeze, unsqueeze};

/// A coupling followed by its output batch norm.
struct Step {
    coupling: AffineCoupling,
    bn: FlowBatchNorm,
}

impl Step {
    fn new(
        mask: Mask,
        net: ResNetConfig,
        cfg: &RealNvpConfig,
        vb: &VarBuilder,
        name: &str,
    ) -> Result<Self> {
        Ok(Self {
            coupling: AffineCoupling::resnet(mask, net, vb.pp(name))?,
            bn: FlowBatchNorm::new(net.channels, cfg.flow_bn(), vb.pp(format!("{name}_bn")))?,
        })
    }
}

fn run_forward(
    steps: &[Step],
    x: Tensor,
    ld: Tensor,
    cond: Option<&Tensor>,
    mode: Mode,
) -> Result<(Tensor, Tensor)> {
    let (mut h, mut ld) = (x, ld);
    for s in steps {
        let (y, l1) = s.coupling.forward_cond(&h, cond, mode)?;
        let (y, l2) = s.bn.forward(&y, mode)?;
        h = y;
        ld = ((ld + l1)? + l2)?;
    }
    Ok((h, ld))
}

fn run_inverse(steps: &[Step], y: Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
    let mut h = y;
    for s in steps.iter().rev() {
        h = s.bn.inverse(&h)?;
        h = s.coupling.inverse_cond(&h, cond)?;
    }
    Ok(h)
}

struct Scale {
    checker: Vec<Step>,
    channel: Vec<Step>,
    last: bool,
}

/// Real NVP: multi-scale flow plus standard normal prior.
pub struct RealNvp {
    cfg: RealNvpConfig,
    scales: Vec<Scale>,
    /// Latent shape `(C, H, W)` of each scale, in the order of [`RealNvp::encode`].
    z_shapes: Vec<[usize; 3]>,
    prior: StandardNormal,
    dtype: DType,
    device: Device,
}

impl RealNvp {
    pub fn new(cfg: &RealNvpConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let (mut c, mut h, mut w, mut f) = (cfg.channels, cfg.height, cfg.width, cfg.features);
        let mut scales = Vec::with_capacity(cfg.scales);
        let mut z_shapes = Vec::with_capacity(cfg.scales);
        for k in 0..cfg.scales {
            let last = k + 1 == cfg.scales;
            let svb = vb.pp(format!("scale{k}"));
            let net = |channels| ResNetConfig {
                channels,
                cond_channels: cfg.classes,
                features: f,
                blocks: cfg.res_blocks,
                bn: cfg.inner_bn(),
            };
            let n_checker = if last {
                cfg.final_couplings
            } else {
                cfg.checkerboard_couplings
            };
            let checker = (0..n_checker)
                .map(|i| {
                    Step::new(
                        Mask::checkerboard(i),
                        net(c),
                        cfg,
                        &svb,
                        &format!("checker{i}"),
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let channel = if last {
                Vec::new()
            } else {
                (0..cfg.channel_couplings)
                    .map(|i| {
                        Step::new(
                            Mask::channel(i),
                            net(4 * c),
                            cfg,
                            &svb,
                            &format!("channel{i}"),
                        )
                    })
                    .collect::<Result<Vec<_>>>()?
            };
            scales.push(Scale {
                checker,
                channel,
                last,
            });
            if last {
                z_shapes.push([c, h, w]);
            } else {
                c *= 2;
                h /= 2;
                w /= 2;
                f *= 2;
                z_shapes.push([c, h, w]);
            }
        }
        Ok(Self {
            cfg: cfg.clone(),
            scales,
            z_shapes,
            prior: StandardNormal,
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    pub fn config(&self) -> &RealNvpConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Dimensions per sample, `D = C·H·W`.
    pub fn dims(&self) -> usize {
        self.cfg.dims()
    }

    /// Latent shapes per scale, `(C, H, W)`.
    pub fn latent_shapes(&self) -> &[[usize; 3]] {
        &self.z_shapes
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let want = [self.cfg.channels, self.cfg.height, self.cfg.width];
        if x.rank() != 4 || x.dims()[1..] != want {
            candle_core::bail!(
                "input has shape {:?}, the model expects (N, {}, {}, {})",
                x.dims(),
                want[0],
                want[1],
                want[2]
            );
        }
        Ok(())
    }

    /// Whether the model is class-conditional (`classes > 0`).
    pub fn is_conditional(&self) -> bool {
        self.cfg.classes > 0
    }

    /// The one-hot condition `(N, classes)` of `labels`, in the model's dtype and on
    /// its device. Errors for a label out of range or an unconditional model.
    pub fn one_hot(&self, labels: &[u32]) -> Result<Tensor> {
        let k = self.cfg.classes;
        if k == 0 {
            candle_core::bail!("the model is not class-conditional: it takes no labels");
        }
        let mut v = vec![0f32; labels.len() * k];
        for (i, &l) in labels.iter().enumerate() {
            if l as usize >= k {
                candle_core::bail!("label {l} is out of range: the model has {k} classes");
            }
            v[i * k + l as usize] = 1.0;
        }
        Tensor::from_vec(v, (labels.len(), k), &self.device)?.to_dtype(self.dtype)
    }

    /// A condition given exactly when the model is conditional, with one row per sample.
    fn check_cond(&self, cond: Option<&Tensor>, n: usize) -> Result<()> {
        let k = self.cfg.classes;
        match cond {
            None if k > 0 => candle_core::bail!(
                "the model is class-conditional ({k} classes): it needs each sample's label"
            ),
            Some(_) if k == 0 => {
                candle_core::bail!("the model is not class-conditional: it takes no labels")
            }
            Some(c) if c.dims() != [n, k] => candle_core::bail!(
                "condition has shape {:?}, the model needs ({n}, {k})",
                c.dims()
            ),
            _ => Ok(()),
        }
    }

    /// `x` (N, C, H, W) in logit space → latents per scale and the per-sample
    /// log-determinant of the whole flow.
    pub fn encode(&self, x: &Tensor, mode: Mode) -> Result<(Vec<Tensor>, Tensor)> {
        self.encode_cond(x, None, mode)
    }

    /// [`RealNvp::encode`] given the condition `(N, classes)` of a class-conditional
    /// model (`None` for an unconditional one).
    pub fn encode_cond(
        &self,
        x: &Tensor,
        cond: Option<&Tensor>,
        mode: Mode,
    ) -> Result<(Vec<Tensor>, Tensor)> {
        self.check_input(x)?;
        self.check_cond(cond, x.dim(0)?)?;
        let mut zs = Vec::with_capacity(self.scales.len());
        let mut h = x.clone();
        let mut ld = zero_logdet(x)?;
        for s in &self.scales {
            (h, ld) = run_forward(&s.checker, h, ld, cond, mode)?;
            if s.last {
                zs.push(h.clone());
                break;
            }
            h = squeeze(&h)?;
            (h, ld) = run_forward(&s.channel, h, ld, cond, mode)?;
            let half = h.dim(1)? / 2;
            zs.push(h.narrow(1, half, half)?.contiguous()?);
            h = h.narrow(1, 0, half)?.contiguous()?;
        }
        Ok((zs, ld))
    }

    /// Latents per scale → `x` in logit space (evaluation mode).
    pub fn decode(&self, zs: &[Tensor]) -> Result<Tensor> {
        self.decode_cond(zs, None)
    }

    /// [`RealNvp::decode`] given the condition of a class-conditional model.
    pub fn decode_cond(&self, zs: &[Tensor], cond: Option<&Tensor>) -> Result<Tensor> {
        if zs.len() != self.scales.len() {
            candle_core::bail!(
                "decode needs {} latents (one per scale), got {}",
                self.scales.len(),
                zs.len()
            );
        }
        for (k, (z, s)) in zs.iter().zip(&self.z_shapes).enumerate() {
            if z.rank() != 4 || z.dims()[1..] != s[..] {
                candle_core::bail!(
                    "latent {k} has shape {:?}, expected (N, {}, {}, {})",
                    z.dims(),
                    s[0],
                    s[1],
                    s[2]
                );
            }
        }
        self.check_cond(cond, zs[0].dim(0)?)?;
        let mut h = zs[zs.len() - 1].clone();
        for (k, s) in self.scales.iter().enumerate().rev() {
            if !s.last {
                h = Tensor::cat(&[&h, &zs[k]], 1)?;
                h = run_inverse(&s.channel, h, cond)?;
                h = unsqueeze(&h)?;
            }
            h = run_inverse(&s.checker, h, cond)?;
        }
        Ok(h)
    }

    /// Concatenate per-scale latents into `(N, D)`.
    pub fn flatten_latents(&self, zs: &[Tensor]) -> Result<Tensor> {
        let flat = zs
            .iter()
            .map(|z| z.flatten_from(1))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&flat, 1)
    }

    /// Split `(N, D)` back into per-scale latents.
    pub fn split_latents(&self, z: &Tensor) -> Result<Vec<Tensor>> {
        let (n, d) = z.dims2()?;
        if d != self.dims() {
            candle_core::bail!("latent has {d} dimensions, the model has {}", self.dims());
        }
        let mut off = 0;
        self.z_shapes
            .iter()
            .map(|s| {
                let len = s[0] * s[1] * s[2];
                let part = z.narrow(1, off, len)?.reshape((n, s[0], s[1], s[2]));
                off += len;
                part
            })
            .collect()
    }

    /// `log p(x)` per sample in logit space: prior log-density of the
    /// latents plus the flow's log-determinant (add the preprocessing log-det
    /// for the density of the 8-bit data).
    pub fn log_prob(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.log_prob_cond(x, None, mode)
    }

    /// `log p(x | cond)` per sample: [`RealNvp::log_prob`] of a class-conditional model.
    pub fn log_prob_cond(&self, x: &Tensor, cond: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
        let (zs, ld) = self.encode_cond(x, cond, mode)?;
        let lp = zs
            .iter()
            .map(|z| self.prior.log_prob(z))
            .try_fold(zero_logdet(x)?, |acc, l| acc + l?)?;
        lp + ld
    }

    /// Draw `n` samples in logit space with latents `z ~ N(0, T² I)`.
    pub fn sample<R: Rng + ?Sized>(
        &self,
        n: usize,
        temperature: f64,
        rng: &mut R,
    ) -> Result<Tensor> {
        self.sample_cond(n, temperature, None, rng)
    }

    /// [`RealNvp::sample`] of a class-conditional model: sample `i` given row `i` of
    /// `cond` (`(n, classes)`).
    pub fn sample_cond<R: Rng + ?Sized>(
        &self,
        n: usize,
        temperature: f64,
        cond: Option<&Tensor>,
        rng: &mut R,
    ) -> Result<Tensor> {
        // (decode_cond checks the condition against the n latents)
        let z = self.prior.sample(
            &[n, self.dims()],
            temperature,
            rng,
            self.dtype,
            &self.device,
        )?;
        self.decode_cond(&self.split_latents(&z)?, cond)
    }

    /// Share of the dimensions held by the latents of the `keep` coarsest scales
    /// (Appendix D's "kept" fraction: 1, 1/2, 1/4, … for 64×64 images; 1, 1/2 for
    /// CIFAR-10's two scales). `keep` counts from the coarsest scale.
    pub fn kept_fraction(&self, keep: usize) -> f64 {
        let dims = |s: &[usize; 3]| s[0] * s[1] * s[2];
        let kept: usize = self.z_shapes.iter().rev().take(keep).map(dims).sum();
        kept as f64 / self.dims() as f64
    }

    /// Conceptual compression (Appendix D): the per-scale latents `zs` (as from
    /// [`RealNvp::encode`]) with those of the `keep` coarsest scales kept and all
    /// finer ones drawn anew from the prior at `temperature`. Decoding the result
    /// shows what the kept share of the latents determines. Errors unless
    /// `keep ≤` the number of scales and `zs` has one latent per scale.
    pub fn resample_finer<R: Rng + ?Sized>(
        &self,
        zs: &[Tensor],
        keep: usize,
        temperature: f64,
        rng: &mut R,
    ) -> Result<Vec<Tensor>> {
        let l = self.z_shapes.len();
        if zs.len() != l {
            candle_core::bail!(
                "resample_finer needs {l} latents (one per scale), got {}",
                zs.len()
            );
        }
        if keep > l {
            candle_core::bail!("resample_finer: keep = {keep}, but the model has {l} scales");
        }
        zs.iter()
            .enumerate()
            .map(|(k, z)| {
                if k >= l - keep {
                    Ok(z.clone())
                } else {
                    self.prior
                        .sample(z.dims(), temperature, rng, z.dtype(), z.device())
                }
            })
            .collect()
    }

    /// Parameters that get the L2 penalty: all weight-norm gains and all
    /// tanh scales.
    pub fn scale_parameters(&self) -> Vec<Tensor> {
        self.scales
            .iter()
            .flat_map(|s| s.checker.iter().chain(&s.channel))
            .flat_map(|st| st.coupling.scale_parameters())
            .collect()
    }

    /// Each s/t network's packed groups — its trainable parameters, its batch norms'
    /// running means, their running variances: the flat variable's name and its
    /// members' names ([`crate::ParamStore::pack`]).
    pub fn param_groups(&self) -> Vec<(String, Vec<String>)> {
        self.scales
            .iter()
            .flat_map(|s| s.checker.iter().chain(&s.channel))
            .flat_map(|st| st.coupling.param_groups())
            .collect()
    }

    /// [`RealNvp::new`] over `store`, with each s/t network's trainable parameters
    /// packed into one flat variable, and its running statistics into two more
    /// ([`RealNvp::param_groups`], [`ParamStore::pack`]): the same model, values and
    /// checkpoint names, with the network's parameters as one tensor for autograd and
    /// the optimizer, no per-step concatenation for the one-node training ops
    /// (`nvp_kernels::resnet_train`, `nvp_kernels::resnet_train_ops`), and one update
    /// of the network's running averages per step. Where those
    /// ops do not run (f64 on the CPU, a GPU without `NVP_RESNET_OPS`), the layers
    /// read their parameters through views of the flat variable, and each view's
    /// gradient is padded to the whole group's size: correct but slower, so pack only
    /// where they run ([`nvp_kernels::resnet_one_node_enabled`]). Parameters the
    /// store already holds are kept, as by [`RealNvp::new`]; a store packed before is
    /// used as it is.
    pub fn new_packed(
        cfg: &RealNvpConfig,
        store: &ParamStore,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let model = Self::new(cfg, store.var_builder(dtype, device))?;
        let groups: Vec<_> = model
            .param_groups()
            .into_iter()
            .filter(|(g, _)| store.group_members(g).is_none())
            .collect();
        if groups.is_empty() {
            return Ok(model);
        }
        // The first build's separate tensors are freed group by group as they are
        // packed (the store then holds the only other reference), so that each
        // group's memory can serve the next rather than all of it lingering.
        drop(model);
        for (group, members) in groups {
            store.pack(&group, &members)?;
        }
        Self::new(cfg, store.var_builder(dtype, device))
    }

    /// Computes every s/t network's weight normalisation once, detached, and uses the
    /// result from then on: for a model whose parameters no longer change (one loaded
    /// for evaluation or sampling), where it saves those kernels in every batch; the
    /// same values. Changes of the parameters made afterwards are not seen, and no
    /// gradient reaches the convolutions' `v` and `g`: not for a model being trained.
    pub fn fix_weights(&mut self) -> Result<()> {
        for st in self
            .scales
            .iter_mut()
            .flat_map(|s| s.checker.iter_mut().chain(s.channel.iter_mut()))
        {
            st.coupling.fix_weights()?;
        }
        Ok(())
    }

    /// Number of coupling layers.
    pub fn num_couplings(&self) -> usize {
        self.scales
            .iter()
            .map(|s| s.checker.len() + s.channel.len())
            .sum()
    }
}

impl Flow for RealNvp {
    /// `x → (z flattened to (N, D), log-det)`.
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        let (zs, ld) = self.encode(x, mode)?;
        Ok((self.flatten_latents(&zs)?, ld))
    }

    fn inverse(&self, z: &Tensor) -> Result<Tensor> {
        self.decode(&self.split_latents(z)?)
    }
}
