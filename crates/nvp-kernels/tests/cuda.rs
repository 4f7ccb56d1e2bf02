//! `conv2d_3x3` on a CUDA device against the CPU in f64: values and the gradients of
//! `sum(y · r)` with respect to x, w and b, through candle's autograd.
//!
//! Built only with the `cuda` feature (never in CI: there is no GPU there) and run on a
//! GPU machine by `scripts/gpu-check.sh`, which carries this test binary
//! (`scripts/build-cuda.sh` builds it). Without a CUDA device every test fails with
//! that message: the binary exists to check the GPU.
//!
//! Paths checked (the switches are process-wide, so the tests take a lock):
//! - cuDNN (feature `cudnn`): f64 within 1e-10; f32 with strict FP32 math
//!   (`set_tf32(false)`, `CUDNN_FMA_MATH`) within 1e-5; f32 with TF32 allowed (the
//!   default, as PyTorch's) within 1e-2 (TF32 rounds the inputs to 10 mantissa bits:
//!   about 5e-4 relative per product); both worst errors are printed.
//! - the same with algorithms chosen by timing (`set_cudnn_benchmark(true)`); the
//!   bias by candle's broadcast add (the default) and, in f64 and strict f32, by cuDNN
//!   (`set_cudnn_bias(true)`: `cudnnAddTensor`, `cudnnConvolutionBackwardBias`).
//! - the running average in place by cuDNN (`blend_cudnn`) against the formula.
//! - candle's own CUDA `conv2d` + `conv_transpose2d` (`set_cudnn(false)`), and the
//!   input gradient by `conv2d` (`set_dx_as_conv(true)`): f32 within 1e-5, except what
//!   goes through candle's `conv2d` in a `cudnn` build (y, dw, and dx by `conv2d`):
//!   candle leaves cuDNN's default math type, TF32 on Ampere and later, so 1e-2.
//! - cuDNN batch norm (`batch_norm_cudnn`) against `batch_norm_reference` on the CPU in
//!   f64: training (batch statistics: y, mean, biased variance, and the gradients of
//!   `sum(y · r)` for x, weight and bias) and inference (running statistics), ranks 2 to
//!   4; f64 within 1e-10, f32 within 1e-5.
//!
//! Relative error: max |got − want| over all elements / max |want|. Set
//! `NVP_TEST_VERBOSE=1` (with `--nocapture`) to print every measured error.
#![cfg(feature = "cuda")]

use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use nvp_kernels::{conv2d_3x3, conv2d_3x3_reference, tuning};

static SWITCHES: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    SWITCHES.lock().unwrap_or_else(|e| e.into_inner())
}

fn gpu() -> Device {
    Device::new_cuda(0).unwrap_or_else(|e| panic!("no CUDA device 0: {e}"))
}

fn verbose() -> bool {
    std::env::var("NVP_TEST_VERBOSE").is_ok_and(|v| v == "1")
}

fn rand_f64(rng: &mut StdRng, dims: &[usize]) -> Tensor {
    let len: usize = dims.iter().product();
    let v: Vec<f64> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
}

fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims(), "shape mismatch");
    let to = |t: &Tensor| -> Vec<f64> {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (g, w) = (to(got), to(want));
    let scale = w.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    g.iter()
        .zip(&w)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// y, dx, dw, db of `conv2d_3x3(x, w, b)` with loss `sum(y · r)`, on `dev` in `dtype`.
fn run(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    r: &Tensor,
    dev: &Device,
    dtype: DType,
    reference: bool,
) -> [Tensor; 4] {
    let var =
        |t: &Tensor| Var::from_tensor(&t.to_dtype(dtype).unwrap().to_device(dev).unwrap()).unwrap();
    let (xv, wv, bv) = (var(x), var(w), var(b));
    let y = if reference {
        conv2d_3x3_reference(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()))
    } else {
        conv2d_3x3(xv.as_tensor(), wv.as_tensor(), Some(bv.as_tensor()))
    }
    .unwrap();
    let r = r.to_dtype(dtype).unwrap().to_device(dev).unwrap();
    let grads = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let g = |v: &Var| grads.get(v.as_tensor()).expect("no gradient").clone();
    [y.clone(), g(&xv), g(&wv), g(&bv)]
}

/// The largest of the four relative errors of `conv2d_3x3` on the GPU in `dtype`
/// against the CPU's f64 reference, over a few shapes; each must be under `tol`.
fn check(what: &str, dtype: DType, tol: f64) -> f64 {
    check_each(what, dtype, [tol; 4])
}

/// [`check`] with one tolerance for each of y, dx, dw and db.
fn check_each(what: &str, dtype: DType, tols: [f64; 4]) -> f64 {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(7);
    let mut worst = 0.0f64;
    // (n, c, k, h, w): odd sizes, batch 1, a 1×1 image, and the shapes of the model.
    for &(n, c, k, h, w) in &[
        (2, 5, 6, 7, 9),
        (1, 3, 4, 5, 5),
        (3, 2, 2, 1, 1),
        (8, 12, 64, 32, 32),
        (8, 64, 64, 16, 16),
        (4, 128, 24, 8, 8),
    ] {
        let x = rand_f64(&mut rng, &[n, c, h, w]);
        let wt = rand_f64(&mut rng, &[k, c, 3, 3]);
        let b = rand_f64(&mut rng, &[k]);
        let r = rand_f64(&mut rng, &[n, k, h, w]);
        let want = run(&x, &wt, &b, &r, &Device::Cpu, DType::F64, true);
        let got = run(&x, &wt, &b, &r, &dev, dtype, false);
        let names = ["y", "dx", "dw", "db"];
        for ((name, tol), (g, wa)) in names.iter().zip(tols).zip(got.iter().zip(&want)) {
            assert_eq!(g.dtype(), dtype, "{what}: {name} dtype");
            assert!(g.device().is_cuda(), "{what}: {name} is not on the GPU");
            let e = rel_err(g, wa);
            if verbose() {
                println!("{what} ({n},{c},{k},{h},{w}) {name}: {e:.3e}");
            }
            assert!(
                e < tol,
                "{what}: ({n}, {c}, {k}, {h}, {w}) {name}: relative error {e:.3e} >= {tol:.0e}"
            );
            worst = worst.max(e);
        }
    }
    worst
}

#[cfg(feature = "cudnn")]
#[test]
fn cudnn_f64_matches_cpu() {
    let _g = lock();
    nvp_kernels::set_cudnn(true);
    assert!(nvp_kernels::cudnn_enabled());
    check("cuDNN f64", DType::F64, 1e-10);
    // The bias (value and gradient) by cuDNN instead of candle's broadcast add.
    tuning::set_cudnn_bias(true);
    let f64_bias = check("cuDNN f64, bias by cuDNN", DType::F64, 1e-10);
    nvp_kernels::set_tf32(false);
    let f32_bias = check("cuDNN f32 (FP32 math), bias by cuDNN", DType::F32, 1e-5);
    nvp_kernels::set_tf32(true);
    tuning::set_cudnn_bias(false);
    println!("cuDNN bias: worst relative error {f64_bias:.2e} f64, {f32_bias:.2e} f32");
}

#[cfg(feature = "cudnn")]
#[test]
fn cudnn_f32_strict_and_tf32() {
    let _g = lock();
    nvp_kernels::set_cudnn(true);
    nvp_kernels::set_tf32(false);
    let strict = check("cuDNN f32 (FP32 math)", DType::F32, 1e-5);
    nvp_kernels::set_tf32(true);
    let tf32 = check("cuDNN f32 (TF32 allowed)", DType::F32, 1e-2);
    // Printed, not compared: where cuDNN's heuristics pick no tensor-core kernel the two
    // differ only by the algorithms' rounding, in either direction.
    println!("cuDNN f32: worst relative error {strict:.2e} strict FP32, {tf32:.2e} TF32 allowed");
}

/// Algorithms chosen by timing (`NVP_CUDNN_BENCHMARK=1`): any of them must agree with
/// the CPU as the heuristic's choice does.
#[cfg(feature = "cudnn")]
#[test]
fn cudnn_benchmark_mode_matches_cpu() {
    let _g = lock();
    nvp_kernels::set_cudnn(true);
    nvp_kernels::set_cudnn_benchmark(true);
    nvp_kernels::set_tf32(false);
    check("cuDNN f32 (FP32, timed algorithms)", DType::F32, 1e-5);
    check("cuDNN f64 (timed algorithms)", DType::F64, 1e-10);
    nvp_kernels::set_tf32(true);
    check(
        "cuDNN f32 (TF32 allowed, timed algorithms)",
        DType::F32,
        1e-2,
    );
    nvp_kernels::set_cudnn_benchmark(false);
}

#[test]
fn candle_conv_f32_matches_cpu() {
    let _g = lock();
    nvp_kernels::set_cudnn(false);
    tuning::set_dx_as_conv(false);
    // With candle's own `cudnn` feature (on in nvp's `cudnn` builds) candle's `conv2d`
    // runs through cuDNN with its default math type, which allows TF32 on Ampere and
    // later (measured on an H200: 2.7e-4 for y). That covers y and dw (candle's weight
    // gradient is a `conv2d` too), and dx when it is taken by `conv2d`; `set_tf32` does
    // not reach candle's calls. Its `conv_transpose2d` and the bias sum are FP32.
    let conv = if cfg!(feature = "cudnn") { 1e-2 } else { 1e-5 };
    let plain = check_each(
        "candle conv2d + conv_transpose2d f32",
        DType::F32,
        [conv, 1e-5, conv, 1e-5],
    );
    tuning::set_dx_as_conv(true);
    let as_conv = check_each(
        "candle conv2d, dx as conv2d f32",
        DType::F32,
        [conv, conv, conv, 1e-5],
    );
    println!("candle conv f32: worst relative error {plain:.2e}, {as_conv:.2e} with dx by conv2d");
    tuning::set_dx_as_conv(false);
    nvp_kernels::set_cudnn(true);
}

/// The comparison above must see a wrong result: a kernel not flipped for the
/// input gradient (what a transposed convolution without the flip would compute).
#[test]
fn comparison_detects_a_wrong_gradient() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(3);
    let x = rand_f64(&mut rng, &[2, 3, 6, 6]);
    let w = rand_f64(&mut rng, &[4, 3, 3, 3]);
    let r = rand_f64(&mut rng, &[2, 4, 6, 6]);
    let wrong = r
        .to_device(&dev)
        .unwrap()
        .conv2d(
            &w.transpose(0, 1)
                .unwrap()
                .contiguous()
                .unwrap()
                .to_device(&dev)
                .unwrap(),
            1,
            1,
            1,
            1,
        )
        .unwrap();
    let b = Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap();
    let want = run(&x, &w, &b, &r, &Device::Cpu, DType::F64, true);
    assert!(rel_err(&wrong, &want[1]) > 1e-2);
}

/// cuDNN batch norm, both modes, against the CPU reference in f64.
#[cfg(feature = "cudnn")]
fn check_batch_norm(dtype: DType, tol: f64) {
    use nvp_kernels::{batch_norm_cudnn, batch_norm_reference};
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(11);
    for dims in [
        &[8, 16, 8, 8][..],
        &[2, 3, 5, 7],
        &[4, 6],
        &[3, 4, 10],
        &[64, 32, 4, 4],
    ] {
        let c = dims[1];
        let x = (rand_f64(&mut rng, dims) * 3.0)
            .unwrap()
            .affine(1.0, 0.5)
            .unwrap();
        let w = rand_f64(&mut rng, &[c]).affine(0.5, 1.0).unwrap();
        let b = rand_f64(&mut rng, &[c]);
        let rm = rand_f64(&mut rng, &[c]);
        let rv = rand_f64(&mut rng, &[c]).affine(0.4, 1.0).unwrap();
        let r = rand_f64(&mut rng, dims);
        let eps = 1e-5;
        // Training: batch statistics and gradients.
        let train = |dev: &Device, dt: DType, cudnn: bool| {
            let var = |t: &Tensor| {
                Var::from_tensor(&t.to_dtype(dt).unwrap().to_device(dev).unwrap()).unwrap()
            };
            let (xv, wv, bv) = (var(&x), var(&w), var(&b));
            let out = if cudnn {
                batch_norm_cudnn(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), None, eps)
            } else {
                batch_norm_reference(
                    xv.as_tensor(),
                    Some((wv.as_tensor(), bv.as_tensor())),
                    None,
                    eps,
                    false,
                )
            }
            .unwrap();
            let rr = r.to_dtype(dt).unwrap().to_device(dev).unwrap();
            let g = (&out.y * &rr)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gr = |v: &Var| g.get(v.as_tensor()).expect("no gradient").clone();
            [
                out.y.clone(),
                out.mean.clone(),
                out.var.detach(),
                gr(&xv),
                gr(&wv),
                gr(&bv),
            ]
        };
        let want = train(&Device::Cpu, DType::F64, false);
        let got = train(&dev, dtype, true);
        for (name, (g, wa)) in ["y", "mean", "var", "dx", "dweight", "dbias"]
            .iter()
            .zip(got.iter().zip(&want))
        {
            assert!(g.device().is_cuda(), "batch norm {name} is not on the GPU");
            let e = rel_err(g, wa);
            if verbose() {
                println!("cuDNN batch norm {dtype:?} train {dims:?} {name}: {e:.3e}");
            }
            assert!(e < tol, "cuDNN batch norm {dtype:?} train {dims:?} {name}: relative error {e:.3e} >= {tol:.0e}");
        }
        // Inference: running statistics.
        let to = |t: &Tensor| t.to_dtype(dtype).unwrap().to_device(&dev).unwrap();
        let got =
            batch_norm_cudnn(&to(&x), &to(&w), &to(&b), Some((&to(&rm), &to(&rv))), eps).unwrap();
        let want = batch_norm_reference(&x, Some((&w, &b)), Some((&rm, &rv)), eps, false).unwrap();
        let e = rel_err(&got.y, &want.y);
        if verbose() {
            println!("cuDNN batch norm {dtype:?} inference {dims:?} y: {e:.3e}");
        }
        assert!(
            e < tol,
            "cuDNN batch norm {dtype:?} inference {dims:?}: relative error {e:.3e} >= {tol:.0e}"
        );
    }
}

#[cfg(feature = "cudnn")]
#[test]
fn cudnn_batch_norm_matches_cpu() {
    check_batch_norm(DType::F64, 1e-10);
    check_batch_norm(DType::F32, 1e-5);
}

/// The dispatcher: cuDNN where it applies, nothing (the caller's candle ops) where it
/// does not — CPU tensors, eps below cuDNN's minimum, switched off.
#[cfg(feature = "cudnn")]
#[test]
fn cudnn_batch_norm_dispatch() {
    let _g = lock();
    let dev = gpu();
    let x = Tensor::ones((4, 3, 2, 2), DType::F32, &dev).unwrap();
    let (w, b) = (
        Tensor::ones(3, DType::F32, &dev).unwrap(),
        Tensor::zeros(3, DType::F32, &dev).unwrap(),
    );
    let try_bn = |x: &Tensor, w: &Tensor, b: &Tensor, eps| {
        nvp_kernels::try_batch_norm_cudnn(x, w, b, None, eps)
            .unwrap()
            .is_some()
    };
    nvp_kernels::set_cudnn(true);
    tuning::set_cudnn_batch_norm(true);
    assert!(try_bn(&x, &w, &b, 1e-5));
    assert!(!try_bn(&x, &w, &b, 1e-6), "eps below cuDNN's minimum");
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    assert!(!try_bn(&cpu(&x), &cpu(&w), &cpu(&b), 1e-5), "CPU tensors");
    tuning::set_cudnn_batch_norm(false);
    assert!(!try_bn(&x, &w, &b, 1e-5), "switched off");
    tuning::set_cudnn_batch_norm(true);
}

/// The in-place running average by cuDNN (`blend_cudnn`: dst ← keep·dst + take·src)
/// against the formula on the CPU, f32 and f64, with a source that is a view at an
/// offset (as the batch statistics are, inside the batch norm's output).
#[cfg(feature = "cudnn")]
#[test]
fn cudnn_running_average_matches_the_formula() {
    let dev = gpu();
    let mut rng = StdRng::seed_from_u64(5);
    for (dtype, tol) in [(DType::F64, 1e-15), (DType::F32, 1e-6)] {
        let dst0 = rand_f64(&mut rng, &[37]);
        let packed = rand_f64(&mut rng, &[100]);
        let (keep, take) = (0.9, 0.1 * 1.25);
        let dst =
            Var::from_tensor(&dst0.to_dtype(dtype).unwrap().to_device(&dev).unwrap()).unwrap();
        let src = packed
            .to_dtype(dtype)
            .unwrap()
            .to_device(&dev)
            .unwrap()
            .narrow(0, 50, 37)
            .unwrap();
        let alias = dst.as_tensor().clone();
        nvp_kernels::blend_cudnn(dst.as_tensor(), &src, keep, take).unwrap();
        let want = ((&dst0 * keep).unwrap() + (packed.narrow(0, 50, 37).unwrap() * take).unwrap())
            .unwrap();
        for (what, t) in [("dst", dst.as_tensor()), ("a clone of dst", &alias)] {
            let e = rel_err(t, &want);
            assert!(e < tol, "{dtype:?}: {what}: relative error {e:.2e}");
        }
        // Mismatched sizes are refused, naming both shapes.
        let err =
            nvp_kernels::blend_cudnn(dst.as_tensor(), &src.narrow(0, 0, 5).unwrap(), keep, take)
                .unwrap_err()
                .to_string();
        assert!(err.contains("[37]") && err.contains("[5]"), "{err}");
    }
}
