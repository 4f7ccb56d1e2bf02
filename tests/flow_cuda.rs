//! The whole multi-scale flow on a CUDA device against the CPU in f64: latents,
//! per-sample log-det (train mode with batch statistics, eval mode with running
//! averages), the inverse, and the gradients of the mean log-likelihood with respect
//! to every parameter (train mode: through batch norm's batch statistics, the
//! couplings and the convolutions' backward passes).
//!
//! Built only with the `cuda` feature (never in CI: no GPU there); `scripts/build-cuda.sh`
//! builds this test binary and `scripts/gpu-check.sh` runs it on a GPU machine.
//! Without a CUDA device every test fails with that message.
//!
//! Tolerances (max |got − want| / max |want| over a tensor):
//! - CUDA f64: 1e-9 (latents, log-det, gradients), inverse error 1e-9 absolute. A
//!   gradient is compared against at least 1e-5 of the model's largest: the biases of
//!   convolutions followed by batch norm have a gradient of exactly zero, and rounding
//!   noise on both devices.
//! - CUDA f32 with strict FP32 convolutions (`nvp_kernels::set_tf32(false)`): 1e-4
//!   (log-det, latents), inverse error 1e-3 absolute.
//! - CUDA f32 with TF32 convolutions (the default on CUDA, as in PyTorch): 5e-2 (the
//!   s/t networks' inputs rounded to 10 mantissa bits, ~1e-3 per convolution,
//!   compounded through the couplings), inverse error 1e-2 absolute: the coupling is
//!   inverted exactly whatever its s and t, but they are recomputed from a half that
//!   is only equal up to f32 rounding, and TF32 rounding amplifies such differences
//!   where an input sits near a 10-bit rounding boundary. The measured figures are
//!   printed (`--nocapture`).
#![cfg(feature = "cuda")]

mod common;

use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use nvp::flow::{Adam, AdamConfig, Flow, Mode, ParamStore, RealNvp, RealNvpConfig, UpdateMode};
use nvp_kernels::tuning;

static SWITCHES: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    SWITCHES.lock().unwrap_or_else(|e| e.into_inner())
}

fn gpu() -> Device {
    Device::new_cuda(0).unwrap_or_else(|e| panic!("no CUDA device 0: {e}"))
}

fn cfg() -> RealNvpConfig {
    model_16x16()
}

/// The same randomised parameters on `device` in `dtype`.
fn model(device: &Device, dtype: DType) -> (ParamStore, RealNvp) {
    model_packed(device, dtype, false)
}

/// [`model`], each s/t network's parameters packed into one variable where `packed`
/// (`RealNvp::new_packed`).
fn model_packed(device: &Device, dtype: DType, packed: bool) -> (ParamStore, RealNvp) {
    let cpu = ParamStore::new(5);
    let _ = RealNvp::new(&cfg(), cpu.var_builder(DType::F64, &Device::Cpu)).unwrap();
    randomise(&cpu, 6);
    let store = ParamStore::new(5);
    let m = build_model(&cfg(), &store, dtype, device, packed);
    store.load_tensors(&cpu.tensors()).unwrap();
    (store, m)
}

fn input() -> Tensor {
    randn(&[8, 3, 16, 16], 1.0, DType::F64, &mut rng(9))
}

fn rel(got: &Tensor, want: &Tensor) -> f64 {
    let g = got.to_device(&Device::Cpu).unwrap();
    max_abs_diff(&g.to_dtype(DType::F64).unwrap(), want)
        / to_vec_f64(want)
            .iter()
            .fold(1e-300f64, |m, v| m.max(v.abs()))
}

/// Forward in both modes, inverse (eval mode), on `dev` in `dtype` against CPU f64.
fn check_forward(what: &str, dev: &Device, dtype: DType, tol: f64, inv_tol: f64) {
    check_forward_with(what, dev, dtype, tol, inv_tol, &|_| ())
}

/// [`check_forward`], calling `on_gpu(false)` before the CPU's runs and `on_gpu(true)`
/// before the GPU's (to switch a path on for the GPU only).
fn check_forward_with(
    what: &str,
    dev: &Device,
    dtype: DType,
    tol: f64,
    inv_tol: f64,
    on_gpu: &dyn Fn(bool),
) {
    let x = input();
    for mode in [Mode::Train, Mode::Eval] {
        on_gpu(false);
        let (want_store, want_m) = model(&Device::Cpu, DType::F64);
        let (z0, ld0) = want_m.forward(&x, mode).unwrap();
        on_gpu(true);
        let (store, m) = model(dev, dtype);
        let xd = x.to_dtype(dtype).unwrap().to_device(dev).unwrap();
        let (z, ld) = m.forward(&xd, mode).unwrap();
        assert!(
            z.device().is_cuda() && ld.device().is_cuda(),
            "{what}: not on the GPU"
        );
        let (ez, eld) = (rel(&z, &z0), rel(&ld, &ld0));
        println!(
            "{what} {mode:?}: latents {ez:.2e}, log-det {eld:.2e} (log-det[0] {:.6})",
            to_vec_f64(&ld0)[0]
        );
        assert!(
            ez < tol,
            "{what} {mode:?}: latents relative error {ez:.2e} >= {tol:.0e}"
        );
        assert!(
            eld < tol,
            "{what} {mode:?}: log-det relative error {eld:.2e} >= {tol:.0e}"
        );
        // Train mode moved every batch norm's running averages (on the GPU by cuDNN, in
        // place); eval mode left them as they were.
        let (want_t, got_t) = (want_store.tensors(), store.tensors());
        let mut worst = (0.0f64, String::new());
        for (name, w) in &want_t {
            let e = rel(&got_t[name], w);
            if e > worst.0 {
                worst = (e, name.clone());
            }
        }
        println!("{what} {mode:?}: parameters and buffers after the forward: worst relative error {:.2e} ({})", worst.0, worst.1);
        assert!(
            worst.0 < tol,
            "{what} {mode:?}: {} after the forward: relative error {:.2e}",
            worst.1,
            worst.0
        );
        if mode == Mode::Eval {
            let back = m.inverse(&z).unwrap().to_device(&Device::Cpu).unwrap();
            let e = max_abs_diff(&back.to_dtype(DType::F64).unwrap(), &x);
            println!("{what}: inverse max |x - f^-1(f(x))| {e:.2e}");
            assert!(
                e < inv_tol,
                "{what}: inverse error {e:.2e} >= {inv_tol:.0e}"
            );
        }
    }
}

#[test]
fn f64_forward_inverse_match_cpu() {
    let _g = lock();
    check_forward("CUDA f64", &gpu(), DType::F64, 1e-9, 1e-9);
}

#[test]
fn f32_forward_inverse_match_cpu() {
    let _g = lock();
    nvp_kernels::set_tf32(false);
    check_forward(
        "CUDA f32 (FP32 convolutions)",
        &gpu(),
        DType::F32,
        1e-4,
        1e-3,
    );
    nvp_kernels::set_tf32(true);
    check_forward(
        "CUDA f32 (TF32 convolutions)",
        &gpu(),
        DType::F32,
        5e-2,
        1e-2,
    );
}

/// Gradients of the train-mode mean log-likelihood for every parameter, CUDA f64
/// against CPU f64.
#[test]
fn f64_train_gradients_match_cpu() {
    let _g = lock();
    check_gradients("CUDA f64 train gradients");
}

/// The GPU ops that are off by default until measured (`NVP_CUDNN_BIAS`,
/// `NVP_WEIGHT_NORM_OP`, `NVP_CUDNN_BLEND`, `NVP_CUDA_KEEP_FREED`), all on: forward
/// in both modes with the running averages after it, inverse and gradients against the
/// CPU as above.
#[test]
fn f64_and_f32_with_the_opt_in_gpu_ops_match_cpu() {
    let _g = lock();
    fn set(on: bool) {
        tuning::set_cudnn_bias(on);
        tuning::set_weight_norm_op(on);
        tuning::set_cudnn_blend(on);
        tuning::set_keep_freed_cuda_memory(on);
    }
    /// Switches them off again however the test ends.
    struct Off;
    impl Drop for Off {
        fn drop(&mut self) {
            set(false);
        }
    }
    let _off = Off;
    set(true);
    let dev = gpu();
    assert!(nvp_kernels::keep_freed_cuda_memory(&dev).unwrap());
    assert!(nvp_kernels::cudnn_bias_enabled() && nvp_kernels::weight_norm_op_enabled());
    check_forward("CUDA f64, opt-in ops", &dev, DType::F64, 1e-9, 1e-9);
    nvp_kernels::set_tf32(false);
    check_forward("CUDA f32 (FP32), opt-in ops", &dev, DType::F32, 1e-4, 1e-3);
    nvp_kernels::set_tf32(true);
    check_gradients("CUDA f64 train gradients, opt-in ops");
}

/// The s/t networks as one node built from the GPU's ops (`NVP_RESNET_OPS`, off by
/// default until measured: cuDNN's convolutions and batch norms with a written-out
/// backward) on the GPU, against the layer-by-layer network on the CPU: forward in
/// both modes with the running averages, inverse and gradients, in f64 and strict f32.
/// Then with two other opt-in ops on as well.
#[test]
fn f64_and_f32_with_the_resnet_ops_match_cpu() {
    let _g = lock();
    /// Switches the paths off again however the test ends.
    struct Off;
    impl Drop for Off {
        fn drop(&mut self) {
            tuning::set_resnet_ops(false);
            tuning::set_cudnn_bias(false);
            tuning::set_weight_norm_op(false);
        }
    }
    let _off = Off;
    let on_gpu = |on: bool| tuning::set_resnet_ops(on);
    let dev = gpu();
    check_forward_with(
        "CUDA f64, resnet ops",
        &dev,
        DType::F64,
        1e-9,
        1e-9,
        &on_gpu,
    );
    nvp_kernels::set_tf32(false);
    check_forward_with(
        "CUDA f32 (FP32), resnet ops",
        &dev,
        DType::F32,
        1e-4,
        1e-3,
        &on_gpu,
    );
    nvp_kernels::set_tf32(true);
    check_gradients_with("CUDA f64 train gradients, resnet ops", &on_gpu, false);
    // The networks' parameters packed on the GPU (as `nvp train` builds them there
    // with NVP_RESNET_OPS=1), against the unpacked layer-by-layer CPU model.
    check_gradients_with(
        "CUDA f64 train gradients, resnet ops, packed parameters",
        &on_gpu,
        true,
    );
    tuning::set_cudnn_bias(true);
    tuning::set_weight_norm_op(true);
    check_gradients_with(
        "CUDA f64 train gradients, resnet ops + cuDNN bias + weight-norm op",
        &on_gpu,
        false,
    );
}

/// Gradients of the train-mode mean log-likelihood for every parameter, CUDA f64
/// against CPU f64, under `what`.
fn check_gradients(what: &str) {
    check_gradients_with(what, &|_| (), false)
}

/// [`check_gradients`], calling `on_gpu` as [`check_forward_with`] does; the GPU
/// model's s/t networks' parameters packed where `packed_gpu`. Gradients by parameter
/// name (a packed group's split into its members').
fn check_gradients_with(what: &str, on_gpu: &dyn Fn(bool), packed_gpu: bool) {
    let x = input();
    let grads = |dev: &Device, packed: bool| {
        let (store, m) = model_packed(dev, DType::F64, packed);
        let lp = m.log_prob(&x.to_device(dev).unwrap(), Mode::Train).unwrap();
        let g = lp.mean_all().unwrap().backward().unwrap();
        let by_name = store.grads_by_name(&g).unwrap();
        let mut out: Vec<_> = store
            .tensors()
            .into_keys()
            .filter(|n| !nvp::flow::params::is_buffer(n))
            .map(|n| {
                let t = by_name
                    .get(&n)
                    .unwrap_or_else(|| panic!("no gradient for {n}"));
                let t = t.to_device(&Device::Cpu).unwrap();
                (n, t)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    };
    on_gpu(false);
    let want = grads(&Device::Cpu, false);
    on_gpu(true);
    let got = grads(&gpu(), packed_gpu);
    on_gpu(false);
    assert_eq!(want.len(), got.len());
    // The bias of a convolution followed by a train-mode batch norm (every convolution
    // of the s/t networks but the last) has a gradient of exactly zero: the batch mean
    // takes any per-channel shift away. Both devices give rounding noise there (about
    // 1e-15 of the largest gradient), which no relative error of the tensor itself can
    // compare, so a tensor's error is taken against at least 1e-5 of the largest
    // gradient of the model.
    let largest = want
        .iter()
        .flat_map(|(_, w)| to_vec_f64(w))
        .fold(0.0f64, |m, v| m.max(v.abs()));
    let floor = 1e-5 * largest;
    let mut worst = (0.0f64, String::new());
    let mut zero = 0;
    for ((n, w), (n2, g)) in want.iter().zip(&got) {
        assert_eq!(n, n2);
        let w_max = to_vec_f64(w).iter().fold(0.0f64, |m, v| m.max(v.abs()));
        if w_max < floor {
            zero += 1;
        }
        let g = g
            .to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let e = max_abs_diff(&g, w) / w_max.max(floor);
        if e > worst.0 {
            worst = (e, n.clone());
        }
    }
    // The flow's parameters do get gradients: zero ones are the exception.
    assert!(
        zero < want.len() / 2,
        "{zero} of {} gradients below 1e-5 of the largest ({largest:.3e})",
        want.len()
    );
    println!(
        "{what}: {} tensors ({zero} zero in exact arithmetic, below \
         {floor:.1e}), largest {largest:.3e}, worst relative error {:.2e} ({})",
        want.len(),
        worst.0,
        worst.1
    );
    assert!(
        worst.0 < 1e-9,
        "{what}: gradient of {}: relative error {:.2e}",
        worst.1,
        worst.0
    );
}

/// Adam on the GPU's flat path (`UpdateMode::Auto` off the CPU: the gradients gathered
/// once for the norm and the step; with `NVP_CUDNN_BLEND` the parameters also updated
/// in place by cuDNN) against the CPU's per-variable update, five steps with norm
/// clipping: parameters and norms in f64 to 1e-12, in f32 to 1e-6 (candle's CUDA
/// kernels may contract a multiply-add the CPU rounds twice).
#[test]
fn adam_flat_path_matches_cpu() {
    let _g = lock();
    /// Switches the blend off again however the test ends.
    struct Off;
    impl Drop for Off {
        fn drop(&mut self) {
            tuning::set_cudnn_blend(false);
        }
    }
    let _off = Off;
    let dev = gpu();
    for blend in [false, true] {
        tuning::set_cudnn_blend(blend);
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
            let what = format!("Adam {dtype:?}, blend {blend}");
            let init = [
                randn(&[37], 1.0, dtype, &mut rng(21)),
                randn(&[2, 3, 4], 1.0, dtype, &mut rng(22)),
            ];
            let vars = |d: &Device| -> Vec<Var> {
                init.iter()
                    .map(|t| Var::from_tensor(&t.to_device(d).unwrap()).unwrap())
                    .collect()
            };
            let (cpu_vars, gpu_vars) = (vars(&Device::Cpu), vars(&dev));
            let adam = |vs: &[Var]| {
                let named = vs
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (format!("p{i}"), v.clone()))
                    .collect();
                let cfg = AdamConfig {
                    lr: 0.01,
                    ..AdamConfig::default()
                };
                Adam::new(named, cfg).unwrap()
            };
            let (mut on_cpu, mut on_gpu) = (adam(&cpu_vars), adam(&gpu_vars));
            on_cpu.set_update_mode(UpdateMode::PerVariable);
            for step in 0..5 {
                let loss = |vs: &[Var]| {
                    let a = (vs[0].as_tensor().sqr().unwrap() * (1.0 + step as f64))
                        .unwrap()
                        .sum_all()
                        .unwrap();
                    let b = vs[1].as_tensor().sin().unwrap().sum_all().unwrap();
                    (a + b).unwrap().backward().unwrap()
                };
                let (gc, gg) = (loss(&cpu_vars), loss(&gpu_vars));
                let (nc, ng) = (
                    on_cpu.grad_norm(&gc).unwrap(),
                    on_gpu.grad_norm(&gg).unwrap(),
                );
                assert!(
                    (nc - ng).abs() <= tol * nc,
                    "{what}, step {step}: norm {ng} vs {nc}"
                );
                let clip = (2.0 / nc).min(1.0);
                on_cpu.step(&gc, clip).unwrap();
                on_gpu.step(&gg, clip).unwrap();
                for (c, g) in cpu_vars.iter().zip(&gpu_vars) {
                    let want = c.as_tensor().to_dtype(DType::F64).unwrap();
                    let e = rel(g.as_tensor(), &want);
                    assert!(
                        e <= tol,
                        "{what}, step {step}: parameter relative error {e:.2e}"
                    );
                }
            }
            println!("{what}: five steps agree with the CPU");
        }
    }
}

/// A class-conditional model (App. F: the labels as extra input planes of every s/t
/// network) on the GPU in f64 against the CPU: log p(x | y) in both modes and the
/// inverse given the labels.
#[test]
fn f64_class_conditional_matches_cpu() {
    let _g = lock();
    let cfg = RealNvpConfig {
        classes: 3,
        ..cfg()
    };
    let cpu = ParamStore::new(15);
    let want = RealNvp::new(&cfg, cpu.var_builder(DType::F64, &Device::Cpu)).unwrap();
    randomise(&cpu, 16);
    let dev = gpu();
    let store = ParamStore::new(15);
    let m = RealNvp::new(&cfg, store.var_builder(DType::F64, &dev)).unwrap();
    store.load_tensors(&cpu.tensors()).unwrap();
    let x = input();
    let labels = [0, 1, 2, 0, 1, 2, 2, 1];
    let (y0, y) = (want.one_hot(&labels).unwrap(), m.one_hot(&labels).unwrap());
    let xd = x.to_device(&dev).unwrap();
    for mode in [Mode::Eval, Mode::Train] {
        let lp0 = want.log_prob_cond(&x, Some(&y0), mode).unwrap();
        let lp = m.log_prob_cond(&xd, Some(&y), mode).unwrap();
        let e = rel(&lp, &lp0);
        println!("CUDA f64 class-conditional {mode:?}: log p relative error {e:.2e}");
        assert!(e < 1e-9, "{mode:?}: log p relative error {e:.2e}");
    }
    let (zs, _) = m.encode_cond(&xd, Some(&y), Mode::Eval).unwrap();
    let back = m.decode_cond(&zs, Some(&y)).unwrap();
    let e = max_abs_diff(&back.to_device(&Device::Cpu).unwrap(), &x);
    assert!(e < 1e-9, "inverse error {e:.2e}");
}
