//! Network building blocks for the s/t conditioners: weight-normalised 3×3
//! convolution, batch normalisation (inside the networks, with a learned
//! affine), linear layers, and the batch-statistics helpers shared with the
//! batch-norm bijection.

use candle_core::{Result, Tensor, D};
use candle_nn::init::Init;
use candle_nn::VarBuilder;

use crate::flow::Mode;
use crate::params::{as_var, set_in_place};

/// The axes that batch statistics reduce over: all but the feature axis 1.
pub(crate) fn stat_dims(rank: usize) -> Vec<usize> {
    (0..rank).filter(|&d| d != 1).collect()
}

/// Shape that broadcasts a per-feature vector of length `c` against a
/// tensor of the given rank: `(1, c, 1, ..)`.
pub(crate) fn feature_shape(c: usize, rank: usize) -> Vec<usize> {
    let mut s = vec![1; rank.max(2)];
    s[1] = c;
    s
}

/// Biased batch mean and variance over all axes but 1, kept as `(1, C, 1, ..)`.
pub(crate) fn batch_stats(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let dims = stat_dims(x.rank());
    let count = dims.iter().map(|&d| x.dims()[d]).product::<usize>() as f64;
    let mean = (x.sum_keepdim(dims.clone())? / count)?;
    let centred = x.broadcast_sub(&mean)?;
    let var = (centred.sqr()?.sum_keepdim(dims)? / count)?;
    Ok((mean, var))
}

/// 3×3 convolution, stride 1, zero padding 1, with bias: the fast CPU
/// kernels of `nvp-kernels` for f32 on the CPU, candle's own `conv2d`
/// elsewhere (and when `nvp_kernels::set_fast_cpu(false)`).
pub fn conv3x3(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    nvp_kernels::conv2d_3x3(x, w, Some(b))
}

/// Configuration of a [`WnConv2d`].
#[derive(Debug, Clone, Copy)]
pub struct WnConvConfig {
    /// Start with `g = 0`, so the layer outputs its bias (zero) at first.
    pub zero_init: bool,
}

/// A 3×3 convolution with weight normalisation (Salimans & Kingma 2016):
/// `w = g · v / ‖v‖`, the norm per output channel. Parameters `v`, `g`, `bias`.
#[derive(Debug, Clone)]
pub struct WnConv2d {
    v: Tensor,
    g: Tensor,
    bias: Tensor,
    /// The effective kernel computed once by [`WnConv2d::fix_weight`].
    fixed: Option<Tensor>,
}

impl WnConv2d {
    pub fn new(cin: usize, cout: usize, cfg: WnConvConfig, vb: VarBuilder) -> Result<Self> {
        // PyTorch's default conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        let bound = 1.0 / ((cin * 9) as f64).sqrt();
        let v = vb.get_with_hints(
            (cout, cin, 3, 3),
            "v",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        let fresh = !vb.contains_tensor("g");
        let g = vb.get_with_hints(cout, "g", Init::Const(0.0))?;
        if fresh && !cfg.zero_init {
            as_var(&g)?.set(&v_norm(&v)?.detach())?;
        }
        let bias = vb.get_with_hints(cout, "bias", Init::Const(0.0))?;
        Ok(Self {
            v,
            g,
            bias,
            fixed: None,
        })
    }

    /// The effective kernel `g · v / ‖v‖`, the same bits whichever backward it gets.
    /// On the CPU (by default) and, opted in, on the GPU, the backward is one
    /// closed-form op ([`nvp_kernels::weight_norm`]): a few kernels where candle's
    /// autograd launches about thirty, and gradients that hold no graph
    /// ([`nvp_kernels::weight_norm_op_cpu_enabled`] says why that matters).
    pub fn weight(&self) -> Result<Tensor> {
        if let Some(w) = &self.fixed {
            return Ok(w.clone());
        }
        let dev = self.v.device();
        if (dev.is_cpu() && nvp_kernels::weight_norm_op_cpu_enabled())
            || (dev.is_cuda() && nvp_kernels::weight_norm_op_enabled())
        {
            nvp_kernels::weight_norm(&self.v, &self.g)
        } else {
            nvp_kernels::weight_norm_reference(&self.v, &self.g)
        }
    }

    /// Computes the effective kernel once, detached, and uses it from then on instead
    /// of normalising `v` at every forward pass: for a model whose parameters no
    /// longer change (one loaded for evaluation or sampling), where it saves the
    /// normalisation's kernels per batch — the same bits. Later changes of `v` and
    /// `g` are not seen, and no gradient reaches them.
    pub fn fix_weight(&mut self) -> Result<()> {
        self.fixed = None;
        self.fixed = Some(self.weight()?.detach());
        Ok(())
    }

    /// The weight-norm direction `v` `(Cout, Cin, 3, 3)`.
    pub fn direction(&self) -> &Tensor {
        &self.v
    }

    /// The weight-norm gain (gets the L2 penalty in training).
    pub fn gain(&self) -> &Tensor {
        &self.g
    }

    /// Input channels.
    pub fn in_channels(&self) -> usize {
        self.v.dims()[1]
    }

    /// The bias `(Cout)`.
    pub fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv3x3(x, &self.weight()?, &self.bias)
    }

    /// `forward(bn.forward_relu(x, mode))`, plus `skip` when given. In eval mode without
    /// an autograd graph (a frozen model) on the fast CPU path, the batch norm and ReLU
    /// are applied inside the convolution as its input is read
    /// (`nvp_kernels::bn_relu_conv2d_3x3`; bit-identical to the two steps).
    pub fn forward_after(
        &self,
        bn: &BatchNorm,
        x: &Tensor,
        mode: Mode,
        skip: Option<&Tensor>,
    ) -> Result<Tensor> {
        let w = self.weight()?;
        if mode == Mode::Eval
            && nvp_kernels::bn_relu_conv_fuses(x, &w, Some(&self.bias), skip)
            && bn.fast_path_for(x)
            && !bn.weight.track_op()
            && !bn.bias.track_op()
        {
            let pro = bn.eval_prologue()?;
            return nvp_kernels::bn_relu_conv2d_3x3(x, &pro, &w, Some(&self.bias), skip);
        }
        let a = bn.forward_relu(x, mode)?;
        match skip {
            Some(s) => nvp_kernels::conv2d_3x3_add(&a, &w, Some(&self.bias), s),
            None => conv3x3(&a, &w, &self.bias),
        }
    }
}

fn v_norm(v: &Tensor) -> Result<Tensor> {
    v.flatten_from(1)?.sqr()?.sum(D::Minus1)?.sqrt()
}

/// Configuration of a [`BatchNorm`] inside an s/t network.
#[derive(Debug, Clone, Copy)]
pub struct BatchNormConfig {
    pub momentum: f64,
    pub eps: f64,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        Self {
            momentum: 0.1,
            eps: 1e-5,
        }
    }
}

/// Batch normalisation with a learned affine (`weight`, `bias`) and running
/// statistics (`running_mean`, `running_var`), as PyTorch's `BatchNorm2d`:
/// train mode normalises with the (differentiable) batch statistics and
/// updates the running averages (unbiased variance); eval mode uses them.
#[derive(Debug, Clone)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    cfg: BatchNormConfig,
}

impl BatchNorm {
    pub fn new(c: usize, cfg: BatchNormConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(c, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(c, "bias", Init::Const(0.0))?,
            running_mean: vb.get_with_hints(c, "running_mean", Init::Const(0.0))?,
            running_var: vb.get_with_hints(c, "running_var", Init::Const(1.0))?,
            cfg,
        })
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_act(x, mode, false)
    }

    /// `relu(self.forward(x, mode))`, fused into one op on the fast CPU path.
    pub fn forward_relu(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_act(x, mode, true)
    }

    /// The learned affine `(weight, bias)`, each `(C)`.
    pub fn affine(&self) -> (&Tensor, &Tensor) {
        (&self.weight, &self.bias)
    }

    pub fn config(&self) -> BatchNormConfig {
        self.cfg
    }

    /// Train-mode bookkeeping of a normalisation computed elsewhere (a fused op): moves
    /// the running averages towards the batch `mean` and biased `var` (`(C)`) of `count`
    /// values per channel, with the unbiased variance as PyTorch does.
    pub fn record_batch_stats(&self, mean: &Tensor, var: &Tensor, count: usize) -> Result<()> {
        record_running(
            (&self.running_mean, &self.running_var),
            mean,
            var,
            count,
            self.cfg.momentum,
        )
    }

    /// Whether the fused kernels of `nvp-kernels` take `x` and these parameters.
    fn fast_path_for(&self, x: &Tensor) -> bool {
        let params = [
            &self.weight,
            &self.bias,
            &self.running_mean,
            &self.running_var,
        ];
        nvp_kernels::batch_norm_uses_fast_path(x, &params)
    }

    /// The eval-mode normalisation with ReLU as a convolution prologue.
    fn eval_prologue(&self) -> Result<nvp_kernels::BnReluPrologue> {
        nvp_kernels::BnReluPrologue::new(
            &self.weight,
            &self.bias,
            &self.running_mean,
            &self.running_var,
            self.cfg.eps,
        )
    }

    fn forward_act(&self, x: &Tensor, mode: Mode, relu: bool) -> Result<Tensor> {
        if self.fast_path_for(x) {
            return self.forward_fast(x, mode, relu);
        }
        let y = match self.forward_cudnn(x, mode)? {
            Some(y) => y,
            None => self.forward_reference(x, mode)?,
        };
        if relu {
            y.relu()
        } else {
            Ok(y)
        }
    }

    /// The fused f32 CPU path (`nvp_kernels::batch_norm`): the same statistics,
    /// normalisation, affine and running-average update as the reference.
    fn forward_fast(&self, x: &Tensor, mode: Mode, relu: bool) -> Result<Tensor> {
        let affine = Some((&self.weight, &self.bias));
        match mode {
            Mode::Train => {
                let out = nvp_kernels::batch_norm(x, affine, None, self.cfg.eps, relu, false)?;
                let n = x.elem_count() / x.dim(1)?.max(1);
                self.record_batch_stats(&out.mean, &out.var, n)?;
                Ok(out.y)
            }
            Mode::Eval => {
                let running = Some((&self.running_mean, &self.running_var));
                Ok(nvp_kernels::batch_norm(x, affine, running, self.cfg.eps, relu, false)?.y)
            }
        }
    }

    /// cuDNN's batch norm on CUDA (`nvp_kernels::try_batch_norm_cudnn`): the same
    /// statistics, normalisation and running-average update as the reference; in eval
    /// mode only without an autograd graph (cuDNN's inference op has no backward).
    /// `None` where it does not apply.
    fn forward_cudnn(&self, x: &Tensor, mode: Mode) -> Result<Option<Tensor>> {
        let (w, b, eps) = (&self.weight, &self.bias, self.cfg.eps);
        match mode {
            Mode::Train => {
                let Some(out) = nvp_kernels::try_batch_norm_cudnn(x, w, b, None, eps)? else {
                    return Ok(None);
                };
                let n = x.elem_count() / x.dim(1)?.max(1);
                self.record_batch_stats(&out.mean, &out.var, n)?;
                Ok(Some(out.y))
            }
            Mode::Eval if !(x.track_op() || w.track_op() || b.track_op()) => {
                let running = Some((&self.running_mean, &self.running_var));
                Ok(nvp_kernels::try_batch_norm_cudnn(x, w, b, running, eps)?.map(|o| o.y))
            }
            Mode::Eval => Ok(None),
        }
    }

    /// The candle-op reference path (every device and dtype).
    fn forward_reference(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        let c = x.dim(1)?;
        let fs = feature_shape(c, x.rank());
        let (mean, var) = match mode {
            Mode::Train => {
                let (mean, var) = batch_stats(x)?;
                let n = x.elem_count() / c;
                let unbiased = n as f64 / (n.max(2) - 1) as f64;
                update_running(&self.running_mean, &mean, self.cfg.momentum)?;
                update_running(
                    &self.running_var,
                    &(var.detach() * unbiased)?,
                    self.cfg.momentum,
                )?;
                (mean, var)
            }
            Mode::Eval => (
                self.running_mean.reshape(fs.clone())?,
                self.running_var.reshape(fs.clone())?,
            ),
        };
        let inv_std = (var + self.cfg.eps)?.sqrt()?.recip()?;
        let scale = inv_std.broadcast_mul(&self.weight.reshape(fs.clone())?)?;
        let shift = (self.bias.reshape(fs)? - mean.broadcast_mul(&scale)?)?;
        x.broadcast_mul(&scale)?.broadcast_add(&shift)
    }
}

/// [`BatchNorm::record_batch_stats`] into the running averages `running` (`(mean,
/// var)`): of one batch norm, or of several side by side (their batch statistics
/// likewise, each norm's over the same `count` values).
pub(crate) fn record_running(
    running: (&Tensor, &Tensor),
    mean: &Tensor,
    var: &Tensor,
    count: usize,
    momentum: f64,
) -> Result<()> {
    let unbiased = count as f64 / (count.max(2) - 1) as f64;
    update_running(running.0, mean, momentum)?;
    update_running_scaled(running.1, var, momentum, unbiased)
}

/// `running ← (1 − m)·running + m·batch`, in place, outside the graph.
pub(crate) fn update_running(running: &Tensor, batch: &Tensor, momentum: f64) -> Result<()> {
    update_running_scaled(running, batch, momentum, 1.0)
}

/// `running ← (1 − momentum)·running + momentum·(scale·batch)`: on the GPU by one cuDNN
/// call in place (`scale` folded into its factor), otherwise by candle's ops.
fn update_running_scaled(
    running: &Tensor,
    batch: &Tensor,
    momentum: f64,
    scale: f64,
) -> Result<()> {
    let batch = batch.detach().flatten_all()?.to_dtype(running.dtype())?;
    if nvp_kernels::try_blend_in_place(running, &batch, 1.0 - momentum, momentum * scale)? {
        return Ok(());
    }
    let batch = if scale == 1.0 {
        batch
    } else {
        (batch * scale)?
    };
    let new = ((running.detach() * (1.0 - momentum))? + (batch * momentum)?)?;
    set_in_place(running, &new)
}

/// A dense layer `y = x Wᵀ + b` (weights `weight` (out, in), `bias` (out)).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// `zero_init` starts the layer at zero output.
    pub fn new(din: usize, dout: usize, zero_init: bool, vb: VarBuilder) -> Result<Self> {
        let bound = if zero_init {
            0.0
        } else {
            1.0 / (din as f64).sqrt()
        };
        let init = if zero_init {
            Init::Const(0.0)
        } else {
            Init::Uniform {
                lo: -bound,
                up: bound,
            }
        };
        Ok(Self {
            weight: vb.get_with_hints((dout, din), "weight", init)?,
            bias: vb.get_with_hints(dout, "bias", Init::Const(0.0))?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)
    }
}
