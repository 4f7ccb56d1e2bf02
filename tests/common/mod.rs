//! Helpers shared by the tests: seeded tensors, randomised parameters, a
//! brute-force Jacobian log-determinant built row by row with autograd, and
//! temporary folders for fixtures.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use nvp::flow::{Mode, ParamStore, RealNvp, RealNvpConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A tensor of standard normal values (times `scale`), f64 then cast.
pub fn randn(shape: &[usize], scale: f64, dtype: DType, rng: &mut StdRng) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            z * scale
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Give every parameter and running statistic a non-trivial random value
/// (the identity initialisation would make the log-det checks trivial), by name
/// (a packed group's members each by their own).
pub fn randomise(store: &ParamStore, seed: u64) {
    let mut r = rng(seed);
    let mut tensors: Vec<(String, Tensor)> = store.tensors().into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut values = HashMap::new();
    for (name, var) in tensors {
        let n = var.elem_count();
        let vals: Vec<f64> = (0..n)
            .map(|_| {
                let u: f64 = r.random_range(0.0..1.0);
                let z: f64 = StandardNormal.sample(&mut r);
                if name.ends_with("running_var") {
                    0.5 + 1.5 * u
                } else if name.ends_with("running_mean") || name.ends_with("bias") {
                    0.2 * z
                } else if name.ends_with(".g") {
                    0.3 + 0.5 * u
                } else if name.ends_with("scale") || name.ends_with("weight") {
                    0.6 + 0.8 * u
                } else {
                    // conv directions `v`, linear weights
                    0.3 * z
                }
            })
            .collect();
        let t = Tensor::from_vec(vals, var.shape(), &Device::Cpu)
            .unwrap()
            .to_dtype(var.dtype())
            .unwrap();
        values.insert(name, t);
    }
    store.load_tensors(&values).unwrap();
}

/// log |det J| of `f` at `x` (any shape), J built row by row by autograd in
/// the dtype of `x` (use f64), determinant by LU with partial pivoting.
pub fn brute_logdet(f: impl Fn(&Tensor) -> Result<Tensor>, x: &Tensor) -> f64 {
    let var = Var::from_tensor(x).unwrap();
    let y = f(var.as_tensor()).unwrap().flatten_all().unwrap();
    let d = x.elem_count();
    assert_eq!(y.elem_count(), d, "the map must be square");
    let mut jac = vec![0f64; d * d];
    for i in 0..d {
        let grads = y.get(i).unwrap().backward().unwrap();
        let row = grads
            .get(var.as_tensor())
            .map(|g| {
                g.flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            })
            .unwrap_or_else(|| vec![0.0; d]);
        jac[i * d..(i + 1) * d].copy_from_slice(&row);
    }
    log_abs_det(&mut jac, d)
}

/// log |det A| of a row-major d×d matrix (destroyed), LU with partial pivoting.
pub fn log_abs_det(a: &mut [f64], d: usize) -> f64 {
    let mut acc = 0.0;
    for k in 0..d {
        let p = (k..d)
            .max_by(|&i, &j| a[i * d + k].abs().total_cmp(&a[j * d + k].abs()))
            .unwrap();
        if p != k {
            for j in 0..d {
                a.swap(k * d + j, p * d + j);
            }
        }
        let piv = a[k * d + k];
        assert!(piv != 0.0, "singular Jacobian");
        acc += piv.abs().ln();
        for i in k + 1..d {
            let m = a[i * d + k] / piv;
            if m != 0.0 {
                for j in k..d {
                    a[i * d + j] -= m * a[k * d + j];
                }
            }
        }
    }
    acc
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

pub fn to_vec_f64(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// A fresh folder under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let p = std::env::temp_dir().join(format!(
            "nvp-data-{tag}-{}-{}-{nanos}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    /// `rel` inside the folder, its parent folders created.
    pub fn file(&self, rel: &str) -> PathBuf {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Per-channel batch mean and *biased* variance of an `(N, C, ...)` array given as
/// flat values (`hw` values per channel and sample), in plain f64 loops: the hand
/// reference for the batch-norm tests.
pub fn channel_stats(xv: &[f64], n: usize, c: usize, hw: usize) -> (Vec<f64>, Vec<f64>) {
    let m = (n * hw) as f64;
    let at = |i: usize, ch: usize, k: usize| xv[(i * c + ch) * hw + k];
    let mut mean = vec![0.0; c];
    let mut var = vec![0.0; c];
    for ch in 0..c {
        let mut s = 0.0;
        for i in 0..n {
            for k in 0..hw {
                s += at(i, ch, k);
            }
        }
        mean[ch] = s / m;
        let mut q = 0.0;
        for i in 0..n {
            for k in 0..hw {
                q += (at(i, ch, k) - mean[ch]).powi(2);
            }
        }
        var[ch] = q / m;
    }
    (mean, var)
}

/// `max_i |a_i − b_i| ≤ tol · max(1, max_i |b_i|)`, naming `what` when it fails.
pub fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    assert!(
        a.iter().chain(b).all(|v| v.is_finite()),
        "{what}: not finite: {a:?} vs {b:?}"
    );
    let scale = b.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let (i, d) = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .enumerate()
        .fold(
            (0, 0.0f64),
            |(bi, bd), (i, d)| if d > bd { (i, d) } else { (bi, bd) },
        );
    assert!(
        d <= tol * scale,
        "{what}: max |diff| {d:e} at {i} ({} vs {}), allowed {:e}",
        a[i],
        b[i],
        tol * scale
    );
}

/// A small whole model for train-mode comparisons: 3×8×8 images, two scales
/// (checkerboard and channel couplings), two residual blocks of 8 features.
pub fn small_model_config() -> RealNvpConfig {
    RealNvpConfig {
        channels: 3,
        height: 8,
        width: 8,
        scales: 2,
        res_blocks: 2,
        features: 8,
        ..RealNvpConfig::cifar10()
    }
}

/// A 16×16 whole model with 16-feature s/t networks: enough tiles and channels for the
/// convolution kernels' blocked paths, small enough for a test.
pub fn model_16x16() -> RealNvpConfig {
    RealNvpConfig {
        channels: 3,
        height: 16,
        width: 16,
        scales: 2,
        res_blocks: 2,
        features: 16,
        ..RealNvpConfig::cifar10()
    }
}

/// A train-mode pass: its output, the gradients by name and every variable after it.
pub type TrainRun = (Tensor, HashMap<String, Tensor>, HashMap<String, Tensor>);

/// One train-mode pass of an s/t network `cfg` in `dtype` on the CPU, parameters
/// randomised from `seed`, on a random input of `dims`: the output, the gradients of
/// a random linear function of it (by parameter name, plus `x` for the input), and
/// every variable after the pass (so the running statistics).
pub fn resnet_train_pass(
    dims: &[usize],
    cfg: nvp::flow::conditioner::ResNetConfig,
    dtype: DType,
    seed: u64,
) -> TrainRun {
    use nvp::flow::conditioner::{Conditioner, ResNet};
    let store = ParamStore::new(seed);
    let net = ResNet::new(cfg, store.var_builder(dtype, &Device::Cpu).pp("net")).unwrap();
    randomise(&store, seed + 1);
    let x = Var::from_tensor(&randn(dims, 1.0, dtype, &mut rng(seed + 2))).unwrap();
    let mut out_dims = dims.to_vec();
    out_dims[1] = 2 * cfg.channels;
    let r = randn(&out_dims, 1.0, dtype, &mut rng(seed + 3));
    let y = net.forward_t(x.as_tensor(), Mode::Train).unwrap();
    let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let mut grads = HashMap::new();
    grads.insert("x".to_string(), g.get(x.as_tensor()).unwrap().clone());
    for (name, v) in store.trainable_vars() {
        let gv = g
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        grads.insert(name, gv.clone());
    }
    (y, grads, store.tensors())
}

/// One train-mode pass of `cfg` in `dtype` on the CPU, parameters randomised from
/// `seed`, over 4 random images: the log-likelihoods, the gradient of their sum for
/// every parameter (by name), and every variable after the pass (so the running
/// statistics).
pub fn train_pass(cfg: &RealNvpConfig, dtype: DType, seed: u64) -> TrainRun {
    train_pass_packed(cfg, dtype, seed, false)
}

/// `cfg` built over `store` in `dtype` on `device`, each s/t network's parameters
/// packed into flat variables (`RealNvp::new_packed`) where `packed`.
pub fn build_model(
    cfg: &RealNvpConfig,
    store: &ParamStore,
    dtype: DType,
    device: &Device,
    packed: bool,
) -> RealNvp {
    if packed {
        RealNvp::new_packed(cfg, store, dtype, device).unwrap()
    } else {
        RealNvp::new(cfg, store.var_builder(dtype, device)).unwrap()
    }
}

/// [`train_pass`], with each s/t network's parameters packed into one variable
/// (`RealNvp::new_packed`) where `packed`; the gradients by member name either way.
pub fn train_pass_packed(cfg: &RealNvpConfig, dtype: DType, seed: u64, packed: bool) -> TrainRun {
    let store = ParamStore::new(seed);
    let model = build_model(cfg, &store, dtype, &Device::Cpu, packed);
    randomise(&store, seed + 1);
    let dims = [4, cfg.channels, cfg.height, cfg.width];
    let x = randn(&dims, 1.0, dtype, &mut rng(seed + 2));
    let lp = model.log_prob(&x, Mode::Train).unwrap();
    let g = lp.sum_all().unwrap().backward().unwrap();
    let grads = store.grads_by_name(&g).unwrap();
    let names = store.tensors();
    for n in names.keys().filter(|n| !nvp::flow::params::is_buffer(n)) {
        assert!(grads.contains_key(n), "no gradient for {n}");
    }
    (lp, grads, names)
}
