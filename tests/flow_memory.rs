//! What a training step's gradients keep alive.
//!
//! candle's autograd detaches an intermediate node's gradient when it processes the
//! node, but not a parameter's: where a parameter is a direct input of an op whose
//! backward multiplies by a forward tensor, the gradient it returns is a graph node
//! that keeps its inputs alive until the gradients are dropped. Weight normalisation through candle's ops did that for every
//! convolution's `v`: five more tensors of `v`'s size each (1.2 GB for the 63 M-parameter
//! 64×64 model). The closed-form backward (`nvp_kernels::weight_norm`, the CPU default)
//! returns plain tensors. Checked here two ways: no parameter's gradient is a graph
//! node (but for the per-channel learned batch-norm scales, whose graph is two
//! per-channel vectors), and the memory in use grows in the backward pass by no more
//! than the gradients themselves (a counting allocator: this file is its own test binary, with
//! one test, so nothing else allocates meanwhile but candle's worker threads).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use candle_core::{DType, Device};
use common::*;
use nvp::flow::{Mode, ParamStore, RealNvpConfig};
use nvp_kernels::tuning;

/// Bytes allocated and not yet freed.
static LIVE: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: every call forwards to the system allocator with the same arguments; the
// counter is only arithmetic on the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Relaxed);
        LIVE.fetch_sub(l.size(), Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

struct Step {
    /// Growth of the memory in use over the forward pass (what the graph holds).
    forward: usize,
    /// Bytes of the packed variables (0 unpacked).
    packed_bytes: usize,
    /// Trainable parameters whose gradient is a graph node.
    holding: Vec<String>,
    /// Growth of the memory in use over the backward pass, with the forward's graph
    /// and the gradients still alive.
    growth: usize,
    /// Bytes of the gradients of the trainable parameters.
    grad_bytes: usize,
    /// Bytes of the convolutions' `v`.
    v_bytes: usize,
}

/// A train-mode forward and backward pass of a model whose convolution weights are
/// most of its parameters (the second of two); with each s/t network's parameters
/// packed into one variable where `packed`.
fn step(dtype: DType, packed: bool) -> Step {
    let cfg = RealNvpConfig {
        height: 8,
        width: 8,
        scales: 2,
        res_blocks: 2,
        features: 32,
        // The learned scale and shift after each coupling-output batch norm, so that
        // every kind of parameter is checked.
        bn_affine: true,
        ..RealNvpConfig::cifar10()
    };
    let store = ParamStore::new(41);
    let model = build_model(&cfg, &store, dtype, &Device::Cpu, packed);
    randomise(&store, 42);
    let x = randn(&[2, 3, 8, 8], 1.0, dtype, &mut rng(43));
    let loss = || model.log_prob(&x, Mode::Train).unwrap().mean_all().unwrap();
    // A first pass, so that the kernels' per-thread buffers have their size.
    drop(loss().backward().unwrap());
    let start = LIVE.load(Relaxed);
    let loss = loss();
    let before = LIVE.load(Relaxed);
    let forward = before.saturating_sub(start);
    let grads = loss.backward().unwrap();
    let growth = LIVE.load(Relaxed).saturating_sub(before);
    let bytes = |t: &candle_core::Tensor| t.elem_count() * t.dtype().size_in_bytes();
    let vars = store.trainable_vars();
    let grad_bytes = vars
        .iter()
        .filter_map(|(_, v)| grads.get(v.as_tensor()).map(bytes))
        .sum();
    let v_bytes = vars
        .iter()
        .filter(|(n, _)| n.ends_with(".v"))
        .map(|(_, v)| bytes(v.as_tensor()))
        .sum();
    let packed_bytes = vars
        .iter()
        .filter(|(n, _)| store.group_members(n).is_some())
        .map(|(_, v)| bytes(v.as_tensor()))
        .sum();
    let holding = vars
        .iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).is_some_and(|g| g.track_op()))
        .map(|(n, _)| n.clone())
        .collect();
    Step {
        forward,
        packed_bytes,
        holding,
        growth,
        grad_bytes,
        v_bytes,
    }
}

#[test]
fn gradients_hold_no_graph_and_no_more_memory_than_their_own() {
    for (dtype, packed) in [
        (DType::F32, false),
        (DType::F64, false),
        (DType::F32, true),
        (DType::F64, true),
    ] {
        let s = step(dtype, packed);
        eprintln!(
            "{dtype:?}, packed {packed}, closed-form weight norm: {} gradients hold a \
             graph; the backward pass grew the memory in use by {} bytes for {} bytes of \
             gradients",
            s.holding.len(),
            s.growth,
            s.grad_bytes
        );
        // The one exception: the learned batch-norm scale's gradient comes from
        // `exp(log_scale)`, so its graph holds two per-channel vectors.
        assert!(
            s.holding.iter().all(|n| n.ends_with("_bn.log_scale")),
            "{dtype:?}: gradients that hold a graph: {:?}",
            s.holding
        );
        // The gradients, plus a margin for small allocations that outlive the pass
        // (measured: about 6 % of the gradients here).
        assert!(
            s.growth <= s.grad_bytes + s.grad_bytes / 10,
            "{dtype:?}: the backward pass kept {} bytes for {} bytes of gradients",
            s.growth,
            s.grad_bytes
        );
    }
    // Through candle's autograd instead, each `v`'s gradient is a graph node holding
    // tensors of its size: the two checks above see it.
    tuning::set_weight_norm_op_cpu(false);
    let s = step(DType::F64, false);
    tuning::set_weight_norm_op_cpu(true);
    eprintln!(
        "F64, weight norm through autograd: {} gradients hold a graph; growth {} bytes \
         for {} bytes of gradients ({} of them the v's)",
        s.holding.len(),
        s.growth,
        s.grad_bytes,
        s.v_bytes
    );
    assert!(s.holding.iter().filter(|n| n.ends_with(".v")).count() >= 10);
    assert!(s.growth >= s.grad_bytes + 3 * s.v_bytes);
    // Packed, the fused f32 op takes each network's variable as it is, where it took a
    // concatenation of the ~30 tensors: the forward's graph holds no copy of them.
    let (plain, packed) = (step(DType::F32, false), step(DType::F32, true));
    eprintln!(
        "F32 forward: {} bytes held unpacked, {} packed ({} bytes of packed parameters)",
        plain.forward, packed.forward, packed.packed_bytes
    );
    assert!(packed.packed_bytes > 0);
    assert!(packed.forward + packed.packed_bytes * 9 / 10 <= plain.forward);
}
