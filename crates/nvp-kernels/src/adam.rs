//! The Adam update in place, in one pass over each parameter, for f32/f64 CPU tensors.
//!
//! Written as candle ops (`m·β₁ + g·(1 − β₁)`, …, `p − update`) the update reads and
//! writes every moment and parameter a dozen times, allocating a fresh tensor per op,
//! on one thread; on the 62.6 M-parameter 64×64 model that was 0.6 s a step. Here each
//! element is read once and written once, over the rayon pool.
//!
//! The arithmetic is that of the candle ops, operation by operation and rounded in the
//! tensors' dtype (candle's `x * s` and `x + s` for a scalar `s` are its affine map
//! `x·mul + add`, with `add = 0` or `mul = 1`), so the results are the same to the bit;
//! the tests compare them with `==`.
//!
//! candle's in-place ops lend one tensor mutably, so [`adam_update`] nests them: the
//! flat first moments, inside them the second moments, inside those each parameter in
//! turn with its gradient as the read-only operand.

use std::cell::RefCell;
use std::ops::{Add, Div, Mul, Sub};

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, InplaceOp1, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

/// Adam's scalars for one step. `bias1 = 1 − β₁ᵗ`, `bias2 = 1 − β₂ᵗ`; the gradient is
/// first multiplied by `clip_scale` (skipped when it is 1, as the candle-op code does).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamScalars {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub bias1: f64,
    pub bias2: f64,
    pub clip_scale: f64,
}

/// One parameter of an [`adam_update`]: the parameter (updated in place), its gradient
/// (same number of elements, read only) and where its moments start in the flat `m`
/// and `v`.
#[derive(Debug, Clone, Copy)]
pub struct AdamParam<'a> {
    pub param: &'a Tensor,
    pub grad: &'a Tensor,
    pub offset: usize,
}

/// Whether [`adam_update`] takes tensors of this dtype on this device.
pub fn adam_update_applies(dtype: DType, device: &candle_core::Device) -> bool {
    device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}

/// One Adam step in place: for each [`AdamParam`], its slice of the flat moments `m`
/// and `v` (1-D, contiguous) and the parameter itself are updated from the gradient:
///
/// ```text
/// g ← g·clip     m ← m·β₁ + g·(1 − β₁)     v ← v·β₂ + g²·(1 − β₂)
/// p ← p − ((m·(1/bias1)) / (sqrt(v·(1/bias2)) + ε))·lr
/// ```
///
/// Every tensor must be on the CPU, of one dtype (f32 or f64) and contiguous, and the
/// parameters' moment ranges must not overlap. A gradient that is a view of its own
/// parameter is copied first; the parameters are updated in the order given.
pub fn adam_update(
    m: &Tensor,
    v: &Tensor,
    params: &[AdamParam<'_>],
    s: &AdamScalars,
) -> Result<()> {
    let dtype = m.dtype();
    if !adam_update_applies(dtype, m.device()) {
        bail!(
            "adam_update: moments are {dtype:?} on {:?}, need f32/f64 on the CPU",
            m.device().location()
        );
    }
    let total = m.elem_count();
    if m.rank() != 1 || v.dims() != m.dims() || v.dtype() != dtype {
        bail!(
            "adam_update: moments must be two 1-D tensors of one shape and dtype, got {:?} {:?} and {:?} {:?}",
            m.dims(),
            dtype,
            v.dims(),
            v.dtype()
        );
    }
    for (i, p) in params.iter().enumerate() {
        let n = p.param.elem_count();
        if p.grad.elem_count() != n || p.offset + n > total {
            bail!(
                "adam_update: parameter {i} has {n} elements, its gradient {} and moments from {} of {total}",
                p.grad.elem_count(),
                p.offset
            );
        }
        if p.param.dtype() != dtype
            || p.grad.dtype() != dtype
            || !p.param.device().is_cpu()
            || !p.grad.device().is_cpu()
        {
            bail!(
                "adam_update: parameter {i} is {:?}, its gradient {:?}, the moments {dtype:?} (all on the CPU)",
                p.param.dtype(),
                p.grad.dtype()
            );
        }
    }
    // A gradient that is a view of its own parameter is read from a copy.
    let copies = params
        .iter()
        .map(|p| {
            if shares_storage(p.param, p.grad) {
                p.grad.copy().map(Some)
            } else {
                Ok(None)
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let params: Vec<AdamParam<'_>> = params
        .iter()
        .zip(&copies)
        .map(|(p, c)| AdamParam {
            grad: c.as_ref().unwrap_or(p.grad),
            ..*p
        })
        .collect();
    m.inplace_op1(&WithM {
        v,
        params: &params,
        s,
    })
}

/// Whether two tensors are views of one storage.
fn shares_storage(a: &Tensor, b: &Tensor) -> bool {
    let (sa, _) = a.storage_and_layout();
    let pa: *const candle_core::Storage = &*sa;
    drop(sa);
    let (sb, _) = b.storage_and_layout();
    std::ptr::eq(pa, &*sb)
}

/// Elements per rayon task; smaller parameters are updated on the calling thread.
const CHUNK: usize = 1 << 15;

trait Elem:
    Copy
    + Send
    + Sync
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
{
    fn of(v: f64) -> Self;
    fn sqrt(self) -> Self;
    fn slice(s: &CpuStorage) -> Option<&Vec<Self>>;
    fn slice_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>>;
}

macro_rules! elem {
    ($t:ty, $variant:ident) => {
        impl Elem for $t {
            fn of(v: f64) -> Self {
                v as $t
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn slice(s: &CpuStorage) -> Option<&Vec<Self>> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(s: &mut CpuStorage) -> Option<&mut Vec<Self>> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}

elem!(f32, F32);
elem!(f64, F64);

/// The contiguous elements of `l` in `data`.
fn span(l: &Layout, what: &str) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(r) => Ok(r),
        None => bail!("adam_update: {what} must be contiguous"),
    }
}

fn mut_of<'a, T: Elem>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [T]> {
    let (a, b) = span(l, what)?;
    let dtype = s.dtype();
    match T::slice_mut(s) {
        Some(v) => Ok(&mut v[a..b]),
        None => bail!("adam_update: {what} has dtype {dtype:?}"),
    }
}

fn ref_of<'a, T: Elem>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let (a, b) = span(l, what)?;
    match T::slice(s) {
        Some(v) => Ok(&v[a..b]),
        None => bail!("adam_update: {what} has dtype {:?}", s.dtype()),
    }
}

/// The first level: `m` lent mutably.
struct WithM<'a> {
    v: &'a Tensor,
    params: &'a [AdamParam<'a>],
    s: &'a AdamScalars,
}

impl InplaceOp1 for WithM<'_> {
    fn name(&self) -> &'static str {
        "nvp-adam-m"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        match storage.dtype() {
            DType::F32 => self.v.inplace_op1(&WithMV::<f32> {
                m: RefCell::new(mut_of(storage, layout, "m")?),
                params: self.params,
                s: self.s,
            }),
            DType::F64 => self.v.inplace_op1(&WithMV::<f64> {
                m: RefCell::new(mut_of(storage, layout, "m")?),
                params: self.params,
                s: self.s,
            }),
            other => bail!("adam_update: moments of dtype {other:?}"),
        }
    }
}

/// The second level: `m` and `v` lent mutably.
struct WithMV<'a, T> {
    m: RefCell<&'a mut [T]>,
    params: &'a [AdamParam<'a>],
    s: &'a AdamScalars,
}

impl<T: Elem> InplaceOp1 for WithMV<'_, T> {
    fn name(&self) -> &'static str {
        "nvp-adam-v"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let v: &mut [T] = mut_of(storage, layout, "v")?;
        let mut m = self.m.borrow_mut();
        for p in self.params {
            let n = p.param.elem_count();
            p.param.inplace_op2(
                p.grad,
                &Step {
                    m: RefCell::new(&mut m[p.offset..p.offset + n]),
                    v: RefCell::new(&mut v[p.offset..p.offset + n]),
                    s: self.s,
                },
            )?;
        }
        Ok(())
    }
}

/// The third level: one parameter lent mutably, with its moments' slices.
struct Step<'a, T> {
    m: RefCell<&'a mut [T]>,
    v: RefCell<&'a mut [T]>,
    s: &'a AdamScalars,
}

impl<T: Elem> InplaceOp2 for Step<'_, T> {
    fn name(&self) -> &'static str {
        "nvp-adam-step"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        g: &CpuStorage,
        g_l: &Layout,
    ) -> Result<()> {
        let p: &mut [T] = mut_of(dst, dst_l, "parameter")?;
        let g: &[T] = ref_of(g, g_l, "gradient")?;
        let mut m = self.m.borrow_mut();
        let mut v = self.v.borrow_mut();
        let k = Consts::new(self.s);
        if p.len() < 2 * CHUNK {
            update(p, g, &mut m, &mut v, &k);
        } else {
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| update(p, g, m, v, &k));
        }
        Ok(())
    }
}

/// The step's scalars rounded to the element type as candle's affine map rounds them.
struct Consts<T> {
    clip: Option<T>,
    b1: T,
    one_minus_b1: T,
    b2: T,
    one_minus_b2: T,
    inv_bias1: T,
    inv_bias2: T,
    eps: T,
    lr: T,
    zero: T,
    one: T,
}

impl<T: Elem> Consts<T> {
    fn new(s: &AdamScalars) -> Self {
        Self {
            clip: (s.clip_scale != 1.0).then(|| T::of(s.clip_scale)),
            b1: T::of(s.beta1),
            one_minus_b1: T::of(1.0 - s.beta1),
            b2: T::of(s.beta2),
            one_minus_b2: T::of(1.0 - s.beta2),
            inv_bias1: T::of(1.0 / s.bias1),
            inv_bias2: T::of(1.0 / s.bias2),
            eps: T::of(s.eps),
            lr: T::of(s.lr),
            zero: T::of(0.0),
            one: T::of(1.0),
        }
    }
}

/// The update of one run of elements, each op as candle's (`x * s` is `x·s + 0`,
/// `x + s` is `x·1 + s`, `x / s` is `x·(1/s) + 0`).
#[inline(always)]
fn update<T: Elem>(p: &mut [T], g: &[T], m: &mut [T], v: &mut [T], k: &Consts<T>) {
    let z = k.zero;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let g = match k.clip {
            Some(c) => g * c + z,
            None => g,
        };
        let m1 = (*m * k.b1 + z) + (g * k.one_minus_b1 + z);
        let v1 = (*v * k.b2 + z) + ((g * g) * k.one_minus_b2 + z);
        let denom = (v1 * k.inv_bias2 + z).sqrt() * k.one + k.eps;
        let step = ((m1 * k.inv_bias1 + z) / denom) * k.lr + z;
        *m = m1;
        *v = v1;
        *p = *p - step;
    }
}

/// `Σ x²` of a contiguous f32/f64 CPU tensor, accumulated in f64: runs of
/// 32,768 elements summed each (f32 over 8 lanes), on the rayon pool, and the runs' sums
/// added in order (so the result does not depend on the number of threads).
/// `None` for another dtype or device, or a non-contiguous tensor.
pub fn sum_squares_f64(t: &Tensor) -> Option<f64> {
    if !adam_update_applies(t.dtype(), t.device()) {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cs) = &*storage else {
        return None;
    };
    let (a, b) = layout.contiguous_offsets()?;
    let parts: Vec<f64> = match cs {
        CpuStorage::F32(x) => x[a..b]
            .par_chunks(CHUNK)
            .map(|c| crate::util::sq_dev_f64(c, 0.0))
            .collect(),
        CpuStorage::F64(x) => x[a..b]
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|v| v * v).sum())
            .collect(),
        _ => return None,
    };
    Some(parts.iter().sum())
}

/// One step of an exponential moving average in place: `avg ← avg·decay + x·(1 − decay)`,
/// for f32/f64 contiguous CPU tensors of one dtype and element count, with the
/// arithmetic of the candle ops `(avg * decay) + (x * (1 − decay))` (so the same to the
/// bit), over the rayon pool. `avg` and `x` must not share storage.
pub fn ema_update(avg: &Tensor, x: &Tensor, decay: f64) -> Result<()> {
    let dtype = avg.dtype();
    if !adam_update_applies(dtype, avg.device())
        || x.dtype() != dtype
        || !x.device().is_cpu()
        || x.elem_count() != avg.elem_count()
    {
        bail!(
            "ema_update: the average is {dtype:?} {:?} on {:?}, the value {:?} {:?} on {:?}; need one f32/f64 shape on the CPU",
            avg.dims(),
            avg.device().location(),
            x.dtype(),
            x.dims(),
            x.device().location()
        );
    }
    if shares_storage(avg, x) {
        bail!("ema_update: the average and the value share storage");
    }
    avg.inplace_op2(x, &Ema { decay })
}

struct Ema {
    decay: f64,
}

impl InplaceOp2 for Ema {
    fn name(&self) -> &'static str {
        "nvp-ema"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        x: &CpuStorage,
        x_l: &Layout,
    ) -> Result<()> {
        fn run<T: Elem>(a: &mut [T], x: &[T], decay: f64) {
            let (d, e, z) = (T::of(decay), T::of(1.0 - decay), T::of(0.0));
            let lerp = |a: &mut [T], x: &[T]| {
                for (a, &x) in a.iter_mut().zip(x) {
                    *a = (*a * d + z) + (x * e + z);
                }
            };
            if a.len() < 2 * CHUNK {
                lerp(a, x);
            } else {
                a.par_chunks_mut(CHUNK)
                    .zip(x.par_chunks(CHUNK))
                    .for_each(|(a, x)| lerp(a, x));
            }
        }
        match dst.dtype() {
            DType::F32 => run::<f32>(
                mut_of(dst, dst_l, "average")?,
                ref_of(x, x_l, "value")?,
                self.decay,
            ),
            DType::F64 => run::<f64>(
                mut_of(dst, dst_l, "average")?,
                ref_of(x, x_l, "value")?,
                self.decay,
            ),
            other => bail!("ema_update: dtype {other:?}"),
        }
        Ok(())
    }
}
