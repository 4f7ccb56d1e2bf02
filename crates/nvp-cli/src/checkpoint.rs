//! Checkpoints: a folder holding the weights and batch-norm statistics
//! (`model.safetensors`, loadable with Python's `safetensors`), the Adam
//! moments (`optimizer.safetensors`), the run state (`state.toml`: step,
//! epoch, batch, …) and the resolved config (`config.toml`); with `train.ema`, also
//! the averaged model (`ema.safetensors`: the averaged weights with the batch-norm
//! statistics, the same keys as `model.safetensors`), which `eval`, `sample`, … load
//! by default.
//!
//! Written atomically: everything goes into a temporary folder which then
//! replaces the old checkpoint by rename (`last` → `last.old`, tmp → `last`,
//! remove `last.old`); a checkpoint with any non-finite tensor is refused.
//! A run folder keeps `last/` and `best/` (lowest test bits/dim).

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use nvp_flow::{ParamStore, RealNvp};
use serde::{Deserialize, Serialize};

use crate::settings::Settings;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIM_FILE: &str = "optimizer.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
pub const STATE_FILE: &str = "state.toml";
pub const CONFIG_FILE: &str = "config.toml";

/// Where a training run stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RunState {
    /// Optimizer steps taken.
    pub step: u64,
    /// Epoch and batch index of the next training batch.
    pub epoch: u64,
    pub batch: u64,
    /// Steps skipped because the loss or a gradient was not finite.
    pub skipped_steps: u64,
    /// Lowest test bits/dim seen at an evaluation.
    pub best_test_bpd: Option<f64>,
    /// Training seconds so far (across resumes).
    pub elapsed_secs: f64,
}

/// Everything a checkpoint holds.
pub struct Checkpoint<'a> {
    pub store: &'a ParamStore,
    pub optimizer: HashMap<String, Tensor>,
    /// The averaged model, when the run keeps one.
    pub ema: Option<&'a ParamStore>,
    pub state: &'a RunState,
    pub settings: &'a Settings,
}

/// The first tensor (by name) with a non-finite value: its name, the index and value.
fn first_non_finite(tensors: &HashMap<String, Tensor>) -> Result<Option<(String, usize, f32)>> {
    let mut names: Vec<_> = tensors.keys().collect();
    names.sort();
    for name in names {
        let v = tensors[name]
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Ok(Some((name.clone(), i, v[i])));
        }
    }
    Ok(None)
}

fn check_finite(kind: &str, tensors: &HashMap<String, Tensor>) -> Result<()> {
    if let Some((name, i, v)) = first_non_finite(tensors)? {
        bail!("refusing to write a checkpoint: {kind} tensor `{name}` has a non-finite value ({v}) at index {i}");
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f =
        fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}

fn save_tensors(path: &Path, t: &HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(t, path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    fs::File::open(path)?.sync_all()?;
    Ok(())
}

/// Write `ckpt` as `run_dir/name/`, atomically.
pub fn save(run_dir: &Path, name: &str, ckpt: &Checkpoint) -> Result<PathBuf> {
    let model = ckpt.store.tensors();
    check_finite("model", &model)?;
    check_finite("optimizer", &ckpt.optimizer)?;
    let ema = ckpt.ema.map(ParamStore::tensors);
    if let Some(t) = &ema {
        check_finite("averaged model", t)?;
    }
    let final_dir = run_dir.join(name);
    let tmp = run_dir.join(format!(".{name}.tmp-{}", std::process::id()));
    remove_stale_temps(run_dir, name);
    if tmp.exists() {
        fs::remove_dir_all(&tmp)?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    save_tensors(&tmp.join(MODEL_FILE), &model)?;
    save_tensors(&tmp.join(OPTIM_FILE), &ckpt.optimizer)?;
    if let Some(t) = &ema {
        save_tensors(&tmp.join(EMA_FILE), t)?;
    }
    write_synced(
        &tmp.join(STATE_FILE),
        toml::to_string_pretty(ckpt.state)?.as_bytes(),
    )?;
    write_synced(&tmp.join(CONFIG_FILE), ckpt.settings.to_toml()?.as_bytes())?;
    // The safetensors writer creates its files private (0600); give them the mode a
    // plain file gets here (the umask's), as the .toml files have.
    let mode = fs::metadata(tmp.join(CONFIG_FILE))?.permissions();
    for f in [MODEL_FILE, OPTIM_FILE, EMA_FILE] {
        let p = tmp.join(f);
        if p.is_file() {
            fs::set_permissions(&p, mode.clone())
                .with_context(|| format!("cannot set the permissions of {}", p.display()))?;
        }
    }
    // `name.old` is removed only when `name` is there to replace it: after a save cut
    // off between the two renames, `name.old` is the only whole checkpoint.
    let old = run_dir.join(format!("{name}.old"));
    if final_dir.exists() {
        if old.exists() {
            fs::remove_dir_all(&old)?;
        }
        fs::rename(&final_dir, &old)?;
    }
    fs::rename(&tmp, &final_dir)
        .with_context(|| format!("cannot move the checkpoint into {}", final_dir.display()))?;
    if old.exists() {
        fs::remove_dir_all(&old)?;
    }
    if let Ok(d) = fs::File::open(run_dir) {
        d.sync_all().ok();
    }
    Ok(final_dir)
}

/// Removes the temporary folders (`.name.tmp-PID`) of saves that a killed process
/// left behind; each holds a whole checkpoint's worth of files. Best effort.
fn remove_stale_temps(run_dir: &Path, name: &str) {
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(run_dir) else {
        return;
    };
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if rest.parse::<u32>().is_ok() && e.path().is_dir() {
            fs::remove_dir_all(e.path()).ok();
        }
    }
}

/// The checkpoint folder behind `path`: a checkpoint folder, a file inside
/// one, or a run folder (its `last/`, or `last.old/` if a save was cut off).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if !path.exists() {
        bail!("checkpoint {} does not exist", path.display());
    }
    if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        if dir.join(MODEL_FILE).is_file() {
            return Ok(dir);
        }
        bail!(
            "{} is not inside a checkpoint folder (no {MODEL_FILE} beside it)",
            path.display()
        );
    }
    if path.join(MODEL_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    for sub in ["last", "last.old"] {
        if path.join(sub).join(MODEL_FILE).is_file() {
            return Ok(path.join(sub));
        }
    }
    bail!(
        "{} holds no checkpoint (expected {MODEL_FILE}, or a last/ folder from `nvp train`)",
        path.display()
    )
}

/// The weights `--ckpt ARG` names in the checkpoint folder `dir` (from [`resolve`]):
/// `ARG` itself when it is a checkpoint's weights file (`model.safetensors`, or
/// `ema.safetensors`), otherwise the averaged model when the run kept one, otherwise
/// `model.safetensors`.
pub fn weights_file(arg: &Path, dir: &Path) -> PathBuf {
    let named = arg.file_name().and_then(|n| n.to_str());
    if arg.is_file() && matches!(named, Some(MODEL_FILE | EMA_FILE)) {
        return arg.to_path_buf();
    }
    if dir.join(EMA_FILE).is_file() {
        dir.join(EMA_FILE)
    } else {
        dir.join(MODEL_FILE)
    }
}

/// The resolved settings saved with a checkpoint.
pub fn load_settings(ckpt_dir: &Path) -> Result<Settings> {
    let p = ckpt_dir.join(CONFIG_FILE);
    if !p.is_file() {
        bail!(
            "{} is missing: the checkpoint has no config beside it",
            p.display()
        );
    }
    Settings::load(&p)
}

pub fn load_state(ckpt_dir: &Path) -> Result<RunState> {
    let p = ckpt_dir.join(STATE_FILE);
    let text = fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
    toml::from_str(&text).with_context(|| format!("{} is not a valid run state", p.display()))
}

/// The tensors of a checkpoint file; one with a non-finite value is refused (the file
/// is corrupt: saves refuse them).
fn load_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    if !path.is_file() {
        bail!("{} is missing", path.display());
    }
    let tensors = candle_core::safetensors::load(path, device)
        .with_context(|| format!("cannot read {} as safetensors", path.display()))?;
    if let Some((name, i, v)) = first_non_finite(&tensors)? {
        bail!(
            "{}: tensor `{name}` has a non-finite value ({v}) at index {i}: the file is corrupt",
            path.display()
        );
    }
    Ok(tensors)
}

/// Build the model of `settings` on `device` and load the weights file `path` (a
/// checkpoint's `model.safetensors` or `ema.safetensors`) into it; the model returned
/// records no autograd graph (inference), and its weight normalisation is computed
/// once here rather than in every batch (`RealNvp::fix_weights`: the parameters do
/// not change after loading).
pub fn load_model(
    path: &Path,
    settings: &Settings,
    device: &Device,
) -> Result<(ParamStore, RealNvp)> {
    let (store, _trainable) = crate::model::build_for_inference(settings, device)?;
    load_into(&store, path, device)?;
    let mut frozen = crate::model::frozen(settings, &store, device)?;
    frozen.fix_weights()?;
    Ok((store, frozen))
}

/// Overwrites every tensor of `store` from the weights file `path`.
pub fn load_into(store: &ParamStore, path: &Path, device: &Device) -> Result<()> {
    store
        .load_tensors(&load_tensors(path, device)?)
        .with_context(|| format!("{} does not fit the model of its config", path.display()))
}

/// The Adam moments of a checkpoint.
pub fn load_optimizer(ckpt_dir: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    load_tensors(&ckpt_dir.join(OPTIM_FILE), device)
}
