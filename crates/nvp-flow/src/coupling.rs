//! The masked affine coupling layer (eq. 9):
//! `y = b ⊙ x + (1 − b) ⊙ (x ⊙ exp(s(b ⊙ x)) + t(b ⊙ x))`,
//! `log |det| = Σ (1 − b) ⊙ s`, inverse `x = b ⊙ y + (1 − b) ⊙ (y − t(b ⊙ y)) ⊙ exp(−s(b ⊙ y))`.
//! `s = scale ⊙ tanh(raw_s)` with a learned per-channel `scale` (init 1);
//! `t` is the conditioner's affine output.
//!
//! Class-conditional (App. F): `s` and `t` also see a per-sample vector `y` (a one-hot
//! label, or attributes), as `K` constant planes after the masked input's channels:
//! `s, t = net([b ⊙ x, y])`. The log-det and the inverse keep their form for a given `y`.

use candle_core::{Result, Tensor};
use candle_nn::init::Init;
use candle_nn::VarBuilder;

use crate::conditioner::{Conditioner, ResNet, ResNetConfig};
use crate::flow::{Flow, Mode};
use crate::mask::Mask;
use crate::nn::feature_shape;

/// An affine coupling with conditioner `N`. Parameter names: `net.*`, `scale`.
pub struct AffineCoupling<N: Conditioner = ResNet> {
    mask: Mask,
    net: N,
    scale: Tensor,
    /// Length `K` of the condition vector (0: unconditional).
    cond: usize,
}

impl AffineCoupling<ResNet> {
    /// An image coupling on `channels` channels with a residual s/t network; with
    /// `cfg.cond_channels = K > 0`, class-conditional on `(N, K)` vectors.
    pub fn resnet(mask: Mask, cfg: ResNetConfig, vb: VarBuilder) -> Result<Self> {
        let net = ResNet::new(cfg, vb.pp("net"))?;
        let mut c = Self::new(mask, net, cfg.channels, 4, vb)?;
        c.cond = cfg.cond_channels;
        Ok(c)
    }
}

impl<N: Conditioner> AffineCoupling<N> {
    /// A coupling over inputs of `rank` dimensions (4 for images, 2 for
    /// vectors) with `channels` features on axis 1.
    pub fn new(mask: Mask, net: N, channels: usize, rank: usize, vb: VarBuilder) -> Result<Self> {
        let scale = vb.get_with_hints(feature_shape(channels, rank), "scale", Init::Const(1.0))?;
        Ok(Self {
            mask,
            net,
            scale,
            cond: 0,
        })
    }

    /// Length of the condition vector (0: unconditional).
    pub fn condition_len(&self) -> usize {
        self.cond
    }

    /// The conditioner's input: the masked input, then (class-conditional) the `K`
    /// condition values of each sample as constant planes of the input's size.
    fn net_input(&self, xb: Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        match (self.cond, cond) {
            (0, None) => Ok(xb),
            (0, Some(_)) => candle_core::bail!("the coupling is not conditional: no condition"),
            (k, None) => candle_core::bail!(
                "the coupling is class-conditional ({k} condition values): give a condition"
            ),
            (k, Some(y)) => {
                let n = xb.dim(0)?;
                if y.dims() != [n, k] {
                    candle_core::bail!(
                        "condition has shape {:?}, the coupling needs ({n}, {k})",
                        y.dims()
                    );
                }
                let mut planes = xb.dims().to_vec();
                planes[1] = k;
                let mut one = vec![n, k];
                one.resize(planes.len(), 1);
                let y = y.to_dtype(xb.dtype())?.reshape(one)?.broadcast_as(planes)?;
                Tensor::cat(&[&xb, &y], 1)
            }
        }
    }

    /// `y = f(x | cond)` and its per-sample log-det; `cond`: `(N, K)` for a
    /// class-conditional coupling, `None` otherwise.
    pub fn forward_cond(
        &self,
        x: &Tensor,
        cond: Option<&Tensor>,
        mode: Mode,
    ) -> Result<(Tensor, Tensor)> {
        let b = self.mask.for_input(x)?;
        if nvp_kernels::coupling_uses_fast_path(&[x, &b, &self.scale]) {
            // Fused f32 CPU path: the same arithmetic in two ops (mask, coupling).
            let xb = self.net_input(nvp_kernels::mask_mul(x, &b)?, cond)?;
            let h = self.net.forward_t(&xb, mode)?;
            if nvp_kernels::coupling_uses_fast_path(&[&h]) {
                return nvp_kernels::coupling(x, &h, &self.scale, &b);
            }
            let (s, t) = self.s_t_of(&h, &b)?;
            let y = ((x * s.exp()?)? + t)?;
            return Ok((y, s.flatten_from(1)?.sum(1)?));
        }
        let xb = self.net_input(x.broadcast_mul(&b)?, cond)?;
        let (s, t) = self.s_t(&xb, &b, mode)?;
        // Where b = 1, s = t = 0, so this equals b⊙x + (1−b)⊙(x⊙exp(s) + t).
        let y = ((x * s.exp()?)? + t)?;
        let ld = s.flatten_from(1)?.sum(1)?;
        Ok((y, ld))
    }

    /// `x = f⁻¹(y | cond)`.
    pub fn inverse_cond(&self, y: &Tensor, cond: Option<&Tensor>) -> Result<Tensor> {
        let b = self.mask.for_input(y)?;
        // b ⊙ y = b ⊙ x, so the conditioner sees the same input as in forward.
        if nvp_kernels::coupling_uses_fast_path(&[y, &b, &self.scale]) {
            let yb = self.net_input(nvp_kernels::mask_mul(y, &b)?, cond)?;
            let h = self.net.forward_t(&yb, Mode::Eval)?;
            if nvp_kernels::coupling_uses_fast_path(&[&h]) {
                return nvp_kernels::coupling_inverse(y, &h, &self.scale, &b);
            }
            let (s, t) = self.s_t_of(&h, &b)?;
            return (y - t)? * s.neg()?.exp()?;
        }
        let yb = self.net_input(y.broadcast_mul(&b)?, cond)?;
        let (s, t) = self.s_t(&yb, &b, Mode::Eval)?;
        (y - t)? * s.neg()?.exp()?
    }

    pub fn mask(&self) -> &Mask {
        &self.mask
    }

    /// Computes the conditioner's derived weights once ([`Conditioner::fix_weights`]).
    pub fn fix_weights(&mut self) -> Result<()> {
        self.net.fix_weights()
    }

    /// The conditioner's packable groups ([`Conditioner::param_groups`]).
    pub fn param_groups(&self) -> Vec<(String, Vec<String>)> {
        self.net.param_groups()
    }

    /// The learned tanh scale and the conditioner's weight-norm gains.
    pub fn scale_parameters(&self) -> Vec<Tensor> {
        let mut v = vec![self.scale.clone()];
        v.extend(self.net.scale_parameters());
        v
    }

    /// `(s, t)` from the masked input, both zero where `b = 1`.
    fn s_t(&self, xb: &Tensor, b: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        let h = self.net.forward_t(xb, mode)?;
        self.s_t_of(&h, b)
    }

    /// `(s, t)` from the conditioner output `h = (raw_s, t)`.
    fn s_t_of(&self, h: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        let c = h.dim(1)? / 2;
        let raw_s = h.narrow(1, 0, c)?;
        let t = h.narrow(1, c, c)?;
        let inv_b = b.affine(-1.0, 1.0)?;
        let s = raw_s
            .tanh()?
            .broadcast_mul(&self.scale)?
            .broadcast_mul(&inv_b)?;
        let t = t.broadcast_mul(&inv_b)?;
        Ok((s, t))
    }
}

impl<N: Conditioner> Flow for AffineCoupling<N> {
    /// [`AffineCoupling::forward_cond`] without a condition (an error for a
    /// class-conditional coupling).
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        self.forward_cond(x, None, mode)
    }

    fn inverse(&self, y: &Tensor) -> Result<Tensor> {
        self.inverse_cond(y, None)
    }
}
