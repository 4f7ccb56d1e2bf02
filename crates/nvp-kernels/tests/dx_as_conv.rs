//! `conv2d_3x3_dx_as_conv` — the convolution off the fast CPU path with its input
//! gradient computed by `conv2d` instead of candle's `conv_transpose2d` (meant for CUDA,
//! whose transposed convolution is a naive kernel) — against candle's own `conv2d` and
//! its autograd, on the CPU: the same forward values (bit for bit: the same candle op),
//! gradients equal to rounding (f64: 1e-12, f32: 1e-5 relative to the largest
//! magnitude), for odd sizes, batch 1, with and without bias; and the switch that
//! routes `conv2d_3x3` through it.

use candle_core::{DType, Device, Tensor, Var};
use nvp_kernels::{conv2d_3x3, conv2d_3x3_dx_as_conv, conv2d_3x3_reference, tuning};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn rand_tensor(rng: &mut StdRng, dims: &[usize], dtype: DType) -> Tensor {
    let len: usize = dims.iter().product();
    let v: Vec<f64> = (0..len).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Max |a − b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f64> = a
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f64> = b
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    a.iter()
        .zip(&b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

type Conv = fn(&Tensor, &Tensor, Option<&Tensor>) -> candle_core::Result<Tensor>;

/// Output and gradients of x, w (and b) for `sum(conv(x, w, b) ⊙ r)`.
fn run(conv: Conv, x: &Tensor, w: &Tensor, b: Option<&Tensor>, r: &Tensor) -> Vec<Tensor> {
    let (xv, wv) = (Var::from_tensor(x).unwrap(), Var::from_tensor(w).unwrap());
    let bv = b.map(|b| Var::from_tensor(b).unwrap());
    let y = conv(
        xv.as_tensor(),
        wv.as_tensor(),
        bv.as_ref().map(|v| v.as_tensor()),
    )
    .unwrap();
    let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![
        y.clone(),
        g.get(xv.as_tensor()).unwrap().clone(),
        g.get(wv.as_tensor()).unwrap().clone(),
    ];
    if let Some(bv) = &bv {
        out.push(g.get(bv.as_tensor()).unwrap().clone());
    }
    out
}

#[test]
fn dx_as_conv_matches_candle_conv2d() {
    let mut rng = StdRng::seed_from_u64(7);
    for &(n, c, k, h, w) in &[
        (2, 3, 5, 7, 9),
        (1, 4, 4, 8, 8),
        (3, 1, 2, 5, 3),
        (2, 6, 3, 1, 4),
    ] {
        for dtype in [DType::F64, DType::F32] {
            let x = rand_tensor(&mut rng, &[n, c, h, w], dtype);
            let wt = rand_tensor(&mut rng, &[k, c, 3, 3], dtype);
            let b = rand_tensor(&mut rng, &[k], dtype);
            let r = rand_tensor(&mut rng, &[n, k, h, w], dtype);
            for bias in [Some(&b), None] {
                let got = run(conv2d_3x3_dx_as_conv, &x, &wt, bias, &r);
                let want = run(conv2d_3x3_reference, &x, &wt, bias, &r);
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                assert_eq!(
                    rel_err(&got[0], &want[0]),
                    0.0,
                    "forward ({n},{c},{k},{h},{w})"
                );
                for (i, what) in ["dx", "dw", "db"].iter().enumerate().take(got.len() - 1) {
                    let e = rel_err(&got[i + 1], &want[i + 1]);
                    assert!(e <= tol, "{what} ({n},{c},{k},{h},{w}) {dtype:?}: {e:e}");
                }
            }
        }
    }
}

/// The switch: off by default; on, `conv2d_3x3` takes this path where the fast CPU
/// path does not apply (here: f64) — visible as a graph node whose gradient is the
/// same; without a graph the plain convolution is returned.
#[test]
fn switch_routes_conv2d_3x3() {
    let mut rng = StdRng::seed_from_u64(8);
    let x = rand_tensor(&mut rng, &[2, 3, 6, 5], DType::F64);
    let wt = rand_tensor(&mut rng, &[4, 3, 3, 3], DType::F64);
    let b = rand_tensor(&mut rng, &[4], DType::F64);
    let r = rand_tensor(&mut rng, &[2, 4, 6, 5], DType::F64);
    assert!(!nvp_kernels::dx_as_conv_enabled() || std::env::var("NVP_DX_AS_CONV").is_ok());
    tuning::set_dx_as_conv(true);
    assert!(nvp_kernels::dx_as_conv_enabled());
    let got = run(conv2d_3x3, &x, &wt, Some(&b), &r);
    let want = run(conv2d_3x3_reference, &x, &wt, Some(&b), &r);
    for (g, w) in got.iter().zip(&want) {
        assert!(rel_err(g, w) <= 1e-12);
    }
    let plain = conv2d_3x3(&x, &wt, Some(&b)).unwrap();
    assert_eq!(rel_err(&plain, &want[0]), 0.0);
    tuning::set_dx_as_conv(false);
    assert!(!nvp_kernels::dx_as_conv_enabled());
}
