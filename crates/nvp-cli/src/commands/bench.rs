//! `nvp bench`: training, evaluation and sampling throughput and peak RSS of
//! a config's model, timed as the PyTorch peer's `bench` does: a training
//! step runs from a u8 batch through flips, dequantisation, logit, forward,
//! loss + L2, backward, clipping and Adam; evaluation is dequantise + logit +
//! forward + bits/dim in eval mode; sampling is z → inverse → u8 pixels.
//! Medians over the timed repetitions.

use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use nvp_data::augment::RandomFlip;
use nvp_data::{Batch, Dequantize};
use nvp_flow::Mode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::cli::BenchArgs;
use crate::engine::{self, Trainer};
use crate::settings::{open_device, Settings};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Peak resident set size of this process (VmHWM), MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// A batch made in the timed region from u8 pixels.
fn make_batch(
    pixels: &[u8],
    n: usize,
    s: &Settings,
    flip: bool,
    rng: &mut StdRng,
    device: &candle_core::Device,
) -> Result<Batch> {
    let m = &s.model;
    let d = m.dims();
    let mut px = pixels.to_vec();
    let flipper = RandomFlip::new(0.5)?;
    let mut flipped = vec![false; n];
    if flip {
        for (i, f) in flipped.iter_mut().enumerate() {
            *f = flipper.apply(
                &mut px[i * d..(i + 1) * d],
                m.channels,
                m.height,
                m.width,
                rng,
            )?;
        }
    }
    let deq = Dequantize::new(s.data.alpha)?;
    let mut y = vec![0f32; n * d];
    let mut ld = Vec::with_capacity(n);
    for i in 0..n {
        ld.push(deq.apply(&px[i * d..(i + 1) * d], rng, &mut y[i * d..(i + 1) * d])?);
    }
    // A class-conditional model gets the classes in turn.
    let labels = (m.classes > 0).then(|| (0..n).map(|i| (i % m.classes) as u32).collect());
    Ok(Batch {
        epoch: 0,
        index: 0,
        pixels: px,
        labels,
        y: Tensor::from_vec(y, (n, m.channels, m.height, m.width), device)?,
        ld_pre: ld,
        indices: (0..n).collect(),
        flipped,
    })
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.batch == 0 || a.steps == 0 || a.eval_batch == 0 || a.sample_n == 0 {
        bail!("--batch, --steps, --eval-batch and --sample-n must be at least 1");
    }
    let mut s = match &a.config {
        Some(p) => Settings::load(p)?,
        None => Settings::demo(),
    };
    if let Some(d) = &a.device {
        s.train.device = d.clone();
    }
    s.train.batch_size = a.batch;
    if let Some(p) = a.precision {
        s.train.precision = p;
    }
    s.validate().or_else(|e| {
        // The dataset is not read: a missing data path does not matter here.
        if e.to_string().contains("data.path") {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    let device = open_device(&s.train.device)?;
    let (store, model) = crate::model::build(&s, &device)?;
    let params = store.num_trainable();
    // How many tensors hold them: on a GPU each one costs kernel launches of its own
    // in every step (its gradient's zero fill and add, the optimizer's gather and
    // update).
    let param_tensors = store.trainable_vars().len();
    let mut trainer = Trainer::new(store, model, &s)?;
    let d = s.model.dims();
    let mut rng = StdRng::seed_from_u64(0);
    let random_pixels = |n: usize, rng: &mut StdRng| -> Vec<u8> {
        (0..n * d).map(|_| rng.random::<u8>()).collect()
    };
    let rss_before = peak_rss_mib();

    // Training.
    let px = random_pixels(a.batch, &mut rng);
    let mut times = Vec::new();
    let mut skipped = 0;
    for i in 0..a.warmup + a.steps {
        let t0 = Instant::now();
        let b = make_batch(&px, a.batch, &s, s.data.flip, &mut rng, &device)?;
        let o = trainer.step(&b)?;
        device_sync(&device)?;
        if o.skipped {
            skipped += 1;
        }
        if i >= a.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let train_step_s = median(times);
    let peak_train = peak_rss_mib();
    // Where a step's time goes: a few more steps, the device synchronised at the end of
    // each phase (forward + loss, backward, gradient norm + Adam). Not part of the
    // figure above, which has no synchronisation inside a step.
    let mut phases: [Vec<f64>; 3] = Default::default();
    // The size of the step's autograd graph (nodes from the loss back to the
    // parameters): on a GPU each node's backward launches kernels of its own plus, per
    // input, candle's zero-filled gradient buffer and add.
    let mut graph_nodes = None;
    for _ in 0..a.phase_steps {
        let b = make_batch(&px, a.batch, &s, s.data.flip, &mut rng, &device)?;
        device_sync(&device)?;
        let mut t = Instant::now();
        trainer.step_marked(&b, |phase, loss| {
            device_sync(&device)?;
            phases[phase as usize].push(t.elapsed().as_secs_f64());
            if matches!(phase, engine::Phase::Forward) && graph_nodes.is_none() {
                graph_nodes = Some(loss.sorted_nodes().len());
            }
            t = Instant::now();
            Ok(())
        })?;
    }
    // (no figure where no step finished: `--phase-steps 0`, or only skipped steps)
    let [fwd_s, bwd_s, upd_s] = phases.map(|p| (!p.is_empty()).then(|| median(p)));
    let js = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.4}"));
    let txt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3} s"));

    // Evaluation and sampling as `nvp eval` and `nvp sample` run them: over the trained
    // parameters, with the weight normalisation computed once (`fix_weights`).
    let mut infer = crate::model::frozen(&s, &trainer.store, &device)?;
    infer.fix_weights()?;

    // Evaluation (one untimed batch first; none at all for `--eval-reps 0`).
    let px = random_pixels(a.eval_batch, &mut rng);
    let mut times = Vec::new();
    for i in 0..if a.eval_reps > 0 { a.eval_reps + 1 } else { 0 } {
        let t0 = Instant::now();
        let b = make_batch(&px, a.eval_batch, &s, false, &mut rng, &device)?;
        let cond = engine::condition(&infer, b.labels.as_deref())?;
        let lp = infer
            .log_prob_cond(&b.y, cond.as_ref(), Mode::Eval)?
            .to_vec1::<f32>()?;
        let lp: Vec<f64> = lp.into_iter().map(f64::from).collect();
        let bpd = nvp_data::preprocess::mean_bits_per_dim(&lp, &b.ld_pre, d)?;
        std::hint::black_box(bpd);
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let eval_s = (!times.is_empty()).then(|| median(times));

    // Sampling (likewise).
    let mut times = Vec::new();
    for i in 0..if a.sample_reps > 0 {
        a.sample_reps + 1
    } else {
        0
    } {
        let t0 = Instant::now();
        let px = engine::sample_pixels(&infer, a.sample_n, 1.0, s.data.alpha, None, &mut rng)?;
        std::hint::black_box(px);
        if i > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    let sample_s = (!times.is_empty()).then(|| median(times));
    let peak = peak_rss_mib();

    // What the convolutions ran on: this crate's CPU kernels, cuDNN (with or without
    // TF32 tensor cores) or candle's own ops.
    let conv = conv_backend(&device);
    let bn = match (device.is_cpu(), nvp_kernels::fast_cpu_enabled()) {
        (true, true) => "nvp",
        (false, _) if nvp_kernels::cudnn_batch_norm_enabled() => "cudnn",
        _ => "candle",
    };
    let train_ips = a.batch as f64 / train_step_s;
    let precision = s.train.precision.name();
    let eval_ips = eval_s.map(|t| a.eval_batch as f64 / t);
    let sample_ips = sample_s.map(|t| a.sample_n as f64 / t);
    // JSON has no NaN: a figure that was not measured is `null`.
    let jf = |v: f64, prec: usize| {
        if v.is_finite() {
            format!("{v:.prec$}")
        } else {
            "null".to_string()
        }
    };
    let jo = |v: Option<f64>, prec: usize| v.map_or("null".to_string(), |v| jf(v, prec));
    let ips = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:8.2} img/s"));
    if a.json {
        println!(
            "{{\"config\":\"{}\",\"device\":\"{}\",\"params\":{params},\"param_tensors\":{param_tensors},\"batch\":{},\"precision\":\"{}\",\"train_step_s\":{train_step_s:.4},\"train_img_per_s\":{train_ips:.3},\"eval_batch\":{},\"eval_img_per_s\":{},\"sample_n\":{},\"sample_img_per_s\":{},\"peak_rss_mib\":{},\"peak_rss_train_mib\":{},\"rss_before_train_mib\":{},\"skipped_steps\":{skipped},\"threads\":{},\"conv\":\"{conv}\",\"batch_norm\":\"{bn}\",\"train_forward_s\":{},\"train_backward_s\":{},\"train_update_s\":{},\"graph_nodes\":{}}}",
            s.name,
            s.train.device,
            a.batch,
            precision,
            a.eval_batch,
            jo(eval_ips, 3),
            a.sample_n,
            jo(sample_ips, 3),
            jf(peak, 1),
            jf(peak_train, 1),
            jf(rss_before, 1),
            rayon_threads(),
            js(fwd_s),
            js(bwd_s),
            js(upd_s),
            graph_nodes.map_or("null".to_string(), |n| n.to_string())
        );
    } else {
        println!(
            "config {} on {} (convolutions: {conv}, batch norm: {bn}): {params} parameters in {param_tensors} tensors",
            s.name, s.train.device
        );
        println!(
            "train   batch {:>4}: {train_ips:8.2} img/s (median step {:.3} s over {} steps, {precision})",
            a.batch, train_step_s, a.steps
        );
        println!(
            "        phases (synchronised): forward {}, backward {}, update {}; autograd graph: {} nodes",
            txt(fwd_s),
            txt(bwd_s),
            txt(upd_s),
            graph_nodes.map_or("-".to_string(), |n| n.to_string())
        );
        println!("eval    batch {:>4}: {}", a.eval_batch, ips(eval_ips));
        println!("sample  n     {:>4}: {}", a.sample_n, ips(sample_ips));
        println!("peak RSS: {peak:.0} MiB (after training steps: {peak_train:.0} MiB; before: {rss_before:.0} MiB)");
    }
    Ok(())
}

/// Which implementation `nvp_kernels::conv2d_3x3` uses for f32 tensors on `d` (on the
/// CPU with the compilation of its Winograd kernels: `nvp-winograd-avx512`, `-avx2` or
/// `-portable`).
fn conv_backend(d: &candle_core::Device) -> &'static str {
    match (
        d.is_cpu(),
        nvp_kernels::fast_cpu_enabled(),
        nvp_kernels::cudnn_enabled(),
    ) {
        (true, true, _) if nvp_kernels::winograd_enabled() => {
            match nvp_kernels::winograd_kernels() {
                "avx512" => "nvp-winograd-avx512",
                "avx2" => "nvp-winograd-avx2",
                _ => "nvp-winograd-portable",
            }
        }
        (true, true, _) => "nvp-im2col",
        (true, false, _) => "candle",
        (false, _, true) => match (
            nvp_kernels::tf32_enabled(),
            nvp_kernels::cudnn_benchmark_enabled(),
        ) {
            (true, false) => "cudnn-tf32",
            (false, false) => "cudnn-fp32",
            (true, true) => "cudnn-tf32-timed",
            (false, true) => "cudnn-fp32-timed",
        },
        (false, _, false) if nvp_kernels::dx_as_conv_enabled() => "candle-dx-as-conv",
        (false, _, false) => "candle",
    }
}

fn device_sync(d: &candle_core::Device) -> Result<()> {
    Ok(d.synchronize()?)
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
}
