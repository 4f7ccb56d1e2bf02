//! The s/t residual network of the image couplings, trained as one custom op.
//!
//! The network (`nvp_flow::conditioner::ResNet`): `conv3×3(C→F)`, then `B`
//! pre-activation blocks `h ← conv3×3(relu(bn₂(conv3×3(relu(bn₁(h)))))) + h`, then
//! `conv3×3(relu(bn_out(h)))` (F→K). Built from separate ops, candle's autograd gives
//! every intermediate tensor a fresh zero gradient and adds into it, single-threaded
//! (about a tenth of a training step, with the second core idle). [`resnet_train`]
//! runs the whole network in train mode (batch statistics) as one op whose backward
//! pass is written out here, with the same kernels and the same arithmetic as the
//! separate ops: the gradients are equal (tested against the op-by-op network in
//! `tests/flow_fused.rs` of the workspace). The residual gradient is added inside the
//! batch-norm backward instead of by a separate pass.
//!
//! Parameters come as one packed f32 vector of the raw parameters, each convolution's
//! weight-norm direction `v` and gain `g` rather than its weight (the layout of
//! [`ResNetShape::param_len_weight_norm`], shared with `resnet_train_ops`), so that
//! their gradient returns through candle's `cat` to the parameters themselves. The op
//! normalises the weights in its forward pass (the factors `g / ‖v‖` by
//! [`crate::weight_norm_reference`]'s ops, then one multiplication per element, so the
//! same bits as the layers), keeps only the factors, multiplies again in its backward
//! pass, and returns the gradients of `v` and `g` by the closed form
//! ([`crate::weight_norm()`]'s): the graph holds the raw parameters once, not the
//! normalised weights as well. Activations needed by the backward pass (each block's
//! input, the two batch-norm outputs and the inner convolution's output) are kept by
//! the op until the graph is dropped.

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::bn::{self, Params};
use crate::kernels::{self, ConvDims};
use crate::resnet_ops::WnConv;
use crate::util::{f32_slice, with_cpu_f32};

/// Sizes of a residual s/t network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResNetShape {
    /// Input channels.
    pub cin: usize,
    /// Feature maps of the hidden layers.
    pub features: usize,
    /// Residual blocks.
    pub blocks: usize,
    /// Output channels.
    pub cout: usize,
}

/// Where one layer's parameters lie in the packed vector.
#[derive(Debug, Clone, Copy)]
struct Conv {
    w: usize,
    b: usize,
}

#[derive(Debug, Clone, Copy)]
struct Norm {
    w: usize,
    b: usize,
}

#[derive(Debug, Clone)]
struct Offsets {
    inp: Conv,
    blocks: Vec<(Norm, Conv, Norm, Conv)>,
    bn_out: Norm,
    out: Conv,
    len: usize,
}

impl ResNetShape {
    /// Length of the kernels' parameter vector (internal to the op, built from the raw
    /// parameters by weight normalisation), in this order: `inp` weight
    /// `(F, C, 3, 3)` and bias `(F)`; per block: `bn1` weight and bias `(F)`, `conv1`
    /// weight `(F, F, 3, 3)` and bias, `bn2` weight and bias, `conv2` weight and bias;
    /// then `bn_out` weight and bias, and `out` weight `(K, F, 3, 3)` and bias `(K)`.
    pub fn param_len(&self) -> usize {
        self.offsets().len
    }

    fn offsets(&self) -> Offsets {
        /// Hands out consecutive ranges of the packed vector.
        struct Cursor(usize);
        impl Cursor {
            fn take(&mut self, len: usize) -> usize {
                self.0 += len;
                self.0 - len
            }
            fn conv(&mut self, ci: usize, co: usize) -> Conv {
                Conv {
                    w: self.take(co * ci * 9),
                    b: self.take(co),
                }
            }
            fn norm(&mut self, f: usize) -> Norm {
                Norm {
                    w: self.take(f),
                    b: self.take(f),
                }
            }
        }
        let f = self.features;
        let mut at = Cursor(0);
        let inp = at.conv(self.cin, f);
        let blocks = (0..self.blocks)
            .map(|_| (at.norm(f), at.conv(f, f), at.norm(f), at.conv(f, f)))
            .collect();
        let bn_out = at.norm(f);
        let out = at.conv(f, self.cout);
        Offsets {
            inp,
            blocks,
            bn_out,
            out,
            len: at.0,
        }
    }
}

/// Activations of one block kept for the backward pass: the inputs of its two batch
/// norms and their statistics (the normalised, rectified tensors are never stored:
/// the convolutions apply the normalisation as they read their input, forward and
/// in the weight gradient).
#[derive(Debug)]
struct BlockSaved {
    h: Vec<f32>,
    n1: Arc<Params>,
    r: Vec<f32>,
    n2: Arc<Params>,
}

#[derive(Debug)]
struct Saved {
    blocks: Vec<BlockSaved>,
    h: Vec<f32>,
    n_out: Arc<Params>,
    /// Each convolution's weight-norm factor `g / ‖v‖` (`K`), in [`ResNetTrain::convs`]
    /// order: the backward pass normalises the weights again from them.
    scales: Vec<Vec<f32>>,
}

impl Saved {
    /// The batch norms' statistics in network order: bn1, bn2 of each block, bn_out.
    fn norms(&self) -> impl Iterator<Item = &Arc<Params>> {
        self.blocks
            .iter()
            .flat_map(|b| [&b.n1, &b.n2])
            .chain(std::iter::once(&self.n_out))
    }
}

type SavedState = Arc<Mutex<Option<Arc<Saved>>>>;

/// The train-mode network as a custom op: inputs `x (N, C, H, W)` and the packed
/// parameters; output `(N, K, H, W)`.
#[derive(Debug, Clone)]
struct ResNetTrain {
    shape: ResNetShape,
    eps: f64,
    saved: SavedState,
}

fn slice(p: &[f32], at: usize, len: usize) -> &[f32] {
    &p[at..at + len]
}

impl ResNetTrain {
    fn dims(&self, x: &Shape) -> Result<(ConvDims, ConvDims, ConvDims)> {
        let (n, c, h, w) = x.dims4()?;
        let s = self.shape;
        if c != s.cin {
            bail!(
                "resnet_train: input {x:?} has {c} channels, the network takes {}",
                s.cin
            );
        }
        let f = s.features;
        Ok((
            ConvDims { n, c, k: f, h, w },
            ConvDims {
                n,
                c: f,
                k: f,
                h,
                w,
            },
            ConvDims {
                n,
                c: f,
                k: s.cout,
                h,
                w,
            },
        ))
    }

    /// Each convolution in network order (`inp`, `conv1` and `conv2` of each block,
    /// `out`): where it lies in the kernels' vector and in the raw one, its input and
    /// output channels.
    fn convs(&self) -> Vec<(Conv, WnConv, usize, usize)> {
        let (o, r) = (self.shape.offsets(), self.shape.weight_norm_layout());
        let (f, s) = (self.shape.features, self.shape);
        let mut v = vec![(o.inp, r.inp, s.cin, f)];
        for (i, &(_, c1, _, c2)) in o.blocks.iter().enumerate() {
            for (j, c) in [(2 * i, c1), (2 * i + 1, c2)] {
                v.push((c, r.inner_conv(j, f), f, f));
            }
        }
        v.push((o.out, r.out, f, s.cout));
        v
    }

    /// Each batch norm in network order (`bn1`, `bn2` of each block, `bn_out`): where
    /// its weight and bias lie in the kernels' vector and in the raw one.
    fn norms(&self) -> Vec<(Norm, usize)> {
        let (o, r) = (self.shape.offsets(), self.shape.weight_norm_layout());
        let f = self.shape.features;
        o.blocks
            .iter()
            .flat_map(|&(n1, _, n2, _)| [n1, n2])
            .chain(std::iter::once(o.bn_out))
            .enumerate()
            .map(|(k, n)| (n, r.norm(k, f)))
            .collect()
    }

    /// `(v, g)` of a convolution, as CPU tensors, from the raw vector.
    fn direction_gain(raw: &[f32], c: WnConv, ci: usize, co: usize) -> Result<(Tensor, Tensor)> {
        let v = Tensor::from_slice(&raw[c.v..c.v + co * ci * 9], (co, ci, 3, 3), &Device::Cpu)?;
        let g = Tensor::from_slice(&raw[c.g..c.g + co], co, &Device::Cpu)?;
        Ok((v, g))
    }

    /// Each convolution's weight-norm factor `g / ‖v‖` from the raw vector, by the ops
    /// of [`crate::weight_norm_reference`] (so the same bits as the layers).
    fn weight_norm_scales(&self, raw: &[f32]) -> Result<Vec<Vec<f32>>> {
        self.convs()
            .into_iter()
            .map(|(_, r, ci, co)| {
                let (v, g) = Self::direction_gain(raw, r, ci, co)?;
                crate::weight_norm::weight_norm_scale(&v, &g)?.to_vec1::<f32>()
            })
            .collect()
    }

    /// The kernels' vector ([`ResNetShape::param_len`]) from the raw one: each weight
    /// `v · (g / ‖v‖)` with the factors `scales`, one multiplication per element as in
    /// [`crate::weight_norm_reference`]; the rest copied.
    fn normalised(&self, raw: &[f32], scales: &[Vec<f32>]) -> Vec<f32> {
        let mut p = vec![0.0f32; self.shape.param_len()];
        for ((c, r, ci, co), sc) in self.convs().into_iter().zip(scales) {
            let row = ci * 9;
            let (v, w) = (&raw[r.v..r.v + co * row], &mut p[c.w..c.w + co * row]);
            for ((wr, vr), &s) in w.chunks_mut(row).zip(v.chunks(row)).zip(sc) {
                for (o, &x) in wr.iter_mut().zip(vr) {
                    *o = x * s;
                }
            }
            p[c.b..c.b + co].copy_from_slice(&raw[r.b..r.b + co]);
        }
        let f = self.shape.features;
        for (n, at) in self.norms() {
            p[n.w..n.w + f].copy_from_slice(&raw[at..at + f]);
            p[n.b..n.b + f].copy_from_slice(&raw[at + f..at + 2 * f]);
        }
        p
    }

    /// The raw vector's gradient from the kernels' vector's `dp`: each convolution's
    /// `v` and `g` by weight normalisation's closed form, the rest copied.
    fn raw_grad(&self, raw: &[f32], dp: &[f32]) -> Result<Vec<f32>> {
        let mut d = vec![0.0f32; raw.len()];
        // The convolutions in parallel (most are small: their ops alone would leave the
        // other threads idle).
        let convs = self.convs();
        let grads = convs
            .par_iter()
            .map(|&(c, r, ci, co)| {
                let (v, g) = Self::direction_gain(raw, r, ci, co)?;
                let n = co * ci * 9;
                let dw = Tensor::from_slice(&dp[c.w..c.w + n], (co, ci, 3, 3), &Device::Cpu)?;
                let (dv, dg) = crate::weight_norm::weight_norm_backward(&v, &g, &dw)?;
                Ok((dv.flatten_all()?.to_vec1::<f32>()?, dg.to_vec1::<f32>()?))
            })
            .collect::<Result<Vec<_>>>()?;
        for (&(c, r, _, co), (dv, dg)) in convs.iter().zip(grads) {
            d[r.v..r.v + dv.len()].copy_from_slice(&dv);
            d[r.g..r.g + co].copy_from_slice(&dg);
            d[r.b..r.b + co].copy_from_slice(&dp[c.b..c.b + co]);
        }
        let f = self.shape.features;
        for (n, at) in self.norms() {
            d[at..at + f].copy_from_slice(&dp[n.w..n.w + f]);
            d[at + f..at + 2 * f].copy_from_slice(&dp[n.b..n.b + f]);
        }
        Ok(d)
    }

    fn forward(
        &self,
        x: &[f32],
        p: &[f32],
        scales: Vec<Vec<f32>>,
        shape: &Shape,
    ) -> Result<Vec<f32>> {
        let (d_in, d_ff, d_out) = self.dims(shape)?;
        let o = self.shape.offsets();
        let f = self.shape.features;
        let nch = (d_ff.n, f, d_ff.hw());
        let conv_w = |c: Conv, d: ConvDims| slice(p, c.w, d.w_len());
        let bias = |c: Conv, d: ConvDims| Some(slice(p, c.b, d.k));
        let affine = |n: Norm| (slice(p, n.w, f), slice(p, n.b, f));
        let mut h = kernels::conv3x3_fwd(x, conv_w(o.inp, d_in), bias(o.inp, d_in), d_in);
        let mut blocks = Vec::with_capacity(o.blocks.len());
        for &(n1, c1, n2, c2) in &o.blocks {
            let s1 = bn::train_params(&h, nch, affine(n1), self.eps)?;
            let r = kernels::conv3x3_fwd_fused(
                &h,
                Some(s1.prologue()),
                conv_w(c1, d_ff),
                bias(c1, d_ff),
                None,
                d_ff,
            );
            let s2 = bn::train_params(&r, nch, affine(n2), self.eps)?;
            let next = kernels::conv3x3_fwd_fused(
                &r,
                Some(s2.prologue()),
                conv_w(c2, d_ff),
                bias(c2, d_ff),
                Some(&h),
                d_ff,
            );
            blocks.push(BlockSaved {
                h,
                n1: s1,
                r,
                n2: s2,
            });
            h = next;
        }
        let n_out = bn::train_params(&h, nch, affine(o.bn_out), self.eps)?;
        let y = kernels::conv3x3_fwd_fused(
            &h,
            Some(n_out.prologue()),
            conv_w(o.out, d_out),
            bias(o.out, d_out),
            None,
            d_out,
        );
        let saved = Saved {
            blocks,
            h,
            n_out,
            scales,
        };
        match self.saved.lock() {
            Ok(mut g) => *g = Some(Arc::new(saved)),
            Err(_) => bail!("resnet_train: state poisoned"),
        }
        Ok(y)
    }

    fn saved(&self) -> Result<Arc<Saved>> {
        match self.saved.lock() {
            Ok(g) => match g.as_ref() {
                Some(s) => Ok(s.clone()),
                None => bail!("resnet_train: backward before forward"),
            },
            Err(_) => bail!("resnet_train: state poisoned"),
        }
    }

    /// `(dx if want_dx, d(packed parameters))` for the output gradient `dy`.
    fn backward(
        &self,
        x: &[f32],
        p: &[f32],
        dy: &[f32],
        shape: &Shape,
        want_dx: bool,
    ) -> Result<(Option<Vec<f32>>, Vec<f32>)> {
        let (d_in, d_ff, d_out) = self.dims(shape)?;
        let o = self.shape.offsets();
        let f = self.shape.features;
        let nch = (d_ff.n, f, d_ff.hw());
        let s = self.saved()?;
        let mut dp = vec![0.0f32; o.len];
        let put = |dp: &mut [f32], at: usize, v: &[f32]| dp[at..at + v.len()].copy_from_slice(v);
        // The weight gradient of a convolution whose input is `pro(input)`.
        let conv_grads = |dp: &mut [f32],
                          c: Conv,
                          d: ConvDims,
                          (input, pro): (&[f32], Option<&Params>),
                          g: &[f32]| {
            let pro = pro.map(|p| p.prologue());
            put(
                dp,
                c.w,
                &kernels::conv3x3_grad_weight_fused(input, pro, g, d),
            );
            put(dp, c.b, &kernels::bias_grad(g, d.n, d.k, d.hw()));
        };
        let norm_grads = |dp: &mut [f32], n: Norm, dw: &[f32], db: &[f32]| {
            put(dp, n.w, dw);
            put(dp, n.b, db);
        };
        // out = conv(relu(bn_out(h))).
        conv_grads(&mut dp, o.out, d_out, (&s.h, Some(&s.n_out)), dy);
        let da = kernels::conv3x3_grad_input(dy, slice(p, o.out.w, d_out.w_len()), d_out);
        let (mut dh, dw, db) = bn::train_backward(&s.n_out, true, &s.h, &da, nch, None);
        norm_grads(&mut dp, o.bn_out, &dw, &db);
        for (&(n1, c1, n2, c2), b) in o.blocks.iter().zip(&s.blocks).rev() {
            // next = conv2(relu(bn2(conv1(relu(bn1(h)))))) + h.
            conv_grads(&mut dp, c2, d_ff, (&b.r, Some(&b.n2)), &dh);
            let da2 = kernels::conv3x3_grad_input(&dh, slice(p, c2.w, d_ff.w_len()), d_ff);
            let (dr, dw, db) = bn::train_backward(&b.n2, true, &b.r, &da2, nch, None);
            norm_grads(&mut dp, n2, &dw, &db);
            drop(da2);
            conv_grads(&mut dp, c1, d_ff, (&b.h, Some(&b.n1)), &dr);
            let da1 = kernels::conv3x3_grad_input(&dr, slice(p, c1.w, d_ff.w_len()), d_ff);
            drop(dr);
            let (dh_in, dw, db) = bn::train_backward(&b.n1, true, &b.h, &da1, nch, Some(&dh));
            norm_grads(&mut dp, n1, &dw, &db);
            dh = dh_in;
        }
        conv_grads(&mut dp, o.inp, d_in, (x, None), &dh);
        let dx = want_dx
            .then(|| kernels::conv3x3_grad_input(&dh, slice(p, o.inp.w, d_in.w_len()), d_in));
        Ok((dx, dp))
    }
}

impl CustomOp2 for ResNetTrain {
    fn name(&self) -> &'static str {
        "nvp-resnet-train"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "x")?;
        let raw = f32_slice(s2, l2, "resnet parameters")?;
        let (_, _, d_out) = self.dims(l1.shape())?;
        let scales = self.weight_norm_scales(raw)?;
        let p = self.normalised(raw, &scales);
        let y = self.forward(x, &p, scales, l1.shape())?;
        Ok((
            CpuStorage::F32(y),
            Shape::from((d_out.n, d_out.k, d_out.h, d_out.w)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() && !params.track_op() {
            return Ok((None, None));
        }
        let dy = dy.contiguous()?;
        let (dx, dp) = with_cpu_f32(x, "x", |xs| {
            with_cpu_f32(params, "resnet parameters", |raw| {
                with_cpu_f32(&dy, "output gradient", |ds| {
                    // The weights normalised again (with the forward's factors)
                    // rather than kept from the forward.
                    let p = self.normalised(raw, &self.saved()?.scales);
                    let (dx, dp) = self.backward(xs, &p, ds, x.shape(), x.track_op())?;
                    let dp = if params.track_op() {
                        self.raw_grad(raw, &dp)?
                    } else {
                        dp
                    };
                    Ok((dx, dp))
                })
            })
        })?;
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), x.device()))
            .transpose()?;
        let dp = if params.track_op() {
            Some(Tensor::from_vec(dp, params.shape(), params.device())?)
        } else {
            None
        };
        Ok((dx, dp))
    }
}

/// Output of [`resnet_train`].
#[derive(Debug, Clone)]
pub struct ResNetTrainOutput {
    /// The network's output `(N, K, H, W)`, differentiable with respect to `x` and the
    /// packed parameters.
    pub y: Tensor,
    /// Per batch norm (`2B + 1`: bn1 and bn2 of each block in order, then bn_out): the batch mean
    /// and biased batch variance `(F)` it normalised with, detached (for the running
    /// averages).
    pub stats: Vec<(Tensor, Tensor)>,
}

/// Whether [`resnet_train`] takes these tensors: the fast CPU path is on (and the
/// fused network, [`crate::tuning::set_fused_resnet`]), both are f32 on the CPU.
pub fn resnet_train_applies(x: &Tensor, params: &Tensor) -> bool {
    fused_cpu_takes(x.device(), x.dtype()) && fused_cpu_takes(params.device(), params.dtype())
}

/// Whether an s/t network of parameters in `dtype` on `device` trains as one autograd
/// node under the present switches: [`resnet_train`] (f32 on the CPU) or
/// [`crate::resnet_train_ops`] (`NVP_RESNET_OPS=1`). Where it does, packing the
/// network's parameters into one flat variable pays; where not, the layer-by-layer
/// network reads them through views, each of whose gradients is padded to the whole
/// vector.
pub fn resnet_one_node_enabled(device: &candle_core::Device, dtype: DType) -> bool {
    fused_cpu_takes(device, dtype) || crate::resnet_ops::ops_take(dtype)
}

/// Whether [`resnet_train`] takes tensors of `dtype` on `device` under the present
/// switches.
fn fused_cpu_takes(device: &candle_core::Device, dtype: DType) -> bool {
    crate::fast_cpu_enabled()
        && crate::fused_resnet_enabled()
        && device.is_cpu()
        && dtype == DType::F32
}

/// The residual s/t network in train mode (batch statistics in every batch norm, with
/// ReLU after each), forward as one op and backward as one op. `x`: `(N, C, H, W)`;
/// `params`: the packed `(P)` raw vector of [`ResNetShape::param_len_weight_norm`]
/// (directions and gains, not weights); `eps`: the batch
/// norms' ε. Errors unless [`resnet_train_applies`].
pub fn resnet_train(
    x: &Tensor,
    params: &Tensor,
    shape: ResNetShape,
    eps: f64,
) -> Result<ResNetTrainOutput> {
    if !resnet_train_applies(x, params) {
        bail!("resnet_train: needs f32 CPU tensors and the fast path on");
    }
    if params.dims() != [shape.param_len_weight_norm()] {
        bail!(
            "resnet_train: packed parameters of shape {:?}, the network {shape:?} needs ({},)",
            params.shape(),
            shape.param_len_weight_norm()
        );
    }
    let op = ResNetTrain {
        shape,
        eps,
        saved: Arc::new(Mutex::new(None)),
    };
    let y = x
        .contiguous()?
        .apply_op2(&params.contiguous()?, op.clone())?;
    let saved = op.saved()?;
    let dev = x.device();
    let stats = saved
        .norms()
        .map(|n| {
            let (m, v) = n.stats();
            Ok((
                Tensor::from_vec(m.to_vec(), m.len(), dev)?,
                Tensor::from_vec(v.to_vec(), v.len(), dev)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(ResNetTrainOutput { y, stats })
}
