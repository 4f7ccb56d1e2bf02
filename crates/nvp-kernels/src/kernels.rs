//! Raw FP32 kernels for the 3×3, stride 1, padding 1 convolution on contiguous NCHW
//! buffers: im2col + GEMM forward, weight gradient as a GEMM over the im2col matrix,
//! input gradient as a forward convolution with the flipped, transposed kernel, and
//! the bias gradient as a per-channel reduction.
//!
//! Tiling: im2col is built for a band of output rows at a time (about 1 MiB of f32,
//! see [`TILE_BYTES`]) so that the matrix the GEMM reads is still in L2; the forward
//! GEMM writes the band's columns of the `k × hw` output in place, the weight-gradient
//! GEMM accumulates over bands and images.
//!
//! Threading: when the batch has at least as many images as the rayon pool has
//! threads, the batch is split into one contiguous chunk per thread and each thread
//! runs single-threaded GEMMs (measured 2× faster than a parallel GEMM per image on 2
//! cores); otherwise images are processed one after the other and the GEMM itself is
//! parallelised.

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use gemm::Parallelism;

use crate::util::with_scratch;
use rayon::prelude::*;

/// Sizes of one convolution: batch `n`, input channels `c`, output channels `k`, and
/// the spatial size `h × w` (same for input and output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConvDims {
    pub n: usize,
    pub c: usize,
    pub k: usize,
    pub h: usize,
    pub w: usize,
}

impl ConvDims {
    pub fn hw(&self) -> usize {
        self.h * self.w
    }
    /// Rows of the im2col matrix (= columns of the weight matrix).
    pub fn kdim(&self) -> usize {
        9 * self.c
    }
    pub fn x_len(&self) -> usize {
        self.n * self.c * self.hw()
    }
    pub fn y_len(&self) -> usize {
        self.n * self.k * self.hw()
    }
    pub fn w_len(&self) -> usize {
        self.k * self.kdim()
    }
}

/// A per-input-channel map applied to the convolution's input before it is padded:
/// `x ↦ max((x − centre_c)·mult_c + shift_c, 0)` — an eval-mode batch norm with its
/// affine, then ReLU, in exactly the operations of the batch-norm kernel (`bn.rs`), so
/// that fusing it into a convolution gives the same bits as running the two ops.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prologue<'a> {
    pub centre: &'a [f32],
    pub mult: &'a [f32],
    pub shift: &'a [f32],
}

impl Prologue<'_> {
    /// `(centre, mult, shift)` of input channel `c`.
    #[inline(always)]
    pub fn channel(&self, c: usize) -> (f32, f32, f32) {
        (self.centre[c], self.mult[c], self.shift[c])
    }

    /// The map on one value (as `bn.rs`'s `apply` with ReLU).
    #[inline(always)]
    pub fn map((m, a, s): (f32, f32, f32), v: f32) -> f32 {
        ((v - m) * a + s).max(0.0)
    }

    /// The mapped input, materialised by the batch-norm kernel (for the convolution
    /// kernels that do not fuse the map).
    pub fn apply(&self, x: &[f32], d: ConvDims) -> Vec<f32> {
        assert_eq!(x.len(), d.x_len());
        assert!(self.centre.len() == d.c && self.mult.len() == d.c && self.shift.len() == d.c);
        crate::bn::apply(x, (d.n, d.c, d.hw()), *self, true)
    }
}

/// Tuning knobs (set through the hidden `tuning` module, for benchmarks): the im2col
/// tile budgets in bytes for the forward / input-gradient and the weight-gradient
/// GEMMs (0: whole image at once; 1 MiB measured best of 0, 256 KiB … 2 MiB at
/// (64, 64, 32, 32) and (64, 128, 16, 16)), and whether to split the batch over
/// threads (else parallel GEMM).
pub(crate) static TILE_BYTES: AtomicUsize = AtomicUsize::new(1024 * 1024);
pub(crate) static TILE_BYTES_WGRAD: AtomicUsize = AtomicUsize::new(1024 * 1024);
pub(crate) static BATCH_SPLIT: AtomicBool = AtomicBool::new(true);

/// Output rows per im2col tile for `kdim` im2col rows of width `w`.
fn tile_rows(budget: usize, kdim: usize, h: usize, w: usize) -> usize {
    if budget == 0 {
        return h.max(1);
    }
    let row_bytes = kdim * w * std::mem::size_of::<f32>();
    (budget / row_bytes.max(1)).clamp(1, h.max(1))
}

fn num_threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Images per thread chunk when splitting the batch over the pool, or `None` when the
/// batch is too small to split (then the GEMM is parallelised instead).
fn batch_chunk(n: usize) -> Option<usize> {
    let t = num_threads();
    if t > 1 && n >= t && BATCH_SPLIT.load(Ordering::Relaxed) {
        Some(n.div_ceil(t))
    } else {
        None
    }
}

fn gemm_par() -> Parallelism {
    let t = num_threads();
    if t > 1 {
        Parallelism::Rayon(t)
    } else {
        Parallelism::None
    }
}

/// im2col for output rows `oh0..oh1` of one image: `x` is `c × h × w`, `col` is
/// `9c × ((oh1 − oh0)·w)` with row index `(ci·3 + ki)·3 + kj` holding
/// `x[ci, oh + ki − 1, ow + kj − 1]` (zero outside the image).
pub(crate) fn im2col_rows(
    x: &[f32],
    c: usize,
    h: usize,
    w: usize,
    oh0: usize,
    oh1: usize,
    col: &mut [f32],
) {
    let tp = (oh1 - oh0) * w;
    im2col_rows_ld(x, (c, h, w), (oh0, oh1), col, tp);
}

/// [`im2col_rows`] into rows `ld` apart (`ld ≥ tp`: the tile as a column block of a
/// wider matrix).
pub(crate) fn im2col_rows_ld(
    x: &[f32],
    (c, h, w): (usize, usize, usize),
    (oh0, oh1): (usize, usize),
    col: &mut [f32],
    ld: usize,
) {
    let hw = h * w;
    let tp = (oh1 - oh0) * w;
    debug_assert!(oh0 <= oh1 && oh1 <= h && ld >= tp);
    debug_assert!(x.len() >= c * hw && (tp == 0 || col.len() >= (9 * c - 1) * ld + tp));
    if tp == 0 {
        return;
    }
    for ci in 0..c {
        let xc = &x[ci * hw..(ci + 1) * hw];
        for ki in 0..3 {
            for kj in 0..3 {
                let row = &mut col[((ci * 3 + ki) * 3 + kj) * ld..][..tp];
                for (oh, dst) in (oh0..oh1).zip(row.chunks_exact_mut(w)) {
                    let ih = oh + ki;
                    if ih == 0 || ih > h {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &xc[(ih - 1) * w..ih * w];
                    match kj {
                        0 => {
                            dst[0] = 0.0;
                            dst[1..].copy_from_slice(&src[..w - 1]);
                        }
                        1 => dst.copy_from_slice(src),
                        _ => {
                            dst[..w - 1].copy_from_slice(&src[1..]);
                            dst[w - 1] = 0.0;
                        }
                    }
                }
            }
        }
    }
}

/// One image of the forward pass: `out (k × hw) = wmat (k × 9c) · im2col(x) (+ bias)`,
/// computed in tiles of output rows so that the im2col tile stays in cache.
fn fwd_one(
    x: &[f32],
    wmat: &[f32],
    bias: Option<&[f32]>,
    out: &mut [MaybeUninit<f32>],
    col: &mut [f32],
    d: ConvDims,
    (rows, par): (usize, Parallelism),
) {
    let hw = d.hw();
    let kd = d.kdim();
    assert!(x.len() == d.c * hw && out.len() == d.k * hw && wmat.len() == d.k * kd);
    assert!(rows >= 1);
    assert!(col.len() >= kd * rows * d.w);
    if let Some(b) = bias {
        for (row, &bv) in out.chunks_exact_mut(hw).zip(b) {
            row.fill(MaybeUninit::new(bv));
        }
    }
    let mut oh0 = 0;
    while oh0 < d.h {
        let oh1 = (oh0 + rows).min(d.h);
        let tp = (oh1 - oh0) * d.w;
        im2col_rows(x, d.c, d.h, d.w, oh0, oh1, col);
        // SAFETY: dst is the `k × tp` block starting at column `oh0·w` of the row-major
        // `k × hw` matrix in `out` (len k·hw checked; the last element touched is
        // `(k−1)·hw + oh1·w − 1 < k·hw`); lhs is `k × 9c` row-major in `wmat` (len
        // checked); rhs is `9c × tp` row-major in `col` (len ≥ 9c·rows·w ≥ 9c·tp,
        // checked). dst is only read when `read_dst` is true, i.e. after the bias fill
        // above initialised every element; with `read_dst == false` gemm sets alpha to 0
        // and only stores (gemm-common `gemm_basic_generic`: `if !read_dst {
        // alpha.set_zero() }`; the micro-kernels' alpha == 0 branch never loads dst).
        // The buffers do not overlap.
        unsafe {
            gemm::gemm(
                d.k,
                tp,
                kd,
                out.as_mut_ptr().add(oh0 * d.w).cast::<f32>(),
                1,
                hw as isize,
                bias.is_some(),
                wmat.as_ptr(),
                1,
                kd as isize,
                col.as_ptr(),
                1,
                tp as isize,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                par,
            );
        }
        oh0 = oh1;
    }
}

/// Execution plan: output rows per im2col tile, and images per thread chunk (`None`:
/// one image after the other with a parallel GEMM).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    pub rows: usize,
    pub chunk: Option<usize>,
}

impl Plan {
    fn new(d: ConvDims, budget: &AtomicUsize) -> Self {
        Plan {
            rows: tile_rows(budget.load(Ordering::Relaxed), d.kdim(), d.h, d.w),
            chunk: batch_chunk(d.n),
        }
    }
    fn col_len(&self, d: ConvDims) -> usize {
        d.kdim() * self.rows * d.w
    }
}

/// Forward convolution. `x`: `n × c × h × w`, `wmat`: `k × c × 3 × 3`, `bias`: `k`.
/// Returns `n × k × h × w`.
/// Uses Winograd F(4×4, 3×3) (module `winograd`) unless switched off, else im2col + GEMM.
pub(crate) fn conv3x3_fwd(x: &[f32], wmat: &[f32], bias: Option<&[f32]>, d: ConvDims) -> Vec<f32> {
    conv3x3_fwd_fused(x, None, wmat, bias, None, d)
}

/// [`conv3x3_fwd`] of `pro(x)` (when given), plus `skip` (`n × k × h × w`) added to
/// each output after its bias (the same rounding as adding it afterwards).
pub(crate) fn conv3x3_fwd_fused(
    x: &[f32],
    pro: Option<Prologue<'_>>,
    wmat: &[f32],
    bias: Option<&[f32]>,
    skip: Option<&[f32]>,
    d: ConvDims,
) -> Vec<f32> {
    if let Some(s) = skip {
        assert_eq!(s.len(), d.y_len());
    }
    let winograd = d.c >= 1 && crate::winograd_enabled();
    if let Some(p) = pro {
        // Only the AVX2 Winograd transforms map the input while padding it.
        if !(winograd && crate::winograd::fuses_prologue(d)) {
            return conv3x3_fwd_fused(&p.apply(x, d), None, wmat, bias, skip, d);
        }
    }
    if winograd {
        return crate::winograd::conv3x3_fwd(x, pro, wmat, bias, skip, d);
    }
    let mut out = conv3x3_fwd_plan(x, wmat, bias, d, Plan::new(d, &TILE_BYTES));
    if let Some(s) = skip {
        let per = crate::util::per_chunk(d.n) * d.k * d.hw();
        out.par_chunks_mut(per.max(1))
            .zip(s.par_chunks(per.max(1)))
            .for_each(|(o, s)| {
                for (o, s) in o.iter_mut().zip(s) {
                    *o += *s;
                }
            });
    }
    out
}

fn conv3x3_fwd_plan(
    x: &[f32],
    wmat: &[f32],
    bias: Option<&[f32]>,
    d: ConvDims,
    plan: Plan,
) -> Vec<f32> {
    assert_eq!(x.len(), d.x_len());
    assert_eq!(wmat.len(), d.w_len());
    if let Some(b) = bias {
        assert_eq!(b.len(), d.k);
    }
    let hw = d.hw();
    let y_len = d.y_len();
    if y_len == 0 {
        return Vec::new();
    }
    if d.c == 0 {
        let mut out = vec![0.0f32; y_len];
        if let Some(b) = bias {
            for (i, row) in out.chunks_exact_mut(hw).enumerate() {
                row.fill(b[i % d.k]);
            }
        }
        return out;
    }
    let col_len = plan.col_len(d);
    let rows = plan.rows;
    let x_img = d.c * hw;
    let y_img = d.k * hw;
    let mut out: Vec<f32> = Vec::with_capacity(y_len);
    {
        let spare = &mut out.spare_capacity_mut()[..y_len];
        match plan.chunk {
            Some(per) => {
                spare
                    .par_chunks_mut(per * y_img)
                    .zip(x.par_chunks(per * x_img))
                    .for_each(|(o, xs)| {
                        with_scratch(col_len, |col| {
                            for (oi, xi) in o.chunks_exact_mut(y_img).zip(xs.chunks_exact(x_img)) {
                                fwd_one(xi, wmat, bias, oi, col, d, (rows, Parallelism::None));
                            }
                        })
                    });
            }
            None => {
                let par = gemm_par();
                with_scratch(col_len, |col| {
                    for (oi, xi) in spare.chunks_exact_mut(y_img).zip(x.chunks_exact(x_img)) {
                        fwd_one(xi, wmat, bias, oi, col, d, (rows, par));
                    }
                })
            }
        }
    }
    // SAFETY: `fwd_one` wrote every element of each of the `n` chunks of `k·hw`
    // elements (the GEMM writes the whole `k × hw` destination), and the chunks cover
    // `0..y_len` exactly (`y_len = n·k·hw`, the zips pair all `n` images). The capacity
    // is `y_len`.
    unsafe { out.set_len(y_len) };
    out
}

/// Flipped, transposed kernel: `out[ci, ko, 2−i, 2−j] = w[ko, ci, i, j]`, so that the
/// input gradient of the convolution is the forward convolution of the output
/// gradient with `out` (`c × k × 3 × 3`).
pub(crate) fn flip_transpose_weight(w: &[f32], k: usize, c: usize) -> Vec<f32> {
    assert_eq!(w.len(), k * c * 9);
    let mut out = vec![0.0f32; w.len()];
    for ko in 0..k {
        for ci in 0..c {
            let src = &w[(ko * c + ci) * 9..][..9];
            let dst = &mut out[(ci * k + ko) * 9..][..9];
            for (t, v) in src.iter().enumerate() {
                dst[8 - t] = *v;
            }
        }
    }
    out
}

/// Input gradient: `dy` is `n × k × h × w`, `wmat` is `k × c × 3 × 3` (as in the
/// forward); returns `n × c × h × w`.
pub(crate) fn conv3x3_grad_input(dy: &[f32], wmat: &[f32], d: ConvDims) -> Vec<f32> {
    let wt = flip_transpose_weight(wmat, d.k, d.c);
    let dt = ConvDims {
        n: d.n,
        c: d.k,
        k: d.c,
        h: d.h,
        w: d.w,
    };
    conv3x3_fwd(dy, &wt, None, dt)
}

/// `dw (k × 9c) (+)= lhs (k × tp) · colᵀ` with one GEMM: `lhs` row-major with row
/// stride `lhs.1`, `col` the row-major `9c × tp` matrix with row stride `ld` (`cols`
/// = `(tp, ld)`); `dw` row-major `k × 9c`, overwritten unless `accumulate`.
///
/// # Safety
/// `lhs.0` must point at `k` rows of `tp` readable floats `lhs.1` apart, and `col` hold
/// at least `(9c − 1)·ld + tp` floats; neither may overlap `dw`.
unsafe fn gemm_dw(
    dw: &mut [f32],
    d: ConvDims,
    lhs: (*const f32, usize),
    col: &[f32],
    (tp, ld): (usize, usize),
    accumulate: bool,
    par: Parallelism,
) {
    let kd = d.kdim();
    assert!(dw.len() == d.k * kd && ld >= tp && col.len() >= (kd - 1) * ld + tp);
    // SAFETY: dst is `k × 9c` row-major in `dw` (len checked) and initialised; the lhs
    // is as the caller guarantees; the rhs is `tp × 9c`, read as the transpose of the
    // row-major `9c × tp` matrix in `col` (element (r, j) at `j·ld + r`, len checked).
    unsafe {
        gemm::gemm(
            d.k,
            kd,
            tp,
            dw.as_mut_ptr(),
            1,
            kd as isize,
            accumulate,
            lhs.0,
            1,
            lhs.1 as isize,
            col.as_ptr(),
            ld as isize,
            1,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            par,
        );
    }
}

/// Output pixels per GEMM below which [`wgrad_images`] gathers several images into one
/// GEMM ([`wgrad_image_groups`]).
const WGRAD_GROUP_PIXELS: usize = 256;

/// Accumulates `dw (k × 9c) (+)= dy (k × g·hw) · im2col(x)ᵀ` over groups of `g` whole
/// images (`g·hw ≈` [`WGRAD_GROUP_PIXELS`]), their `dy` rows and im2col columns side by
/// side: for small images one GEMM per image would have an inner dimension of `hw`
/// (16 at 4×4) and read and write all of `dw` for every image. `dw` is overwritten by
/// the first group.
fn wgrad_image_groups(xs: &[f32], dys: &[f32], dw: &mut [f32], d: ConvDims, par: Parallelism) {
    let hw = d.hw();
    let kd = d.kdim();
    let (x_img, y_img) = (d.c * hw, d.k * hw);
    let n = xs.len() / x_img;
    assert!(dw.len() == d.k * kd && dys.len() == n * y_img && n >= 1);
    let g = (WGRAD_GROUP_PIXELS / hw).clamp(1, n);
    let mut dyp = vec![0.0f32; d.k * g * hw];
    with_scratch(kd * g * hw, |col| {
        let mut first = true;
        for i0 in (0..n).step_by(g) {
            let gi = g.min(n - i0);
            let ld = gi * hw;
            for j in 0..gi {
                let xi = &xs[(i0 + j) * x_img..][..x_img];
                im2col_rows_ld(xi, (d.c, d.h, d.w), (0, d.h), &mut col[j * hw..], ld);
                let dyi = &dys[(i0 + j) * y_img..][..y_img];
                for ko in 0..d.k {
                    dyp[ko * ld + j * hw..][..hw].copy_from_slice(&dyi[ko * hw..][..hw]);
                }
            }
            // SAFETY: `dyp` holds the row-major `k × ld` matrix (len k·g·hw ≥ k·ld) and
            // `col` the row-major `9c × ld` one (len 9c·g·hw ≥ 9c·ld).
            unsafe { gemm_dw(dw, d, (dyp.as_ptr(), ld), col, (ld, ld), !first, par) };
            first = false;
        }
    });
}

/// Accumulates `dw (k × 9c) (+)= dy_img (k × hw) · im2col(x_img)ᵀ` over the given
/// images, in tiles of output rows. `dw` is overwritten by the first tile.
fn wgrad_images(
    xs: &[f32],
    dys: &[f32],
    dw: &mut [f32],
    col: &mut [f32],
    d: ConvDims,
    rows: usize,
    par: Parallelism,
) {
    let hw = d.hw();
    let kd = d.kdim();
    let x_img = d.c * hw;
    let y_img = d.k * hw;
    assert!(rows >= 1);
    assert!(dw.len() == d.k * kd && col.len() >= kd * rows * d.w);
    assert!(xs.len() / x_img == dys.len() / y_img);
    let mut first = true;
    for (xi, dyi) in xs.chunks_exact(x_img).zip(dys.chunks_exact(y_img)) {
        let mut oh0 = 0;
        while oh0 < d.h {
            let oh1 = (oh0 + rows).min(d.h);
            let tp = (oh1 - oh0) * d.w;
            im2col_rows(xi, d.c, d.h, d.w, oh0, oh1, col);
            // SAFETY: the lhs is the `k × tp` block at column `oh0·w` of the row-major
            // `k × hw` matrix `dyi` (len k·hw by chunking, last element
            // `(k−1)·hw + oh1·w − 1`); `col` holds the row-major `9c × tp` tile (len ≥
            // 9c·rows·w checked).
            unsafe {
                gemm_dw(
                    dw,
                    d,
                    (dyi.as_ptr().add(oh0 * d.w), hw),
                    col,
                    (tp, tp),
                    !first,
                    par,
                )
            };
            first = false;
            oh0 = oh1;
        }
    }
}

/// Weight gradient: `x` is `n × c × h × w`, `dy` is `n × k × h × w`; returns
/// `k × c × 3 × 3`.
/// Uses Winograd F(4×4, 3×3) where module `winograd` supports the sizes, else
/// im2col + GEMM.
pub(crate) fn conv3x3_grad_weight(x: &[f32], dy: &[f32], d: ConvDims) -> Vec<f32> {
    conv3x3_grad_weight_fused(x, None, dy, d)
}

/// [`conv3x3_grad_weight`] for the input `pro(x)` (when given): the Winograd kernel maps
/// the input as it pads it, im2col maps it first.
pub(crate) fn conv3x3_grad_weight_fused(
    x: &[f32],
    pro: Option<Prologue<'_>>,
    dy: &[f32],
    d: ConvDims,
) -> Vec<f32> {
    if crate::winograd::grad_weight_supported(d) {
        return crate::winograd::conv3x3_grad_weight(x, pro, dy, d);
    }
    if crate::winograd::wgrad_gemm_pays(d) {
        return crate::winograd::conv3x3_grad_weight_gemm(x, pro, dy, d);
    }
    if let Some(p) = pro {
        let xp = p.apply(x, d);
        return conv3x3_grad_weight_plan(&xp, dy, d, Plan::new(d, &TILE_BYTES_WGRAD));
    }
    conv3x3_grad_weight_plan(x, dy, d, Plan::new(d, &TILE_BYTES_WGRAD))
}

fn conv3x3_grad_weight_plan(x: &[f32], dy: &[f32], d: ConvDims, plan: Plan) -> Vec<f32> {
    assert_eq!(x.len(), d.x_len());
    assert_eq!(dy.len(), d.y_len());
    let w_len = d.w_len();
    let mut dw = vec![0.0f32; w_len];
    if w_len == 0 || d.n == 0 || d.hw() == 0 {
        return dw;
    }
    let hw = d.hw();
    let col_len = plan.col_len(d);
    let rows = plan.rows;
    let x_img = d.c * hw;
    let y_img = d.k * hw;
    let grouped = 2 * hw <= WGRAD_GROUP_PIXELS;
    match plan.chunk {
        Some(per) => {
            let partials: Vec<Vec<f32>> = x
                .par_chunks(per * x_img)
                .zip(dy.par_chunks(per * y_img))
                .map(|(xs, dys)| {
                    let mut part = vec![0.0f32; w_len];
                    if grouped {
                        wgrad_image_groups(xs, dys, &mut part, d, Parallelism::None);
                    } else {
                        with_scratch(col_len, |col| {
                            wgrad_images(xs, dys, &mut part, col, d, rows, Parallelism::None)
                        });
                    }
                    part
                })
                .collect();
            for p in &partials {
                for (a, b) in dw.iter_mut().zip(p) {
                    *a += *b;
                }
            }
        }
        None => {
            let par = gemm_par();
            if grouped {
                wgrad_image_groups(x, dy, &mut dw, d, par);
            } else {
                with_scratch(col_len, |col| {
                    wgrad_images(x, dy, &mut dw, col, d, rows, par)
                });
            }
        }
    }
    dw
}

/// Bias gradient: `dy` is `n × k × hw`; returns the `k` sums over batch and space
/// (accumulated in f64).
pub(crate) fn bias_grad(dy: &[f32], n: usize, k: usize, hw: usize) -> Vec<f32> {
    assert_eq!(dy.len(), n * k * hw);
    (0..k)
        .into_par_iter()
        .with_min_len(k.div_ceil(num_threads()).max(1))
        .map(|ko| {
            let mut s = 0.0f64;
            for ni in 0..n {
                let row = &dy[(ni * k + ko) * hw..][..hw];
                // f32 partial sums over 8 lanes, widened per row: cheap and accurate.
                let mut acc = [0.0f32; 8];
                let mut chunks = row.chunks_exact(8);
                for ch in &mut chunks {
                    for (a, v) in acc.iter_mut().zip(ch) {
                        *a += *v;
                    }
                }
                let mut r: f64 = acc.iter().map(|&a| a as f64).sum();
                r += chunks.remainder().iter().map(|&v| v as f64).sum::<f64>();
                s += r;
            }
            s as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], w: &[f32], b: Option<&[f32]>, d: ConvDims) -> Vec<f32> {
        let (h, wd) = (d.h as isize, d.w as isize);
        let mut out = vec![0.0f32; d.y_len()];
        for n in 0..d.n {
            for k in 0..d.k {
                for oh in 0..h {
                    for ow in 0..wd {
                        let mut s = b.map_or(0.0, |b| b[k]) as f64;
                        for c in 0..d.c {
                            for i in 0..3isize {
                                for j in 0..3isize {
                                    let (ih, iw) = (oh + i - 1, ow + j - 1);
                                    if ih < 0 || iw < 0 || ih >= h || iw >= wd {
                                        continue;
                                    }
                                    let xv =
                                        x[((n * d.c + c) * d.h + ih as usize) * d.w + iw as usize];
                                    let wv = w[((k * d.c + c) * 3 + i as usize) * 3 + j as usize];
                                    s += (xv * wv) as f64;
                                }
                            }
                        }
                        out[((n * d.k + k) * d.h + oh as usize) * d.w + ow as usize] = s as f32;
                    }
                }
            }
        }
        out
    }

    fn pseudo(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn forward_matches_naive() {
        for &(n, c, k, h, w) in &[
            (1, 1, 1, 1, 1),
            (2, 3, 5, 5, 7),
            (3, 2, 4, 1, 6),
            (5, 4, 3, 6, 2),
        ] {
            let d = ConvDims { n, c, k, h, w };
            let x = pseudo(d.x_len(), 1);
            let wm = pseudo(d.w_len(), 2);
            let b = pseudo(k, 3);
            let got = conv3x3_fwd(&x, &wm, Some(&b), d);
            let want = naive(&x, &wm, Some(&b), d);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-5, "{d:?}: {g} vs {e}");
            }
            let got = conv3x3_fwd(&x, &wm, None, d);
            let want = naive(&x, &wm, None, d);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-5, "{d:?}: {g} vs {e}");
            }
        }
    }

    fn naive_wgrad(x: &[f32], dy: &[f32], d: ConvDims) -> Vec<f32> {
        let (h, wd) = (d.h as isize, d.w as isize);
        let mut dw = vec![0.0f64; d.w_len()];
        for n in 0..d.n {
            for k in 0..d.k {
                for c in 0..d.c {
                    for i in 0..3isize {
                        for j in 0..3isize {
                            let mut s = 0.0f64;
                            for oh in 0..h {
                                for ow in 0..wd {
                                    let (ih, iw) = (oh + i - 1, ow + j - 1);
                                    if ih < 0 || iw < 0 || ih >= h || iw >= wd {
                                        continue;
                                    }
                                    let xv =
                                        x[((n * d.c + c) * d.h + ih as usize) * d.w + iw as usize];
                                    let g =
                                        dy[((n * d.k + k) * d.h + oh as usize) * d.w + ow as usize];
                                    s += (xv * g) as f64;
                                }
                            }
                            dw[((k * d.c + c) * 3 + i as usize) * 3 + j as usize] += s;
                        }
                    }
                }
            }
        }
        dw.into_iter().map(|v| v as f32).collect()
    }

    /// Every tiling (1 row per tile up to the whole image) and both threading modes.
    #[test]
    fn all_plans_agree_with_naive() {
        let d = ConvDims {
            n: 5,
            c: 3,
            k: 4,
            h: 7,
            w: 6,
        };
        let x = pseudo(d.x_len(), 4);
        let wm = pseudo(d.w_len(), 5);
        let b = pseudo(d.k, 6);
        let dy = pseudo(d.y_len(), 7);
        let want = naive(&x, &wm, Some(&b), d);
        let want_dw = naive_wgrad(&x, &dy, d);
        for rows in [1, 2, 3, 6, 7] {
            for chunk in [None, Some(1), Some(2), Some(3), Some(5)] {
                let plan = Plan { rows, chunk };
                let got = conv3x3_fwd_plan(&x, &wm, Some(&b), d, plan);
                for (g, e) in got.iter().zip(&want) {
                    assert!((g - e).abs() < 1e-5, "{plan:?}: {g} vs {e}");
                }
                let got = conv3x3_grad_weight_plan(&x, &dy, d, plan);
                for (g, e) in got.iter().zip(&want_dw) {
                    assert!((g - e).abs() < 1e-4, "{plan:?}: {g} vs {e}");
                }
            }
        }
    }

    #[test]
    fn zero_sizes() {
        let d = ConvDims {
            n: 2,
            c: 0,
            k: 3,
            h: 2,
            w: 2,
        };
        let out = conv3x3_fwd(&[], &[], Some(&[1.0, 2.0, 3.0]), d);
        assert_eq!(out.len(), 24);
        assert_eq!(out[4], 2.0);
        assert_eq!(out[12], 1.0);
        let d = ConvDims {
            n: 0,
            c: 2,
            k: 3,
            h: 2,
            w: 2,
        };
        assert!(conv3x3_fwd(&[], &[0.0; 54], None, d).is_empty());
        assert_eq!(conv3x3_grad_weight(&[], &[], d), vec![0.0; 54]);
    }
}
