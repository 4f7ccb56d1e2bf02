//! Packed parameters (`ParamStore::pack`, `RealNvp::new_packed`): each s/t network's
//! trainable parameters in one flat variable, the layers reading views of it. The
//! packing must change nothing a user sees: the same initial values under the same
//! names, the same log-likelihoods and gradients to the bit on every path (the fused
//! f32 CPU op taking the flat variable itself; the layer-by-layer f64 network through
//! the views; the one-node ops of `NVP_RESNET_OPS`), the same Adam steps and optimizer
//! state, checkpoints that move between packed and unpacked stores, and the L2
//! penalty's gradient on gains that are slices of a group.

mod common;

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};
use common::*;
use nvp::flow::params::is_buffer;
use nvp::flow::{
    Adam, AdamConfig, Ema, L2Gradient, Mode, ParamStore, RealNvp, RealNvpConfig, UpdateMode,
};
use nvp_kernels::tuning;

/// Serialises the tests that flip the process-wide switches.
static SWITCH: Mutex<()> = Mutex::new(());

fn lock() -> MutexGuard<'static, ()> {
    SWITCH.lock().unwrap_or_else(|e| e.into_inner())
}

fn bits(t: &Tensor) -> Vec<u64> {
    to_vec_f64(t).iter().map(|v| v.to_bits()).collect()
}

/// Every tensor of `a` and `b` by name: the same names, the same bits.
fn assert_same(what: &str, a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) {
    let mut names: Vec<_> = a.keys().collect();
    names.sort();
    let mut other: Vec<_> = b.keys().collect();
    other.sort();
    assert_eq!(names, other, "{what}: names");
    for n in names {
        assert_eq!(a[n].dims(), b[n].dims(), "{what}: shape of {n}");
        assert!(bits(&a[n]) == bits(&b[n]), "{what}: {n} differs");
    }
}

fn build(cfg: &RealNvpConfig, dtype: DType, seed: u64, packed: bool) -> (ParamStore, RealNvp) {
    let store = ParamStore::new(seed);
    let model = build_model(cfg, &store, dtype, &Device::Cpu, packed);
    (store, model)
}

#[test]
fn packing_keeps_names_and_initial_values_and_leaves_one_variable_per_network() {
    let cfg = RealNvpConfig {
        bn_affine: true,
        ..small_model_config()
    };
    let (plain, model) = build(&cfg, DType::F32, 5, false);
    let (packed, _) = build(&cfg, DType::F32, 5, true);
    assert_same("initial values", &plain.tensors(), &packed.tensors());
    let all_groups = model.param_groups();
    assert_eq!(all_groups.len(), 3 * model.num_couplings());
    // Each network: its trainable parameters — inp and out (3 tensors each), per block
    // two batch norms (2 each) and two convolutions (3 each), and the output batch norm
    // — and its 2·blocks + 1 batch norms' running means and running variances.
    let norms = 2 * cfg.res_blocks + 1;
    for (g, members) in &all_groups {
        let want = if g.ends_with(".packed") {
            6 + 10 * cfg.res_blocks + 2
        } else {
            assert!(g.ends_with(".packed_running_mean") || g.ends_with(".packed_running_var"));
            assert!(is_buffer(g) && members.iter().all(|m| is_buffer(m)), "{g}");
            norms
        };
        assert_eq!(members.len(), want, "{g}");
        assert_eq!(packed.group_members(g).unwrap().len(), members.len());
    }
    let groups: Vec<_> = all_groups.iter().filter(|(g, _)| !is_buffer(g)).collect();
    // Buffer variables: each network's two groups, and each coupling-output batch
    // norm's own two, left single.
    let buffer_vars = packed
        .named_vars()
        .into_iter()
        .filter(|(n, _)| is_buffer(n));
    assert_eq!(buffer_vars.count(), 4 * model.num_couplings());
    // What stays single: the couplings' tanh scales and output batch norms' learned
    // affine — nothing of a network.
    let singles: Vec<String> = packed
        .trainable_vars()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| packed.group_members(n).is_none())
        .collect();
    assert!(!singles.is_empty());
    for n in &singles {
        assert!(
            groups
                .iter()
                .all(|(g, _)| !n.starts_with(g.trim_end_matches("packed"))),
            "{n} was left out of its network's group"
        );
    }
    assert_eq!(
        packed.trainable_vars().len(),
        groups.len() + singles.len(),
        "one variable per network"
    );
    assert!(packed.trainable_vars().len() * 5 < plain.trainable_vars().len());
    assert_eq!(packed.num_trainable(), plain.num_trainable());
    assert_eq!(packed.num_buffers(), plain.num_buffers());
    // Packing an already packed store changes nothing.
    let again = RealNvp::new_packed(&cfg, &packed, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(again.param_groups(), all_groups);
    assert_same("packed twice", &plain.tensors(), &packed.tensors());
}

/// Train-mode log-likelihoods, every gradient by name and the running statistics after
/// the pass: packed and unpacked, bit for bit, on each path that trains the networks.
#[test]
fn packed_train_passes_equal_unpacked_to_the_bit() {
    let _g = lock();
    let cfg = small_model_config();
    let check = |what: &str, dtype: DType| {
        let (lp_a, grads_a, after_a) = train_pass_packed(&cfg, dtype, 11, false);
        let (lp_b, grads_b, after_b) = train_pass_packed(&cfg, dtype, 11, true);
        assert!(bits(&lp_a) == bits(&lp_b), "{what}: log-likelihoods differ");
        assert_same(&format!("{what}: gradients"), &grads_a, &grads_b);
        assert_same(&format!("{what}: after the pass"), &after_a, &after_b);
    };
    // The fused f32 CPU op takes the flat variable; f64 runs the layers through views.
    check("f32, fused op", DType::F32);
    check("f64, layer by layer", DType::F64);
    // The one-node ops of the GPU path, on the CPU.
    tuning::set_resnet_ops(true);
    check("f64, NVP_RESNET_OPS", DType::F64);
    tuning::set_fused_resnet(false);
    check("f32, NVP_RESNET_OPS", DType::F32);
    tuning::set_resnet_ops(false);
    check("f32, layer by layer", DType::F32);
    tuning::set_fused_resnet(true);
}

/// Three training steps (L2 penalty on the gains, Adam): the parameters after each and
/// the optimizer's state, packed against unpacked, to the bit; the state loads across
/// the two.
#[test]
fn adam_steps_and_state_do_not_depend_on_the_packing() {
    let _g = lock();
    let cfg = small_model_config();
    let run = |packed: bool, mode: UpdateMode| {
        let (store, model) = build(&cfg, DType::F32, 21, packed);
        randomise(&store, 22);
        let mut adam = Adam::for_store(&store, AdamConfig::default()).unwrap();
        adam.set_update_mode(mode);
        let l2 = L2Gradient::new(&store, &model.scale_parameters(), 5e-5).unwrap();
        let mut seen = Vec::new();
        for step in 0..3 {
            let x = randn(&[4, 3, 8, 8], 1.0, DType::F32, &mut rng(23 + step));
            let loss = model.log_prob(&x, Mode::Train).unwrap().mean_all().unwrap();
            let mut grads = loss.neg().unwrap().backward().unwrap();
            l2.add_to(&mut grads).unwrap();
            let norm = adam.grad_norm(&grads).unwrap();
            adam.step(&grads, 1.0).unwrap();
            // `tensors()` shares the store's storage: keep the bits of this step.
            let now: HashMap<String, Vec<u64>> = store
                .tensors()
                .iter()
                .map(|(k, t)| (k.clone(), bits(t)))
                .collect();
            seen.push((norm, now));
        }
        (store, adam, seen)
    };
    // The flat update is the GPU's (the gradients concatenated); on the CPU, in place.
    // The in-place run's stores and optimizers are kept for the state checks below.
    let mut last = None;
    for mode in [UpdateMode::Flat, UpdateMode::Auto] {
        let (plain, adam_plain, steps_plain) = run(false, mode);
        let (packed, adam_packed, steps_packed) = run(true, mode);
        assert!(packed.trainable_vars().len() < plain.trainable_vars().len());
        for (i, ((na, ta), (nb, tb))) in steps_plain.iter().zip(&steps_packed).enumerate() {
            // The norm sums the squares per variable, so a packed group's differs in
            // the order of its additions: to rounding (the update, unclipped here,
            // does not use it).
            assert!(
                (na - nb).abs() <= 1e-14 * na,
                "{mode:?}, step {i}: gradient norm {na} vs {nb}"
            );
            assert!(ta == tb, "{mode:?}, step {i}: parameters differ");
        }
        assert_same("after 3 steps", &plain.tensors(), &packed.tensors());
        last = Some((adam_plain, adam_packed));
    }
    let (adam_plain, adam_packed) = last.unwrap();
    let (state_plain, state_packed) = (adam_plain.state().unwrap(), adam_packed.state().unwrap());
    assert_same("Adam state", &state_plain, &state_packed);
    // The saved state is by member name, so it loads into the other packing.
    let (_, mut fresh) = {
        let (s, _) = build(&cfg, DType::F32, 21, true);
        let a = Adam::for_store(&s, AdamConfig::default()).unwrap();
        (s, a)
    };
    fresh.load_state(&state_plain, 3).unwrap();
    assert_same(
        "state loaded across",
        &fresh.state().unwrap(),
        &state_packed,
    );
    let mut bad = state_plain.clone();
    let key = bad.keys().find(|k| k.ends_with(".inp.v")).unwrap().clone();
    bad.remove(&key);
    let err = fresh.load_state(&bad, 3).err().unwrap().to_string();
    assert!(err.contains(&key), "{err}");
}

/// Checkpoint tensors (by member name) move both ways between packed and unpacked
/// stores; a wrong shape names the member.
#[test]
fn checkpoints_move_between_packed_and_unpacked_stores() {
    let cfg = small_model_config();
    let (plain, _) = build(&cfg, DType::F64, 31, false);
    let (packed, _) = build(&cfg, DType::F64, 32, true);
    randomise(&plain, 33);
    packed.load_tensors(&plain.tensors()).unwrap();
    assert_same("unpacked → packed", &plain.tensors(), &packed.tensors());
    randomise(&packed, 34);
    plain.load_tensors(&packed.tensors()).unwrap();
    assert_same("packed → unpacked", &plain.tensors(), &packed.tensors());
    let mut bad = plain.tensors();
    let key = bad
        .keys()
        .find(|k| k.ends_with("blocks.1.conv2.g"))
        .unwrap()
        .clone();
    bad.insert(
        key.clone(),
        Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap(),
    );
    let before = packed.tensors()[&key].to_vec1::<f64>().unwrap();
    let err = packed.load_tensors(&bad).unwrap_err().to_string();
    assert!(err.contains(&key), "{err}");
    assert_eq!(packed.tensors()[&key].to_vec1::<f64>().unwrap(), before);
}

/// A model built over the store's frozen (graph-free) views sees the packed values and
/// their later updates; evaluation gives the unpacked model's bits, in f64 (candle's
/// ops) and in f32 (the fast CPU kernels reading the views at their offsets), with the
/// weights normalised once (`fix_weights`, as `nvp eval` does) or in every batch; and
/// the inverse too.
#[test]
fn frozen_models_over_a_packed_store_follow_it() {
    let cfg = small_model_config();
    for dtype in [DType::F64, DType::F32] {
        let (plain, _) = build(&cfg, dtype, 41, false);
        let (packed, _) = build(&cfg, dtype, 41, true);
        randomise(&plain, 42);
        randomise(&packed, 42);
        let frozen =
            |s: &ParamStore| RealNvp::new(&cfg, s.frozen_var_builder(dtype, &Device::Cpu)).unwrap();
        let (fa, fb) = (frozen(&plain), frozen(&packed));
        let x = randn(&[3, 3, 8, 8], 1.0, dtype, &mut rng(43));
        let lp = |m: &RealNvp| m.log_prob(&x, Mode::Eval).unwrap();
        assert!(bits(&lp(&fa)) == bits(&lp(&fb)), "{dtype:?}");
        let (za, _) = fa.encode(&x, Mode::Eval).unwrap();
        let (zb, _) = fb.encode(&x, Mode::Eval).unwrap();
        let back = |m: &RealNvp, z: &[Tensor]| m.decode(z).unwrap();
        assert!(
            bits(&back(&fa, &za)) == bits(&back(&fb, &zb)),
            "{dtype:?}: inverse"
        );
        randomise(&plain, 44);
        randomise(&packed, 44);
        assert!(
            bits(&lp(&fa)) == bits(&lp(&fb)),
            "{dtype:?}: after an update of the stores"
        );
        assert!(!lp(&fb).track_op(), "no graph");
        let (mut fa, mut fb) = (frozen(&plain), frozen(&packed));
        fa.fix_weights().unwrap();
        fb.fix_weights().unwrap();
        assert!(bits(&lp(&fa)) == bits(&lp(&fb)), "{dtype:?}: fixed weights");
    }
}

#[test]
fn pack_refuses_what_cannot_be_packed() {
    let store = ParamStore::new(1);
    let vb = store.var_builder(DType::F32, &Device::Cpu);
    vb.get(2, "a").unwrap();
    vb.get(3, "b").unwrap();
    vb.get(2, "bn.running_mean").unwrap();
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let err = |g: &str, m: &[&str]| store.pack(g, &names(m)).unwrap_err().to_string();
    assert!(err("g", &["a", "c"]).contains("`c`"));
    assert!(err("g", &["a", "bn.running_mean"]).contains("a buffer"));
    assert!(err("g.running_mean", &["a"]).contains("trainable"));
    assert!(err("g", &["a", "a"]).contains("twice"));
    assert!(err("b", &["a"]).contains("taken"));
    assert!(err("g", &[]).contains("empty"));
    assert_eq!(store.trainable_vars().len(), 2, "nothing changed");
    store.pack("g", &names(&["b", "a"])).unwrap();
    let members = store.group_members("g").unwrap();
    assert_eq!(
        members
            .iter()
            .map(|m| (m.name.as_str(), m.offset))
            .collect::<Vec<_>>(),
        [("b", 0), ("a", 3)]
    );
    assert!(
        err("h", &["a"]).contains("no such single parameter"),
        "packed once only"
    );
    // The names now read the group's slices; a wrong shape is still refused.
    assert_eq!(vb.get(2, "a").unwrap().dims(), [2]);
    assert!(vb.get(3, "a").is_err());
    let names: Vec<String> = store.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["g"]);
}

/// The moving average needs both stores packed alike, and then averages the groups.
#[test]
fn ema_over_packed_stores() {
    let cfg = small_model_config();
    let (live, _) = build(&cfg, DType::F64, 51, true);
    let (avg_plain, _) = build(&cfg, DType::F64, 51, false);
    let err = Ema::new(&live, &avg_plain, 0.9).err().unwrap().to_string();
    assert!(err.contains("pack"), "{err}");
    let (avg, _) = build(&cfg, DType::F64, 52, true);
    let mut ema = Ema::new(&live, &avg, 0.5).unwrap();
    assert_same("starts as a copy", &live.tensors(), &avg.tensors());
    let before = avg.tensors();
    let before: HashMap<String, Vec<f64>> = before
        .iter()
        .map(|(k, t)| (k.clone(), to_vec_f64(t)))
        .collect();
    randomise(&live, 53);
    ema.update().unwrap();
    let d = nvp::flow::ema::decay_at(0.5, 1);
    for (name, t) in avg.tensors() {
        let (a, p) = (to_vec_f64(&t), to_vec_f64(&live.tensors()[&name]));
        for (i, (a, p)) in a.iter().zip(&p).enumerate() {
            let want = if is_buffer(&name) {
                *p
            } else {
                d * before[&name][i] + (1.0 - d) * p
            };
            assert!(
                (a - want).abs() <= 1e-15 * want.abs().max(1.0),
                "{name}[{i}]"
            );
        }
    }
}

/// The L2 gradient refuses the tensors of a model built before its store was packed
/// (their gradients would never reach the optimizer), and takes the rebuilt model's.
#[test]
fn l2_gradient_refuses_tensors_the_store_no_longer_holds() {
    let cfg = small_model_config();
    let store = ParamStore::new(61);
    let before = RealNvp::new(&cfg, store.var_builder(DType::F32, &Device::Cpu)).unwrap();
    assert!(L2Gradient::new(&store, &before.scale_parameters(), 1e-3).is_ok());
    let after = RealNvp::new_packed(&cfg, &store, DType::F32, &Device::Cpu).unwrap();
    let err = L2Gradient::new(&store, &before.scale_parameters(), 1e-3)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("packed"), "{err}");
    assert!(L2Gradient::new(&store, &after.scale_parameters(), 1e-3).is_ok());
}
