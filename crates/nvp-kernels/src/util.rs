//! Small helpers shared by the element-wise kernels: borrowing contiguous f32
//! storage, uninitialised output buffers, batch chunking for rayon, and f64
//! row reductions.

use std::cell::RefCell;
use std::mem::MaybeUninit;

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, Storage, Tensor};

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

/// Runs `f` on the contiguous f32 data of a CPU tensor.
pub(crate) fn with_cpu_f32<R>(
    t: &Tensor,
    what: &str,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(cs) => f(f32_slice(cs, layout, what)?),
        _ => bail!("nvp-kernels: {what} is not on the CPU"),
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

/// The unit tests' generator: 64-bit xorshift from `seed`, each value uniform in
/// `[-span/2, span/2)` with 24 random bits (exact in f32).
#[cfg(test)]
pub(crate) fn xorshift(mut seed: u64, span: f32) -> impl FnMut() -> f32 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * span
    }
}

/// Whether the CPU has AVX2 and FMA (std caches the detection).
#[inline]
pub(crate) fn have_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the CPU has AVX-512 F and VL (std caches the detection).
#[inline]
pub(crate) fn have_avx512vl() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name` as the `#[inline(always)]` body `$body` compiled twice: once for the
/// baseline target and once with AVX2/FMA enabled (chosen at run time), so that the
/// loops vectorise 8-wide where the CPU allows. Both versions perform the same
/// operations in the same order (no FMA contraction in Rust), so they give the same
/// results bit for bit.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[inline(always)]
            fn body($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) -> $ret {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            if crate::util::have_avx2() {
                // SAFETY: AVX2 and FMA were detected on this CPU.
                return unsafe { avx2($($arg),*) };
            }
            body($($arg),*)
        }
    };
}

pub(crate) use multiversion;

multiversion! {
    /// Sum of a row, accumulated in f64 over 8 independent lanes (vectorisable).
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
}

multiversion! {
    /// `Σ (x − m)²` of a row in f64.
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

thread_local! {
    /// Per-thread scratch of the convolution kernels (im2col tiles, Winograd blocks),
    /// kept between calls so that the (large) buffer is not
    /// page-faulted in again on every convolution.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The calling thread's buffer of Winograd-transformed weights (one convolution's
    /// at a time), kept between calls likewise.
    static WEIGHT_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// The same weights packed in bf16 pairs, when the products run in bf16.
    static BF16_WEIGHT_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with a scratch slice of `len` floats (contents unspecified).
///
/// The buffer is moved out of the thread-local for the duration of `f`, so a
/// re-entrant call on the same thread (possible while rayon work-steals inside a
/// parallel GEMM) just allocates its own buffer instead of panicking on a borrow.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_local(&SCRATCH, len, f)
}

/// [`with_scratch`] from a second per-thread buffer, for the transformed weights that
/// a convolution holds while its blocks use [`with_scratch`].
pub(crate) fn with_weight_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    with_local(&WEIGHT_SCRATCH, len, f)
}

/// [`with_weight_scratch`] for the bf16-packed weights: `len` `u32`s (a third buffer,
/// held together with the f32 weights').
pub(crate) fn with_bf16_weight_scratch<R>(len: usize, f: impl FnOnce(&mut [u32]) -> R) -> R {
    with_local(&BF16_WEIGHT_SCRATCH, len, |s| {
        // SAFETY: `f32` and `u32` have the same size and alignment and every bit
        // pattern is valid for both; the slice is borrowed exclusively for `f`.
        let u = unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u32>(), s.len()) };
        f(u)
    })
}

fn with_local<R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let mut buf = key.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    key.with(|s| {
        let mut s = s.borrow_mut();
        if s.capacity() < buf.capacity() {
            *s = buf;
        }
    });
    r
}

/// The backward pass of a value computed elsewhere (by candle's ops on detached
/// inputs) and attached to two inputs by [`pass_through`]: gradients for `a` and `b`
/// from the value's gradient `d`.
pub(crate) trait WrittenOutGrad: Send + Sync + 'static {
    /// The op's name (in candle's graph and in errors).
    const NAME: &'static str;

    fn grads(&self, a: &Tensor, b: &Tensor, d: &Tensor)
        -> Result<(Option<Tensor>, Option<Tensor>)>;
}

/// `value` (a fresh, contiguous op output) with `G`'s gradient flowing to `a` and `b`:
/// the forward is a copy of `value`, the backward `G::grads`.
pub(crate) fn pass_through<G: WrittenOutGrad>(
    value: &Tensor,
    a: &Tensor,
    b: &Tensor,
    grad: G,
) -> Result<Tensor> {
    value.apply_op3(a, b, PassThrough(grad))
}

struct PassThrough<G>(G);

impl<G> PassThrough<G> {
    fn copy<S: candle_core::backend::BackendStorage>(
        s: &S,
        l: &Layout,
        what: &str,
    ) -> Result<(S, candle_core::Shape)> {
        if !l.is_contiguous() || l.start_offset() != 0 {
            candle_core::bail!("{what}: internal: the passed-through value must be contiguous");
        }
        Ok((s.try_clone(l)?, l.shape().clone()))
    }
}

impl<G: WrittenOutGrad> candle_core::CustomOp3 for PassThrough<G> {
    fn name(&self) -> &'static str {
        G::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, candle_core::Shape)> {
        Self::copy(s1, l1, G::NAME)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        Self::copy(s1, l1, G::NAME)
    }

    fn bwd(
        &self,
        _value: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        d: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (ga, gb) = self.0.grads(a, b, d)?;
        Ok((None, ga, gb))
    }
}
