//! bf16 products in the convolutions (`nvp::flow::Bf16Products`, what `nvp train
//! --precision bf16` holds around each step) at the level of the model, on CPUs with
//! AVX512-BF16 (skipped, and said so, elsewhere):
//!
//! - on a model trained a little (f32, procedural images, as a run starts), a
//!   train-mode pass — log-likelihoods and every parameter's gradient — stays close to
//!   f32's: bits/dim within `BPD_TOL`, the gradient's direction within `GRAD_COS` — and
//!   differs from it, so the bf16 kernels ran; once the guard is dropped, the same pass
//!   is f32 again, bit for bit;
//! - a coupling with bf16 products in its s/t network is still exactly invertible: its
//!   inverse recomputes the network on the same (unchanged) half of the input, so it
//!   undoes the forward as closely as in f32. (A deep flow's round trip is not: there
//!   each inverse sees its input with f32 rounding errors, and bf16 rounding turns
//!   those into jumps of its own size. Sampling and evaluation therefore stay f32.)
//!
//! The per-convolution checks (values and gradients against f64, exact products of
//! the rounded operands) are in `crates/nvp-kernels`.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use nvp::data::procedural::{Procedural, ProceduralConfig};
use nvp::data::Dequantize;
use nvp::flow::conditioner::ResNetConfig;
use nvp::flow::{
    bf16_products_available, Adam, AdamConfig, AffineCoupling, Bf16Products, Flow, Mask, Mode,
    ParamStore,
};

/// |bits/dim (bf16) − bits/dim (f32)|, mean over the batch, at most this. Observed
/// 2.2e-4 here; 3.8e-3 on a `cifar10-small` checkpoint after 10 minutes of training
/// (`BENCHMARKS.md`).
const BPD_TOL: f64 = 0.01;
/// Cosine between the bf16 and f32 gradients (all parameters as one vector), at
/// least this. Observed 0.999992 here; 0.99995 on the `cifar10-small` checkpoint.
const GRAD_COS: f64 = 0.999;

fn flat(grads: &HashMap<String, Tensor>) -> Vec<f64> {
    let mut names: Vec<_> = grads.keys().collect();
    names.sort();
    names.iter().flat_map(|n| to_vec_f64(&grads[*n])).collect()
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `n` procedural 16×16 images from `seed`, dequantised and in logit space.
fn images(n: usize, seed: u64) -> Tensor {
    let set = Procedural::new(ProceduralConfig {
        size: 16,
        classes: 4,
    })
    .generate(n, seed);
    let deq = Dequantize::new(0.05).unwrap();
    let d = set.dims();
    let mut y = vec![0f32; n * d];
    let mut r = rng(seed + 1);
    for (i, out) in y.chunks_exact_mut(d).enumerate() {
        deq.apply(set.image(i), &mut r, out).unwrap();
    }
    Tensor::from_vec(y, (n, 3, 16, 16), &Device::Cpu).unwrap()
}

#[test]
fn bf16_training_pass_is_close_to_f32_and_scoped() {
    if !bf16_products_available() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    let cfg = model_16x16();
    let store = ParamStore::new(3);
    // Packed, as `nvp train` builds it: each s/t network one fused op.
    let model = build_model(&cfg, &store, DType::F32, &Device::Cpu, true);
    // A few f32 steps from the initialisation (whose s/t outputs are zero, where bf16
    // changes nothing), as a run starts.
    let mut adam = Adam::for_store(
        &store,
        AdamConfig {
            lr: 1e-3,
            ..AdamConfig::default()
        },
    )
    .unwrap();
    for step in 0..30 {
        let x = images(16, 100 + step);
        let loss = model
            .log_prob(&x, Mode::Train)
            .unwrap()
            .mean_all()
            .unwrap()
            .neg()
            .unwrap();
        adam.step(&loss.backward().unwrap(), 1.0).unwrap();
    }
    let x = images(16, 7);
    let dims = (3 * 16 * 16) as f64;
    let pass = || {
        let lp = model.log_prob(&x, Mode::Train).unwrap();
        let g = lp.mean_all().unwrap().backward().unwrap();
        (to_vec_f64(&lp), flat(&store.grads_by_name(&g).unwrap()))
    };
    let (lp32, g32) = pass();
    let (lpbf, gbf) = {
        let _bf16 = Bf16Products::enable();
        pass()
    };
    let (lp_again, g_again) = pass();
    assert!(bits(&lp32) == bits(&lp_again) && bits(&g32) == bits(&g_again));

    let bpd = |lp: &[f64]| -lp.iter().sum::<f64>() / (lp.len() as f64 * dims * 2f64.ln());
    let d_bpd = (bpd(&lpbf) - bpd(&lp32)).abs();
    let dot: f64 = g32.iter().zip(&gbf).map(|(a, b)| a * b).sum();
    let norm = |v: &[f64]| v.iter().map(|a| a * a).sum::<f64>().sqrt();
    let cos = dot / (norm(&g32) * norm(&gbf));
    if std::env::var("NVP_TEST_VERBOSE").is_ok() {
        println!("bits/dim difference {d_bpd:e}, gradient cosine {cos}");
    }
    assert!(lpbf.iter().all(|v| v.is_finite()));
    assert!(bits(&lpbf) != bits(&lp32), "the bf16 products did not run");
    assert!(d_bpd <= BPD_TOL, "bits/dim differ by {d_bpd}");
    assert!(cos >= GRAD_COS, "gradient cosine {cos}");
}

#[test]
fn a_coupling_with_bf16_products_inverts_exactly() {
    if !bf16_products_available() {
        eprintln!("skipped: this CPU has no AVX512-BF16");
        return;
    }
    for (mask, c, hw) in [(Mask::checkerboard(0), 3, 16), (Mask::channel(1), 12, 8)] {
        let store = ParamStore::new(11);
        let net = ResNetConfig {
            channels: c,
            features: 32,
            blocks: 2,
            ..Default::default()
        };
        let vb = store.var_builder(DType::F32, &Device::Cpu);
        let layer = AffineCoupling::resnet(mask, net, vb.pp("c")).unwrap();
        randomise(&store, 12);
        let x = randn(&[4, c, hw, hw], 1.0, DType::F32, &mut rng(13));
        let round_trip = || {
            let (y, ld) = layer.forward(&x, Mode::Eval).unwrap();
            let back = layer.inverse(&y).unwrap();
            (max_abs_diff(&back, &x), y, ld)
        };
        let (err32, y32, ld32) = round_trip();
        let (errbf, ybf, ldbf) = {
            let _bf16 = Bf16Products::enable();
            round_trip()
        };
        if std::env::var("NVP_TEST_VERBOSE").is_ok() {
            println!("round trip: f32 {err32:e}, bf16 {errbf:e}");
        }
        assert!(
            max_abs_diff(&y32, &ybf) > 1e-4,
            "the bf16 products did not run"
        );
        assert!(max_abs_diff(&ld32, &ldbf) > 0.0);
        assert!(err32 < 1e-5, "f32 round trip {err32}");
        assert!(errbf < 1e-5, "bf16 round trip {errbf}");
    }
}
