//! `nvp train`: the training loop with periodic evaluation, samples,
//! metrics, checkpoints (last and best), exact resume and the non-finite
//! guard.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use nvp_data::{ImageSource, Loader, LoaderConfig, Prefix, Split};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::checkpoint::{self, Checkpoint, RunState};
use crate::cli::TrainArgs;
use crate::engine::{self, Trainer};
use crate::report::{self, MetricsRow};
use crate::settings::{open_device, Overrides, Precision, Settings};

/// Seed stream of the periodic sample grids (the same latents every time,
/// so the grids show the model improving).
const SAMPLE_SEED: u64 = 0x5a4d_91e5;

pub fn run(a: TrainArgs) -> Result<()> {
    let overrides = Overrides {
        data: a.data.clone(),
        max_steps: a.max_steps,
        minutes: a.minutes,
        seed: a.seed,
        device: a.device.clone(),
        batch_size: a.batch_size,
        precision: a.precision,
    };
    let mut settings = match &a.config {
        Some(p) => Settings::load(p)?,
        None => Settings::demo(),
    };
    let out: PathBuf = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs").join(&settings.name));
    let mut state = RunState::default();
    let mut started_with_data = None;
    let resume_dir = if a.resume {
        let dir = checkpoint::resolve(&out)
            .with_context(|| format!("--resume: no checkpoint to resume in {}", out.display()))?;
        // The run continues with the settings it was started with; a --config given
        // again must say the same.
        let saved = checkpoint::load_settings(&dir)?;
        if let Some(p) = &a.config {
            check_same_config(&settings, &saved, &overrides, p, &dir)?;
        }
        started_with_data = saved.data.path.clone();
        settings = saved;
        state = checkpoint::load_state(&dir)?;
        Some(dir)
    } else {
        if out.join("last").exists() || out.join("last.old").exists() {
            bail!(
                "{} already holds a training run: pass --resume to continue it, or choose another --out",
                out.display()
            );
        }
        None
    };
    if a.resume && (a.seed.is_some() || a.batch_size.is_some()) {
        bail!("--resume continues the run with its saved config: --seed and --batch-size cannot change it");
    }
    settings.apply(&overrides);
    settings.validate()?;
    // The run's saved config names the data folder absolutely, so that `eval` and
    // `--resume` find it from any working directory.
    if let Some(p) = &settings.data.path {
        if let Ok(abs) = std::fs::canonicalize(p) {
            settings.data.path = Some(abs);
        }
    }
    let device = open_device(&settings.train.device)?;
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    std::fs::write(out.join("config.toml"), settings.to_toml()?)
        .with_context(|| format!("cannot write {}", out.join("config.toml").display()))?;

    let train_set = crate::data::open(&settings, Split::Train)?;
    let mut test_set = crate::data::open(&settings, Split::Test)?;
    if settings.data.test_limit > 0 {
        test_set = Arc::new(Prefix::new(test_set, settings.data.test_limit));
    }

    let (store, model) = crate::model::build(&settings, &device)?;
    let mut trainer = Trainer::new(store, model, &settings)?;
    if let Some(dir) = &resume_dir {
        checkpoint::load_into(&trainer.store, &dir.join(checkpoint::MODEL_FILE), &device)?;
        if let Some(a) = &mut trainer.averaged {
            let path = dir.join(checkpoint::EMA_FILE);
            if !path.is_file() {
                bail!(
                    "{} is missing: the run averages its parameters (train.ema = {})",
                    path.display(),
                    settings.train.ema
                );
            }
            checkpoint::load_into(&a.store, &path, &device)?;
            a.ema.set_updates(state.step);
        }
        let opt = checkpoint::load_optimizer(dir, &device)?;
        trainer.adam.load_state(&opt, state.step).with_context(|| {
            format!(
                "{} does not fit the model",
                dir.join(checkpoint::OPTIM_FILE).display()
            )
        })?;
        report::truncate_metrics(&out.join("metrics.csv"), state.step)?;
    }

    let t = &settings.train;
    let mut lcfg = LoaderConfig::train(t.batch_size, t.seed);
    lcfg.flip = settings.data.flip;
    lcfg.alpha = settings.data.alpha;
    lcfg.workers = t.workers;
    lcfg.device = device.clone();
    let loader = Loader::from_source(train_set.clone(), lcfg)?;
    if loader.batches_per_epoch() == 0 {
        bail!(
            "the training split has {} images, fewer than one batch of {}",
            train_set.len(),
            t.batch_size
        );
    }
    let mut ecfg = LoaderConfig::eval(t.eval_batch_size, 0);
    ecfg.alpha = settings.data.alpha;
    ecfg.device = device.clone();
    let eval_loader = Loader::from_source(test_set.clone(), ecfg)?;

    eprintln!(
        "nvp train: {} — {} parameters, {} training / {} test images of {}×{}×{}, batch {}, device {}{}; run folder {}",
        settings.name,
        trainer.store.num_trainable(),
        train_set.len(),
        test_set.len(),
        settings.model.channels,
        settings.model.height,
        settings.model.width,
        t.batch_size,
        t.device,
        match t.precision {
            Precision::F32 => "",
            Precision::Bf16 => " (bf16 products in training; evaluation f32)",
        },
        out.display()
    );
    if resume_dir.is_some() {
        eprintln!(
            "resuming at step {} (epoch {}, batch {})",
            state.step, state.epoch, state.batch
        );
        if let (Some(was), Some(now)) = (&started_with_data, &settings.data.path) {
            if was != now {
                eprintln!(
                    "note: the run was started on the data in {}; it continues on {} (--data)",
                    was.display(),
                    now.display()
                );
            }
        }
    }

    let started = Instant::now();
    let elapsed_before = state.elapsed_secs;
    // Training seconds so far, across resumes.
    let elapsed = || elapsed_before + started.elapsed().as_secs_f64();
    let limit_secs = t.minutes * 60.0;
    let pb = report::progress(t.max_steps, state.step);
    let mut stream = loader.stream(state.epoch as usize, state.batch as usize)?;
    let (mut bpd_sum, mut bpd_n, mut imgs) = (0.0f64, 0usize, 0usize);
    let mut window = Instant::now();
    let mut bad_in_row = 0u32;
    let mut last_eval_step = state.step;
    let mut ema_bpd = f64::NAN;
    let mut skips_reported = 0usize;
    // Checkpoints between evaluations, every `checkpoint-minutes` of wall time.
    let ckpt_every_secs = t.checkpoint_minutes * 60.0;
    let mut last_saved = Instant::now();
    let mut saved_step = resume_dir.as_ref().map(|_| state.step);
    let stop = crate::interrupt::install()?;
    let mut interrupted = false;

    while state.step < t.max_steps {
        if stop.is_set() {
            interrupted = true;
            break;
        }
        if limit_secs > 0.0 && started.elapsed().as_secs_f64() >= limit_secs {
            break;
        }
        let batch = stream
            .next()
            .context("the training loader stopped")?
            .context("loading a training batch")?;
        // Position of the next batch.
        state.batch = batch.index as u64 + 1;
        state.epoch = batch.epoch as u64;
        if state.batch as usize >= loader.batches_per_epoch() {
            state.batch = 0;
            state.epoch += 1;
        }
        let o = trainer.step(&batch)?;
        if o.skipped {
            state.skipped_steps += 1;
            bad_in_row += 1;
            say(
                &pb,
                format!(
                    "warning: step {} skipped: non-finite {} ({} in a row)",
                    state.step + 1,
                    if o.bpd.is_finite() {
                        "gradient"
                    } else {
                        "loss"
                    },
                    bad_in_row
                ),
            );
            if bad_in_row >= t.max_bad_steps {
                pb.abandon();
                let kept = match checkpoint::resolve(&out) {
                    Ok(dir) => format!("the last good checkpoint, {}, is intact", dir.display()),
                    Err(_) => format!("no checkpoint was saved in {} yet", out.display()),
                };
                bail!(
                    "stopping: {bad_in_row} non-finite steps in a row after step {}; {kept} (try a lower train.lr or train.clip)",
                    state.step
                );
            }
            continue;
        }
        bad_in_row = 0;
        state.step += 1;
        bpd_sum += o.bpd;
        bpd_n += 1;
        imgs += batch.len();
        ema_bpd = if ema_bpd.is_nan() {
            o.bpd
        } else {
            0.9 * ema_bpd + 0.1 * o.bpd
        };
        pb.set_position(state.step);
        let rate = imgs as f64 / window.elapsed().as_secs_f64().max(1e-9);
        pb.set_message(format!(
            "bpd {ema_bpd:.3} | grad norm {:.2} | {rate:.1} img/s",
            o.grad_norm
        ));

        if state.step % t.eval_every == 0 || state.step == t.max_steps {
            let row = periodic(
                &mut trainer,
                &settings,
                &eval_loader,
                &out,
                &mut state,
                elapsed(),
                bpd_sum / bpd_n.max(1) as f64,
                rate,
            )?;
            say_row(&pb, &row);
            warn_skipped(&pb, train_set.as_ref(), &mut skips_reported);
            last_eval_step = state.step;
            (saved_step, last_saved) = (Some(state.step), Instant::now());
            (bpd_sum, bpd_n, imgs) = (0.0, 0, 0);
            window = Instant::now();
        } else if ckpt_every_secs > 0.0 && last_saved.elapsed().as_secs_f64() >= ckpt_every_secs {
            state.elapsed_secs = elapsed();
            save_checkpoints(&trainer, &settings, &out, &state, false)?;
            (saved_step, last_saved) = (Some(state.step), Instant::now());
        }
    }
    drop(stream);
    if interrupted {
        pb.abandon();
        let msg = if saved_step == Some(state.step) {
            format!(
                "interrupted at step {}; the checkpoint {}/last is of this step",
                state.step,
                out.display()
            )
        } else if state.step > 0 {
            state.elapsed_secs = elapsed();
            save_checkpoints(&trainer, &settings, &out, &state, false)?;
            format!(
                "interrupted at step {}; checkpoint saved in {}/last",
                state.step,
                out.display()
            )
        } else {
            bail!(crate::interrupt::Interrupted(
                "interrupted before the first step; nothing to save".into()
            ));
        };
        bail!(crate::interrupt::Interrupted(format!(
            "{msg} (continue with `nvp train --out {} --resume`)",
            out.display()
        )));
    }
    if state.step > last_eval_step || (resume_dir.is_none() && state.step == 0) {
        let rate = imgs as f64 / window.elapsed().as_secs_f64().max(1e-9);
        let train_bpd = if bpd_n > 0 {
            bpd_sum / bpd_n as f64
        } else {
            f64::NAN
        };
        let row = periodic(
            &mut trainer,
            &settings,
            &eval_loader,
            &out,
            &mut state,
            elapsed(),
            train_bpd,
            rate,
        )?;
        say_row(&pb, &row);
    }
    warn_skipped(&pb, train_set.as_ref(), &mut skips_reported);
    pb.finish_and_clear();
    eprintln!(
        "done: {} steps in {:.0} s ({} skipped); best test bpd {:.4}; checkpoints in {}/last and {}/best, samples in {}/samples",
        state.step,
        elapsed(),
        state.skipped_steps,
        state.best_test_bpd.unwrap_or(f64::NAN),
        out.display(),
        out.display(),
        out.display()
    );
    Ok(())
}

/// Test bits/dim, a sample grid, checkpoints (last, and best when improved),
/// a metrics row and the curve.
#[allow(clippy::too_many_arguments)]
fn periodic(
    trainer: &mut Trainer,
    s: &Settings,
    eval_loader: &Loader,
    out: &std::path::Path,
    state: &mut RunState,
    elapsed: f64,
    train_bpd: f64,
    rate: f64,
) -> Result<MetricsRow> {
    let bpd = engine::evaluate(trainer.eval_model(), eval_loader.eval_batches()?)?;
    let (test_bpd, stderr) = nvp_flow::bits::mean_and_stderr(&bpd);
    let n = s.train.samples;
    if n > 0 {
        let mut rng = StdRng::seed_from_u64(s.train.seed ^ SAMPLE_SEED);
        let px = engine::sample_pixels(
            trainer.eval_model(),
            n,
            s.train.temperature,
            s.data.alpha,
            None,
            &mut rng,
        )?;
        let m = &s.model;
        let cols = engine::sample_grid_cols(trainer.eval_model(), n, None);
        let img = report::grid(
            &px,
            n,
            m.channels,
            m.height,
            m.width,
            cols,
            report::auto_zoom(m.width, cols),
        );
        report::save_png(
            &img,
            &out.join("samples")
                .join(format!("step-{:07}.png", state.step)),
        )?;
        report::save_png(&img, &out.join("samples").join("latest.png"))?;
    }
    state.elapsed_secs = elapsed;
    let improved = test_bpd.is_finite() && state.best_test_bpd.is_none_or(|b| test_bpd < b);
    if improved {
        state.best_test_bpd = Some(test_bpd);
    }
    save_checkpoints(trainer, s, out, state, improved)?;
    let row = MetricsRow {
        step: state.step,
        epoch: state.epoch,
        elapsed_s: elapsed,
        train_bpd,
        test_bpd,
        test_bpd_stderr: stderr,
        img_per_s: rate,
        skipped_steps: state.skipped_steps,
    };
    let csv = out.join("metrics.csv");
    report::append_metrics(&csv, &row)?;
    report::plot_bpd(&report::read_metrics(&csv)?, &out.join("bpd.png"))?;
    Ok(row)
}

/// Saves the `last` checkpoint, and `best` too when `best` is set.
fn save_checkpoints(
    trainer: &Trainer,
    s: &Settings,
    out: &std::path::Path,
    state: &RunState,
    best: bool,
) -> Result<()> {
    let ckpt = Checkpoint {
        store: &trainer.store,
        optimizer: trainer.adam.state()?,
        ema: trainer.averaged.as_ref().map(|a| &a.store),
        state,
        settings: s,
    };
    checkpoint::save(out, "last", &ckpt)?;
    if best {
        checkpoint::save(out, "best", &ckpt)?;
    }
    Ok(())
}

/// The line of an evaluation, and a warning when its test bits/dim is not finite: the
/// weights are (checkpoints refuse others), but the model overflows on some test image;
/// `best/` keeps the best finite one.
fn say_row(pb: &indicatif::ProgressBar, row: &MetricsRow) {
    say(
        pb,
        format!(
            "step {:>6}  train bpd {:.4}  test bpd {:.4} ± {:.4}  {:.1} img/s",
            row.step, row.train_bpd, row.test_bpd, row.test_bpd_stderr, row.img_per_s
        ),
    );
    if !row.test_bpd.is_finite() {
        say(
            pb,
            format!(
                "warning: the test bits/dim at step {} is not finite: the model diverges on some test images \
                 (best/ keeps the best finite one; try a lower train.lr or train.clip)",
                row.step
            ),
        );
    }
}

/// A warning for the unreadable training files a streamed folder has skipped since the
/// last one (`data.skip-bad-images`).
fn warn_skipped(pb: &indicatif::ProgressBar, data: &dyn ImageSource, reported: &mut usize) {
    let skipped = data.skipped_files();
    if skipped.len() > *reported {
        let (path, why) = &skipped[*reported];
        say(
            pb,
            format!(
                "warning: {} unreadable training image(s) skipped so far (one: {}: {why})",
                skipped.len(),
                path.display()
            ),
        );
        *reported = skipped.len();
    }
}

/// A line above the progress bar, or on stderr when the bar is hidden.
fn say(pb: &indicatif::ProgressBar, msg: String) {
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}

/// `--resume --config FILE`: FILE must describe the run that is resumed. Compared with
/// the run's saved config after the same normalisation (the command line's overrides,
/// the data folder made absolute); what `--resume` may change anyway (the data folder,
/// `max-steps`, `minutes`, the device) is not compared. The error lists every key that
/// differs, with both values.
fn check_same_config(
    given: &Settings,
    saved: &Settings,
    overrides: &Overrides,
    path: &std::path::Path,
    dir: &std::path::Path,
) -> Result<()> {
    let mut given = given.clone();
    given.apply(overrides);
    given.data.path = saved.data.path.clone();
    given.train.max_steps = saved.train.max_steps;
    given.train.minutes = saved.train.minutes;
    given.train.device = saved.train.device.clone();
    let as_value =
        |s: &Settings| -> Result<toml::Value> { Ok(toml::from_str::<toml::Value>(&s.to_toml()?)?) };
    let mut diffs = Vec::new();
    toml_diff(&as_value(saved)?, &as_value(&given)?, "", &mut diffs);
    if !diffs.is_empty() {
        bail!(
            "--resume continues the run with its saved config ({}), and {} differs from it: {}; drop --config to continue the run as it was started, or train a new run in another --out",
            dir.join(checkpoint::CONFIG_FILE).display(),
            path.display(),
            diffs.join(", ")
        );
    }
    Ok(())
}

/// The dotted keys whose values differ between `run` (the saved config) and `file`,
/// each as `key (the run's X, the file's Y)`.
fn toml_diff(run: &toml::Value, file: &toml::Value, prefix: &str, out: &mut Vec<String>) {
    match (run, file) {
        (toml::Value::Table(a), toml::Value::Table(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => toml_diff(x, y, &key, out),
                    (Some(x), None) => out.push(format!("{key} (the run's {x}, not in the file)")),
                    (None, Some(y)) => {
                        out.push(format!("{key} (not in the run's, the file's {y})"))
                    }
                    (None, None) => {}
                }
            }
        }
        _ if run != file => out.push(format!("{prefix} (the run's {run}, the file's {file})")),
        _ => {}
    }
}
