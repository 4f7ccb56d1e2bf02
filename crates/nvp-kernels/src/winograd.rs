//! Winograd F(4×4, 3×3) for the 3×3, stride 1, padding 1 convolution (Lavin & Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2016).
//!
//! Each 4×4 block of outputs ("tile") is computed from the 6×6 input patch around it
//! as `Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A`, summed over input channels. Summing over
//! channels inside the transformed domain turns the convolution into 36 independent
//! matrix products `M[ξ] (K × T) = U[ξ] (K × C) · V[ξ] (C × T)` over the tiles `T`:
//! 36 multiplies per 16 outputs instead of 144 — 4× fewer than im2col + GEMM, paid
//! for with the two transforms (linear in the data, cheap) and a slightly larger
//! rounding error (the transforms' constants go up to 8 and 1/24; measured against
//! candle's direct convolution in `tests/conv.rs`).
//!
//! Layout: tiles are numbered over the whole batch (image, tile row, tile column) and
//! processed in blocks of `nb` tiles (a multiple of [`NR`]) chosen so that a block's
//! transformed input `V` (36 × C × nb) and product `M` (36 × K × nb) stay in L2.
//! Blocks are spread over rayon's pool; each writes a disjoint set of output tiles.
//! The products use an AVX2/FMA 6 × 16 register-blocked micro-kernel where the CPU
//! has it (detected at run time) and a portable loop elsewhere; with a
//! [`crate::Bf16Products`] guard alive on the calling thread and a CPU with
//! AVX512-BF16, the products of all three convolutions take bf16 operands instead
//! ([`crate::bf16`]). The transforms work on groups of 8 tiles at once so that they
//! vectorise.

// The transforms index small fixed-size arrays by position; loops over indices read
// closer to the formulas than iterator chains.
#![allow(clippy::needless_range_loop)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rayon::prelude::*;

use crate::kernels::{ConvDims, Prologue};
use crate::util::{with_scratch, with_weight_scratch};

/// Rows of `U`/`M` (output channels) per micro-kernel tile.
pub(crate) const MR: usize = 6;
/// Columns (tiles) per micro-kernel tile.
const NR: usize = 16;
/// Tiles per transform group.
const G8: usize = 8;

/// Byte budget of one block's `V` and `M` buffers together.
pub(crate) static BLOCK_BYTES: AtomicUsize = AtomicUsize::new(640 * 1024);
/// Forces the portable kernels (as on a CPU without AVX2: the forward and input
/// gradient by Winograd with portable loops, the weight gradient by im2col), so that
/// the tests can check them on any machine.
pub(crate) static PORTABLE: AtomicBool = AtomicBool::new(false);
/// Compiles the AVX2 blocks with AVX-512 F/VL enabled where the CPU has them (true,
/// the default): the same instructions on 256-bit vectors, the same bits, but 32
/// vector registers instead of 16, so that the transforms' 36 values of a tile spill
/// less. See [`wide`].
pub(crate) static AVX512: AtomicBool = AtomicBool::new(true);
/// Outputs of at least this many bytes (a core's L2 cache, which they could not stay
/// in) are written by the AVX2 blocks with non-temporal stores (see [`Job::stream`]).
/// `nvp bench`, `cifar10-small`, img/s, never → from 4 MiB → always, two interleaved
/// rounds: training f32 86.1 / 81.3 → 91.0 / 83.6 → 92.5 / 85.1, bf16 102.0 / 101.8 →
/// 107.1 / 106.7 → 106.1 / 107.3; evaluation 298.6 / 300.3 → 330.5 / 327.0 → 337.6 /
/// 330.8; sampling 307.6 / 286.8 → 324.2 / 303.3 → 335.4 / 314.7. `cifar10` bf16
/// training 21.6 / 21.1 → 22.0 / 21.9 → 21.6 / 22.1, evaluation 57.8 / 57.7 → 60.9 /
/// 61.6 → 60.5 / 61.2; `imagenet64` (batch 32) unchanged within its noise.
pub(crate) static STREAM_BYTES: AtomicUsize = AtomicUsize::new(1 << 20);
/// The weight gradient's block budget, as a multiple of [`BLOCK_BYTES`].
pub(crate) static WGRAD_BLOCK_FACTOR: AtomicUsize = AtomicUsize::new(4);
/// Takes the Winograd weight gradient wherever it can run, also where
/// [`wgrad_pays`] prefers im2col + GEMM (so that the tests reach it on small sizes).
pub(crate) static WGRAD_ALWAYS: AtomicBool = AtomicBool::new(false);

/// `1/6` in f64: the one constant of `G` that is not a power of two.
const SIXTH: f64 = 1.0 / 6.0;

/// `G v` for one column/row `(a, b, c)` of a 3×3 kernel (6 values), in f64.
///
/// `G = [1/4 0 0; -1/6 -1/6 -1/6; -1/6 1/6 -1/6; 1/24 1/12 1/6; 1/24 -1/12 1/6; 0 0 1]`,
/// evaluated as `((a/4 + c) ± b/2) / 6` for rows 3 and 4: the scalings by powers of two
/// are exact, so each row costs one multiplication by (the f64 nearest) 1/6 and no
/// division (slow in f64). The result differs from exact division's by at most the
/// final rounding to f32 (in about 0.25 % of values, by one unit in the last place).
#[inline(always)]
fn g_rows(a: f64, b: f64, c: f64) -> [f64; 6] {
    let (ac, q, hb) = (a + c, 0.25 * a + c, 0.5 * b);
    [
        0.25 * a,
        -(ac + b) * SIXTH,
        -(ac - b) * SIXTH,
        (q + hb) * SIXTH,
        (q - hb) * SIXTH,
        c,
    ]
}

/// [`g_rows`] on `L` kernels at once, lane by lane (the same operations as one kernel at
/// a time, so the same bits; laid out so that the compiler vectorises across lanes).
#[inline(always)]
fn g_rows_lanes<const L: usize>(g0: [f64; L], g1: [f64; L], g2: [f64; L]) -> [[f64; L]; 6] {
    let mut o = [[0.0f64; L]; 6];
    for l in 0..L {
        let v = g_rows(g0[l], g1[l], g2[l]);
        for i in 0..6 {
            o[i][l] = v[i];
        }
    }
    o
}

/// `G g Gᵀ` (6×6, row-major) of `L` 3×3 kernels `g[l]`, computed in f64 and rounded once.
#[inline(always)]
fn transform_kernels<const L: usize>(g: [&[f32]; L]) -> [[f32; L]; 36] {
    let at = |i: usize| -> [f64; L] { std::array::from_fn(|l| g[l][i] as f64) };
    // gg[i][col] = (G g)[i][col]
    let mut gg = [[[0.0f64; L]; 3]; 6];
    for col in 0..3 {
        let v = g_rows_lanes(at(col), at(3 + col), at(6 + col));
        for (i, row) in gg.iter_mut().enumerate() {
            row[col] = v[i];
        }
    }
    let mut out = [[0.0f32; L]; 36];
    for (i, row) in gg.iter().enumerate() {
        let v = g_rows_lanes(row[0], row[1], row[2]);
        for (j, val) in v.iter().enumerate() {
            for l in 0..L {
                out[i * 6 + j][l] = val[l] as f32;
            }
        }
    }
    out
}

/// Floats of [`transform_weights_into`]'s output for `k` output and `c` input channels.
fn transformed_len(k: usize, c: usize) -> usize {
    36 * k.div_ceil(MR) * c * MR
}

/// Input channels per chunk of [`transform_weights_into`]: a chunk's `36 × CB × MR`
/// values (27 KB) are gathered in a local buffer and then written out as 36 contiguous
/// runs, instead of 36 interleaved streams of `MR` floats.
const TW_CB: usize = 32;

/// Writes the transformed weights `U[ξ] = (G g Gᵀ)[ξ]` into `u` ([`transformed_len`]
/// floats), packed for the micro-kernel as `[ξ][kb][c][MR]` (`kb` = block of `MR`
/// output channels; rows past `k` are zero). Computed in f64 and rounded once; each
/// block of `MR` output channels is one parallel task, [`MR`] kernels at a time.
fn transform_weights_into(w: &[f32], k: usize, c: usize, u: &mut [f32]) {
    assert_eq!(w.len(), k * c * 9);
    assert_eq!(u.len(), transformed_len(k, c));
    let up = OutPtr(u.as_mut_ptr());
    (0..k.div_ceil(MR))
        .into_par_iter()
        .for_each(|kb| transform_weights_block(w, k, c, kb, &up));
}

crate::util::multiversion! {
    /// Task `kb` of [`transform_weights_into`]: the `MR` output channels from `kb·MR`.
    /// (Compiled twice, for the baseline and for AVX2: the same operations, so the same
    /// bits.)
    fn transform_weights_block(w: &[f32], k: usize, c: usize, kb: usize, up: &OutPtr) -> () {
        let kbn = k.div_ceil(MR);
        let mut buf = [[[0.0f32; MR]; TW_CB]; 36];
        for c0 in (0..c).step_by(TW_CB) {
            let cb = TW_CB.min(c - c0);
            for j in 0..cb {
                let ci = c0 + j;
                // The MR kernels (kb·MR + r, ci); rows past `k` transform a zero kernel.
                const ZERO: [f32; 9] = [0.0; 9];
                let g: [&[f32]; MR] = std::array::from_fn(|r| {
                    let ko = kb * MR + r;
                    if ko < k {
                        &w[(ko * c + ci) * 9..][..9]
                    } else {
                        &ZERO[..]
                    }
                });
                let t = transform_kernels(g);
                for (xi, vals) in t.iter().enumerate() {
                    buf[xi][j] = *vals;
                }
            }
            for (xi, rows) in buf.iter().enumerate() {
                // SAFETY: task `kb` writes the cb·MR floats from ((ξ·kbn + kb)·c + c0)·MR
                // for every ξ and chunk c0: disjoint from every other task's, inside the
                // `transformed_len(k, c)` floats at `up`, which outlive the tasks.
                unsafe {
                    let dst = up.0.add(((xi * kbn + kb) * c + c0) * MR);
                    std::ptr::copy_nonoverlapping(rows.as_ptr().cast::<f32>(), dst, cb * MR);
                }
            }
        }
    }
}

/// [`transform_weights_into`] a new vector.
#[cfg(test)]
fn transform_weights(w: &[f32], k: usize, c: usize) -> Vec<f32> {
    let mut u = vec![0.0f32; transformed_len(k, c)];
    transform_weights_into(w, k, c, &mut u);
    u
}

/// Floats between the matrices of consecutive ξ in `V`/`M` for `rows` rows of `nbp`
/// tiles: padded by one cache line so that the 36 matrices do not start at multiples
/// of 4 KiB, which map to the same L1 sets (a precaution: the difference was within
/// the machine's noise in the benchmarks).
#[inline(always)]
fn xs(rows: usize, nbp: usize) -> usize {
    rows * nbp + SKEW
}

/// See [`xs`].
const SKEW: usize = 16;

type V8 = [f32; G8];

/// `Bᵀ d` on six vectors of 8 lanes.
#[inline(always)]
fn bt(d: [V8; 6]) -> [V8; 6] {
    let mut o = [[0.0f32; G8]; 6];
    for l in 0..G8 {
        let (d0, d1, d2, d3, d4, d5) = (d[0][l], d[1][l], d[2][l], d[3][l], d[4][l], d[5][l]);
        o[0][l] = 4.0 * d0 - 5.0 * d2 + d4;
        o[1][l] = -4.0 * (d1 + d2) + d3 + d4;
        o[2][l] = 4.0 * (d1 - d2) - d3 + d4;
        o[3][l] = 2.0 * (d3 - d1) - d2 + d4;
        o[4][l] = 2.0 * (d1 - d3) - d2 + d4;
        o[5][l] = 4.0 * d1 - 5.0 * d3 + d5;
    }
    o
}

/// `Aᵀ m` on six vectors of 8 lanes.
#[inline(always)]
fn at(m: [V8; 6]) -> [V8; 4] {
    let mut o = [[0.0f32; G8]; 4];
    for l in 0..G8 {
        let (m0, m1, m2, m3, m4, m5) = (m[0][l], m[1][l], m[2][l], m[3][l], m[4][l], m[5][l]);
        let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        o[0][l] = m0 + s12 + s34;
        o[1][l] = d12 + 2.0 * d34;
        o[2][l] = s12 + 4.0 * s34;
        o[3][l] = d12 + 8.0 * d34 + m5;
    }
    o
}

/// Where tile `t` (global index) lies: image, top row, left column of its outputs.
#[derive(Clone, Copy)]
struct Tiles {
    th: usize,
    tw: usize,
}

impl Tiles {
    /// The 4×4 output tiles of one image of `d` (partial ones at the bottom and right).
    fn of(d: ConvDims) -> Self {
        Tiles {
            th: d.h.div_ceil(4),
            tw: d.w.div_ceil(4),
        }
    }

    /// Tiles of the whole batch of `d`.
    fn total(&self, d: ConvDims) -> usize {
        d.n * self.th * self.tw
    }

    #[inline(always)]
    fn coords(&self, t: usize) -> (usize, usize, usize) {
        let per = self.th * self.tw;
        let (img, r) = (t / per, t % per);
        (img, 4 * (r / self.tw), 4 * (r % self.tw))
    }

    /// [`Tiles::coords`] of the `L` tiles `first + step·l`, `None` from `end` on.
    #[inline(always)]
    fn group<const L: usize>(
        &self,
        first: usize,
        step: usize,
        end: usize,
    ) -> [Option<(usize, usize, usize)>; L] {
        std::array::from_fn(|l| {
            let t = first + step * l;
            (t < end).then(|| self.coords(t))
        })
    }
}

/// What the output transform adds to each output: the bias of its channel, then the
/// element of `skip` at the same place (a fused residual connection).
#[derive(Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub skip: Option<&'a [f32]>,
}

/// What the blocks of one forward convolution share: the input, the packed transformed
/// weights, the epilogue, the sizes, the tiling and the output.
#[derive(Clone, Copy)]
struct Job<'a> {
    x: &'a [f32],
    /// Applied to `x` while it is padded (AVX2 transforms only; see `conv3x3_fwd`).
    pro: Option<Prologue<'a>>,
    u: &'a [f32],
    /// `u` packed in bf16 pairs when the block's products run in bf16
    /// ([`crate::bf16`]).
    ub: Option<&'a [u32]>,
    ep: Epilogue<'a>,
    d: ConvDims,
    tiles: Tiles,
    out: OutPtr,
    /// Write the output with non-temporal stores where aligned (the output is larger
    /// than [`STREAM_BYTES`], so it leaves the caches anyway): no read of each line
    /// before it is written.
    stream: bool,
}

/// Output pointer shared by the blocks; each block writes disjoint tiles.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: the blocks write disjoint elements (see `conv3x3_fwd`); the pointer is only
// dereferenced inside the scoped parallel loop while the buffer is alive.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// Input transform of one block: `v[ξ][c][j] = (Bᵀ d B)[ξ]` for the tiles
/// `t0 + j`, `j < nbp` (tiles past `t_end` are zero).
#[inline(always)]
fn input_transform(
    x: &[f32],
    pro: Option<Prologue<'_>>,
    d: ConvDims,
    tiles: Tiles,
    (t0, t_end): (usize, usize),
    v: &mut [f32],
    nbp: usize,
) {
    let (h, w, c) = (d.h as isize, d.w as isize, d.c);
    let hw = d.hw();
    for g in (0..nbp).step_by(G8) {
        // Coordinates of the 8 tiles of this group (None past the end).
        let coords: [_; G8] = tiles.group(t0 + g, 1, t_end);
        for ci in 0..c {
            let map = pro.map(|p| p.channel(ci));
            // Gather the 6×6 patches: p[a][b][lane].
            let mut p = [[[0.0f32; G8]; 6]; 6];
            for (l, co) in coords.iter().enumerate() {
                let Some((img, oy, ox)) = *co else { continue };
                let plane = &x[(img * c + ci) * hw..][..hw];
                for (a, prow) in p.iter_mut().enumerate() {
                    let y = oy as isize - 1 + a as isize;
                    if y < 0 || y >= h {
                        continue;
                    }
                    let row = &plane[(y as usize) * d.w..][..d.w];
                    // The prologue maps the image's values; the zero padding stays zero.
                    let get = |v: f32| map.map_or(v, |m| Prologue::map(m, v));
                    let x0 = ox as isize - 1;
                    if x0 >= 0 && x0 + 6 <= w {
                        let src = &row[x0 as usize..][..6];
                        for b in 0..6 {
                            prow[b][l] = get(src[b]);
                        }
                    } else {
                        for (b, cell) in prow.iter_mut().enumerate() {
                            let xx = x0 + b as isize;
                            if xx >= 0 && xx < w {
                                cell[l] = get(row[xx as usize]);
                            }
                        }
                    }
                }
            }
            // Columns: t1[i][b] = (Bᵀ d)[i][b].
            let mut t1 = [[[0.0f32; G8]; 6]; 6];
            for b in 0..6 {
                let col = bt([p[0][b], p[1][b], p[2][b], p[3][b], p[4][b], p[5][b]]);
                for i in 0..6 {
                    t1[i][b] = col[i];
                }
            }
            // Rows: V[i][j] = (t1 B)[i][j].
            for (i, row) in t1.iter().enumerate() {
                let r = bt(*row);
                for (j, val) in r.iter().enumerate() {
                    let dst = &mut v[(i * 6 + j) * xs(c, nbp) + ci * nbp + g..][..G8];
                    dst.copy_from_slice(val);
                }
            }
        }
    }
}

/// `A m` on four vectors of 8 lanes (`A` is 6×4: the adjoint of [`at`]).
#[inline(always)]
fn a6(y: [V8; 4]) -> [V8; 6] {
    let mut o = [[0.0f32; G8]; 6];
    for l in 0..G8 {
        let (y0, y1, y2, y3) = (y[0][l], y[1][l], y[2][l], y[3][l]);
        let (e, od) = (y0 + y2, y1 + y3);
        let (e4, o8) = (y0 + 4.0 * y2, 2.0 * y1 + 8.0 * y3);
        o[0][l] = y0;
        o[1][l] = e + od;
        o[2][l] = e - od;
        o[3][l] = e4 + o8;
        o[4][l] = e4 - o8;
        o[5][l] = y3;
    }
    o
}

/// Output-gradient transform of one block for any `tw`: `dm[ξ][k][j] = (A dY Aᵀ)[ξ]`
/// for the 4×4 tiles `t0 + j` of `dy` (zero outside the image), lanes in the order of
/// [`input_transform`] (tile `t0 + j` in lane `j`).
fn grad_output_transform(
    dy: &[f32],
    d: ConvDims,
    tiles: Tiles,
    (t0, t_end): (usize, usize),
    dm: &mut [f32],
    nbp: usize,
) {
    let hw = d.hw();
    for g in (0..nbp).step_by(G8) {
        let coords: [_; G8] = tiles.group(t0 + g, 1, t_end);
        for ko in 0..d.k {
            // p[a][b][lane]: row a, column b of the 8 tiles' output gradients.
            let mut p = [[[0.0f32; G8]; 4]; 4];
            for (l, co) in coords.iter().enumerate() {
                let Some((img, oy, ox)) = *co else { continue };
                let plane = &dy[(img * d.k + ko) * hw..][..hw];
                for (a, prow) in p.iter_mut().enumerate() {
                    if oy + a >= d.h {
                        break;
                    }
                    let row = &plane[(oy + a) * d.w..][..d.w];
                    for (b, cell) in prow.iter_mut().enumerate() {
                        if ox + b < d.w {
                            cell[l] = row[ox + b];
                        }
                    }
                }
            }
            // Columns: t3[i][b] = (A dY)[i][b]; rows: dM[i][j] = (t3 Aᵀ)[i][j].
            let mut t3 = [[[0.0f32; G8]; 4]; 6];
            for b in 0..4 {
                let col = a6([p[0][b], p[1][b], p[2][b], p[3][b]]);
                for i in 0..6 {
                    t3[i][b] = col[i];
                }
            }
            for (i, row) in t3.iter().enumerate() {
                let r = a6(*row);
                for (j, val) in r.iter().enumerate() {
                    let dst = &mut dm[(i * 6 + j) * xs(d.k, nbp) + ko * nbp + g..][..G8];
                    dst.copy_from_slice(val);
                }
            }
        }
    }
}

/// Output transform of one block: `y = Aᵀ M A (+ bias)` for the tiles `t0 + j`,
/// written (cropped to the image) through `out`.
///
/// # Safety
/// `out` must point to an `n × k × h × w` buffer that no one else writes the tiles
/// `t0..t_end` of.
#[inline(always)]
unsafe fn output_transform(
    m: &[f32],
    kpad: usize,
    job: &Job<'_>,
    (t0, t_end): (usize, usize),
    nbp: usize,
) {
    let Job {
        ep, d, tiles, out, ..
    } = *job;
    let hw = d.hw();
    for g in (0..nbp).step_by(G8) {
        if t0 + g >= t_end {
            break;
        }
        let coords: [_; G8] = tiles.group(t0 + g, 1, t_end);
        for ko in 0..d.k {
            let mut mm = [[[0.0f32; G8]; 6]; 6];
            for (i, row) in mm.iter_mut().enumerate() {
                for (j, cell) in row.iter_mut().enumerate() {
                    cell.copy_from_slice(&m[(i * 6 + j) * xs(kpad, nbp) + ko * nbp + g..][..G8]);
                }
            }
            // Columns: t2[a][j] = (Aᵀ M)[a][j].
            let mut t2 = [[[0.0f32; G8]; 6]; 4];
            for j in 0..6 {
                let col = at([mm[0][j], mm[1][j], mm[2][j], mm[3][j], mm[4][j], mm[5][j]]);
                for a in 0..4 {
                    t2[a][j] = col[a];
                }
            }
            let bv = ep.bias.map_or(0.0, |b| b[ko]);
            for (a, row) in t2.iter().enumerate() {
                let y4 = at(*row);
                for (l, co) in coords.iter().enumerate() {
                    let Some((img, oy, ox)) = *co else { continue };
                    let yy = oy + a;
                    if yy >= d.h {
                        continue;
                    }
                    let base = (img * d.k + ko) * hw + yy * d.w + ox;
                    let nb = (d.w - ox).min(4);
                    for (b, y4b) in y4.iter().enumerate().take(nb) {
                        // SAFETY: `base + b` is pixel (yy, ox + b) of plane (img, ko),
                        // inside the buffer (yy < h, ox + b < w); this tile is ours.
                        unsafe {
                            *out.0.add(base + b) = match ep.skip {
                                Some(sk) => (y4b[l] + bv) + sk[base + b],
                                None => y4b[l] + bv,
                            }
                        };
                    }
                }
            }
        }
    }
}

/// `m[ξ] (kpad × nbp) = u[ξ] (kpad × c) · v[ξ] (c × nbp)` for all 36 ξ, portable.
#[inline(always)]
fn products_generic(u: &[f32], v: &[f32], m: &mut [f32], c: usize, kpad: usize, nbp: usize) {
    let kbn = kpad / MR;
    for xi in 0..36 {
        let vx = &v[xi * xs(c, nbp)..][..c * nbp];
        for kb in 0..kbn {
            let ub = &u[(xi * kbn + kb) * c * MR..][..c * MR];
            for r in 0..MR {
                let dst = &mut m[xi * xs(kpad, nbp) + (kb * MR + r) * nbp..][..nbp];
                dst.fill(0.0);
                for ci in 0..c {
                    let a = ub[ci * MR + r];
                    let src = &vx[ci * nbp..][..nbp];
                    for (o, s) in dst.iter_mut().zip(src) {
                        *o += a * s;
                    }
                }
            }
        }
    }
}

/// AVX2/FMA version of [`products_generic`]: 6 × 16 register tiles.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `nbp` a multiple of 16, `kpad` of 6, and the
/// slices at least `36·kpad·c`, `36·c·nbp`, `36·kpad·nbp` long.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
unsafe fn products_avx2(u: &[f32], v: &[f32], m: &mut [f32], c: usize, kpad: usize, nbp: usize) {
    use std::arch::x86_64::*;
    let kbn = kpad / MR;
    assert!(nbp.is_multiple_of(NR) && kpad.is_multiple_of(MR));
    assert!(
        u.len() >= 36 * kpad * c && v.len() >= 36 * xs(c, nbp) && m.len() >= 36 * xs(kpad, nbp)
    );
    let (up, vp, mp) = (u.as_ptr(), v.as_ptr(), m.as_mut_ptr());
    for xi in 0..36 {
        let vx = vp.add(xi * xs(c, nbp));
        for kb in 0..kbn {
            let ub = up.add((xi * kbn + kb) * c * MR);
            let mrow = mp.add(xi * xs(kpad, nbp) + kb * MR * nbp);
            let mut j = 0;
            while j < nbp {
                let mut acc = [_mm256_setzero_ps(); 12];
                let mut vc = vx.add(j);
                let mut uc = ub;
                for _ in 0..c {
                    let v0 = _mm256_loadu_ps(vc);
                    let v1 = _mm256_loadu_ps(vc.add(8));
                    for r in 0..MR {
                        let a = _mm256_broadcast_ss(&*uc.add(r));
                        acc[2 * r] = _mm256_fmadd_ps(a, v0, acc[2 * r]);
                        acc[2 * r + 1] = _mm256_fmadd_ps(a, v1, acc[2 * r + 1]);
                    }
                    vc = vc.add(nbp);
                    uc = uc.add(MR);
                }
                for r in 0..MR {
                    let dst = mrow.add(r * nbp + j);
                    _mm256_storeu_ps(dst, acc[2 * r]);
                    _mm256_storeu_ps(dst.add(8), acc[2 * r + 1]);
                }
                j += NR;
            }
        }
    }
}

/// AVX2 transforms for images whose tile columns come in pairs (`⌈w/4⌉` even).
///
/// A group of 8 tiles is 4 pairs of horizontally adjacent tiles; the 8 floats of a
/// pair's patch row are one load, and a 4×4 transpose inside each 128-bit lane
/// (`tr4`) turns 4 such loads into the 4 patch columns of the 8 tiles, in the
/// lane order (p0.0, p1.0, p2.0, p3.0, p0.1, p1.1, p2.1, p3.1). The output transform
/// applies the same transpose (an involution) to get each pair's 8 output floats of a
/// row back in place, so that the order never leaves the block.
#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    use super::{xs, Job, Tiles, G8};
    use crate::kernels::{ConvDims, Prologue};

    /// How many output-gradient channels ahead [`grad_output_transform`] prefetches
    /// the rows it will read (its loop visits every channel of a group of tiles, one
    /// plane apart: a stride the hardware prefetcher does not follow). Weight gradient
    /// alone, ms, none → 2 → 4 channels ahead, interleaved: (64, 32, 32, 32×32)
    /// 3.90 / 3.87 → 3.56 / 3.57 → 3.61 / 3.59; (64, 64, 64, 32×32) with bf16
    /// products 8.77 / 8.80 → 8.24 / 8.12 → 8.01 / 7.81; (64, 64, 64, 16×16) 2.91 /
    /// 2.89 (2 ahead) → 2.82 / 2.76.
    const PD: usize = 4;

    /// 4×4 transpose within each 128-bit lane (its own inverse).
    #[inline(always)]
    unsafe fn tr4(r0: __m256, r1: __m256, r2: __m256, r3: __m256) -> [__m256; 4] {
        let a0 = _mm256_castps_pd(_mm256_unpacklo_ps(r0, r1));
        let a1 = _mm256_castps_pd(_mm256_unpackhi_ps(r0, r1));
        let a2 = _mm256_castps_pd(_mm256_unpacklo_ps(r2, r3));
        let a3 = _mm256_castps_pd(_mm256_unpackhi_ps(r2, r3));
        [
            _mm256_castpd_ps(_mm256_unpacklo_pd(a0, a2)),
            _mm256_castpd_ps(_mm256_unpackhi_pd(a0, a2)),
            _mm256_castpd_ps(_mm256_unpacklo_pd(a1, a3)),
            _mm256_castpd_ps(_mm256_unpackhi_pd(a1, a3)),
        ]
    }

    #[inline(always)]
    unsafe fn bt(d: [__m256; 6]) -> [__m256; 6] {
        let c4 = _mm256_set1_ps(4.0);
        let c5 = _mm256_set1_ps(5.0);
        let c2 = _mm256_set1_ps(2.0);
        let [d0, d1, d2, d3, d4, d5] = d;
        let s12 = _mm256_add_ps(d1, d2);
        let m12 = _mm256_sub_ps(d1, d2);
        let d31 = _mm256_sub_ps(d3, d1);
        let d4m2 = _mm256_sub_ps(d4, d2);
        [
            // 4 d0 − 5 d2 + d4
            _mm256_fmadd_ps(c4, d0, _mm256_fnmadd_ps(c5, d2, d4)),
            // −4 (d1 + d2) + d3 + d4
            _mm256_fnmadd_ps(c4, s12, _mm256_add_ps(d3, d4)),
            // 4 (d1 − d2) − d3 + d4
            _mm256_fmadd_ps(c4, m12, _mm256_sub_ps(d4, d3)),
            // 2 (d3 − d1) − d2 + d4
            _mm256_fmadd_ps(c2, d31, d4m2),
            // 2 (d1 − d3) − d2 + d4
            _mm256_fnmadd_ps(c2, d31, d4m2),
            // 4 d1 − 5 d3 + d5
            _mm256_fmadd_ps(c4, d1, _mm256_fnmadd_ps(c5, d3, d5)),
        ]
    }

    #[inline(always)]
    unsafe fn at(m: [__m256; 6]) -> [__m256; 4] {
        let c2 = _mm256_set1_ps(2.0);
        let c4 = _mm256_set1_ps(4.0);
        let c8 = _mm256_set1_ps(8.0);
        let [m0, m1, m2, m3, m4, m5] = m;
        let s12 = _mm256_add_ps(m1, m2);
        let d12 = _mm256_sub_ps(m1, m2);
        let s34 = _mm256_add_ps(m3, m4);
        let d34 = _mm256_sub_ps(m3, m4);
        [
            _mm256_add_ps(_mm256_add_ps(m0, s12), s34),
            _mm256_fmadd_ps(c2, d34, d12),
            _mm256_fmadd_ps(c4, s34, s12),
            _mm256_add_ps(_mm256_fmadd_ps(c8, d34, d12), m5),
        ]
    }

    /// Padded planes of one channel for the images a block touches: `(4·th + 2)` rows
    /// of `wp = 4·tw + 4` floats, input pixel (y, x) at padded (y + 1, x + 1), zero
    /// elsewhere. Only the rows the block's tiles read are filled.
    pub(super) struct Pad {
        pub rows: usize,
        pub wp: usize,
    }

    impl Pad {
        pub fn new(tiles: Tiles) -> Self {
            Pad {
                rows: 4 * tiles.th + 2,
                wp: 4 * tiles.tw + 4,
            }
        }
        pub fn plane_len(&self) -> usize {
            self.rows * self.wp
        }
    }

    /// `dst.copy_from_slice(src)` without a call to `memmove` (rows are short: a call
    /// per row cost as much as the copy).
    ///
    /// # Safety
    /// The CPU must support AVX (callers are compiled with AVX2 enabled).
    #[inline(always)]
    unsafe fn copy_inline(src: &[f32], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        let n8 = src.len() / 8 * 8;
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        let mut i = 0;
        // SAFETY: both slices hold at least `n8` floats and do not overlap. The
        // `black_box` keeps LLVM from turning the loop back into a `memcpy` call.
        while i < n8 {
            _mm256_storeu_ps(std::hint::black_box(dp.add(i)), _mm256_loadu_ps(sp.add(i)));
            i += 8;
        }
        for j in n8..src.len() {
            *std::hint::black_box(dp.add(j)) = src[j];
        }
    }

    /// `dst[i] = max((src[i] − m)·a + s, 0)`: [`Prologue::map`] 8 at a time, the same
    /// operations in the same order (no FMA), so the same bits. `max_ps(z, 0)` returns
    /// 0 for a NaN `z`, as `f32::max` does.
    ///
    /// # Safety
    /// As [`copy_inline`].
    #[inline(always)]
    unsafe fn map_inline(src: &[f32], dst: &mut [f32], (m, a, s): (f32, f32, f32)) {
        assert_eq!(src.len(), dst.len());
        let n8 = src.len() / 8 * 8;
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        let (vm, va, vs, z) = (
            _mm256_set1_ps(m),
            _mm256_set1_ps(a),
            _mm256_set1_ps(s),
            _mm256_setzero_ps(),
        );
        let mut i = 0;
        while i < n8 {
            let t = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(sp.add(i)), vm), va);
            _mm256_storeu_ps(dp.add(i), _mm256_max_ps(_mm256_add_ps(t, vs), z));
            i += 8;
        }
        for j in n8..src.len() {
            *dp.add(j) = Prologue::map((m, a, s), src[j]);
        }
    }

    /// Fills the padded rows `pr0..pr1` of one plane from `plane` (`h × w`), mapped by
    /// the prologue's `(centre, mult, shift)` of this channel when given.
    ///
    /// # Safety
    /// As [`copy_inline`].
    #[inline(always)]
    unsafe fn fill_rows(
        plane: &[f32],
        pro: Option<(f32, f32, f32)>,
        d: ConvDims,
        pad: &Pad,
        dst: &mut [f32],
        (pr0, pr1): (usize, usize),
    ) {
        for pr in pr0..pr1 {
            let row = &mut dst[pr * pad.wp..][..pad.wp];
            if pr >= 1 && pr <= d.h {
                row[0] = 0.0;
                let src = &plane[(pr - 1) * d.w..][..d.w];
                match pro {
                    Some(p) => map_inline(src, &mut row[1..=d.w], p),
                    None => copy_inline(src, &mut row[1..=d.w]),
                }
                row[d.w + 1..].fill(0.0);
            } else {
                row.fill(0.0);
            }
        }
    }

    /// Input transform of a block (see [`super::input_transform`]) for even `tw`.
    ///
    /// `pads` holds one padded plane per image of the block.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) unsafe fn input_transform(
        x: &[f32],
        pro: Option<Prologue<'_>>,
        d: ConvDims,
        tiles: Tiles,
        (t0, t_end): (usize, usize),
        v: &mut [f32],
        nbp: usize,
        pads: &mut [f32],
        pad: &Pad,
    ) {
        let c = d.c;
        let hw = d.hw();
        let per_img = tiles.th * tiles.tw;
        let img0 = t0 / per_img;
        let img1 = (t_end - 1) / per_img + 1;
        let plane_len = pad.plane_len();
        let vp = v.as_mut_ptr();
        for ci in 0..c {
            // Padded planes of this channel for the block's images (needed rows only).
            for img in img0..img1 {
                let first = t0.max(img * per_img) - img * per_img;
                let last = t_end.min((img + 1) * per_img) - img * per_img;
                let pr0 = 4 * (first / tiles.tw);
                let pr1 = 4 * ((last - 1) / tiles.tw) + 6;
                fill_rows(
                    &x[(img * c + ci) * hw..][..hw],
                    pro.map(|p| p.channel(ci)),
                    d,
                    pad,
                    &mut pads[(img - img0) * plane_len..][..plane_len],
                    (pr0, pr1),
                );
                if ci + 1 < c {
                    // The next channel's rows, while this one is transformed. Forward
                    // alone, ms, without → with, two rounds: (64, 64, 64, 32×32) 9.69 /
                    // 9.46 → 8.76 / 8.75, with bf16 products 6.90 / 6.88 → 6.58 / 6.52;
                    // (64, 32, 32, 32×32) 3.51 / 3.51 → 3.35 / 3.29. The addresses are
                    // rows r0..r1 of plane (img, ci + 1), inside `x`.
                    let r0 = pr0.saturating_sub(1);
                    let r1 = (pr1 - 1).min(d.h);
                    let next = x.as_ptr().add((img * c + ci + 1) * hw + r0 * d.w);
                    let mut off = 0;
                    while off < (r1 - r0) * d.w {
                        _mm_prefetch::<_MM_HINT_T0>(next.add(off) as *const i8);
                        off += 16;
                    }
                }
            }
            let pp = pads.as_ptr();
            for g in (0..nbp).step_by(G8) {
                // Base pointers of the 4 pairs (None past the end).
                let base = tiles.group::<4>(t0 + g, 2, t_end).map(|co| {
                    co.map(|(img, oy, ox)| pp.add((img - img0) * plane_len + oy * pad.wp + ox))
                });
                let z = _mm256_setzero_ps();
                let mut dm = [[z; 6]; 6];
                for (a, drow) in dm.iter_mut().enumerate() {
                    let mut r = [z; 4];
                    let mut s = [z; 4];
                    for p in 0..4 {
                        if let Some(b) = base[p] {
                            let q = b.add(a * pad.wp);
                            r[p] = _mm256_loadu_ps(q);
                            s[p] = _mm256_loadu_ps(q.add(4));
                        }
                    }
                    let q = tr4(r[0], r[1], r[2], r[3]);
                    let q2 = tr4(s[0], s[1], s[2], s[3]);
                    *drow = [q[0], q[1], q[2], q[3], q2[0], q2[1]];
                }
                let mut t1 = [[z; 6]; 6];
                for b in 0..6 {
                    let col = bt([dm[0][b], dm[1][b], dm[2][b], dm[3][b], dm[4][b], dm[5][b]]);
                    for i in 0..6 {
                        t1[i][b] = col[i];
                    }
                }
                for (i, row) in t1.iter().enumerate() {
                    let r = bt(*row);
                    for (j, val) in r.iter().enumerate() {
                        _mm256_storeu_ps(vp.add((i * 6 + j) * xs(c, nbp) + ci * nbp + g), *val);
                    }
                }
            }
        }
    }

    /// Output transform of a block for even `tw` (see [`super::output_transform`]).
    #[inline(always)]
    pub(super) unsafe fn output_transform(
        m: &[f32],
        kpad: usize,
        job: &Job<'_>,
        (t0, t_end): (usize, usize),
        nbp: usize,
    ) {
        let Job {
            ep, d, tiles, out, ..
        } = *job;
        let hw = d.hw();
        let mp = m.as_ptr();
        for g in (0..nbp).step_by(G8) {
            if t0 + g >= t_end {
                break;
            }
            let coords: [_; 4] = tiles.group(t0 + g, 2, t_end);
            for ko in 0..d.k {
                let mut mm = [[_mm256_setzero_ps(); 6]; 6];
                for (i, row) in mm.iter_mut().enumerate() {
                    for (j, cell) in row.iter_mut().enumerate() {
                        *cell = _mm256_loadu_ps(mp.add((i * 6 + j) * xs(kpad, nbp) + ko * nbp + g));
                    }
                }
                let mut t2 = [[_mm256_setzero_ps(); 6]; 4];
                for j in 0..6 {
                    let col = at([mm[0][j], mm[1][j], mm[2][j], mm[3][j], mm[4][j], mm[5][j]]);
                    for a in 0..4 {
                        t2[a][j] = col[a];
                    }
                }
                let bv = _mm256_set1_ps(ep.bias.map_or(0.0, |b| b[ko]));
                for (a, row) in t2.iter().enumerate() {
                    let y = at(*row);
                    let o = tr4(
                        _mm256_add_ps(y[0], bv),
                        _mm256_add_ps(y[1], bv),
                        _mm256_add_ps(y[2], bv),
                        _mm256_add_ps(y[3], bv),
                    );
                    for (p, co) in coords.iter().enumerate() {
                        let Some((img, oy, ox)) = *co else { continue };
                        let yy = oy + a;
                        if yy >= d.h {
                            continue;
                        }
                        let off = (img * d.k + ko) * hw + yy * d.w + ox;
                        let dst = out.0.add(off);
                        if ox + 8 <= d.w {
                            let v = match ep.skip {
                                Some(sk) => {
                                    _mm256_add_ps(o[p], _mm256_loadu_ps(sk.as_ptr().add(off)))
                                }
                                None => o[p],
                            };
                            if job.stream && (dst as usize).is_multiple_of(32) {
                                _mm256_stream_ps(dst, v);
                            } else {
                                _mm256_storeu_ps(dst, v);
                            }
                        } else {
                            let mut tmp = [0.0f32; 8];
                            _mm256_storeu_ps(tmp.as_mut_ptr(), o[p]);
                            for (b, val) in tmp.iter().enumerate().take(d.w - ox) {
                                let v = match ep.skip {
                                    Some(sk) => *val + sk[off + b],
                                    None => *val,
                                };
                                *std::hint::black_box(dst.add(b)) = v;
                            }
                        }
                    }
                }
            }
        }
    }

    /// `A y` for one column of a 4×4 output-gradient tile (6 values): the adjoint of
    /// [`at`].
    #[inline(always)]
    unsafe fn a6(y: [__m256; 4]) -> [__m256; 6] {
        let c2 = _mm256_set1_ps(2.0);
        let c4 = _mm256_set1_ps(4.0);
        let c8 = _mm256_set1_ps(8.0);
        let [y0, y1, y2, y3] = y;
        let e = _mm256_add_ps(y0, y2); // even part
        let o = _mm256_add_ps(y1, y3); // odd part
        let e4 = _mm256_fmadd_ps(c4, y2, y0);
        let o8 = _mm256_fmadd_ps(c8, y3, _mm256_mul_ps(c2, y1));
        [
            y0,
            _mm256_add_ps(e, o),
            _mm256_sub_ps(e, o),
            _mm256_add_ps(e4, o8),
            _mm256_sub_ps(e4, o8),
            y3,
        ]
    }

    /// Loads 8 floats at `p` of which `avail` (≥ 1) exist; the rest read as zero.
    #[inline(always)]
    unsafe fn load_part(p: *const f32, avail: usize) -> __m256 {
        if avail >= 8 {
            _mm256_loadu_ps(p)
        } else {
            let mut tmp = [0.0f32; 8];
            std::ptr::copy_nonoverlapping(p, tmp.as_mut_ptr(), avail);
            _mm256_loadu_ps(tmp.as_ptr())
        }
    }

    /// Output-gradient transform of a block (even `tw`): `dm[ξ][k][j] = (A dY Aᵀ)[ξ]`
    /// for the 4×4 tiles of `dy` (zero outside the image), lanes in the order of
    /// [`input_transform`].
    #[inline(always)]
    pub(super) unsafe fn grad_output_transform(
        dy: &[f32],
        d: ConvDims,
        tiles: Tiles,
        (t0, t_end): (usize, usize),
        dm: &mut [f32],
        nbp: usize,
    ) {
        let hw = d.hw();
        let dp = dm.as_mut_ptr();
        let yp = dy.as_ptr();
        for g in (0..nbp).step_by(G8) {
            let coords: [_; 4] = tiles.group(t0 + g, 2, t_end);
            for ko in 0..d.k {
                let z = _mm256_setzero_ps();
                // rows[a][b]: output-gradient row a, column b of the 8 tiles.
                let mut rows = [[z; 4]; 4];
                for (a, row) in rows.iter_mut().enumerate() {
                    let mut r = [z; 4];
                    for (p, co) in coords.iter().enumerate() {
                        let Some((img, oy, ox)) = *co else { continue };
                        if oy + a < d.h {
                            let src = yp.add((img * d.k + ko) * hw + (oy + a) * d.w + ox);
                            r[p] = load_part(src, d.w - ox);
                            if ko + PD < d.k {
                                // The same row of plane (img, ko + PD), inside `dy`.
                                _mm_prefetch::<_MM_HINT_T0>(src.add(PD * hw) as *const i8);
                            }
                        }
                    }
                    *row = tr4(r[0], r[1], r[2], r[3]);
                }
                // Columns: t3[i][b] = (A dY)[i][b].
                let mut t3 = [[z; 4]; 6];
                for b in 0..4 {
                    let col = a6([rows[0][b], rows[1][b], rows[2][b], rows[3][b]]);
                    for i in 0..6 {
                        t3[i][b] = col[i];
                    }
                }
                for (i, row) in t3.iter().enumerate() {
                    let r = a6(*row);
                    for (j, val) in r.iter().enumerate() {
                        _mm256_storeu_ps(dp.add((i * 6 + j) * xs(d.k, nbp) + ko * nbp + g), *val);
                    }
                }
            }
        }
    }

    /// Sums of the 8 lanes of 4 vectors, as one 4-lane vector.
    #[inline(always)]
    unsafe fn hsum4(a: __m256, b: __m256, c: __m256, d: __m256) -> __m128 {
        let h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1))
    }

    #[inline(always)]
    unsafe fn hsum(a: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let s = _mm_hadd_ps(s, s);
        _mm_cvtss_f32(_mm_hadd_ps(s, s))
    }

    /// `du[r][q] += Σ_j dm[r][j] · v[q][j]` for `KR` rows of `dm` and `CR` rows of `v`
    /// (each `nbp` long, a multiple of 8); `du` row stride `ldu`.
    #[inline(always)]
    unsafe fn dot_tile<const KR: usize, const CR: usize>(
        dm: *const f32,
        v: *const f32,
        nbp: usize,
        du: *mut f32,
        ldu: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); CR]; KR];
        let mut j = 0;
        while j < nbp {
            let mut av = [_mm256_setzero_ps(); KR];
            for (r, a) in av.iter_mut().enumerate() {
                *a = _mm256_loadu_ps(dm.add(r * nbp + j));
            }
            for q in 0..CR {
                let bv = _mm256_loadu_ps(v.add(q * nbp + j));
                for r in 0..KR {
                    acc[r][q] = _mm256_fmadd_ps(av[r], bv, acc[r][q]);
                }
            }
            j += G8;
        }
        for (r, row) in acc.iter().enumerate() {
            let dst = du.add(r * ldu);
            if CR == 4 {
                let s = hsum4(row[0], row[1], row[2], row[3]);
                _mm_storeu_ps(dst, _mm_add_ps(_mm_loadu_ps(dst), s));
            } else {
                for (q, a) in row.iter().enumerate() {
                    *dst.add(q) += hsum(*a);
                }
            }
        }
    }

    /// `KR` rows of `dm` against all `c` rows of `v`: 4 at a time, then one by one.
    #[inline(always)]
    unsafe fn dot_rows<const KR: usize>(
        dm: *const f32,
        v: *const f32,
        du: *mut f32,
        c: usize,
        nbp: usize,
    ) {
        let c4 = c / 4 * 4;
        let mut q = 0;
        while q < c4 {
            dot_tile::<KR, 4>(dm, v.add(q * nbp), nbp, du.add(q), c);
            q += 4;
        }
        while q < c {
            dot_tile::<KR, 1>(dm, v.add(q * nbp), nbp, du.add(q), c);
            q += 1;
        }
    }

    /// 8×8 transpose: lane `i` of output `j` is lane `j` of input `i`.
    #[inline(always)]
    unsafe fn tr8(r: [__m256; 8]) -> [__m256; 8] {
        let t0 = _mm256_unpacklo_ps(r[0], r[1]);
        let t1 = _mm256_unpackhi_ps(r[0], r[1]);
        let t2 = _mm256_unpacklo_ps(r[2], r[3]);
        let t3 = _mm256_unpackhi_ps(r[2], r[3]);
        let t4 = _mm256_unpacklo_ps(r[4], r[5]);
        let t5 = _mm256_unpackhi_ps(r[4], r[5]);
        let t6 = _mm256_unpacklo_ps(r[6], r[7]);
        let t7 = _mm256_unpackhi_ps(r[6], r[7]);
        let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
        let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
        let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
        let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
        let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
        let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
        let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
        let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
        [
            _mm256_permute2f128_ps::<0x20>(s0, s4),
            _mm256_permute2f128_ps::<0x20>(s1, s5),
            _mm256_permute2f128_ps::<0x20>(s2, s6),
            _mm256_permute2f128_ps::<0x20>(s3, s7),
            _mm256_permute2f128_ps::<0x31>(s0, s4),
            _mm256_permute2f128_ps::<0x31>(s1, s5),
            _mm256_permute2f128_ps::<0x31>(s2, s6),
            _mm256_permute2f128_ps::<0x31>(s3, s7),
        ]
    }

    /// Input channels per panel of [`wgrad_products_outer`].
    pub(super) const PW: usize = 16;

    /// `panel[j][t] = v[t][j]` for the `cw ≤ PW` rows of `v` (row stride `nbp`, a
    /// multiple of 8), zero for `t ≥ cw`.
    #[inline(always)]
    pub(super) unsafe fn pack_panel(v: *const f32, cw: usize, nbp: usize, panel: *mut f32) {
        let z = _mm256_setzero_ps();
        for h in 0..PW / 8 {
            let t0 = h * 8;
            let mut j = 0;
            while j < nbp {
                let rows: [__m256; 8] = std::array::from_fn(|i| {
                    if t0 + i < cw {
                        _mm256_loadu_ps(v.add((t0 + i) * nbp + j))
                    } else {
                        z
                    }
                });
                let cols = tr8(rows);
                for (i, col) in cols.iter().enumerate() {
                    _mm256_storeu_ps(panel.add((j + i) * PW + t0), *col);
                }
                j += 8;
            }
        }
    }

    /// `du[r][t] += Σ_j dm[r][j] · panel[j][t]` for `R` rows of `dm` (stride `nbp`)
    /// and the panel's first `cw` columns; `du` row stride `ldu`. The `R × 16` sums stay
    /// in registers over all `j`.
    #[inline(always)]
    unsafe fn outer_tile<const R: usize>(
        dm: *const f32,
        nbp: usize,
        panel: *const f32,
        du: *mut f32,
        ldu: usize,
        cw: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for j in 0..nbp {
            let p0 = _mm256_loadu_ps(panel.add(j * PW));
            let p1 = _mm256_loadu_ps(panel.add(j * PW + 8));
            for (i, a) in acc.iter_mut().enumerate() {
                let b = _mm256_broadcast_ss(&*dm.add(i * nbp + j));
                a[0] = _mm256_fmadd_ps(b, p0, a[0]);
                a[1] = _mm256_fmadd_ps(b, p1, a[1]);
            }
        }
        for (i, a) in acc.iter().enumerate() {
            let dst = du.add(i * ldu);
            if cw == PW {
                _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), a[0]));
                _mm256_storeu_ps(dst.add(8), _mm256_add_ps(_mm256_loadu_ps(dst.add(8)), a[1]));
            } else {
                let mut t = [0.0f32; PW];
                _mm256_storeu_ps(t.as_mut_ptr(), a[0]);
                _mm256_storeu_ps(t.as_mut_ptr().add(8), a[1]);
                for (q, v) in t.iter().take(cw).enumerate() {
                    *dst.add(q) += *v;
                }
            }
        }
    }

    /// As [`wgrad_products`], in outer-product form: for each ξ and each run of
    /// [`PW`] input channels, the run of `v[ξ]` transposed into `panel` (`nbp × PW`),
    /// then 6 rows of `dm[ξ]` at a time against it.
    #[inline(always)]
    pub(super) unsafe fn wgrad_products_outer(
        dm: &[f32],
        v: &[f32],
        du: &mut [f32],
        (k, c, nbp): (usize, usize, usize),
        panel: &mut [f32],
    ) {
        assert!(
            dm.len() >= 36 * xs(k, nbp) && v.len() >= 36 * xs(c, nbp) && du.len() >= 36 * k * c
        );
        assert!(panel.len() >= nbp * PW && nbp.is_multiple_of(8));
        let (mp, vp, up, pp) = (dm.as_ptr(), v.as_ptr(), du.as_mut_ptr(), panel.as_mut_ptr());
        let k6 = k / 6 * 6;
        for xi in 0..36 {
            let m = mp.add(xi * xs(k, nbp));
            let vv = vp.add(xi * xs(c, nbp));
            let u = up.add(xi * k * c);
            let mut q = 0;
            while q < c {
                let cw = PW.min(c - q);
                pack_panel(vv.add(q * nbp), cw, nbp, pp);
                let mut r = 0;
                while r < k6 {
                    outer_tile::<6>(m.add(r * nbp), nbp, pp, u.add(r * c + q), c, cw);
                    r += 6;
                }
                while r < k {
                    outer_tile::<1>(m.add(r * nbp), nbp, pp, u.add(r * c + q), c, cw);
                    r += 1;
                }
                q += PW;
            }
        }
    }

    /// `du[ξ] (k × c) += dm[ξ] (k × nbp) · v[ξ]ᵀ (nbp × c)` for all 36 ξ: `KR` rows of
    /// `dm` at a time (3, or 6 where 32 vector registers hold the 24 accumulators),
    /// then 3, then 1. Each element of `du` is the same sum in the same order whatever
    /// `KR`: the same bits.
    #[inline(always)]
    pub(super) unsafe fn wgrad_products<const KR: usize>(
        dm: &[f32],
        v: &[f32],
        du: &mut [f32],
        k: usize,
        c: usize,
        nbp: usize,
    ) {
        assert!(
            dm.len() >= 36 * xs(k, nbp) && v.len() >= 36 * xs(c, nbp) && du.len() >= 36 * k * c
        );
        let (mp, vp, up) = (dm.as_ptr(), v.as_ptr(), du.as_mut_ptr());
        let kr = k / KR * KR;
        let k3 = kr + (k - kr) / 3 * 3;
        for xi in 0..36 {
            let m = mp.add(xi * xs(k, nbp));
            let vv = vp.add(xi * xs(c, nbp));
            let u = up.add(xi * k * c);
            let mut r = 0;
            while r < kr {
                dot_rows::<KR>(m.add(r * nbp), vv, u.add(r * c), c, nbp);
                r += KR;
            }
            while r < k3 {
                dot_rows::<3>(m.add(r * nbp), vv, u.add(r * c), c, nbp);
                r += 3;
            }
            while r < k {
                dot_rows::<1>(m.add(r * nbp), vv, u.add(r * c), c, nbp);
                r += 1;
            }
        }
    }
}

/// One block: transforms, products, output transform.
///
/// # Safety
/// As [`output_transform`]; with `avx2` true the CPU must support AVX2 and FMA.
#[inline(always)]
unsafe fn block(job: &Job<'_>, span: (usize, usize), nbp: usize, scratch: &mut [f32], avx2: bool) {
    let Job { x, u, d, tiles, .. } = *job;
    let kpad = d.k.div_ceil(MR) * MR;
    let (v, m) = scratch.split_at_mut(36 * xs(d.c, nbp));
    input_transform(x, job.pro, d, tiles, span, v, nbp);
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        products_fast(job, v, m, kpad, nbp);
    } else {
        products_generic(u, v, m, d.c, kpad, nbp);
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = avx2;
        products_generic(u, v, m, d.c, kpad, nbp);
    }
    output_transform(m, kpad, job, span, nbp);
}

/// One block on AVX2/FMA, for even `tw`: the AVX2 transforms of module [`avx`] and
/// the AVX2 products; compiled by [`block_avx2`] and [`block_avx512`].
///
/// # Safety
/// As [`block`]; the CPU must support AVX2 and FMA; `tiles.tw` must be even and
/// `scratch` hold `V`, `M` and [`pad_len`] floats.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn block_even(job: &Job<'_>, span: (usize, usize), nbp: usize, scratch: &mut [f32]) {
    let Job {
        x, pro, d, tiles, ..
    } = *job;
    let kpad = d.k.div_ceil(MR) * MR;
    let (v, rest) = scratch.split_at_mut(36 * xs(d.c, nbp));
    let (m, pads) = rest.split_at_mut(36 * xs(kpad, nbp));
    let pad = avx::Pad::new(tiles);
    avx::input_transform(x, pro, d, tiles, span, v, nbp, pads, &pad);
    products_fast(job, v, m, kpad, nbp);
    avx::output_transform(m, kpad, job, span, nbp);
    if job.stream {
        // The non-temporal stores are weakly ordered: visible before the block's end
        // is signalled to the other threads.
        std::arch::x86_64::_mm_sfence();
    }
}

/// [`block_even`] compiled for AVX2/FMA.
///
/// # Safety
/// As [`block_even`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2(job: &Job<'_>, span: (usize, usize), nbp: usize, scratch: &mut [f32]) {
    block_even(job, span, nbp, scratch)
}

/// [`block_even`] compiled with AVX-512 F/VL enabled as well (see [`AVX512`]).
/// Kernels alone, ms, AVX2 → this, two interleaved rounds each: (64, 64, 64, 32×32)
/// forward 10.07 / 14.97 → 9.59 / 9.69, input gradient 9.24 / 9.32 → 9.15 / 9.07;
/// with bf16 products forward 7.06 / 7.11 → 6.84 / 6.90, input gradient 6.56 / 6.58
/// → 6.42 / 6.31.
///
/// # Safety
/// As [`block_even`]; the CPU must also support AVX-512 F and VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn block_avx512(job: &Job<'_>, span: (usize, usize), nbp: usize, scratch: &mut [f32]) {
    block_even(job, span, nbp, scratch)
}

/// The products of a block on a CPU with AVX2/FMA: bf16 where the job carries packed
/// bf16 weights (the CPU then has AVX512-BF16), else f32.
///
/// # Safety
/// The CPU must support AVX2 and FMA, and AVX512-BF16 when `job.ub` is set; `v` and
/// `m` as [`products_avx2`] takes them.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn products_fast(job: &Job<'_>, v: &mut [f32], m: &mut [f32], kpad: usize, nbp: usize) {
    let c = job.d.c;
    match job.ub {
        Some(ub) => {
            assert!(v.len() >= 36 * xs(c, nbp) && m.len() >= 36 * xs(kpad, nbp));
            crate::bf16::pack_v(v.as_mut_ptr(), c, nbp, xs(c, nbp));
            crate::bf16::products(
                ub,
                v.as_ptr(),
                xs(c, nbp),
                m.as_mut_ptr(),
                xs(kpad, nbp),
                (c, kpad, nbp),
            );
        }
        None => products_avx2(job.u, v, m, c, kpad, nbp),
    }
}

/// [`block`] compiled with AVX2/FMA enabled (odd `tw`): portable transforms that
/// vectorise 8-wide, AVX2 products.
///
/// # Safety
/// As [`block`]; the CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2_generic(job: &Job<'_>, span: (usize, usize), nbp: usize, scratch: &mut [f32]) {
    block(job, span, nbp, scratch, true)
}

/// Floats of padded planes a block of `nb` tiles needs (AVX2 path): one plane per
/// image it can touch.
fn pad_len(tiles: Tiles, nb: usize) -> usize {
    let per_img = tiles.th * tiles.tw;
    let imgs = nb / per_img.max(1) + 2;
    imgs * (4 * tiles.th + 2) * (4 * tiles.tw + 4)
}

/// Accumulates the transformed-domain weight gradient of the blocks `b0..b1` into `du`
/// (`36 × k × c`): the AVX2 transforms of module [`avx`] for an even `tw`, else the
/// portable ones (8 tiles per vector, compiled with AVX2/FMA); the AVX2 products.
/// Compiled by [`wgrad_blocks_avx2`] and [`wgrad_blocks_avx512`].
///
/// # Safety
/// The CPU must support AVX2 and FMA; `scratch` must hold `V`, `dM` and [`pad_len`]
/// floats for blocks of `nb` tiles.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn wgrad_blocks<const KR: usize>(
    (x, pro): (&[f32], Option<Prologue<'_>>),
    dy: &[f32],
    d: ConvDims,
    tiles: Tiles,
    (b0, b1, nb, total): (usize, usize, usize, usize),
    scratch: &mut [f32],
    du: &mut [f32],
    bf16: bool,
) {
    let even = tiles.tw.is_multiple_of(2);
    let pad = avx::Pad::new(tiles);
    let outer = wgrad_outer(d);
    let mut panel = [0.0f32; 512 * avx::PW];
    for bi in b0..b1 {
        let t0 = bi * nb;
        let span = (t0, (t0 + nb).min(total));
        let nbp = (span.1 - t0).div_ceil(NR) * NR;
        let (v, rest) = scratch.split_at_mut(36 * xs(d.c, nbp));
        let (dm, pads) = rest.split_at_mut(36 * xs(d.k, nbp));
        if even {
            avx::input_transform(x, pro, d, tiles, span, v, nbp, pads, &pad);
            avx::grad_output_transform(dy, d, tiles, span, dm, nbp);
        } else {
            input_transform(x, pro, d, tiles, span, v, nbp);
            grad_output_transform(dy, d, tiles, span, dm, nbp);
        }
        if bf16 {
            wgrad_products_bf16(dm, v, du, (d.k, d.c, nbp), &mut panel);
        } else if outer {
            avx::wgrad_products_outer(dm, v, du, (d.k, d.c, nbp), &mut panel);
        } else {
            avx::wgrad_products::<KR>(dm, v, du, d.k, d.c, nbp);
        }
    }
}

/// The arguments of [`wgrad_blocks`], as its two compilations take them.
#[cfg(target_arch = "x86_64")]
type WgradArgs<'a, 'b> = (
    (&'a [f32], Option<Prologue<'a>>),
    &'a [f32],
    ConvDims,
    Tiles,
    (usize, usize, usize, usize),
    &'b mut [f32],
    &'b mut [f32],
    bool,
);

/// [`wgrad_blocks`] compiled for AVX2/FMA.
///
/// # Safety
/// As [`wgrad_blocks`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn wgrad_blocks_avx2((xp, dy, d, tiles, span, scratch, du, bf16): WgradArgs<'_, '_>) {
    wgrad_blocks::<3>(xp, dy, d, tiles, span, scratch, du, bf16)
}

/// [`wgrad_blocks`] compiled with AVX-512 F/VL enabled as well (see [`AVX512`]).
/// Kernels alone, weight gradient, ms, AVX2 → this, two interleaved rounds: (64, 32,
/// 32, 32×32) 4.33 / 4.35 → 3.78 / 3.77, (64, 64, 64, 32×32) 11.12 / 11.07 → 10.14 /
/// 10.20, with bf16 products 9.26 / 9.26 → 8.32 / 8.28.
///
/// # Safety
/// As [`wgrad_blocks`]; the CPU must also support AVX-512 F and VL.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512vl")]
unsafe fn wgrad_blocks_avx512((xp, dy, d, tiles, span, scratch, du, bf16): WgradArgs<'_, '_>) {
    wgrad_blocks::<6>(xp, dy, d, tiles, span, scratch, du, bf16)
}

/// The weight gradient's products `dU[ξ] += dM[ξ] · V[ξ]ᵀ` with bf16 operands and f32
/// sums ([`crate::bf16`]), in outer-product form: each `dM[ξ]` rounded in place to
/// pairs of tiles, each run of 16 input channels of `V[ξ]` transposed into `panel` and
/// paired the same way, then 12 (4, 1) rows of `dM[ξ]` at a time against it.
///
/// # Safety
/// The CPU must support AVX2, FMA and AVX-512 F/BW/VL/BF16; `nbp` a multiple of 16;
/// the slices as [`avx::wgrad_products_outer`] takes them.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn wgrad_products_bf16(
    dm: &mut [f32],
    v: &[f32],
    du: &mut [f32],
    (k, c, nbp): (usize, usize, usize),
    panel: &mut [f32],
) {
    use crate::bf16::outer_tile;
    assert!(dm.len() >= 36 * xs(k, nbp) && v.len() >= 36 * xs(c, nbp) && du.len() >= 36 * k * c);
    assert!(panel.len() >= nbp * avx::PW && nbp.is_multiple_of(NR));
    let (mp, vp, up, pp) = (
        dm.as_mut_ptr(),
        v.as_ptr(),
        du.as_mut_ptr(),
        panel.as_mut_ptr(),
    );
    for xi in 0..36 {
        let m = mp.add(xi * xs(k, nbp));
        crate::bf16::pack_rows(m, k, nbp);
        let vv = vp.add(xi * xs(c, nbp));
        let u = up.add(xi * k * c);
        let mut q = 0;
        while q < c {
            let cw = avx::PW.min(c - q);
            avx::pack_panel(vv.add(q * nbp), cw, nbp, pp);
            crate::bf16::pair_panel(pp, nbp);
            let mut r = 0;
            while r + 12 <= k {
                outer_tile::<12>(m.add(r * nbp), nbp, pp, u.add(r * c + q), c, cw);
                r += 12;
            }
            while r + 4 <= k {
                outer_tile::<4>(m.add(r * nbp), nbp, pp, u.add(r * c + q), c, cw);
                r += 4;
            }
            while r < k {
                outer_tile::<1>(m.add(r * nbp), nbp, pp, u.add(r * c + q), c, cw);
                r += 1;
            }
            q += avx::PW;
        }
    }
}

/// Whether the weight gradient's products take the outer-product form
/// (`avx::wgrad_products_outer`) rather than dot products with horizontal sums
/// (`avx::wgrad_products`). The outer form keeps a 6 × 16 block of `dU` in registers
/// over all of a block's tiles, but packs each run of 16 input channels first (and pads
/// the last): it pays from 128 channels on both sides. Measured with the
/// `conv_bench_mimalloc` example, weight gradient, ms, dot → outer, interleaved rounds:
/// (N, C, K, H=W) = (64, 128, 128, 16) 17.4 / 16.6 / 16.4 / 16.2 → 13.3 / 11.9 / 14.2 /
/// 14.7, (64, 256, 256, 8) 25.3 / 27.7 → 18.2 / 23.1; but (64, 64, 64, 16) 4.9 / 6.0 /
/// 4.4 → 5.1 / 6.6 / 4.7, (64, 64, 64, 32) 17.7 / 17.1 / 16.3 → 17.2 / 16.2 / 17.1,
/// (64, 7, 64, 32) 5.4 / 5.1 → 6.6 / 6.5.
fn wgrad_outer(d: ConvDims) -> bool {
    d.c >= 128 && d.k >= 128
}

/// `dW = Gᵀ dU G` per (k, c), `dU` the sum of `parts` (each `36 × k × c`) in f64,
/// summed where it is read. Each output channel is one parallel task.
fn dw_from_parts(parts: &[&[f32]], d: ConvDims) -> Vec<f32> {
    for p in parts {
        assert_eq!(p.len(), 36 * d.k * d.c);
    }
    let mut dw = vec![0.0f32; d.w_len()];
    dw.par_chunks_mut(d.c * 9)
        .enumerate()
        .for_each(|(ko, dwk)| dw_row(parts, d.k, d.c, ko, dwk));
    dw
}

/// `Gᵀ m` for a 6-vector `m` (one column or row of `dU`), on `L` lanes: the terms of
/// `Σ_j m[j] G[j][s]` in order of `j`, those with a zero in `G` left out.
#[inline(always)]
fn gt_lanes<const L: usize>(m: [&[f64; L]; 6]) -> [[f64; L]; 3] {
    const S: f64 = 1.0 / 6.0;
    const S12: f64 = 1.0 / 12.0;
    const S24: f64 = 1.0 / 24.0;
    let mut o = [[0.0f64; L]; 3];
    for l in 0..L {
        let (m0, m1, m2, m3, m4, m5) = (m[0][l], m[1][l], m[2][l], m[3][l], m[4][l], m[5][l]);
        o[0][l] = m0 * 0.25 + m1 * -S + m2 * -S + m3 * S24 + m4 * S24;
        o[1][l] = m1 * -S + m2 * S + m3 * S12 + m4 * -S12;
        o[2][l] = m1 * -S + m2 * -S + m3 * S + m4 * S + m5;
    }
    o
}

/// Input channels per group of [`dw_row`]: the lanes of its vectors.
const DW_L: usize = 8;
/// Input channels per chunk of [`dw_row`]: it first sums the chunk's `dU` values of
/// each ξ (runs of `DW_CB` floats) into a local buffer, so that it reads memory in long
/// runs rather than 36 interleaved runs of `DW_L` (which left it waiting on memory).
const DW_CB: usize = 256;

crate::util::multiversion! {
    /// Output channel `ko` of [`dw_from_parts`] into `dwk` (`c × 9`), `DW_L` input
    /// channels at a time. (Compiled for the baseline and for AVX2: the same operations,
    /// so the same bits.)
    fn dw_row(parts: &[&[f32]], k: usize, c: usize, ko: usize, dwk: &mut [f32]) -> () {
        let mut m = [[[0.0f64; DW_L]; DW_CB / DW_L]; 36];
        for c0 in (0..c).step_by(DW_CB) {
            let cb = DW_CB.min(c - c0);
            for (xi, row) in m.iter_mut().enumerate() {
                let flat = row.as_flattened_mut();
                flat.fill(0.0);
                let at = (xi * k + ko) * c + c0;
                for p in parts {
                    for (acc, v) in flat.iter_mut().zip(&p[at..at + cb]) {
                        *acc += *v as f64;
                    }
                }
            }
            for g in 0..cb.div_ceil(DW_L) {
                let cl = DW_L.min(cb - g * DW_L);
                // t[i] = (dU G)[i][·] = Gᵀ of row i of dU.
                let t: [[[f64; DW_L]; 3]; 6] = std::array::from_fn(|i| {
                    gt_lanes(std::array::from_fn(|j| &m[i * 6 + j][g]))
                });
                let mut out = [0.0f32; DW_L * 9];
                for s in 0..3 {
                    // Column s of dW = Gᵀ (column s of t).
                    let col = gt_lanes(std::array::from_fn(|i| &t[i][s]));
                    for (r, vals) in col.iter().enumerate() {
                        for l in 0..DW_L {
                            out[l * 9 + r * 3 + s] = vals[l] as f32;
                        }
                    }
                }
                let ci = c0 + g * DW_L;
                dwk[ci * 9..(ci + cl) * 9].copy_from_slice(&out[..cl * 9]);
            }
        }
    }
}

/// Weight gradient by Winograd for few tiles and many channels: all tiles in one block
/// (portable transforms), then the 36 products `dU[ξ] (k × c) = dM[ξ] · V[ξ]ᵀ` as
/// GEMMs over the tiles, spread over the threads by ξ. Where [`wgrad_pays`] does not
/// hold because the blocks would be small, and [`wgrad_gemm_pays`] does.
pub(crate) fn conv3x3_grad_weight_gemm(
    x: &[f32],
    pro: Option<Prologue<'_>>,
    dy: &[f32],
    d: ConvDims,
) -> Vec<f32> {
    assert_eq!(x.len(), d.x_len());
    assert_eq!(dy.len(), d.y_len());
    if let Some(p) = pro {
        assert!(p.centre.len() == d.c && p.mult.len() == d.c && p.shift.len() == d.c);
    }
    let tiles = Tiles::of(d);
    let total = tiles.total(d);
    let nbp = total.div_ceil(G8) * G8;
    let (mut v, mut dm) = (
        vec![0.0f32; 36 * xs(d.c, nbp)],
        vec![0.0f32; 36 * xs(d.k, nbp)],
    );
    rayon::join(
        || input_transform(x, pro, d, tiles, (0, total), &mut v, nbp),
        || grad_output_transform(dy, d, tiles, (0, total), &mut dm, nbp),
    );
    // dU in the buffer kept for transformed weights (every element is written below).
    with_weight_scratch(36 * d.k * d.c, |du| {
        gemm_products(du, &dm, &v, d, nbp);
        dw_from_parts(&[du], d)
    })
}

/// The 36 products `dU[ξ] (k × c) = dM[ξ] · V[ξ]ᵀ` of [`conv3x3_grad_weight_gemm`] into
/// `du` (`36 × k × c`), spread over the threads by ξ.
fn gemm_products(du: &mut [f32], dm: &[f32], v: &[f32], d: ConvDims, nbp: usize) {
    du.par_chunks_mut(d.k * d.c)
        .enumerate()
        .for_each(|(xi, dst)| {
            let lhs = &dm[xi * xs(d.k, nbp)..][..d.k * nbp];
            let rhs = &v[xi * xs(d.c, nbp)..][..d.c * nbp];
            // SAFETY: dst is `k × c` row-major (len k·c); lhs is `k × nbp` row-major; rhs is
            // `nbp × c` read as the transpose of the row-major `c × nbp` matrix `V[ξ]`
            // (element (j, q) at q·nbp + j). All in bounds by the slices above; dst does not
            // overlap the inputs and is not read (`read_dst` false).
            unsafe {
                gemm::gemm(
                    d.k,
                    d.c,
                    nbp,
                    dst.as_mut_ptr(),
                    1,
                    d.c as isize,
                    false,
                    lhs.as_ptr(),
                    1,
                    nbp as isize,
                    rhs.as_ptr(),
                    nbp as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
        });
}

/// Whether [`conv3x3_grad_weight_gemm`] beats im2col + GEMM: 32 to 512 tiles (its
/// buffers hold all of them; with fewer, the products' inner dimension is too short
/// for writing and transforming the `36·k·c` of them to pay) and `128² ≤ k·c ≤ 512²`.
/// Session 8 (after the faster weight transforms of session 7, and with im2col
/// gathering small images into one GEMM), ms, this / im2col, two rounds: (64, 512, 4)
/// 26.2 / 25.8 against 51.5 / 51.6, (128, 512, 4) 48.4 / 45.6 against 106.6 / 95.4,
/// (64, 512, 8) 73.6 / 69.7 against 164.7 / 128.9; at 32 tiles, this against im2col
/// (both the default in turn): (32, 512, 4) 20.2 / 18.6 against 21.0 / 24.4, (32, 256,
/// 4) 4.9 / 4.6 against 6.9 / 8.6, (8, 512, 8) 23.1 / 24.5 against 23.1 / 26.6.
/// Session 6's figures:
/// Measured (`cargo bench --bench conv`, weight gradient, ms, this / im2col): (N, C=K,
/// H=W) = (64, 128, 4) 3.3 / 5.2, (64, 256, 4) 15.2 / 20.3, (64, 512, 4) 64 / 72 (3
/// interleaved rounds), (128, 512, 4) 86 / 159, (64, 512, 8) 112 / 222, (16, 512, 8)
/// 68 / 75, (16, 128, 8) 3.5 / 3.9, (16, 256, 8) 12.6 / 13.0; not taken: (32, 512, 4)
/// 54 / 39 (32 tiles).
pub(crate) fn wgrad_gemm_pays(d: ConvDims) -> bool {
    let total = Tiles::of(d).total(d);
    crate::winograd_enabled()
        && have_avx2()
        && (32..=512).contains(&total)
        && (128 * 128..=512 * 512).contains(&(d.k * d.c))
}

/// Whether the forward convolution maps its input by a [`Prologue`] while padding it:
/// the AVX2 transforms, for an even number of tile columns. (The weight gradient's
/// sizes, [`grad_weight_supported`], always do.)
pub(crate) fn fuses_prologue(d: ConvDims) -> bool {
    have_avx2() && d.w.div_ceil(4).is_multiple_of(2)
}

/// Whether [`conv3x3_grad_weight`] handles these sizes (AVX2/FMA) and is expected to
/// beat im2col + GEMM on them ([`wgrad_pays`]); otherwise the caller uses im2col.
pub(crate) fn grad_weight_supported(d: ConvDims) -> bool {
    crate::winograd_enabled()
        && have_avx2()
        && d.c >= 1
        && d.k >= 1
        && d.n >= 1
        && d.h >= 1
        && (WGRAD_ALWAYS.load(Ordering::Relaxed) || wgrad_pays(d))
}

/// Whether the Winograd weight gradient is worth it: each block of tiles ends with
/// `36·k·c` sums into the gradient, so it needs blocks of at least 32 tiles (few
/// channels), and at least 4 of them to keep the threads busy
/// ([`wgrad_block_tiles`]). Otherwise im2col + GEMM is faster. Measured with `cargo
/// bench --bench conv`, weight gradient, ms, Winograd / im2col: (N, C=K, H=W) = (64,
/// 512, 8) 436 / 201 (16-tile blocks), (64, 512, 4) 324 / 72, (16, 256, 8) 21.5 / 12.4
/// (2 blocks), (64, 256, 4) 21.0 / 17.6, (64, 128, 8) 6.7 / 13.9 (4 blocks of 64),
/// (64, 64, 12) 6.8 / 7.8.
fn wgrad_pays(d: ConvDims) -> bool {
    let total = Tiles::of(d).total(d);
    let nb = wgrad_block_tiles(d, total);
    nb >= 32 && total >= 4 * nb
}

/// Tiles per block of the Winograd weight gradient: what its byte budget
/// ([`WGRAD_BLOCK_FACTOR`] × [`BLOCK_BYTES`]) holds, or fewer where that leaves fewer
/// than 4 blocks, so that the threads share the work. Before session 14 such sizes
/// went to im2col + GEMM. Measured on a 2-vCPU Zen 4 (`cargo bench --bench conv --
/// --no-ref --reps 11 --shape N,C,K,H,W [--no-winograd]`), weight gradient, ms, these
/// blocks / im2col, (N, C, K, H=W): `cifar10-small`'s 16×16 networks (64, 32, 32, 16)
/// 0.96 / 3.75, (64, 12, 32, 16) 0.41 / 1.38, (64, 32, 24, 16) 0.71 / 3.40;
/// `imagenet32`'s and the 64×64 models' 8×8 ones (64, 64, 64, 8) 0.85 / 2.94, (64, 128,
/// 24, 8) 0.83 / 4.01, (64, 24, 64, 8) 0.49 / 1.27, (64, 64, 48, 8) 0.68 / 2.60, (64,
/// 12, 128, 8) 0.62 / 0.99, (64, 128, 96, 8) 2.24 / 7.20, (64, 48, 128, 8) 1.14 / 3.19.
fn wgrad_block_tiles(d: ConvDims, total: usize) -> usize {
    let budget = BLOCK_BYTES.load(Ordering::Relaxed) * WGRAD_BLOCK_FACTOR.load(Ordering::Relaxed);
    let nb = block_tiles_for(budget, d.c, d.k, total);
    if total >= 4 * nb {
        nb
    } else {
        (total / 4 / NR * NR).clamp(NR, nb)
    }
}

/// Weight gradient by Winograd F(4×4, 3×3): `dU[ξ] = Σ_tiles (A dY Aᵀ)[ξ] ·
/// (Bᵀ d B)[ξ]ᵀ` (the adjoint of the forward products), then `dW = Gᵀ dU G` in f64.
/// `x`: `n × c × h × w`, `dy`: `n × k × h × w`; returns `k × c × 3 × 3`. Only for
/// sizes where [`grad_weight_supported`] holds.
pub(crate) fn conv3x3_grad_weight(
    x: &[f32],
    pro: Option<Prologue<'_>>,
    dy: &[f32],
    d: ConvDims,
) -> Vec<f32> {
    assert!(grad_weight_supported(d));
    assert_eq!(x.len(), d.x_len());
    if let Some(p) = pro {
        assert!(p.centre.len() == d.c && p.mult.len() == d.c && p.shift.len() == d.c);
    }
    assert_eq!(dy.len(), d.y_len());
    let tiles = Tiles::of(d);
    let total = tiles.total(d);
    // Larger blocks than the forward's: each block ends with 36·k·c horizontal sums.
    let nb = wgrad_block_tiles(d, total);
    let blocks = total.div_ceil(nb);
    let threads = rayon::current_num_threads().max(1).min(blocks);
    let per = blocks.div_ceil(threads);
    let scratch_len = 36 * (xs(d.c, nb) + xs(d.k, nb)) + pad_len(tiles, nb);
    let du_len = 36 * d.k * d.c;
    // Read here, on the calling thread (the switch is per thread).
    let bf16 = crate::bf16::active();
    let wide = wide();
    let parts: Vec<Vec<f32>> = (0..blocks.div_ceil(per))
        .into_par_iter()
        .map(|ti| {
            let mut du = vec![0.0f32; du_len];
            let (b0, b1) = (ti * per, ((ti + 1) * per).min(blocks));
            with_scratch(scratch_len, |s| {
                #[cfg(target_arch = "x86_64")]
                {
                    let args = (
                        (x, pro),
                        dy,
                        d,
                        tiles,
                        (b0, b1, nb, total),
                        s,
                        &mut du[..],
                        bf16,
                    );
                    // SAFETY: AVX2/FMA checked by `grad_weight_supported`, AVX-512 F/VL
                    // by `wide`; the scratch is sized for blocks of `nb` tiles.
                    unsafe {
                        if wide {
                            wgrad_blocks_avx512(args)
                        } else {
                            wgrad_blocks_avx2(args)
                        }
                    }
                };
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (s, b0, b1);
            });
            du
        })
        .collect();
    let parts: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
    dw_from_parts(&parts, d)
}

/// Whether the AVX2/FMA kernels run: the CPU has them and [`PORTABLE`] is off.
fn have_avx2() -> bool {
    !PORTABLE.load(Ordering::Relaxed) && crate::util::have_avx2()
}

/// Whether the AVX2 blocks run in their AVX-512 F/VL compilation: the CPU has those
/// and [`AVX512`] is on.
fn wide() -> bool {
    AVX512.load(Ordering::Relaxed) && crate::util::have_avx512vl()
}

/// The name of the kernels' compilation that runs: see [`crate::winograd_kernels`].
pub(crate) fn kernels() -> &'static str {
    match (have_avx2(), wide()) {
        (true, true) => "avx512",
        (true, false) => "avx2",
        (false, _) => "portable",
    }
}

/// Tiles per block for `c` input and `kpad` output channels: a multiple of [`NR`],
/// sized so that `V` and `M` fit the byte budget `budget`.
fn block_tiles_for(budget: usize, c: usize, kpad: usize, total: usize) -> usize {
    let per_tile = 36 * (c + kpad) * std::mem::size_of::<f32>();
    let nb = (budget / per_tile.max(1)) / NR * NR;
    nb.clamp(NR, 512).min(total.div_ceil(NR) * NR)
}

/// Forward convolution by Winograd F(4×4, 3×3). `x`: `n × c × h × w`, `wmat`:
/// `k × c × 3 × 3`, `bias`: `k`; returns `n × k × h × w`. Requires `c ≥ 1`.
pub(crate) fn conv3x3_fwd(
    x: &[f32],
    pro: Option<Prologue<'_>>,
    wmat: &[f32],
    bias: Option<&[f32]>,
    skip: Option<&[f32]>,
    d: ConvDims,
) -> Vec<f32> {
    assert_eq!(x.len(), d.x_len());
    assert_eq!(wmat.len(), d.w_len());
    assert!(d.c >= 1);
    let y_len = d.y_len();
    if y_len == 0 {
        return Vec::new();
    }
    if let Some(b) = bias {
        assert_eq!(b.len(), d.k);
    }
    if let Some(sk) = skip {
        assert_eq!(sk.len(), y_len);
    }
    if let Some(p) = pro {
        assert!(
            fuses_prologue(d),
            "prologue on a path that does not map the input"
        );
        assert!(p.centre.len() == d.c && p.mult.len() == d.c && p.shift.len() == d.c);
    }
    // The transformed weights go to a buffer kept between calls: for few tiles and
    // many channels (512 at 4×4: 38 MB) a fresh one cost its page faults every call.
    with_weight_scratch(transformed_len(d.k, d.c), |u| {
        transform_weights_into(wmat, d.k, d.c, u);
        #[cfg(target_arch = "x86_64")]
        if have_avx2() && crate::bf16::active() {
            let kpad = d.k.div_ceil(MR) * MR;
            let len = crate::bf16::packed_weights_len(kpad, d.c);
            return crate::util::with_bf16_weight_scratch(len, |ub| {
                crate::bf16::pack_weights(u, kpad, d.c, ub);
                conv3x3_fwd_blocks(x, pro, u, Some(ub), (bias, skip), d)
            });
        }
        conv3x3_fwd_blocks(x, pro, u, None, (bias, skip), d)
    })
}

/// [`conv3x3_fwd`] after the weight transform: the blocks of tiles.
fn conv3x3_fwd_blocks(
    x: &[f32],
    pro: Option<Prologue<'_>>,
    u: &[f32],
    ub: Option<&[u32]>,
    (bias, skip): (Option<&[f32]>, Option<&[f32]>),
    d: ConvDims,
) -> Vec<f32> {
    let y_len = d.y_len();
    let tiles = Tiles::of(d);
    let total = tiles.total(d);
    let kpad = d.k.div_ceil(MR) * MR;
    let avx2 = have_avx2();
    let wide = wide();
    // bf16 products run at twice the rate, and every block reads all of the packed
    // weights: twice the budget halves that traffic per tile where blocks are short.
    // Kernels alone, (64, 128, 128, 16×16), ms, budget 640 KiB → 1.25 MiB, two
    // rounds: forward 7.03 / 7.11 → 6.11 / 6.10, input gradient 6.14 / 6.16 → 5.22 /
    // 5.30; (64, 64, 64, 32×32) and (64, 32, 32, 16×16) unchanged; 2.5 MiB no better.
    let budget = BLOCK_BYTES.load(Ordering::Relaxed) * if ub.is_some() { 2 } else { 1 };
    let nb = block_tiles_for(budget, d.c, kpad, total);
    // With bf16 products, at most 32 tiles a block: the blocks' V and M then stay
    // well inside L2 at 32 and 64 channels too. Kernels alone, (N, C, K, H=W), ms,
    // forward / input gradient, two rounds, uncapped → capped: (64, 32, 32, 32)
    // 2.76 / 2.37, 2.78 / 2.43 → 2.52 / 2.26, 2.54 / 2.32; (64, 64, 64, 32) 6.62 /
    // 6.06, 6.68 / 5.92 → 6.27 / 5.73, 6.24 / 5.72; (64, 64, 64, 16) 2.03 / 1.74, 2.05 /
    // 1.69 → 1.74 / 1.72, 1.93 / 1.63; 128 and 256 channels (32 and 16 tiles already)
    // unchanged. In f32 the cap gained nothing ((64, 32, 32, 32) forward 3.30 / 3.29 →
    // 3.50 / 3.61).
    let nb = if ub.is_some() { nb.min(2 * NR) } else { nb };
    let scratch_len = 36 * (xs(d.c, nb) + xs(kpad, nb)) + pad_len(tiles, nb);
    let mut out: Vec<f32> = Vec::with_capacity(y_len);
    let job = Job {
        x,
        pro,
        u,
        ub,
        ep: Epilogue { bias, skip },
        d,
        tiles,
        out: OutPtr(out.as_mut_ptr()),
        stream: y_len * std::mem::size_of::<f32>() >= STREAM_BYTES.load(Ordering::Relaxed),
    };
    let blocks = total.div_ceil(nb);
    (0..blocks).into_par_iter().for_each(|bi| {
        let t0 = bi * nb;
        let span = (t0, (t0 + nb).min(total));
        let nbp = (span.1 - t0).div_ceil(NR) * NR;
        with_scratch(scratch_len, |s| {
            // SAFETY: block `bi` writes only the output pixels of tiles t0..t_end
            // (disjoint from every other block's); `out` has capacity `y_len` and
            // outlives the loop. AVX2/FMA were detected when `avx2` is true, AVX-512
            // F/VL when `wide` is.
            unsafe {
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    if tiles.tw.is_multiple_of(2) {
                        if wide {
                            block_avx512(&job, span, nbp, s);
                        } else {
                            block_avx2(&job, span, nbp, s);
                        }
                    } else {
                        block_avx2_generic(&job, span, nbp, s);
                    }
                    return;
                }
                block(&job, span, nbp, s, false);
            }
        })
    });
    let _ = (avx2, wide);
    // SAFETY: the tiles 0..total cover every output pixel of every (image, channel)
    // plane exactly once (tiles of 4×4 over ceil(h/4) × ceil(w/4), cropped), and each
    // block wrote all k channels of its tiles.
    unsafe { out.set_len(y_len) };
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `G g Gᵀ` of one kernel, one value at a time in f64, rounded once.
    fn reference(g: &[f32]) -> [f32; 36] {
        let rows = |a: f64, b: f64, c: f64| {
            let sixth = 1.0 / 6.0;
            [
                a / 4.0,
                -((a + c) + b) * sixth,
                -((a + c) - b) * sixth,
                ((a / 4.0 + c) + b / 2.0) * sixth,
                ((a / 4.0 + c) - b / 2.0) * sixth,
                c,
            ]
        };
        let mut gg = [[0.0f64; 3]; 6];
        for col in 0..3 {
            let v = rows(g[col] as f64, g[3 + col] as f64, g[6 + col] as f64);
            for i in 0..6 {
                gg[i][col] = v[i];
            }
        }
        let mut out = [0.0f32; 36];
        for i in 0..6 {
            let v = rows(gg[i][0], gg[i][1], gg[i][2]);
            for j in 0..6 {
                out[i * 6 + j] = v[j] as f32;
            }
        }
        out
    }

    /// `G g Gᵀ` of one kernel as written in the papers, with divisions.
    fn reference_with_divisions(g: &[f32]) -> [f32; 36] {
        let rows = |a: f64, b: f64, c: f64| {
            [
                a / 4.0,
                -(a + b + c) / 6.0,
                -(a - b + c) / 6.0,
                a / 24.0 + b / 12.0 + c / 6.0,
                a / 24.0 - b / 12.0 + c / 6.0,
                c,
            ]
        };
        let mut gg = [[0.0f64; 3]; 6];
        for col in 0..3 {
            let v = rows(g[col] as f64, g[3 + col] as f64, g[6 + col] as f64);
            for i in 0..6 {
                gg[i][col] = v[i];
            }
        }
        std::array::from_fn(|x| rows(gg[x / 6][0], gg[x / 6][1], gg[x / 6][2])[x % 6] as f32)
    }

    /// The packed, lane-parallel weight transform equals the kernel-by-kernel formula to
    /// the bit, is within one unit in the last place of the formula with divisions, and its padding rows (output channels past `k`) are zero.
    #[test]
    fn weight_transform_matches_the_formula_bitwise() {
        let mut next = crate::util::xorshift(0x1234_5678_9abc_def0, 3.0);
        for (k, c) in [
            (1, 1),
            (5, 3),
            (6, 2),
            (7, 4),
            (13, 9),
            (32, 17),
            (7, TW_CB + 5),
        ] {
            let w: Vec<f32> = (0..k * c * 9).map(|_| next()).collect();
            let u = transform_weights(&w, k, c);
            let kbn = k.div_ceil(MR);
            assert_eq!(u.len(), 36 * kbn * c * MR);
            for ko in 0..kbn * MR {
                for ci in 0..c {
                    let expected = if ko < k {
                        reference(&w[(ko * c + ci) * 9..][..9])
                    } else {
                        [0.0; 36]
                    };
                    // `G g Gᵀ` with the textbook divisions (f64, rounded once).
                    let divided = if ko < k {
                        reference_with_divisions(&w[(ko * c + ci) * 9..][..9])
                    } else {
                        [0.0; 36]
                    };
                    for (xi, e) in expected.iter().enumerate() {
                        let got = u[((xi * kbn + ko / MR) * c + ci) * MR + ko % MR];
                        assert!(
                            got.to_bits() == e.to_bits() || (ko >= k && got == 0.0),
                            "k={k} c={c} ko={ko} ci={ci} ξ={xi}: {got} vs {e}"
                        );
                        let ulps = (got.to_bits() as i64 - divided[xi].to_bits() as i64).abs();
                        assert!(
                            got == divided[xi] || ulps <= 1,
                            "ξ={xi}: {got} vs {} (divisions)",
                            divided[xi]
                        );
                    }
                }
            }
        }
    }

    /// `dW = Gᵀ dU G` for one (k, c), with G as a matrix and every product written out
    /// (the zeros of G included), in f64, rounded once.
    fn reference_dw(du: impl Fn(usize) -> f64) -> [f32; 9] {
        const G: [[f64; 3]; 6] = [
            [0.25, 0.0, 0.0],
            [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
            [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
            [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
            [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
            [0.0, 0.0, 1.0],
        ];
        let mut t = [[0.0f64; 3]; 6];
        for (i, trow) in t.iter_mut().enumerate() {
            for (s, cell) in trow.iter_mut().enumerate() {
                *cell = (0..6).map(|j| du(i * 6 + j) * G[j][s]).sum();
            }
        }
        let mut out = [0.0f32; 9];
        for r in 0..3 {
            for s in 0..3 {
                out[r * 3 + s] = (0..6).map(|i| G[i][r] * t[i][s]).sum::<f64>() as f32;
            }
        }
        out
    }

    /// The weight gradient's bf16 products equal, up to f32 summation order, the f64
    /// sums over tiles of the bf16-rounded `dM` and `V`: pairs of tiles, the 16-tile
    /// tail of a row, channel runs that end part-way (`c` = 3, 21), row groups of 12, 4
    /// and 1 (`k` = 1, 7, 17), and `dU` accumulated onto what it held.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn weight_gradient_bf16_products_are_the_rounded_operands_summed() {
        use crate::bf16::{round, widen};
        if !(crate::bf16::bf16_products_available() && crate::util::have_avx2()) {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let mut rand = crate::util::xorshift(0x2545_f491_4f6c_dd1d, 4.0);
        for (k, c, nbp) in [(1, 3, 16), (7, 21, 48), (17, 16, 32), (12, 2, 64)] {
            let dm: Vec<f32> = (0..36 * xs(k, nbp)).map(|_| rand()).collect();
            let v: Vec<f32> = (0..36 * xs(c, nbp)).map(|_| rand()).collect();
            let du0: Vec<f32> = (0..36 * k * c).map(|_| rand()).collect();
            let (mut dmb, mut du) = (dm.clone(), du0.clone());
            let mut panel = vec![0.0f32; nbp * avx::PW];
            // SAFETY: AVX2/FMA and AVX512-BF16 are present (checked above); the
            // buffers have the sizes the strides say, `nbp` is a multiple of 16.
            unsafe { wgrad_products_bf16(&mut dmb, &v, &mut du, (k, c, nbp), &mut panel) };
            for xi in 0..36 {
                for ko in 0..k {
                    for ci in 0..c {
                        let at = (xi * k + ko) * c + ci;
                        let (mut want, mut mag) = (du0[at] as f64, du0[at].abs() as f64);
                        for t in 0..nbp {
                            let a = dm[xi * xs(k, nbp) + ko * nbp + t];
                            let b = v[xi * xs(c, nbp) + ci * nbp + t];
                            let p = widen(round(a)) as f64 * widen(round(b)) as f64;
                            want += p;
                            mag += p.abs();
                        }
                        let got = du[at] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * mag,
                            "k={k} c={c} nbp={nbp} ξ={xi} ({ko}, {ci}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// The weight gradient's blocks (default budgets): the budget's where it leaves at
    /// least 4 blocks, fewer tiles (a multiple of `NR`) where it would not, and
    /// im2col + GEMM only where that would make blocks of under 32 tiles.
    #[test]
    fn weight_gradient_blocks_leave_work_for_the_threads() {
        let d = |n, c, k, h| ConvDims { n, c, k, h, w: h };
        let case = |d: ConvDims| {
            let total = Tiles::of(d).total(d);
            (total, wgrad_block_tiles(d, total), wgrad_pays(d))
        };
        // The budget's blocks: 2.5 MiB / (36 · 128 · 4 B) = 142 tiles → 128 (16 blocks).
        assert_eq!(case(d(64, 64, 64, 32)), (4096, 128, true));
        // `cifar10-small`'s 16×16 networks: 272 tiles a block would leave 3.8 blocks.
        assert_eq!(case(d(64, 32, 32, 16)), (1024, 256, true));
        // `imagenet32`'s 8×8 networks: 128-tile blocks would leave 2.
        assert_eq!(case(d(64, 64, 64, 8)), (256, 64, true));
        // 4×4 images: 64 tiles, blocks of 16: im2col (or the GEMM form) instead.
        assert_eq!(case(d(64, 128, 96, 4)), (64, 16, false));
        // Many channels: the budget holds only 16 tiles.
        assert_eq!(case(d(64, 512, 512, 8)), (256, 16, false));
        for dd in [d(64, 32, 32, 16), d(64, 64, 64, 8), d(7, 12, 32, 16)] {
            let (total, nb, pays) = case(dd);
            assert_eq!(nb % NR, 0);
            assert!(
                !pays || total.div_ceil(nb) >= 4,
                "{dd:?}: {total} tiles, blocks of {nb}"
            );
        }
    }

    /// The weight gradient's back-transform, which sums the partial `dU`s as it reads
    /// them and works on groups of input channels in chunks, equals the matrix formula
    /// to the bit, also for channel counts that end a group or a chunk part-way.
    #[test]
    fn weight_gradient_back_transform_matches_the_formula_bitwise() {
        let mut next = crate::util::xorshift(0x0fed_cba9_8765_4321, 3.0);
        let mut rand = |len: usize| -> Vec<f32> { (0..len).map(|_| next()).collect() };
        for (k, c, nparts) in [
            (1, 1, 1),
            (3, 5, 2),
            (2, 8, 3),
            (4, 13, 1),
            (2, DW_CB + 11, 2),
        ] {
            let parts: Vec<Vec<f32>> = (0..nparts).map(|_| rand(36 * k * c)).collect();
            let views: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
            let d = ConvDims {
                n: 1,
                c,
                k,
                h: 4,
                w: 4,
            };
            let dw = dw_from_parts(&views, d);
            for ko in 0..k {
                for ci in 0..c {
                    let du = |xi: usize| {
                        let at = (xi * k + ko) * c + ci;
                        parts.iter().fold(0.0f64, |acc, p| acc + p[at] as f64)
                    };
                    let e = reference_dw(du);
                    let got = &dw[(ko * c + ci) * 9..][..9];
                    for (g, e) in got.iter().zip(e) {
                        assert!(
                            g.to_bits() == e.to_bits(),
                            "k={k} c={c} parts={nparts} ko={ko} ci={ci}: {got:?} vs {e}"
                        );
                    }
                }
            }
        }
    }
}
