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
//! packed raw parameters, with a written-out backward: each convolution's data, filter
//! and bias gradients, the weight normalisation's closed form, each batch norm's
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

use crate::resnet::{Conv, Norm, Offsets, ResNetShape, ResNetTrainOutput};

/// Whether [`resnet_train_ops`] takes these tensors: switched on
/// ([`crate::resnet_ops_enabled`]), `x` and the packed parameters of one dtype (f32 or
/// f64) on one device.
pub fn resnet_train_ops_applies(x: &Tensor, params: &Tensor) -> bool {
    crate::resnet_ops_enabled()
        && x.dtype() == params.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.device().same_device(params.device())
}

/// The residual s/t network in train mode, on any device and in f32 or f64: `x` `(N,
/// C, H, W)`, the packed parameters in the weight-normalised layout of
/// [`ResNetShape::param_len_weight_norm`] (each convolution's `v`, `g` and bias, each
/// batch norm's weight and bias), the batch norms' `eps`. Its forward by the device's
/// ops without a graph, one autograd node with a written-out backward (see the module
/// documentation). Returns the output and each batch norm's batch statistics.
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

/// The network's parameters (detached views of the packed vector) and layout.
struct Net {
    eps: f64,
    o: Offsets,
    /// Per convolution in network order: `inp`, `conv1` and `conv2` of each block,
    /// `out`.
    convs: Vec<ConvParams>,
    /// Per batch norm in network order (`bn1`, `bn2` of each block, `bn_out`): its
    /// weight and bias.
    norms: Vec<(Tensor, Tensor)>,
}

/// A convolution's direction `v`, gain `g`, weight `g · v / ‖v‖` and bias.
struct ConvParams {
    v: Tensor,
    g: Tensor,
    w: Tensor,
    b: Tensor,
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
    /// Reads the packed parameters and normalises the convolutions' weights (by the
    /// layers' own ops, so to the same bits).
    fn new(shape: ResNetShape, eps: f64, p: &Tensor) -> Result<Self> {
        let o = shape.offsets_of(true);
        let f = shape.features;
        let conv = |c: Conv, ci: usize, co: usize| -> Result<ConvParams> {
            let Some(g_at) = c.g else {
                bail!("resnet_train_ops: internal: a layout without gains");
            };
            let v = p.narrow(0, c.w, co * ci * 9)?.reshape((co, ci, 3, 3))?;
            let g = p.narrow(0, g_at, co)?;
            let w = crate::weight_norm_reference(&v, &g)?;
            let b = p.narrow(0, c.b, co)?;
            Ok(ConvParams { v, g, w, b })
        };
        let norm = |n: Norm| -> Result<(Tensor, Tensor)> {
            Ok((p.narrow(0, n.w, f)?, p.narrow(0, n.b, f)?))
        };
        let mut convs = vec![conv(o.inp, shape.cin, f)?];
        let mut norms = Vec::with_capacity(2 * o.blocks.len() + 1);
        for &(n1, c1, n2, c2) in &o.blocks {
            convs.push(conv(c1, f, f)?);
            convs.push(conv(c2, f, f)?);
            norms.push(norm(n1)?);
            norms.push(norm(n2)?);
        }
        convs.push(conv(o.out, f, shape.cout)?);
        norms.push(norm(o.bn_out)?);
        Ok(Self {
            eps,
            o,
            convs,
            norms,
        })
    }

    /// The convolutions `conv1`, `conv2` and batch norms `bn1`, `bn2` of block `i`.
    fn block(&self, i: usize) -> [usize; 4] {
        [1 + 2 * i, 2 + 2 * i, 2 * i, 2 * i + 1]
    }

    fn forward(&self, x: &Tensor) -> Result<(Tensor, Saved)> {
        let cv = &self.convs;
        let mut h = crate::conv2d_3x3(x, &cv[0].w, Some(&cv[0].b))?;
        let nb = self.o.blocks.len();
        let mut blocks = Vec::with_capacity(nb);
        for i in 0..nb {
            let [c1, c2, n1, n2] = self.block(i);
            let s1 = self.bn_relu(&h, n1)?;
            let r = crate::conv2d_3x3(&s1.a, &cv[c1].w, Some(&cv[c1].b))?;
            let s2 = self.bn_relu(&r, n2)?;
            h = crate::conv2d_3x3_add(&s2.a, &cv[c2].w, Some(&cv[c2].b), &h)?;
            blocks.push((s1, s2));
        }
        let out = self.bn_relu(&h, 2 * nb)?;
        let last = &cv[cv.len() - 1];
        let y = crate::conv2d_3x3(&out.a, &last.w, Some(&last.b))?;
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
    /// output: the input's gradient returned, `[dbias, dweight]` (the packed order,
    /// reversed) pushed onto `parts`.
    fn bn_relu_backward(
        &self,
        s: &NormSaved,
        n: usize,
        da: &Tensor,
        parts: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        // ReLU's output is ≥ 0, so its sign is the mask `a > 0`.
        let d = (da * s.a.sign()?)?;
        let (dx, dweight, dbias) = self.bn_grads(s, &self.norms[n].0, &d)?;
        parts.extend([dbias, dweight]);
        Ok(dx)
    }

    /// The gradient of the train-mode batch norm with `weight`: `(dx, dweight, dbias)`
    /// from `d`, the gradient of its output.
    fn bn_grads(
        &self,
        s: &NormSaved,
        weight: &Tensor,
        d: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        #[cfg(feature = "cudnn")]
        {
            if crate::cudnn_batch_norm_enabled()
                && crate::cudnn::bn_applies(&s.x, weight, weight, None, self.eps)
            {
                return crate::cudnn::batch_norm_backward(&s.x, d, weight, self.eps);
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
        let dweight = (d * &xhat)?.sum_keepdim(vec![0, 2, 3])?;
        let centred = d
            .broadcast_sub(&(&dbias / m)?)?
            .broadcast_sub(&xhat.broadcast_mul(&(&dweight / m)?)?)?;
        let dx = centred.broadcast_mul(&(weight.reshape(fs)? * inv_std)?)?;
        Ok((dx, dweight.flatten_all()?, dbias.flatten_all()?))
    }

    /// The gradients of the weight-normalised convolution `c`, `conv(x, g·v/‖v‖) + b`,
    /// from `dy`: the input's gradient (where `want_dx`) returned, `[db, dg, dv]` (the
    /// packed order, reversed) pushed onto `parts`.
    fn conv_backward(
        &self,
        x: &Tensor,
        c: &ConvParams,
        dy: &Tensor,
        want_dx: bool,
        parts: &mut Vec<Tensor>,
    ) -> Result<Option<Tensor>> {
        let (dx, dw, db) = conv_grads(x, &c.w, dy, want_dx)?;
        let (dv, dg) = crate::weight_norm::weight_norm_backward(&c.v, &c.g, &dw)?;
        parts.extend([db, dg, dv.flatten_all()?]);
        Ok(dx)
    }

    /// The gradients of the input (where `want_dx`) and of the packed parameters, in
    /// their order, from the output's gradient `dy`.
    fn backward(
        &self,
        saved: &Saved,
        dy: &Tensor,
        want_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let cv = &self.convs;
        let nb = self.o.blocks.len();
        // Collected from the output back, each layer's in reverse; reversed at the end.
        let mut parts: Vec<Tensor> = Vec::with_capacity(8 + 10 * nb);
        let p = &mut parts;
        let da = self.conv_backward(&saved.out.a, &cv[cv.len() - 1], dy, true, p)?;
        let mut dh = self.bn_relu_backward(&saved.out, 2 * nb, &wanted(da)?, p)?;
        for (i, (s1, s2)) in saved.blocks.iter().enumerate().rev() {
            let [c1, c2, n1, n2] = self.block(i);
            // h_out = conv2(a2) + b2 + h_in: dh reaches conv2 and, unchanged, h_in.
            let da2 = self.conv_backward(&s2.a, &cv[c2], &dh, true, p)?;
            let dr = self.bn_relu_backward(s2, n2, &wanted(da2)?, p)?;
            let da1 = self.conv_backward(&s1.a, &cv[c1], &dr, true, p)?;
            let dh1 = self.bn_relu_backward(s1, n1, &wanted(da1)?, p)?;
            dh = (dh + dh1)?;
        }
        let dx = self.conv_backward(&saved.x, &cv[0], &dh, want_dx, p)?;
        parts.reverse();
        Ok((dx, Tensor::cat(&parts, 0)?))
    }
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
        let x = x.contiguous()?;
        let w = w.contiguous()?;
        let dx = if want_dx {
            Some(dy.apply_op2_no_bwd(&w, &crate::Conv3x3GradInput)?)
        } else {
            None
        };
        let dw = x.apply_op2_no_bwd(&dy, &crate::Conv3x3GradWeight)?;
        let db = dy.apply_op1_no_bwd(&crate::BiasGrad)?;
        return Ok((dx, dw, db));
    }
    let (dx, dw) = crate::conv::grads_by_conv(x, w, &dy, want_dx, true)?;
    let Some(dw) = dw else {
        bail!("resnet_train_ops: internal: no weight gradient");
    };
    Ok((dx, dw, dy.sum(vec![0, 2, 3])?))
}

/// An input gradient that was asked for.
fn wanted(dx: Option<Tensor>) -> Result<Tensor> {
    dx.ok_or_else(|| {
        candle_core::Error::Msg("resnet_train_ops: internal: no input gradient".into())
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
