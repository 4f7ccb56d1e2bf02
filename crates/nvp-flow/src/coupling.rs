//! The masked affine coupling layer (eq. 9):
//! `y = b ⊙ x + (1 − b) ⊙ (x ⊙ exp(s(b ⊙ x)) + t(b ⊙ x))`,
//! `log |det| = Σ (1 − b) ⊙ s`, inverse `x = b ⊙ y + (1 − b) ⊙ (y − t(b ⊙ y)) ⊙ exp(−s(b ⊙ y))`.
//! `s = scale ⊙ tanh(raw_s)` with a learned per-channel `scale` (init 1);
//! `t` is the conditioner's affine output.

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
}

impl AffineCoupling<ResNet> {
    /// An image coupling on `channels` channels with a residual s/t network.
    pub fn resnet(mask: Mask, cfg: ResNetConfig, vb: VarBuilder) -> Result<Self> {
        let net = ResNet::new(cfg, vb.pp("net"))?;
        Self::new(mask, net, cfg.channels, 4, vb)
    }
}

impl<N: Conditioner> AffineCoupling<N> {
    /// A coupling over inputs of `rank` dimensions (4 for images, 2 for
    /// vectors) with `channels` features on axis 1.
    pub fn new(mask: Mask, net: N, channels: usize, rank: usize, vb: VarBuilder) -> Result<Self> {
        let scale = vb.get_with_hints(feature_shape(channels, rank), "scale", Init::Const(1.0))?;
        Ok(Self { mask, net, scale })
    }

    pub fn mask(&self) -> &Mask {
        &self.mask
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
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<(Tensor, Tensor)> {
        let b = self.mask.for_input(x)?;
        if nvp_kernels::coupling_uses_fast_path(&[x, &b, &self.scale]) {
            // Fused f32 CPU path: the same arithmetic in two ops (mask, coupling).
            let h = self.net.forward_t(&nvp_kernels::mask_mul(x, &b)?, mode)?;
            if nvp_kernels::coupling_uses_fast_path(&[&h]) {
                return nvp_kernels::coupling(x, &h, &self.scale, &b);
            }
            let (s, t) = self.s_t_of(&h, &b)?;
            let y = ((x * s.exp()?)? + t)?;
            return Ok((y, s.flatten_from(1)?.sum(1)?));
        }
        let (s, t) = self.s_t(&x.broadcast_mul(&b)?, &b, mode)?;
        // Where b = 1, s = t = 0, so this equals b⊙x + (1−b)⊙(x⊙exp(s) + t).
        let y = ((x * s.exp()?)? + t)?;
        let ld = s.flatten_from(1)?.sum(1)?;
        Ok((y, ld))
    }

    fn inverse(&self, y: &Tensor) -> Result<Tensor> {
        let b = self.mask.for_input(y)?;
        // b ⊙ y = b ⊙ x, so the conditioner sees the same input as in forward.
        if nvp_kernels::coupling_uses_fast_path(&[y, &b, &self.scale]) {
            let h = self
                .net
                .forward_t(&nvp_kernels::mask_mul(y, &b)?, Mode::Eval)?;
            if nvp_kernels::coupling_uses_fast_path(&[&h]) {
                return nvp_kernels::coupling_inverse(y, &h, &self.scale, &b);
            }
            let (s, t) = self.s_t_of(&h, &b)?;
            return (y - t)? * s.neg()?.exp()?;
        }
        let (s, t) = self.s_t(&y.broadcast_mul(&b)?, &b, Mode::Eval)?;
        (y - t)? * s.neg()?.exp()?
    }
}
