//! The train-mode s/t network as one autograd node on any device, built from the
//! device's own ops: [`resnet_train_ops`].
//!
//! Layer by layer, candle's autograd gives each op of the network a graph node, and
//! its backward pass gives every node's inputs a zero-filled gradient buffer and an
//! add (its gradient store), besides the ops' own backward kernels: for a batch norm
//! fed by a convolution, the bias add's three-axis sum, the ReLU's mask by four
//! kernels, the `narrow` and `reshape` of a packed op output. On a GPU each of those
//! is a kernel launch, and the launches, not the arithmetic, bound a training step at
//! the paper's batch size. Here the forward pass runs the same ops as the layers do
//! (the convolutions and batch norms that [`crate::conv2d_3x3`] and
//! [`crate::try_batch_norm_cudnn`] pick — cuDNN's on a GPU with the `cudnn` feature —,
//! candle's ReLU and residual add) on detached tensors, so no graph is built, and keeps
//! what its backward pass needs. The whole network joins the graph as one node
//! ([`crate::util::pass_through`]) whose backward is written out: each convolution's
//! data, filter and bias gradients, each batch norm's gradient through its batch
//! statistics (cuDNN's backward, or its closed form in candle's ops), ReLU's mask as
//! `sign(a)` (the output `a ≥ 0`), and the skip connection's gradient added once.
//!
//! The values are those of the layer-by-layer network (the same forward ops); the
//! gradients equal it up to rounding (tested in f64 against it in the workspace's
//! `tests/flow_resnet_ops.rs`). Off by default ([`crate::resnet_ops_enabled`]): it has
//! not yet been measured on a GPU. The f32 CPU path has its own fused op,
//! [`crate::resnet_train`], which also applies the batch norms inside the convolutions.

use candle_core::{bail, DType, Result, Tensor};

use crate::resnet::{Conv, Norm, ResNetShape, ResNetTrainOutput};

/// Whether [`resnet_train_ops`] takes these tensors: switched on
/// ([`crate::resnet_ops_enabled`]), `x` and the packed parameters of one dtype (f32 or
/// f64) on one device.
pub fn resnet_train_ops_applies(x: &Tensor, params: &Tensor) -> bool {
    crate::resnet_ops_enabled()
        && x.dtype() == params.dtype()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.device().same_device(params.device())
}

/// The residual s/t network in train mode, as [`crate::resnet_train`] takes it (`x`
/// `(N, C, H, W)`, the packed parameters of [`ResNetShape::param_len`], the batch
/// norms' `eps`), on any device and in f32 or f64: its forward by the device's ops
/// without a graph, one autograd node with a written-out backward (see the module
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
    if params.dims() != [shape.param_len()] {
        bail!(
            "resnet_train_ops: packed parameters of shape {:?}, the network {shape:?} needs ({},)",
            params.shape(),
            shape.param_len()
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
    let net = Net {
        shape,
        eps,
        p: params.detach(),
    };
    let (y, saved) = net.forward(&x.detach())?;
    let stats = saved.stats();
    let y = if x.track_op() || params.track_op() {
        crate::util::pass_through(&y.contiguous()?, x, params, Backward { net, saved })?
    } else {
        y
    };
    Ok(ResNetTrainOutput { y, stats })
}

/// The network's parameters (detached) and sizes.
struct Net {
    shape: ResNetShape,
    eps: f64,
    p: Tensor,
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
    /// The weight `(K, C, 3, 3)` and bias `(K)` of a convolution from `ci` to `co`
    /// channels.
    fn conv(&self, c: Conv, ci: usize, co: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.p
                .narrow(0, c.w, co * ci * 9)?
                .reshape((co, ci, 3, 3))?,
            self.p.narrow(0, c.b, co)?,
        ))
    }

    /// A batch norm's affine `(F)`, `(F)`.
    fn norm(&self, n: Norm) -> Result<(Tensor, Tensor)> {
        let f = self.shape.features;
        Ok((self.p.narrow(0, n.w, f)?, self.p.narrow(0, n.b, f)?))
    }

    fn forward(&self, x: &Tensor) -> Result<(Tensor, Saved)> {
        let s = self.shape;
        let f = s.features;
        let o = s.offsets();
        let (w, b) = self.conv(o.inp, s.cin, f)?;
        let mut h = crate::conv2d_3x3(x, &w, Some(&b))?;
        let mut blocks = Vec::with_capacity(o.blocks.len());
        for &(n1, c1, n2, c2) in &o.blocks {
            let s1 = self.bn_relu(&h, n1)?;
            let (w1, b1) = self.conv(c1, f, f)?;
            let r = crate::conv2d_3x3(&s1.a, &w1, Some(&b1))?;
            let s2 = self.bn_relu(&r, n2)?;
            let (w2, b2) = self.conv(c2, f, f)?;
            h = crate::conv2d_3x3_add(&s2.a, &w2, Some(&b2), &h)?;
            blocks.push((s1, s2));
        }
        let out = self.bn_relu(&h, o.bn_out)?;
        let (w, b) = self.conv(o.out, f, s.cout)?;
        let y = crate::conv2d_3x3(&out.a, &w, Some(&b))?;
        let saved = Saved {
            x: x.clone(),
            blocks,
            out,
        };
        Ok((y, saved))
    }

    /// Batch norm with batch statistics, then ReLU: cuDNN's where it applies, else
    /// the candle-op reference (as the layers pick).
    fn bn_relu(&self, x: &Tensor, n: Norm) -> Result<NormSaved> {
        let (w, b) = self.norm(n)?;
        let (a, mean, var) = match crate::try_batch_norm_cudnn(x, &w, &b, None, self.eps)? {
            Some(o) => (o.y.relu()?, o.mean, o.var),
            None => {
                let o = crate::batch_norm_reference(x, Some((&w, &b)), None, self.eps, true)?;
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

    /// The gradient through ReLU and the batch norm of `n`, from `da`, the gradient of
    /// its output: `(dx, dweight, dbias)`.
    fn bn_relu_backward(&self, s: &NormSaved, n: Norm, da: &Tensor) -> Result<[Tensor; 3]> {
        // ReLU's output is ≥ 0, so its sign is the mask `a > 0`.
        let d = (da * s.a.sign()?)?;
        let (w, _) = self.norm(n)?;
        #[cfg(feature = "cudnn")]
        {
            if crate::cudnn_batch_norm_enabled()
                && crate::cudnn::bn_applies(&s.x, &w, &w, None, self.eps)
            {
                let (dx, dw, db) = crate::cudnn::batch_norm_backward(&s.x, &d, &w, self.eps)?;
                return Ok([dx, dw, db]);
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
        let dx = centred.broadcast_mul(&(w.reshape(fs)? * inv_std)?)?;
        Ok([dx, dweight.flatten_all()?, dbias.flatten_all()?])
    }

    /// The gradients of the convolution `conv(x, w) + b` from `dy`: `dx` (where
    /// `want_dx`), `dw`, `db`.
    fn conv_backward(
        &self,
        x: &Tensor,
        c: Conv,
        ci: usize,
        co: usize,
        dy: &Tensor,
        want_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor, Tensor)> {
        let (w, _) = self.conv(c, ci, co)?;
        #[cfg(feature = "cudnn")]
        {
            if crate::cudnn_enabled() && crate::cudnn::applies(x, &w) {
                return crate::cudnn::conv_backward(x, &w, dy, want_dx);
            }
        }
        let dy = dy.contiguous()?;
        if crate::conv::uses_fast_path(x, &w, None) {
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
        let (dx, dw) = crate::conv::grads_by_conv(x, &w, &dy, want_dx, true)?;
        let dw = dw.ok_or_else(|| candle_core::Error::Msg("resnet_train_ops: no dw".into()))?;
        Ok((dx, dw, dy.sum(vec![0, 2, 3])?))
    }

    /// The gradients of the input (where `want_dx`) and of the packed parameters, in
    /// their order, from the output's gradient `dy`.
    fn backward(
        &self,
        saved: &Saved,
        dy: &Tensor,
        want_dx: bool,
    ) -> Result<(Option<Tensor>, Tensor)> {
        let s = self.shape;
        let f = s.features;
        let o = s.offsets();
        let flat = |t: Tensor| t.flatten_all();
        // Gradients of the parameter groups, collected from the output back and
        // reversed at the end: each group is pushed bias first, then weight.
        let mut parts: Vec<Tensor> = Vec::with_capacity(4 + 8 * o.blocks.len());
        let (da, dw, db) = self.conv_backward(&saved.out.a, o.out, f, s.cout, dy, true)?;
        parts.extend([db, flat(dw)?]);
        let [mut dh, dg, dbeta] = self.bn_relu_backward(&saved.out, o.bn_out, &wanted(da)?)?;
        parts.extend([dbeta, dg]);
        for (&(n1, c1, n2, c2), (s1, s2)) in o.blocks.iter().zip(&saved.blocks).rev() {
            // h_out = conv2(a2) + b2 + h_in: dh reaches conv2 and, unchanged, h_in.
            let (da2, dw2, db2) = self.conv_backward(&s2.a, c2, f, f, &dh, true)?;
            parts.extend([db2, flat(dw2)?]);
            let [dr, dg2, dbeta2] = self.bn_relu_backward(s2, n2, &wanted(da2)?)?;
            parts.extend([dbeta2, dg2]);
            let (da1, dw1, db1) = self.conv_backward(&s1.a, c1, f, f, &dr, true)?;
            parts.extend([db1, flat(dw1)?]);
            let [dh1, dg1, dbeta1] = self.bn_relu_backward(s1, n1, &wanted(da1)?)?;
            parts.extend([dbeta1, dg1]);
            dh = (dh + dh1)?;
        }
        let (dx, dw, db) = self.conv_backward(&saved.x, o.inp, s.cin, f, &dh, want_dx)?;
        parts.extend([db, flat(dw)?]);
        parts.reverse();
        Ok((dx, Tensor::cat(&parts, 0)?))
    }
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
