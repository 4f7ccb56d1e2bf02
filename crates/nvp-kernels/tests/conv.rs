//! Correctness of the fast f32 CPU path of `conv2d_3x3` against candle's own `conv2d`
//! (values and gradients through candle's autograd), with an f64 ground truth.
//!
//! Both fast algorithms are checked on every case: Winograd F(4×4, 3×3) (the default
//! for the forward pass and the input gradient, and on AVX2 CPUs for the weight gradient
//! where it pays — here forced on every size with `tuning::set_winograd_wgrad_always`),
//! its portable kernels (what a CPU without AVX2 runs; forced with
//! `tuning::set_winograd_portable`), and im2col + GEMM
//! (the alternative, selected with `tuning::set_winograd(false)`). The switches are
//! process-wide, so the tests of this file take a lock around them.
//!
//! Tolerances (max absolute difference over all elements, relative to the largest
//! magnitude of the reference tensor):
//! - im2col + GEMM vs candle f32 and vs f64: `REL_TOL_F32` = 1e-5 for the output and
//!   the x, w and b gradients (observed at most 4e-6, on the bias gradient, where
//!   candle's own f32 sum over 65 536 terms is the less accurate side; 1e-6 elsewhere).
//! - Winograd vs candle f32 and vs f64: `REL_TOL_WINOGRAD` = 5e-5 for the output and
//!   the x and w gradients. Winograd's transforms multiply by constants up to 8 (and
//!   divide by up to 24 in the weight transform), so its f32 rounding error is about
//!   ten times im2col's: observed up to 1.4e-5 at 128 channels (the error grows
//!   like the square root of the channel count); the bias gradient does not go
//!   through Winograd and keeps `REL_TOL_F32`.
//!
//! Set `NVP_TEST_VERBOSE=1` (with `--nocapture`) to print every measured error.
//! - f64 inputs take the reference path and must match candle bit for bit.
//! - `conv2d_3x3_dx_as_conv` (off the fast path, meant for CUDA: the input gradient by
//!   `conv2d` instead of candle's `conv_transpose2d`) against candle's autograd: the
//!   same forward values bit for bit, gradients within 1e-12 (f64) and 1e-5 (f32).

use candle_core::{DType, Device, Tensor, Var};
use std::sync::{Mutex, MutexGuard};

use nvp_kernels::{
    batch_norm, bf16_products_available, bn_relu_conv2d_3x3, bn_relu_conv_fuses, conv2d_3x3,
    conv2d_3x3_add, conv2d_3x3_dx_as_conv, conv2d_3x3_reference, dx_as_conv_enabled, tuning,
    uses_fast_path, Bf16Products, BnReluPrologue,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const REL_TOL_F32: f32 = 1e-5;
const REL_TOL_WINOGRAD: f32 = 5e-5;

/// Serialises the tests that flip the process-wide algorithm switch.
static ALGO: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    ALGO.lock().unwrap_or_else(|e| e.into_inner())
}

fn rand_vec(rng: &mut StdRng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn rand_tensor(rng: &mut StdRng, dims: &[usize]) -> Tensor {
    let len = dims.iter().product();
    Tensor::from_vec(rand_vec(rng, len), dims, &Device::Cpu).unwrap()
}

/// Max |a − b| / max |want|, as f32 (inputs of any float dtype, same shape).
fn rel_err(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shape mismatch");
    let g: Vec<f64> = got
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w: Vec<f64> = want
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let scale = w.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    let diff = g
        .iter()
        .zip(&w)
        .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    (diff / scale) as f32
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: f32) {
    let e = rel_err(got, want);
    if std::env::var("NVP_TEST_VERBOSE").is_ok() {
        println!("{what}: {e:.2e}");
    }
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

struct Out {
    y: Tensor,
    gx: Tensor,
    gw: Tensor,
    gb: Option<Tensor>,
}

/// Forward + backward of `sum(conv(x, w, b) · r)` through candle's autograd.
fn run(
    conv: fn(&Tensor, &Tensor, Option<&Tensor>) -> candle_core::Result<Tensor>,
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    r: &Tensor,
    dtype: DType,
) -> Out {
    let xv = Var::from_tensor(&x.to_dtype(dtype).unwrap()).unwrap();
    let wv = Var::from_tensor(&w.to_dtype(dtype).unwrap()).unwrap();
    let bv = b.map(|b| Var::from_tensor(&b.to_dtype(dtype).unwrap()).unwrap());
    let y = conv(
        xv.as_tensor(),
        wv.as_tensor(),
        bv.as_ref().map(|b| b.as_tensor()),
    )
    .unwrap();
    let loss = (&y * r.to_dtype(dtype).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    Out {
        y,
        gx: grads.get(xv.as_tensor()).expect("no grad for x").clone(),
        gw: grads.get(wv.as_tensor()).expect("no grad for w").clone(),
        gb: bv.map(|b| grads.get(b.as_tensor()).expect("no grad for b").clone()),
    }
}

/// Checks one shape, with and without bias, with both algorithms: fast f32 against
/// candle f32 and f64.
fn check_case(n: usize, c: usize, k: usize, h: usize, w: usize, seed: u64) {
    let _guard = lock();
    let mut rng = StdRng::seed_from_u64(seed);
    let x = rand_tensor(&mut rng, &[n, c, h, w]);
    let wt = rand_tensor(&mut rng, &[k, c, 3, 3]);
    let b = rand_tensor(&mut rng, &[k]);
    let r = rand_tensor(&mut rng, &[n, k, h, w]);
    assert!(uses_fast_path(&x, &wt, Some(&b)));
    let wants: Vec<_> = [Some(&b), None]
        .into_iter()
        .map(|bias| {
            [DType::F32, DType::F64].map(|dt| run(conv2d_3x3_reference, &x, &wt, bias, &r, dt))
        })
        .collect();
    for (algo, tol) in [
        ("winograd", REL_TOL_WINOGRAD),
        ("winograd-portable", REL_TOL_WINOGRAD),
        ("im2col", REL_TOL_F32),
    ] {
        tuning::set_winograd(algo != "im2col");
        tuning::set_winograd_portable(algo == "winograd-portable");
        tuning::set_winograd_wgrad_always(algo == "winograd");
        for (bias, want2) in [Some(&b), None].into_iter().zip(&wants) {
            let tag = format!(
                "[{algo}] (n={n}, c={c}, k={k}, h={h}, w={w}, bias={})",
                bias.is_some()
            );
            let fast = run(conv2d_3x3, &x, &wt, bias, &r, DType::F32);
            assert_eq!(fast.y.dtype(), DType::F32);
            assert_eq!(fast.y.dims(), &[n, k, h, w]);
            for (refname, want) in ["candle f32", "candle f64"].into_iter().zip(want2) {
                assert_close(&format!("{tag} y vs {refname}"), &fast.y, &want.y, tol);
                assert_close(&format!("{tag} dx vs {refname}"), &fast.gx, &want.gx, tol);
                assert_close(&format!("{tag} dw vs {refname}"), &fast.gw, &want.gw, tol);
                if let (Some(g), Some(e)) = (&fast.gb, &want.gb) {
                    assert_close(&format!("{tag} db vs {refname}"), g, e, REL_TOL_F32);
                }
            }
        }
    }
    tuning::set_winograd(true);
    tuning::set_winograd_portable(false);
    tuning::set_winograd_wgrad_always(false);
}

#[test]
fn odd_sizes() {
    check_case(2, 3, 5, 5, 7, 1);
    check_case(3, 5, 3, 7, 5, 2);
}

#[test]
fn batch_one() {
    // n = 1 is smaller than the thread pool: exercises the parallel-GEMM branch.
    check_case(1, 4, 6, 8, 8, 3);
    check_case(1, 3, 2, 5, 7, 4);
}

#[test]
fn tiny_and_degenerate_spatial() {
    check_case(2, 1, 1, 1, 1, 5);
    check_case(3, 2, 3, 1, 9, 6);
    check_case(2, 2, 2, 9, 1, 7);
    check_case(1, 1, 1, 2, 2, 8);
}

/// Sizes that are not multiples of the 4×4 Winograd tile (cropped tiles at the
/// bottom and right), with an even and an odd number of tile columns, and blocks
/// forced down to 16 tiles so that they split images and tile rows.
#[test]
fn winograd_partial_tiles_and_small_blocks() {
    check_case(3, 5, 7, 13, 22, 16);
    check_case(2, 4, 5, 9, 14, 17);
    check_case(2, 3, 4, 7, 10, 18);
    {
        let _guard = lock();
        tuning::set_winograd_block_bytes(1);
    }
    check_case(3, 5, 7, 13, 22, 19);
    check_case(4, 6, 6, 16, 16, 20);
    check_case(2, 8, 13, 8, 8, 21);
    // At least 128 channels on both sides: the weight gradient's outer-product form,
    // with a part-run of input channels (136 = 8·16 + 8) and of output rows
    // (130 = 21·6 + 4).
    check_case(2, 136, 130, 8, 8, 22);
    let _guard = lock();
    tuning::set_winograd_block_bytes(640 * 1024);
}

/// Few tiles and many channels: the Winograd weight gradient with all tiles in one
/// block and its 36 products as GEMMs (`winograd::wgrad_gemm_pays`: 32 to 512 tiles,
/// 128² ≤ k·c ≤ 512²; the blocked Winograd does not pay there) against candle in f64.
#[test]
fn winograd_weight_gradient_by_gemm_for_few_tiles() {
    let _guard = lock();
    tuning::set_winograd_wgrad_always(false);
    for (i, &shape) in [
        (64, 128, 128, 4, 4),
        (4, 160, 128, 15, 13),
        (1, 256, 200, 32, 32),
    ]
    .iter()
    .enumerate()
    {
        check_unforced_winograd(shape, 60 + i as u64);
    }
}

/// The weight and input gradients at `(n, c, k, h, w)`, by the algorithm the kernels
/// choose themselves, against candle in f64 within the Winograd tolerance.
fn check_unforced_winograd((n, c, k, h, w): (usize, usize, usize, usize, usize), seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let x = rand_tensor(&mut rng, &[n, c, h, w]);
    let wt = rand_tensor(&mut rng, &[k, c, 3, 3]);
    let r = rand_tensor(&mut rng, &[n, k, h, w]);
    let fast = run(conv2d_3x3, &x, &wt, None, &r, DType::F32);
    let want = run(conv2d_3x3_reference, &x, &wt, None, &r, DType::F64);
    let tag = format!("(n={n}, c={c}, k={k}, h={h}, w={w})");
    assert_close(&format!("{tag} dw"), &fast.gw, &want.gw, REL_TOL_WINOGRAD);
    assert_close(&format!("{tag} dx"), &fast.gx, &want.gx, REL_TOL_WINOGRAD);
}

/// The residual form `conv2d_3x3_add`: without a graph the addition is fused into the
/// convolution's output and must equal `conv2d_3x3(..) + skip` bit for bit, for every
/// algorithm; with a graph it is that composition and differentiable.
#[test]
fn fused_residual_add_is_bit_identical() {
    let _guard = lock();
    for (i, &(n, c, k, h, w)) in [
        (3, 5, 7, 13, 22),
        (2, 4, 4, 8, 8),
        (2, 3, 6, 7, 10),
        (64, 32, 32, 16, 16),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = StdRng::seed_from_u64(30 + i as u64);
        let x = rand_tensor(&mut rng, &[n, c, h, w]);
        let wt = rand_tensor(&mut rng, &[k, c, 3, 3]);
        let b = rand_tensor(&mut rng, &[k]);
        let skip = rand_tensor(&mut rng, &[n, k, h, w]);
        for algo in ["winograd", "winograd-portable", "im2col"] {
            tuning::set_winograd(algo != "im2col");
            tuning::set_winograd_portable(algo == "winograd-portable");
            tuning::set_winograd_wgrad_always(algo == "winograd");
            for bias in [Some(&b), None] {
                let fused = conv2d_3x3_add(&x, &wt, bias, &skip).unwrap();
                let plain = (conv2d_3x3(&x, &wt, bias).unwrap() + &skip).unwrap();
                let d = (fused - plain)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(
                    d,
                    0.0,
                    "{algo} ({n},{c},{k},{h},{w}) bias {}",
                    bias.is_some()
                );
            }
        }
    }
    tuning::set_winograd(true);
    tuning::set_winograd_portable(false);
    tuning::set_winograd_wgrad_always(false);
    // With a graph: gradients reach x, w, b and skip (dskip = the output gradient).
    let mut rng = StdRng::seed_from_u64(40);
    let x = Var::from_tensor(&rand_tensor(&mut rng, &[2, 3, 6, 6])).unwrap();
    let wt = rand_tensor(&mut rng, &[4, 3, 3, 3]);
    let skip = Var::from_tensor(&rand_tensor(&mut rng, &[2, 4, 6, 6])).unwrap();
    let r = rand_tensor(&mut rng, &[2, 4, 6, 6]);
    let y = conv2d_3x3_add(x.as_tensor(), &wt, None, skip.as_tensor()).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(x.as_tensor()).is_some());
    let ds = g.get(skip.as_tensor()).unwrap();
    assert_eq!(rel_err(ds, &r), 0.0);
    // Shapes are checked.
    let bad = rand_tensor(&mut rng, &[2, 5, 6, 6]);
    assert!(conv2d_3x3_add(x.as_tensor(), &wt, None, &bad).is_err());
}

/// Outputs written with non-temporal stores (`tuning::set_winograd_stream_bytes`: the
/// default for outputs larger than 1 MiB) hold the same bits as with plain stores: the
/// forward pass with bias and with a fused residual, and the input gradient (written by
/// the same blocks); with full and partial (`w = 14`) pairs of tile columns, and odd
/// tile columns (the portable transforms, which never stream), in f32 and, where the
/// CPU has AVX512-BF16, with bf16 products.
#[test]
fn non_temporal_stores_give_the_same_bits() {
    let _guard = lock();
    for (i, &(n, c, k, h, w)) in [
        (2, 3, 5, 14, 14),
        (3, 4, 5, 12, 24),
        (2, 4, 4, 8, 8),
        (3, 5, 7, 13, 22),
        (8, 16, 16, 32, 32),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = StdRng::seed_from_u64(80 + i as u64);
        let x = rand_tensor(&mut rng, &[n, c, h, w]);
        let wt = rand_tensor(&mut rng, &[k, c, 3, 3]);
        let b = rand_tensor(&mut rng, &[k]);
        let skip = rand_tensor(&mut rng, &[n, k, h, w]);
        let r = rand_tensor(&mut rng, &[n, k, h, w]);
        for bf16 in [false, true] {
            if bf16 && !bf16_products_available() {
                continue;
            }
            let pass = |stream_bytes: usize| {
                tuning::set_winograd_stream_bytes(stream_bytes);
                let _bf16 = bf16.then(Bf16Products::enable);
                let out = run(conv2d_3x3, &x, &wt, Some(&b), &r, DType::F32);
                let added = conv2d_3x3_add(&x, &wt, None, &skip).unwrap();
                (out, added)
            };
            let (plain, streamed) = (pass(usize::MAX), pass(0));
            tuning::set_winograd_stream_bytes(1 << 20);
            let tag = format!("({n},{c},{k},{h},{w}) bf16 {bf16}");
            assert_same_bits(&format!("{tag} y"), &plain.0.y, &streamed.0.y);
            assert_same_bits(&format!("{tag} dx"), &plain.0.gx, &streamed.0.gx);
            assert_same_bits(&format!("{tag} y + skip"), &plain.1, &streamed.1);
        }
    }
}

/// `bn_relu_conv2d_3x3`: the eval-mode batch norm + ReLU applied while the convolution
/// pads its input must equal `batch_norm` (eval, ReLU) followed by `conv2d_3x3` /
/// `conv2d_3x3_add` bit for bit, for every algorithm, with and without bias and skip,
/// for even (mapped inside the AVX2 transform) and odd (mapped first) tile columns.
#[test]
fn fused_bn_relu_prologue_is_bit_identical() {
    let _guard = lock();
    let eps = 1e-5;
    for (i, &(n, c, k, h, w)) in [
        (3, 5, 7, 13, 22),
        (2, 4, 4, 8, 8),
        (2, 3, 6, 7, 10),
        (1, 2, 3, 5, 5),
        (64, 32, 32, 16, 16),
    ]
    .iter()
    .enumerate()
    {
        let mut rng = StdRng::seed_from_u64(50 + i as u64);
        let x = rand_tensor(&mut rng, &[n, c, h, w]);
        let gamma = rand_tensor(&mut rng, &[c]);
        let beta = rand_tensor(&mut rng, &[c]);
        let mean = (rand_tensor(&mut rng, &[c]) * 0.3).unwrap();
        let var = (rand_tensor(&mut rng, &[c]).abs().unwrap() + 0.05).unwrap();
        let wt = rand_tensor(&mut rng, &[k, c, 3, 3]);
        let b = rand_tensor(&mut rng, &[k]);
        let skip = rand_tensor(&mut rng, &[n, k, h, w]);
        let pro = BnReluPrologue::new(&gamma, &beta, &mean, &var, eps).unwrap();
        assert_eq!(pro.channels(), c);
        for algo in ["winograd", "winograd-portable", "im2col"] {
            tuning::set_winograd(algo != "im2col");
            tuning::set_winograd_portable(algo == "winograd-portable");
            tuning::set_winograd_wgrad_always(algo == "winograd");
            let a = batch_norm(
                &x,
                Some((&gamma, &beta)),
                Some((&mean, &var)),
                eps,
                true,
                false,
            )
            .unwrap()
            .y;
            for bias in [Some(&b), None] {
                for sk in [Some(&skip), None] {
                    assert!(bn_relu_conv_fuses(&x, &wt, bias, sk));
                    let fused = bn_relu_conv2d_3x3(&x, &pro, &wt, bias, sk).unwrap();
                    let plain = match sk {
                        Some(s) => conv2d_3x3_add(&a, &wt, bias, s).unwrap(),
                        None => conv2d_3x3(&a, &wt, bias).unwrap(),
                    };
                    let f: Vec<f32> = fused.flatten_all().unwrap().to_vec1().unwrap();
                    let p: Vec<f32> = plain.flatten_all().unwrap().to_vec1().unwrap();
                    let same = f.iter().zip(&p).all(|(u, v)| u.to_bits() == v.to_bits());
                    assert!(
                        same,
                        "{algo} ({n},{c},{k},{h},{w}) bias {} skip {}",
                        bias.is_some(),
                        sk.is_some()
                    );
                }
            }
        }
    }
    tuning::set_winograd(true);
    tuning::set_winograd_portable(false);
    tuning::set_winograd_wgrad_always(false);
    // Refused with a graph or a channel mismatch, with a clear error.
    let mut rng = StdRng::seed_from_u64(60);
    let c = 3;
    let ones = Tensor::ones(c, DType::F32, &Device::Cpu).unwrap();
    let zeros = Tensor::zeros(c, DType::F32, &Device::Cpu).unwrap();
    let pro = BnReluPrologue::new(&ones, &zeros, &zeros, &ones, eps).unwrap();
    let wt = rand_tensor(&mut rng, &[4, c, 3, 3]);
    let xv = Var::from_tensor(&rand_tensor(&mut rng, &[2, c, 6, 6])).unwrap();
    assert!(!bn_relu_conv_fuses(xv.as_tensor(), &wt, None, None));
    let e = bn_relu_conv2d_3x3(xv.as_tensor(), &pro, &wt, None, None).unwrap_err();
    assert!(e.to_string().contains("without a graph"), "{e}");
    let x4 = rand_tensor(&mut rng, &[2, 4, 6, 6]);
    let w4 = rand_tensor(&mut rng, &[4, 4, 3, 3]);
    let e = bn_relu_conv2d_3x3(&x4, &pro, &w4, None, None).unwrap_err();
    assert!(e.to_string().contains("3 channels"), "{e}");
    let short = Tensor::ones(2, DType::F32, &Device::Cpu).unwrap();
    assert!(BnReluPrologue::new(&ones, &short, &zeros, &ones, eps).is_err());
}

#[test]
fn random_shapes() {
    let mut rng = StdRng::seed_from_u64(42);
    for i in 0..12 {
        let n = rng.random_range(1..=6);
        let c = rng.random_range(1..=9);
        let k = rng.random_range(1..=9);
        let h = rng.random_range(1..=12);
        let w = rng.random_range(1..=12);
        check_case(n, c, k, h, w, 100 + i);
    }
}

/// Batch of the real model in release builds; a few images in debug builds, where
/// candle's reference convolution is very slow.
fn real_batch() -> usize {
    if cfg!(debug_assertions) {
        2
    } else {
        64
    }
}

#[test]
fn real_shape_32_to_64_channels() {
    check_case(real_batch(), 32, 64, 32, 32, 9);
}

#[test]
fn real_shape_128_channels_16x16() {
    check_case(real_batch() / 2, 128, 128, 16, 16, 10);
}

/// `cifar10-small`'s inner 16×16 convolution, where the Winograd weight gradient pays
/// only with blocks smaller than its byte budget (4 blocks of 256 tiles, not 3.8 of
/// 272), taken by the kernels' own choice (not forced) and checked against f64.
#[test]
fn winograd_weight_gradient_in_short_blocks() {
    let _guard = lock();
    tuning::set_winograd_wgrad_always(false);
    check_unforced_winograd((real_batch(), 32, 32, 16, 16), 70);
}

#[test]
fn non_contiguous_inputs() {
    let mut rng = StdRng::seed_from_u64(11);
    // x stored as (n, h, w, c) and permuted to NCHW; w stored transposed.
    let x_nhwc = Var::from_tensor(&rand_tensor(&mut rng, &[3, 6, 5, 4])).unwrap();
    let w_t = Var::from_tensor(&rand_tensor(&mut rng, &[4, 7, 3, 3])).unwrap();
    let r = rand_tensor(&mut rng, &[3, 7, 6, 5]);
    let _guard = lock();
    let x = x_nhwc.as_tensor().permute((0, 3, 1, 2)).unwrap();
    let w = w_t.as_tensor().transpose(0, 1).unwrap();
    assert!(!x.is_contiguous() && !w.is_contiguous());
    let mut results = Vec::new();
    for conv in [conv2d_3x3, conv2d_3x3_reference] {
        let y = conv(&x, &w, None).unwrap();
        let loss = (&y * &r).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        results.push((
            y,
            g.get(x_nhwc.as_tensor()).unwrap().clone(),
            g.get(w_t.as_tensor()).unwrap().clone(),
        ));
    }
    let (f, e) = (&results[0], &results[1]);
    assert_close("y", &f.0, &e.0, REL_TOL_WINOGRAD);
    assert_close("dx", &f.1, &e.1, REL_TOL_WINOGRAD);
    assert_close("dw", &f.2, &e.2, REL_TOL_WINOGRAD);
}

#[test]
fn grad_only_for_weight_and_accumulation() {
    // x is a constant; the convolution is used twice so gradients accumulate.
    let mut rng = StdRng::seed_from_u64(12);
    let x = rand_tensor(&mut rng, &[2, 3, 6, 6]);
    let w = Var::from_tensor(&rand_tensor(&mut rng, &[3, 3, 3, 3])).unwrap();
    let b = Var::from_tensor(&rand_tensor(&mut rng, &[3])).unwrap();
    let _guard = lock();
    let mut grads = Vec::new();
    for (i, conv) in [conv2d_3x3, conv2d_3x3_reference].into_iter().enumerate() {
        let y1 = conv(&x, w.as_tensor(), Some(b.as_tensor())).unwrap();
        let y2 = conv(&y1, w.as_tensor(), Some(b.as_tensor())).unwrap();
        let loss = y2.sqr().unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        if i == 0 {
            // The fast path skips the gradient of arguments that carry no graph.
            assert!(g.get(&x).is_none());
        }
        grads.push((
            g.get(w.as_tensor()).unwrap().clone(),
            g.get(b.as_tensor()).unwrap().clone(),
        ));
    }
    assert_close("dw", &grads[0].0, &grads[1].0, REL_TOL_WINOGRAD);
    assert_close("db", &grads[0].1, &grads[1].1, REL_TOL_F32);
}

#[test]
fn f64_uses_reference_path_exactly() {
    let mut rng = StdRng::seed_from_u64(13);
    let x = rand_tensor(&mut rng, &[2, 3, 5, 4])
        .to_dtype(DType::F64)
        .unwrap();
    let w = rand_tensor(&mut rng, &[2, 3, 3, 3])
        .to_dtype(DType::F64)
        .unwrap();
    let b = rand_tensor(&mut rng, &[2]).to_dtype(DType::F64).unwrap();
    assert!(!uses_fast_path(&x, &w, Some(&b)));
    let y = conv2d_3x3(&x, &w, Some(&b)).unwrap();
    let e = conv2d_3x3_reference(&x, &w, Some(&b)).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    let d = (y - e)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert_eq!(d, 0.0);
}

#[test]
fn bad_shapes_are_errors() {
    let mut rng = StdRng::seed_from_u64(14);
    let x = rand_tensor(&mut rng, &[2, 3, 5, 5]);
    let w_bad_c = rand_tensor(&mut rng, &[4, 2, 3, 3]);
    let w_5x5 = rand_tensor(&mut rng, &[4, 3, 5, 5]);
    let w = rand_tensor(&mut rng, &[4, 3, 3, 3]);
    let b_bad = rand_tensor(&mut rng, &[5]);
    assert!(conv2d_3x3(&x, &w_bad_c, None).is_err());
    assert!(conv2d_3x3(&x, &w_5x5, None).is_err());
    assert!(conv2d_3x3(&x, &w, Some(&b_bad)).is_err());
    assert!(conv2d_3x3(&x.flatten_all().unwrap(), &w, None).is_err());
}

/// The comparison can fail: a kernel flipped in one spatial direction (a classic
/// im2col bug) is far outside the tolerance.
#[test]
fn comparison_detects_a_wrong_kernel() {
    let mut rng = StdRng::seed_from_u64(15);
    let x = rand_tensor(&mut rng, &[2, 3, 6, 7]);
    let w = rand_tensor(&mut rng, &[4, 3, 3, 3]);
    let w_flipped = Tensor::cat(
        &[
            w.narrow(3, 2, 1).unwrap(),
            w.narrow(3, 1, 1).unwrap(),
            w.narrow(3, 0, 1).unwrap(),
        ],
        3,
    )
    .unwrap();
    let _guard = lock();
    let y = conv2d_3x3(&x, &w, None).unwrap();
    let wrong = conv2d_3x3_reference(&x, &w_flipped, None).unwrap();
    assert!(rel_err(&y, &wrong) > 1e-2);
}

/// `conv2d_3x3_dx_as_conv` against candle's `conv2d` and its autograd on the CPU, for
/// odd sizes, batch 1, with and without bias, in f64 and f32.
#[test]
fn dx_as_conv_matches_candle_conv2d() {
    let mut rng = StdRng::seed_from_u64(7);
    for &(n, c, k, h, w) in &[
        (2, 3, 5, 7, 9),
        (1, 4, 4, 8, 8),
        (3, 1, 2, 5, 3),
        (2, 6, 3, 1, 4),
    ] {
        let x = rand_tensor(&mut rng, &[n, c, h, w]);
        let wt = rand_tensor(&mut rng, &[k, c, 3, 3]);
        let b = rand_tensor(&mut rng, &[k]);
        let r = rand_tensor(&mut rng, &[n, k, h, w]);
        for dtype in [DType::F64, DType::F32] {
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            for bias in [Some(&b), None] {
                let got = run(conv2d_3x3_dx_as_conv, &x, &wt, bias, &r, dtype);
                let want = run(conv2d_3x3_reference, &x, &wt, bias, &r, dtype);
                let case = format!("({n},{c},{k},{h},{w}) {dtype:?}");
                assert_eq!(rel_err(&got.y, &want.y), 0.0, "forward {case}");
                assert_close(&format!("dx {case}"), &got.gx, &want.gx, tol);
                assert_close(&format!("dw {case}"), &got.gw, &want.gw, tol);
                if let (Some(g), Some(w)) = (&got.gb, &want.gb) {
                    assert_close(&format!("db {case}"), g, w, tol);
                }
            }
        }
    }
}

/// The switch: off by default; on, `conv2d_3x3` takes that path where the fast CPU
/// path does not apply (here: f64), with the same gradients; without a graph the plain
/// convolution is returned.
#[test]
fn dx_as_conv_switch_routes_conv2d_3x3() {
    let _guard = lock();
    let mut rng = StdRng::seed_from_u64(8);
    let x = rand_tensor(&mut rng, &[2, 3, 6, 5]);
    let wt = rand_tensor(&mut rng, &[4, 3, 3, 3]);
    let b = rand_tensor(&mut rng, &[4]);
    let r = rand_tensor(&mut rng, &[2, 4, 6, 5]);
    assert!(!dx_as_conv_enabled() || std::env::var("NVP_DX_AS_CONV").is_ok());
    tuning::set_dx_as_conv(true);
    assert!(dx_as_conv_enabled());
    let got = run(conv2d_3x3, &x, &wt, Some(&b), &r, DType::F64);
    let want = run(conv2d_3x3_reference, &x, &wt, Some(&b), &r, DType::F64);
    assert_close("y", &got.y, &want.y, 1e-12);
    assert_close("dx", &got.gx, &want.gx, 1e-12);
    assert_close("dw", &got.gw, &want.gw, 1e-12);
    assert_close(
        "db",
        got.gb.as_ref().unwrap(),
        want.gb.as_ref().unwrap(),
        1e-12,
    );
    let x64 = x.to_dtype(DType::F64).unwrap();
    let (w64, b64) = (
        wt.to_dtype(DType::F64).unwrap(),
        b.to_dtype(DType::F64).unwrap(),
    );
    let plain = conv2d_3x3(&x64, &w64, Some(&b64)).unwrap();
    assert_eq!(rel_err(&plain, &want.y), 0.0);
    tuning::set_dx_as_conv(false);
    assert!(!dx_as_conv_enabled());
}

/// `a` and `b` (f32) equal bit for bit.
fn assert_same_bits(what: &str, a: &Tensor, b: &Tensor) {
    let (a, b): (Vec<f32>, Vec<f32>) = (
        a.flatten_all().unwrap().to_vec1().unwrap(),
        b.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    assert!(
        a.iter().zip(&b).all(|(p, q)| p.to_bits() == q.to_bits()),
        "{what}: differ"
    );
}

/// bf16 products ([`Bf16Products`], where the CPU has AVX512-BF16): the forward pass and
/// the input and weight gradients within `REL_TOL_BF16` of the f64 reference — and
/// farther from it than f32 Winograd's `REL_TOL_WINOGRAD`, so the bf16 kernels did run;
/// once the guard is dropped, the f32 path again, bit for bit. Odd channel counts (a
/// channel pair half empty), partial tiles and blocks, 16-tile tails, channel runs of
/// the weight gradient's panels that end part-way (130 = 8 · 16 + 2).
///
/// `REL_TOL_BF16` = 0.15: with both operands of the 36 products rounded to bf16 (relative
/// error up to 2⁻⁹ each), the output transform's constants (up to 8) amplify the
/// rounding to 2.2e-2 of the result's norm and 6.7e-2 of its largest value
/// (`scripts/winograd_precision.py`, post-ReLU inputs); observed here, on uniform
/// inputs, 1.2e-2 to 9.2e-2 (the largest: the output of (3, 7, 13, 9×10)).
///
/// Blocks of 16 tiles (a 1-byte budget) give the same output and input gradient to the
/// bit — each tile's products do not depend on its block — and the same weight
/// gradient up to the order of its sums over blocks.
#[test]
fn bf16_products_within_their_rounding_error() {
    const REL_TOL_BF16: f32 = 0.15;
    if !bf16_products_available() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    let _guard = lock();
    tuning::set_winograd_wgrad_always(true);
    for (i, (n, c, k, h, w)) in [
        (4, 32, 32, 16, 16),
        (3, 7, 13, 9, 10),
        (2, 3, 64, 32, 32),
        (5, 130, 20, 8, 8),
        (1, 1, 1, 4, 4),
    ]
    .into_iter()
    .enumerate()
    {
        let mut rng = StdRng::seed_from_u64(300 + i as u64);
        let x = rand_tensor(&mut rng, &[n, c, h, w]);
        let wt = rand_tensor(&mut rng, &[k, c, 3, 3]);
        let b = rand_tensor(&mut rng, &[k]);
        let r = rand_tensor(&mut rng, &[n, k, h, w]);
        let want = run(conv2d_3x3_reference, &x, &wt, Some(&b), &r, DType::F64);
        let f32_before = run(conv2d_3x3, &x, &wt, Some(&b), &r, DType::F32);
        let bf = {
            let _bf16 = Bf16Products::enable();
            run(conv2d_3x3, &x, &wt, Some(&b), &r, DType::F32)
        };
        let f32_after = run(conv2d_3x3, &x, &wt, Some(&b), &r, DType::F32);
        let tag = format!("[bf16] (n={n}, c={c}, k={k}, h={h}, w={w})");
        tuning::set_winograd_block_bytes(1);
        let short = {
            let _bf16 = Bf16Products::enable();
            run(conv2d_3x3, &x, &wt, Some(&b), &r, DType::F32)
        };
        tuning::set_winograd_block_bytes(640 * 1024);
        for (what, a, z) in [("y", &bf.y, &short.y), ("dx", &bf.gx, &short.gx)] {
            assert_same_bits(&format!("{tag} {what}: blocks of 16 tiles"), a, z);
        }
        assert_close(&format!("{tag} dw, blocks of 16"), &short.gw, &bf.gw, 1e-5);
        for (what, got, f32v, f32again, want) in [
            ("y", &bf.y, &f32_before.y, &f32_after.y, &want.y),
            ("dx", &bf.gx, &f32_before.gx, &f32_after.gx, &want.gx),
            ("dw", &bf.gw, &f32_before.gw, &f32_after.gw, &want.gw),
        ] {
            assert_close(
                &format!("{tag} {what} vs candle f64"),
                got,
                want,
                REL_TOL_BF16,
            );
            let e = rel_err(got, want);
            assert!(
                e > REL_TOL_WINOGRAD,
                "{tag} {what}: error {e:e}: the bf16 products did not run"
            );
            assert_same_bits(
                &format!("{tag} {what}: f32 after the bf16 scope and before it"),
                f32v,
                f32again,
            );
        }
    }
    tuning::set_winograd_wgrad_always(false);
}
