//! Fused batch normalisation (optionally followed by ReLU) as candle custom ops,
//! for `(N, C, ...)` f32 CPU tensors (statistics per channel, axis 1, over all
//! other axes).
//!
//! Forward: `z = (x − centre_c)·mult_c + shift_c`, `y = z` or `max(z, 0)`, where in
//! batch mode `centre = μ` (batch mean), `mult = w·r`, `r = 1/sqrt(σ² + ε)` (biased
//! batch variance σ²), `shift = b`; in fixed mode the statistics are given (running
//! averages). Mean and variance are accumulated in f64 (two passes over `x`), the
//! batch is split over rayon's threads.
//!
//! Backward (`dz = dy·[z ≥ 0]` with ReLU, as candle's `relu` backward):
//! `db = Σ dz`, `dw = Σ dz·x̂` with `x̂ = (x − μ)·r`, and
//! `dx = w·r·(dz − db/M − x̂·dw/M)` in batch mode (the gradient through the batch
//! statistics), `dx = w·r·dz` in fixed mode.
//!
//! The statistics a forward pass used are kept in a shared [`BnState`] so that the
//! caller can update running averages and the backward pass can reuse them; the
//! biased batch variance is also available as a differentiable `(C)` tensor
//! ([`BatchVar`], gradient `dx = dσ²_c·2(x − μ_c)/M`) for the flow's log-det.

use std::mem::MaybeUninit;
use std::sync::{Arc, Mutex};

use candle_core::{
    bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

use crate::kernels::Prologue;
use crate::util::{add_partials, build_vec, f32_slice, per_chunk, sq_dev_f64, sum_f64};

/// `(n, c, hw)` of an `(N, C, ...)` shape (`hw` = product of the trailing axes).
pub(crate) fn ncs(shape: &Shape) -> Result<(usize, usize, usize)> {
    let d = shape.dims();
    if d.len() < 2 {
        bail!("nvp-kernels: batch norm needs an (N, C, ...) tensor, got {shape:?}");
    }
    Ok((d[0], d[1], d[2..].iter().product()))
}

/// The per-channel values one normalisation used: `z = (x − centre)·mult + shift`,
/// `x̂ = (x − centre)·rstd`, and the statistics `mean`, `var` (batch or given).
#[derive(Debug, Clone, Default)]
pub(crate) struct Params {
    centre: Vec<f32>,
    rstd: Vec<f32>,
    mult: Vec<f32>,
    shift: Vec<f32>,
    mean: Vec<f32>,
    var: Vec<f32>,
    /// Elements per channel, `M = N·hw`.
    count: usize,
    /// The blend weight `m` of the batch statistics when the normalisation used
    /// running averages blended with them ([`batch_norm_blended`]); `None` otherwise.
    momentum: Option<f64>,
}

/// Statistics shared between a forward op, its backward and the caller.
pub(crate) type BnState = Arc<Mutex<Option<Arc<Params>>>>;

fn load(state: &BnState) -> Result<Arc<Params>> {
    match state.lock() {
        Ok(g) => match g.as_ref() {
            Some(p) => Ok(p.clone()),
            None => bail!("nvp-kernels: batch-norm statistics used before the forward pass"),
        },
        Err(_) => bail!("nvp-kernels: batch-norm state poisoned"),
    }
}

fn store(state: &BnState, p: Arc<Params>) -> Result<()> {
    match state.lock() {
        Ok(mut g) => {
            *g = Some(p);
            Ok(())
        }
        Err(_) => bail!("nvp-kernels: batch-norm state poisoned"),
    }
}

/// Given statistics (fixed mode): normalise with `centre` and `rstd`, add `offset`.
#[derive(Debug, Clone)]
pub(crate) struct Fixed {
    centre: Vec<f32>,
    rstd: Vec<f32>,
    offset: Option<Vec<f32>>,
    mean: Vec<f32>,
    var: Vec<f32>,
}

/// Running averages to blend with the batch statistics: the normalisation uses
/// `(1 − m)·running + m·batch` for the mean and the variance.
#[derive(Debug, Clone)]
pub(crate) struct Blend {
    mean: Vec<f32>,
    var: Vec<f32>,
    momentum: f64,
}

/// What the forward op shares with its backward.
#[derive(Debug, Clone)]
pub(crate) struct BnCore {
    eps: f64,
    relu: bool,
    fixed: Option<Arc<Fixed>>,
    blend: Option<Arc<Blend>>,
    state: BnState,
}

/// Per-channel mean and biased variance over `n × c × hw`, in f64, two passes.
fn batch_stats(x: &[f32], n: usize, c: usize, hw: usize) -> (Vec<f64>, Vec<f64>) {
    let img = c * hw;
    let count = (n * hw) as f64;
    if x.is_empty() {
        return (vec![f64::NAN; c], vec![f64::NAN; c]);
    }
    let per = per_chunk(n);
    let sums = x
        .par_chunks(per * img)
        .map(|xs| {
            let mut acc = vec![0.0f64; c];
            for xi in xs.chunks_exact(img) {
                for (a, row) in acc.iter_mut().zip(xi.chunks_exact(hw)) {
                    *a += sum_f64(row);
                }
            }
            acc
        })
        .collect();
    let mean: Vec<f64> = add_partials(sums, c)
        .into_iter()
        .map(|s| s / count)
        .collect();
    let sqs = x
        .par_chunks(per * img)
        .map(|xs| {
            let mut acc = vec![0.0f64; c];
            for xi in xs.chunks_exact(img) {
                for ((a, row), &m) in acc.iter_mut().zip(xi.chunks_exact(hw)).zip(&mean) {
                    *a += sq_dev_f64(row, m);
                }
            }
            acc
        })
        .collect();
    let var = add_partials(sqs, c)
        .into_iter()
        .map(|s| s / count)
        .collect();
    (mean, var)
}

/// `y = z` or `max(z, 0)` with `z = (x − centre)·mult + shift`, per channel.
pub(crate) fn apply(
    x: &[f32],
    (n, c, hw): (usize, usize, usize),
    p: Prologue<'_>,
    relu: bool,
) -> Vec<f32> {
    let img = c * hw;
    if x.is_empty() {
        return Vec::new();
    }
    build_vec(n * img, |out: &mut [MaybeUninit<f32>]| {
        out.par_chunks_mut(per_chunk(n) * img)
            .zip(x.par_chunks(per_chunk(n) * img))
            .for_each(|(o, xs)| {
                for (oi, xi) in o.chunks_exact_mut(img).zip(xs.chunks_exact(img)) {
                    for (ch, (orow, xrow)) in
                        oi.chunks_exact_mut(hw).zip(xi.chunks_exact(hw)).enumerate()
                    {
                        let (m, a, s) = p.channel(ch);
                        if relu {
                            for (o, &v) in orow.iter_mut().zip(xrow) {
                                o.write(Prologue::map((m, a, s), v));
                            }
                        } else {
                            for (o, &v) in orow.iter_mut().zip(xrow) {
                                o.write((v - m) * a + s);
                            }
                        }
                    }
                }
            })
    })
}

impl BnCore {
    /// The per-channel values of the normalisation of `x`: its batch statistics (or
    /// the given ones) with the affine `wb`.
    fn params(
        &self,
        x: &[f32],
        dims: (usize, usize, usize),
        wb: Option<(&[f32], &[f32])>,
    ) -> Result<Params> {
        let (n, c, hw) = dims;
        if let Some((w, b)) = wb {
            if w.len() != c || b.len() != c {
                bail!(
                    "nvp-kernels: batch-norm weight/bias length {}/{} for {c} channels",
                    w.len(),
                    b.len()
                );
            }
        }
        let (centre, rstd, mean, var, offset) = match &self.fixed {
            Some(f) => {
                if f.centre.len() != c {
                    bail!(
                        "nvp-kernels: batch-norm statistics of length {} for {c} channels",
                        f.centre.len()
                    );
                }
                (
                    f.centre.clone(),
                    f.rstd.clone(),
                    f.mean.clone(),
                    f.var.clone(),
                    f.offset.clone(),
                )
            }
            None => {
                let (mean, var) = batch_stats(x, n, c, hw);
                // The statistics normalised with: the batch's, or blended (in f64).
                let (centre, norm_var): (Vec<f64>, Vec<f64>) = match &self.blend {
                    Some(b) => {
                        if b.mean.len() != c || b.var.len() != c {
                            bail!(
                                "nvp-kernels: running statistics of length {}/{} for {c} channels",
                                b.mean.len(),
                                b.var.len()
                            );
                        }
                        let m = b.momentum;
                        let mix = |r: &[f32], v: &[f64]| -> Vec<f64> {
                            r.iter()
                                .zip(v)
                                .map(|(&r, &v)| (1.0 - m) * r as f64 + m * v)
                                .collect()
                        };
                        (mix(&b.mean, &mean), mix(&b.var, &var))
                    }
                    None => (mean.clone(), var.clone()),
                };
                let rstd = norm_var
                    .iter()
                    .map(|v| (1.0 / (v + self.eps).sqrt()) as f32)
                    .collect();
                let centre: Vec<f32> = centre.iter().map(|&m| m as f32).collect();
                let mean: Vec<f32> = mean.iter().map(|&m| m as f32).collect();
                let var = var.iter().map(|&v| v as f32).collect();
                (centre, rstd, mean, var, None)
            }
        };
        let (mult, shift): (Vec<f32>, Vec<f32>) = match wb {
            Some((w, b)) => (rstd.iter().zip(w).map(|(r, w)| r * w).collect(), b.to_vec()),
            None => (rstd.clone(), offset.unwrap_or_else(|| vec![0.0; c])),
        };
        let p = Params {
            centre,
            rstd,
            mult,
            shift,
            mean,
            var,
            count: n * hw,
            momentum: self.blend.as_ref().map(|b| b.momentum),
        };
        Ok(p)
    }

    /// Forward kernel: computes (or takes) the statistics, stores them, returns `y`.
    fn forward(
        &self,
        x: &[f32],
        dims: (usize, usize, usize),
        wb: Option<(&[f32], &[f32])>,
    ) -> Result<Vec<f32>> {
        let p = self.params(x, dims, wb)?;
        let y = apply(x, dims, p.prologue(), self.relu);
        store(&self.state, Arc::new(p))?;
        Ok(y)
    }

    /// The backward op for this forward.
    fn grad_op(&self, want_dx: bool) -> Result<BnBackward> {
        Ok(BnBackward {
            params: load(&self.state)?,
            relu: self.relu,
            batch: self.fixed.is_none(),
            want_dx,
        })
    }
}

/// Backward kernel: inputs `x`, `dy`; output the flat `[dx (if want_dx) | dw (c) | db (c)]`.
#[derive(Debug, Clone)]
pub(crate) struct BnBackward {
    params: Arc<Params>,
    relu: bool,
    batch: bool,
    want_dx: bool,
}

/// Pass 1 of the backward over one row: `(Σ dz, Σ dz·(x − μ))` in f64, where
/// `dz = dy` (masked by the ReLU's `z ≥ 0` when `relu`), `z = (x − μ)·a + s`.
/// Eight lanes, lane `l` summing the elements `l mod 8`, then the lanes in order; the
/// AVX2 version performs exactly these operations (bit-identical results).
fn bwd_row_sums(xr: &[f32], dr: &[f32], cas: (f32, f32, f32), relu: bool) -> (f64, f64) {
    let mut a1 = [0.0f64; 8];
    let mut a2 = [0.0f64; 8];
    let body = xr.len().min(dr.len()) / 8 * 8;
    #[cfg(target_arch = "x86_64")]
    if crate::util::have_avx2() {
        // SAFETY: AVX2 and FMA were detected.
        unsafe { bwd_row_sums_avx2(&xr[..body], &dr[..body], cas, relu, &mut a1, &mut a2) };
    } else {
        bwd_row_sums_lanes(&xr[..body], &dr[..body], cas, relu, &mut a1, &mut a2);
    }
    #[cfg(not(target_arch = "x86_64"))]
    bwd_row_sums_lanes(&xr[..body], &dr[..body], cas, relu, &mut a1, &mut a2);
    let (m, a, s) = cas;
    let mut s1: f64 = a1.iter().sum();
    let mut s2: f64 = a2.iter().sum();
    for (&xv, &dv) in xr[body..].iter().zip(&dr[body..]) {
        let xm = xv - m;
        let g = if !relu || xm * a + s >= 0.0 { dv } else { 0.0 };
        s1 += g as f64;
        s2 += (g * xm) as f64;
    }
    (s1, s2)
}

/// The lanes of [`bwd_row_sums`] over a multiple of 8 elements, portable.
fn bwd_row_sums_lanes(
    xr: &[f32],
    dr: &[f32],
    (m, a, s): (f32, f32, f32),
    relu: bool,
    a1: &mut [f64; 8],
    a2: &mut [f64; 8],
) {
    for (xv, dv) in xr.chunks_exact(8).zip(dr.chunks_exact(8)) {
        for l in 0..8 {
            let xm = xv[l] - m;
            let g = if !relu || xm * a + s >= 0.0 {
                dv[l]
            } else {
                0.0
            };
            a1[l] += g as f64;
            a2[l] += (g * xm) as f64;
        }
    }
}

/// AVX2 version of [`bwd_row_sums_lanes`].
///
/// # Safety
/// The CPU must support AVX2; `xr` and `dr` have the same length, a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bwd_row_sums_avx2(
    xr: &[f32],
    dr: &[f32],
    (m, a, s): (f32, f32, f32),
    relu: bool,
    a1: &mut [f64; 8],
    a2: &mut [f64; 8],
) {
    use std::arch::x86_64::*;
    assert!(xr.len() == dr.len() && xr.len().is_multiple_of(8));
    let (vm, va, vs) = (_mm256_set1_ps(m), _mm256_set1_ps(a), _mm256_set1_ps(s));
    let zero = _mm256_setzero_ps();
    let mut s1lo = _mm256_loadu_pd(a1.as_ptr());
    let mut s1hi = _mm256_loadu_pd(a1.as_ptr().add(4));
    let mut s2lo = _mm256_loadu_pd(a2.as_ptr());
    let mut s2hi = _mm256_loadu_pd(a2.as_ptr().add(4));
    let (xp, dp) = (xr.as_ptr(), dr.as_ptr());
    let mut i = 0;
    while i < xr.len() {
        let xm = _mm256_sub_ps(_mm256_loadu_ps(xp.add(i)), vm);
        let dv = _mm256_loadu_ps(dp.add(i));
        let g = if relu {
            // No FMA: the portable version rounds the product, then the sum.
            let z = _mm256_add_ps(_mm256_mul_ps(xm, va), vs);
            _mm256_and_ps(_mm256_cmp_ps::<_CMP_GE_OQ>(z, zero), dv)
        } else {
            dv
        };
        let gx = _mm256_mul_ps(g, xm);
        s1lo = _mm256_add_pd(s1lo, _mm256_cvtps_pd(_mm256_castps256_ps128(g)));
        s1hi = _mm256_add_pd(s1hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(g)));
        s2lo = _mm256_add_pd(s2lo, _mm256_cvtps_pd(_mm256_castps256_ps128(gx)));
        s2hi = _mm256_add_pd(s2hi, _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(gx)));
        i += 8;
    }
    _mm256_storeu_pd(a1.as_mut_ptr(), s1lo);
    _mm256_storeu_pd(a1.as_mut_ptr().add(4), s1hi);
    _mm256_storeu_pd(a2.as_mut_ptr(), s2lo);
    _mm256_storeu_pd(a2.as_mut_ptr().add(4), s2hi);
}

impl BnBackward {
    fn run(&self, x: &[f32], dy: &[f32], dims: (usize, usize, usize)) -> Vec<f32> {
        let c = dims.1;
        let x_len = if self.want_dx { x.len() } else { 0 };
        build_vec(x_len + 2 * c, |out: &mut [MaybeUninit<f32>]| {
            let (dx, tail) = out.split_at_mut(x_len);
            let dx = self.want_dx.then_some(dx);
            let (dw, db) =
                backward_into(&self.params, self.relu, self.batch, x, dy, dims, dx, None);
            for (o, v) in tail.iter_mut().zip(dw.iter().chain(&db)) {
                o.write(*v);
            }
        })
    }
}

/// The batch-norm backward over `x`, `dy` (`n × c × hw`): returns `(dw, db)` and, when
/// `dx` is given, writes the input gradient there (plus `add`, element by element,
/// when given: a gradient arriving by another path, e.g. a residual connection).
#[allow(clippy::too_many_arguments)]
fn backward_into(
    p: &Params,
    relu: bool,
    batch: bool,
    x: &[f32],
    dy: &[f32],
    (n, c, hw): (usize, usize, usize),
    dx: Option<&mut [MaybeUninit<f32>]>,
    add: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>) {
    let img = c * hw;
    if x.is_empty() {
        return (vec![0.0; c], vec![0.0; c]);
    }
    let per = per_chunk(n);
    // Pass 1: s1 = Σ dz, s2' = Σ dz·(x − μ) per channel (f64).
    let parts = x
        .par_chunks(per * img)
        .zip(dy.par_chunks(per * img))
        .map(|(xs, dys)| {
            let mut acc = vec![0.0f64; 2 * c];
            for (xi, di) in xs.chunks_exact(img).zip(dys.chunks_exact(img)) {
                for (ch, (xr, dr)) in xi.chunks_exact(hw).zip(di.chunks_exact(hw)).enumerate() {
                    let (s1, s2) = bwd_row_sums(xr, dr, p.prologue().channel(ch), relu);
                    acc[ch] += s1;
                    acc[c + ch] += s2;
                }
            }
            acc
        })
        .collect();
    let sums = add_partials(parts, 2 * c);
    // dw = r·Σ dz·(x − μ), db = Σ dz.
    let dw: Vec<f32> = (0..c)
        .map(|ch| (sums[c + ch] * p.rstd[ch] as f64) as f32)
        .collect();
    let db: Vec<f32> = sums[..c].iter().map(|&v| v as f32).collect();
    let Some(dx) = dx else {
        return (dw, db);
    };
    assert_eq!(dx.len(), x.len());
    if let Some(a) = add {
        assert_eq!(a.len(), x.len());
    }
    // dx = mult·(dz − k1 − (x − μ)·k2), k1 = db/M, k2 = r²·Σ dz·(x − μ)/M (batch
    // mode; both 0 in fixed mode). Blended with running averages at weight m (centre
    // μ̃ = (1 − m)·μ_run + m·μ, variance likewise): the statistics' gradients scale by
    // m and the variance's is through (x − μ) = (x − μ̃) + δ, δ = μ̃ − μ, so
    // k1 = m·(db/M + δ·k2'), k2 = m·k2' with k2' = r²·Σ dz·(x − μ̃)/M.
    let inv_m = 1.0 / p.count as f64;
    let k: Vec<(f32, f32)> = (0..c)
        .map(|ch| {
            if !batch {
                return (0.0, 0.0);
            }
            let r = p.rstd[ch] as f64;
            let k1 = sums[ch] * inv_m;
            let k2 = sums[c + ch] * r * r * inv_m;
            match p.momentum {
                None => (k1 as f32, k2 as f32),
                Some(m) => {
                    let delta = p.centre[ch] as f64 - p.mean[ch] as f64;
                    ((m * (k1 + delta * k2)) as f32, (m * k2) as f32)
                }
            }
        })
        .collect();
    let add = add.unwrap_or(&[]);
    dx.par_chunks_mut(per * img)
        .enumerate()
        .zip(x.par_chunks(per * img).zip(dy.par_chunks(per * img)))
        .for_each(|((ci, o), (xs, dys))| {
            for (ii, (oi, (xi, di))) in o
                .chunks_exact_mut(img)
                .zip(xs.chunks_exact(img).zip(dys.chunks_exact(img)))
                .enumerate()
            {
                for (ch, (orow, (xr, dr))) in oi
                    .chunks_exact_mut(hw)
                    .zip(xi.chunks_exact(hw).zip(di.chunks_exact(hw)))
                    .enumerate()
                {
                    let off = ((ci * per + ii) * c + ch) * hw;
                    let row = DxRow {
                        prologue: p.prologue().channel(ch),
                        k: k[ch],
                        relu,
                    };
                    bwd_dx_row(orow, xr, dr, add.get(off..off + hw), row);
                }
            }
        });
    (dw, db)
}

/// One channel's constants for [`bwd_dx_row`]: the prologue `(centre, mult, shift)`,
/// `(k1, k2)` and whether a ReLU follows.
#[derive(Clone, Copy)]
struct DxRow {
    prologue: (f32, f32, f32),
    k: (f32, f32),
    relu: bool,
}

crate::util::multiversion! {
    /// One row of [`backward_into`]'s input gradient: `mult·(dz − k1 − (x − centre)·k2)
    /// (+ add)`, `dz` the output gradient masked by the ReLU. (Compiled twice, for the
    /// baseline and for AVX2: the same operations, so the same bits.)
    fn bwd_dx_row(
        orow: &mut [MaybeUninit<f32>],
        xr: &[f32],
        dr: &[f32],
        add: Option<&[f32]>,
        row: DxRow
    ) -> () {
        let DxRow { prologue: (m, a, s), k: (k1, k2), relu } = row;
        match add {
            Some(ar) => {
                for ((o, (&xv, &dv)), &av) in orow.iter_mut().zip(xr.iter().zip(dr)).zip(ar) {
                    let xm = xv - m;
                    let g = if !relu || xm * a + s >= 0.0 { dv } else { 0.0 };
                    o.write(a * (g - k1 - xm * k2) + av);
                }
            }
            None => {
                for (o, (&xv, &dv)) in orow.iter_mut().zip(xr.iter().zip(dr)) {
                    let xm = xv - m;
                    let g = if !relu || xm * a + s >= 0.0 { dv } else { 0.0 };
                    o.write(a * (g - k1 - xm * k2));
                }
            }
        }
    }
}

/// Batch-mode statistics of a slice (`n × c × hw`) with affine `(w, b)`, for a fused
/// network op that applies the normalisation (with ReLU) as a convolution's
/// [`Prologue`]: the same values as [`batch_norm`] computes.
pub(crate) fn train_params(
    x: &[f32],
    dims: (usize, usize, usize),
    (w, b): (&[f32], &[f32]),
    eps: f64,
) -> Result<Arc<Params>> {
    let core = BnCore {
        eps,
        relu: true,
        fixed: None,
        blend: None,
        state: Arc::new(Mutex::new(None)),
    };
    Ok(Arc::new(core.params(x, dims, Some((w, b)))?))
}

/// Backward of the training-mode batch norm that [`train_params`] and [`apply`] compute
/// (through the batch statistics): `(dx + add, dw, db)`.
pub(crate) fn train_backward(
    p: &Params,
    relu: bool,
    x: &[f32],
    dy: &[f32],
    dims: (usize, usize, usize),
    add: Option<&[f32]>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), dy.len());
    let mut grads = (Vec::new(), Vec::new());
    let dx = build_vec(x.len(), |dx: &mut [MaybeUninit<f32>]| {
        grads = backward_into(p, relu, true, x, dy, dims, Some(dx), add);
    });
    (dx, grads.0, grads.1)
}

impl Params {
    /// The per-channel mean and (biased) variance this normalisation used.
    pub(crate) fn stats(&self) -> (&[f32], &[f32]) {
        (&self.mean, &self.var)
    }

    /// The per-channel `(centre, mult, shift)` of this normalisation; with ReLU it is
    /// the input map a convolution applies (the operations of [`apply`] with `relu`).
    pub(crate) fn prologue(&self) -> Prologue<'_> {
        Prologue {
            centre: &self.centre,
            mult: &self.mult,
            shift: &self.shift,
        }
    }
}

impl CustomOp2 for BnBackward {
    fn name(&self) -> &'static str {
        "nvp-batch-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = ncs(l1.shape())?;
        if l1.shape() != l2.shape() {
            bail!(
                "nvp-kernels: batch-norm grad: x {:?} vs dy {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let x = f32_slice(s1, l1, "x")?;
        let dy = f32_slice(s2, l2, "dy")?;
        let out = self.run(x, dy, dims);
        let len = out.len();
        Ok((CpuStorage::F32(out), Shape::from(len)))
    }
}

/// Splits the flat `[dx | dw | db]` of [`BnBackward`].
fn split_grads(
    packed: &Tensor,
    x_shape: Option<&Shape>,
    c: usize,
) -> Result<(Option<Tensor>, Tensor, Tensor)> {
    let x_len = x_shape.map_or(0, |s| s.elem_count());
    let dx = match x_shape {
        Some(s) => Some(packed.narrow(0, 0, x_len)?.reshape(s)?),
        None => None,
    };
    let dw = packed.narrow(0, x_len, c)?;
    let db = packed.narrow(0, x_len + c, c)?;
    Ok((dx, dw, db))
}

/// Batch norm with a learned affine: inputs `x (N, C, ...)`, `weight (C)`, `bias (C)`.
#[derive(Debug, Clone)]
pub struct BatchNormAffine(pub(crate) BnCore);

/// Batch norm without affine (or the fixed per-channel map of the inverse): input `x`.
#[derive(Debug, Clone)]
pub struct BatchNormPlain(pub(crate) BnCore);

impl CustomOp3 for BatchNormAffine {
    fn name(&self) -> &'static str {
        "nvp-batch-norm-affine"
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
        let dims = ncs(l1.shape())?;
        let x = f32_slice(s1, l1, "x")?;
        let w = f32_slice(s2, l2, "weight")?;
        let b = f32_slice(s3, l3, "bias")?;
        let y = self.0.forward(x, dims, Some((w, b)))?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = self.0.grad_op(x.track_op())?;
        let packed = x.apply_op2_no_bwd(&dy.contiguous()?, &op)?;
        let c = x.dim(1)?;
        let (dx, dw, db) = split_grads(&packed, op.want_dx.then_some(x.shape()), c)?;
        let dw = w.track_op().then(|| dw.reshape(w.shape())).transpose()?;
        let db = b.track_op().then(|| db.reshape(b.shape())).transpose()?;
        Ok((dx, dw, db))
    }
}

impl CustomOp1 for BatchNormPlain {
    fn name(&self) -> &'static str {
        "nvp-batch-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = ncs(l.shape())?;
        let x = f32_slice(s, l, "x")?;
        let y = self.0.forward(x, dims, None)?;
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let op = self.0.grad_op(true)?;
        let packed = x.apply_op2_no_bwd(&dy.contiguous()?, &op)?;
        let (dx, _, _) = split_grads(&packed, Some(x.shape()), x.dim(1)?)?;
        Ok(dx)
    }
}

/// The biased batch variance `(C)` of the forward pass sharing `state`, as a
/// differentiable function of `x` (input `x`; must run after that forward).
#[derive(Debug, Clone)]
pub struct BatchVar(pub(crate) BnState);

/// Gradient of [`BatchVar`]: inputs `x`, `dvar (C)`; output `dvar_c·2(x − μ_c)/M`.
#[derive(Debug, Clone)]
struct BatchVarBackward(Arc<Params>);

impl CustomOp1 for BatchVar {
    fn name(&self) -> &'static str {
        "nvp-batch-var"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, c, _) = ncs(l.shape())?;
        let p = load(&self.0)?;
        if p.var.len() != c {
            bail!(
                "nvp-kernels: batch variance of {} channels for {c}",
                p.var.len()
            );
        }
        Ok((CpuStorage::F32(p.var.clone()), Shape::from(c)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dvar: &Tensor) -> Result<Option<Tensor>> {
        let op = BatchVarBackward(load(&self.0)?);
        Ok(Some(x.apply_op2_no_bwd(&dvar.contiguous()?, &op)?))
    }
}

impl CustomOp2 for BatchVarBackward {
    fn name(&self) -> &'static str {
        "nvp-batch-var-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, hw) = ncs(l1.shape())?;
        let x = f32_slice(s1, l1, "x")?;
        let dv = f32_slice(s2, l2, "dvar")?;
        if dv.len() != c {
            bail!(
                "nvp-kernels: batch-var grad of length {} for {c} channels",
                dv.len()
            );
        }
        let p = &*self.0;
        let k: Vec<f32> = dv
            .iter()
            .map(|&g| (2.0 * g as f64 / p.count as f64) as f32)
            .collect();
        let img = c * hw;
        let out = if x.is_empty() {
            Vec::new()
        } else {
            build_vec(x.len(), |out: &mut [MaybeUninit<f32>]| {
                out.par_chunks_mut(per_chunk(n) * img)
                    .zip(x.par_chunks(per_chunk(n) * img))
                    .for_each(|(o, xs)| {
                        for (oi, xi) in o.chunks_exact_mut(img).zip(xs.chunks_exact(img)) {
                            for (ch, (orow, xr)) in
                                oi.chunks_exact_mut(hw).zip(xi.chunks_exact(hw)).enumerate()
                            {
                                let (m, kk) = (p.mean[ch], k[ch]);
                                for (o, &v) in orow.iter_mut().zip(xr) {
                                    o.write((v - m) * kk);
                                }
                            }
                        }
                    })
            })
        };
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Whether the fused batch-norm ops apply: fast path enabled, f32, CPU, rank ≥ 2.
pub fn batch_norm_uses_fast_path(x: &Tensor, others: &[&Tensor]) -> bool {
    crate::fast_cpu_enabled()
        && x.device().is_cpu()
        && x.dtype() == DType::F32
        && x.rank() >= 2
        && others
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// Output of [`batch_norm`].
#[derive(Debug, Clone)]
pub struct BatchNormOutput {
    /// The normalised (affine-mapped, rectified) output, shaped as `x`.
    pub y: Tensor,
    /// The per-channel mean used, `(C)`, detached.
    pub mean: Tensor,
    /// The per-channel (biased, in batch mode) variance used, `(C)`: a
    /// differentiable function of `x` when `var_grad` was asked for in batch mode,
    /// detached otherwise.
    pub var: Tensor,
}

fn vec_of(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()
}

/// `1/sqrt(var + ε)` per channel for given statistics, rounded once from f64.
pub(crate) fn fixed_rstd(var: &[f32], eps: f64) -> Vec<f32> {
    var.iter()
        .map(|&v| (1.0 / (v as f64 + eps).sqrt()) as f32)
        .collect()
}

/// The per-channel `(centre, mult, shift)` of the eval-mode batch norm with affine,
/// as [`batch_norm`] computes them for `running = Some((mean, var))`.
pub(crate) fn fixed_affine(
    weight: &Tensor,
    bias: &Tensor,
    mean: &Tensor,
    var: &Tensor,
    eps: f64,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (w, b, m, v) = (vec_of(weight)?, vec_of(bias)?, vec_of(mean)?, vec_of(var)?);
    let c = m.len();
    if w.len() != c || b.len() != c || v.len() != c {
        bail!(
            "nvp-kernels: batch-norm weight/bias/mean/var of lengths {}/{}/{c}/{}",
            w.len(),
            b.len(),
            v.len()
        );
    }
    let mult = fixed_rstd(&v, eps)
        .iter()
        .zip(&w)
        .map(|(r, w)| r * w)
        .collect();
    Ok((m, mult, b))
}

/// Fused batch normalisation of an `(N, C, ...)` f32 CPU tensor.
///
/// * `affine`: `(weight, bias)`, both `(C)`: `y = w·x̂ + b`; `None`: `y = x̂`.
/// * `running`: `None` normalises with the batch mean and biased variance (train
///   mode; the gradient flows through them); `Some((mean, var))` uses the given
///   statistics (eval mode; no gradient to them).
/// * `relu`: apply `max(·, 0)` to the output (gradient as candle's `relu`).
/// * `var_grad`: return the batch variance as a differentiable `(C)` tensor.
///
/// Errors unless [`batch_norm_uses_fast_path`] holds for `x` and the parameters.
pub fn batch_norm(
    x: &Tensor,
    affine: Option<(&Tensor, &Tensor)>,
    running: Option<(&Tensor, &Tensor)>,
    eps: f64,
    relu: bool,
    var_grad: bool,
) -> Result<BatchNormOutput> {
    batch_norm_impl(x, affine, running, None, eps, relu, var_grad)
}

/// Train-mode batch normalisation of an `(N, C, ...)` f32 CPU tensor with the running
/// averages blended in (the paper's Appendix E): `y = (x − μ̃)/sqrt(σ̃² + ε)` with
/// `μ̃ = (1 − m)·running_mean + m·μ`, `σ̃² = (1 − m)·running_var + m·σ²` (`μ`, `σ²`
/// the batch mean and biased variance, `m` = `momentum`); the gradient flows through
/// the batch part only. The output's `mean` and `var` are the batch statistics, `var`
/// differentiable, so that the caller can form `σ̃²` for a log-determinant and update
/// the running averages. Same conditions as [`batch_norm`].
pub fn batch_norm_blended(
    x: &Tensor,
    running: (&Tensor, &Tensor),
    momentum: f64,
    eps: f64,
) -> Result<BatchNormOutput> {
    let blend = Blend {
        mean: vec_of(running.0)?,
        var: vec_of(running.1)?,
        momentum,
    };
    batch_norm_impl(x, None, None, Some(Arc::new(blend)), eps, false, true)
}

fn batch_norm_impl(
    x: &Tensor,
    affine: Option<(&Tensor, &Tensor)>,
    running: Option<(&Tensor, &Tensor)>,
    blend: Option<Arc<Blend>>,
    eps: f64,
    relu: bool,
    var_grad: bool,
) -> Result<BatchNormOutput> {
    let mut others = vec![];
    if let Some((w, b)) = affine {
        others.extend([w, b]);
    }
    if !batch_norm_uses_fast_path(x, &others) {
        bail!("nvp-kernels: batch_norm needs f32 CPU tensors and the fast path enabled");
    }
    let c = x.dim(1)?;
    let fixed = match running {
        Some((m, v)) => {
            let mean = vec_of(m)?;
            let var = vec_of(v)?;
            if mean.len() != c || var.len() != c {
                bail!(
                    "nvp-kernels: running statistics of length {}/{} for {c} channels",
                    mean.len(),
                    var.len()
                );
            }
            let rstd = fixed_rstd(&var, eps);
            Some(Arc::new(Fixed {
                centre: mean.clone(),
                rstd,
                offset: None,
                mean,
                var,
            }))
        }
        None => None,
    };
    let state: BnState = Arc::new(Mutex::new(None));
    let core = BnCore {
        eps,
        relu,
        fixed,
        blend,
        state: state.clone(),
    };
    let x = x.contiguous()?;
    let y = match affine {
        Some((w, b)) => x.apply_op3(
            &w.flatten_all()?.contiguous()?,
            &b.flatten_all()?.contiguous()?,
            BatchNormAffine(core),
        )?,
        None => x.apply_op1(BatchNormPlain(core))?,
    };
    let p = load(&state)?;
    let dev = x.device();
    let mean = Tensor::from_vec(p.mean.clone(), c, dev)?;
    let var = if var_grad && running.is_none() {
        x.apply_op1(BatchVar(state))?
    } else {
        Tensor::from_vec(p.var.clone(), c, dev)?
    };
    Ok(BatchNormOutput { y, mean, var })
}

/// The inverse of the eval-mode batch norm without affine: `x = y·sqrt(var + ε) + mean`
/// per channel (differentiable with respect to `y`). Same conditions as [`batch_norm`].
pub fn batch_norm_inverse(y: &Tensor, mean: &Tensor, var: &Tensor, eps: f64) -> Result<Tensor> {
    if !batch_norm_uses_fast_path(y, &[]) {
        bail!("nvp-kernels: batch_norm_inverse needs f32 CPU tensors and the fast path enabled");
    }
    let c = y.dim(1)?;
    let mean = vec_of(mean)?;
    let var = vec_of(var)?;
    if mean.len() != c || var.len() != c {
        bail!(
            "nvp-kernels: statistics of length {}/{} for {c} channels",
            mean.len(),
            var.len()
        );
    }
    let std: Vec<f32> = var
        .iter()
        .map(|&v| (v as f64 + eps).sqrt() as f32)
        .collect();
    let core = BnCore {
        eps,
        relu: false,
        blend: None,
        fixed: Some(Arc::new(Fixed {
            centre: vec![0.0; c],
            rstd: std,
            offset: Some(mean.clone()),
            mean,
            var,
        })),
        state: Arc::new(Mutex::new(None)),
    };
    y.contiguous()?.apply_op1(BatchNormPlain(core))
}

/// The candle-op reference of [`batch_norm`] (any device and dtype), as the flow's
/// layers compute it: batch statistics over all axes but 1 with `sum_keepdim`,
/// `y = x·(w·r) + (b − μ·w·r)`, ReLU by candle's `relu`.
pub fn batch_norm_reference(
    x: &Tensor,
    affine: Option<(&Tensor, &Tensor)>,
    running: Option<(&Tensor, &Tensor)>,
    eps: f64,
    relu: bool,
) -> Result<BatchNormOutput> {
    let rank = x.rank();
    let c = x.dim(1)?;
    let mut fs = vec![1usize; rank];
    fs[1] = c;
    let (mean, var) = match running {
        Some((m, v)) => (m.reshape(fs.clone())?, v.reshape(fs.clone())?),
        None => {
            let dims: Vec<usize> = (0..rank).filter(|&d| d != 1).collect();
            let count = dims.iter().map(|&d| x.dims()[d]).product::<usize>() as f64;
            let mean = (x.sum_keepdim(dims.clone())? / count)?;
            let var = (x.broadcast_sub(&mean)?.sqr()?.sum_keepdim(dims)? / count)?;
            (mean, var)
        }
    };
    let inv_std = (&var + eps)?.sqrt()?.recip()?;
    let (scale, shift) = match affine {
        Some((w, b)) => {
            let scale = inv_std.broadcast_mul(&w.reshape(fs.clone())?)?;
            let shift = (b.reshape(fs)? - mean.broadcast_mul(&scale)?)?;
            (scale, shift)
        }
        None => (inv_std.clone(), mean.broadcast_mul(&inv_std)?.neg()?),
    };
    let mut y = x.broadcast_mul(&scale)?.broadcast_add(&shift)?;
    if relu {
        y = y.relu()?;
    }
    Ok(BatchNormOutput {
        y,
        mean: mean.flatten_all()?.detach(),
        var: var.flatten_all()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 reduction performs the portable lanes' operations exactly: equal bits,
    /// with and without the ReLU mask, including ±0, NaN and infinite inputs.
    #[test]
    fn bwd_row_sums_avx2_matches_portable_bits() {
        if !crate::util::have_avx2() {
            eprintln!("skipped: no AVX2 on this CPU");
            return;
        }
        // ((s >> 40) / 2^24 − 0.5)·4 equals (s >> 40) / 2^24 · 4 − 2 exactly.
        let mut next = crate::util::xorshift(0x2545_f491_4f6c_dd1d, 4.0);
        let mut x: Vec<f32> = (0..1024).map(|_| next()).collect();
        let mut d: Vec<f32> = (0..1024).map(|_| next()).collect();
        x[3] = f32::NAN;
        x[9] = f32::INFINITY;
        d[17] = -0.0;
        x[40] = 0.25; // z = 0 exactly with the constants below: the mask keeps it
        for relu in [false, true] {
            let cas = (0.25f32, 1.5f32, 0.0f32);
            let (mut p1, mut p2) = ([0.0f64; 8], [0.0f64; 8]);
            let (mut v1, mut v2) = ([0.0f64; 8], [0.0f64; 8]);
            bwd_row_sums_lanes(&x, &d, cas, relu, &mut p1, &mut p2);
            // SAFETY: AVX2 checked above; lengths equal, a multiple of 8.
            unsafe { bwd_row_sums_avx2(&x, &d, cas, relu, &mut v1, &mut v2) };
            for l in 0..8 {
                assert_eq!(p1[l].to_bits(), v1[l].to_bits(), "relu {relu} s1 lane {l}");
                assert_eq!(p2[l].to_bits(), v2[l].to_bits(), "relu {relu} s2 lane {l}");
            }
        }
    }
}
