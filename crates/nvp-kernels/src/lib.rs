//! Fast CPU kernels for Real NVP on candle.
//!
//! candle 0.11's CPU `conv2d` is 5–10× slower than PyTorch, and its backward uses a
//! naive `conv_transpose2d`. This crate provides [`conv2d_3x3`], a 3×3 / stride 1 /
//! padding 1 convolution whose f32 CPU path is a set of candle custom ops: the forward
//! pass, the input gradient and the weight gradient by Winograd F(4×4, 3×3) (module
//! `winograd`: 4× fewer multiplies than a direct convolution, AVX2/FMA kernels chosen
//! at run time), with im2col + GEMM (the `gemm` crate; module `kernels`) as the
//! alternative for sizes the Winograd weight gradient does not take and when switched
//! off ([`tuning::set_winograd`]). Other devices and dtypes fall back to candle's own
//! ops.
//!
//! The other training-step hot spots are fused too: batch normalisation with its
//! batch statistics, affine and ReLU ([`batch_norm`], module `bn`), and the affine
//! coupling with its log-det and inverse ([`coupling()`], [`coupling_inverse`],
//! [`mask_mul`]). Each has a candle-op `*_reference` that the tests compare with.
//!
//! Two larger fusions serve the s/t residual networks: [`resnet_train`] runs a whole
//! train-mode network as one op with a written-out backward pass (no autograd node, and
//! so no zero-filled gradient buffer and add, per layer; batch norm + ReLU applied as
//! each convolution reads its input, so that only the batch norms' inputs are kept), and
//! [`bn_relu_conv2d_3x3`] does the same for eval-mode batch norm in graph-free
//! inference. Both perform exactly the operations of the separate ops.
//!
//! Weight normalisation has a closed-form backward ([`weight_norm()`]), the default on
//! the CPU ([`weight_norm_op_cpu_enabled`]): candle's autograd would return each
//! convolution weight's gradient as a graph node that keeps five more tensors of its
//! size alive.
//!
//! The fast path can be switched off globally with [`set_fast_cpu`] (or the
//! environment variable `NVP_FAST_CPU=0`) to compare against the reference path.
//!
//! Threads: the kernels use rayon's global pool ([`num_threads`], which follows
//! `RAYON_NUM_THREADS`), splitting the batch (or the Winograd tile blocks) over the
//! threads. Scratch buffers are kept per thread between calls; outputs are fresh
//! `Vec`s handed to candle, so a binary's global allocator matters (mimalloc measured
//! 10–20 % faster than glibc's default on forward + backward).

use std::sync::atomic::{AtomicU8, Ordering};

mod adam;
mod bf16;
mod bn;
mod conv;
mod coupling;
mod cuda_pool;
#[cfg(feature = "cudnn")]
mod cudnn;
mod kernels;
mod resnet;
mod resnet_ops;
mod util;
mod weight_norm;
mod winograd;

pub use adam::{
    adam_update, adam_update_applies, ema_update, sum_squares_f64, AdamParam, AdamScalars,
};
pub use bf16::{bf16_products_available, Bf16Products};
pub use bn::{
    batch_norm, batch_norm_blended, batch_norm_inverse, batch_norm_reference,
    batch_norm_uses_fast_path, BatchNormAffine, BatchNormOutput, BatchNormPlain, BatchVar,
};
pub use coupling::{
    coupling, coupling_inverse, coupling_inverse_reference, coupling_reference,
    coupling_uses_fast_path, mask_mul, Coupling, CouplingInverse, CouplingLogDet, MaskMul,
};

#[cfg(feature = "cudnn")]
pub use cudnn::{batch_norm_cudnn, blend_cudnn, conv2d_3x3_cudnn};

pub use cuda_pool::keep_freed_cuda_memory;
pub use weight_norm::{weight_norm, weight_norm_reference};

pub use resnet::{
    resnet_one_node_enabled, resnet_train, resnet_train_applies, ResNetShape, ResNetTrainOutput,
};
pub use resnet_ops::{resnet_train_ops, resnet_train_ops_applies};

pub use conv::{
    bn_relu_conv2d_3x3, bn_relu_conv_fuses, conv2d_3x3, conv2d_3x3_add, conv2d_3x3_dx_as_conv,
    conv2d_3x3_reference, uses_fast_path, BiasGrad, BnReluPrologue, Conv3x3, Conv3x3Bias,
    Conv3x3GradInput, Conv3x3GradWeight,
};

/// 0: not yet decided (read the environment), 1: enabled, 2: disabled.
static FAST_CPU: AtomicU8 = AtomicU8::new(0);
/// Same states, for Winograd (environment variable `NVP_WINOGRAD`).
static WINOGRAD: AtomicU8 = AtomicU8::new(0);
/// Same states, for the fused training network (environment variable `NVP_FUSED_RESNET`).
static FUSED_RESNET: AtomicU8 = AtomicU8::new(0);
/// Same states, for the convolution input gradient by `conv2d` off the fast path
/// (environment variable `NVP_DX_AS_CONV`; off unless set).
static DX_AS_CONV: AtomicU8 = AtomicU8::new(0);
/// Same states, for cuDNN convolutions of CUDA tensors (environment variable
/// `NVP_CUDNN`; only with the `cudnn` feature).
static CUDNN: AtomicU8 = AtomicU8::new(0);
/// Same states, for cuDNN batch normalisation of CUDA tensors (environment variable
/// `NVP_CUDNN_BN`; only with the `cudnn` feature and [`cudnn_enabled`]).
static CUDNN_BN: AtomicU8 = AtomicU8::new(0);
/// Same states, for timing cuDNN's convolution algorithms (environment variable
/// `NVP_CUDNN_BENCHMARK`; off unless set).
static CUDNN_BENCHMARK: AtomicU8 = AtomicU8::new(0);
/// Same states, for TF32 tensor cores in cuDNN's f32 convolutions (environment
/// variable `NVP_TF32`).
static TF32: AtomicU8 = AtomicU8::new(0);
/// Same states, for the convolution's bias by cuDNN (environment variable
/// `NVP_CUDNN_BIAS`; only with the `cudnn` feature and [`cudnn_enabled`]).
static CUDNN_BIAS: AtomicU8 = AtomicU8::new(0);
/// Same states, for the running averages by cuDNN (environment variable
/// `NVP_CUDNN_BLEND`; only with [`cudnn_batch_norm_enabled`]).
#[cfg_attr(not(feature = "cudnn"), allow(dead_code))]
static CUDNN_BLEND: AtomicU8 = AtomicU8::new(0);
/// Same states, for weight normalisation's closed-form backward on the GPU
/// (environment variable `NVP_WEIGHT_NORM_OP`).
static WEIGHT_NORM_OP: AtomicU8 = AtomicU8::new(0);
/// The same on the CPU (the same environment variable; on unless it says off).
static WEIGHT_NORM_OP_CPU: AtomicU8 = AtomicU8::new(0);
/// Same states, for keeping freed memory in the CUDA memory pool (environment
/// variable `NVP_CUDA_KEEP_FREED`; see [`keep_freed_cuda_memory`]).
static CUDA_KEEP_FREED: AtomicU8 = AtomicU8::new(0);
/// Same states, for the s/t networks as one node built from the device's ops
/// (environment variable `NVP_RESNET_OPS`; see [`resnet_ops_enabled`]).
static RESNET_OPS: AtomicU8 = AtomicU8::new(0);
static PACK_PARAMS: AtomicU8 = AtomicU8::new(0);

/// A process-wide switch: on unless `var` is `0`, `false`, `off` or `no` (read once,
/// on first use, unless set before).
fn switch_enabled(state: &AtomicU8, var: &str) -> bool {
    switch_with_default(state, var, true)
}

/// A process-wide switch: `var` set to `0`, `false`, `off` or `no` turns it off, to
/// `1`, `true`, `on` or `yes` on; otherwise `default` (read once, on first use, unless
/// set before).
fn switch_with_default(state: &AtomicU8, var: &str, default: bool) -> bool {
    match state.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = match std::env::var(var) {
                Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
                    "0" | "false" | "off" | "no" => false,
                    "1" | "true" | "on" | "yes" => true,
                    _ => default,
                },
                Err(_) => default,
            };
            // Only the undecided state is replaced: a concurrent setter wins.
            let _ = state.compare_exchange(
                0,
                if on { 1 } else { 2 },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            state.load(Ordering::Relaxed) == 1
        }
    }
}

/// Enables or disables the fast CPU path of [`conv2d_3x3`] for the whole process.
pub fn set_fast_cpu(enabled: bool) {
    FAST_CPU.store(if enabled { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether the fast CPU path is enabled. Defaults to true unless the environment
/// variable `NVP_FAST_CPU` is `0`, `false`, `off` or `no` (read once, on first use,
/// unless [`set_fast_cpu`] was called before).
pub fn fast_cpu_enabled() -> bool {
    switch_enabled(&FAST_CPU, "NVP_FAST_CPU")
}

/// Whether the fast path's convolutions use Winograd F(4×4, 3×3) (else im2col + GEMM,
/// whose rounding error is about ten times smaller). Defaults to true unless the
/// environment variable `NVP_WINOGRAD` is `0`, `false`, `off` or `no`; see
/// [`tuning::set_winograd`].
pub fn winograd_enabled() -> bool {
    switch_enabled(&WINOGRAD, "NVP_WINOGRAD")
}

/// Which compilation of the CPU Winograd kernels runs on this machine now: `"avx512"`
/// (the AVX2 kernels compiled with AVX-512 F/VL as well: 32 vector registers, the same
/// results bit for bit), `"avx2"` or `"portable"` (see [`tuning::set_winograd_avx512`]
/// and [`tuning::set_winograd_portable`]).
pub fn winograd_kernels() -> &'static str {
    winograd::kernels()
}

/// Whether the s/t networks train as one op ([`resnet_train`]) rather than op by op
/// (same results; fewer passes over memory). Defaults to true unless the environment
/// variable `NVP_FUSED_RESNET` is `0`, `false`, `off` or `no`; see
/// [`tuning::set_fused_resnet`].
pub fn fused_resnet_enabled() -> bool {
    switch_enabled(&FUSED_RESNET, "NVP_FUSED_RESNET")
}

/// Whether [`conv2d_3x3`], where the fast CPU path does not apply (other devices and
/// dtypes), computes its input gradient with `conv2d` ([`conv2d_3x3_dx_as_conv`])
/// rather than through candle's `conv_transpose2d`, whose CUDA kernel is naive. Off by
/// default (not yet measured on a GPU) unless the environment variable `NVP_DX_AS_CONV`
/// is `1`, `true`, `on` or `yes`; see [`tuning::set_dx_as_conv`].
pub fn dx_as_conv_enabled() -> bool {
    switch_with_default(&DX_AS_CONV, "NVP_DX_AS_CONV", false)
}

/// Enables or disables cuDNN for the convolutions of CUDA tensors (where the `cudnn`
/// feature is built in; without it this switch has no effect).
pub fn set_cudnn(enabled: bool) {
    CUDNN.store(if enabled { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether [`conv2d_3x3`] hands CUDA f32/f64 tensors to cuDNN (forward, input and
/// weight gradients) rather than to candle's `conv2d` / `conv_transpose2d`. Only with
/// the `cudnn` feature; defaults to true unless the environment variable `NVP_CUDNN` is
/// `0`, `false`, `off` or `no` (read once, on first use, unless [`set_cudnn`] was
/// called before).
pub fn cudnn_enabled() -> bool {
    cfg!(feature = "cudnn") && switch_enabled(&CUDNN, "NVP_CUDNN")
}

/// Whether batch normalisation of CUDA tensors goes to cuDNN
/// ([`try_batch_norm_cudnn`]). Only with the `cudnn` feature and [`cudnn_enabled`];
/// defaults to true unless the environment variable `NVP_CUDNN_BN` is `0`, `false`,
/// `off` or `no`; see [`tuning::set_cudnn_batch_norm`].
pub fn cudnn_batch_norm_enabled() -> bool {
    cudnn_enabled() && switch_enabled(&CUDNN_BN, "NVP_CUDNN_BN")
}

// The five GPU switches below (`NVP_RESNET_OPS`, `NVP_CUDNN_BIAS`, `NVP_WEIGHT_NORM_OP`,
// `NVP_CUDNN_BLEND`, `NVP_CUDA_KEEP_FREED`) are off by default: written in sessions
// without a GPU run after them, they have not run on a GPU yet.
// `scripts/gpu-check.sh` runs their tests and measures each; a session that sees them
// pass turns them on by default.

/// Whether [`conv2d_3x3`]'s bias is added (and its gradient taken) by cuDNN where the
/// convolution runs on cuDNN: one op in place of candle's broadcast add and its
/// three-axis sum. Off by default (not yet run on a GPU); on where the environment
/// variable `NVP_CUDNN_BIAS` is `1`, `true`, `on` or `yes`, or after
/// [`tuning::set_cudnn_bias`].
pub fn cudnn_bias_enabled() -> bool {
    cudnn_enabled() && switch_with_default(&CUDNN_BIAS, "NVP_CUDNN_BIAS", false)
}

/// Whether the s/t networks' weight normalisation on CUDA tensors takes the
/// closed-form backward of [`weight_norm()`] (true) or candle's autograd through
/// [`weight_norm_reference`]. Off by default (not yet run on a GPU); on where the
/// environment variable `NVP_WEIGHT_NORM_OP` is `1`, `true`, `on` or `yes`, or after
/// [`tuning::set_weight_norm_op`].
pub fn weight_norm_op_enabled() -> bool {
    switch_with_default(&WEIGHT_NORM_OP, "NVP_WEIGHT_NORM_OP", false)
}

/// Whether weight normalisation on the CPU takes the closed-form backward of
/// [`weight_norm()`] (true, the default) or candle's autograd through
/// [`weight_norm_reference`] (the environment variable `NVP_WEIGHT_NORM_OP` set to `0`,
/// `false`, `off` or `no`, or [`tuning::set_weight_norm_op_cpu`]).
///
/// Memory is the reason. candle's autograd computes `v`'s gradient by multiplying by
/// forward tensors (`g / ‖v‖`, `v`) and, `v` being a parameter, never detaches it: the
/// gradient it returns is a graph node that keeps its inputs alive, five more tensors
/// of `v`'s size, until the gradients are dropped (about 1.2 GB for the 63 M-parameter
/// 64×64 model). The closed form computes from detached tensors and returns a plain
/// tensor.
pub fn weight_norm_op_cpu_enabled() -> bool {
    switch_with_default(&WEIGHT_NORM_OP_CPU, "NVP_WEIGHT_NORM_OP", true)
}

/// Whether the s/t networks train as one autograd node built from the device's ops
/// ([`resnet_train_ops`]) where the f32 CPU's fused op ([`resnet_train`]) does not
/// apply: on a GPU, cuDNN's convolutions and batch norms with a written-out backward
/// instead of candle's autograd through a dozen nodes per layer. Off by default (not
/// yet run on a GPU); on where the environment variable `NVP_RESNET_OPS` is `1`,
/// `true`, `on` or `yes`, or after [`tuning::set_resnet_ops`].
pub fn resnet_ops_enabled() -> bool {
    switch_with_default(&RESNET_OPS, "NVP_RESNET_OPS", false)
}

/// Whether a model built for training packs each s/t network's parameters into one
/// variable where the network trains as one node ([`resnet_one_node_enabled`]; the
/// `nvp` binary's builder, `RealNvp::new_packed`): the same values, checkpoints and
/// results, with no per-step copy of the parameters into the op and one tensor per
/// network for autograd and the optimizer. Defaults to true unless the environment
/// variable `NVP_PACK_PARAMS` is `0`, `false`, `off` or `no`; see
/// [`tuning::set_pack_params`].
pub fn pack_params_enabled() -> bool {
    switch_with_default(&PACK_PARAMS, "NVP_PACK_PARAMS", true)
}

/// Batch normalisation with affine by cuDNN (`batch_norm_cudnn`, feature `cudnn`)
/// where it applies: [`cudnn_batch_norm_enabled`], CUDA tensors, all f32 or all f64,
/// rank 2 to 4, at least two values per channel, `eps ≥ 1e-5`. `running = None`:
/// batch statistics, differentiable in `x`, `weight` and `bias`, returned (mean and
/// biased variance, detached); `Some((mean, var))`: those, no gradient (graph-free
/// inference only). `Ok(None)` where it does not apply.
pub fn try_batch_norm_cudnn(
    x: &candle_core::Tensor,
    weight: &candle_core::Tensor,
    bias: &candle_core::Tensor,
    running: Option<(&candle_core::Tensor, &candle_core::Tensor)>,
    eps: f64,
) -> candle_core::Result<Option<BatchNormOutput>> {
    #[cfg(feature = "cudnn")]
    {
        if cudnn_batch_norm_enabled() && cudnn::bn_applies(x, weight, bias, running, eps) {
            return cudnn::batch_norm_cudnn(x, weight, bias, running, eps).map(Some);
        }
    }
    let _ = (x, weight, bias, running, eps);
    Ok(None)
}

/// `dst ← keep · dst + take · src` in place by one cuDNN call (`cudnnAddTensor`, feature
/// `cudnn`), where it applies: [`cudnn_batch_norm_enabled`], switched on (off by
/// default, not yet run on a GPU: the environment variable `NVP_CUDNN_BLEND` set to
/// `1`, `true`, `on` or `yes`, or [`tuning::set_cudnn_blend`]), contiguous CUDA
/// tensors of one dtype (f32 or f64) and size. Returns whether it did; `Ok(false)` leaves `dst`
/// as it was. For a batch norm's running statistics: one kernel in place of candle's
/// four ops and a copy; for Adam's step (`keep = 1`, `take = −1`): one in place of a
/// subtraction and a copy.
pub fn try_blend_in_place(
    dst: &candle_core::Tensor,
    src: &candle_core::Tensor,
    keep: f64,
    take: f64,
) -> candle_core::Result<bool> {
    #[cfg(feature = "cudnn")]
    {
        if cudnn_batch_norm_enabled()
            && switch_with_default(&CUDNN_BLEND, "NVP_CUDNN_BLEND", false)
            && cudnn::blend_applies(dst, src)
        {
            cudnn::blend_cudnn(dst, src, keep, take)?;
            return Ok(true);
        }
    }
    let _ = (dst, src, keep, take);
    Ok(false)
}

/// Chooses cuDNN's convolution algorithms by timing each on the first call at a
/// size (true) or by cuDNN's heuristics (false, the default).
pub fn set_cudnn_benchmark(enabled: bool) {
    CUDNN_BENCHMARK.store(if enabled { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether cuDNN's convolution algorithms are chosen by running and timing each one on
/// the first call at each size (PyTorch's `torch.backends.cudnn.benchmark = True`:
/// faster kernels, a slower first step, results that may differ in the last bits from
/// run to run) rather than by cuDNN's heuristics. Off by default unless the
/// environment variable `NVP_CUDNN_BENCHMARK` is `1`, `true`, `on` or `yes`; see
/// [`set_cudnn_benchmark`].
pub fn cudnn_benchmark_enabled() -> bool {
    switch_with_default(&CUDNN_BENCHMARK, "NVP_CUDNN_BENCHMARK", false)
}

/// Allows (true) or forbids (false) TF32 tensor cores in cuDNN's f32 convolutions.
pub fn set_tf32(enabled: bool) {
    TF32.store(if enabled { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether cuDNN's f32 convolutions may use TF32 tensor cores (inputs rounded to a
/// 10-bit mantissa, f32 accumulation; PyTorch's default for convolutions,
/// `torch.backends.cudnn.allow_tf32`). Defaults to true unless the environment
/// variable `NVP_TF32` is `0`, `false`, `off` or `no` (read once, on first use, unless
/// [`set_tf32`] was called before). Strict FP32 (`CUDNN_FMA_MATH`) otherwise. The CPU
/// kernels are always FP32.
pub fn tf32_enabled() -> bool {
    switch_enabled(&TF32, "NVP_TF32")
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

    /// Forward convolution and input gradient by Winograd F(4×4, 3×3) (true, the
    /// default) or by im2col + GEMM (false).
    pub fn set_winograd(on: bool) {
        crate::WINOGRAD.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// Off the fast path, compute the convolution's input gradient with `conv2d`
    /// (true) or candle's `conv_transpose2d` (false, the default).
    pub fn set_dx_as_conv(on: bool) {
        crate::DX_AS_CONV.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// Batch normalisation of CUDA tensors by cuDNN (true, the default where the
    /// `cudnn` feature is built in) or by candle's ops (false).
    pub fn set_cudnn_batch_norm(on: bool) {
        crate::CUDNN_BN.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// The convolution's bias by cuDNN (true; only where the `cudnn` feature is built
    /// in) or by candle's broadcast add (false, the default).
    pub fn set_cudnn_bias(on: bool) {
        crate::CUDNN_BIAS.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// Weight normalisation of CUDA tensors with its closed-form backward (true) or
    /// through candle's autograd (false, the default).
    pub fn set_weight_norm_op(on: bool) {
        crate::WEIGHT_NORM_OP.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// Weight normalisation of CPU tensors with its closed-form backward (true, the
    /// default) or through candle's autograd (false).
    pub fn set_weight_norm_op_cpu(on: bool) {
        crate::WEIGHT_NORM_OP_CPU.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// Batch norms' running averages on CUDA by one cuDNN call each (true) or by
    /// candle's ops (false, the default).
    pub fn set_cudnn_blend(on: bool) {
        crate::CUDNN_BLEND.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// Keep freed memory in the CUDA memory pool (true) or let the pool hand it back
    /// at synchronisations (false, the default); read by
    /// [`crate::keep_freed_cuda_memory`].
    pub fn set_keep_freed_cuda_memory(on: bool) {
        crate::CUDA_KEEP_FREED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// Train the s/t networks as one op (true, the default) or op by op (false).
    pub fn set_fused_resnet(on: bool) {
        crate::FUSED_RESNET.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// Where the CPU's fused op does not apply, train the s/t networks as one node
    /// built from the device's ops (true) or layer by layer through candle's autograd
    /// (false, the default); see [`crate::resnet_ops_enabled`].
    pub fn set_resnet_ops(on: bool) {
        crate::RESNET_OPS.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// Pack each s/t network's parameters into one variable where it trains as one
    /// node (true, the default) or keep them as separate tensors (false); see
    /// [`crate::pack_params_enabled`].
    pub fn set_pack_params(on: bool) {
        crate::PACK_PARAMS.store(if on { 1 } else { 2 }, Ordering::Relaxed);
    }

    /// Byte budget of one Winograd block's transformed input and product buffers.
    pub fn set_winograd_block_bytes(bytes: usize) {
        crate::winograd::BLOCK_BYTES.store(bytes.max(1), Ordering::Relaxed);
    }

    /// Use the portable Winograd kernels even where AVX2/FMA exist (for tests).
    pub fn set_winograd_portable(on: bool) {
        crate::winograd::PORTABLE.store(on, Ordering::Relaxed);
    }

    /// Compile-time twin of the AVX2 Winograd blocks with AVX-512 F/VL enabled (more
    /// vector registers, the same results bit for bit): used where the CPU has those
    /// (true, the default) or never (false, for tests and benchmarks).
    pub fn set_winograd_avx512(on: bool) {
        crate::winograd::AVX512.store(on, Ordering::Relaxed);
    }

    /// Outputs of at least this many bytes are written by the AVX2 Winograd blocks with
    /// non-temporal stores (`usize::MAX`: never).
    pub fn set_winograd_stream_bytes(bytes: usize) {
        crate::winograd::STREAM_BYTES.store(bytes, Ordering::Relaxed);
    }

    /// The Winograd weight gradient's block budget as a multiple of the forward's.
    pub fn set_winograd_wgrad_factor(f: usize) {
        crate::winograd::WGRAD_BLOCK_FACTOR.store(f.max(1), Ordering::Relaxed);
    }

    /// Take the Winograd weight gradient on every size it handles, also where im2col +
    /// GEMM is expected to be faster (for tests; default false).
    pub fn set_winograd_wgrad_always(on: bool) {
        crate::winograd::WGRAD_ALWAYS.store(on, Ordering::Relaxed);
    }

    /// Split the batch over threads (true) or parallelise each GEMM (false).
    pub fn set_batch_split(on: bool) {
        crate::kernels::BATCH_SPLIT.store(on, Ordering::Relaxed);
    }
}
