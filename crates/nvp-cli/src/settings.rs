//! Run settings: the TOML file (serde structs with `deny_unknown_fields`,
//! kebab-case keys, explicit defaults), command-line overrides, and
//! validation into one [`Settings`] value. The resolved settings are saved
//! beside every checkpoint and reloaded by `eval`, `sample` and `interpolate`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use nvp_flow::RealNvpConfig;
use serde::{Deserialize, Serialize};

/// The embedded demo configuration (`configs/demo.toml`).
pub const DEMO_TOML: &str = include_str!("../../../configs/demo.toml");

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// A name for the run (default output folder `runs/<name>`).
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default)]
    pub data: DataSettings,
    #[serde(default)]
    pub model: RealNvpConfig,
    #[serde(default)]
    pub train: TrainSettings,
}

fn default_name() -> String {
    "run".into()
}

/// Which dataset and how to read it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct DataSettings {
    /// `cifar10`, `folder`, `imagenet` or `procedural`.
    pub dataset: DatasetKind,
    /// Folder (or file, for ImageNet) holding the data; not used by `procedural`.
    pub path: Option<PathBuf>,
    /// Image folders: `as-is`, `celeba`, `lsun` or `resize`.
    pub preprocess: FolderPreprocess,
    /// Image folders: fraction held out as the test split.
    pub holdout: f64,
    /// Image folders: skip unreadable images (counted) instead of failing.
    pub skip_bad_images: bool,
    /// Image folders: sub-folders are classes.
    pub class_subfolders: bool,
    /// Image folders and ImageNet: read the images as batches need them (in the
    /// loader's workers) instead of all at start — for datasets larger than memory
    /// (LSUN, ImageNet 64); the LSUN training crop is then drawn anew each epoch.
    pub stream: bool,
    /// Random horizontal flips in training.
    pub flip: bool,
    /// Logit α.
    pub alpha: f64,
    /// Procedural: training and test images.
    pub train_size: usize,
    pub test_size: usize,
    /// Procedural: number of shape classes (1–4).
    pub classes: usize,
    /// Test images used for the periodic test bits/dim (0 = all).
    pub test_limit: usize,
}

impl Default for DataSettings {
    fn default() -> Self {
        Self {
            dataset: DatasetKind::Cifar10,
            path: None,
            preprocess: FolderPreprocess::AsIs,
            holdout: 0.05,
            skip_bad_images: false,
            class_subfolders: false,
            stream: false,
            flip: true,
            alpha: 0.05,
            train_size: 4096,
            test_size: 512,
            classes: 4,
            test_limit: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    Cifar10,
    Folder,
    Imagenet,
    Procedural,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FolderPreprocess {
    AsIs,
    Celeba,
    Lsun,
    Resize,
}

/// Optimisation and bookkeeping.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainSettings {
    pub batch_size: usize,
    /// Adam learning rate.
    pub lr: f64,
    /// Warm-up: step `t` (from 1) uses `lr · min(1, t / lr-warmup)`, a linear ramp
    /// over the first `lr-warmup` steps (0 = none).
    pub lr_warmup: u64,
    /// Polyak averaging: keep an exponential moving average of the parameters with
    /// this decay (e.g. 0.999; 0 = off), used for the periodic evaluation and samples
    /// and saved as `ema.safetensors`, which `eval`, `sample`, … load by default.
    pub ema: f64,
    /// L2 penalty on the scale parameters (weight-norm gains, tanh scales).
    pub l2: f64,
    /// Gradient-norm clipping threshold (0 = off).
    pub clip: f64,
    /// Stop after this many optimizer steps.
    pub max_steps: u64,
    /// Stop after this many minutes of training (0 = no limit).
    pub minutes: f64,
    /// Every this many steps: test bits/dim, samples, metrics row, checkpoint.
    pub eval_every: u64,
    /// Between evaluations, save the `last` checkpoint every this many minutes of
    /// wall time (0 = only at evaluations).
    pub checkpoint_minutes: f64,
    /// Images in the periodic sample grid.
    pub samples: usize,
    /// Temperature of the periodic samples.
    pub temperature: f64,
    pub seed: u64,
    /// Stop after this many non-finite steps in a row.
    pub max_bad_steps: u32,
    /// `cpu` or `cuda`.
    pub device: String,
    /// Background loader threads.
    pub workers: usize,
    /// Evaluation batch size.
    pub eval_batch_size: usize,
    /// Arithmetic of the training step's convolutions: `f32`, or `bf16` — the
    /// Winograd products of the forward pass and input gradients in bf16 with f32
    /// sums (CPUs with AVX512-BF16; a training option like PyTorch's autocast:
    /// evaluation, sampling and the reported test bits/dim stay f32).
    pub precision: Precision,
}

/// See [`TrainSettings::precision`].
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// The name in the config file and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        [Self::F32, Self::Bf16]
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| anyhow::anyhow!("precision must be `f32` or `bf16`, got `{s}`"))
    }
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            batch_size: 64,
            lr: 1e-3,
            lr_warmup: 0,
            ema: 0.0,
            l2: 5e-5,
            clip: 100.0,
            max_steps: 100_000,
            minutes: 0.0,
            eval_every: 500,
            checkpoint_minutes: 10.0,
            samples: 64,
            temperature: 0.7,
            seed: 0,
            max_bad_steps: 20,
            device: "cpu".into(),
            workers: 1,
            eval_batch_size: 256,
            precision: Precision::F32,
        }
    }
}

/// Overrides from the command line (`None` keeps the file's value).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub data: Option<PathBuf>,
    pub max_steps: Option<u64>,
    pub minutes: Option<f64>,
    pub seed: Option<u64>,
    pub device: Option<String>,
    pub batch_size: Option<usize>,
    pub precision: Option<Precision>,
}

impl Settings {
    /// Parse TOML text; `origin` names the file in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let s: Settings = toml::from_str(text).map_err(|e| {
            anyhow::anyhow!(
                "{origin}: {}",
                e.to_string().trim_end().replace('\n', "\n  ")
            )
        })?;
        Ok(s)
    }

    /// Read a config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// The embedded demo.
    pub fn demo() -> Self {
        Self::from_toml(DEMO_TOML, "configs/demo.toml (embedded)").expect("embedded demo config")
    }

    pub fn apply(&mut self, o: &Overrides) {
        if let Some(d) = &o.data {
            self.data.path = Some(d.clone());
        }
        if let Some(v) = o.max_steps {
            self.train.max_steps = v;
        }
        if let Some(v) = o.minutes {
            self.train.minutes = v;
        }
        if let Some(v) = o.seed {
            self.train.seed = v;
        }
        if let Some(v) = &o.device {
            self.train.device = v.clone();
        }
        if let Some(v) = o.batch_size {
            self.train.batch_size = v;
        }
        if let Some(v) = o.precision {
            self.train.precision = v;
        }
    }

    /// Check every value; errors name the key.
    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty() || self.name.starts_with('.') || self.name.contains(['/', '\\']) {
            bail!(
                "name = {:?}: the run's name becomes the folder runs/<name>; use a plain name (no path separators, not starting with '.')",
                self.name
            );
        }
        self.model.validate()?;
        let t = &self.train;
        if t.batch_size == 0 {
            bail!("train.batch-size must be at least 1");
        }
        if t.eval_batch_size == 0 {
            bail!("train.eval-batch-size must be at least 1");
        }
        if !(t.lr.is_finite() && t.lr > 0.0) {
            bail!("train.lr must be a positive number, got {}", t.lr);
        }
        if !(0.0..1.0).contains(&t.ema) {
            bail!("train.ema must be in [0, 1) (0 = off), got {}", t.ema);
        }
        if !(t.l2.is_finite() && t.l2 >= 0.0) {
            bail!("train.l2 must be ≥ 0, got {}", t.l2);
        }
        if !(t.clip.is_finite() && t.clip >= 0.0) {
            bail!("train.clip must be ≥ 0 (0 = off), got {}", t.clip);
        }
        if !(t.minutes.is_finite() && t.minutes >= 0.0) {
            bail!("train.minutes must be ≥ 0, got {}", t.minutes);
        }
        if !(t.checkpoint_minutes.is_finite() && t.checkpoint_minutes >= 0.0) {
            bail!(
                "train.checkpoint-minutes must be ≥ 0 (0 = only at evaluations), got {}",
                t.checkpoint_minutes
            );
        }
        if t.eval_every == 0 {
            bail!("train.eval-every must be at least 1");
        }
        if !(t.temperature.is_finite() && t.temperature >= 0.0) {
            bail!("train.temperature must be ≥ 0, got {}", t.temperature);
        }
        if t.workers == 0 {
            bail!("train.workers must be at least 1");
        }
        if t.max_bad_steps == 0 {
            bail!("train.max-bad-steps must be at least 1");
        }
        parse_device_name(&t.device)?;
        let d = &self.data;
        if !(d.alpha > 0.0 && d.alpha < 0.5) {
            bail!(
                "data.alpha must be in (0, 0.5) (0 would send pixel 0 to an infinite logit), got {}",
                d.alpha
            );
        }
        if !(0.0..1.0).contains(&d.holdout) {
            bail!("data.holdout must be in [0, 1), got {}", d.holdout);
        }
        if d.dataset != DatasetKind::Procedural && d.path.is_none() {
            bail!(
                "data.path is not set: give the dataset folder with --data DIR or `path` in [data]"
            );
        }
        if d.stream && !matches!(d.dataset, DatasetKind::Folder | DatasetKind::Imagenet) {
            bail!("data.stream applies to image folders and ImageNet archives (dataset = \"folder\" or \"imagenet\") only");
        }
        if d.dataset == DatasetKind::Procedural {
            if self.model.height != self.model.width {
                bail!("the procedural dataset makes square images: model.height must equal model.width");
            }
            if self.model.channels != 3 {
                bail!("the procedural dataset makes RGB images: model.channels must be 3");
            }
            if d.train_size == 0 || d.test_size == 0 {
                bail!("data.train-size and data.test-size must be at least 1");
            }
        }
        // A class-conditional model needs labels, all of them below model.classes.
        let k = self.model.classes;
        if k > 0 {
            let needs = |name: &str, n: usize| -> Result<()> {
                if k < n {
                    bail!(
                        "model.classes = {k}, but {name} has {n} classes: set model.classes = {n}"
                    );
                }
                Ok(())
            };
            match d.dataset {
                DatasetKind::Cifar10 => needs("CIFAR-10", 10)?,
                DatasetKind::Imagenet => needs("ImageNet", 1000)?,
                DatasetKind::Procedural => {
                    needs("the procedural dataset (data.classes)", d.classes)?
                }
                DatasetKind::Folder if !d.class_subfolders => bail!(
                    "model.classes = {k} needs labelled images: set data.class-subfolders = true \
                     (one sub-folder per class)"
                ),
                DatasetKind::Folder => {}
            }
        }
        Ok(())
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }
}

/// `cpu` or `cuda` / `cuda:N`.
pub fn parse_device_name(s: &str) -> Result<Option<usize>> {
    match s {
        "cpu" => Ok(None),
        "cuda" => Ok(Some(0)),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Some(i)),
            _ => bail!("unknown device `{s}`: use `cpu`, `cuda` or `cuda:N`"),
        },
    }
}

/// Open the device named in the settings, with a clear error when CUDA is
/// not compiled in or not present.
pub fn open_device(name: &str) -> Result<candle_core::Device> {
    match parse_device_name(name)? {
        None => Ok(candle_core::Device::Cpu),
        Some(i) => {
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {name}: this nvp was built without CUDA support (rebuild with `--features cuda`, see scripts/build-cuda.sh)");
            }
            let device = candle_core::Device::new_cuda(i)
                .with_context(|| format!("--device {name}: no usable CUDA GPU {i}"))?;
            // With NVP_CUDA_KEEP_FREED=1, freed memory stays in the pool for the next step.
            nvp_kernels::keep_freed_cuda_memory(&device)
                .with_context(|| format!("--device {name}: setting up the memory pool"))?;
            Ok(device)
        }
    }
}
