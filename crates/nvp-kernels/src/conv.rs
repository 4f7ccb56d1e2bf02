//! The 3×3 convolution as candle custom ops.
//!
//! [`conv2d_3x3`] dispatches: f32 on the CPU (with the fast path enabled) goes through
//! [`Conv3x3`] (x, w) or [`Conv3x3Bias`] (x, w, b), whose backward passes are further
//! custom ops ([`Conv3x3GradInput`], [`Conv3x3GradWeight`], [`BiasGrad`]); everything
//! else uses candle's own `conv2d` plus a broadcast bias add.

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};

use crate::kernels::{self, ConvDims};
use crate::util::{f32_slice, with_cpu_f32};

/// Sizes of `x (n, c, h, w)` against `w (k, c, 3, 3)`, validated.
pub(crate) fn dims_of(x: &Shape, w: &Shape) -> Result<ConvDims> {
    let (n, c, h, wd) = x.dims4()?;
    let (k, cw, kh, kw) = w.dims4()?;
    if cw != c || kh != 3 || kw != 3 {
        bail!("conv2d_3x3: weight shape {w:?} does not fit input {x:?} (want (Cout, {c}, 3, 3))");
    }
    Ok(ConvDims { n, c, k, h, w: wd })
}

/// Forward 3×3 convolution (stride 1, zero padding 1) without bias: inputs `x`, `w`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Conv3x3;

/// Forward 3×3 convolution with bias: inputs `x`, `w`, `b`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Conv3x3Bias;

/// Input gradient of [`Conv3x3`]: inputs `dy (n, k, h, w)`, `w (k, c, 3, 3)`; output
/// `(n, c, h, w)`. Not differentiable itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Conv3x3GradInput;

/// Weight gradient of [`Conv3x3`]: inputs `x (n, c, h, w)`, `dy (n, k, h, w)`; output
/// `(k, c, 3, 3)`. Not differentiable itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct Conv3x3GradWeight;

/// Bias gradient: input `dy (n, k, h, w)`; output `(k)`, the sums over n, h, w.
#[derive(Debug, Clone, Copy, Default)]
pub struct BiasGrad;

/// Gradients of x and w for the convolution, skipping arguments that carry no graph.
fn conv_grads(x: &Tensor, w: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
    fast_grads(x, w, dy, x.track_op(), w.track_op())
}

/// The input gradient (where `want_dx`) and weight gradient (where `want_dw`) by this
/// crate's CPU kernels ([`Conv3x3GradInput`], [`Conv3x3GradWeight`]).
pub(crate) fn fast_grads(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want_dx: bool,
    want_dw: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let dy = dy.contiguous()?;
    let gx = if want_dx {
        Some(dy.apply_op2_no_bwd(w, &Conv3x3GradInput)?)
    } else {
        None
    };
    let gw = if want_dw {
        Some(x.apply_op2_no_bwd(&dy, &Conv3x3GradWeight)?)
    } else {
        None
    };
    Ok((gx, gw))
}

impl CustomOp2 for Conv3x3 {
    fn name(&self) -> &'static str {
        "nvp-conv3x3"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = dims_of(l1.shape(), l2.shape())?;
        let x = f32_slice(s1, l1, "x")?;
        let w = f32_slice(s2, l2, "w")?;
        let y = kernels::conv3x3_fwd(x, w, None, d);
        Ok((CpuStorage::F32(y), Shape::from((d.n, d.k, d.h, d.w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        conv_grads(x, w, dy)
    }
}

impl CustomOp3 for Conv3x3Bias {
    fn name(&self) -> &'static str {
        "nvp-conv3x3-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let d = dims_of(l1.shape(), l2.shape())?;
        if l3.shape().dims() != [d.k] {
            bail!("conv2d_3x3: bias shape {:?}, want ({},)", l3.shape(), d.k);
        }
        let x = f32_slice(s1, l1, "x")?;
        let w = f32_slice(s2, l2, "w")?;
        let b = f32_slice(s3, l3, "b")?;
        let y = kernels::conv3x3_fwd(x, w, Some(b), d);
        Ok((CpuStorage::F32(y), Shape::from((d.n, d.k, d.h, d.w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let (gx, gw) = conv_grads(x, w, &dy)?;
        let gb = if b.track_op() {
            Some(dy.apply_op1_no_bwd(&BiasGrad)?)
        } else {
            None
        };
        Ok((gx, gw, gb))
    }
}

impl CustomOp2 for Conv3x3GradInput {
    fn name(&self) -> &'static str {
        "nvp-conv3x3-grad-input"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k, h, wd) = l1.shape().dims4()?;
        let (kw, c, a, b) = l2.shape().dims4()?;
        if kw != k || a != 3 || b != 3 {
            bail!(
                "conv3x3 grad-input: dy {:?} vs w {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let d = ConvDims { n, c, k, h, w: wd };
        let dy = f32_slice(s1, l1, "dy")?;
        let w = f32_slice(s2, l2, "w")?;
        let dx = kernels::conv3x3_grad_input(dy, w, d);
        Ok((CpuStorage::F32(dx), Shape::from((n, c, h, wd))))
    }
}

impl CustomOp2 for Conv3x3GradWeight {
    fn name(&self) -> &'static str {
        "nvp-conv3x3-grad-weight"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, h, wd) = l1.shape().dims4()?;
        let (n2, k, h2, w2) = l2.shape().dims4()?;
        if (n2, h2, w2) != (n, h, wd) {
            bail!(
                "conv3x3 grad-weight: x {:?} vs dy {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let d = ConvDims { n, c, k, h, w: wd };
        let x = f32_slice(s1, l1, "x")?;
        let dy = f32_slice(s2, l2, "dy")?;
        let dw = kernels::conv3x3_grad_weight(x, dy, d);
        Ok((CpuStorage::F32(dw), Shape::from((k, c, 3, 3))))
    }
}

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "nvp-conv-bias-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k, h, w) = l.shape().dims4()?;
        let dy = f32_slice(s, l, "dy")?;
        Ok((
            CpuStorage::F32(kernels::bias_grad(dy, n, k, h * w)),
            Shape::from(k),
        ))
    }
}

/// Whether `conv2d_3x3` would take the fast CPU path for these arguments.
pub fn uses_fast_path(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> bool {
    crate::fast_cpu_enabled()
        && x.device().is_cpu()
        && w.device().is_cpu()
        && x.dtype() == DType::F32
        && w.dtype() == DType::F32
        && b.is_none_or(|b| b.device().is_cpu() && b.dtype() == DType::F32)
}

/// 3×3 convolution, stride 1, zero padding 1, on NCHW tensors.
///
/// `x`: `(N, Cin, H, W)`, `w`: `(Cout, Cin, 3, 3)`, `b`: `(Cout)`; returns
/// `(N, Cout, H, W)`. Differentiable with respect to all three.
///
/// f32 tensors on the CPU use the Winograd / im2col + GEMM custom ops of this crate
/// (unless disabled with [`crate::set_fast_cpu`]); f32/f64 CUDA tensors use cuDNN's
/// forward, backward-data and backward-filter convolutions where the `cudnn` feature is
/// built in (unless disabled with [`crate::set_cudnn`]); anything else uses candle's
/// `conv2d` followed by a broadcast bias add.
pub fn conv2d_3x3(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let d = dims_of(x.shape(), w.shape())?;
    check_bias(b, d)?;
    if uses_fast_path(x, w, b) {
        let x = x.contiguous()?;
        let w = w.contiguous()?;
        match b {
            Some(b) => x.apply_op3(&w, &b.contiguous()?, Conv3x3Bias),
            None => x.apply_op2(&w, Conv3x3),
        }
    } else if let Some(y) = cudnn_conv(x, w, b)? {
        Ok(y)
    } else if crate::dx_as_conv_enabled() {
        conv2d_3x3_dx_as_conv(x, w, b)
    } else {
        conv2d_3x3_reference(x, w, b)
    }
}

/// The convolution by cuDNN, where the `cudnn` feature is built in, switched on
/// ([`crate::cudnn_enabled`]) and the tensors are CUDA f32/f64 tensors; `None` otherwise.
#[cfg(feature = "cudnn")]
fn cudnn_conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Option<Tensor>> {
    if crate::cudnn_enabled() && crate::cudnn::applies(x, w) {
        crate::cudnn::conv2d_3x3_cudnn(x, w, b).map(Some)
    } else {
        Ok(None)
    }
}

/// Without the `cudnn` feature there is no cuDNN convolution.
#[cfg(not(feature = "cudnn"))]
fn cudnn_conv(_: &Tensor, _: &Tensor, _: Option<&Tensor>) -> Result<Option<Tensor>> {
    Ok(None)
}

/// The gradient of candle's `conv2d` (stride 1, padding 1) computed with `conv2d`
/// itself: `dx = conv2d(dy, flip(w)ᵀ)` instead of candle's `conv_transpose2d` (a
/// naive kernel on CUDA), `dw` as candle computes it. Inputs `y` (the detached
/// convolution), `x`, `w`; the forward returns a copy of `y`.
#[derive(Debug, Clone, Copy, Default)]
struct DxAsConv;

impl crate::util::WrittenOutGrad for DxAsConv {
    const NAME: &'static str = "nvp-conv3x3-dx-as-conv";

    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        grads_by_conv(x, w, dy, x.track_op(), w.track_op())
    }
}

/// The input gradient (where `want_dx`) and weight gradient (where `want_dw`) of the
/// 3×3 convolution (stride 1, padding 1) of `x` by `w`, from the output gradient `dy`,
/// both by candle's `conv2d` (any device and dtype): `dx = conv2d(dy, flip(w)ᵀ)`, `dw`
/// as candle's autograd computes it.
pub(crate) fn grads_by_conv(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want_dx: bool,
    want_dw: bool,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let dy = dy.contiguous()?;
    let dx = if want_dx {
        // (K, C, 3, 3) → flipped in space, (C, K, 3, 3).
        let wt = w.flip(&[2, 3])?.transpose(0, 1)?.contiguous()?;
        Some(dy.conv2d(&wt, 1, 1, 1, 1)?)
    } else {
        None
    };
    let dw = if want_dw {
        let g = x
            .transpose(0, 1)?
            .contiguous()?
            .conv2d(&dy.transpose(0, 1)?.contiguous()?, 1, 1, 1, 1)?
            .transpose(0, 1)?;
        Some(g.narrow(2, 0, 3)?.narrow(3, 0, 3)?.contiguous()?)
    } else {
        None
    };
    Ok((dx, dw))
}

/// [`conv2d_3x3_reference`] with the input gradient computed by `conv2d` rather than
/// candle's `conv_transpose2d` (see `NVP_DX_AS_CONV` in [`crate::dx_as_conv_enabled`]);
/// same values, gradients equal up to rounding (tested on the CPU).
pub fn conv2d_3x3_dx_as_conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.detach().conv2d(&w.detach(), 1, 1, 1, 1)?.contiguous()?;
    let y = if x.track_op() || w.track_op() {
        crate::util::pass_through(&y, x, w, DxAsConv)?
    } else {
        y
    };
    match b {
        Some(b) => {
            let k = b.dim(0)?;
            y.broadcast_add(&b.reshape((1, k, 1, 1))?)
        }
        None => Ok(y),
    }
}

/// `conv2d_3x3(x, w, b) + skip`: a convolution followed by a residual connection.
///
/// When no argument carries an autograd graph (evaluation and sampling through a
/// frozen model) and the fast CPU path applies, the addition is fused into the
/// convolution's output (one pass over memory less; the same rounding as adding
/// afterwards, so the result is bit-identical). Otherwise it is the composition of
/// [`conv2d_3x3`] and candle's `add`, differentiable as usual.
pub fn conv2d_3x3_add(x: &Tensor, w: &Tensor, b: Option<&Tensor>, skip: &Tensor) -> Result<Tensor> {
    let d = dims_of(x.shape(), w.shape())?;
    check_skip("conv2d_3x3_add", Some(skip), d)?;
    if !graph_free_fast(x, w, b, Some(skip)) {
        return conv2d_3x3(x, w, b)? + skip;
    }
    check_bias(b, d)?;
    fused_forward(x, None, w, b, Some(skip), d)
}

/// The bias must be `(Cout)`.
pub(crate) fn check_bias(b: Option<&Tensor>, d: ConvDims) -> Result<()> {
    match b {
        Some(b) if b.dims() != [d.k] => {
            bail!("conv2d_3x3: bias shape {:?}, want ({},)", b.shape(), d.k)
        }
        _ => Ok(()),
    }
}

/// A residual input must have the output's shape.
fn check_skip(what: &str, skip: Option<&Tensor>, d: ConvDims) -> Result<()> {
    match skip {
        Some(s) if s.dims() != [d.n, d.k, d.h, d.w] => bail!(
            "{what}: skip shape {:?}, want ({}, {}, {}, {})",
            s.shape(),
            d.n,
            d.k,
            d.h,
            d.w
        ),
        _ => Ok(()),
    }
}

/// Whether the graph-free fused forward applies: the fast CPU path, f32 CPU tensors,
/// no autograd graph on any of them.
fn graph_free_fast(x: &Tensor, w: &Tensor, b: Option<&Tensor>, skip: Option<&Tensor>) -> bool {
    let graph = x.track_op()
        || w.track_op()
        || b.is_some_and(|b| b.track_op())
        || skip.is_some_and(|s| s.track_op());
    !graph
        && uses_fast_path(x, w, b)
        && skip.is_none_or(|s| s.device().is_cpu() && s.dtype() == DType::F32)
}

/// `conv(pro(x), w) + b + skip` by the fused forward kernel, without a graph node
/// (shapes checked by the caller).
fn fused_forward(
    x: &Tensor,
    pro: Option<kernels::Prologue<'_>>,
    w: &Tensor,
    b: Option<&Tensor>,
    skip: Option<&Tensor>,
    d: ConvDims,
) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let b = b.map(|b| b.contiguous()).transpose()?;
    let skip = skip.map(|s| s.contiguous()).transpose()?;
    let y = with_cpu_f32(&x, "x", |xs| {
        with_cpu_f32(&w, "w", |ws| {
            let run = |bs: Option<&[f32]>, ss: Option<&[f32]>| {
                Ok(kernels::conv3x3_fwd_fused(xs, pro, ws, bs, ss, d))
            };
            match (&b, &skip) {
                (Some(b), Some(s)) => with_cpu_f32(b, "b", |bs| {
                    with_cpu_f32(s, "skip", |ss| run(Some(bs), Some(ss)))
                }),
                (Some(b), None) => with_cpu_f32(b, "b", |bs| run(Some(bs), None)),
                (None, Some(s)) => with_cpu_f32(s, "skip", |ss| run(None, Some(ss))),
                (None, None) => run(None, None),
            }
        })
    })?;
    Tensor::from_vec(y, (d.n, d.k, d.h, d.w), x.device())
}

/// An eval-mode batch normalisation with affine, followed by ReLU, to be applied to a
/// convolution's input by [`bn_relu_conv2d_3x3`]: per channel
/// `max((x − mean)·w/sqrt(var + ε) + b, 0)`, with the per-channel factors computed as
/// [`crate::batch_norm`] computes them for given statistics.
#[derive(Debug, Clone)]
pub struct BnReluPrologue {
    centre: Vec<f32>,
    mult: Vec<f32>,
    shift: Vec<f32>,
}

impl BnReluPrologue {
    /// From the batch norm's `weight`, `bias`, `running_mean`, `running_var` (each `(C)`)
    /// and `eps`.
    pub fn new(
        weight: &Tensor,
        bias: &Tensor,
        mean: &Tensor,
        var: &Tensor,
        eps: f64,
    ) -> Result<Self> {
        let (centre, mult, shift) = crate::bn::fixed_affine(weight, bias, mean, var, eps)?;
        Ok(Self {
            centre,
            mult,
            shift,
        })
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.centre.len()
    }

    fn as_kernel(&self) -> kernels::Prologue<'_> {
        kernels::Prologue {
            centre: &self.centre,
            mult: &self.mult,
            shift: &self.shift,
        }
    }
}

/// Whether [`bn_relu_conv2d_3x3`] applies: the fast CPU path is on, every tensor is
/// f32 on the CPU, and none carries an autograd graph (evaluation and sampling through
/// a frozen model).
pub fn bn_relu_conv_fuses(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    skip: Option<&Tensor>,
) -> bool {
    graph_free_fast(x, w, b, skip)
}

/// `conv2d_3x3(pro(x), w, b)`, plus `skip` when given, without materialising `pro(x)`:
/// the batch norm and ReLU are applied while the input is padded for the convolution
/// (Winograd AVX2 kernels; the other kernels map the input first). Bit-identical to
/// [`crate::batch_norm`] (eval mode, ReLU) followed by [`conv2d_3x3_add`] /
/// [`conv2d_3x3`]. Only where [`bn_relu_conv_fuses`] holds: no gradient flows.
pub fn bn_relu_conv2d_3x3(
    x: &Tensor,
    pro: &BnReluPrologue,
    w: &Tensor,
    b: Option<&Tensor>,
    skip: Option<&Tensor>,
) -> Result<Tensor> {
    let d = dims_of(x.shape(), w.shape())?;
    if !bn_relu_conv_fuses(x, w, b, skip) {
        bail!("bn_relu_conv2d_3x3: needs f32 CPU tensors without a graph and the fast path on");
    }
    if pro.channels() != d.c {
        bail!(
            "bn_relu_conv2d_3x3: batch norm of {} channels for input {:?}",
            pro.channels(),
            x.shape()
        );
    }
    check_bias(b, d)?;
    check_skip("bn_relu_conv2d_3x3", skip, d)?;
    fused_forward(x, Some(pro.as_kernel()), w, b, skip, d)
}

/// The reference path: candle's own `conv2d(w, padding 1, stride 1, dilation 1,
/// groups 1)` plus a broadcast bias add. Works on every device and dtype.
pub fn conv2d_3x3_reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.conv2d(w, 1, 1, 1, 1)?;
    match b {
        Some(b) => {
            let k = b.dim(0)?;
            y.broadcast_add(&b.reshape((1, k, 1, 1))?)
        }
        None => Ok(y),
    }
}
