//! The multi-scale model: exact log-det against a brute-force Jacobian,
//! invertibility of the CIFAR-10 preset, gradients against finite
//! differences, parameter counts against the PyTorch peer, checkpoint
//! round trip and reproducibility.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use nvp::flow::{BatchNormVariant, Flow, Mode, ParamStore, RealNvp, RealNvpConfig};
use rand::Rng;

fn tiny(scales: usize) -> RealNvpConfig {
    RealNvpConfig {
        channels: 3,
        height: 4,
        width: 4,
        scales,
        res_blocks: 1,
        features: 4,
        ..RealNvpConfig::cifar10()
    }
}

fn build(cfg: &RealNvpConfig, dtype: DType, seed: u64) -> (ParamStore, RealNvp) {
    let store = ParamStore::new(seed);
    let model = RealNvp::new(cfg, store.var_builder(dtype, &Device::Cpu)).unwrap();
    (store, model)
}

fn check_model_logdet(cfg: &RealNvpConfig, seed: u64) -> f64 {
    let (store, model) = build(cfg, DType::F64, seed);
    randomise(&store, seed + 1);
    let x = randn(&[1, 3, 4, 4], 1.0, DType::F64, &mut rng(seed + 2));
    let (z, ld) = model.forward(&x, Mode::Eval).unwrap();
    let ld = to_vec_f64(&ld)[0];
    let brute = brute_logdet(|t| Ok(model.forward(t, Mode::Eval)?.0), &x);
    assert!(
        ld.abs() > 1.0,
        "randomised model should not preserve volume: {ld}"
    );
    let err = (ld - brute).abs();
    assert!(
        err <= 1e-8,
        "model log-det {ld} vs brute force {brute}: {err:e}"
    );
    eprintln!(
        "{} scale(s), {:?}: log-det {ld:.6}, |error| vs brute-force Jacobian {err:.2e}",
        cfg.scales, cfg.bn_variant
    );
    assert!(max_abs_diff(&model.inverse(&z).unwrap(), &x) < 1e-10);
    err
}

#[test]
fn two_scale_model_logdet_matches_jacobian() {
    check_model_logdet(&tiny(2), 11);
    check_model_logdet(&tiny(2), 12);
}

#[test]
fn one_scale_model_logdet_matches_jacobian() {
    check_model_logdet(&tiny(1), 13);
}

/// Appendix E's variant at model level, in train mode (where it differs from the batch
/// variant): two train passes of a whole model, from randomised running statistics (so
/// the blend matters), on the fast f32 kernels (`batch_norm_blended`) and on candle's
/// f64 ops agree in `log p` and in every stored running statistic; the train-mode
/// `log p` differs from the batch variant's on the same parameters (the variant
/// reaches the layers); after training, eval mode agrees too, its log-det matches a
/// brute-force Jacobian and the flow inverts.
#[test]
fn running_average_variant_trains_alike_on_fast_f32_and_f64() {
    let cfg = RealNvpConfig {
        bn_variant: BatchNormVariant::RunningAverage,
        bn_momentum: 0.3,
        features: 8,
        ..tiny(2)
    };
    let (s64, m64) = build(&cfg, DType::F64, 14);
    randomise(&s64, 15);
    let (s32, m32) = build(&cfg, DType::F32, 0);
    s32.load_tensors(&s64.tensors()).unwrap();
    let batch_cfg = RealNvpConfig {
        bn_variant: BatchNormVariant::Batch,
        ..cfg.clone()
    };
    let (sb, mb) = build(&batch_cfg, DType::F64, 0);
    sb.load_tensors(&s64.tensors()).unwrap();
    let mut r = rng(16);
    for step in 0..2 {
        let x64 = randn(&[4, 3, 4, 4], 1.0, DType::F64, &mut r);
        let x32 = x64.to_dtype(DType::F32).unwrap();
        let lp64 = m64.log_prob(&x64, Mode::Train).unwrap();
        let lp32 = m32.log_prob(&x32, Mode::Train).unwrap();
        let d = max_abs_diff(&lp32.to_dtype(DType::F64).unwrap(), &lp64);
        assert!(d < 2e-4, "step {step}: train log p differs by {d:e}");
        eprintln!("running-average variant, train step {step}: |Δ log p| {d:.1e}");
        if step == 0 {
            let lpb = mb.log_prob(&x64, Mode::Train).unwrap();
            let db = max_abs_diff(&lpb, &lp64);
            assert!(db > 0.1, "the variants agree in train mode ({db:e})");
        }
    }
    let (a, b) = (s64.tensors(), s32.tensors());
    let mut n = 0;
    for (name, t64) in &a {
        if name.ends_with("_bn.running_mean") || name.ends_with("_bn.running_var") {
            let d = max_abs_diff(&b[name].to_dtype(DType::F64).unwrap(), t64);
            assert!(d < 1e-5, "{name}: running statistics differ by {d:e}");
            n += 1;
        }
    }
    assert_eq!(n, 2 * 10, "two statistics per coupling-output batch norm");
    let x64 = randn(&[2, 3, 4, 4], 1.0, DType::F64, &mut r);
    let lp64 = m64.log_prob(&x64, Mode::Eval).unwrap();
    let lp32 = m32
        .log_prob(&x64.to_dtype(DType::F32).unwrap(), Mode::Eval)
        .unwrap();
    let d = max_abs_diff(&lp32.to_dtype(DType::F64).unwrap(), &lp64);
    assert!(d < 2e-4, "eval log p differs by {d:e}");
    let x0 = x64.narrow(0, 0, 1).unwrap();
    let (z, ld) = m64.forward(&x0, Mode::Eval).unwrap();
    let ld = to_vec_f64(&ld)[0];
    let brute = brute_logdet(|t| Ok(m64.forward(t, Mode::Eval)?.0), &x0);
    assert!(
        (ld - brute).abs() <= 1e-8,
        "eval log-det {ld} vs brute {brute}"
    );
    assert!(max_abs_diff(&m64.inverse(&z).unwrap(), &x0) < 1e-10);
}

#[test]
fn learned_batch_norm_affine_logdet_matches_jacobian() {
    let cfg = RealNvpConfig {
        bn_affine: true,
        ..tiny(2)
    };
    check_model_logdet(&cfg, 21);
    // Its parameters: a log-scale and a shift per channel of every coupling-output
    // batch norm, beside the running statistics.
    let (store, _) = build(&cfg, DType::F64, 21);
    let (plain, _) = build(&tiny(2), DType::F64, 21);
    let names: Vec<String> = store.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert!(names.contains(&"scale0.checker0_bn.log_scale".to_string()));
    assert!(names.contains(&"scale1.checker2_bn.shift".to_string()));
    // 10 couplings: 3 + 3 at 3 and 12 channels, 4 at 6 channels.
    let extra = 2 * (3 * 3 + 3 * 12 + 4 * 6);
    assert_eq!(store.num_trainable(), plain.num_trainable() + extra);
}

#[test]
fn latent_shapes_and_encode_decode() {
    let (store, model) = build(&tiny(2), DType::F64, 15);
    randomise(&store, 16);
    assert_eq!(model.latent_shapes(), &[[6, 2, 2], [6, 2, 2]]);
    assert_eq!(model.num_couplings(), 10);
    let x = randn(&[3, 3, 4, 4], 1.0, DType::F64, &mut rng(17));
    let (zs, _) = model.encode(&x, Mode::Eval).unwrap();
    assert_eq!(zs[0].dims(), &[3, 6, 2, 2]);
    let back = model.decode(&zs).unwrap();
    assert!(max_abs_diff(&back, &x) < 1e-10);
    let flat = model.flatten_latents(&zs).unwrap();
    let again = model.split_latents(&flat).unwrap();
    for (a, b) in zs.iter().zip(&again) {
        assert_eq!(max_abs_diff(a, b), 0.0);
    }
    // wrong input shape is an error naming both shapes
    let bad = Tensor::zeros((1, 3, 8, 8), DType::F64, &Device::Cpu).unwrap();
    let err = model.forward(&bad, Mode::Eval).unwrap_err().to_string();
    assert!(
        err.contains("[1, 3, 8, 8]") && err.contains("(N, 3, 4, 4)"),
        "{err}"
    );
}

#[test]
fn log_prob_is_prior_plus_logdet() {
    let (store, model) = build(&tiny(2), DType::F64, 18);
    randomise(&store, 19);
    let x = randn(&[2, 3, 4, 4], 1.0, DType::F64, &mut rng(20));
    let (z, ld) = model.forward(&x, Mode::Eval).unwrap();
    let lp = to_vec_f64(&model.log_prob(&x, Mode::Eval).unwrap());
    let zv = to_vec_f64(&z);
    let ldv = to_vec_f64(&ld);
    for i in 0..2 {
        let zz: f64 = zv[i * 48..(i + 1) * 48].iter().map(|v| v * v).sum();
        let hand = -0.5 * zz - 24.0 * (2.0 * std::f64::consts::PI).ln() + ldv[i];
        assert!((lp[i] - hand).abs() < 1e-10);
    }
}

#[test]
fn cifar10_preset_inverts_in_f32() {
    // The paper's CIFAR-10 architecture in f32, eval mode, with randomised
    // gains/scales/biases and running statistics measured on data.
    let cfg = RealNvpConfig {
        bn_momentum: 0.5,
        ..RealNvpConfig::cifar10()
    };
    let (store, model) = build(&cfg, DType::F32, 21);
    // As the PyTorch peer's `check`: random output-conv gains N(0, 1),
    // conv biases N(0, 0.1), tanh scales U(0.5, 1.5).
    let mut r = rng(22);
    for (name, var) in store.trainable_vars() {
        let conv_bias = ["inp.bias", "conv1.bias", "conv2.bias", "out.bias"]
            .iter()
            .any(|s| name.ends_with(s));
        let n = var.elem_count();
        let v: Vec<f64> = if name.ends_with("out.g") {
            randn(&[n], 1.0, DType::F64, &mut r).to_vec1().unwrap()
        } else if conv_bias {
            randn(&[n], 0.1, DType::F64, &mut r).to_vec1().unwrap()
        } else if name.ends_with("scale") {
            (0..n).map(|_| r.random_range(0.5..1.5)).collect()
        } else {
            continue;
        };
        let t = Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap();
        var.set(&t.to_dtype(DType::F32).unwrap()).unwrap();
    }
    let logit = |r: &mut rand::rngs::StdRng, n: usize| -> Tensor {
        let v: Vec<f32> = (0..n * 3072)
            .map(|_| {
                let p: f32 = 0.05 + 0.9 * r.random_range(0.0f32..1.0);
                (p / (1.0 - p)).ln()
            })
            .collect();
        Tensor::from_vec(v, (n, 3, 32, 32), &Device::Cpu).unwrap()
    };
    // three train-mode passes with momentum 0.5: the running statistics are
    // 7/8 data, 1/8 initial values (as 20 passes at PyTorch's 0.1 would be)
    for _ in 0..3 {
        model.forward(&logit(&mut r, 8), Mode::Train).unwrap();
    }
    let x = logit(&mut r, 2);
    // Both convolution algorithms of the fast path. The inverse recomputes s and t
    // from a reconstructed half, so the convolution's rounding error sets the floor
    // of the inverse error: im2col + GEMM (rounding ≈ 1e-6 relative) measured 6.1e-5,
    // Winograd F(4×4, 3×3) (≈ 1e-5 relative, see crates/nvp-kernels/tests/conv.rs)
    // 2.8e-4 — in logit space, i.e. below 0.02 of a grey level after the sigmoid.
    // (Other tests of this binary may run meanwhile on either algorithm; their
    // tolerances hold for both.)
    // The log-dets (≈ −3880) of the two algorithms agree to f32 rounding (measured
    // 1.3e-7 relative); below, Winograd's against the same model in f64.
    let mut lds: Vec<Vec<f64>> = Vec::new();
    for (winograd, tol) in [(false, 1e-4), (true, 5e-4)] {
        nvp_kernels::tuning::set_winograd(winograd);
        let (z, ld) = model.forward(&x, Mode::Eval).unwrap();
        let back = model.inverse(&z).unwrap();
        let err = max_abs_diff(&back, &x);
        let ldv = to_vec_f64(&ld);
        assert!(
            ldv.iter().all(|l| l.is_finite() && l.abs() > 10.0),
            "{ldv:?}"
        );
        if let Some(first) = lds.first() {
            assert_close("log-dets of the two algorithms", &ldv, first, 2e-6);
        }
        lds.push(ldv.clone());
        assert!(err <= tol, "winograd {winograd}: inverse error {err:e}");
        eprintln!(
            "cifar10 preset f32 (winograd {winograd}) inverse max error {err:e}, log-dets {ldv:?}, max |z| {}",
            max_abs_diff(&z, &z.zeros_like().unwrap())
        );
    }
    nvp_kernels::tuning::set_winograd(true);
    // The same weights and statistics in f64 (candle's ops, no fast path): the f32
    // preset's log-dets and latents against it.
    let t0 = std::time::Instant::now();
    let (store64, model64) = build(&cfg, DType::F64, 21);
    let tensors: HashMap<String, Tensor> = store
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F64).unwrap()))
        .collect();
    store64.load_tensors(&tensors).unwrap();
    let x64 = x.to_dtype(DType::F64).unwrap();
    let (z64, ld64) = model64.forward(&x64, Mode::Eval).unwrap();
    let (z32, _) = model.forward(&x, Mode::Eval).unwrap();
    let (ld64v, z_err) = (
        to_vec_f64(&ld64),
        max_abs_diff(&z32.to_dtype(DType::F64).unwrap(), &z64),
    );
    eprintln!(
        "cifar10 preset: f64 log-dets {ld64v:?}, f32 max |z - z64| {z_err:e} ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );
    // Measured: 8e-8 relative (3.1e-4 of ≈ −3884), latents 1.5e-5 (|z| up to 4.3).
    assert_close("log-dets, f32 Winograd against f64", &lds[1], &ld64v, 1e-6);
    assert!(z_err < 2e-4, "latents, f32 Winograd against f64: {z_err:e}");
}

#[test]
fn nll_gradients_match_finite_differences() {
    let (store, model) = build(&tiny(2), DType::F64, 23);
    randomise(&store, 24);
    let x = randn(&[2, 3, 4, 4], 1.0, DType::F64, &mut rng(25));
    let nll = |m: &RealNvp| -> Tensor {
        m.log_prob(&x, Mode::Train)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap()
    };
    let loss = nll(&model);
    let grads = loss.backward().unwrap();
    let vars: HashMap<String, Var> = store.named_vars().into_iter().collect();
    let probes = [
        ("scale0.checker0.net.out.g", 1),
        ("scale0.checker1.scale", 2),
        ("scale0.channel2.net.blocks.0.conv1.v", 17),
        ("scale0.channel0.net.bn_out.weight", 3),
        ("scale1.checker3.net.out.bias", 0),
        ("scale1.checker0.net.blocks.0.bn2.bias", 2),
    ];
    for (name, idx) in probes {
        let var = vars
            .get(name)
            .unwrap_or_else(|| panic!("no parameter {name}"));
        let g = to_vec_f64(grads.get(var.as_tensor()).expect("gradient"))[idx];
        let orig = to_vec_f64(var.as_tensor());
        let h = 1e-6;
        let eval_at = |delta: f64| -> f64 {
            let mut v = orig.clone();
            v[idx] += delta;
            var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            to_vec_f64(&nll(&model))[0]
        };
        let fd = (eval_at(h) - eval_at(-h)) / (2.0 * h);
        eval_at(0.0);
        let err = (g - fd).abs();
        assert!(
            err <= 1e-6 * (1.0 + fd.abs()),
            "{name}[{idx}]: autograd {g} vs finite difference {fd}"
        );
        assert!(g.abs() > 1e-8, "{name}[{idx}] gradient should not vanish");
    }
}

#[test]
fn parameter_counts_match_pytorch_peer() {
    // ../shared/reference/README.md: 13,198,105 ('paper') and 1,718,841
    // ('small') trainable parameters; 30,772 and 8,292 batch-norm buffers.
    for (cfg, params, buffers) in [
        (RealNvpConfig::cifar10(), 13_198_105, 30_772),
        (RealNvpConfig::cifar10_small(), 1_718_841, 8_292),
    ] {
        let (store, _model) = build(&cfg, DType::F32, 0);
        assert_eq!(store.num_trainable(), params);
        // PyTorch also counts one `num_batches_tracked` per BatchNorm2d.
        let n_bn_inner = 10 * (2 * cfg.res_blocks + 1);
        assert_eq!(store.num_buffers() + n_bn_inner, buffers);
    }
}

#[test]
fn checkpoint_round_trip_through_safetensors() {
    let (store, model) = build(&tiny(2), DType::F32, 26);
    randomise(&store, 27);
    let x = randn(&[2, 3, 4, 4], 1.0, DType::F32, &mut rng(28));
    let lp = model.log_prob(&x, Mode::Eval).unwrap();
    let dir = std::env::temp_dir().join(format!("nvp-flow-ckpt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&store.tensors(), &path).unwrap();
    let (store2, model2) = build(&tiny(2), DType::F32, 999);
    let loaded = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    store2.load_tensors(&loaded).unwrap();
    assert_eq!(
        max_abs_diff(&model2.log_prob(&x, Mode::Eval).unwrap(), &lp),
        0.0
    );
    // a checkpoint of another architecture names the tensor and both shapes
    let (store3, _) = build(
        &RealNvpConfig {
            features: 8,
            ..tiny(2)
        },
        DType::F32,
        0,
    );
    let err = store3.load_tensors(&loaded).unwrap_err().to_string();
    assert!(
        err.contains("tensor `scale") && err.contains("shape"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn seeded_init_and_sampling_are_reproducible() {
    let (s1, m1) = build(&tiny(2), DType::F32, 42);
    let (s2, m2) = build(&tiny(2), DType::F32, 42);
    let (s3, _) = build(&tiny(2), DType::F32, 43);
    let t1 = s1.tensors();
    let t2 = s2.tensors();
    let t3 = s3.tensors();
    let key = "scale0.checker0.net.inp.v";
    assert_eq!(max_abs_diff(&t1[key], &t2[key]), 0.0);
    assert!(max_abs_diff(&t1[key], &t3[key]) > 0.0);
    let a = m1.sample(4, 0.7, &mut rng(1)).unwrap();
    let b = m2.sample(4, 0.7, &mut rng(1)).unwrap();
    let c = m2.sample(4, 0.7, &mut rng(2)).unwrap();
    assert_eq!(a.dims(), &[4, 3, 4, 4]);
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert!(max_abs_diff(&a, &c) > 0.0);
}

#[test]
fn fast_f32_path_matches_f64_reference_in_both_modes() {
    // f32 on the CPU runs the fused kernels (nvp-kernels); f64 runs candle's
    // own ops. Same parameters, same input: log-dets and latents agree to
    // f32 rounding, in eval mode and in train mode (batch statistics).
    let cfg = RealNvpConfig {
        features: 8,
        ..tiny(2)
    };
    let (s64, m64) = build(&cfg, DType::F64, 30);
    randomise(&s64, 31);
    let (s32, m32) = build(&cfg, DType::F32, 0);
    s32.load_tensors(&s64.tensors()).unwrap();
    let x64 = randn(&[4, 3, 4, 4], 1.0, DType::F64, &mut rng(32));
    let x32 = x64.to_dtype(DType::F32).unwrap();
    for mode in [Mode::Eval, Mode::Train] {
        let (z64, ld64) = m64.forward(&x64, mode).unwrap();
        let (z32, ld32) = m32.forward(&x32, mode).unwrap();
        let dz = max_abs_diff(&z32.to_dtype(DType::F64).unwrap(), &z64);
        let dld = max_abs_diff(&ld32.to_dtype(DType::F64).unwrap(), &ld64);
        assert!(dz < 1e-4, "{mode:?}: latents differ by {dz:e}");
        assert!(
            dld < 1e-3,
            "{mode:?}: log-dets differ by {dld:e} (|ld| ≈ {:?})",
            to_vec_f64(&ld64)
        );
    }
    // the train-mode passes updated the running statistics identically
    let (a, b) = (s64.tensors(), s32.tensors());
    let key = "scale0.checker0_bn.running_var";
    let d = max_abs_diff(&a[key], &b[key].to_dtype(DType::F64).unwrap());
    assert!(d < 1e-5, "running statistics differ by {d:e}");
}

#[test]
fn frozen_model_shares_parameters_without_a_graph() {
    let (store, model) = build(&tiny(2), DType::F32, 40);
    randomise(&store, 41);
    let frozen =
        RealNvp::new(&tiny(2), store.frozen_var_builder(DType::F32, &Device::Cpu)).unwrap();
    let x = randn(&[2, 3, 4, 4], 1.0, DType::F32, &mut rng(42));
    let a = model.log_prob(&x, Mode::Eval).unwrap();
    let b = frozen.log_prob(&x, Mode::Eval).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert!(b.backward().unwrap().get(&x).is_none());
    // an update of the parameters (an optimizer step) is seen by the twin
    let (_, var) = store
        .trainable_vars()
        .into_iter()
        .find(|(n, _)| n.ends_with("checker1.scale"))
        .unwrap();
    var.set(&(var.as_tensor() * 1.5).unwrap()).unwrap();
    let a2 = model.log_prob(&x, Mode::Eval).unwrap();
    let b2 = frozen.log_prob(&x, Mode::Eval).unwrap();
    assert!(max_abs_diff(&a, &a2) > 1e-3);
    assert_eq!(max_abs_diff(&a2, &b2), 0.0);
}

/// `RealNvp::fix_weights` (each convolution's weight normalised once, for a model
/// loaded for evaluation): latents, log-det and log-likelihood in eval mode and the
/// inverse are those of the model that normalises at every pass, to the bit, in f32
/// on the fast CPU path and in f64; a later change of a gain is not seen, as
/// documented.
#[test]
fn fixed_weights_give_the_same_bits() {
    let cfg = RealNvpConfig {
        height: 8,
        width: 8,
        res_blocks: 2,
        ..tiny(2)
    };
    let bits = |t: &Tensor| {
        to_vec_f64(t)
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>()
    };
    for dtype in [DType::F32, DType::F64] {
        let (store, _) = build(&cfg, dtype, 70);
        randomise(&store, 71);
        let twin = || RealNvp::new(&cfg, store.frozen_var_builder(dtype, &Device::Cpu)).unwrap();
        let plain = twin();
        let mut fixed = twin();
        fixed.fix_weights().unwrap();
        let x = randn(&[3, 3, 8, 8], 1.0, dtype, &mut rng(72));
        let (z0, ld0) = plain.forward(&x, Mode::Eval).unwrap();
        let (z1, ld1) = fixed.forward(&x, Mode::Eval).unwrap();
        assert_eq!(bits(&z0), bits(&z1), "{dtype:?}: latents");
        assert_eq!(bits(&ld0), bits(&ld1), "{dtype:?}: log-det");
        let (lp0, lp1) = (
            plain.log_prob(&x, Mode::Eval).unwrap(),
            fixed.log_prob(&x, Mode::Eval).unwrap(),
        );
        assert_eq!(bits(&lp0), bits(&lp1), "{dtype:?}: log-likelihood");
        assert_eq!(
            bits(&plain.inverse(&z0).unwrap()),
            bits(&fixed.inverse(&z0).unwrap()),
            "{dtype:?}: inverse"
        );
        // A gain changed afterwards: the plain twin sees it, the fixed one does not.
        let (_, g) = store
            .trainable_vars()
            .into_iter()
            .find(|(n, _)| n.ends_with("checker0.net.blocks.0.conv2.g"))
            .unwrap();
        g.set(&(g.as_tensor() * 1.5).unwrap()).unwrap();
        let lp2 = plain.log_prob(&x, Mode::Eval).unwrap();
        assert!(max_abs_diff(&lp0, &lp2) > 1e-4, "{dtype:?}");
        assert_eq!(bits(&fixed.log_prob(&x, Mode::Eval).unwrap()), bits(&lp1));
    }
}

/// Appendix C: the network is fully convolutional, so the parameters of a model
/// trained at one size build the same flow at a larger one. At 2× (8×8 from 4×4) the
/// weights load unchanged, the log-det still matches a brute-force Jacobian and the
/// flow still inverts; the last (coarsest) latent covers 2×2 instead of 1×1 pixels.
#[test]
fn a_model_extrapolates_to_larger_images_with_the_same_parameters() {
    let (store, small) = build(&tiny(2), DType::F64, 50);
    randomise(&store, 51);
    let big_cfg = RealNvpConfig {
        height: 8,
        width: 8,
        ..tiny(2)
    };
    let (big_store, big) = build(&big_cfg, DType::F64, 0);
    big_store.load_tensors(&store.tensors()).unwrap();
    assert_eq!(big_store.num_trainable(), store.num_trainable());
    assert_eq!(small.latent_shapes(), &[[6, 2, 2], [6, 2, 2]]);
    assert_eq!(big.latent_shapes(), &[[6, 4, 4], [6, 4, 4]]);
    let x = randn(&[1, 3, 8, 8], 1.0, DType::F64, &mut rng(52));
    let (z, ld) = big.forward(&x, Mode::Eval).unwrap();
    let ld = to_vec_f64(&ld)[0];
    let brute = brute_logdet(|t| Ok(big.forward(t, Mode::Eval)?.0), &x);
    assert!(
        (ld - brute).abs() <= 1e-8,
        "log-det {ld} vs brute force {brute}"
    );
    assert!(max_abs_diff(&big.inverse(&z).unwrap(), &x) < 1e-10);
    let s = big.sample(2, 0.7, &mut rng(53)).unwrap();
    assert_eq!(s.dims(), &[2, 3, 8, 8]);
}

/// Appendix D: keeping the latents of the coarsest scales and drawing the rest anew.
/// Keeping every scale reconstructs the input; what is kept survives a decode and a
/// second encode; the kept fractions are the latents' shares of the dimensions.
#[test]
fn conceptual_compression_keeps_the_coarse_latents() {
    let (store, model) = build(&tiny(2), DType::F64, 60);
    randomise(&store, 61);
    let x = randn(&[2, 3, 4, 4], 1.0, DType::F64, &mut rng(62));
    let (zs, _) = model.encode(&x, Mode::Eval).unwrap();
    assert_eq!(model.kept_fraction(2), 1.0);
    assert_eq!(model.kept_fraction(1), 0.5);
    assert_eq!(model.kept_fraction(0), 0.0);
    // All kept: the latents are untouched and decode to the input.
    let all = model.resample_finer(&zs, 2, 1.0, &mut rng(63)).unwrap();
    assert!(max_abs_diff(&model.decode(&all).unwrap(), &x) < 1e-10);
    // The coarsest kept: the finer latent is a fresh prior draw (the one the same
    // generator gives), the coarse one is the input's, also after decode + encode.
    let half = model.resample_finer(&zs, 1, 0.5, &mut rng(64)).unwrap();
    assert_eq!(max_abs_diff(&half[1], &zs[1]), 0.0);
    // the fresh latent is T = 0.5 times the generator's standard normals, drawn here
    // with rand_distr (not by the prior), unrounded
    assert_eq!(to_vec_f64(&half[0]), normals(64, zs[0].elem_count(), 0.5));
    let y = model.decode(&half).unwrap();
    let (again, _) = model.encode(&y, Mode::Eval).unwrap();
    assert!(max_abs_diff(&again[1], &zs[1]) < 1e-10);
    assert!(max_abs_diff(&again[0], &half[0]) < 1e-10);
    assert!(
        max_abs_diff(&y, &x) > 0.1,
        "a resampled latent changes the image"
    );
    // Bad requests are errors.
    assert!(model.resample_finer(&zs, 3, 1.0, &mut rng(65)).is_err());
    assert!(model
        .resample_finer(&zs[..1], 1, 1.0, &mut rng(65))
        .is_err());
}

/// Appendix F: a class-conditional model. For a given label the flow is a bijection
/// with the exact log-det (brute-force Jacobian) and inverse; another label gives
/// another bijection; the label must be given, in range, one per sample.
#[test]
fn class_conditional_model_is_exact_per_label() {
    let cfg = RealNvpConfig {
        classes: 3,
        ..tiny(2)
    };
    let (store, model) = build(&cfg, DType::F64, 70);
    randomise(&store, 71);
    assert!(model.is_conditional());
    let x = randn(&[1, 3, 4, 4], 1.0, DType::F64, &mut rng(72));
    let mut lds = Vec::new();
    let mut zs = Vec::new();
    for label in 0..3 {
        let y = model.one_hot(&[label]).unwrap();
        let f = |t: &Tensor| -> candle_core::Result<(Tensor, Tensor)> {
            let (zs, ld) = model.encode_cond(t, Some(&y), Mode::Eval)?;
            Ok((model.flatten_latents(&zs)?, ld))
        };
        let (z, ld) = f(&x).unwrap();
        let ld = to_vec_f64(&ld)[0];
        let brute = brute_logdet(|t| Ok(f(t)?.0), &x);
        assert!((ld - brute).abs() <= 1e-8, "label {label}: {ld} vs {brute}");
        let back = model
            .decode_cond(&model.split_latents(&z).unwrap(), Some(&y))
            .unwrap();
        assert!(max_abs_diff(&back, &x) < 1e-10, "label {label}: inverse");
        lds.push(ld);
        zs.push(z);
    }
    assert!(max_abs_diff(&zs[0], &zs[1]) > 1e-3 && (lds[0] - lds[2]).abs() > 1e-6);
    // log p(x | y) = prior of the latents + log-det, and samples of the right shape
    let lp = model
        .log_prob_cond(&x, Some(&model.one_hot(&[1]).unwrap()), Mode::Eval)
        .unwrap();
    let z = to_vec_f64(&zs[1]);
    let prior: f64 = z
        .iter()
        .map(|v| -0.5 * v * v - 0.5 * (2.0 * std::f64::consts::PI).ln())
        .sum();
    assert!((to_vec_f64(&lp)[0] - (prior + lds[1])).abs() < 1e-9);
    let s = model
        .sample_cond(2, 0.7, Some(&model.one_hot(&[0, 2]).unwrap()), &mut rng(73))
        .unwrap();
    assert_eq!(s.dims(), &[2, 3, 4, 4]);
    // errors: no label, a label out of range, one label for two images, a label for
    // an unconditional model
    let err = model.encode(&x, Mode::Eval).unwrap_err().to_string();
    assert!(err.contains("class-conditional (3 classes)"), "{err}");
    let err = model.one_hot(&[3]).unwrap_err().to_string();
    assert!(
        err.contains("label 3") && err.contains("3 classes"),
        "{err}"
    );
    let x2 = randn(&[2, 3, 4, 4], 1.0, DType::F64, &mut rng(74));
    let one = model.one_hot(&[0]).unwrap();
    assert!(model.encode_cond(&x2, Some(&one), Mode::Eval).is_err());
    let (_, plain) = build(&tiny(2), DType::F64, 75);
    assert!(plain.encode_cond(&x, Some(&one), Mode::Eval).is_err());
}

/// The class-conditional s/t networks (input conv over C + K channels) on the fast
/// f32 kernels, fused training op included, against candle's f64 ops: latents,
/// log-dets and the loss gradient of the input convolution's weights.
#[test]
fn class_conditional_fast_path_matches_f64_reference() {
    let cfg = RealNvpConfig {
        features: 8,
        classes: 4,
        ..tiny(2)
    };
    let (s64, m64) = build(&cfg, DType::F64, 80);
    randomise(&s64, 81);
    let (s32, m32) = build(&cfg, DType::F32, 0);
    s32.load_tensors(&s64.tensors()).unwrap();
    let x64 = randn(&[4, 3, 4, 4], 1.0, DType::F64, &mut rng(82));
    let x32 = x64.to_dtype(DType::F32).unwrap();
    let labels = [3, 0, 1, 3];
    let (y64, y32) = (m64.one_hot(&labels).unwrap(), m32.one_hot(&labels).unwrap());
    for mode in [Mode::Eval, Mode::Train] {
        let lp64 = m64.log_prob_cond(&x64, Some(&y64), mode).unwrap();
        let lp32 = m32.log_prob_cond(&x32, Some(&y32), mode).unwrap();
        let d = max_abs_diff(&lp32.to_dtype(DType::F64).unwrap(), &lp64);
        assert!(d < 1e-3, "{mode:?}: log p differs by {d:e}");
        if mode == Mode::Train {
            let key = "scale0.checker1.net.inp.v";
            let grad = |store: &ParamStore, lp: &Tensor| {
                let g = lp.sum_all().unwrap().backward().unwrap();
                let var = store.var_map().data().lock().unwrap()[key].clone();
                g.get(var.as_tensor())
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
            };
            let (g64, g32) = (grad(&s64, &lp64), grad(&s32, &lp32));
            assert_eq!(
                g64.dims(),
                &[8, 3 + 4, 3, 3],
                "input conv sees C + K channels"
            );
            let scale = to_vec_f64(&g64).iter().fold(0f64, |m, v| m.max(v.abs()));
            let dg = max_abs_diff(&g32, &g64);
            assert!(
                dg < 1e-4 * scale.max(1.0),
                "gradient differs by {dg:e} (max {scale:e})"
            );
        }
    }
}

/// `n` standard normal draws of the generator seeded `seed`, in order, times `t`:
/// what the prior must produce, drawn without it.
fn normals(seed: u64, n: usize, t: f64) -> Vec<f64> {
    use rand_distr::{Distribution, StandardNormal as N01};
    let mut r = rng(seed);
    (0..n)
        .map(|_| {
            let z: f64 = N01.sample(&mut r);
            t * z
        })
        .collect()
}

/// The prior's draws against `normals` (rand_distr, the same seed): `sample(T)` is exactly
/// `T·z`, unrounded for an f64 model, rounded once for an f32 one; `T = 1` gives `z`. A
/// model's sample at `T = 0` is the decoded zero latent, and at `T = 0.7` the decoded
/// `0.7·z` (f64: bit for bit, so latents rounded to f32 on the way would show).
#[test]
fn prior_samples_scale_by_the_temperature_without_rounding() {
    use nvp::flow::StandardNormal;
    let cpu = Device::Cpu;
    let draw = |t: f64, dtype: DType| {
        StandardNormal
            .sample(&[2, 5], t, &mut rng(5), dtype, &cpu)
            .unwrap()
    };
    let z = normals(5, 10, 1.0);
    let z07 = normals(5, 10, 0.7);
    assert_eq!(to_vec_f64(&draw(1.0, DType::F64)), z);
    let s64 = to_vec_f64(&draw(0.7, DType::F64));
    assert_eq!(s64, z07);
    assert!(
        s64.iter().all(|&v| f64::from(v as f32) != v),
        "f64 draws must not pass through f32: {s64:?}"
    );
    let s32: Vec<f32> = draw(0.7, DType::F32)
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let want32: Vec<f32> = z07.iter().map(|&v| v as f32).collect();
    assert_eq!(s32, want32);
    let zero = to_vec_f64(&draw(0.0, DType::F64));
    assert!(zero.iter().all(|&v| v == 0.0), "{zero:?}");

    let (store, model) = build(&tiny(2), DType::F64, 90);
    randomise(&store, 91);
    let decode = |v: Vec<f64>| {
        let z = Tensor::from_vec(v, (2, 48), &cpu).unwrap();
        model.decode(&model.split_latents(&z).unwrap()).unwrap()
    };
    let cold = model.sample(2, 0.0, &mut rng(92)).unwrap();
    assert_eq!(max_abs_diff(&cold, &decode(vec![0.0; 96])), 0.0);
    let warm = model.sample(2, 0.7, &mut rng(93)).unwrap();
    assert_eq!(max_abs_diff(&warm, &decode(normals(93, 96, 0.7))), 0.0);
    assert!(max_abs_diff(&warm, &cold) > 0.1);
}

/// Bits/dim through the real pipeline (dequantise + logit, the model's `log_prob`,
/// `bits_per_dim_batch`), exactly. A fresh model is the identity in eval mode: its
/// output convolutions start at zero gain (s = t = 0), and its batch norms hold the
/// running statistics (0, 1), which with `bn_eps = 1e-300` divide by
/// sqrt(1 + 1e-300) = 1 with log-det −½·ln(1 + 1e-300) = 0. So log p(y) is the standard
/// normal's, and a constant image (every sub-pixel `pixel`, every noise `u`) has the
/// closed form, per dimension, computed in Python (plain `math`):
/// x = pixel + u, p = α + (1 − 2α)·x/256, y = ln(p/(1 − p)),
/// bpd = −(−y²/2 − ln(2π)/2 + ln(1 − 2α) − ln 256 − ln p − ln(1 − p)) / ln 2, α = 0.05:
/// (128, 0.5) → 7.477768989526107, (0, 0.5) → 11.229193406626116,
/// (255, 0.25) → 11.177841100215149. Three such images in one batch; f64 at 1e-12, the
/// f32 fast path at 1e-5.
#[test]
fn bits_per_dim_of_constant_images_through_an_identity_model() {
    use nvp::data::preprocess::bits_per_dim_batch;
    use nvp::data::Dequantize;
    let cases = [
        (128u8, 0.5, 7.477768989526107),
        (0u8, 0.5, 11.229193406626116),
        (255u8, 0.25, 11.177841100215149),
    ];
    let cfg = RealNvpConfig {
        bn_eps: 1e-300,
        ..tiny(2)
    };
    let dims = cfg.dims();
    let dq = Dequantize::new(0.05).unwrap();
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let (_, model) = build(&cfg, dtype, 95);
        let mut y = Vec::new();
        let mut ld_pre = Vec::new();
        for &(pixel, u, _) in &cases {
            let (pixels, noise) = (vec![pixel; dims], vec![u; dims]);
            if dtype == DType::F64 {
                let (yi, ld) = dq.apply_with_noise_f64(&pixels, &noise).unwrap();
                y.extend(yi);
                ld_pre.push(ld);
            } else {
                let mut yi = vec![0f32; dims];
                ld_pre.push(dq.apply_with_noise(&pixels, &noise, &mut yi).unwrap());
                y.extend(yi.into_iter().map(f64::from));
            }
        }
        let x = Tensor::from_vec(y, (3, 3, 4, 4), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        // the identity: every latent is its image's constant, the log-det 0
        let (z, ld) = model.forward(&x, Mode::Eval).unwrap();
        assert_eq!(to_vec_f64(&ld), vec![0.0; 3], "{dtype:?}");
        let (xv, zv) = (to_vec_f64(&x), to_vec_f64(&z));
        assert_eq!(zv, xv, "{dtype:?}: constant images come out unchanged");
        let lp = to_vec_f64(&model.log_prob(&x, Mode::Eval).unwrap());
        let bpd = bits_per_dim_batch(&lp, &ld_pre, dims).unwrap();
        for (b, &(pixel, u, want)) in bpd.iter().zip(&cases) {
            assert!(
                (b - want).abs() < tol,
                "{dtype:?} pixel {pixel}, u {u}: {b} bits/dim vs {want}"
            );
        }
    }
}

/// The class-conditional model on the fast f32 CPU path inverts (the f32 inverse was
/// only exercised on the GPU): decode(encode(x | y) | y) = x for each sample's label,
/// and decoding with other labels does not give x back.
#[test]
fn class_conditional_model_inverts_in_f32() {
    let cfg = RealNvpConfig {
        features: 8,
        classes: 3,
        ..tiny(2)
    };
    let (store, model) = build(&cfg, DType::F32, 100);
    randomise(&store, 101);
    let x = randn(&[3, 3, 4, 4], 1.0, DType::F32, &mut rng(102));
    assert!(nvp_kernels::coupling_uses_fast_path(&[&x]));
    let y = model.one_hot(&[2, 0, 1]).unwrap();
    let (zs, ld) = model.encode_cond(&x, Some(&y), Mode::Eval).unwrap();
    assert!(to_vec_f64(&ld).iter().all(|l| l.abs() > 1.0));
    let back = model.decode_cond(&zs, Some(&y)).unwrap();
    let err = max_abs_diff(&back, &x);
    assert!(err < 1e-5, "f32 class-conditional inverse error {err:e}");
    let other = model.one_hot(&[0, 1, 2]).unwrap();
    let wrong = model.decode_cond(&zs, Some(&other)).unwrap();
    assert!(max_abs_diff(&wrong, &x) > 1e-2);
}

/// `approx_parameters` is within 2 % of the real parameter counts (13,198,105 for the
/// paper's CIFAR-10 model and 1,718,841 for the peer's `small`, as `nvp bench` and the
/// PyTorch peer count them), and `validate` refuses models too large to build, or with
/// too many scales, naming the key, before anything is allocated.
#[test]
fn oversized_models_are_refused_by_key() {
    use nvp::flow::RealNvpConfig;
    for (cfg, real) in [
        (RealNvpConfig::cifar10(), 13_198_105.0),
        (RealNvpConfig::cifar10_small(), 1_718_841.0),
    ] {
        let est = cfg.approx_parameters();
        assert!((est / real - 1.0).abs() < 0.02, "{est} vs {real}");
        cfg.validate().unwrap();
    }
    let huge = RealNvpConfig {
        features: 1_000_000,
        ..RealNvpConfig::cifar10()
    };
    let err = huge.validate().unwrap_err().to_string();
    assert!(
        err.contains("model.features") && err.contains("parameters"),
        "{err}"
    );
    let deep = RealNvpConfig {
        res_blocks: 100_000,
        ..RealNvpConfig::cifar10()
    };
    assert!(deep.validate().is_err());
    let scales = RealNvpConfig {
        scales: 100,
        ..RealNvpConfig::cifar10()
    };
    let err = scales.validate().unwrap_err().to_string();
    assert!(err.contains("model.scales"), "{err}");
}
