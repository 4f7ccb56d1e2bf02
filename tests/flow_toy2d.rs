//! The 2-D toy flow of `examples/toy2d.rs` (`build_flow`): a `Sequential` of affine
//! couplings with MLP conditioners on `(N, 2)` inputs, masks `Mask::channel(i % 2)`,
//! each coupling but the last followed by a rank-2 `FlowBatchNorm`. Smaller (4
//! couplings, 16 hidden units) with randomised parameters: the log-det against the 2×2
//! brute-force Jacobian, the inverse, a train step of the rank-2 batch norm by hand,
//! and the density integrating to one over the plane, in f64 (candle ops) and f32 (the
//! fused kernels).

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use nvp::flow::batch_norm::FlowBatchNormConfig;
use nvp::flow::conditioner::{Mlp, MlpConfig};
use nvp::flow::{
    AffineCoupling, BatchNormVariant, Flow, FlowBatchNorm, Mask, Mode, ParamStore, Sequential,
    StandardNormal,
};

const COUPLINGS: usize = 4;

/// `examples/toy2d.rs`'s `build_flow` with batch norm, at 16 hidden units.
fn build_flow(store: &ParamStore, dtype: DType) -> Sequential {
    let vb = store.var_builder(dtype, &Device::Cpu);
    let mut flow = Sequential::new();
    for i in 0..COUPLINGS {
        let name = format!("coupling{i}");
        let mlp = MlpConfig {
            features: 2,
            hidden: 16,
            hidden_layers: 2,
        };
        let net = Mlp::new(mlp, vb.pp(&name).pp("net")).unwrap();
        flow.push(AffineCoupling::new(Mask::channel(i % 2), net, 2, 2, vb.pp(&name)).unwrap());
        if i + 1 < COUPLINGS {
            let bn = FlowBatchNormConfig::default();
            flow.push(FlowBatchNorm::new(2, bn, vb.pp(format!("{name}_bn"))).unwrap());
        }
    }
    flow
}

/// A randomised toy flow (f64 parameters, copied into `dtype`). `randomise` gives
/// every `weight` 0.6–1.4 (batch-norm scales); the MLPs' linear weights get
/// N(0, 0.5²)/√fan_in instead, so that s and t stay moderate (with all-positive
/// weights t reaches hundreds and the density is too peaked for a grid).
fn toy(dtype: DType, seed: u64) -> Sequential {
    let store = ParamStore::new(seed);
    let f64_flow = build_flow(&store, DType::F64);
    randomise(&store, seed + 1);
    let mut r = rng(seed + 2);
    for (name, var) in store.named_vars() {
        if name.contains(".net.") && name.ends_with("weight") {
            let fan_in = var.dims()[1] as f64;
            let w = randn(var.dims(), 0.5 / fan_in.sqrt(), DType::F64, &mut r);
            var.set(&w).unwrap();
        }
    }
    if dtype == DType::F64 {
        return f64_flow;
    }
    let other = ParamStore::new(0);
    let flow = build_flow(&other, dtype);
    other.load_tensors(&store.tensors()).unwrap();
    flow
}

fn log_prob(flow: &Sequential, x: &Tensor, mode: Mode) -> Vec<f64> {
    let (z, ld) = flow.forward(x, mode).unwrap();
    to_vec_f64(&(StandardNormal.log_prob(&z).unwrap() + ld).unwrap())
}

#[test]
fn toy_flow_logdet_matches_jacobian_and_inverts() {
    let flow = toy(DType::F64, 1);
    assert_eq!(flow.len(), 2 * COUPLINGS - 1);
    let x = randn(&[6, 2], 1.5, DType::F64, &mut rng(2));
    let (z, ld) = flow.forward(&x, Mode::Eval).unwrap();
    let ld = to_vec_f64(&ld);
    for (i, &l) in ld.iter().enumerate() {
        let xi = x.narrow(0, i, 1).unwrap();
        let brute = brute_logdet(|t| Ok(flow.forward(t, Mode::Eval)?.0), &xi);
        assert!((l - brute).abs() <= 1e-10, "sample {i}: {l} vs {brute}");
    }
    assert!(ld.iter().any(|l| l.abs() > 0.2), "{ld:?}");
    let back = flow.inverse(&z).unwrap();
    assert!(max_abs_diff(&back, &x) < 1e-12);
}

/// One train step of the rank-2 batch norm, by hand (per feature over the batch:
/// μ, biased σ²; `y = (x − μ)/sqrt(σ² + ε)`, `ld = −½·Σ_c ln(σ²_c + ε)`, running
/// averages `(1 − m)·(0, 1) + m·(μ, σ²)`), for both variants (from the initial running
/// statistics (0, 1), Appendix E's normalises with the blend), in f64 and f32.
#[test]
fn rank2_batch_norm_train_step_by_hand() {
    let (m, eps) = (0.25, 0.1);
    for dtype in [DType::F64, DType::F32] {
        for variant in [BatchNormVariant::Batch, BatchNormVariant::RunningAverage] {
            let store = ParamStore::new(3);
            let cfg = FlowBatchNormConfig {
                momentum: m,
                eps,
                variant,
                affine: false,
            };
            let vb = store.var_builder(dtype, &Device::Cpu);
            let bn = FlowBatchNorm::new(2, cfg, vb.pp("bn")).unwrap();
            let x = randn(&[5, 2], 0.4, DType::F64, &mut rng(4))
                .affine(1.0, 0.3)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let xv = to_vec_f64(&x);
            let (mean, var) = channel_stats(&xv, 5, 2, 1);
            let blend = |run: f64, b: f64| (1.0 - m) * run + m * b;
            let (mt, vt): (Vec<f64>, Vec<f64>) = match variant {
                BatchNormVariant::Batch => (mean.clone(), var.clone()),
                BatchNormVariant::RunningAverage => (
                    mean.iter().map(|&b| blend(0.0, b)).collect(),
                    var.iter().map(|&b| blend(1.0, b)).collect(),
                ),
            };
            let (y, ld) = bn.forward(&x, Mode::Train).unwrap();
            let tol = if dtype == DType::F64 { 1e-12 } else { 2e-6 };
            let tag = format!("{dtype:?} {variant:?}");
            let y_hand: Vec<f64> = (0..10)
                .map(|i| (xv[i] - mt[i % 2]) / (vt[i % 2] + eps).sqrt())
                .collect();
            assert_close(&format!("{tag} y"), &to_vec_f64(&y), &y_hand, tol);
            let ld_hand = -0.5 * vt.iter().map(|v| (v + eps).ln()).sum::<f64>();
            assert_close(&format!("{tag} ld"), &to_vec_f64(&ld), &[ld_hand; 5], tol);
            let rm: Vec<f64> = mean.iter().map(|&b| blend(0.0, b)).collect();
            let rv: Vec<f64> = var.iter().map(|&b| blend(1.0, b)).collect();
            assert_close(
                &format!("{tag} mean"),
                &to_vec_f64(bn.running_mean()),
                &rm,
                tol,
            );
            assert_close(
                &format!("{tag} var"),
                &to_vec_f64(bn.running_var()),
                &rv,
                tol,
            );
        }
    }
}

/// `exp(log p(x))` of the flow with the standard normal prior integrates to one over the
/// plane, within 1e-4 (measured: 1 − 1e-6 in f64, 1 − 2e-6 in f32): midpoint rule on a
/// 400×400 grid over [−10, 10]² (h = 0.05), the density on
/// the square's border checked negligible. f64 (candle ops) and f32 (fused kernels).
#[test]
fn toy_flow_density_integrates_to_one() {
    let (n, lo, hi) = (400usize, -10.0f64, 10.0f64);
    let h = (hi - lo) / n as f64;
    let mut pts = Vec::with_capacity(2 * n * n);
    for i in 0..n {
        for j in 0..n {
            pts.push(lo + (i as f64 + 0.5) * h);
            pts.push(lo + (j as f64 + 0.5) * h);
        }
    }
    let grid = Tensor::from_vec(pts, (n * n, 2), &Device::Cpu).unwrap();
    for dtype in [DType::F64, DType::F32] {
        let flow = toy(dtype, 5);
        let lp = log_prob(&flow, &grid.to_dtype(dtype).unwrap(), Mode::Eval);
        let integral: f64 = lp.iter().map(|l| l.exp()).sum::<f64>() * h * h;
        let border = (0..n * n)
            .filter(|k| {
                let (i, j) = (k / n, k % n);
                i == 0 || j == 0 || i == n - 1 || j == n - 1
            })
            .map(|k| lp[k].exp())
            .fold(0.0f64, f64::max);
        eprintln!("{dtype:?}: ∫ p = {integral:.6}, max density on the border {border:.1e}");
        assert!(border < 1e-6, "{dtype:?}: mass near the border: {border:e}");
        assert!(
            (integral - 1.0).abs() < 1e-4,
            "{dtype:?}: the density integrates to {integral}"
        );
    }
}
