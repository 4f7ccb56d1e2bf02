//! Small helpers shared by the element-wise kernels: borrowing contiguous f32
//! storage, uninitialised output buffers, batch chunking for rayon, and f64
//! row reductions.

use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result};

/// Borrows the contiguous f32 data of a CPU storage.
pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        other => bail!("nvp-kernels: {what} must be f32, got {:?}", other.dtype()),
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("nvp-kernels: {what} must be contiguous"),
    }
}

/// Images per rayon chunk: the batch split evenly over the pool's threads.
pub(crate) fn per_chunk(n: usize) -> usize {
    n.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// A `Vec<f32>` of length `len` whose every element is written by `fill`.
///
/// `fill` receives the uninitialised storage and must write all of it (the
/// kernels below write each element exactly once, by construction of their
/// zipped chunk iterators; a debug check would need a second pass).
pub(crate) fn build_vec(len: usize, fill: impl FnOnce(&mut [MaybeUninit<f32>])) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(len);
    fill(&mut out.spare_capacity_mut()[..len]);
    // SAFETY: the capacity is at least `len` and, by the contract of `build_vec`
    // (upheld by every caller in this crate), `fill` initialised all `len`
    // elements of the spare capacity.
    unsafe { out.set_len(len) };
    out
}

/// Sum of a row, accumulated in f64 over 8 independent lanes (vectorisable).
#[inline]
pub(crate) fn sum_f64(row: &[f32]) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut it = row.chunks_exact(8);
    for ch in &mut it {
        for (a, v) in acc.iter_mut().zip(ch) {
            *a += *v as f64;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for v in it.remainder() {
        s += *v as f64;
    }
    s
}

/// `Σ (x − m)²` of a row in f64.
#[inline]
pub(crate) fn sq_dev_f64(row: &[f32], m: f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut it = row.chunks_exact(8);
    for ch in &mut it {
        for (a, v) in acc.iter_mut().zip(ch) {
            let d = *v as f64 - m;
            *a += d * d;
        }
    }
    let mut s: f64 = acc.iter().sum();
    for v in it.remainder() {
        let d = *v as f64 - m;
        s += d * d;
    }
    s
}

/// Adds per-chunk partial vectors into one.
pub(crate) fn add_partials(parts: Vec<Vec<f64>>, len: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; len];
    for p in parts {
        for (o, v) in out.iter_mut().zip(p) {
            *o += v;
        }
    }
    out
}
