//! The preprocessing bijection (dequantisation + logit) and bits/dim, checked against
//! numbers computed by hand, a uniform density, finite differences and round trips.

use nvp::data::preprocess::{
    bits_per_dim, bits_per_dim_batch, mean_bits_per_dim, standard_normal_log_prob, LN_256,
};
use nvp::data::{Dequantize, Logit};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::f64::consts::{LN_2, PI};

const ALPHA: f64 = 0.05;

/// The closed form for a constant image (every sub-pixel `pixel`, every noise `u`) under
/// the identity flow with a standard normal prior.
fn closed_form_bpd(pixel: u8, u: f64) -> f64 {
    let x = f64::from(pixel) + u;
    let p = ALPHA + (1.0 - 2.0 * ALPHA) * x / 256.0;
    let y = (p / (1.0 - p)).ln();
    let log_prior = -0.5 * y * y - 0.5 * (2.0 * PI).ln();
    let ld = (1.0 - 2.0 * ALPHA).ln() - 256f64.ln() - p.ln() - (1.0 - p).ln();
    // every dimension contributes the same, so bits/dim is the per-dimension value
    -(log_prior + ld) / LN_2
}

#[test]
fn identity_flow_on_constant_image_matches_closed_form() {
    let dq = Dequantize::new(ALPHA).unwrap();
    let dims = 3 * 4 * 4;
    // (pixel, u, bits/dim computed independently in Python)
    let cases = [
        (128u8, 0.5, 7.477768989526108),
        (0u8, 0.5, 11.229193406626115),
        (255u8, 0.25, 11.177841100215149),
    ];
    for (pixel, u, expected) in cases {
        let pixels = vec![pixel; dims];
        let noise = vec![u; dims];
        let (y, ld) = dq.apply_with_noise_f64(&pixels, &noise).unwrap();
        let bpd = bits_per_dim(standard_normal_log_prob(&y), ld, dims);
        assert!(
            (bpd - expected).abs() < 1e-12,
            "{pixel}: {bpd} vs {expected}"
        );
        assert!((bpd - closed_form_bpd(pixel, u)).abs() < 1e-12);

        // the f32 path: same ld (computed in f64), y rounded to f32
        let mut y32 = vec![0f32; dims];
        let ld32 = dq.apply_with_noise(&pixels, &noise, &mut y32).unwrap();
        assert_eq!(ld32, ld);
        for (a, b) in y32.iter().zip(&y) {
            assert!((f64::from(*a) - b).abs() < 1e-6);
        }
    }
}

/// The uniform density `256^-D` on the cube `[0, 256)^D`, pushed to logit space, is 8
/// bits/dim. Its log-density at `y` is computed here from `y` alone, with the inverse
/// map's derivative `dx/dy = 256/(1 − 2α) · σ(y)(1 − σ(y))` written out (not the
/// library's log-det): `log p_y(y) = −D ln 256 + Σ_k ln |dx_k/dy_k|`. Then
/// `bits/dim = −(log p_y + ld_pre)/(D ln 2)` is 8 exactly when the library's `ld_pre`
/// equals `−Σ ln |dx/dy|`: a missing `−ln 256` gives 0, a wrong α term or sign moves it.
#[test]
fn uniform_density_on_the_cube_gives_8_bits_per_dim_via_the_inverse_jacobian() {
    let mut rng = StdRng::seed_from_u64(7);
    for alpha in [0.05, 0.001, 0.3] {
        let dq = Dequantize::new(alpha).unwrap();
        for dims in [1usize, 12, 3072] {
            let pixels: Vec<u8> = (0..dims).map(|_| rng.random()).collect();
            let noise = Dequantize::noise(&mut rng, dims);
            let (y, ld) = dq.apply_with_noise_f64(&pixels, &noise).unwrap();
            // ln σ(y) = −ln(1 + e^−y), ln(1 − σ(y)) = −ln(1 + e^y)
            let ln_dx_dy: f64 = y
                .iter()
                .map(|&v| {
                    256f64.ln() - (1.0 - 2.0 * alpha).ln() - (-v).exp().ln_1p() - v.exp().ln_1p()
                })
                .sum();
            let log_p_y = -(dims as f64) * 256f64.ln() + ln_dx_dy;
            let bpd = bits_per_dim(log_p_y, ld, dims);
            assert!((bpd - 8.0).abs() < 1e-11, "alpha {alpha}, D {dims}: {bpd}");
        }
    }
}

#[test]
fn uniform_density_pushed_to_logit_space_integrates_to_one() {
    // Independent of the bits/dim formula: p_y(y) = 256^-1 · exp(-ld(x(y))) must integrate
    // to 1 over the image of [0, 256), which checks the sign and the ln 256 term of ld.
    for alpha in [0.05, 0.001, 0.3] {
        let l = Logit::new(alpha).unwrap();
        let (y0, y1) = (l.forward_scalar(0.0), l.forward_scalar(256.0));
        let n = 200_000; // even, Simpson
        let h = (y1 - y0) / n as f64;
        let f = |y: f64| (-LN_256 - l.log_det_scalar(l.inverse_scalar(y))).exp();
        let mut s = f(y0) + f(y1);
        for k in 1..n {
            s += if k % 2 == 1 { 4.0 } else { 2.0 } * f(y0 + k as f64 * h);
        }
        let integral = s * h / 3.0;
        assert!((integral - 1.0).abs() < 1e-9, "alpha {alpha}: {integral}");
    }
}

#[test]
fn log_det_matches_finite_differences() {
    for alpha in [0.05, 1e-6, 0.2, 0.45] {
        let l = Logit::new(alpha).unwrap();
        let mut xs = Vec::new();
        for k in 0..=512 {
            let x = 0.01 + k as f64 * (255.98 / 512.0);
            // step scaled to the distance from the ends, where the curvature is high
            let h = 1e-4 * x.min(256.0 - x).min(1.0);
            let fd = (l.forward_scalar(x + h) - l.forward_scalar(x - h)) / (2.0 * h);
            let ld = l.log_det_scalar(x);
            assert!(
                (fd.ln() - ld).abs() < 1e-7,
                "alpha {alpha}, x {x}: fd {} vs {ld}",
                fd.ln()
            );
            xs.push(x);
        }
        let total = l.log_det(&xs).unwrap();
        let sum: f64 = xs.iter().map(|&x| l.log_det_scalar(x)).sum();
        assert!((total - sum).abs() < 1e-9);
        let (_, ld_fwd) = l.forward_f64(&xs).unwrap();
        assert!((ld_fwd - total).abs() < 1e-9);
    }
}

#[test]
fn inverse_undoes_forward() {
    let l = Logit::default();
    let xs: Vec<f64> = (0..25_600).map(|k| k as f64 * 0.01 + 0.003).collect();
    let (y, _) = l.forward_f64(&xs).unwrap();
    for (a, b) in l.inverse_f64(&y).iter().zip(&xs) {
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }
    let xs32: Vec<f32> = xs.iter().map(|&x| x as f32).collect();
    let (y32, _) = l.forward(&xs32).unwrap();
    for (a, b) in l.inverse(&y32).iter().zip(&xs32) {
        assert!((a - b).abs() < 5e-4, "{a} vs {b}");
    }
}

#[test]
fn to_pixels_recovers_every_pixel_value_for_many_noise_values() {
    let dq = Dequantize::default();
    let l = dq.logit;
    let pixels: Vec<u8> = (0..=255).collect();
    // f64: noise right up to the cell edges
    let mut us: Vec<f64> = (0..200).map(|k| (k as f64 + 0.5) / 200.0).collect();
    us.extend([1e-7, 1e-4, 0.5, 1.0 - 1e-4, 1.0 - 1e-7]);
    for &u in &us {
        let noise = vec![u; 256];
        let (y, _) = dq.apply_with_noise_f64(&pixels, &noise).unwrap();
        assert_eq!(l.to_pixels_f64(&y), pixels, "u = {u}");
        // f32 logits: exact away from the last few ulps of a cell
        if (1e-3..=1.0 - 1e-3).contains(&u) {
            let mut y32 = vec![0f32; 256];
            dq.apply_with_noise(&pixels, &noise, &mut y32).unwrap();
            assert_eq!(l.to_pixels(&y32), pixels, "u = {u} (f32)");
        }
    }
    // random noise
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..50 {
        let mut y32 = vec![0f32; 256];
        let noise: Vec<f64> = (0..256)
            .map(|_| rng.random_range(1e-3..1.0 - 1e-3))
            .collect();
        dq.apply_with_noise(&pixels, &noise, &mut y32).unwrap();
        assert_eq!(l.to_pixels(&y32), pixels);
    }
}

#[test]
fn to_pixels_clamps_out_of_range_values() {
    let l = Logit::default();
    assert_eq!(
        l.to_pixels(&[-1e30, 1e30, f32::NAN, -100.0, 100.0]),
        vec![0, 255, 0, 0, 255]
    );
    assert_eq!(
        l.to_pixels_f64(&[f64::NEG_INFINITY, f64::INFINITY]),
        vec![0, 255]
    );
}

#[test]
fn rng_path_equals_explicit_noise_path() {
    let dq = Dequantize::default();
    let pixels: Vec<u8> = (0..300).map(|k| (k * 37 % 256) as u8).collect();
    let mut a = vec![0f32; 300];
    let mut b = vec![0f32; 300];
    let ld_a = dq
        .apply(&pixels, &mut StdRng::seed_from_u64(11), &mut a)
        .unwrap();
    let noise = Dequantize::noise(&mut StdRng::seed_from_u64(11), 300);
    let ld_b = dq.apply_with_noise(&pixels, &noise, &mut b).unwrap();
    assert_eq!(a, b);
    assert_eq!(ld_a, ld_b);
    assert!(noise.iter().all(|u| (0.0..1.0).contains(u)));
}

#[test]
fn bad_arguments_are_errors() {
    assert!(Logit::new(0.5).is_err());
    assert!(Logit::new(-0.01).is_err());
    assert!(Logit::new(f64::NAN).is_err());
    assert!(Logit::new(1e-300).is_ok());
    assert!(Dequantize::new(0.7).is_err());
    let l = Logit::default();
    assert!(l.forward(&[-0.5]).is_err());
    assert!(l.forward(&[256.5]).is_err());
    assert!(l.forward_f64(&[f64::NAN]).is_err());
    let dq = Dequantize::default();
    let mut y = vec![0f32; 2];
    assert!(dq.apply_with_noise(&[1, 2], &[0.5, 1.0], &mut y).is_err());
    assert!(dq.apply_with_noise(&[1, 2], &[0.5], &mut y).is_err());
    assert!(dq.apply_with_noise(&[1, 2, 3], &[0.5; 3], &mut y).is_err());
    assert!(bits_per_dim_batch(&[1.0], &[1.0, 2.0], 3).is_err());
    assert!(bits_per_dim_batch(&[1.0], &[1.0], 0).is_err());
    assert!(mean_bits_per_dim(&[], &[], 3).is_err());
}

#[test]
fn batch_bits_per_dim_is_per_image() {
    let dims = 10;
    let lp = [-50.0, -60.0];
    let ld = [-30.0, -20.0];
    let b = bits_per_dim_batch(&lp, &ld, dims).unwrap();
    assert!((b[0] - 80.0 / (10.0 * LN_2)).abs() < 1e-12);
    assert!((b[1] - 80.0 / (10.0 * LN_2)).abs() < 1e-12);
    let m = mean_bits_per_dim(&lp, &ld, dims).unwrap();
    assert!((m - b[0]).abs() < 1e-12);
}

/// α = 0 would map the dequantised value 0 (pixel 0 with noise exactly 0, which
/// `Dequantize::apply` can draw) to `y = −∞` with `ld = +∞`, and 256 to `+∞`: it is a
/// typed error from the constructors, and since α is private no `Logit` (nor a
/// `Dequantize` holding one) exists with it.
#[test]
fn alpha_zero_is_an_invalid_argument() {
    use nvp::data::Error;
    for err in [
        Logit::new(0.0).unwrap_err(),
        Dequantize::new(0.0).unwrap_err(),
        Logit::new(-0.0).unwrap_err(),
    ] {
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("logit alpha") && m.contains("(0, 0.5)")),
            "{err}"
        );
    }
    for bad in [0.5, 0.7, -1e-9, f64::NAN, f64::INFINITY] {
        assert!(Logit::new(bad).is_err(), "alpha {bad} accepted");
        assert!(Dequantize::new(bad).is_err(), "alpha {bad} accepted");
    }
    assert_eq!(Logit::new(0.05).unwrap().alpha(), 0.05);
}

/// For any α > 0 the log-det is finite on all of `[0, 256]`, also where α is so small
/// that a product of 8 factors `p(1 − p) ≈ α` would underflow to 0. With α = 1e-300 and
/// x ∈ {0, 256}, p or 1 − p is α and the other rounds to 1, so each value contributes
/// `−ln 256 − ln α`; 16 values: `16·(ln(1 − 2α) − ln 256 − ln α − ln(1 − α))`
/// = 10963.685607259746 (Python, `math.log`).
#[test]
fn log_det_is_finite_for_a_tiny_alpha() {
    let l = Logit::new(1e-300).unwrap();
    let xs: Vec<f64> = [0.0; 8].into_iter().chain([256.0; 8]).collect();
    let expected = 10963.685607259746;
    let ld = l.log_det(&xs).unwrap();
    assert!((ld - expected).abs() < 1e-9, "{ld} vs {expected}");
    let (y, ld_fwd) = l.forward_f64(&xs).unwrap();
    assert_eq!(ld_fwd, ld);
    assert!(y.iter().all(|v| v.is_finite()), "{y:?}");
    // dequantised: pixel 0 with noise 0 gives x = 0
    let dq = Dequantize { logit: l };
    let (_, ld_dq) = dq.apply_with_noise_f64(&[0; 8], &[0.0; 8]).unwrap();
    assert!((ld_dq - expected / 2.0).abs() < 1e-9, "{ld_dq}");
}

/// `mean_and_stderr` against a hand case: [1, 2, 3] has mean 2, unbiased sample
/// variance ((1−2)² + 0 + (3−2)²)/(3 − 1) = 1 and standard error √(1/3) =
/// 0.5773502691896257 (a biased variance would give √(2/9) = 0.4714); one value has no
/// standard error, none has no mean.
#[test]
fn mean_and_stderr_of_a_hand_case() {
    use nvp::flow::bits::mean_and_stderr;
    let (m, se) = mean_and_stderr(&[1.0, 2.0, 3.0]);
    assert_eq!(m, 2.0);
    assert!((se - 0.5773502691896257).abs() < 1e-15, "{se}");
    let (m, se) = mean_and_stderr(&[4.5]);
    assert_eq!(m, 4.5);
    assert!(se.is_nan());
    let (m, se) = mean_and_stderr(&[]);
    assert!(m.is_nan() && se.is_nan());
}
