//! Fast CPU kernels for Real NVP on candle.
//!
//! candle 0.11's CPU `conv2d` is 5–10× slower than PyTorch, and its backward uses a
//! naive `conv_transpose2d`. This crate provides [`conv2d_3x3`], a 3×3 / stride 1 /
//! padding 1 convolution whose f32 CPU path is a set of candle custom ops built on
//! im2col + GEMM (the `gemm` crate) for the forward pass and both gradients, threaded
//! over the batch with rayon. Other devices and dtypes fall back to candle's own ops.
//!
//! The other training-step hot spots are fused too: batch normalisation with its
//! batch statistics, affine and ReLU ([`batch_norm`], module `bn`), and the affine
//! coupling with its log-det and inverse ([`coupling`], [`coupling_inverse`],
//! [`mask_mul`]). Each has a candle-op `*_reference` that the tests compare with.
//!
//! The fast path can be switched off globally with [`set_fast_cpu`] (or the
//! environment variable `NVP_FAST_CPU=0`) to compare against the reference path.
//!
//! Threads: the kernels use rayon's global pool ([`num_threads`], which follows
//! `RAYON_NUM_THREADS`), splitting the batch over the threads. Scratch buffers for
//! im2col are kept per thread between calls; outputs are fresh `Vec`s handed to
//! candle, so a binary's global allocator matters (mimalloc measured 10–20 % faster
//! than glibc's default on forward + backward).

use std::sync::atomic::{AtomicU8, Ordering};

mod bn;
mod conv;
mod coupling;
mod kernels;
mod util;

pub use bn::{
    batch_norm, batch_norm_inverse, batch_norm_reference, batch_norm_uses_fast_path,
    BatchNormAffine, BatchNormOutput, BatchNormPlain, BatchVar,
};
pub use coupling::{
    coupling, coupling_inverse, coupling_inverse_reference, coupling_reference,
    coupling_uses_fast_path, mask_mul, Coupling, CouplingInverse, CouplingLogDet, MaskMul,
};

pub use conv::{
    conv2d_3x3, conv2d_3x3_reference, uses_fast_path, BiasGrad, Conv3x3, Conv3x3Bias,
    Conv3x3GradInput, Conv3x3GradWeight,
};

/// 0: not yet decided (read the environment), 1: enabled, 2: disabled.
static FAST_CPU: AtomicU8 = AtomicU8::new(0);

/// Enables or disables the fast CPU path of [`conv2d_3x3`] for the whole process.
pub fn set_fast_cpu(enabled: bool) {
    FAST_CPU.store(if enabled { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether the fast CPU path is enabled. Defaults to true unless the environment
/// variable `NVP_FAST_CPU` is `0`, `false`, `off` or `no` (read once, on first use,
/// unless [`set_fast_cpu`] was called before).
pub fn fast_cpu_enabled() -> bool {
    match FAST_CPU.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let off = std::env::var("NVP_FAST_CPU").is_ok_and(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "0" | "false" | "off" | "no"
                )
            });
            // Only the undecided state is replaced: a concurrent `set_fast_cpu` wins.
            let _ = FAST_CPU.compare_exchange(
                0,
                if off { 2 } else { 1 },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            FAST_CPU.load(Ordering::Relaxed) == 1
        }
    }
}

/// Number of threads the kernels use (the size of rayon's global pool, which follows
/// `RAYON_NUM_THREADS`).
pub fn num_threads() -> usize {
    rayon::current_num_threads()
}

/// Benchmark-only tuning knobs; not part of the stable API.
#[doc(hidden)]
pub mod tuning {
    use std::sync::atomic::Ordering;

    /// im2col tile budget in bytes (0: one whole image per GEMM).
    pub fn set_tile_bytes(bytes: usize) {
        crate::kernels::TILE_BYTES.store(bytes, Ordering::Relaxed);
    }

    /// im2col tile budget in bytes for the weight gradient (0: whole image).
    pub fn set_tile_bytes_wgrad(bytes: usize) {
        crate::kernels::TILE_BYTES_WGRAD.store(bytes, Ordering::Relaxed);
    }

    /// Split the batch over threads (true) or parallelise each GEMM (false).
    pub fn set_batch_split(on: bool) {
        crate::kernels::BATCH_SPLIT.store(on, Ordering::Relaxed);
    }
}
