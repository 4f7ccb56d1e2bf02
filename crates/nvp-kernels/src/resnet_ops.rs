//! The train-mode s/t network as one autograd node on any device, built from the
//! device's own ops: [`resnet_train_ops`].
//!
//! Layer by layer, candle's autograd gives each op of the network a graph node, and
//! its backward pass gives every node's inputs a zero-filled gradient buffer and an
//! add (its gradient store), besides the ops' own backward kernels: for a batch norm
//! fed by a convolution, the bias add's three-axis sum, the ReLU's mask by four
//! kernels, the `narrow` and `reshape` of a packed op output, and seven nodes per
//! convolution for its weight normalisation. On a GPU each of those is a kernel launch,
//! and the launches, not the arithmetic, bound a training step at the paper's batch
//! size. Here the forward pass runs the same ops as the layers do (weight
//! normalisation by [`crate::weight_norm_reference`], the convolutions and batch norms
//! that [`crate::conv2d_3x3`] and [`crate::try_batch_norm_cudnn`] pick — cuDNN's on a
//! GPU with the `cudnn` feature —, candle's ReLU and residual add) on detached tensors,
//! so no graph is built, and keeps what its backward pass needs. The whole network
//! joins the graph as one node ([`crate::util::pass_through`]) on its input and its
//! packed raw parameters (laid out so that the inner convolutions' weights are
//! normalised together, by one set of kernels for all of them), with a written-out
//! backward: each convolution's data, filter and bias gradients, the weight
//! normalisation's closed form (again once for all the inner ones), each batch norm's
//! gradient through its batch statistics (cuDNN's backward, or its closed form in
//! candle's ops), ReLU's mask as `sign(a)` (the output `a ≥ 0`), and the skip
//! connection's gradient added once.
//!
//! The values are those of the layer-by-layer network (the same forward ops); the
//! gradients equal it up to rounding (tested in f64 against it in the workspace's
//! `tests/flow_resnet_ops.rs`). Off by default ([`crate::resnet_ops_enabled`]): it has
//! not yet been measured on a GPU. The f32 CPU path has its own fused op,
//! [`crate::resnet_train`], which also applies the batch norms inside the convolutions.

use candle_core::{bail, DType, Result, Tensor};

use crate::resnet::{ResNetShape, ResNetTrainOutput};

/// Where a weight-normalised convolution's direction `v`, gain `g` and bias lie in the
/// packed vector.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WnConv {
    pub(crate) v: usize,
    pub(crate) g: usize,
    pub(crate) b: usize,
}

/// The packed layout of [`resnet_train_ops`]; see [`ResNetShape::param_len_weight_norm`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub(crate) inp: WnConv,
    /// Where the inner convolutions' directions, gains and biases start (each run
    /// holds all `2B` of them in order).
    pub(crate) inner: WnConv,
    /// Where the batch norms' parameters start.
    pub(crate) norms: usize,
    pub(crate) out: WnConv,
    pub(crate) len: usize,
}

impl Layout {
    /// Where the `j`-th inner convolution (`conv1`, `conv2` of each block in turn) of
    /// `f` features lies.
    pub(crate) fn inner_conv(&self, j: usize, f: usize) -> WnConv {
        WnConv {
            v: self.inner.v + j * f * f * 9,
            g: self.inner.g + j * f,
            b: self.inner.b + j * f,
        }
    }

    /// Where the `k`-th batch norm's weight starts (`bn1`, `bn2` of each block in turn,
    /// then `bn_out`), its bias `f` later.
    pub(crate) fn norm(&self, k: usize, f: usize) -> usize {
        self.norms + 2 * f * k
    }
}

impl ResNetShape {
    /// Length of the packed parameter vector of [`crate::resnet_train_ops`], which
    /// holds each convolution's weight in its weight-normalised form `w = g · v / ‖v‖`
    /// (direction `v` of the weight's shape, gain `g` per output channel), grouped so
    /// that the `2B` inner convolutions are normalised together. In this order:
    /// `inp` `v` `(F, C, 3, 3)`, `g` `(F)`, bias `(F)`; the `v` of `conv1`, `conv2` of
    /// each block in turn `(2B · F, F, 3, 3)`, then their `g` `(2B · F)`, then their
    /// biases `(2B · F)`; the weight and bias `(F)` of each batch norm (`bn1`, `bn2` of
    /// each block in turn, then `bn_out`); `out` `v` `(K, F, 3, 3)`, `g` `(K)`, bias
    /// `(K)`.
    pub fn param_len_weight_norm(&self) -> usize {
        self.weight_norm_layout().len
    }

    pub(crate) fn weight_norm_layout(&self) -> Layout {
        let (f, n) = (self.features, 2 * self.blocks);
        // Consecutive runs: `count` convolutions from `ci` to `co` channels starting at
        // `at`, their directions, then gains, then biases.
        let conv = |at: &mut usize, ci: usize, co: usize, count: usize| {
            let c = WnConv {
                v: *at,
                g: *at + count * co * ci * 9,
                b: *at + count * co * (ci * 9 + 1),
            };
            *at += count * co * (ci * 9 + 2);
            c
        };
        let mut at = 0;
        let inp = conv(&mut at, self.cin, f, 1);
        let inner = conv(&mut at, f, f, n);
        let norms = at;
        at += 2 * f * (n + 1);
        let out = conv(&mut at, f, self.cout, 1);
        Layout {
            inp,
            inner,
            norms,
            out,
            len: at,
        }
    }
}

/// Whether [`resnet_train_ops`] takes these tensors: switched on
/// ([`crate::resnet_ops_enabled`]), `x` and the packed parameters of one dtype (f32 or
/// f64) on one device.
pub fn resnet_train_ops_applies(x: &Tensor, params: &Tensor) -> bool {
    ops_take(x.dtype()) && x.dtype() == params.dtype() && x.device().same_device(params.device())
}

/// Whether [`resnet_train_ops`] takes tensors of `dtype` (on any device) under the
/// present switches.
pub(crate) fn ops_take(dtype: DType) -> bool {
    crate::resnet_ops_enabled() && matches!(dtype, DType::F32 | DType::F64)
}

/// The residual s/t network in train mode, on any device and in f32 or f64: `x` `(N,
/// C, H, W)`, the packed parameters in the weight-normalised layout of
/// [`ResNetShape::param_len_weight_norm`], the batch norms' `eps`. Its forward by the
/// device's ops without a graph, one autograd node with a written-out backward (see
/// the module documentation). Returns the output and each batch norm's batch
/// statistics.
pub fn resnet_train_ops(
    x: &Tensor,
    params: &Tensor,
    shape: ResNetShape,
    eps: f64,
) -> Result<ResNetTrainOutput> {
    let (_, c, _, _) = x.dims4()?;
    if c != shape.cin {
        bail!(
            "resnet_train_ops: input {:?} has {c} channels, the network takes {}",
            x.shape(),
            shape.cin
        );
    }
    if params.dims() != [shape.param_len_weight_norm()] {
        bail!(
            "resnet_train_ops: packed parameters of shape {:?}, the network {shape:?} needs ({},)",
            params.shape(),
            shape.param_len_weight_norm()
        );
    }
    if x.dtype() != params.dtype() || !x.device().same_device(params.device()) {
        bail!(
            "resnet_train_ops: x is {:?} on {:?}, the parameters {:?} on {:?}",
            x.dtype(),
            x.device().location(),
            params.dtype(),
            params.device().location()
        );
    }
    let net = Net::new(shape, eps, &params.detach())?;
    let (y, saved) = net.forward(&x.detach())?;
    let stats = saved.stats();
    let y = if x.track_op() || params.track_op() {
        crate::util::pass_through(&y.contiguous()?, x, params, Backward { net, saved })?
    } else {
        y
    };
    Ok(ResNetTrainOutput { y, stats })
}

/// A convolution's direction `v`, gain `g`, weight `g · v / ‖v‖` and bias.
struct ConvParams {
    v: Tensor,
    g: Tensor,
    w: Tensor,
    b: Tensor,
}

impl ConvParams {
    fn new(p: &Tensor, at: WnConv, ci: usize, co: usize) -> Result<Self> {
        let v = p.narrow(0, at.v, co * ci * 9)?.reshape((co, ci, 3, 3))?;
        let g = p.narrow(0, at.g, co)?;
        let w = crate::weight_norm_reference(&v, &g)?;
        let b = p.narrow(0, at.b, co)?;
        Ok(Self { v, g, w, b })
    }
}

/// The network's parameters: detached views of the packed vector, and the weights
/// normalised from them (by the layers' own ops, so to the same bits).
struct Net {
    eps: f64,
    inp: ConvParams,
    /// The `2B` inner convolutions (`conv1`, `conv2` of each block in turn), whose
    /// weights are normalised together: all their directions and gains, and per
    /// convolution its weight (a view of the one normalisation) and bias.
    inner: Option<ConvParams>,
    inner_wb: Vec<(Tensor, Tensor)>,
    out: ConvParams,
    /// Per batch norm in network order (`bn1`, `bn2` of each block, `bn_out`): its
    /// weight and bias.
    norms: Vec<(Tensor, Tensor)>,
}

/// One batch norm + ReLU of the forward pass: its input, output and batch statistics
/// (mean and biased variance, `(F)`).
struct NormSaved {
    x: Tensor,
    a: Tensor,
    mean: Tensor,
    var: Tensor,
}

/// What the backward pass needs: the network's input and, per block, both batch norms
/// (the first's input is the block's input), then the last batch norm.
struct Saved {
    x: Tensor,
    blocks: Vec<(NormSaved, NormSaved)>,
    out: NormSaved,
}

impl Saved {
    /// The batch statistics in network order: bn1, bn2 of each block, bn_out.
    fn stats(&self) -> Vec<(Tensor, Tensor)> {
        self.blocks
            .iter()
            .flat_map(|(n1, n2)| [n1, n2])
            .chain(std::iter::once(&self.out))
            .map(|n| (n.mean.clone(), n.var.clone()))
            .collect()
    }
}

impl Net {
    fn new(shape: ResNetShape, eps: f64, p: &Tensor) -> Result<Self> {
        let at = shape.weight_norm_layout();
        let (f, n) = (shape.features, 2 * shape.blocks);
        let (inner, inner_wb) = if n > 0 {
            let inner = ConvParams::new(p, at.inner, f, n * f)?;
            let w = inner.w.reshape((n, f, f, 3, 3))?;
            let b = inner.b.reshape((n, f))?;
            let wb = (0..n)
                .map(|i| Ok((w.get(i)?, b.get(i)?)))
                .collect::<Result<Vec<_>>>()?;
            (Some(inner), wb)
        } else {
            (None, Vec::new())
        };
        let norms = (0..=n)
            .map(|i| {
                let base = at.norm(i, f);
                Ok((p.narrow(0, base, f)?, p.narrow(0, base + f, f)?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            eps,
            inp: ConvParams::new(p, at.inp, shape.cin, f)?,
            inner,
            inner_wb,
            out: ConvParams::new(p, at.out, f, shape.cout)?,
            norms,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<(Tensor, Saved)> {
        let mut h = crate::conv2d_3x3(x, &self.inp.w, Some(&self.inp.b))?;
        let nb = self.inner_wb.len() / 2;
        let mut blocks = Vec::with_capacity(nb);
        for i in 0..nb {
            let ((w1, b1), (w2, b2)) = (&self.inner_wb[2 * i], &self.inner_wb[2 * i + 1]);
            let s1 = self.bn_relu(&h, 2 * i)?;
            let r = crate::conv2d_3x3(&s1.a, w1, Some(b1))?;
            let s2 = self.bn_relu(&r, 2 * i + 1)?;
            h = crate::conv2d_3x3_add(&s2.a, w2, Some(b2), &h)?;
            blocks.push((s1, s2));
        }
        let out = self.bn_relu(&h, 2 * nb)?;
        let y = crate::conv2d_3x3(&out.a, &self.out.w, Some(&self.out.b))?;
        let saved = Saved {
            x: x.clone(),
            blocks,
            out,
        };
        Ok((y, saved))
    }

    /// Batch norm `n` with batch statistics, then ReLU: cuDNN's where it applies, else
    /// the candle-op reference (as the layers pick).
    fn bn_relu(&self, x: &Tensor, n: usize) -> Result<NormSaved> {
        let (w, b) = &self.norms[n];
        let (a, mean, var) = match crate::try_batch_norm_cudnn(x, w, b, None, self.eps)? {
            Some(o) => (o.y.relu()?, o.mean, o.var),
            None => {
                let o = crate::batch_norm_reference(x, Some((w, b)), None, self.eps, true)?;
                (o.y, o.mean, o.var)
            }
        };
        Ok(NormSaved {
            x: x.clone(),
            a,
            mean,
            var,
        })
    }

    /// The gradient through ReLU and batch norm `n` from `da`, the gradient of its
    /// output: `(dx, dweight, dbias)`.
    fn bn_relu_backward(
        &self,
        s: &NormSaved,
        n: usize,
        da: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        // ReLU's output is ≥ 0, so its sign is the mask `a > 0`.
        let d = (da * s.a.sign()?)?;
        let weight = &self.norms[n].0;
        #[cfg(feature = "cudnn")]
        {
            if crate::cudnn_batch_norm_enabled()
                && crate::cudnn::bn_applies(&s.x, weight, weight, None, self.eps)
            {
                return crate::cudnn::batch_norm_backward(&s.x, &d, weight, self.eps);
            }
        }
        // The closed form, per channel over its m values: with x̂ = (x − μ)/√(σ² + ε),
        // dbias = Σ d, dweight = Σ d·x̂, dx = weight/√(σ² + ε) · (d − (dbias + x̂·dweight)/m).
        let c = s.x.dim(1)?;
        let fs = (1, c, 1, 1);
        let m = (s.x.elem_count() / c) as f64;
        let inv_std = (s.var.reshape(fs)? + self.eps)?.sqrt()?.recip()?;
        let xhat =
            s.x.broadcast_sub(&s.mean.reshape(fs)?)?
                .broadcast_mul(&inv_std)?;
        let dbias = d.sum_keepdim(vec![0, 2, 3])?;
        let dweight = (&d * &xhat)?.sum_keepdim(vec![0, 2, 3])?;
        let centred = d
            .broadcast_sub(&(&dbias / m)?)?
            .broadcast_sub(&xhat.broadcast_mul(&(&dweight / m)?)?)?;
        let dx = centred.broadcast_mul(&(weight.reshape(fs)? * inv_std)?)?;
        Ok((dx, dweight.flatten_all()?, dbias.flatten_all()?))
    }

    /// The gradients of the input (where `want_dx`) and of the packed parameters, in
    /// their layout, from the output's gradient `dy`.
    fn backward(
        &self,
        saved: &Saved,
        dy: &Tensor,
        want_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let n = self.inner_wb.len();
        let mut inner_dw = vec![None; n];
        let mut inner_db = vec![None; n];
        let mut norm_grads = vec![None; n + 1];
        let (da, dw_out, db_out) = conv_grads(&saved.out.a, &self.out.w, dy, true)?;
        let (mut dh, dwn, dbn) = self.bn_relu_backward(&saved.out, n, &missing(da)?)?;
        norm_grads[n] = Some((dwn, dbn));
        for (i, (s1, s2)) in saved.blocks.iter().enumerate().rev() {
            let (c1, c2) = (2 * i, 2 * i + 1);
            // h_out = conv2(a2) + b2 + h_in: dh reaches conv2 and, unchanged, h_in.
            let (da2, dw2, db2) = conv_grads(&s2.a, &self.inner_wb[c2].0, &dh, true)?;
            (inner_dw[c2], inner_db[c2]) = (Some(dw2), Some(db2));
            let (dr, dwn2, dbn2) = self.bn_relu_backward(s2, c2, &missing(da2)?)?;
            norm_grads[c2] = Some((dwn2, dbn2));
            let (da1, dw1, db1) = conv_grads(&s1.a, &self.inner_wb[c1].0, &dr, true)?;
            (inner_dw[c1], inner_db[c1]) = (Some(dw1), Some(db1));
            let (dh1, dwn1, dbn1) = self.bn_relu_backward(s1, c1, &missing(da1)?)?;
            norm_grads[c1] = Some((dwn1, dbn1));
            dh = (dh + dh1)?;
        }
        let (dx, dw_inp, db_inp) = conv_grads(&saved.x, &self.inp.w, &dh, want_dx)?;
        // The packed layout: inp, the inner convolutions together, the batch norms, out.
        let mut parts = weight_norm_parts(&self.inp, &dw_inp, db_inp)?;
        if let Some(inner) = &self.inner {
            let dw = inner_dw
                .into_iter()
                .map(missing)
                .collect::<Result<Vec<_>>>()?;
            let dw = Tensor::cat(&dw, 0)?;
            let (dv, dg) = crate::weight_norm::weight_norm_backward(&inner.v, &inner.g, &dw)?;
            parts.extend([dv.flatten_all()?, dg]);
            for db in inner_db {
                parts.push(missing(db)?);
            }
        }
        for g in norm_grads {
            let (dw, db) = g.unzip();
            parts.extend([missing(dw)?, missing(db)?]);
        }
        parts.extend(weight_norm_parts(&self.out, &dw_out, db_out)?);
        Ok((dx, Tensor::cat(&parts, 0)?))
    }
}

/// A weight-normalised convolution's parameter gradients in the packed order,
/// `[dv (flat), dg, db]`, from its weight's gradient `dw` and bias gradient `db`.
fn weight_norm_parts(c: &ConvParams, dw: &Tensor, db: Tensor) -> Result<Vec<Tensor>> {
    let (dv, dg) = crate::weight_norm::weight_norm_backward(&c.v, &c.g, dw)?;
    Ok(vec![dv.flatten_all()?, dg, db])
}

/// The gradients of `conv(x, w) + b` from `dy`: `dx` (where `want_dx`), `dw`, `db` —
/// by cuDNN where the forward ran on it, this crate's CPU kernels on their fast path,
/// else candle's `conv2d`.
fn conv_grads(
    x: &Tensor,
    w: &Tensor,
    dy: &Tensor,
    want_dx: bool,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    #[cfg(feature = "cudnn")]
    {
        if crate::cudnn_enabled() && crate::cudnn::applies(x, w) {
            return crate::cudnn::conv_backward(x, w, dy, want_dx);
        }
    }
    let dy = dy.contiguous()?;
    if crate::conv::uses_fast_path(x, w, None) {
        let (x, w) = (x.contiguous()?, w.contiguous()?);
        let (dx, dw) = crate::conv::fast_grads(&x, &w, &dy, want_dx, true)?;
        return Ok((dx, missing(dw)?, dy.apply_op1_no_bwd(&crate::BiasGrad)?));
    }
    let (dx, dw) = crate::conv::grads_by_conv(x, w, &dy, want_dx, true)?;
    Ok((dx, missing(dw)?, dy.sum(vec![0, 2, 3])?))
}

/// A gradient that was asked for (its absence is a bug of this module).
fn missing(t: Option<Tensor>) -> Result<Tensor> {
    t.ok_or_else(|| {
        candle_core::Error::Msg("resnet_train_ops: internal: a gradient is missing".into())
    })
}

/// The backward pass of [`resnet_train_ops`]'s node.
struct Backward {
    net: Net,
    saved: Saved,
}

impl crate::util::WrittenOutGrad for Backward {
    const NAME: &'static str = "nvp-resnet-train-ops";

    fn grads(
        &self,
        x: &Tensor,
        params: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dp) = self.net.backward(&self.saved, dy, x.track_op())?;
        Ok((dx, params.track_op().then_some(dp)))
    }
}
