//! bf16 products for the Winograd convolution, on CPUs with AVX512-BF16.
//!
//! `VDPBF16PS` multiplies pairs of bf16 values and adds both products to an f32 lane:
//! 32 multiply-adds per 512-bit instruction, twice the f32 FMA rate (measured on AMD
//! Zen 4: 235 against 117 GFLOP/s per core). With [`Bf16Products`] in scope on a
//! thread, the Winograd convolutions that thread calls — forward, input gradient and
//! weight gradient — hold the operands of their 36 products (the transformed inputs
//! `V`, weights `U` and output gradients `dM`) in bf16, rounded to nearest even, and
//! sum the products in f32. The transforms, the convolutions that run by im2col or the
//! weight gradient's GEMM form, and everything outside the convolutions stay f32. The
//! price is precision: the transforms' constants amplify the bf16 rounding to about
//! 2 % of the result's norm (`scripts/winograd_precision.py`), against 2.4e-3 for
//! PyTorch's bf16 autocast of a direct convolution — a training option, like autocast,
//! never the default and never used for a reported likelihood.
//!
//! The weight gradient's products `dU[ξ] += dM[ξ] · V[ξ]ᵀ` sum over tiles, so there
//! the pairs are of tiles: each row of `dM[ξ]` is rounded in place ([`pack_rows`]),
//! and each run of 16 input channels of `V[ξ]`, transposed into a panel, is paired
//! the same way ([`pair_panel`]) for [`outer_tile`].
//!
//! Layouts (pairs of input channels side by side, as `VDPBF16PS` reads them):
//! - `Ub[ξ][kb][p][r]`: one `u32` holding `U[ξ][kb·MR + r][2p]` (low half) and
//!   `…[2p + 1]` (high half); a missing odd channel is zero.
//! - `Vb[ξ][p][t]`: one `u32` holding `V[ξ][2p][t]` and `V[ξ][2p + 1][t]`, written over
//!   the first half of the f32 `V` it is made from (row `p` of the pairs over row `p`
//!   of the floats, so every row is read before it is overwritten).

use std::cell::Cell;

#[cfg(target_arch = "x86_64")]
use rayon::prelude::*;

// Rows of `U`/`M` per block, as the f32 kernels pack them.
use crate::winograd::MR;

thread_local! {
    static ON: Cell<bool> = const { Cell::new(false) };
}

/// While alive, the Winograd convolutions called on this thread (forward, input
/// gradient, weight gradient) take bf16 products where the CPU has AVX512-BF16
/// ([`bf16_products_available`]); elsewhere they stay f32. Dropping it restores the
/// previous setting; scopes nest. Only the calling thread matters: the kernels read
/// the switch before they hand their blocks to the rayon pool.
///
/// ```
/// let _bf16 = nvp_kernels::Bf16Products::enable();
/// // … the training step's forward and backward passes …
/// ```
#[must_use = "bf16 products last only while the guard lives"]
pub struct Bf16Products {
    prev: bool,
    // Thread-local state: the guard must be dropped on the thread that made it.
    _not_send: std::marker::PhantomData<*const ()>,
}

impl Bf16Products {
    /// Turns bf16 products on for this thread until the guard is dropped.
    pub fn enable() -> Self {
        Self::set(true)
    }

    /// Turns them off for this thread (e.g. for an evaluation inside a bf16 scope)
    /// until the guard is dropped.
    pub fn disable() -> Self {
        Self::set(false)
    }

    fn set(on: bool) -> Self {
        let prev = ON.with(|s| s.replace(on));
        Bf16Products {
            prev,
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for Bf16Products {
    fn drop(&mut self) {
        ON.with(|s| s.set(self.prev));
    }
}

/// Whether this CPU runs the bf16 products (AVX-512 F, BW, VL and BF16).
pub fn bf16_products_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the convolutions called now on this thread take the bf16 products.
pub(crate) fn active() -> bool {
    ON.with(Cell::get) && bf16_products_available()
}

/// `x` rounded to bf16, nearest even, as `VCVTNE2PS2BF16` does: NaNs stay NaN (quiet),
/// denormals become zero of the same sign. (The kernels convert with the instruction;
/// this is the tests' reference.)
#[cfg(test)]
pub(crate) fn round(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    if b & 0x7f80_0000 == 0 {
        return ((b >> 16) & 0x8000) as u16;
    }
    let r = b.wrapping_add(0x7fff + ((b >> 16) & 1));
    (r >> 16) as u16
}

/// The f32 value of a bf16.
#[cfg(test)]
pub(crate) fn widen(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Pairs of input channels.
pub(crate) fn pairs(c: usize) -> usize {
    c.div_ceil(2)
}

/// `u32`s of [`pack_weights`]'s output.
pub(crate) fn packed_weights_len(kpad: usize, c: usize) -> usize {
    36 * kpad * pairs(c)
}

/// `U` (`[ξ][kb][c][MR]` f32) → `Ub` (`[ξ][kb][p][MR]` pairs), one task per ξ.
///
/// # Panics
/// Where the CPU lacks AVX512-BF16 (only the bf16 path, which requires it, calls this).
#[cfg(target_arch = "x86_64")]
pub(crate) fn pack_weights(u: &[f32], kpad: usize, c: usize, ub: &mut [u32]) {
    let kbn = kpad / MR;
    let cp = pairs(c);
    assert!(bf16_products_available());
    assert_eq!(u.len(), 36 * kpad * c);
    assert_eq!(ub.len(), packed_weights_len(kpad, c));
    ub.par_chunks_mut(kbn * cp * MR)
        .zip(u.par_chunks(kbn * c * MR))
        .for_each(|(dst, src)| {
            for kb in 0..kbn {
                let s = &src[kb * c * MR..][..c * MR];
                let d = &mut dst[kb * cp * MR..][..cp * MR];
                // SAFETY: AVX512-BF16 was detected; `s` holds `c` rows of `MR` and `d`
                // `pairs(c)` rows of `MR`.
                unsafe { pack_weight_rows(s, d, c) };
            }
        });
}

/// One `(ξ, kb)` block of [`pack_weights`] by the hardware conversion: `c` rows of
/// `MR` (= 6) f32 → `pairs(c)` rows of 6 pairs (rows `2p` and `2p + 1` are 12
/// consecutive floats).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/VL/BF16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn pack_weight_rows(s: &[f32], d: &mut [u32], c: usize) {
    use std::arch::x86_64::*;
    assert!(s.len() >= c * MR && d.len() >= pairs(c) * MR);
    // Lanes 2r and 2r + 1 of the result: value r of row 2p and of row 2p + 1.
    let idx = _mm256_setr_epi16(0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11, 12, 13, 14, 15);
    for p in 0..pairs(c) {
        // A missing odd row reads as zeros.
        let mask: __mmask16 = if 2 * p + 1 < c { 0x0fff } else { 0x003f };
        let x = _mm512_maskz_loadu_ps(mask, s.as_ptr().add(2 * p * MR));
        let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(x));
        let z = _mm256_permutexvar_epi16(idx, h);
        _mm256_mask_storeu_epi16(d.as_mut_ptr().add(p * MR).cast(), 0x0fff, z);
    }
}

/// Packs each ξ's `V` (`c` rows of `nbp` f32, ξ stride `xs` floats, at `v`) into
/// pairs in place (see the module's layouts).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/BF16; `v` must hold `36 · xs` floats, `xs ≥ c ·
/// nbp`, `nbp` a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn pack_v(v: *mut f32, c: usize, nbp: usize, xs: usize) {
    for xi in 0..36 {
        let base = v.add(xi * xs);
        for p in 0..pairs(c) {
            let r0 = base.add(2 * p * nbp);
            let r1 = (2 * p + 1 < c).then(|| base.add((2 * p + 1) * nbp));
            zip_rows(
                r0,
                r1.map(<*mut f32>::cast_const),
                base.add(p * nbp).cast(),
                nbp,
            );
        }
    }
}

/// `dst[t] = (bf16(a[t]), bf16(b[t]))` (low, high half) for `t < n`, `b` zero when
/// absent; `dst` may be `a` itself (each 16 values are read before they are written).
///
/// # Safety
/// As [`pack_v`]; `n` a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn zip_rows(a: *const f32, b: Option<*const f32>, dst: *mut u32, n: usize) {
    use std::arch::x86_64::*;
    // `cvtne2ps_pbh(b, a)` holds a's 16 in its low 256 bits and b's above; the
    // permutation interleaves them.
    let idx = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4,
        19, 3, 18, 2, 17, 1, 16, 0,
    );
    let mut j = 0;
    while j < n {
        let lo = _mm512_loadu_ps(a.add(j));
        let hi = b.map_or(_mm512_setzero_ps(), |r| _mm512_loadu_ps(r.add(j)));
        let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(dst.add(j).cast(), _mm512_permutexvar_epi16(idx, h));
        j += 16;
    }
}

/// Rounds each of `rows` rows of `nbp` f32 (stride `nbp`, from `base`) to bf16 in
/// place: the row's `nbp / 2` `u32`s at its start hold consecutive pairs (tiles `2q`,
/// `2q + 1`), as the weight gradient's products read `dM`.
///
/// # Safety
/// As [`pack_v`]; `base` must hold `rows · nbp` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn pack_rows(base: *mut f32, rows: usize, nbp: usize) {
    use std::arch::x86_64::*;
    for r in 0..rows {
        let row = base.add(r * nbp);
        let mut j = 0;
        while j + 32 <= nbp {
            let h = _mm512_cvtne2ps_pbh(
                _mm512_loadu_ps(row.add(j + 16)),
                _mm512_loadu_ps(row.add(j)),
            );
            _mm512_storeu_si512(
                row.add(j / 2).cast(),
                std::mem::transmute::<__m512bh, __m512i>(h),
            );
            j += 32;
        }
        if j < nbp {
            let h = _mm512_cvtneps_pbh(_mm512_loadu_ps(row.add(j)));
            _mm256_storeu_si256(
                row.add(j / 2).cast(),
                std::mem::transmute::<__m256bh, __m256i>(h),
            );
        }
    }
}

/// A transposed panel (`nbp` rows of 16 f32, one per tile) → `nbp / 2` rows of 16
/// `u32`s, row `q` pairing tiles `2q` and `2q + 1` per input channel, in place.
///
/// # Safety
/// As [`pack_v`]; `panel` must hold `16 · nbp` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn pair_panel(panel: *mut f32, nbp: usize) {
    for q in 0..nbp / 2 {
        let a = panel.add(32 * q);
        zip_rows(a, Some(a.add(16)), panel.add(16 * q).cast(), 16);
    }
}

/// `du[i][0..cw] += Σ_q dm[i][q] · panel[q]` over `R` rows of packed `dm` (row
/// stride `nbp` floats, [`pack_rows`]) and the `nbp / 2` pair rows of a packed panel
/// ([`pair_panel`]); `du` row stride `ldu`. The `R × 16` sums stay in registers.
///
/// # Safety
/// As [`pack_v`]; the buffers must hold what the strides and sizes say.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
pub(crate) unsafe fn outer_tile<const R: usize>(
    dm: *const f32,
    nbp: usize,
    panel: *const f32,
    du: *mut f32,
    ldu: usize,
    cw: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); R];
    let (dm, panel) = (dm.cast::<i32>(), panel.cast::<i32>());
    for q in 0..nbp / 2 {
        let p: __m512bh = std::mem::transmute(_mm512_loadu_si512(panel.add(16 * q).cast()));
        for (i, a) in acc.iter_mut().enumerate() {
            let b: __m512bh = std::mem::transmute(_mm512_set1_epi32(*dm.add(i * nbp + q)));
            *a = _mm512_dpbf16_ps(*a, b, p);
        }
    }
    let mask: __mmask16 = if cw >= 16 { 0xffff } else { (1u16 << cw) - 1 };
    for (i, a) in acc.iter().enumerate() {
        let dst = du.add(i * ldu);
        let sum = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, dst), *a);
        _mm512_mask_storeu_ps(dst, mask, sum);
    }
}

/// `m[ξ] (kpad × nbp) = U[ξ] · V[ξ]` from the packed `ub` and `vb` (in the f32 `V`
/// buffer at `v`, ξ stride `xs_v` floats); `m`'s ξ stride `xs_m` floats.
///
/// Register tiles of two blocks of `MR` (= 6) rows × 32 tiles (24 accumulators of 16
/// lanes), narrower or shorter at the edges: one block where `kpad / MR` is odd, 16
/// tiles where `nbp` is an odd multiple of 16 (as it is for many channels, whose
/// blocks hold 16 tiles — where a 6 × 16 tile's 6 accumulators would leave the
/// multiply-adds waiting on their latency).
///
/// # Safety
/// The CPU must support AVX-512 F/BW/BF16; the buffers must hold what the strides and
/// sizes say; `nbp` a multiple of 16, `kpad` of 6.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn products(
    ub: &[u32],
    v: *const f32,
    xs_v: usize,
    m: *mut f32,
    xs_m: usize,
    (c, kpad, nbp): (usize, usize, usize),
) {
    let cp = pairs(c);
    let kbn = kpad / MR;
    assert!(ub.len() >= 36 * kpad * cp && nbp.is_multiple_of(16) && kpad.is_multiple_of(MR));
    for xi in 0..36 {
        let vx = v.add(xi * xs_v).cast::<u32>();
        let mut kb = 0;
        while kb < kbn {
            let u = ub.as_ptr().add((xi * kbn + kb) * cp * MR);
            let mrow = m.add(xi * xs_m + kb * MR * nbp);
            let two = kb + 2 <= kbn;
            let mut j = 0;
            while j + 32 <= nbp {
                if two {
                    tile::<2, 2>(u, vx.add(j), nbp, cp, mrow.add(j));
                } else {
                    tile::<1, 2>(u, vx.add(j), nbp, cp, mrow.add(j));
                }
                j += 32;
            }
            if j < nbp {
                if two {
                    tile::<2, 1>(u, vx.add(j), nbp, cp, mrow.add(j));
                } else {
                    tile::<1, 1>(u, vx.add(j), nbp, cp, mrow.add(j));
                }
            }
            kb += if two { 2 } else { 1 };
        }
    }
}

/// One register tile of [`products`]: `KB` blocks of `MR` rows × `16·W` tiles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
unsafe fn tile<const KB: usize, const W: usize>(
    u: *const u32,
    vb: *const u32,
    nbp: usize,
    cp: usize,
    m: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut acc = [[[_mm512_setzero_ps(); W]; MR]; KB];
    let mut vc = vb;
    for p in 0..cp {
        let vv: [__m512bh; W] =
            std::array::from_fn(|w| std::mem::transmute(_mm512_loadu_si512(vc.add(16 * w).cast())));
        for (b, block) in acc.iter_mut().enumerate() {
            let uc = u.add((b * cp + p) * MR);
            for (r, row) in block.iter_mut().enumerate() {
                let a: __m512bh = std::mem::transmute(_mm512_set1_epi32(*uc.add(r) as i32));
                for w in 0..W {
                    row[w] = _mm512_dpbf16_ps(row[w], a, vv[w]);
                }
            }
        }
        vc = vc.add(nbp);
    }
    for (b, block) in acc.iter().enumerate() {
        for (r, row) in block.iter().enumerate() {
            for (w, a) in row.iter().enumerate() {
                _mm512_storeu_ps(m.add((b * MR + r) * nbp + 16 * w), *a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_is_nearest_even() {
        // 1 + 2⁻⁸ is halfway between 1 and 1 + 2⁻⁷: ties go to the even (1).
        assert_eq!(round(1.0 + 1.0 / 256.0), 0x3f80);
        // Just above halfway rounds up.
        assert_eq!(round(f32::from_bits(0x3f80_8001)), 0x3f81);
        // 1 + 3·2⁻⁸ is halfway between 1 + 2⁻⁷ (odd) and 1 + 2⁻⁶: up to the even.
        assert_eq!(round(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(widen(round(-2.5)), -2.5);
        assert!(widen(round(f32::NAN)).is_nan());
        assert_eq!(widen(round(f32::INFINITY)), f32::INFINITY);
        assert_eq!(round(1e-40).to_ne_bytes(), 0u16.to_ne_bytes());
        assert_eq!(round(-1e-40), 0x8000);
        // The largest finite f32 rounds to infinity, as in the hardware conversion.
        assert_eq!(widen(round(f32::MAX)), f32::INFINITY);
    }

    /// The packed weights are [`round`] of each value, bit for bit, in the pair layout:
    /// the hardware conversion agrees with the scalar one on ties, denormals, NaN,
    /// infinities and overflow, and a missing odd channel is zero.
    #[test]
    fn packed_weights_are_the_rounded_values_in_pairs() {
        let special = [
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -1e-40,
            1e-40,
            f32::NAN,
            -f32::INFINITY,
            f32::MAX,
            0.0,
            -0.0,
            3.0e38,
        ];
        let mut s = 0x1234_5678u64;
        for (kpad, c) in [(6, 1), (12, 7), (18, 10)] {
            let u: Vec<f32> = (0..36 * kpad * c)
                .map(|i| {
                    s = s
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    if i % 7 == 0 {
                        special[(s >> 60) as usize % special.len()]
                    } else {
                        f32::from_bits((s >> 32) as u32)
                    }
                })
                .collect();
            let mut ub = vec![0u32; packed_weights_len(kpad, c)];
            pack_weights(&u, kpad, c, &mut ub);
            let (kbn, cp) = (kpad / MR, pairs(c));
            for blk in 0..36 * kbn {
                for p in 0..cp {
                    for r in 0..MR {
                        let at = |ci: usize| u[(blk * c + ci) * MR + r];
                        let lo = round(at(2 * p)) as u32;
                        let hi = if 2 * p + 1 < c {
                            round(at(2 * p + 1)) as u32
                        } else {
                            0
                        };
                        let got = ub[(blk * cp + p) * MR + r];
                        assert_eq!(got, lo | (hi << 16), "c={c} block {blk} pair {p} row {r}");
                    }
                }
            }
        }
    }

    /// The packed products equal, up to f32 summation order, the f64 sums of the
    /// bf16-rounded operands: channel pairs, the odd last channel, the 16-tile tail of
    /// the register tiles and the ξ strides all land where they should.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn products_are_the_rounded_operands_summed() {
        if !bf16_products_available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let mut rand = crate::util::xorshift(0x9e37_79b9_7f4a_7c15, 4.0);
        for (c, kpad, nbp) in [
            (1, 6, 16),
            (2, 6, 32),
            (3, 12, 48),
            (7, 18, 16),
            (32, 36, 80),
            (9, 30, 64),
        ] {
            let xs_v = c * nbp + 16;
            let xs_m = kpad * nbp + 16;
            let u: Vec<f32> = (0..36 * kpad * c).map(|_| rand()).collect();
            let v: Vec<f32> = (0..36 * xs_v).map(|_| rand()).collect();
            let mut ub = vec![0u32; packed_weights_len(kpad, c)];
            pack_weights(&u, kpad, c, &mut ub);
            let mut vb = v.clone();
            let mut m = vec![f32::NAN; 36 * xs_m];
            // SAFETY: AVX512-BF16 is present (checked above); the buffers have the
            // sizes the strides say, `nbp` is a multiple of 16 and `kpad` of 6.
            unsafe {
                pack_v(vb.as_mut_ptr(), c, nbp, xs_v);
                products(&ub, vb.as_ptr(), xs_v, m.as_mut_ptr(), xs_m, (c, kpad, nbp));
            }
            let kbn = kpad / MR;
            for xi in 0..36 {
                for ko in 0..kpad {
                    for t in 0..nbp {
                        let (mut want, mut mag) = (0.0f64, 0.0f64);
                        for ci in 0..c {
                            let a = u[((xi * kbn + ko / MR) * c + ci) * MR + ko % MR];
                            let b = v[xi * xs_v + ci * nbp + t];
                            let p = widen(round(a)) as f64 * widen(round(b)) as f64;
                            want += p;
                            mag += p.abs();
                        }
                        let got = m[xi * xs_m + ko * nbp + t] as f64;
                        assert!(
                            (got - want).abs() <= 1e-6 * mag + 1e-30,
                            "c={c} kpad={kpad} nbp={nbp} ξ={xi} k={ko} t={t}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
