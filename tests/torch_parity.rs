//! nvp against the PyTorch peer (`../shared/reference/realnvp_torch.py`) with the same
//! weights: latents, log-determinants, inverse, bits/dim of 8-bit images, the train-mode
//! pass with its running statistics, and the gradient of the training loss for every
//! parameter.
//!
//! Expected values: `tests/fixtures/torch_parity.safetensors`, written by
//! `python scripts/torch_interop.py fixture tests/fixtures/torch_parity.safetensors`
//! (torch 2.15, float64): a peer model of 2 scales (8×8×3 → 4×4×6), 1 residual block,
//! 4 features, 2 + 2 couplings then 3, every parameter and running statistic
//! randomised; its weights are stored under nvp's names (the converter's mapping).
//! In f64 nvp runs candle's own ops and must agree to rounding (measured ≤ 1.1e-15 relative; checked at 1e-12); in f32 it runs
//! the fast CPU kernels (Winograd convolutions, the fused training network), whose
//! error against the exact values is ≤ 3.5e-6 relative here (checked at 3e-5;
//! gradients 4e-7, checked at 1e-5).

mod common;

use std::collections::HashMap;
use std::f64::consts::LN_2;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::to_vec_f64;
use nvp::data::preprocess::{bits_per_dim, Dequantize};
use nvp::flow::{Mode, ParamStore, RealNvp, RealNvpConfig};

struct Fixture {
    t: HashMap<String, Tensor>,
    cfg: RealNvpConfig,
    alpha: f64,
    l2: f64,
}

fn fixture() -> Fixture {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/torch_parity.safetensors");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().expect("fixture metadata");
    let cfg: RealNvpConfig = toml::from_str(&meta["model"]).expect("fixture model config");
    let t = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    Fixture {
        t,
        cfg,
        alpha: meta["alpha"].parse().unwrap(),
        l2: meta["l2"].parse().unwrap(),
    }
}

impl Fixture {
    fn get(&self, name: &str) -> &Tensor {
        self.t
            .get(name)
            .unwrap_or_else(|| panic!("fixture has no `{name}`"))
    }

    fn f64s(&self, name: &str) -> Vec<f64> {
        to_vec_f64(self.get(name))
    }

    /// A tensor of the fixture in `dtype`.
    fn input(&self, name: &str, dtype: DType) -> Tensor {
        self.get(name).to_dtype(dtype).unwrap()
    }

    /// The peer's weights and running statistics, under nvp's names.
    fn params(&self) -> HashMap<String, Tensor> {
        self.t
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("param.").map(|n| (n.to_string(), v.clone())))
            .collect()
    }

    /// A trainable model in `dtype` with the peer's parameters, and its store.
    fn model(&self, dtype: DType) -> (ParamStore, RealNvp) {
        let store = ParamStore::new(0);
        let model = RealNvp::new(&self.cfg, store.var_builder(dtype, &Device::Cpu)).unwrap();
        store.load_tensors(&self.params()).unwrap();
        (store, model)
    }

    /// The fixture's 8-bit images `pix_key` with noise `u_key`, dequantised and mapped
    /// by nvp's logit: `y` as an `(N, C, H, W)` tensor in `dtype` and `ld_pre` per image.
    fn dequantised(&self, pix_key: &str, u_key: &str, dtype: DType) -> (Tensor, Vec<f64>) {
        let pix: Vec<u8> = self.get(pix_key).flatten_all().unwrap().to_vec1().unwrap();
        let u = self.f64s(u_key);
        let d = self.cfg.dims();
        let n = pix.len() / d;
        let deq = Dequantize::new(self.alpha).unwrap();
        let mut y = Vec::with_capacity(pix.len());
        let mut ld_pre = Vec::with_capacity(n);
        for i in 0..n {
            let (yi, ld) = deq
                .apply_with_noise_f64(&pix[i * d..][..d], &u[i * d..][..d])
                .unwrap();
            y.extend(yi);
            ld_pre.push(ld);
        }
        let shape = (n, self.cfg.channels, self.cfg.height, self.cfg.width);
        let y = Tensor::from_vec(y, shape, &Device::Cpu).unwrap();
        (y.to_dtype(dtype).unwrap(), ld_pre)
    }

    /// Checks `m.encode(x, mode)`'s flattened latents and log-det against the fixture's
    /// `z_key` and `ld_key`.
    #[track_caller]
    fn check_encode(&self, what: &str, m: &RealNvp, x: &Tensor, mode: Mode, keys: [&str; 2]) {
        let (zs, ld) = m.encode(x, mode).unwrap();
        let z = m.flatten_latents(&zs).unwrap();
        let t = tol(x.dtype(), 3e-5);
        assert_close(
            &format!("{what} z"),
            &to_vec_f64(&z),
            &self.f64s(keys[0]),
            t,
        );
        assert_close(
            &format!("{what} log-det"),
            &to_vec_f64(&ld),
            &self.f64s(keys[1]),
            t,
        );
    }

    /// The graph-free twin `nvp eval` and `nvp sample` run (fused eval kernels in f32).
    fn frozen(&self, store: &ParamStore, dtype: DType) -> RealNvp {
        RealNvp::new(&self.cfg, store.frozen_var_builder(dtype, &Device::Cpu)).unwrap()
    }
}

/// max |a − b| / max(max |b|, 1).
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

#[track_caller]
fn assert_close(what: &str, ours: &[f64], theirs: &[f64], tol: f64) {
    let e = rel_err(ours, theirs);
    assert!(e <= tol, "{what}: relative error {e:e} > {tol:e}");
}

/// Tolerance: f64 runs the same operations up to rounding; f32 the fast kernels.
fn tol(dtype: DType, f32_tol: f64) -> f64 {
    if dtype == DType::F64 {
        1e-12
    } else {
        f32_tol
    }
}

#[test]
fn fixture_holds_every_parameter_of_the_model() {
    let fx = fixture();
    let store = ParamStore::new(0);
    let _m = RealNvp::new(&fx.cfg, store.var_builder(DType::F64, &Device::Cpu)).unwrap();
    // `load_tensors` refuses a missing, extra or misshapen tensor.
    store.load_tensors(&fx.params()).unwrap();
    assert_eq!(store.num_trainable(), 12456, "the peer's parameter count");
    let grads = fx.t.keys().filter(|k| k.starts_with("grad.")).count();
    assert_eq!(grads, store.trainable_vars().len());
}

#[test]
fn eval_mode_latents_and_log_det_match_pytorch() {
    let fx = fixture();
    for dtype in [DType::F64, DType::F32] {
        let (store, model) = fx.model(dtype);
        let frozen = fx.frozen(&store, dtype);
        for (which, m) in [("trainable", &model), ("frozen", &frozen)] {
            let x = fx.input("x_eval", dtype);
            let what = format!("{dtype:?} {which}");
            fx.check_encode(&what, m, &x, Mode::Eval, ["z_eval", "ld_eval"]);
        }
    }
}

#[test]
fn inverse_matches_pytorch() {
    let fx = fixture();
    for dtype in [DType::F64, DType::F32] {
        let (store, _model) = fx.model(dtype);
        let frozen = fx.frozen(&store, dtype);
        let z = fx.input("z_inv", dtype);
        let x = frozen.decode(&frozen.split_latents(&z).unwrap()).unwrap();
        assert_close(
            &format!("{dtype:?} inverse"),
            &to_vec_f64(&x),
            &fx.f64s("x_inv"),
            tol(dtype, 3e-5),
        );
    }
}

#[test]
fn bits_per_dim_of_8bit_images_match_pytorch() {
    let fx = fixture();
    let d = fx.cfg.dims();
    let theirs = fx.f64s("bpd_eval");
    for dtype in [DType::F64, DType::F32] {
        let (store, _model) = fx.model(dtype);
        let frozen = fx.frozen(&store, dtype);
        let (yt, ld_pre) = fx.dequantised("pix_eval", "u_eval", dtype);
        let n = ld_pre.len();
        let lp = to_vec_f64(&frozen.log_prob(&yt, Mode::Eval).unwrap());
        let ours: Vec<f64> = (0..n).map(|i| bits_per_dim(lp[i], ld_pre[i], d)).collect();
        // bits/dim: an absolute error; the f32 figure is log p in f32 divided by D ln 2.
        let worst = ours
            .iter()
            .zip(&theirs)
            .fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        let bound = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
        assert!(
            worst <= bound,
            "{dtype:?} bits/dim differ by {worst:e} (ours {ours:?}, PyTorch {theirs:?})"
        );
    }
}

/// The train-mode pass of the fixture's 8 images: latents, log-det, the running
/// statistics after it, and the gradient of the peer's loss
/// (mean bits/dim + l2 · Σ scale parameters²) for every parameter.
#[test]
fn train_mode_pass_and_loss_gradients_match_pytorch() {
    let fx = fixture();
    let d = fx.cfg.dims();
    for dtype in [DType::F64, DType::F32] {
        let (store, model) = fx.model(dtype);
        let (yt, ld_pre) = fx.dequantised("pix_train", "u_train", dtype);
        let (n, ld_pre) = (ld_pre.len(), ld_pre.iter().sum::<f64>());
        let what = format!("{dtype:?} train");
        fx.check_encode(&what, &model, &yt, Mode::Train, ["z_train", "ld_train"]);
        for (name, v) in store.named_vars() {
            if name.contains("running_") {
                let theirs = fx.f64s(&format!("after.{name}"));
                assert_close(
                    &format!("{what} {name} after the pass"),
                    &to_vec_f64(v.as_tensor()),
                    &theirs,
                    tol(dtype, 2e-6),
                );
            }
        }

        // The loss as `nvp train` forms it (engine.rs): −mean log p / (D ln 2) + l2 Σ s²;
        // the preprocessing term of bits/dim is a constant added to the value only.
        let (store, model) = fx.model(dtype);
        let lp = model.log_prob(&yt, Mode::Train).unwrap();
        let mut loss = (lp.mean_all().unwrap() * (-1.0 / (d as f64 * LN_2))).unwrap();
        for p in model.scale_parameters() {
            loss = (loss + (p.sqr().unwrap().sum_all().unwrap() * fx.l2).unwrap()).unwrap();
        }
        let value = loss
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            - (ld_pre / n as f64) / (d as f64 * LN_2);
        let theirs = fx.f64s("loss_train")[0];
        let err = (value - theirs).abs() / theirs.abs();
        assert!(
            err <= tol(dtype, 1e-6),
            "{what} loss {value} vs PyTorch {theirs}: {err:e}"
        );
        let grads = loss.backward().unwrap();
        for (name, v) in store.trainable_vars() {
            let g = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let theirs = fx.f64s(&format!("grad.{name}"));
            // Relative to the tensor's largest gradient. Measured: 5e-16 in f64, 4e-7 in
            // f32 (the fused training network with the Winograd kernels).
            assert_close(
                &format!("{what} gradient of {name}"),
                &to_vec_f64(g),
                &theirs,
                tol(dtype, 1e-5),
            );
        }
    }
}
