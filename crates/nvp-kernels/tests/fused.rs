//! The fused batch-norm and coupling ops against candle's own ops (the
//! `*_reference` functions, which are the flow's code), in values and gradients.
//!
//! Tolerances: every fast f32 result is compared with the candle-op reference run
//! in f64 on the same inputs, and must be within `TOL · max(1, max|reference|)`
//! (`TOL = 2e-5`, about 150 f32 ulps of the largest value, the size of f32 rounding
//! in a reduction of a few hundred terms); the candle f32 reference is checked
//! against the same f64 values with the same bound, so both paths are equally
//! accurate. The coupling's `y` and inverse use the same arithmetic as candle's ops
//! and must be bit-identical to the candle f32 reference.

use candle_core::{DType, Device, Tensor, Var};
use nvp_kernels::{
    batch_norm, batch_norm_inverse, batch_norm_reference, batch_norm_uses_fast_path, coupling,
    coupling_inverse, coupling_inverse_reference, coupling_reference, coupling_uses_fast_path,
    mask_mul,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const TOL: f64 = 2e-5;
const EPS: f64 = 1e-5;

fn rand_t(shape: &[usize], lo: f32, hi: f32, rng: &mut StdRng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// `max |a − b| ≤ TOL · max(1, max |b|)`.
fn close(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let (a, b) = (f64s(a), f64s(b));
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff <= TOL * scale,
        "{what}: max diff {diff} (scale {scale})"
    );
}

fn identical(what: &str, a: &Tensor, b: &Tensor) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let (a, b) = (f64s(a), f64s(b));
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(x == y, "{what}: element {i}: {x} vs {y}");
    }
}

fn to64(t: &Tensor) -> Tensor {
    t.to_dtype(DType::F64).unwrap()
}

const BN_SHAPES: &[&[usize]] = &[
    &[4, 3, 5, 7],
    &[1, 2, 3, 3],
    &[2, 5, 1, 1],
    &[7, 5],
    &[1, 4],
    &[3, 6, 4],
];

/// The ε, input range and running-variance range of a [`check_bn`] run.
#[derive(Clone, Copy)]
struct BnCase {
    eps: f64,
    x: (f32, f32),
    running_var: (f32, f32),
}

/// The defaults: ε = 1e-5 with batch variances ≈ 2.1 and running variances in [0.5, 2]
/// (ε below the tolerance: a dropped ε moves y by ≈ 2.5e-6 relative).
const BN_DEFAULT: BnCase = BnCase {
    eps: EPS,
    x: (-2.0, 3.0),
    running_var: (0.5, 2.0),
};

/// ε visible: ε = 0.1 with batch variances ≈ 0.02 and running variances in
/// [0.01, 0.1], so that σ² + ε is mostly ε and a missing or misplaced ε (say
/// `1/(√σ² + ε)`) changes y by far more than `TOL`.
const BN_VISIBLE_EPS: BnCase = BnCase {
    eps: 0.1,
    x: (-0.2, 0.3),
    running_var: (0.01, 0.1),
};

/// One BN configuration: fast f32 vs candle f32 vs candle f64, values and the
/// gradients of `Σ y·R + Σ log(var + ε)·q` with respect to x, weight and bias.
fn check_bn(shape: &[usize], affine: bool, train: bool, relu: bool, seed: u64) {
    check_bn_case(shape, affine, train, relu, seed, BN_DEFAULT);
}

fn check_bn_case(shape: &[usize], affine: bool, train: bool, relu: bool, seed: u64, case: BnCase) {
    let eps = case.eps;
    let mut rng = StdRng::seed_from_u64(seed);
    let c = shape[1];
    let x0 = rand_t(shape, case.x.0, case.x.1, &mut rng);
    let w0 = rand_t(&[c], 0.5, 1.5, &mut rng);
    let b0 = rand_t(&[c], -0.5, 0.5, &mut rng);
    let rm = rand_t(&[c], -0.5, 0.5, &mut rng);
    let rv = rand_t(&[c], case.running_var.0, case.running_var.1, &mut rng);
    let r = rand_t(shape, -1.0, 1.0, &mut rng);
    let q = rand_t(&[c], -1.0, 1.0, &mut rng);
    let tag = format!("{shape:?} affine={affine} train={train} relu={relu} eps={eps}");

    // Runs one path; returns (y, mean, var, dx, dw, db).
    let run = |fast: bool, dt: DType| -> Vec<Option<Tensor>> {
        let x = Var::from_tensor(&x0.to_dtype(dt).unwrap()).unwrap();
        let w = Var::from_tensor(&w0.to_dtype(dt).unwrap()).unwrap();
        let b = Var::from_tensor(&b0.to_dtype(dt).unwrap()).unwrap();
        let (rm, rv) = (rm.to_dtype(dt).unwrap(), rv.to_dtype(dt).unwrap());
        let aff = affine.then_some((w.as_tensor(), b.as_tensor()));
        let run = (!train).then_some((&rm, &rv));
        let out = if fast {
            assert!(batch_norm_uses_fast_path(&x, &[&w, &b]));
            batch_norm(&x, aff, run, eps, relu, true).unwrap()
        } else {
            batch_norm_reference(&x, aff, run, eps, relu).unwrap()
        };
        let mut loss = (&out.y * r.to_dtype(dt).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        if train {
            let lv = (&out.var + eps).unwrap().log().unwrap();
            loss = (loss + (lv * q.to_dtype(dt).unwrap()).unwrap().sum_all().unwrap()).unwrap();
        }
        let g = loss.backward().unwrap();
        vec![
            Some(out.y),
            Some(out.mean),
            Some(out.var.detach()),
            g.get(&x).cloned(),
            g.get(&w).cloned(),
            g.get(&b).cloned(),
        ]
    };
    let fast = run(true, DType::F32);
    let slow = run(false, DType::F32);
    let exact = run(false, DType::F64);
    let names = ["y", "mean", "var", "dx", "dw", "db"];
    for i in 0..6 {
        match (&fast[i], &slow[i], &exact[i]) {
            (Some(f), Some(s), Some(e)) => {
                close(&format!("{tag} fast {}", names[i]), &to64(f), e);
                close(&format!("{tag} candle-f32 {}", names[i]), &to64(s), e);
            }
            (None, None, None) => {}
            (f, s, _) => panic!(
                "{tag} {}: fast {:?} vs ref {:?}",
                names[i],
                f.is_some(),
                s.is_some()
            ),
        }
    }
}

#[test]
fn batch_norm_train_matches_candle() {
    let mut seed = 0;
    for shape in BN_SHAPES {
        for affine in [false, true] {
            for relu in [false, true] {
                seed += 1;
                check_bn(shape, affine, true, relu, seed);
            }
        }
    }
}

#[test]
fn batch_norm_eval_matches_candle() {
    let mut seed = 100;
    for shape in BN_SHAPES {
        for affine in [false, true] {
            for relu in [false, true] {
                seed += 1;
                check_bn(shape, affine, false, relu, seed);
            }
        }
    }
}

#[test]
fn batch_norm_train_matches_candle_with_a_visible_eps() {
    let mut seed = 200;
    for shape in BN_SHAPES {
        for affine in [false, true] {
            for relu in [false, true] {
                seed += 1;
                check_bn_case(shape, affine, true, relu, seed, BN_VISIBLE_EPS);
            }
        }
    }
}

#[test]
fn batch_norm_eval_matches_candle_with_a_visible_eps() {
    let mut seed = 300;
    for shape in BN_SHAPES {
        for affine in [false, true] {
            for relu in [false, true] {
                seed += 1;
                check_bn_case(shape, affine, false, relu, seed, BN_VISIBLE_EPS);
            }
        }
    }
}

/// Appendix E's blended normalisation at op level, against the same formula in candle
/// f64 ops: `μ̃ = (1 − m)·μ_run + m·μ`, `σ̃² = (1 − m)·σ²_run + m·σ²` (batch mean and
/// biased variance), `y = (x − μ̃)/sqrt(σ̃² + ε)`; the returned `mean`/`var` are the
/// batch's; the gradient of `Σ y·R + Σ_c ln(σ̃²_c + ε)·q_c` (σ̃² formed from the
/// returned, differentiable `var`, as the flow's log-det does) with respect to `x`
/// flows through the batch part only (the hand-written backward's `k1 = m·(db/M +
/// δ·k2′)`, `k2 = m·k2′`). ε = 0.1, batch variances ≈ 0.02, running ones in
/// [0.01, 0.1]: ε visible. Several shapes, momenta 0.1 and 0.7.
#[test]
fn batch_norm_blended_matches_candle() {
    let mut seed = 400;
    for shape in BN_SHAPES {
        for m in [0.1, 0.7] {
            seed += 1;
            let mut rng = StdRng::seed_from_u64(seed);
            let c = shape[1];
            let eps = 0.1;
            let x0 = rand_t(shape, -0.2, 0.3, &mut rng);
            let rm = rand_t(&[c], -0.5, 0.5, &mut rng);
            let rv = rand_t(&[c], 0.01, 0.1, &mut rng);
            let r = rand_t(shape, -1.0, 1.0, &mut rng);
            let q = rand_t(&[c], -1.0, 1.0, &mut rng);
            let mut fs = vec![1; shape.len()];
            fs[1] = c;
            let tag = format!("{shape:?} m={m}");
            // the fused op
            let x = Var::from_tensor(&x0).unwrap();
            let out = nvp_kernels::batch_norm_blended(&x, (&rm, &rv), m, eps).unwrap();
            let vt = ((&rv * (1.0 - m)).unwrap() + (&out.var * m).unwrap()).unwrap();
            let loss = ((&out.y * &r).unwrap().sum_all().unwrap()
                + ((vt + eps).unwrap().log().unwrap() * &q)
                    .unwrap()
                    .sum_all()
                    .unwrap())
            .unwrap();
            let g = loss.backward().unwrap();
            let dx = g.get(&x).unwrap().clone();
            // the formula in candle f64 ops, by autograd
            let x64 = Var::from_tensor(&to64(&x0)).unwrap();
            let dims: Vec<usize> = (0..shape.len()).filter(|&d| d != 1).collect();
            let count = dims.iter().map(|&d| shape[d]).product::<usize>() as f64;
            let mean = (x64.sum_keepdim(dims.clone()).unwrap() / count).unwrap();
            let var = (x64
                .broadcast_sub(&mean)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_keepdim(dims)
                .unwrap()
                / count)
                .unwrap();
            let rm64 = to64(&rm).reshape(fs.clone()).unwrap();
            let rv64 = to64(&rv).reshape(fs.clone()).unwrap();
            let mt = ((rm64 * (1.0 - m)).unwrap() + (&mean * m).unwrap()).unwrap();
            let vt64 = ((rv64 * (1.0 - m)).unwrap() + (&var * m).unwrap()).unwrap();
            let y64 = x64
                .broadcast_sub(&mt)
                .unwrap()
                .broadcast_div(&(&vt64 + eps).unwrap().sqrt().unwrap())
                .unwrap();
            let loss64 = ((&y64 * to64(&r)).unwrap().sum_all().unwrap()
                + ((&vt64 + eps).unwrap().log().unwrap().flatten_all().unwrap() * to64(&q))
                    .unwrap()
                    .sum_all()
                    .unwrap())
            .unwrap();
            let g64 = loss64.backward().unwrap();
            close(&format!("{tag} y"), &to64(&out.y), &y64);
            close(
                &format!("{tag} mean"),
                &to64(&out.mean),
                &mean.flatten_all().unwrap(),
            );
            close(
                &format!("{tag} var"),
                &to64(&out.var),
                &var.flatten_all().unwrap(),
            );
            close(&format!("{tag} dx"), &to64(&dx), g64.get(&x64).unwrap());
        }
    }
}

/// Large offsets: the two-pass f64 statistics stay accurate where a one-pass
/// `E[x²] − E[x]²` in f32 would not. The variance must meet `TOL`; `y` carries the
/// rounding of the f32 mean (half an ulp of 1000, 3.05e-5, times 1/σ ≈ 1.8), so it
/// gets `1e-4`.
#[test]
fn batch_norm_large_mean() {
    let mut rng = StdRng::seed_from_u64(7);
    let x = (rand_t(&[8, 3, 6, 6], -1.0, 1.0, &mut rng) + 1000.0).unwrap();
    let fast = batch_norm(&x, None, None, EPS, false, false).unwrap();
    let exact = batch_norm_reference(&to64(&x), None, None, EPS, false).unwrap();
    close("large-mean var", &to64(&fast.var), &exact.var);
    let (a, b) = (f64s(&fast.y), f64s(&exact.y));
    let diff = a
        .iter()
        .zip(&b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(diff <= 1e-4, "large-mean y: max diff {diff}");
}

/// The inverse against `y·sqrt(v + ε) + m` in candle ops, and the round trip; with the
/// defaults and with ε = 0.1 over variances in [0.01, 0.1] (ε visible).
#[test]
fn batch_norm_inverse_matches_candle() {
    let mut rng = StdRng::seed_from_u64(9);
    for (eps, (vlo, vhi)) in [
        (EPS, (0.1, 3.0)),
        (BN_VISIBLE_EPS.eps, BN_VISIBLE_EPS.running_var),
    ] {
        for shape in BN_SHAPES {
            let c = shape[1];
            let y = rand_t(shape, -3.0, 3.0, &mut rng);
            let m = rand_t(&[c], -1.0, 1.0, &mut rng);
            let v = rand_t(&[c], vlo, vhi, &mut rng);
            let fast = batch_norm_inverse(&y, &m, &v, eps).unwrap();
            let mut fs = vec![1; shape.len()];
            fs[1] = c;
            let want = y
                .broadcast_mul(
                    &(v.reshape(fs.clone()).unwrap() + eps)
                        .unwrap()
                        .sqrt()
                        .unwrap(),
                )
                .unwrap()
                .broadcast_add(&m.reshape(fs).unwrap())
                .unwrap();
            close(&format!("{shape:?} eps={eps} inverse"), &fast, &want);
            // Round trip through the eval-mode forward.
            let fwd = batch_norm(&fast, None, Some((&m, &v)), eps, false, false).unwrap();
            close(&format!("{shape:?} eps={eps} round trip"), &fwd.y, &y);
        }
    }
}

/// A coupling case: x, h, scale and a 0/1 mask of shape (1, C, ...).
fn coupling_case(shape: &[usize], seed: u64) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor) {
    let mut rng = StdRng::seed_from_u64(seed);
    let c = shape[1];
    let mut hs = shape.to_vec();
    hs[1] = 2 * c;
    let mut ms = shape.to_vec();
    ms[0] = 1;
    let mut ss = vec![1; shape.len()];
    ss[1] = c;
    let x = rand_t(shape, -2.0, 2.0, &mut rng);
    let h = rand_t(&hs, -3.0, 3.0, &mut rng);
    let scale = rand_t(&ss, 0.5, 1.5, &mut rng);
    let n: usize = ms.iter().product();
    let mv: Vec<f32> = (0..n)
        .map(|i| ((i * 7 + seed as usize) % 3 < 1) as u8 as f32)
        .collect();
    let mask = Tensor::from_vec(mv, ms, &Device::Cpu).unwrap();
    let r = rand_t(shape, -1.0, 1.0, &mut rng);
    let q = rand_t(&[shape[0]], -1.0, 1.0, &mut rng);
    (x, h, scale, mask, r, q)
}

const COUPLING_SHAPES: &[&[usize]] = &[
    &[3, 2, 4, 5],
    &[1, 3, 2, 2],
    &[5, 4],
    &[1, 6],
    &[2, 12, 3, 3],
];

#[test]
fn coupling_matches_candle() {
    for (i, shape) in COUPLING_SHAPES.iter().enumerate() {
        let (x0, h0, s0, mask, r, q) = coupling_case(shape, i as u64 + 1);
        let run = |fast: bool, dt: DType| -> Vec<Tensor> {
            let x = Var::from_tensor(&x0.to_dtype(dt).unwrap()).unwrap();
            let h = Var::from_tensor(&h0.to_dtype(dt).unwrap()).unwrap();
            let s = Var::from_tensor(&s0.to_dtype(dt).unwrap()).unwrap();
            let m = mask.to_dtype(dt).unwrap();
            let (y, ld) = if fast {
                assert!(coupling_uses_fast_path(&[&x, &h, &s, &m]));
                coupling(&x, &h, &s, &m).unwrap()
            } else {
                coupling_reference(&x, &h, &s, &m).unwrap()
            };
            let loss = ((&y * r.to_dtype(dt).unwrap()).unwrap().sum_all().unwrap()
                + (&ld * q.to_dtype(dt).unwrap()).unwrap().sum_all().unwrap())
            .unwrap();
            let g = loss.backward().unwrap();
            vec![
                y,
                ld,
                g.get(&x).unwrap().clone(),
                g.get(&h).unwrap().clone(),
                g.get(&s).unwrap().clone(),
            ]
        };
        let fast = run(true, DType::F32);
        let slow = run(false, DType::F32);
        let exact = run(false, DType::F64);
        identical(&format!("{shape:?} y"), &fast[0], &slow[0]);
        for (k, name) in ["y", "ld", "dx", "dh", "dscale"].iter().enumerate() {
            close(
                &format!("{shape:?} fast {name}"),
                &to64(&fast[k]),
                &exact[k],
            );
            close(
                &format!("{shape:?} candle-f32 {name}"),
                &to64(&slow[k]),
                &exact[k],
            );
        }
        // Inverse: bit-identical to candle's, and a round trip.
        let inv = coupling_inverse(&fast[0], &h0, &s0, &mask).unwrap();
        let inv_ref = coupling_inverse_reference(&fast[0], &h0, &s0, &mask).unwrap();
        identical(&format!("{shape:?} inverse"), &inv, &inv_ref);
        close(&format!("{shape:?} round trip"), &inv, &x0);
    }
}

/// Only the log-det is differentiated (y unused), and only y.
#[test]
fn coupling_partial_graphs() {
    let (x0, h0, s0, mask, r, _) = coupling_case(&[2, 3, 3, 4], 11);
    let h = Var::from_tensor(&h0).unwrap();
    let (_, ld) = coupling(&x0, &h, &s0, &mask).unwrap();
    let g = ld.sum_all().unwrap().backward().unwrap();
    let (_, ld_ref) = coupling_reference(&x0, &h, &s0, &mask).unwrap();
    let g_ref = ld_ref.sum_all().unwrap().backward().unwrap();
    close("ld-only dh", g.get(&h).unwrap(), g_ref.get(&h).unwrap());

    let x = Var::from_tensor(&x0).unwrap();
    let (y, _) = coupling(&x, &h0, &s0, &mask).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let (y_ref, _) = coupling_reference(&x, &h0, &s0, &mask).unwrap();
    let g_ref = (&y_ref * &r)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    close("y-only dx", g.get(&x).unwrap(), g_ref.get(&x).unwrap());
}

#[test]
fn mask_mul_matches_candle() {
    for (i, shape) in COUPLING_SHAPES.iter().enumerate() {
        let (x0, _, _, mask, r, _) = coupling_case(shape, 50 + i as u64);
        let x = Var::from_tensor(&x0).unwrap();
        let y = mask_mul(&x, &mask).unwrap();
        let y_ref = x.broadcast_mul(&mask).unwrap();
        identical(&format!("{shape:?} mask_mul"), &y, &y_ref);
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (&y_ref * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        identical(
            &format!("{shape:?} mask_mul grad"),
            g.get(&x).unwrap(),
            g_ref.get(&x).unwrap(),
        );
    }
}
