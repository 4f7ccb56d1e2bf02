//! Adam and the global gradient norm against hand computations: PyTorch's Adam
//! (`torch.optim.Adam`, no weight decay, `amsgrad=False`):
//!
//! ```text
//! m ← β₁·m + (1 − β₁)·g        v ← β₂·v + (1 − β₂)·g²
//! p ← p − lr · (m / (1 − β₁ᵗ)) / (sqrt(v / (1 − β₂ᵗ)) + ε)
//! ```
//!
//! with the gradient first multiplied by the clipping scale; the norm is
//! `sqrt(Σ g²)` over every optimised tensor that has a gradient.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use nvp::flow::{Adam, AdamConfig, UpdateMode};

fn var(v: &[f64]) -> Var {
    Var::from_tensor(&Tensor::new(v, &Device::Cpu).unwrap()).unwrap()
}

/// Gradients of `Σ cᵢ·pᵢ` for each (var, c): exactly c.
fn grads_of(pairs: &[(&Var, &[f64])]) -> GradStore {
    let mut loss = Tensor::new(0f64, &Device::Cpu).unwrap();
    for (v, c) in pairs {
        let c = Tensor::new(*c, &Device::Cpu).unwrap();
        loss = (loss + (v.as_tensor() * c).unwrap().sum_all().unwrap()).unwrap();
    }
    loss.backward().unwrap()
}

fn values(v: &Var) -> Vec<f64> {
    v.as_tensor().to_vec1().unwrap()
}

#[test]
fn adam_matches_the_formula_over_steps_with_clipping() {
    let cfg = AdamConfig {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
    };
    let p = var(&[1.0, -2.0]);
    let q = var(&[0.5]);
    let mut adam = Adam::new(vec![("p".into(), p.clone()), ("q".into(), q.clone())], cfg).unwrap();
    // Hand-rolled state: parameters, m, v per element.
    let mut want = [(1.0f64, 0.0f64, 0.0f64), (-2.0, 0.0, 0.0), (0.5, 0.0, 0.0)];
    let steps: [([f64; 2], [f64; 1], f64); 3] = [
        ([0.5, -1.0], [2.0], 1.0),
        ([0.25, 3.0], [-1.0], 0.5),
        ([-0.75, 0.0], [0.125], 1.0),
    ];
    for (t, (gp, gq, clip)) in steps.iter().enumerate() {
        let grads = grads_of(&[(&p, gp), (&q, gq)]);
        adam.step(&grads, *clip).unwrap();
        let t = (t + 1) as i32;
        for (s, g) in want.iter_mut().zip(gp.iter().chain(gq)) {
            let g = g * clip;
            s.1 = cfg.beta1 * s.1 + (1.0 - cfg.beta1) * g;
            s.2 = cfg.beta2 * s.2 + (1.0 - cfg.beta2) * g * g;
            let mh = s.1 / (1.0 - cfg.beta1.powi(t));
            let vh = s.2 / (1.0 - cfg.beta2.powi(t));
            s.0 -= cfg.lr * mh / (vh.sqrt() + cfg.eps);
        }
        let got: Vec<f64> = values(&p).into_iter().chain(values(&q)).collect();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w.0).abs() < 1e-14,
                "step {t}, element {i}: {g} vs {}",
                w.0
            );
        }
    }
    assert_eq!(adam.steps(), 3);
    // The first step moves each element by lr·sign(g) (m̂/sqrt(v̂) = ±1 up to ε).
    let p2 = var(&[0.0]);
    let mut a2 = Adam::new(vec![("p".into(), p2.clone())], cfg).unwrap();
    a2.step(&grads_of(&[(&p2, &[-3.0])]), 1.0).unwrap();
    assert!((values(&p2)[0] - 0.1).abs() < 1e-8);
}

#[test]
fn grad_norm_is_the_global_l2_norm() {
    let (p, q, r) = (var(&[1.0, 1.0]), var(&[1.0]), var(&[7.0]));
    let adam = Adam::new(
        vec![
            ("p".into(), p.clone()),
            ("q".into(), q.clone()),
            ("r".into(), r.clone()),
        ],
        AdamConfig::default(),
    )
    .unwrap();
    // r has no gradient: left out of the norm (and of the step).
    let grads = grads_of(&[(&p, &[3.0, 0.0]), (&q, &[-4.0])]);
    assert_eq!(adam.grad_norm(&grads).unwrap(), 5.0);
    let grads = grads_of(&[(&p, &[1.0, 2.0]), (&q, &[2.0])]);
    assert_eq!(adam.grad_norm(&grads).unwrap(), 3.0);
    // A non-finite gradient anywhere makes the norm non-finite (the training
    // loop's guard relies on it).
    let grads = grads_of(&[(&p, &[1.0, f64::NAN]), (&q, &[2.0])]);
    assert!(adam.grad_norm(&grads).unwrap().is_nan());
    let grads = grads_of(&[(&p, &[1.0, 0.0]), (&q, &[f64::INFINITY])]);
    assert!(adam.grad_norm(&grads).unwrap().is_infinite());
    // No gradient at all: zero.
    let none = grads_of(&[]);
    assert_eq!(adam.grad_norm(&none).unwrap(), 0.0);
    // f32 gradients are summed in f64.
    let f = Var::from_tensor(&Tensor::new(&[0.1f32, 0.2, 0.3], &Device::Cpu).unwrap()).unwrap();
    let a32 = Adam::new(vec![("f".into(), f.clone())], AdamConfig::default()).unwrap();
    let c = Tensor::new(&[0.1f32, 0.2, 0.3], &Device::Cpu).unwrap();
    let g = (f.as_tensor() * c)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let want = (0.1f32 as f64).powi(2) + (0.2f32 as f64).powi(2) + (0.3f32 as f64).powi(2);
    let got = a32.grad_norm(&g).unwrap();
    assert!((got - want.sqrt()).abs() < 1e-7, "{got} vs {}", want.sqrt());
    assert_eq!(f.as_tensor().dtype(), DType::F32);
}

#[test]
fn state_round_trip_resumes_exactly() {
    let cfg = AdamConfig::default();
    let g1: &[f64] = &[0.3, -0.7];
    let g2: &[f64] = &[-0.2, 0.9];
    // Two steps in one go …
    let p = var(&[1.0, 2.0]);
    let mut a = Adam::new(vec![("p".into(), p.clone())], cfg).unwrap();
    a.step(&grads_of(&[(&p, g1)]), 1.0).unwrap();
    a.step(&grads_of(&[(&p, g2)]), 1.0).unwrap();
    // … and one step, the state saved and loaded into a fresh optimiser, one more.
    let q = var(&[1.0, 2.0]);
    let mut b = Adam::new(vec![("p".into(), q.clone())], cfg).unwrap();
    b.step(&grads_of(&[(&q, g1)]), 1.0).unwrap();
    let (state, steps) = (b.state().unwrap(), b.steps());
    assert_eq!(state.len(), 2, "m.p and v.p");
    let q2 = var(&values(&q));
    let mut c = Adam::new(vec![("p".into(), q2.clone())], cfg).unwrap();
    c.load_state(&state, steps).unwrap();
    c.step(&grads_of(&[(&q2, g2)]), 1.0).unwrap();
    assert_eq!(values(&p), values(&q2));
    // A state of the wrong shape is refused, naming the tensor.
    let mut bad = state.clone();
    bad.insert(
        "m.p".into(),
        Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap(),
    );
    let err = c.load_state(&bad, 1).unwrap_err().to_string();
    assert!(err.contains("m.p"), "{err}");
}

/// The flat update against the variable-by-variable one (forced, and where a variable
/// has no gradient): the arithmetic per element is the same, so the results must be
/// equal to the bit (f32, with and without clipping), and the variable without a
/// gradient, and its moments, stay untouched.
#[test]
fn flat_update_equals_per_variable_update_bitwise() {
    let mk = |seed: u32| {
        let v: Vec<f32> = (0..37)
            .map(|i| ((i as f32 + seed as f32) * 0.731).sin())
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, (37,), &Device::Cpu).unwrap()).unwrap()
    };
    let shaped = |seed: u32| {
        let v: Vec<f32> = (0..24)
            .map(|i| (i as f32 * 1.37 + seed as f32).cos())
            .collect();
        Var::from_tensor(&Tensor::from_vec(v, (2, 3, 4), &Device::Cpu).unwrap()).unwrap()
    };
    let (p1, q1) = (mk(1), shaped(2));
    let (p2, q2, z2) = (mk(1), shaped(2), mk(9));
    let cfg = AdamConfig {
        lr: 0.01,
        ..AdamConfig::default()
    };
    let mut flat = Adam::new(
        vec![("p".into(), p1.clone()), ("q".into(), q1.clone())],
        cfg,
    )
    .unwrap();
    flat.set_update_mode(UpdateMode::Flat);
    let (p3, q3) = (mk(1), shaped(2));
    let mut per_var = Adam::new(
        vec![("p".into(), p3.clone()), ("q".into(), q3.clone())],
        cfg,
    )
    .unwrap();
    per_var.set_update_mode(UpdateMode::PerVariable);
    let mut each = Adam::new(
        vec![
            ("p".into(), p2.clone()),
            ("z".into(), z2.clone()),
            ("q".into(), q2.clone()),
        ],
        cfg,
    )
    .unwrap();
    each.set_update_mode(UpdateMode::Flat);
    let z0: Vec<f32> = z2.as_tensor().to_vec1().unwrap();
    for step in 0..5u32 {
        let loss = |p: &Var, q: &Var| {
            let a = (p.as_tensor().sqr().unwrap() * (1.0 + step as f64))
                .unwrap()
                .sum_all()
                .unwrap();
            let b = q.as_tensor().sin().unwrap().sum_all().unwrap();
            (a + b).unwrap()
        };
        let g1 = loss(&p1, &q1).backward().unwrap();
        let g2 = loss(&p2, &q2).backward().unwrap();
        let g3 = loss(&p3, &q3).backward().unwrap();
        assert!(g2.get(z2.as_tensor()).is_none());
        let clip = if step % 2 == 0 { 1.0 } else { 0.37 };
        // The flat path's norm (over the concatenated gradients, kept for the step)
        // against the per-variable one; on odd steps the norm of other gradients of
        // the same variables comes in between, so the step must not take what that
        // call kept.
        let norm = flat.grad_norm(&g1).unwrap();
        let want = per_var.grad_norm(&g3).unwrap();
        assert!(
            (norm - want).abs() <= 1e-12 * want,
            "step {step}: {norm} vs {want}"
        );
        if step % 2 == 1 {
            let decoy = (loss(&p1, &q1) * 2.0).unwrap().backward().unwrap();
            let twice = flat.grad_norm(&decoy).unwrap();
            assert!(
                (twice - 2.0 * want).abs() <= 1e-12 * want,
                "step {step}: {twice}"
            );
        }
        flat.step(&g1, clip).unwrap();
        each.step(&g2, clip).unwrap();
        per_var.step(&g3, clip).unwrap();
        let bits = |v: &Var| -> Vec<u32> {
            v.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        assert_eq!(bits(&p1), bits(&p2), "step {step}: p");
        assert_eq!(bits(&q1), bits(&q2), "step {step}: q");
        assert_eq!(bits(&p1), bits(&p3), "step {step}: p, forced per variable");
        assert_eq!(bits(&q1), bits(&q3), "step {step}: q, forced per variable");
    }
    assert_eq!(
        z2.as_tensor().to_vec1::<f32>().unwrap(),
        z0,
        "z has no gradient: unchanged"
    );
    let (s1, s2) = (flat.state().unwrap(), each.state().unwrap());
    for k in ["m.p", "v.p", "m.q", "v.q"] {
        assert_eq!(s1[k].dims(), s2[k].dims(), "{k}");
        let a: Vec<f32> = s1[k].flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = s2[k].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a, b, "{k}");
    }
    assert_eq!(s2["m.q"].dims(), &[2, 3, 4]);
    assert!(s2["m.z"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .all(|&x| x == 0.0));
}

#[test]
fn mixed_dtypes_are_refused_by_name() {
    let a = var(&[1.0]);
    let b = Var::from_tensor(&Tensor::new(&[1.0f32], &Device::Cpu).unwrap()).unwrap();
    let err = Adam::new(
        vec![("a".into(), a), ("b".into(), b)],
        AdamConfig::default(),
    )
    .err()
    .expect("mixed dtypes must be refused")
    .to_string();
    assert!(err.contains("`b`"), "{err}");
}

/// `state()` hands out one compact tensor per variable and moment — its own storage,
/// exactly its elements — not views that keep (or copies of) the whole flat moment
/// vector: with one copy of the flat vector per variable, a checkpoint of the paper's
/// CIFAR-10 model (13 M parameters, ~400 tensors) needed tens of GB. The copies are
/// independent of later steps.
#[test]
fn state_tensors_own_just_their_elements() {
    use candle_core::{CpuStorage, Storage};
    let vars: Vec<Var> = (0..4)
        .map(|k| {
            var(&(0..5 + k)
                .map(|i| i as f64 * 0.1 + k as f64)
                .collect::<Vec<_>>())
        })
        .collect();
    let named = vars
        .iter()
        .enumerate()
        .map(|(k, v)| (format!("w{k}"), v.clone()))
        .collect();
    let mut a = Adam::new(named, AdamConfig::default()).unwrap();
    let grads: Vec<Vec<f64>> = vars
        .iter()
        .map(|v| (0..v.elem_count()).map(|i| 0.3 - i as f64 * 0.1).collect())
        .collect();
    let pairs: Vec<(&Var, &[f64])> = vars.iter().zip(&grads).map(|(v, g)| (v, &g[..])).collect();
    a.step(&grads_of(&pairs), 1.0).unwrap();
    let state = a.state().unwrap();
    assert_eq!(state.len(), 8);
    let before: Vec<(String, Vec<f64>)> = {
        let mut v: Vec<_> = state
            .iter()
            .map(|(k, t)| (k.clone(), t.to_vec1::<f64>().unwrap()))
            .collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    for (name, t) in &state {
        let (storage, layout) = t.storage_and_layout();
        let len = match &*storage {
            Storage::Cpu(CpuStorage::F64(v)) => v.len(),
            _ => panic!("{name}: not an f64 CPU tensor"),
        };
        assert_eq!(
            (len, layout.start_offset()),
            (t.elem_count(), 0),
            "{name}: its storage holds {len} values from offset {}, for {} elements",
            layout.start_offset(),
            t.elem_count()
        );
    }
    a.step(&grads_of(&pairs), 1.0).unwrap();
    for (name, vals) in &before {
        assert_eq!(
            &state[name].to_vec1::<f64>().unwrap(),
            vals,
            "{name} changed"
        );
    }
}

/// The in-place update (`UpdateMode::Fused`, the CPU default) against the candle ops
/// variable by variable, to the bit: f32 and f64, a variable large enough to be split
/// over threads (not a multiple of the split), small ones, one without a gradient,
/// with and without clipping. The gradient norm of the large f32 gradient against an
/// f64 sum of squares.
#[test]
fn fused_update_equals_the_candle_ops_bitwise() {
    fn run(dtype: DType) {
        let sizes = [100_003usize, 5, 1, 70_000];
        let mk = |seed: usize| -> Vec<Var> {
            sizes
                .iter()
                .enumerate()
                .map(|(k, &n)| {
                    let v: Vec<f64> = (0..n)
                        .map(|i| ((i * 7 + k * 13 + seed) as f64 * 0.37).sin())
                        .collect();
                    let t = Tensor::new(v, &Device::Cpu)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap();
                    Var::from_tensor(&t).unwrap()
                })
                .collect()
        };
        let (a, b) = (mk(0), mk(0));
        let named = |vs: &[Var]| -> Vec<(String, Var)> {
            vs.iter()
                .enumerate()
                .map(|(k, v)| (format!("w{k}"), v.clone()))
                .collect()
        };
        let cfg = AdamConfig {
            lr: 0.003,
            ..AdamConfig::default()
        };
        let mut fused = Adam::new(named(&a), cfg).unwrap();
        fused.set_update_mode(UpdateMode::Fused);
        let mut reference = Adam::new(named(&b), cfg).unwrap();
        reference.set_update_mode(UpdateMode::PerVariable);
        let bits = |v: &Var| -> Vec<u64> {
            v.as_tensor()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect()
        };
        let untouched = bits(&a[2]);
        for step in 0..4usize {
            // Gradients of Σ w·sin(w + step) (the last variable's term left out at
            // step 1: it has no gradient then), for both sets alike.
            let grads = |vs: &[Var]| {
                let mut loss = Tensor::zeros((), dtype, &Device::Cpu).unwrap();
                for (k, v) in vs.iter().enumerate() {
                    if k == 2 || (step == 1 && k == 3) {
                        continue;
                    }
                    let t = v.as_tensor();
                    let term = (t * (t + step as f64).unwrap().sin().unwrap()).unwrap();
                    loss = (loss + term.sum_all().unwrap()).unwrap();
                }
                loss.backward().unwrap()
            };
            let (ga, gb) = (grads(&a), grads(&b));
            let clip = if step % 2 == 0 { 1.0 } else { 0.61 };
            fused.step(&ga, clip).unwrap();
            reference.step(&gb, clip).unwrap();
            for (k, (x, y)) in a.iter().zip(&b).enumerate() {
                assert!(bits(x) == bits(y), "{dtype:?} step {step}: w{k} differs");
            }
            let (sa, sb) = (fused.state().unwrap(), reference.state().unwrap());
            for (key, t) in &sa {
                let x: Vec<f64> = t
                    .flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let y: Vec<f64> = sb[key]
                    .flatten_all()
                    .unwrap()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                assert!(x == y, "{dtype:?} step {step}: {key} differs");
            }
            if dtype == DType::F32 {
                let g0 = ga.get(a[0].as_tensor()).unwrap();
                let want: f64 = g0
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|x| x * x)
                    .sum();
                let only = Adam::new(vec![("w0".into(), a[0].clone())], cfg).unwrap();
                let got = only.grad_norm(&ga).unwrap();
                assert!(
                    (got - want.sqrt()).abs() <= 1e-12 * want.sqrt(),
                    "{got} vs {}",
                    want.sqrt()
                );
            }
        }
        assert_eq!(bits(&a[2]), untouched, "w2 has no gradient: unchanged");
    }
    run(DType::F32);
    run(DType::F64);
}

/// A store holding `w` (trainable) and `bn.running_mean` (a buffer) of `len` elements.
fn ema_store(len: usize, dtype: DType) -> nvp::flow::ParamStore {
    let store = nvp::flow::ParamStore::new(7);
    let vb = store.var_builder(dtype, &Device::Cpu);
    vb.get(len, "w").unwrap();
    vb.get(len, "bn.running_mean").unwrap();
    store
}

fn named(store: &nvp::flow::ParamStore, name: &str) -> Var {
    store
        .named_vars()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1
}

/// Polyak averaging against the formula: update t uses d = min(decay, (1 + t)/(10 + t)),
/// avg ← d·avg + (1 − d)·p; buffers are copied, not averaged.
#[test]
fn ema_matches_the_formula_and_copies_buffers() {
    use nvp::flow::ema::decay_at;
    let live = ema_store(2, DType::F64);
    let avg = ema_store(2, DType::F64);
    let (w, rm) = (named(&live, "w"), named(&live, "bn.running_mean"));
    w.set(&Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap())
        .unwrap();
    let mut ema = nvp::flow::Ema::new(&live, &avg, 0.5).unwrap();
    assert_eq!(values(&named(&avg, "w")), [1.0, -2.0], "starts as a copy");
    // d₁ = min(0.5, 2/11) = 2/11; d₂ = min(0.5, 3/12) = 1/4; d₃ = min(0.5, 4/13) = 4/13;
    // d₁₀₀ = 0.5.
    assert_eq!(decay_at(0.5, 1), 2.0 / 11.0);
    assert_eq!(decay_at(0.5, 100), 0.5);
    let mut want = [1.0f64, -2.0];
    for (t, p) in [[3.0f64, 0.0], [-1.0, 4.0], [0.5, 0.25]].iter().enumerate() {
        w.set(&Tensor::new(p, &Device::Cpu).unwrap()).unwrap();
        rm.set(&Tensor::new(&[t as f64, 10.0], &Device::Cpu).unwrap())
            .unwrap();
        ema.update().unwrap();
        let d = [2.0 / 11.0, 0.25, 4.0 / 13.0][t];
        for (a, p) in want.iter_mut().zip(p) {
            *a = d * *a + (1.0 - d) * p;
        }
        let got = values(&named(&avg, "w"));
        for (g, e) in got.iter().zip(&want) {
            assert!(
                (g - e).abs() < 1e-15,
                "update {}: {got:?} vs {want:?}",
                t + 1
            );
        }
        assert_eq!(values(&named(&avg, "bn.running_mean")), [t as f64, 10.0]);
    }
    assert_eq!(ema.updates(), 3);
    // A store of another model is refused by name.
    let other = nvp::flow::ParamStore::new(7);
    other
        .var_builder(DType::F64, &Device::Cpu)
        .get(2, "v")
        .unwrap();
    let err = nvp::flow::Ema::new(&live, &other, 0.9)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("`w`") || err.contains("`v`"), "{err}");
}

/// The in-place average (`nvp_kernels::ema_update`, over the rayon pool for large
/// tensors) gives the candle ops' result to the bit, in f32 and f64.
#[test]
fn fused_ema_equals_the_candle_ops_bitwise() {
    for dtype in [DType::F32, DType::F64] {
        let n = 100_003; // more than two 32,768-element runs, not a multiple of one
        let a = Tensor::randn(0f32, 1.0, n, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let x = Tensor::randn(0f32, 1.0, n, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let d = 0.9990000000001;
        let want = ((&a * d).unwrap() + (&x * (1.0 - d)).unwrap()).unwrap();
        let got = a.copy().unwrap();
        nvp_kernels::ema_update(&got, &x, d).unwrap();
        let (w, g): (Vec<f64>, Vec<f64>) = (
            want.to_dtype(DType::F64).unwrap().to_vec1().unwrap(),
            got.to_dtype(DType::F64).unwrap().to_vec1().unwrap(),
        );
        assert!(
            w.iter().zip(&g).all(|(w, g)| w.to_bits() == g.to_bits()),
            "{dtype:?}"
        );
        assert!(nvp_kernels::ema_update(&got, &got, d).is_err(), "aliasing");
    }
}
