//! Exactness of each bijection: masks and squeeze on explicit tensors,
//! inverse∘forward = id, and log-det = brute-force log|det J| in f64.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use nvp::flow::batch_norm::{FlowBatchNorm, FlowBatchNormConfig};
use nvp::flow::conditioner::{Mlp, MlpConfig, ResNetConfig};
use nvp::flow::nn::BatchNormConfig;
use nvp::flow::squeeze::{squeeze, unsqueeze, Squeeze};
use nvp::flow::{AffineCoupling, BatchNormVariant, Flow, Mask, Mode, ParamStore};

const TOL: f64 = 1e-8;

#[test]
fn checkerboard_mask_pattern() {
    let m0 = Mask::checkerboard(0).values(&[2, 2, 3]).unwrap();
    // parity 0: b = 1 where row + col is odd
    let plane0 = [0, 1, 0, 1, 0, 1];
    assert_eq!(&m0[..6], &plane0);
    assert_eq!(&m0[6..], &plane0, "same pattern in every channel");
    let m1 = Mask::checkerboard(1).values(&[1, 2, 3]).unwrap();
    assert_eq!(m1, vec![1, 0, 1, 0, 1, 0]);
}

#[test]
fn channel_mask_pattern() {
    let m0 = Mask::channel(0).values(&[4, 1, 2]).unwrap();
    assert_eq!(m0, vec![1, 1, 1, 1, 0, 0, 0, 0]);
    let m1 = Mask::channel(1).values(&[4, 1, 2]).unwrap();
    assert_eq!(m1, vec![0, 0, 0, 0, 1, 1, 1, 1]);
    let v = Mask::channel(0).values(&[2]).unwrap();
    assert_eq!(v, vec![1, 0]);
    assert!(Mask::channel(0).values(&[1, 2, 2]).is_err());
    assert!(Mask::checkerboard(0).values(&[4]).is_err());
}

#[test]
fn squeeze_channel_order_and_inverse() {
    let (c, h, w) = (2usize, 4usize, 6usize);
    let x = Tensor::arange(0f32, (c * h * w) as f32, &Device::Cpu)
        .unwrap()
        .reshape((1, c, h, w))
        .unwrap();
    let y = squeeze(&x).unwrap();
    assert_eq!(y.dims(), &[1, 4 * c, h / 2, w / 2]);
    let yv = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for di in 0..2 {
        for dj in 0..2 {
            for c0 in 0..c {
                for i in 0..h / 2 {
                    for j in 0..w / 2 {
                        let ch = (di * 2 + dj) * c + c0;
                        let got = yv[(ch * (h / 2) + i) * (w / 2) + j];
                        let want = ((c0 * h + 2 * i + di) * w + 2 * j + dj) as f32;
                        assert_eq!(got, want, "channel {ch} at ({i},{j})");
                    }
                }
            }
        }
    }
    assert_eq!(max_abs_diff(&unsqueeze(&y).unwrap(), &x), 0.0);
    let (_, ld) = Squeeze.forward(&x, Mode::Train).unwrap();
    assert_eq!(to_vec_f64(&ld), vec![0.0]);
    assert!(squeeze(&Tensor::zeros((1, 1, 3, 4), DType::F32, &Device::Cpu).unwrap()).is_err());
}

#[test]
fn squeeze_logdet_is_zero_by_jacobian() {
    let x = randn(&[1, 2, 4, 4], 1.0, DType::F64, &mut rng(1));
    let ld = brute_logdet(squeeze, &x);
    assert!(ld.abs() < 1e-12, "squeeze log|det J| = {ld}");
}

fn resnet_coupling(store: &ParamStore, mask: Mask, channels: usize) -> AffineCoupling {
    let vb = store.var_builder(DType::F64, &Device::Cpu);
    let cfg = ResNetConfig {
        channels,
        cond_channels: 0,
        features: 6,
        blocks: 2,
        bn: BatchNormConfig::default(),
    };
    AffineCoupling::resnet(mask, cfg, vb.pp("c")).unwrap()
}

fn check_coupling_eval(mask: Mask, channels: usize, seed: u64) {
    let store = ParamStore::new(seed);
    let layer = resnet_coupling(&store, mask, channels);
    randomise(&store, seed + 100);
    let x = randn(&[1, channels, 4, 4], 1.0, DType::F64, &mut rng(seed + 7));
    let (y, ld) = layer.forward(&x, Mode::Eval).unwrap();
    let ld = to_vec_f64(&ld)[0];
    let brute = brute_logdet(|t| Ok(layer.forward(t, Mode::Eval)?.0), &x);
    assert!(
        ld.abs() > 0.1,
        "randomised layer should not be volume preserving"
    );
    assert!((ld - brute).abs() <= TOL, "log-det {ld} vs brute {brute}");
    eprintln!(
        "{:?} coupling: log-det {ld:.6}, |error| {:.2e}",
        layer.mask().kind(),
        (ld - brute).abs()
    );
    let back = layer.inverse(&y).unwrap();
    assert!(max_abs_diff(&back, &x) < 1e-12);
}

#[test]
fn checkerboard_coupling_logdet_matches_jacobian() {
    check_coupling_eval(Mask::checkerboard(0), 3, 1);
    check_coupling_eval(Mask::checkerboard(1), 3, 2);
}

#[test]
fn channel_coupling_logdet_matches_jacobian() {
    check_coupling_eval(Mask::channel(0), 4, 3);
    check_coupling_eval(Mask::channel(1), 6, 4);
}

/// A train-mode coupling against the brute-force Jacobian of the *whole batch*: with
/// batch statistics inside s/t, sample i's output depends on the whole batch's
/// conditioning half, but only on its own transformed half, so (ordering the
/// conditioning halves first) the batch Jacobian is block triangular and
/// log|det| = Σ_i log-det_i exactly. `cond`: a class-conditional coupling on `K`
/// classes, given one-hot labels.
fn check_coupling_train(mask: Mask, channels: usize, cond: usize, seed: u64) {
    let store = ParamStore::new(seed);
    let vb = store.var_builder(DType::F64, &Device::Cpu);
    let cfg = ResNetConfig {
        channels,
        cond_channels: cond,
        features: 6,
        blocks: 2,
        bn: BatchNormConfig::default(),
    };
    let layer = AffineCoupling::resnet(mask, cfg, vb.pp("c")).unwrap();
    randomise(&store, seed + 50);
    let n = 2;
    let x = randn(&[n, channels, 4, 4], 1.0, DType::F64, &mut rng(seed + 4));
    let y = (cond > 0).then(|| {
        let mut v = vec![0f64; n * cond];
        for i in 0..n {
            v[i * cond + (i + 1) % cond] = 1.0;
        }
        Tensor::from_vec(v, (n, cond), &Device::Cpu).unwrap()
    });
    let f = |t: &Tensor, mode| layer.forward_cond(t, y.as_ref(), mode);
    let (_, ld) = f(&x, Mode::Train).unwrap();
    let total: f64 = to_vec_f64(&ld).iter().sum();
    let brute = brute_logdet(|t| Ok(f(t, Mode::Train)?.0), &x);
    assert!(
        (total - brute).abs() <= TOL,
        "{:?} (cond {cond}): train log-det {total} vs brute {brute}",
        layer.mask().kind()
    );
    let size: f64 = to_vec_f64(&ld).iter().map(|l| l.abs()).sum();
    assert!(size > 0.1, "not volume preserving: {:?}", to_vec_f64(&ld));
    // train mode and eval mode differ (batch vs running statistics)
    let (_, ld_eval) = f(&x, Mode::Eval).unwrap();
    assert!(max_abs_diff(&ld, &ld_eval) > 1e-3);
}

#[test]
fn coupling_train_mode_logdet_matches_whole_batch_jacobian() {
    check_coupling_train(Mask::checkerboard(0), 3, 0, 5);
    check_coupling_train(Mask::checkerboard(1), 3, 0, 6);
}

#[test]
fn channel_coupling_train_mode_logdet_matches_whole_batch_jacobian() {
    check_coupling_train(Mask::channel(0), 4, 0, 7);
    check_coupling_train(Mask::channel(1), 4, 0, 8);
}

#[test]
fn class_conditional_coupling_logdet_matches_jacobian_in_both_modes() {
    check_coupling_train(Mask::checkerboard(1), 3, 3, 9);
    check_coupling_train(Mask::channel(0), 4, 2, 10);
}

#[test]
fn vector_coupling_with_mlp() {
    for parity in [0, 1] {
        let store = ParamStore::new(6 + parity as u64);
        let vb = store.var_builder(DType::F64, &Device::Cpu);
        let cfg = MlpConfig {
            features: 4,
            hidden: 16,
            hidden_layers: 2,
        };
        let net = Mlp::new(cfg, vb.pp("c").pp("net")).unwrap();
        let layer = AffineCoupling::new(Mask::channel(parity), net, 4, 2, vb.pp("c")).unwrap();
        randomise(&store, 66);
        let x = randn(&[1, 4], 1.0, DType::F64, &mut rng(3));
        let (y, ld) = layer.forward(&x, Mode::Eval).unwrap();
        let ld = to_vec_f64(&ld)[0];
        let brute = brute_logdet(|t| Ok(layer.forward(t, Mode::Eval)?.0), &x);
        assert!(
            (ld - brute).abs() <= TOL,
            "parity {parity}: {ld} vs {brute}"
        );
        assert!(ld.abs() > 0.01, "parity {parity}: {ld}");
        assert!(max_abs_diff(&layer.inverse(&y).unwrap(), &x) < 1e-12);
        // the half that conditions passes through unchanged
        let b = Mask::channel(parity).values(&[4]).unwrap();
        let (xv, yv) = (to_vec_f64(&x), to_vec_f64(&y));
        for k in 0..4 {
            assert_eq!(xv[k] == yv[k], b[k] == 1, "parity {parity}, feature {k}");
        }
    }
}

#[test]
fn coupling_starts_at_identity() {
    let store = ParamStore::new(7);
    let layer = resnet_coupling(&store, Mask::checkerboard(0), 3);
    let x = randn(&[2, 3, 4, 4], 1.0, DType::F64, &mut rng(4));
    let (y, ld) = layer.forward(&x, Mode::Train).unwrap();
    assert_eq!(max_abs_diff(&y, &x), 0.0);
    assert_eq!(to_vec_f64(&ld), vec![0.0, 0.0]);
}

fn flow_bn(store: &ParamStore, c: usize, variant: BatchNormVariant) -> FlowBatchNorm {
    let vb = store.var_builder(DType::F64, &Device::Cpu);
    let cfg = FlowBatchNormConfig {
        momentum: 0.1,
        eps: 1e-5,
        variant,
        affine: false,
    };
    FlowBatchNorm::new(c, cfg, vb.pp("bn")).unwrap()
}

fn flow_bn_affine(store: &ParamStore, c: usize) -> FlowBatchNorm {
    let vb = store.var_builder(DType::F64, &Device::Cpu);
    let cfg = FlowBatchNormConfig {
        affine: true,
        ..FlowBatchNormConfig::default()
    };
    FlowBatchNorm::new(c, cfg, vb.pp("bn")).unwrap()
}

#[test]
fn batch_norm_learned_affine_logdet_and_inverse() {
    let store = ParamStore::new(18);
    let bn = flow_bn_affine(&store, 3);
    // Starts as the plain normalisation.
    let x = randn(&[2, 3, 4, 4], 1.0, DType::F64, &mut rng(19));
    let plain = flow_bn(&ParamStore::new(18), 3, BatchNormVariant::Batch);
    let (a, la) = bn.forward(&x, Mode::Eval).unwrap();
    let (b, lb) = plain.forward(&x, Mode::Eval).unwrap();
    assert_eq!(max_abs_diff(&a, &b), 0.0);
    assert_eq!(to_vec_f64(&la), to_vec_f64(&lb));
    randomise(&store, 20);
    let (ls, sh) = bn.affine().unwrap();
    let (lsv, shv) = (to_vec_f64(ls), to_vec_f64(sh));
    assert!(lsv.iter().all(|v| *v != 0.0) && shv.iter().all(|v| *v != 0.0));
    let x1 = x.narrow(0, 0, 1).unwrap();
    let (y, ld) = bn.forward(&x1, Mode::Eval).unwrap();
    let ld = to_vec_f64(&ld)[0];
    let brute = brute_logdet(|t| Ok(bn.forward(t, Mode::Eval)?.0), &x1);
    assert!((ld - brute).abs() <= TOL, "{ld} vs {brute}");
    // by hand: −½·H·W·Σ log(σ̃² + ε) + H·W·Σ log_scale
    let rv = to_vec_f64(bn.running_var());
    let hand = -0.5 * 16.0 * rv.iter().map(|v| (v + 1e-5).ln()).sum::<f64>()
        + 16.0 * lsv.iter().sum::<f64>();
    assert!((ld - hand).abs() < 1e-12, "{ld} vs {hand}");
    // y = exp(log_scale)·x̂ + shift, per channel
    let rm = to_vec_f64(bn.running_mean());
    let (xv, yv) = (to_vec_f64(&x1), to_vec_f64(&y));
    for (i, (&xi, &yi)) in xv.iter().zip(&yv).enumerate() {
        let c = i / 16;
        let want = (xi - rm[c]) / (rv[c] + 1e-5).sqrt() * lsv[c].exp() + shv[c];
        assert!((yi - want).abs() < 1e-12, "element {i}: {yi} vs {want}");
    }
    assert!(max_abs_diff(&bn.inverse(&y).unwrap(), &x1) < 1e-12);
    // Train mode: the affine follows the batch normalisation, and its parameters get
    // gradients: d Σy / d shift_c = N·H·W, d Σ ld / d log_scale_c = N·H·W.
    let (y, ld) = bn.forward(&x, Mode::Train).unwrap();
    let loss = (y.sum_all().unwrap() + ld.sum_all().unwrap()).unwrap();
    let g = loss.backward().unwrap();
    for v in to_vec_f64(g.get(sh).unwrap()) {
        assert!((v - 32.0).abs() < 1e-12, "{v}");
    }
    let gls = to_vec_f64(g.get(ls).unwrap());
    let ys = to_vec_f64(&y);
    for c in 0..3 {
        // ∂Σy/∂ls_c = Σ over channel c of (y − shift_c), plus N·H·W from the log-det.
        let s: f64 = (0..2)
            .flat_map(|n| (0..16).map(move |k| (n * 3 + c) * 16 + k))
            .map(|i| ys[i] - shv[c])
            .sum();
        assert!(
            (gls[c] - (s + 32.0)).abs() < 1e-9,
            "{} vs {}",
            gls[c],
            s + 32.0
        );
    }
}

#[test]
fn batch_norm_eval_logdet_and_inverse() {
    let store = ParamStore::new(8);
    let bn = flow_bn(&store, 3, BatchNormVariant::Batch);
    randomise(&store, 88);
    let x = randn(&[1, 3, 4, 4], 1.0, DType::F64, &mut rng(5));
    let (y, ld) = bn.forward(&x, Mode::Eval).unwrap();
    let brute = brute_logdet(|t| Ok(bn.forward(t, Mode::Eval)?.0), &x);
    let ld = to_vec_f64(&ld)[0];
    assert!((ld - brute).abs() <= TOL, "{ld} vs {brute}");
    // by hand: −½·H·W·Σ log(σ̃² + ε)
    let rv = to_vec_f64(bn.running_var());
    let hand: f64 = -0.5 * 16.0 * rv.iter().map(|v| (v + 1e-5).ln()).sum::<f64>();
    assert!((ld - hand).abs() < 1e-12);
    assert!(max_abs_diff(&bn.inverse(&y).unwrap(), &x) < 1e-12);
}

#[test]
fn batch_norm_train_mode_uses_batch_statistics() {
    let store = ParamStore::new(9);
    let bn = flow_bn(&store, 2, BatchNormVariant::Batch);
    let x = randn(&[3, 2, 2, 2], 2.0, DType::F64, &mut rng(6));
    let xv = to_vec_f64(&x);
    // batch statistics by hand, per channel over (N, H, W), biased variance
    let mut mean = [0.0; 2];
    let mut var = [0.0; 2];
    for c in 0..2 {
        let vals: Vec<f64> = (0..3)
            .flat_map(|n| (0..4).map(move |k| (n, k)))
            .map(|(n, k)| xv[(n * 2 + c) * 4 + k])
            .collect();
        mean[c] = vals.iter().sum::<f64>() / 12.0;
        var[c] = vals.iter().map(|v| (v - mean[c]).powi(2)).sum::<f64>() / 12.0;
    }
    let (y, ld) = bn.forward(&x, Mode::Train).unwrap();
    let hand_ld = -0.5 * 4.0 * (var[0] + 1e-5).ln() - 0.5 * 4.0 * (var[1] + 1e-5).ln();
    for l in to_vec_f64(&ld) {
        assert!((l - hand_ld).abs() < 1e-12, "{l} vs {hand_ld}");
    }
    let yv = to_vec_f64(&y);
    for (i, (&a, &b)) in xv.iter().zip(&yv).enumerate() {
        let c = (i / 4) % 2;
        assert!((b - (a - mean[c]) / (var[c] + 1e-5).sqrt()).abs() < 1e-12);
    }
    // running averages moved by momentum 0.1 from (0, 1)
    let rm = to_vec_f64(bn.running_mean());
    let rv = to_vec_f64(bn.running_var());
    for c in 0..2 {
        assert!((rm[c] - 0.1 * mean[c]).abs() < 1e-12);
        assert!((rv[c] - (0.9 + 0.1 * var[c])).abs() < 1e-12);
    }
    // (the train-mode log-det against the layer's own Jacobian:
    // batch_norm_train_mode_equals_eval_mode_with_the_batch_statistics)
    // eval mode now uses the running averages, not the batch's
    let (_, ld_eval) = bn.forward(&x, Mode::Eval).unwrap();
    let hand_eval = -0.5 * 4.0 * rv.iter().map(|v| (v + 1e-5).ln()).sum::<f64>();
    assert!((to_vec_f64(&ld_eval)[0] - hand_eval).abs() < 1e-12);
    assert_eq!(
        to_vec_f64(bn.running_mean()),
        rm,
        "eval mode must not update"
    );
}

#[test]
fn batch_norm_running_average_variant() {
    let store = ParamStore::new(10);
    let bn = flow_bn(&store, 1, BatchNormVariant::RunningAverage);
    let x = Tensor::new(&[1.0f64, 3.0, 5.0, 7.0], &Device::Cpu)
        .unwrap()
        .reshape((4, 1))
        .unwrap();
    // batch mean 4, biased var 5; running (0, 1) → μ̃ = 0.4, σ̃² = 0.9 + 0.5 = 1.4
    let (y, ld) = bn.forward(&x, Mode::Train).unwrap();
    let yv = to_vec_f64(&y);
    let s = (1.4f64 + 1e-5).sqrt();
    for (a, b) in [1.0, 3.0, 5.0, 7.0].iter().zip(&yv) {
        assert!((b - (a - 0.4) / s).abs() < 1e-12);
    }
    assert!((to_vec_f64(&ld)[0] + 0.5 * (1.4f64 + 1e-5).ln()).abs() < 1e-12);
    assert!((to_vec_f64(bn.running_mean())[0] - 0.4).abs() < 1e-12);
    assert!((to_vec_f64(bn.running_var())[0] - 1.4).abs() < 1e-12);
}

fn flow_bn_with(
    store: &ParamStore,
    dtype: DType,
    c: usize,
    cfg: FlowBatchNormConfig,
) -> FlowBatchNorm {
    let vb = store.var_builder(dtype, &Device::Cpu);
    FlowBatchNorm::new(c, cfg, vb.pp("bn")).unwrap()
}

/// Tolerances (relative to max(1, |reference|)) for values and for brute-force
/// log-dets: f64 runs candle's ops, f32 the fused kernels (f32 rounding).
fn tols(dtype: DType) -> (f64, f64) {
    if dtype == DType::F64 {
        (1e-12, TOL)
    } else {
        assert!(
            nvp_kernels::fast_cpu_enabled(),
            "f32 should take the fused kernels"
        );
        (2e-5, 1e-4)
    }
}

/// With momentum 1 a train-mode pass stores exactly its batch statistics as the running
/// averages, so eval mode afterwards is the same map. Checked: the train-mode `y` and
/// log-det against hand formulas (biased variance, ε inside the square root and the
/// log, the H·W factor, the learned affine's `H·W·Σ log_scale`), the stored statistics,
/// train = eval on the same batch, and — the layer's own code as a Jacobian — each
/// sample's train-mode log-det against the brute-force Jacobian of the eval-mode
/// forward at that sample; then the inverse. ε = 0.1 (batch variances ≈ 1.7), so that a
/// missing or misplaced ε is far above the f32 tolerance.
fn check_bn_train_equals_eval(dtype: DType, variant: BatchNormVariant, affine: bool, seed: u64) {
    let (tol, tol_brute) = tols(dtype);
    let eps = 0.1;
    let store = ParamStore::new(seed);
    let cfg = FlowBatchNormConfig {
        momentum: 1.0,
        eps,
        variant,
        affine,
    };
    let bn = flow_bn_with(&store, dtype, 3, cfg);
    randomise(&store, seed + 1);
    let (n, c, hw) = (3, 3, 16);
    let x = randn(&[n, c, 4, 4], 1.3, dtype, &mut rng(seed + 2));
    let xv = to_vec_f64(&x);
    let (mean, var) = channel_stats(&xv, n, c, hw);
    let (ls, sh) = match bn.affine() {
        Some((ls, sh)) => (to_vec_f64(ls), to_vec_f64(sh)),
        None => (vec![0.0; c], vec![0.0; c]),
    };
    assert_eq!(affine, ls.iter().all(|v| *v != 0.0));
    let tag = format!("{dtype:?} {variant:?} affine {affine}");

    let (yt, ldt) = bn.forward(&x, Mode::Train).unwrap();
    // ld = −½·H·W·Σ_c ln(σ²_c + ε) + H·W·Σ_c log_scale_c, the same for every sample
    let ld_hand = -0.5 * hw as f64 * var.iter().map(|v| (v + eps).ln()).sum::<f64>()
        + hw as f64 * ls.iter().sum::<f64>();
    assert_close(
        &format!("{tag}: train ld"),
        &to_vec_f64(&ldt),
        &[ld_hand; 3],
        tol,
    );
    let y_hand: Vec<f64> = (0..xv.len())
        .map(|i| {
            let ch = (i / hw) % c;
            (xv[i] - mean[ch]) / (var[ch] + eps).sqrt() * ls[ch].exp() + sh[ch]
        })
        .collect();
    assert_close(&format!("{tag}: train y"), &to_vec_f64(&yt), &y_hand, tol);
    assert_close(
        &format!("{tag}: mean"),
        &to_vec_f64(bn.running_mean()),
        &mean,
        tol,
    );
    assert_close(
        &format!("{tag}: var"),
        &to_vec_f64(bn.running_var()),
        &var,
        tol,
    );

    let (ye, lde) = bn.forward(&x, Mode::Eval).unwrap();
    assert_close(
        &format!("{tag}: eval y"),
        &to_vec_f64(&ye),
        &to_vec_f64(&yt),
        tol,
    );
    assert_close(
        &format!("{tag}: eval ld"),
        &to_vec_f64(&lde),
        &to_vec_f64(&ldt),
        tol,
    );
    assert_eval_jacobian_and_inverse(&tag, &bn, &x, &to_vec_f64(&ldt), (tol, tol_brute));
}

/// Each of the first `lds.len()` samples of `x`: its log-det `lds[i]` against the
/// brute-force Jacobian determinant of `bn`'s evaluation map; then the inverse of that
/// map gives `x` back.
fn assert_eval_jacobian_and_inverse(
    tag: &str,
    bn: &FlowBatchNorm,
    x: &Tensor,
    lds: &[f64],
    (tol, tol_brute): (f64, f64),
) {
    for (i, &l) in lds.iter().enumerate() {
        let xi = x.narrow(0, i, 1).unwrap();
        let brute = brute_logdet(|t| Ok(bn.forward(t, Mode::Eval)?.0), &xi);
        assert!(
            (l - brute).abs() <= tol_brute * l.abs().max(1.0),
            "{tag}: sample {i}: log-det {l} vs Jacobian of the eval map {brute}"
        );
    }
    let (y, _) = bn.forward(x, Mode::Eval).unwrap();
    let back = bn.inverse(&y).unwrap();
    assert_close(
        &format!("{tag}: inverse"),
        &to_vec_f64(&back),
        &to_vec_f64(x),
        10.0 * tol,
    );
}

#[test]
fn batch_norm_train_mode_equals_eval_mode_with_the_batch_statistics() {
    let mut seed = 200;
    for dtype in [DType::F64, DType::F32] {
        for variant in [BatchNormVariant::Batch, BatchNormVariant::RunningAverage] {
            for affine in [false, true] {
                seed += 10;
                check_bn_train_equals_eval(dtype, variant, affine, seed);
            }
        }
    }
}

/// Appendix E's variant on images (H·W = 6 > 1), two train steps from randomised
/// running statistics, then eval and the inverse with what they stored. By hand, per
/// channel, with `m` the momentum and `μ_b`, `σ²_b` the batch mean and biased variance:
/// `μ̃ = (1 − m)·μ_run + m·μ_b`, `σ̃² = (1 − m)·σ²_run + m·σ²_b`,
/// `y = (x − μ̃)/sqrt(σ̃² + ε)`, `ld = −½·H·W·Σ_c ln(σ̃²_c + ε)`, and `(μ̃, σ̃²)` become the
/// running averages. In f64 (candle ops) and f32 (the blended fused kernel).
fn check_running_average_on_images(dtype: DType, seed: u64) {
    let (tol, tol_brute) = tols(dtype);
    let (m, eps) = (0.3, 0.1);
    let store = ParamStore::new(seed);
    let cfg = FlowBatchNormConfig {
        momentum: m,
        eps,
        variant: BatchNormVariant::RunningAverage,
        affine: false,
    };
    let bn = flow_bn_with(&store, dtype, 2, cfg);
    randomise(&store, seed + 1);
    let (n, c, hw) = (3, 2, 6);
    let mut rm = to_vec_f64(bn.running_mean());
    let mut rv = to_vec_f64(bn.running_var());
    assert!(rm.iter().all(|v| *v != 0.0) && rv.iter().all(|v| *v != 1.0));
    let tag = format!("{dtype:?} running-average");
    let mut r = rng(seed + 2);
    for step in 0..2 {
        let x = randn(&[n, c, 3, 2], 1.5, DType::F64, &mut r)
            .affine(1.0, 0.7)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let xv = to_vec_f64(&x);
        let (bm, bv) = channel_stats(&xv, n, c, hw);
        let mt: Vec<f64> = (0..c).map(|k| (1.0 - m) * rm[k] + m * bm[k]).collect();
        let vt: Vec<f64> = (0..c).map(|k| (1.0 - m) * rv[k] + m * bv[k]).collect();
        let (y, ld) = bn.forward(&x, Mode::Train).unwrap();
        let y_hand: Vec<f64> = (0..xv.len())
            .map(|i| {
                let ch = (i / hw) % c;
                (xv[i] - mt[ch]) / (vt[ch] + eps).sqrt()
            })
            .collect();
        let ld_hand = -0.5 * hw as f64 * vt.iter().map(|v| (v + eps).ln()).sum::<f64>();
        assert_close(
            &format!("{tag} step {step}: y"),
            &to_vec_f64(&y),
            &y_hand,
            tol,
        );
        assert_close(
            &format!("{tag} step {step}: ld"),
            &to_vec_f64(&ld),
            &[ld_hand; 3],
            tol,
        );
        rm = to_vec_f64(bn.running_mean());
        rv = to_vec_f64(bn.running_var());
        assert_close(&format!("{tag} step {step}: stored mean"), &rm, &mt, tol);
        assert_close(&format!("{tag} step {step}: stored var"), &rv, &vt, tol);
    }
    // eval and the inverse use the stored averages
    let x = randn(&[2, c, 3, 2], 1.0, dtype, &mut r);
    let xv = to_vec_f64(&x);
    let (y, ld) = bn.forward(&x, Mode::Eval).unwrap();
    let y_hand: Vec<f64> = (0..xv.len())
        .map(|i| {
            let ch = (i / hw) % c;
            (xv[i] - rm[ch]) / (rv[ch] + eps).sqrt()
        })
        .collect();
    let ld_hand = -0.5 * hw as f64 * rv.iter().map(|v| (v + eps).ln()).sum::<f64>();
    assert_close(&format!("{tag} eval: y"), &to_vec_f64(&y), &y_hand, tol);
    assert_close(
        &format!("{tag} eval: ld"),
        &to_vec_f64(&ld),
        &[ld_hand; 2],
        tol,
    );
    assert_eval_jacobian_and_inverse(&tag, &bn, &x, &[ld_hand], (tol, tol_brute));
}

#[test]
fn batch_norm_running_average_variant_on_images() {
    check_running_average_on_images(DType::F64, 300);
    check_running_average_on_images(DType::F32, 310);
}

/// The closed-form backward of weight normalisation (`nvp_kernels::weight_norm`, what
/// the s/t networks' convolutions use on the GPU) against candle's autograd through
/// `weight_norm_reference`, in f64 and f32, plus a finite difference in f64; the forward
/// values are the same bits.
#[test]
fn weight_norm_closed_form_backward_matches_autograd() {
    use candle_core::Var;
    let mut r = rng(21);
    for dtype in [DType::F64, DType::F32] {
        let v0 = randn(&[5, 3, 3, 3], 0.7, dtype, &mut r);
        let g0 = randn(&[5], 1.0, dtype, &mut r);
        let probe = randn(&[5, 3, 3, 3], 1.0, dtype, &mut r);
        let grads = |f: fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>| {
            let (v, g) = (
                Var::from_tensor(&v0).unwrap(),
                Var::from_tensor(&g0).unwrap(),
            );
            let w = f(v.as_tensor(), g.as_tensor()).unwrap();
            // The weights are used twice, as a convolution's kernel may be in a graph.
            let loss = ((&w * &probe).unwrap().sum_all().unwrap()
                + w.sqr().unwrap().sum_all().unwrap())
            .unwrap();
            let gs = loss.backward().unwrap();
            let gv = gs.get(v.as_tensor()).unwrap().clone();
            let gg = gs.get(g.as_tensor()).unwrap().clone();
            (w, gv, gg)
        };
        // A gain of the wrong length is refused, naming both shapes.
        let bad = nvp_kernels::weight_norm(&v0, &g0.narrow(0, 0, 4).unwrap()).unwrap_err();
        assert!(
            bad.to_string().contains("[5, 3, 3, 3]") && bad.to_string().contains("[4]"),
            "{bad}"
        );
        let (w1, gv1, gg1) = grads(nvp_kernels::weight_norm);
        let (w0, gv0, gg0) = grads(nvp_kernels::weight_norm_reference);
        assert_eq!(
            max_abs_diff(&w1, &w0),
            0.0,
            "{dtype:?}: forward not the same bits"
        );
        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        for (what, a, b) in [("v", &gv1, &gv0), ("g", &gg1, &gg0)] {
            let scale = to_vec_f64(b).iter().fold(0.0f64, |m, x| m.max(x.abs()));
            let e = max_abs_diff(a, b) / scale;
            assert!(
                e < tol,
                "{dtype:?}: gradient of {what}: relative error {e:e}"
            );
        }
        if dtype == DType::F64 {
            // Central differences of the same loss for a few entries of v and g.
            let loss = |v: &Tensor, g: &Tensor| -> f64 {
                let w = nvp_kernels::weight_norm_reference(v, g).unwrap();
                ((&w * &probe).unwrap().sum_all().unwrap() + w.sqr().unwrap().sum_all().unwrap())
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let h = 1e-6;
            let (vv, gv) = (to_vec_f64(&v0), to_vec_f64(&gv1));
            for i in [0usize, 17, 44, 134] {
                let bump = |d: f64| {
                    let mut x = vv.clone();
                    x[i] += d;
                    Tensor::from_vec(x, v0.shape(), &Device::Cpu).unwrap()
                };
                let fd = (loss(&bump(h), &g0) - loss(&bump(-h), &g0)) / (2.0 * h);
                assert!(
                    (fd - gv[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "dv[{i}]: {} vs {fd}",
                    gv[i]
                );
            }
            let (gg, ggv) = (to_vec_f64(&g0), to_vec_f64(&gg1));
            for i in 0..5 {
                let bump = |d: f64| {
                    let mut x = gg.clone();
                    x[i] += d;
                    Tensor::from_vec(x, 5, &Device::Cpu).unwrap()
                };
                let fd = (loss(&v0, &bump(h)) - loss(&v0, &bump(-h))) / (2.0 * h);
                assert!(
                    (fd - ggv[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "dg[{i}]: {} vs {fd}",
                    ggv[i]
                );
            }
        }
    }
}
