//! Weight normalisation `w = g · v / ‖v‖` (one norm per output channel, over all the
//! other dimensions of `v`) with a hand-written backward pass.
//!
//! Through candle's autograd the five ops of the forward make about thirty kernels in
//! the backward: each op's local gradient, and for every gradient a zero-filled buffer
//! and an add (candle's gradient store). On a GPU, where every kernel costs a launch,
//! that is most of the weight norm's cost, and the s/t networks have one per
//! convolution. [`weight_norm()`] computes the same forward (the same candle ops, so the
//! same bits) and attaches one backward that uses the closed form, with `u = v / ‖v‖`:
//!
//! - `∂L/∂g = ⟨∂L/∂w, u⟩` per output channel,
//! - `∂L/∂v = (g / ‖v‖) · (∂L/∂w − u · ∂L/∂g)`.

use candle_core::{bail, Result, Tensor, D};

/// `w = g · v / ‖v‖` with candle's ops (differentiable through autograd): `v` of shape
/// `(K, …)`, `g` of shape `(K)`.
pub fn weight_norm_reference(v: &Tensor, g: &Tensor) -> Result<Tensor> {
    let k = v.dim(0)?;
    let scale = weight_norm_scale(v, g)?;
    let mut dims = vec![1usize; v.rank()];
    dims[0] = k;
    v.broadcast_mul(&scale.reshape(dims)?)
}

/// `g / ‖v‖` per output channel `(K)`: the factor [`weight_norm_reference`] multiplies
/// each row of `v` by (one f32 or f64 multiplication per element, so a kernel that
/// multiplies by it gets the same bits).
pub(crate) fn weight_norm_scale(v: &Tensor, g: &Tensor) -> Result<Tensor> {
    let norm = v.flatten_from(1)?.sqr()?.sum(D::Minus1)?.sqrt()?;
    g / norm
}

/// [`weight_norm_reference`]'s value (bit for bit) with the closed-form backward of the
/// module documentation: fewer kernels, the same gradient up to rounding.
pub fn weight_norm(v: &Tensor, g: &Tensor) -> Result<Tensor> {
    if v.rank() < 2 || g.dims() != [v.dim(0)?] {
        bail!(
            "weight_norm: v {:?} and g {:?}; want v (K, …) and g (K)",
            v.shape(),
            g.shape()
        );
    }
    let w = weight_norm_reference(&v.detach(), &g.detach())?;
    if !v.track_op() && !g.track_op() {
        return Ok(w);
    }
    crate::util::pass_through(&w, v, g, WeightNormGrad)
}

/// (w, v, g) → a copy of w; the gradient flows to v and g by the closed form.
struct WeightNormGrad;

impl crate::util::WrittenOutGrad for WeightNormGrad {
    const NAME: &'static str = "nvp-weight-norm";

    fn grads(
        &self,
        v: &Tensor,
        g: &Tensor,
        dw: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dv, dg) = weight_norm_backward(v, g, dw)?;
        Ok((Some(dv), Some(dg)))
    }
}

/// The gradients `(∂L/∂v, ∂L/∂g)` of `w = g · v / ‖v‖` from `∂L/∂w`, by the closed form
/// of the module documentation, outside any graph.
pub(crate) fn weight_norm_backward(
    v: &Tensor,
    g: &Tensor,
    dw: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let k = v.dim(0)?;
    let v = v.detach();
    let vf = v.flatten_from(1)?;
    let norm = vf.sqr()?.sum_keepdim(1)?.sqrt()?; // (K, 1)
    let u = vf.broadcast_div(&norm)?;
    let dwf = dw.reshape(vf.shape())?;
    let dg = (&dwf * &u)?.sum_keepdim(1)?; // (K, 1)
    let gain = (g.detach().reshape((k, 1))? / &norm)?;
    let dv = (dwf - u.broadcast_mul(&dg)?)?
        .broadcast_mul(&gain)?
        .reshape(v.shape())?;
    Ok((dv, dg.reshape(k)?))
}
