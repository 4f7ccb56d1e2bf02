//! The masked affine coupling (Real NVP eq. 9) as fused candle custom ops, for
//! `(N, C, ...)` f32 CPU tensors.
//!
//! With the conditioner output `h = (raw_s, t_raw)` (`(N, 2C, ...)`), the per-channel
//! `scale` and `k = 1 − b` (`b` the mask, broadcast over the batch):
//! `s = (tanh(raw_s)·scale)·k`, `t = t_raw·k`, `y = x·exp(s) + t`,
//! `log-det = Σ s` per sample, inverse `x = (y − t)·exp(−s)`: the same arithmetic,
//! in the same order, as the candle-op code of the flow (so `y` and the inverse are
//! bit-identical to it; the log-det is summed in f64). `tanh` and `exp` are the
//! standard library's (libm, as candle's CPU ops use), run over the batch in
//! parallel.
//!
//! The forward op ([`Coupling`]) keeps `tanh(raw_s)` and `exp(s)` for its backward
//! and for the log-det op ([`CouplingLogDet`]), which reads the per-sample sums the
//! forward computed. Backward of `y`: `dx = dy·e`, `ds = dy·x·e`,
//! `d raw_s = ds·k·scale·(1 − tanh²)`, `d t_raw = dy·k`, `d scale = Σ ds·k·tanh`;
//! of the log-det: the same with `ds = dld_n`.

// The kernels index several same-shaped buffers in lockstep by image, channel and
// position; plain index loops read more clearly than zipped iterators there.
#![allow(clippy::needless_range_loop)]

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use crate::bn::ncs;
use crate::util::{add_partials, build_vec, f32_slice, per_chunk};

/// What the forward pass keeps: `tanh(raw_s)`, `exp(s)` (both `N·C·hw`), the
/// per-sample log-dets and the scale values.
#[derive(Debug)]
struct Stash {
    th: Vec<f32>,
    e: Vec<f32>,
    ld: Vec<f32>,
    scale: Vec<f32>,
}

type StashCell = Arc<Mutex<Option<Arc<Stash>>>>;

fn load(cell: &StashCell) -> Result<Arc<Stash>> {
    match cell.lock() {
        Ok(g) => match g.as_ref() {
            Some(s) => Ok(s.clone()),
            None => bail!("nvp-kernels: coupling state used before the forward pass"),
        },
        Err(_) => bail!("nvp-kernels: coupling state poisoned"),
    }
}

/// The coupling's shapes: `n`, `c`, `hw`, validated against `h`, `scale`, `keep`.
fn dims(x: &Shape, h: &Shape, scale_len: usize, keep_len: usize) -> Result<(usize, usize, usize)> {
    let (n, c, hw) = ncs(x)?;
    let hd = h.dims();
    if hd.len() != x.rank() || hd[0] != n || hd[1] != 2 * c || hd[2..] != x.dims()[2..] {
        bail!("nvp-kernels: coupling: h {h:?} does not fit x {x:?} (want (N, 2C, ...))");
    }
    if scale_len != c {
        bail!("nvp-kernels: coupling: scale has {scale_len} values for {c} channels");
    }
    if keep_len != c * hw {
        bail!(
            "nvp-kernels: coupling: mask has {keep_len} values for a sample of {}",
            c * hw
        );
    }
    Ok((n, c, hw))
}

/// Forward coupling: inputs `x (N, C, ...)`, `h (N, 2C, ...)`, `scale` (C values);
/// output `y`. Use [`coupling()`] to build it.
#[derive(Debug, Clone)]
pub struct Coupling {
    keep: Arc<Vec<f32>>,
    stash: StashCell,
}

/// Per-sample log-det of the [`Coupling`] sharing its state: inputs `h`, `scale`;
/// output `(N)`. Must be applied after that forward.
#[derive(Debug, Clone)]
pub struct CouplingLogDet {
    keep: Arc<Vec<f32>>,
    stash: StashCell,
}

/// Inverse coupling (no gradient): inputs `y`, `h`, `scale`; output `x`.
#[derive(Debug, Clone)]
pub struct CouplingInverse {
    keep: Arc<Vec<f32>>,
}

/// `x·b` with a per-sample mask `b` broadcast over the batch; its own backward.
#[derive(Debug, Clone)]
pub struct MaskMul {
    mask: Arc<Vec<f32>>,
}

/// Raw pointer to an output buffer, shared across the rayon tasks that each write a
/// disjoint range of it.
#[derive(Clone, Copy)]
struct OutPtr(*mut MaybeUninit<f32>);
// SAFETY: only used to write disjoint index ranges from different threads (each
// task owns the images of its chunk); the buffer outlives the parallel loop.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The `len` elements starting at `start`.
    ///
    /// # Safety
    /// `start + len` must be within the buffer and no other live slice may overlap.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice(&self, start: usize, len: usize) -> &mut [MaybeUninit<f32>] {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

/// Runs `f(image range)` over the batch in parallel chunks.
fn par_images(n: usize, f: impl Fn(std::ops::Range<usize>) + Sync + Send) {
    let per = per_chunk(n);
    (0..n.div_ceil(per))
        .into_par_iter()
        .for_each(|t| f(t * per..((t + 1) * per).min(n)));
}

/// An empty buffer with room for `len` floats (filled through [`OutPtr`]).
fn alloc(len: usize) -> Vec<f32> {
    Vec::with_capacity(len)
}

/// Marks a buffer fully written.
///
/// # Safety
/// All `len` elements of its spare capacity must have been initialised.
unsafe fn done(v: &mut Vec<f32>, len: usize) {
    debug_assert!(v.capacity() >= len);
    // SAFETY: guaranteed by the caller.
    unsafe { v.set_len(len) };
}

impl CustomOp3 for Coupling {
    fn name(&self) -> &'static str {
        "nvp-coupling"
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
        let x = f32_slice(s1, l1, "x")?;
        let h = f32_slice(s2, l2, "h")?;
        let scale = f32_slice(s3, l3, "scale")?;
        let (n, c, hw) = dims(l1.shape(), l2.shape(), scale.len(), self.keep.len())?;
        let img = c * hw;
        let len = n * img;
        let keep = &self.keep[..];
        let (mut y, mut th, mut e) = (alloc(len), alloc(len), alloc(len));
        let mut ld = vec![0.0f32; n];
        {
            let (py, pt, pe) = (
                OutPtr(y.spare_capacity_mut().as_mut_ptr()),
                OutPtr(th.spare_capacity_mut().as_mut_ptr()),
                OutPtr(e.spare_capacity_mut().as_mut_ptr()),
            );
            let pl = OutPtr(ld.as_mut_ptr().cast());
            par_images(n, |r| {
                for i in r {
                    // SAFETY: image i's ranges `i·img .. (i+1)·img` (and ld[i]) are
                    // within the `len`-float (`n`-float) buffers and written only by
                    // the task that owns image i.
                    let (yi, ti, ei, li) = unsafe {
                        (
                            py.slice(i * img, img),
                            pt.slice(i * img, img),
                            pe.slice(i * img, img),
                            pl.slice(i, 1),
                        )
                    };
                    let xi = &x[i * img..][..img];
                    let hi = &h[2 * i * img..][..2 * img];
                    let mut acc = 0.0f64;
                    for ch in 0..c {
                        let sc = scale[ch];
                        let o = ch * hw;
                        let raw = &hi[o..o + hw];
                        let tr = &hi[img + o..img + o + hw];
                        for p in 0..hw {
                            let k = keep[o + p];
                            let t = raw[p].tanh();
                            let s = t * sc * k;
                            let ex = s.exp();
                            ti[o + p].write(t);
                            ei[o + p].write(ex);
                            yi[o + p].write(xi[o + p] * ex + tr[p] * k);
                            acc += s as f64;
                        }
                    }
                    li[0].write(acc as f32);
                }
            });
        }
        // SAFETY: every image's `img` elements of y, th and e were written above (the
        // chunks of `par_images` cover 0..n).
        unsafe {
            done(&mut y, len);
            done(&mut th, len);
            done(&mut e, len);
        }
        let st = Arc::new(Stash {
            th,
            e,
            ld,
            scale: scale.to_vec(),
        });
        match self.stash.lock() {
            Ok(mut g) => *g = Some(st),
            Err(_) => bail!("nvp-kernels: coupling state poisoned"),
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        h: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = CouplingBackward {
            keep: self.keep.clone(),
            stash: load(&self.stash)?,
        };
        let packed = x.apply_op2_no_bwd(&dy.contiguous()?, &op)?;
        let (xl, hl) = (x.elem_count(), h.elem_count());
        let dx = x
            .track_op()
            .then(|| packed.narrow(0, 0, xl)?.reshape(x.shape()))
            .transpose()?;
        let dh = h
            .track_op()
            .then(|| packed.narrow(0, xl, hl)?.reshape(h.shape()))
            .transpose()?;
        let ds = scale
            .track_op()
            .then(|| {
                packed
                    .narrow(0, xl + hl, scale.elem_count())?
                    .reshape(scale.shape())
            })
            .transpose()?;
        Ok((dx, dh, ds))
    }
}

/// Backward of [`Coupling`]: inputs `x`, `dy`; output the flat `[dx | dh | dscale]`.
struct CouplingBackward {
    keep: Arc<Vec<f32>>,
    stash: Arc<Stash>,
}

impl CustomOp2 for CouplingBackward {
    fn name(&self) -> &'static str {
        "nvp-coupling-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "x")?;
        let dy = f32_slice(s2, l2, "dy")?;
        let (n, c, hw) = ncs(l1.shape())?;
        let st = &*self.stash;
        let img = c * hw;
        let len = n * img;
        if dy.len() != len || st.th.len() != len || self.keep.len() != img {
            bail!("nvp-kernels: coupling grad: sizes do not match the forward pass");
        }
        let keep = &self.keep[..];
        let total = 3 * len + c;
        let mut out = alloc(total);
        let p = OutPtr(out.spare_capacity_mut().as_mut_ptr());
        let per = per_chunk(n);
        let parts: Vec<Vec<f64>> = (0..n.div_ceil(per))
            .into_par_iter()
            .map(|t| {
                let mut acc = vec![0.0f64; c];
                for i in t * per..((t + 1) * per).min(n) {
                    // SAFETY: image i's dx range `i·img..` of length img lies in the first
                    // `len` floats, its dh range `len + 2i·img..` of length 2·img in the
                    // next `2·len`; both are written only by this task.
                    let (dxi, dhi) =
                        unsafe { (p.slice(i * img, img), p.slice(len + 2 * i * img, 2 * img)) };
                    let o0 = i * img;
                    for ch in 0..c {
                        let sc = st.scale[ch];
                        let mut a = 0.0f64;
                        for q in ch * hw..(ch + 1) * hw {
                            let (k, t, ex, g) = (keep[q], st.th[o0 + q], st.e[o0 + q], dy[o0 + q]);
                            dxi[q].write(g * ex);
                            let ds = g * x[o0 + q] * ex;
                            let dsk = ds * k;
                            dhi[q].write(dsk * sc * (1.0 - t * t));
                            dhi[img + q].write(g * k);
                            a += (dsk * t) as f64;
                        }
                        acc[ch] += a;
                    }
                }
                acc
            })
            .collect();
        let dsc = add_partials(parts, c);
        // SAFETY: the last `c` floats start at `3·len`, within the `total` capacity;
        // no other slice is live.
        let tail = unsafe { p.slice(3 * len, c) };
        for (o, v) in tail.iter_mut().zip(&dsc) {
            o.write(*v as f32);
        }
        // SAFETY: all `3·len + c` elements were written: dx and both halves of dh for
        // every image (the chunks cover 0..n), and the `c` scale gradients.
        unsafe { done(&mut out, total) };
        Ok((CpuStorage::F32(out), Shape::from(total)))
    }
}

impl CustomOp2 for CouplingLogDet {
    fn name(&self) -> &'static str {
        "nvp-coupling-logdet"
    }

    fn cpu_fwd(
        &self,
        _s1: &CpuStorage,
        l1: &Layout,
        _s2: &CpuStorage,
        _l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = l1.shape().dims()[0];
        let st = load(&self.stash)?;
        if st.ld.len() != n {
            bail!(
                "nvp-kernels: coupling log-det of {} samples for {n}",
                st.ld.len()
            );
        }
        Ok((CpuStorage::F32(st.ld.clone()), Shape::from(n)))
    }

    fn bwd(
        &self,
        h: &Tensor,
        scale: &Tensor,
        _res: &Tensor,
        dld: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let op = LogDetBackward {
            keep: self.keep.clone(),
            stash: load(&self.stash)?,
            c: scale.elem_count(),
        };
        let packed = dld.contiguous()?.apply_op1_no_bwd(&op)?;
        let hl = h.elem_count();
        let dh = h
            .track_op()
            .then(|| packed.narrow(0, 0, hl)?.reshape(h.shape()))
            .transpose()?;
        let ds = scale
            .track_op()
            .then(|| {
                packed
                    .narrow(0, hl, scale.elem_count())?
                    .reshape(scale.shape())
            })
            .transpose()?;
        Ok((dh, ds))
    }
}

/// Backward of [`CouplingLogDet`]: input `dld (N)`; output the flat `[dh | dscale]`.
struct LogDetBackward {
    keep: Arc<Vec<f32>>,
    stash: Arc<Stash>,
    c: usize,
}

impl CustomOp1 for LogDetBackward {
    fn name(&self) -> &'static str {
        "nvp-coupling-logdet-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = f32_slice(s, l, "dld")?;
        let st = &*self.stash;
        let (n, c) = (g.len(), self.c);
        let img = self.keep.len();
        if st.th.len() != n * img || c == 0 || (img / c) * c != img {
            bail!("nvp-kernels: coupling log-det grad: sizes do not match the forward pass");
        }
        let hw = img / c;
        let keep = &self.keep[..];
        let total = 2 * n * img + c;
        let mut out = alloc(total);
        let p = OutPtr(out.spare_capacity_mut().as_mut_ptr());
        let per = per_chunk(n);
        let parts: Vec<Vec<f64>> = (0..n.div_ceil(per))
            .into_par_iter()
            .map(|t| {
                let mut acc = vec![0.0f64; c];
                for i in t * per..((t + 1) * per).min(n) {
                    // SAFETY: image i's dh range `2i·img..` of length 2·img is within the
                    // first `2·n·img` floats and written only by this task.
                    let dhi = unsafe { p.slice(2 * i * img, 2 * img) };
                    let gi = g[i];
                    let o0 = i * img;
                    for ch in 0..c {
                        let sc = st.scale[ch];
                        let mut a = 0.0f64;
                        for q in ch * hw..(ch + 1) * hw {
                            let (k, th) = (keep[q], st.th[o0 + q]);
                            let dsk = gi * k;
                            dhi[q].write(dsk * sc * (1.0 - th * th));
                            dhi[img + q].write(0.0);
                            a += (dsk * th) as f64;
                        }
                        acc[ch] += a;
                    }
                }
                acc
            })
            .collect();
        let dsc = add_partials(parts, c);
        // SAFETY: the last `c` floats start at `2·n·img`, within capacity; no other
        // slice is live.
        let tail = unsafe { p.slice(2 * n * img, c) };
        for (o, v) in tail.iter_mut().zip(&dsc) {
            o.write(*v as f32);
        }
        // SAFETY: dh for every image (chunks cover 0..n) and the `c` tail were written.
        unsafe { done(&mut out, total) };
        Ok((CpuStorage::F32(out), Shape::from(total)))
    }
}

impl CustomOp3 for CouplingInverse {
    fn name(&self) -> &'static str {
        "nvp-coupling-inverse"
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
        let y = f32_slice(s1, l1, "y")?;
        let h = f32_slice(s2, l2, "h")?;
        let scale = f32_slice(s3, l3, "scale")?;
        let (n, c, hw) = dims(l1.shape(), l2.shape(), scale.len(), self.keep.len())?;
        let img = c * hw;
        let keep = &self.keep[..];
        let mut x = alloc(n * img);
        let p = OutPtr(x.spare_capacity_mut().as_mut_ptr());
        par_images(n, |r| {
            for i in r {
                // SAFETY: image i's range is within the buffer and owned by this task.
                let xi = unsafe { p.slice(i * img, img) };
                let yi = &y[i * img..][..img];
                let hi = &h[2 * i * img..][..2 * img];
                for ch in 0..c {
                    let sc = scale[ch];
                    for q in ch * hw..(ch + 1) * hw {
                        let k = keep[q];
                        let s = hi[q].tanh() * sc * k;
                        xi[q].write((yi[q] - hi[img + q] * k) * (-s).exp());
                    }
                }
            }
        });
        // SAFETY: every image's elements were written above.
        unsafe { done(&mut x, n * img) };
        Ok((CpuStorage::F32(x), l1.shape().clone()))
    }
}

impl CustomOp1 for MaskMul {
    fn name(&self) -> &'static str {
        "nvp-mask-mul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "x")?;
        let img = self.mask.len();
        let n = l.shape().dims().first().copied().unwrap_or(0);
        if img == 0 || x.len() != n * img {
            bail!("nvp-kernels: mask of {img} values for {:?}", l.shape());
        }
        let m = &self.mask[..];
        let out = build_vec(x.len(), |o: &mut [MaybeUninit<f32>]| {
            o.par_chunks_mut(per_chunk(n) * img)
                .zip(x.par_chunks(per_chunk(n) * img))
                .for_each(|(o, xs)| {
                    for (oi, xi) in o.chunks_exact_mut(img).zip(xs.chunks_exact(img)) {
                        for ((o, &v), &b) in oi.iter_mut().zip(xi).zip(m) {
                            o.write(v * b);
                        }
                    }
                })
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// Whether the fused coupling ops apply: fast path enabled, all f32 on the CPU.
pub fn coupling_uses_fast_path(ts: &[&Tensor]) -> bool {
    crate::fast_cpu_enabled()
        && ts
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

fn mask_values(mask: &Tensor) -> Result<Arc<Vec<f32>>> {
    Ok(Arc::new(mask.flatten_all()?.to_vec1::<f32>()?))
}

/// Fused coupling forward: `(y, log-det (N))` for `x (N, C, ...)`, conditioner
/// output `h (N, 2C, ...)`, `scale` (C values, e.g. `(1, C, 1, 1)`) and `mask`
/// (`(1, C, ...)`, 0/1). Differentiable with respect to `x`, `h` and `scale`.
/// Errors unless [`coupling_uses_fast_path`] holds.
pub fn coupling(x: &Tensor, h: &Tensor, scale: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    if !coupling_uses_fast_path(&[x, h, scale, mask]) {
        bail!("nvp-kernels: coupling needs f32 CPU tensors and the fast path enabled");
    }
    let b = mask_values(mask)?;
    let keep: Arc<Vec<f32>> = Arc::new(b.iter().map(|&v| 1.0 - v).collect());
    let stash: StashCell = Arc::new(Mutex::new(None));
    let (h, scale) = (h.contiguous()?, scale.contiguous()?);
    let y = x.contiguous()?.apply_op3(
        &h,
        &scale,
        Coupling {
            keep: keep.clone(),
            stash: stash.clone(),
        },
    )?;
    let ld = h.apply_op2(&scale, CouplingLogDet { keep, stash })?;
    Ok((y, ld))
}

/// Fused coupling inverse `x = (y − t)·exp(−s)` (no gradient), arguments as [`coupling()`].
pub fn coupling_inverse(y: &Tensor, h: &Tensor, scale: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if !coupling_uses_fast_path(&[y, h, scale, mask]) {
        bail!("nvp-kernels: coupling_inverse needs f32 CPU tensors and the fast path enabled");
    }
    let b = mask_values(mask)?;
    let keep = Arc::new(b.iter().map(|&v| 1.0 - v).collect());
    y.contiguous()?.apply_op3_no_bwd(
        &h.contiguous()?,
        &scale.contiguous()?,
        &CouplingInverse { keep },
    )
}

/// `x·mask` with `mask` of shape `(1, ...)` broadcast over the batch (differentiable
/// with respect to `x`). Errors unless [`coupling_uses_fast_path`] holds.
pub fn mask_mul(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if !coupling_uses_fast_path(&[x, mask]) {
        bail!("nvp-kernels: mask_mul needs f32 CPU tensors and the fast path enabled");
    }
    x.contiguous()?.apply_op1(MaskMul {
        mask: mask_values(mask)?,
    })
}

/// The candle-op reference of [`coupling()`] (the flow's own code): returns `(y, ld)`.
pub fn coupling_reference(
    x: &Tensor,
    h: &Tensor,
    scale: &Tensor,
    mask: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (s, t) = reference_s_t(h, scale, mask)?;
    let y = ((x * s.exp()?)? + t)?;
    let ld = s.flatten_from(1)?.sum(1)?;
    Ok((y, ld))
}

/// The candle-op reference of [`coupling_inverse`].
pub fn coupling_inverse_reference(
    y: &Tensor,
    h: &Tensor,
    scale: &Tensor,
    mask: &Tensor,
) -> Result<Tensor> {
    let (s, t) = reference_s_t(h, scale, mask)?;
    (y - t)? * s.neg()?.exp()?
}

fn reference_s_t(h: &Tensor, scale: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let c = h.dim(1)? / 2;
    let raw_s = h.narrow(1, 0, c)?;
    let t = h.narrow(1, c, c)?;
    let inv_b = mask.affine(-1.0, 1.0)?;
    let s = raw_s.tanh()?.broadcast_mul(scale)?.broadcast_mul(&inv_b)?;
    let t = t.broadcast_mul(&inv_b)?;
    Ok((s, t))
}
