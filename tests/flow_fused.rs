//! The fused training network (`nvp_kernels::resnet_train`, taken by
//! `ResNet::forward_t` in train mode on the f32 CPU path) against the same network
//! built op by op (`tuning::set_fused_resnet(false)`): the same kernels and the same
//! arithmetic, so the outputs, every gradient and the updated running statistics must
//! be equal — compared with `==` on f32 (a zero's sign may differ: candle adds each
//! gradient to a fresh zero, the fused op does not).

mod common;

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use nvp::flow::conditioner::ResNetConfig;
use nvp::flow::{Mode, ParamStore};
use nvp_kernels::tuning;

/// Serialises the tests that flip the process-wide switch.
static SWITCH: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    SWITCH.lock().unwrap_or_else(|e| e.into_inner())
}

/// Asserts `a == b` element by element (f32), naming the tensor.
fn assert_equal(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let av: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let bv: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let bad = av.iter().zip(&bv).filter(|(x, y)| x != y).count();
    assert_eq!(
        bad,
        0,
        "{what}: {bad} of {} elements differ (max |diff| {:e})",
        av.len(),
        max_abs_diff(a, b)
    );
}

/// Output, gradients (by name, plus `x`) and all variables after the step.
type Run = TrainRun;

fn run_resnet(fused: bool, dims: &[usize], cfg: ResNetConfig, seed: u64) -> Run {
    tuning::set_fused_resnet(fused);
    resnet_train_pass(dims, cfg, DType::F32, seed)
}

fn compare(a: &Run, b: &Run) {
    assert_equal("output", &a.0, &b.0);
    assert_eq!(a.1.len(), b.1.len());
    for (name, ga) in &a.1 {
        assert_equal(&format!("gradient of {name}"), ga, &b.1[name]);
    }
    assert_eq!(a.2.len(), b.2.len());
    for (name, ta) in &a.2 {
        assert_equal(name, ta, &b.2[name]);
    }
}

#[test]
fn fused_resnet_equals_layer_by_layer() {
    let _guard = lock();
    let cfg = |channels, blocks| ResNetConfig {
        channels,
        features: 8,
        blocks,
        ..ResNetConfig::default()
    };
    // 8×8: an even number of 4-pixel tile columns (the AVX2 transforms of the Winograd
    // weight gradient); 7×10 and 4×4: odd (its portable transforms; im2col under the
    // other algorithms), partial tiles; one block and three. "winograd" takes the
    // Winograd weight gradient on these small sizes too (`set_winograd_wgrad_always`).
    for (i, (dims, c)) in [
        (vec![2, 3, 8, 8], cfg(3, 2)),
        (vec![3, 4, 7, 10], cfg(4, 1)),
        (vec![1, 6, 4, 4], cfg(6, 3)),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 100 + 10 * i as u64;
        // Each convolution algorithm: the batch norm is applied inside the Winograd AVX2
        // transforms, before the portable ones and im2col.
        for algo in ["winograd", "winograd-portable", "im2col"] {
            tuning::set_winograd(algo != "im2col");
            tuning::set_winograd_portable(algo == "winograd-portable");
            tuning::set_winograd_wgrad_always(algo == "winograd");
            let fused = run_resnet(true, &dims, c, seed);
            let plain = run_resnet(false, &dims, c, seed);
            compare(&fused, &plain);
            // Not trivially equal: the output and the gradients are non-zero.
            let max = |t: &Tensor| {
                t.abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            };
            assert!(max(&fused.0) > 0.0 && max(&fused.1["x"]) > 0.0, "{algo}");
        }
    }
    tuning::set_winograd(true);
    tuning::set_winograd_portable(false);
    tuning::set_winograd_wgrad_always(false);
    tuning::set_fused_resnet(true);
}

/// One training-mode pass of a whole model (checkerboard and channel couplings, two
/// scales): log-likelihood, every parameter gradient and the running statistics.
#[test]
fn fused_resnet_in_the_whole_model() {
    let _guard = lock();
    let run = |fused: bool| -> Run {
        tuning::set_fused_resnet(fused);
        train_pass(&small_model_config(), DType::F32, 7)
    };
    let fused = run(true);
    let plain = run(false);
    tuning::set_fused_resnet(true);
    compare(&fused, &plain);
}

/// The AVX-512 F/VL compilation of the Winograd blocks (`tuning::set_winograd_avx512`,
/// the default where the CPU has them) runs the AVX2 compilation's instructions with
/// more registers: a whole 16×16 model's train-mode pass (both scales' convolutions by
/// Winograd, the batch norms fused into their transforms, all three of each
/// convolution's kernels) gives the same bits, in f32 and, where the CPU has
/// AVX512-BF16, with bf16 products. Skipped, and said so, on a CPU without AVX-512.
#[test]
fn avx512_compilation_gives_the_avx2_bits() {
    #[cfg(target_arch = "x86_64")]
    let wide = is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl");
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    if !wide {
        eprintln!("skipped: this CPU has no AVX-512 F/VL");
        return;
    }
    let _guard = lock();
    tuning::set_winograd_wgrad_always(true);
    for bf16 in [false, true] {
        if bf16 && !nvp::flow::bf16_products_available() {
            eprintln!("bf16 part skipped: this CPU has no AVX512-BF16");
            continue;
        }
        let run = |avx512: bool| -> Run {
            tuning::set_winograd_avx512(avx512);
            let _bf16 = bf16.then(nvp::flow::Bf16Products::enable);
            train_pass(&model_16x16(), DType::F32, 23)
        };
        let (a, b) = (run(true), run(false));
        tuning::set_winograd_avx512(true);
        compare(&a, &b);
    }
    tuning::set_winograd_wgrad_always(false);
}

/// The coupling-output batch norm in train mode on the fused f32 kernels
/// (`nvp_kernels::batch_norm`, and `batch_norm_blended` for Appendix E's variant)
/// against candle's own ops (`set_fast_cpu(false)`): output, log-det, the input
/// gradient of a random linear loss on both, and the running averages after the step.
/// Different arithmetic (f64 statistics in the kernels): measured ≤ 1.7e-7 relative,
/// checked at 2e-6. Twice: with ε = 1e-5 and batch variances ≈ 2.25 (the defaults), and
/// with ε = 0.1, batch variances ≈ 0.01 and running variances in [0.01, 0.1], where ε
/// dominates σ² + ε, so that a dropped or misplaced ε in one path (e.g. `1/(√σ² + ε)`)
/// is far above the tolerance (at the defaults it would move `y` by only ≈ 2e-6).
#[test]
fn flow_batch_norm_kernels_match_candle_in_both_variants() {
    use nvp::flow::batch_norm::{FlowBatchNorm, FlowBatchNormConfig};
    use nvp::flow::{BatchNormVariant, Flow};
    let _guard = lock();
    for (eps, x_scale, small_running_var) in [(1e-5, 1.5, false), (0.1, 0.1, true)] {
        for variant in [BatchNormVariant::Batch, BatchNormVariant::RunningAverage] {
            let run = |fast: bool| -> Vec<(String, Vec<f64>)> {
                nvp_kernels::set_fast_cpu(fast);
                let store = ParamStore::new(40);
                let cfg = FlowBatchNormConfig {
                    variant,
                    momentum: 0.3,
                    eps,
                    ..FlowBatchNormConfig::default()
                };
                let vb = store.var_builder(DType::F32, &Device::Cpu);
                let bn = FlowBatchNorm::new(6, cfg, vb.pp("bn")).unwrap();
                randomise(&store, 41);
                if small_running_var {
                    let v: Vec<f32> = (0..6).map(|k| 0.01 + 0.018 * k as f32).collect();
                    let t = Tensor::from_vec(v, 6, &Device::Cpu).unwrap();
                    let vars: HashMap<String, Var> = store.named_vars().into_iter().collect();
                    vars["bn.running_var"].set(&t).unwrap();
                    assert_eq!(to_vec_f64(bn.running_var())[0], 0.01f32 as f64);
                }
                let x = Var::from_tensor(&randn(&[4, 6, 5, 5], x_scale, DType::F32, &mut rng(42)))
                    .unwrap();
                let r = randn(&[4, 6, 5, 5], 1.0, DType::F32, &mut rng(43));
                let (y, ld) = bn.forward(x.as_tensor(), Mode::Train).unwrap();
                let loss = ((&y * &r).unwrap().sum_all().unwrap()
                    + (ld.sum_all().unwrap() * 0.1).unwrap())
                .unwrap();
                let g = loss.backward().unwrap();
                let gx = g.get(x.as_tensor()).expect("no gradient for x");
                let (ye, lde) = bn.forward(x.as_tensor(), Mode::Eval).unwrap();
                vec![
                    ("y".into(), to_vec_f64(&y)),
                    ("log-det".into(), to_vec_f64(&ld)),
                    ("dx".into(), to_vec_f64(gx)),
                    ("running_mean".into(), to_vec_f64(bn.running_mean())),
                    ("running_var".into(), to_vec_f64(bn.running_var())),
                    ("eval y".into(), to_vec_f64(&ye)),
                    ("eval log-det".into(), to_vec_f64(&lde)),
                    ("inverse".into(), to_vec_f64(&bn.inverse(&ye).unwrap())),
                ]
            };
            let fast = run(true);
            let reference = run(false);
            nvp_kernels::set_fast_cpu(true);
            for ((what, a), (_, b)) in fast.iter().zip(&reference) {
                let scale = b.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
                let err = a
                    .iter()
                    .zip(b)
                    .fold(0.0f64, |m, (p, q)| m.max((p - q).abs()))
                    / scale;
                assert!(
                    err <= 2e-6,
                    "ε {eps} {variant:?} {what}: relative error {err:e}"
                );
                eprintln!("ε {eps} {variant:?} {what}: relative error {err:.1e}");
            }
        }
    }
}

/// The fused f32 path as a Jacobian: log-dets of a ResNet coupling (eval mode for one
/// sample; train mode over the whole batch, through the fused `resnet_train` op) and
/// of the coupling-output batch norm (eval mode) against the brute-force Jacobian built
/// by autograd through the custom ops' hand-written backward passes (`Coupling`,
/// `MaskMul`, `BatchNormPlain`, the convolutions), in f32. Tolerance 1e-5·max(1, |ld|)
/// (measured errors ≤ 6e-7).
#[test]
fn fused_f32_log_dets_match_brute_force_jacobians() {
    use nvp::flow::batch_norm::{FlowBatchNorm, FlowBatchNormConfig};
    use nvp::flow::nn::BatchNormConfig;
    use nvp::flow::{AffineCoupling, Flow, Mask};
    let _guard = lock();
    nvp_kernels::set_fast_cpu(true);
    tuning::set_fused_resnet(true);
    let check = |what: &str, ld: f64, brute: f64| {
        let err = (ld - brute).abs();
        assert!(
            err <= 1e-5 * ld.abs().max(1.0),
            "{what}: log-det {ld} vs brute force {brute} ({err:e})"
        );
        assert!(ld.abs() > 0.1, "{what}: trivial log-det {ld}");
        eprintln!("{what}: log-det {ld:.6}, |error| vs brute force {err:.2e}");
    };
    for (i, (mask, channels)) in [(Mask::checkerboard(1), 3), (Mask::channel(0), 4)]
        .into_iter()
        .enumerate()
    {
        let store = ParamStore::new(60 + i as u64);
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let cfg = ResNetConfig {
            channels,
            features: 8,
            blocks: 2,
            bn: BatchNormConfig::default(),
            ..ResNetConfig::default()
        };
        let layer = AffineCoupling::resnet(mask, cfg, vb.pp("c")).unwrap();
        randomise(&store, 70 + i as u64);
        let x = randn(
            &[2, channels, 4, 4],
            1.0,
            DType::F32,
            &mut rng(80 + i as u64),
        );
        assert!(nvp_kernels::coupling_uses_fast_path(&[&x]));
        assert!(nvp_kernels::resnet_train_applies(&x, &x));
        let kind = layer.mask().kind();
        // eval, one sample
        let x0 = x.narrow(0, 0, 1).unwrap();
        let (_, ld) = layer.forward(&x0, Mode::Eval).unwrap();
        let brute = brute_logdet(|t| Ok(layer.forward(t, Mode::Eval)?.0), &x0);
        check(&format!("{kind:?} eval"), to_vec_f64(&ld)[0], brute);
        // train, the whole batch (block triangular: Σ of the per-sample log-dets)
        let (_, ld) = layer.forward(&x, Mode::Train).unwrap();
        let total: f64 = to_vec_f64(&ld).iter().sum();
        let brute = brute_logdet(|t| Ok(layer.forward(t, Mode::Train)?.0), &x);
        check(&format!("{kind:?} train"), total, brute);
    }
    let store = ParamStore::new(90);
    let cfg = FlowBatchNormConfig {
        eps: 0.1,
        ..FlowBatchNormConfig::default()
    };
    let bn =
        FlowBatchNorm::new(3, cfg, store.var_builder(DType::F32, &Device::Cpu).pp("bn")).unwrap();
    randomise(&store, 91);
    let x = randn(&[1, 3, 4, 4], 1.0, DType::F32, &mut rng(92));
    assert!(nvp_kernels::batch_norm_uses_fast_path(&x, &[]));
    let (_, ld) = bn.forward(&x, Mode::Eval).unwrap();
    let brute = brute_logdet(|t| Ok(bn.forward(t, Mode::Eval)?.0), &x);
    check("batch norm eval", to_vec_f64(&ld)[0], brute);
}
