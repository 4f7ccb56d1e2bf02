//! Binary masks `b` of the masked affine coupling (eq. 9).
//!
//! * [`MaskKind::Checkerboard`]: with parity 0, `b = 1` where `row + col` is
//!   odd; parity 1 flips it.
//! * [`MaskKind::Channel`]: with parity 0, `b = 1` on the first half of the
//!   channels (features, for vectors); parity 1 selects the second half.
//!
//! Successive couplings alternate the parity so every unit is updated.
//! Masks are built once per (shape, dtype, device) and cached.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MaskKind {
    Checkerboard,
    Channel,
}

/// Cache key: sample shape, dtype, device.
type MaskKey = (Vec<usize>, DType, String);

/// A coupling mask: kind and parity (0 or 1).
#[derive(Debug)]
pub struct Mask {
    kind: MaskKind,
    parity: usize,
    cache: Mutex<HashMap<MaskKey, Tensor>>,
}

impl Clone for Mask {
    fn clone(&self) -> Self {
        Self::new(self.kind, self.parity)
    }
}

impl Mask {
    pub fn new(kind: MaskKind, parity: usize) -> Self {
        Self {
            kind,
            parity: parity % 2,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn checkerboard(parity: usize) -> Self {
        Self::new(MaskKind::Checkerboard, parity)
    }

    pub fn channel(parity: usize) -> Self {
        Self::new(MaskKind::Channel, parity)
    }

    pub fn kind(&self) -> MaskKind {
        self.kind
    }

    pub fn parity(&self) -> usize {
        self.parity
    }

    /// The mask values for one sample of shape `dims` (`[C, H, W]` or `[D]`),
    /// row-major, as 0/1.
    pub fn values(&self, dims: &[usize]) -> Result<Vec<u8>> {
        match (self.kind, dims) {
            (MaskKind::Checkerboard, [c, h, w]) => {
                let mut v = Vec::with_capacity(c * h * w);
                for _ in 0..*c {
                    for i in 0..*h {
                        for j in 0..*w {
                            v.push((((i + j) % 2) == 1 - self.parity) as u8);
                        }
                    }
                }
                Ok(v)
            }
            (MaskKind::Channel, [c, rest @ ..]) => {
                if *c < 2 {
                    candle_core::bail!("channel mask needs at least 2 channels, got {c}");
                }
                let per: usize = rest.iter().product();
                let mut v = Vec::with_capacity(c * per);
                for ch in 0..*c {
                    let first = ch < c / 2;
                    let b = if self.parity == 0 { first } else { !first };
                    v.extend(std::iter::repeat_n(b as u8, per));
                }
                Ok(v)
            }
            (MaskKind::Checkerboard, _) => {
                candle_core::bail!("checkerboard mask needs a (C, H, W) sample shape, got {dims:?}")
            }
            (MaskKind::Channel, []) => candle_core::bail!("channel mask needs a non-empty shape"),
        }
    }

    /// The mask as a tensor of shape `(1, ..dims)` for a batch `x`.
    pub fn for_input(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims()[1..].to_vec();
        let key = (dims.clone(), x.dtype(), device_key(x.device()));
        let mut cache = self.cache.lock().expect("mask cache poisoned");
        if let Some(t) = cache.get(&key) {
            return Ok(t.clone());
        }
        let vals: Vec<f32> = self.values(&dims)?.into_iter().map(f32::from).collect();
        let mut shape = vec![1];
        shape.extend_from_slice(&dims);
        let t = Tensor::from_vec(vals, shape, &Device::Cpu)?
            .to_dtype(x.dtype())?
            .to_device(x.device())?;
        cache.insert(key, t.clone());
        Ok(t)
    }
}

fn device_key(d: &Device) -> String {
    format!("{:?}", d.location())
}
