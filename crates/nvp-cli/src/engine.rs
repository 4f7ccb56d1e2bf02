//! The computations shared by the subcommands: one training step (with L2,
//! clipping and the non-finite guard), evaluation in bits/dim, and sampling
//! to 8-bit pixels.

use std::f64::consts::LN_2;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use nvp_data::preprocess::{bits_per_dim_batch, mean_bits_per_dim};
use nvp_data::{Batch, Logit};
use nvp_flow::{Adam, AdamConfig, Ema, L2Gradient, Mode, ParamStore, RealNvp};
use rand::Rng;

use crate::settings::{Precision, Settings};

/// A model with its optimizer.
pub struct Trainer {
    pub store: ParamStore,
    pub model: RealNvp,
    /// The same parameters without autograd, for evaluation and sampling.
    pub frozen: RealNvp,
    pub adam: Adam,
    /// The averaged model of `train.ema`.
    pub averaged: Option<Averaged>,
    lr: f64,
    lr_warmup: u64,
    clip: f64,
    /// The L2 penalty's gradient (on the weight-norm gains and tanh scales).
    l2_gradient: L2Gradient,
    /// `train.precision = "bf16"`: the step's forward and backward passes run with
    /// [`nvp_kernels::Bf16Products`] in scope.
    bf16: bool,
}

/// A moving average of the trained parameters, as a model of its own.
pub struct Averaged {
    pub ema: Ema,
    /// The averaged parameters (and a copy of the batch-norm statistics).
    pub store: ParamStore,
    /// The averaged model, without autograd (shares `store`'s storage).
    pub frozen: RealNvp,
}

/// What one step did.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    /// Mean training bits/dim of the batch (before the update).
    pub bpd: f64,
    pub grad_norm: f64,
    /// The loss or a gradient was not finite: nothing was changed.
    pub skipped: bool,
}

impl Trainer {
    pub fn new(store: ParamStore, model: RealNvp, s: &Settings) -> Result<Self> {
        let bf16 = s.train.precision == Precision::Bf16;
        if bf16 && !model.device().is_cpu() {
            bail!(
                "train.precision = \"bf16\" is a CPU option (bf16 products in the CPU's \
                 Winograd convolutions); on {} use \"f32\"",
                s.train.device
            );
        }
        if bf16 && !nvp_kernels::bf16_products_available() {
            bail!(
                "train.precision = \"bf16\" needs a CPU with AVX512-BF16 (its bf16 dot \
                 products), and this one has none: use \"f32\""
            );
        }
        if bf16 && !(nvp_kernels::fast_cpu_enabled() && nvp_kernels::winograd_enabled()) {
            bail!(
                "train.precision = \"bf16\" runs in the fast Winograd kernels, which \
                 NVP_FAST_CPU=0 or NVP_WINOGRAD=0 turns off: unset it, or use \"f32\""
            );
        }
        let adam = Adam::for_store(
            &store,
            AdamConfig {
                lr: s.train.lr,
                ..AdamConfig::default()
            },
        )?;
        let l2_gradient = L2Gradient::new(&store, &model.scale_parameters(), s.train.l2)?;
        let frozen = crate::model::frozen(s, &store, model.device())?;
        let averaged = if s.train.ema > 0.0 {
            let (avg, _) = crate::model::build(s, model.device())?;
            Some(Averaged {
                ema: Ema::new(&store, &avg, s.train.ema)?,
                frozen: crate::model::frozen(s, &avg, model.device())?,
                store: avg,
            })
        } else {
            None
        };
        Ok(Self {
            store,
            model,
            frozen,
            adam,
            averaged,
            lr: s.train.lr,
            lr_warmup: s.train.lr_warmup,
            clip: s.train.clip,
            l2_gradient,
            bf16,
        })
    }

    /// Flip/dequantise/logit were done by the loader; here: forward, loss =
    /// mean bits/dim + L2 · Σ (scale parameters)², backward, clip, Adam.
    pub fn step(&mut self, batch: &Batch) -> Result<StepOutcome> {
        self.step_marked(batch, |_, _| Ok(()))
    }

    /// [`Trainer::step`], calling `mark` with the step's loss as each phase ends
    /// (`nvp bench` synchronises the device there, times the phases and counts the
    /// loss's autograd graph). A skipped step ends early.
    pub fn step_marked(
        &mut self,
        batch: &Batch,
        mut mark: impl FnMut(Phase, &Tensor) -> Result<()>,
    ) -> Result<StepOutcome> {
        let dims = self.model.dims();
        let buffers: Vec<_> = self
            .store
            .named_vars()
            .into_iter()
            .filter(|(n, _)| nvp_flow::params::is_buffer(n))
            .map(|(_, v)| {
                let saved = v.as_tensor().copy()?;
                Ok((v, saved))
            })
            .collect::<Result<Vec<_>>>()?;
        let bf16 = self.bf16.then(nvp_kernels::Bf16Products::enable);
        let (log_p, loss) = self.forward_loss(batch)?;
        mark(Phase::Forward, &loss)?;
        // The backward pass is queued before anything is read back: on a GPU, reading
        // the loss first would wait for the whole forward pass with the backward not
        // yet queued. A non-finite loss makes non-finite gradients; the guard below
        // skips such a step either way.
        let grads = self.backward(&loss)?;
        drop(bf16);
        mark(Phase::Backward, &loss)?;
        // The one wait of the step: the gradient norm; the loss and bits/dim are
        // computed by then.
        let grad_norm = self.adam.grad_norm(&grads)?;
        let lp: Vec<f64> = log_p.to_dtype(DType::F64)?.to_vec1()?;
        let bpd = mean_bits_per_dim(&lp, &batch.ld_pre, dims)?;
        let loss_v = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss_v.is_finite() || !bpd.is_finite() || !grad_norm.is_finite() {
            for (v, t) in &buffers {
                v.set(t)?;
            }
            return Ok(StepOutcome {
                bpd,
                grad_norm: if loss_v.is_finite() && bpd.is_finite() {
                    grad_norm
                } else {
                    f64::NAN
                },
                skipped: true,
            });
        }
        let scale = if self.clip > 0.0 && grad_norm > self.clip {
            self.clip / grad_norm
        } else {
            1.0
        };
        self.adam
            .set_lr(warmup_lr(self.lr, self.lr_warmup, self.adam.steps() + 1));
        self.adam.step(&grads, scale)?;
        if let Some(a) = &mut self.averaged {
            a.ema.update()?;
        }
        mark(Phase::Update, &loss)?;
        Ok(StepOutcome {
            bpd,
            grad_norm,
            skipped: false,
        })
    }
}

impl Trainer {
    /// The train-mode forward pass: per-image log-likelihoods and the loss's
    /// likelihood part, mean bits/dim (the L2 penalty enters in [`Trainer::backward`]).
    fn forward_loss(&self, batch: &Batch) -> Result<(Tensor, Tensor)> {
        let cond = condition(&self.model, batch.labels.as_deref())?;
        let log_p = self
            .model
            .log_prob_cond(&batch.y, cond.as_ref(), Mode::Train)?;
        let nats = log_p.mean_all()?;
        let loss = (nats * (-1.0 / (self.model.dims() as f64 * LN_2)))?;
        Ok((log_p, loss))
    }

    /// The gradients of `loss + l2 · Σ g²` over the scale parameters `g`: autograd
    /// through `loss`, and the penalty's gradient `2·l2·g` added to each `g`'s outside
    /// the graph — the value candle's autograd gives through `sqr` and `sum_all`
    /// (`(g·l2)·2`; the doubling is exact), added last, where autograd adds the
    /// contributions of a parameter in graph order (so a parameter that reaches the
    /// likelihood by two paths, a coupling's tanh scale, can differ in its last bit).
    /// Without the penalty's four graph nodes per parameter and their backward
    /// kernels: 190 parameters in `cifar10`, and on a GPU each kernel is a launch.
    fn backward(&self, loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
        let mut grads = loss.backward()?;
        self.l2_gradient.add_to(&mut grads)?;
        Ok(grads)
    }

    /// The model the periodic evaluation and samples use: the averaged one when the
    /// run keeps it.
    pub fn eval_model(&self) -> &RealNvp {
        match &self.averaged {
            Some(a) => &a.frozen,
            None => &self.frozen,
        }
    }
}

/// The learning rate of optimizer step `step` (from 1): `lr · min(1, step / warmup)`,
/// or `lr` when `warmup` is 0.
pub fn warmup_lr(lr: f64, warmup: u64, step: u64) -> f64 {
    if warmup == 0 || step >= warmup {
        lr
    } else {
        lr * step as f64 / warmup as f64
    }
}

/// The phases of a training step, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Forward pass and loss.
    Forward,
    /// Backward pass through the whole graph.
    Backward,
    /// Gradient norm, the loss read back for the non-finite guard, clipping and the
    /// Adam update.
    Update,
}

/// The condition of a class-conditional model for images with `labels` (one-hot), or
/// `None` for an unconditional model (whose labels, if any, are not used).
pub fn condition(model: &RealNvp, labels: Option<&[u32]>) -> Result<Option<Tensor>> {
    if !model.is_conditional() {
        return Ok(None);
    }
    match labels {
        Some(l) => Ok(Some(model.one_hot(l)?)),
        None => bail!(
            "the model is class-conditional (model.classes = {}) but the images have no labels",
            model.config().classes
        ),
    }
}

/// Bits/dim of each image of `batches` in evaluation mode (given their labels, for a
/// class-conditional model).
pub fn evaluate<I>(model: &RealNvp, batches: I) -> Result<Vec<f64>>
where
    I: IntoIterator<Item = nvp_data::Result<Batch>>,
{
    let dims = model.dims();
    // The log-likelihoods stay on the device until the end: on a GPU, reading each
    // batch's back would make the host wait for it before queueing the next, and the
    // GPU wait for the host. (On the CPU it is the same work in the same order.)
    let (mut lps, mut lds) = (Vec::new(), Vec::new());
    for b in batches {
        let b = b.context("loading an evaluation batch")?;
        let cond = condition(model, b.labels.as_deref())?;
        lps.push(
            model
                .log_prob_cond(&b.y, cond.as_ref(), Mode::Eval)?
                .to_dtype(DType::F64)?,
        );
        lds.extend_from_slice(&b.ld_pre);
    }
    if lps.is_empty() {
        return Ok(Vec::new());
    }
    let lp: Vec<f64> = Tensor::cat(&lps, 0)?.to_vec1()?;
    Ok(bits_per_dim_batch(&lp, &lds, dims)?)
}

/// What a class-conditional model says of labelled images under every class.
#[derive(Debug, Default)]
pub struct Classified {
    /// Bits/dim of each image under its own label, `p(x | y)`.
    pub conditional: Vec<f64>,
    /// Bits/dim of each image under the marginal `p(x) = Σ_y p(x | y) / K`.
    pub marginal: Vec<f64>,
    /// Images whose most likely class `argmax_y p(x | y)` is their label.
    pub correct: usize,
}

/// Per image, from `log p(x | y)` for `y = 0..K` (`lp`, `K` values an image, natural
/// log) and its label: (log p(x | label), log p(x) with a uniform prior over the
/// classes, the most likely class). The marginal by log-sum-exp, in f64.
pub fn classify_one(lp: &[f64], label: u32) -> (f64, f64, u32) {
    let max = lp.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let sum: f64 = lp.iter().map(|v| (v - max).exp()).sum();
    let marginal = max + sum.ln() - (lp.len() as f64).ln();
    let best = lp
        .iter()
        .enumerate()
        .fold(0, |b, (i, v)| if *v > lp[b] { i } else { b });
    (lp[label as usize], marginal, best as u32)
}

/// [`evaluate`] of a class-conditional model under every class: see [`Classified`].
pub fn evaluate_classified<I>(model: &RealNvp, batches: I) -> Result<Classified>
where
    I: IntoIterator<Item = nvp_data::Result<Batch>>,
{
    let k = model.config().classes;
    if k == 0 {
        bail!("--classify needs a class-conditional model (model.classes > 0)");
    }
    let dims = model.dims();
    // As in `evaluate`, the log-likelihoods stay on the device until the end.
    let (mut lps, mut all_labels, mut lds) = (Vec::new(), Vec::new(), Vec::new());
    for b in batches {
        let b = b.context("loading an evaluation batch")?;
        let Some(labels) = b.labels.as_deref() else {
            bail!("--classify needs labelled images; the dataset has no labels");
        };
        if let Some(&label) = labels.iter().find(|&&l| l as usize >= k) {
            bail!("label {label} is out of range: the model has {k} classes");
        }
        let n = b.len();
        let per_class = (0..k)
            .map(|y| {
                let cond = model.one_hot(&vec![y as u32; n])?;
                Ok(model
                    .log_prob_cond(&b.y, Some(&cond), Mode::Eval)?
                    .to_dtype(DType::F64)?)
            })
            .collect::<Result<Vec<_>>>()?;
        // (n, k): image i's log p(x | y) for y = 0..k in row i.
        lps.push(Tensor::stack(&per_class, 1)?);
        all_labels.extend_from_slice(labels);
        lds.extend_from_slice(&b.ld_pre);
    }
    let mut out = Classified::default();
    if lps.is_empty() {
        return Ok(out);
    }
    let lp: Vec<f64> = Tensor::cat(&lps, 0)?.flatten_all()?.to_vec1()?;
    let n = all_labels.len();
    let (mut cond, mut marg) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for (i, &label) in all_labels.iter().enumerate() {
        let (c, m, best) = classify_one(&lp[i * k..(i + 1) * k], label);
        cond.push(c);
        marg.push(m);
        out.correct += usize::from(best == label);
    }
    out.conditional = bits_per_dim_batch(&cond, &lds, dims)?;
    out.marginal = bits_per_dim_batch(&marg, &lds, dims)?;
    Ok(out)
}

/// `n` samples at `temperature` as planar u8 pixels. A class-conditional model draws
/// sample `i` of class `class` where given, else of class `i mod classes` (a grid of
/// one column per class when it has `classes` columns).
pub fn sample_pixels<R: Rng>(
    model: &RealNvp,
    n: usize,
    temperature: f64,
    alpha: f64,
    class: Option<u32>,
    rng: &mut R,
) -> Result<Vec<u8>> {
    let cond = if model.is_conditional() {
        let k = model.config().classes as u32;
        let labels: Vec<u32> = (0..n as u32).map(|i| class.unwrap_or(i % k)).collect();
        Some(model.one_hot(&labels)?)
    } else if class.is_some() {
        bail!("the model is not class-conditional: it takes no class");
    } else {
        None
    };
    let y = model.sample_cond(n, temperature, cond.as_ref(), rng)?;
    to_pixels(&y, alpha)
}

/// Columns of a grid of `n` samples: one per class for a class-conditional model whose
/// samples take the classes in turn (`class` not given), else about √n.
pub fn sample_grid_cols(model: &RealNvp, n: usize, class: Option<u32>) -> usize {
    match (model.config().classes, class) {
        (k, None) if k > 0 => k.min(n),
        _ => (n as f64).sqrt().ceil() as usize,
    }
}

/// Logit-space images to planar u8 pixels (sigmoid, undo the affine map,
/// ×256, floor, clamp).
pub fn to_pixels(y: &Tensor, alpha: f64) -> Result<Vec<u8>> {
    let v: Vec<f32> = y.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
    Ok(Logit::new(alpha)?.to_pixels(&v))
}

/// Largest |f⁻¹(f(y)) − y| over `batches` (evaluation mode, logit space).
pub fn inverse_error<I>(model: &RealNvp, batches: I) -> Result<f64>
where
    I: IntoIterator<Item = nvp_data::Result<Batch>>,
{
    let mut worst = 0f64;
    for b in batches {
        let b = b.context("loading an evaluation batch")?;
        let cond = condition(model, b.labels.as_deref())?;
        let (z, _) = model.encode_cond(&b.y, cond.as_ref(), Mode::Eval)?;
        let back = model.decode_cond(&z, cond.as_ref())?;
        let err = (back - &b.y)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        worst = worst.max(err);
    }
    Ok(worst)
}

#[cfg(test)]
mod tests {
    use super::{classify_one, evaluate, warmup_lr};

    /// `evaluate` through a fresh model that is exactly the identity (couplings start
    /// at s = t = 0; batch norm with running mean 0, variance 1 and ε = 1e-300), on
    /// constant images dequantised by hand: bits/dim = −(log N(y; 0, I) + ld_pre) /
    /// (D ln 2) with y = logit(α + (1 − 2α)(p + u)/256) per value, worked in Python
    /// (`tests/flow_model.rs` has the derivation): pixel 128, u = ½ → 7.477768989526107;
    /// pixel 0, u = ½ → 11.229193406626116.
    #[test]
    fn evaluate_gives_hand_computed_bits_per_dim() {
        use crate::settings::Settings;
        use candle_core::{Device, Tensor};
        use nvp_data::{Batch, Dequantize};
        let s = Settings::from_toml(
            "[data]\ndataset = \"procedural\"\n[model]\nheight = 8\nwidth = 8\nscales = 2\n\
             res-blocks = 1\nfeatures = 4\nbn-eps = 1e-300\n",
            "test",
        )
        .unwrap();
        let dev = Device::Cpu;
        let (store, _) = crate::model::build(&s, &dev).unwrap();
        let model = crate::model::frozen(&s, &store, &dev).unwrap();
        let d = s.model.dims();
        let dq = Dequantize::new(0.05).unwrap();
        let cases = [(128u8, 7.477768989526107), (0u8, 11.229193406626116)];
        // A batch of the cases in `order`.
        let batch = |order: &[usize]| {
            let n = order.len();
            let (mut pixels, mut y, mut ld_pre) = (Vec::new(), vec![0f32; n * d], Vec::new());
            for (i, &c) in order.iter().enumerate() {
                let px = vec![cases[c].0; d];
                ld_pre.push(
                    dq.apply_with_noise(&px, &vec![0.5; d], &mut y[i * d..(i + 1) * d])
                        .unwrap(),
                );
                pixels.extend(px);
            }
            Batch {
                epoch: 0,
                index: 0,
                pixels,
                labels: None,
                y: Tensor::from_vec(y, (n, 3, 8, 8), &dev).unwrap(),
                ld_pre,
                indices: (0..n).collect(),
                flipped: vec![false; n],
            }
        };
        // Three batches of different sizes: every image's value in its place.
        let order = [vec![0, 1], vec![1], vec![1, 0, 0]];
        let bpd = evaluate(&model, order.iter().map(|o| Ok(batch(o)))).unwrap();
        let want: Vec<usize> = order.concat();
        assert_eq!(bpd.len(), want.len());
        for (b, &c) in bpd.iter().zip(&want) {
            let (p, v) = cases[c];
            assert!((b - v).abs() < 1e-5, "pixel {p}: {b} vs {v}");
        }
        assert!(evaluate(&model, std::iter::empty()).unwrap().is_empty());
    }

    /// The L2 penalty's gradient added outside the graph (`Trainer::backward`) is what
    /// autograd gives through the whole loss `bits/dim + l2 · Σ g²` (the loss the step
    /// used to build), for every parameter: equal up to the order of the additions
    /// (measured: at most one f32 ulp, on the tanh scales; checked at 2 ulps of the
    /// tensor's largest value); and the penalty is in it.
    #[test]
    fn l2_gradient_outside_the_graph_equals_autograd() {
        use crate::settings::Settings;
        use candle_core::{Device, Tensor};
        use nvp_data::Batch;
        let s = Settings::from_toml(
            "[data]\ndataset = \"procedural\"\n[model]\nheight = 8\nwidth = 8\nscales = 2\n\
             res-blocks = 1\nfeatures = 4\n[train]\nl2 = 0.03\n",
            "test",
        )
        .unwrap();
        let dev = Device::Cpu;
        let (store, model) = crate::model::build(&s, &dev).unwrap();
        // Away from the identity start (zero output gains), so that every parameter
        // has a likelihood gradient too.
        for (_, v) in store.named_vars() {
            let noise = Tensor::randn(0f32, 0.2, v.shape(), &dev).unwrap();
            v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
        }
        let trainer = super::Trainer::new(store, model, &s).unwrap();
        let y = Tensor::randn(0f32, 1.0, (4, 3, 8, 8), &dev).unwrap();
        let batch = Batch {
            epoch: 0,
            index: 0,
            pixels: vec![0; 4 * 3 * 64],
            labels: None,
            y,
            ld_pre: vec![0.0; 4],
            indices: (0..4).collect(),
            flipped: vec![false; 4],
        };
        let (_, loss) = trainer.forward_loss(&batch).unwrap();
        let got = trainer.backward(&loss).unwrap();
        let scale_params = trainer.model.scale_parameters();
        let mut reg = Tensor::zeros((), loss.dtype(), &dev).unwrap();
        for g in &scale_params {
            reg = (reg + g.sqr().unwrap().sum_all().unwrap()).unwrap();
        }
        let (_, loss) = trainer.forward_loss(&batch).unwrap();
        let whole = (loss + (reg * 0.03).unwrap()).unwrap();
        let want = whole.backward().unwrap();
        let vals = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The build packs the s/t networks' parameters on the CPU: the penalty then
        // reaches gains that are slices of a packed variable.
        assert!(trainer.store.trainable_vars().len() < trainer.store.tensors().len());
        let (got, want) = (
            trainer.store.grads_by_name(&got).unwrap(),
            trainer.store.grads_by_name(&want).unwrap(),
        );
        let named = trainer.store.tensors();
        let gains: Vec<String> = scale_params
            .iter()
            .map(|g| {
                let id = g.id();
                let (name, _) = named.iter().find(|(_, t)| t.id() == id).unwrap();
                name.clone()
            })
            .collect();
        assert!(!gains.is_empty());
        assert_eq!(got.len(), want.len());
        for (name, b) in &want {
            let a = got.get(name).unwrap_or_else(|| panic!("{name}"));
            let (va, vb) = (vals(a), vals(b));
            let scale = vb.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in va.iter().zip(&vb) {
                assert!(
                    (x - y).abs() <= 2.0 * f32::EPSILON * scale,
                    "gradient of {name}: {x} vs {y}"
                );
            }
            if gains.contains(name) {
                let penalty: Vec<f32> = vals(&named[name]).iter().map(|g| 0.06 * g).collect();
                assert!(va != penalty && va.iter().any(|&d| d != 0.0), "{name}");
            }
        }
    }

    #[test]
    fn warmup_ramps_linearly_then_holds() {
        assert_eq!(warmup_lr(1e-3, 0, 1), 1e-3);
        assert_eq!(warmup_lr(1e-3, 4, 1), 0.25e-3);
        assert_eq!(warmup_lr(1e-3, 4, 2), 0.5e-3);
        assert_eq!(warmup_lr(1e-3, 4, 3), 0.75e-3);
        assert_eq!(warmup_lr(1e-3, 4, 4), 1e-3);
        assert_eq!(warmup_lr(1e-3, 4, 1000), 1e-3);
    }

    /// Worked by hand: log p(x|y) = (−1, −2, −3), label 1 → log p(x|1) = −2,
    /// log p(x) = ln((e⁻¹ + e⁻² + e⁻³)/3) = −1.6910063242237292, most likely class 0;
    /// and log-densities far below f64's exp range (−1000, −1001) still give
    /// −1000 + ln((1 + e⁻¹)/2) = −1000.3798854930417, class 0.
    #[test]
    fn classify_one_by_hand() {
        let (c, m, best) = classify_one(&[-1.0, -2.0, -3.0], 1);
        assert_eq!(c, -2.0);
        assert!((m - -1.6910063242237292).abs() < 1e-14, "{m}");
        assert_eq!(best, 0);
        let (c, m, best) = classify_one(&[-1000.0, -1001.0], 1);
        assert_eq!(c, -1001.0);
        assert!((m - -1000.3798854930417).abs() < 1e-11, "{m}");
        assert_eq!(best, 0);
        let (_, _, best) = classify_one(&[-5.0, -4.0, -4.5], 0);
        assert_eq!(best, 1);
    }
}
