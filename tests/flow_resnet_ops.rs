//! The s/t network as one node built from the device's ops
//! (`nvp_kernels::resnet_train_ops`, `NVP_RESNET_OPS=1`; meant for the GPU, where it
//! runs cuDNN's convolutions and batch norms) against the same network layer by layer
//! through candle's autograd, on the CPU.
//!
//! In f64 the forward ops are the layers' own (candle's convolution, the batch norm's
//! reference formula, ReLU, the residual add), so the output and the running statistics
//! must be bit-identical; the written-out backward (the batch norm's closed form, the
//! convolution's gradients by `conv2d`, ReLU's mask by `sign`) must give every gradient
//! to rounding: measured ≤ 1.2e-13 of max(1, the tensor's largest gradient), checked
//! at 1e-12. (The largest differences are on gradients that are zero in exact
//! arithmetic — the gain and bias of a convolution that feeds a batch norm — where both
//! sides are rounding noise; elsewhere ≤ 2e-11 of the tensor's own largest.) In f32 on
//! the fast CPU kernels (fused op off) the batch norms differ in rounding from the
//! layers' fused kernels: values measured ≤ 4.3e-6, gradients ≤ 9.6e-6, checked at 2e-5
//! and 1e-4.

mod common;

use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};
use common::*;
use nvp::flow::conditioner::ResNetConfig;
use nvp_kernels::tuning;

/// Serialises the tests that flip the process-wide switches.
static SWITCH: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    SWITCH.lock().unwrap_or_else(|e| e.into_inner())
}

/// Output, gradients (by name, plus `x` where it has one) and every variable after the
/// step (so the running statistics).
type Run = TrainRun;

fn run_resnet(ops: bool, dims: &[usize], cfg: ResNetConfig, dtype: DType, seed: u64) -> Run {
    tuning::set_resnet_ops(ops);
    resnet_train_pass(dims, cfg, dtype, seed)
}

/// Output and variables within `tol_values` (0: bit-identical), each gradient within
/// `tol_grads` of max(1, its largest element).
fn compare(ops: &Run, layers: &Run, tol_values: f64, tol_grads: f64) {
    let check = |what: &str, a: &Tensor, b: &Tensor, tol: f64| {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes");
        let (a, b) = (to_vec_f64(a), to_vec_f64(b));
        if tol == 0.0 {
            let bad = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            assert_eq!(bad, 0, "{what}: {bad} of {} values differ", a.len());
        } else {
            assert_close(what, &a, &b, tol);
        }
    };
    check("output", &ops.0, &layers.0, tol_values);
    assert_eq!(ops.1.len(), layers.1.len());
    for (name, g) in &ops.1 {
        check(
            &format!("gradient of {name}"),
            g,
            &layers.1[name],
            tol_grads,
        );
    }
    assert_eq!(ops.2.len(), layers.2.len());
    for (name, t) in &ops.2 {
        check(name, t, &layers.2[name], tol_values);
    }
}

fn cfg(channels: usize, blocks: usize) -> ResNetConfig {
    ResNetConfig {
        channels,
        features: 8,
        blocks,
        ..ResNetConfig::default()
    }
}

#[test]
fn resnet_ops_match_layer_by_layer_in_f64() {
    let _guard = lock();
    for (i, (dims, c)) in [
        (vec![2, 3, 8, 8], cfg(3, 2)),
        (vec![3, 4, 5, 6], cfg(4, 1)),
        (vec![2, 6, 4, 4], cfg(6, 3)),
        // No residual block: no inner convolutions to normalise together.
        (vec![2, 3, 4, 4], cfg(3, 0)),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 300 + 10 * i as u64;
        let ops = run_resnet(true, &dims, c, DType::F64, seed);
        let layers = run_resnet(false, &dims, c, DType::F64, seed);
        compare(&ops, &layers, 0.0, 1e-12);
        // Not trivially equal: the output and the input gradient are non-zero.
        assert!(to_vec_f64(&ops.0).iter().any(|v| v.abs() > 1e-3));
        assert!(to_vec_f64(&ops.1["x"]).iter().any(|v| v.abs() > 1e-3));
    }
    tuning::set_resnet_ops(false);
}

/// With the fused CPU op off, f32 on the CPU takes the ops path with the fast
/// convolution kernels' gradients (`Conv3x3GradInput`, `Conv3x3GradWeight`,
/// `BiasGrad`); its batch norms are the reference formula where the layers use the fused
/// kernel, so the values agree to rounding only.
#[test]
fn resnet_ops_on_the_fast_cpu_kernels_in_f32() {
    let _guard = lock();
    tuning::set_fused_resnet(false);
    let c = cfg(3, 2);
    let ops = run_resnet(true, &[2, 3, 8, 8], c, DType::F32, 400);
    let layers = run_resnet(false, &[2, 3, 8, 8], c, DType::F32, 400);
    tuning::set_fused_resnet(true);
    tuning::set_resnet_ops(false);
    compare(&ops, &layers, 2e-5, 1e-4);
}

/// The whole model in train mode (checkerboard and channel couplings, two scales; the
/// first s/t network's input is data, without a gradient): the log-likelihood, every
/// parameter gradient and the running statistics, in f64.
#[test]
fn resnet_ops_in_the_whole_model() {
    let _guard = lock();
    let run = |ops: bool| -> Run {
        tuning::set_resnet_ops(ops);
        train_pass(&small_model_config(), DType::F64, 17)
    };
    let ops = run(true);
    let layers = run(false);
    tuning::set_resnet_ops(false);
    compare(&ops, &layers, 0.0, 1e-12);
}

/// Bad arguments are refused with the shapes named, not a panic.
#[test]
fn resnet_ops_refuses_bad_shapes() {
    let shape = nvp_kernels::ResNetShape {
        cin: 3,
        features: 4,
        blocks: 1,
        cout: 6,
    };
    let p = Tensor::zeros(shape.param_len_weight_norm(), DType::F64, &Device::Cpu).unwrap();
    let x = Tensor::zeros((1, 2, 4, 4), DType::F64, &Device::Cpu).unwrap();
    let e = nvp_kernels::resnet_train_ops(&x, &p, shape, 1e-5).unwrap_err();
    assert!(e.to_string().contains("2 channels"), "{e}");
    let x = Tensor::zeros((1, 3, 4, 4), DType::F64, &Device::Cpu).unwrap();
    let short = p.narrow(0, 1, shape.param_len_weight_norm() - 1).unwrap();
    let e = nvp_kernels::resnet_train_ops(&x, &short, shape, 1e-5).unwrap_err();
    assert!(e.to_string().contains("needs"), "{e}");
    let e = nvp_kernels::resnet_train_ops(&x.to_dtype(DType::F32).unwrap(), &p, shape, 1e-5)
        .unwrap_err();
    assert!(e.to_string().contains("F32"), "{e}");
}
