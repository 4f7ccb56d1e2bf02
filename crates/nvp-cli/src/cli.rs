//! Command-line interface (clap derive; the doc comments are the help).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::settings::Precision;

/// Real NVP normalizing flows: train, evaluate, sample, walk latent manifolds, compress
/// and relabel images, benchmark.
#[derive(Debug, Parser)]
#[command(name = "nvp", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train a model (with no --config: the embedded demo on procedural images).
    Train(TrainArgs),
    /// Bits/dim of a checkpoint on a dataset split, in evaluation mode.
    Eval(EvalArgs),
    /// Draw samples from a checkpoint into a PNG grid.
    Sample(SampleArgs),
    /// Decode the latent manifold spanned by four images (paper eq. 19), or the path
    /// between two.
    Interpolate(InterpolateArgs),
    /// Conceptual compression (paper App. D): keep the coarsest scales' latents of
    /// images, draw the rest from the prior, decode; one row per image.
    Compress(CompressArgs),
    /// Class-conditional models (paper App. F): encode images with their class, decode
    /// their latents with other classes; one row per image.
    Relabel(RelabelArgs),
    /// Training, evaluation and sampling throughput and peak memory of a config's model.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// TOML config (default: the embedded configs/demo.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Dataset folder (for CIFAR-10: the folder holding the .bin batches).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Run folder for checkpoints, samples and metrics (default: runs/NAME, NAME the config's name).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Stop after this many optimizer steps.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Stop after this many minutes of training (0: no time limit).
    #[arg(long)]
    pub minutes: Option<f64>,
    /// Seed of initialisation, shuffling, flips and dequantisation.
    #[arg(long)]
    pub seed: Option<u64>,
    /// `cpu` or `cuda` (`cuda:N`).
    #[arg(long)]
    pub device: Option<String>,
    /// Images per training batch.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// `f32`, or `bf16`: the convolutions' Winograd products in bf16 in training
    /// (CPUs with AVX512-BF16; evaluation and samples stay f32).
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Continue the run in --out from its last checkpoint, with its saved config
    /// (--max-steps, --minutes, --data and --device may change; a --config given
    /// again must match it).
    #[arg(long)]
    pub resume: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// Checkpoint: a run folder, a checkpoint folder, or a weights file inside one
    /// (`model.safetensors`, or the averaged `ema.safetensors`, the default when present).
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Dataset folder (default: the one in the checkpoint's config).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// `test` or `train`.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Evaluate only the first N images.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 256)]
    pub batch: usize,
    /// Seed of the dequantisation noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// `cpu` or `cuda`.
    #[arg(long)]
    pub device: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also decode the latents again and report the largest |f⁻¹(f(y)) − y|
    /// (logit space) over the evaluated images.
    #[arg(long)]
    pub check_inverse: bool,
    /// Class-conditional models: also score every image under every class, and report
    /// the bits/dim of the marginal p(x) = Σ_y p(x | y) / classes (uniform prior over
    /// the classes; exact) and the accuracy of the Bayes classifier argmax_y p(x | y).
    /// Costs `classes` evaluations (the img/s reported then covers all of them).
    #[arg(long)]
    pub classify: bool,
}

#[derive(Debug, Args)]
pub struct SampleArgs {
    /// Checkpoint: a run folder, a checkpoint folder, or a weights file inside one
    /// (`model.safetensors`, or the averaged `ema.safetensors`, the default when present).
    #[arg(long)]
    pub ckpt: PathBuf,
    /// Number of samples.
    #[arg(long, default_value_t = 64)]
    pub n: usize,
    /// Prior temperature T: z ~ N(0, T² I).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Seed of the latents drawn from the prior.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output PNG grid.
    #[arg(long)]
    pub out: PathBuf,
    /// Also write one PNG per sample into this folder.
    #[arg(long)]
    pub each: Option<PathBuf>,
    /// Class of every sample, for a class-conditional model (default: the classes in
    /// turn, sample i of class i mod classes).
    #[arg(long)]
    pub class: Option<u32>,
    /// Sample at another size than the model was trained at, `HxW` (e.g. `64x64` from a
    /// 32×32 model: paper App. C; the flow is fully convolutional). Both must be
    /// multiples of 2^(scales − 1).
    #[arg(long)]
    pub size: Option<String>,
    /// `cpu` or `cuda` (`cuda:N`).
    #[arg(long)]
    pub device: Option<String>,
}

/// The images `interpolate` and `compress` encode: files, or indices into a dataset.
#[derive(Debug, Args)]
pub struct ImageArgs {
    /// Image files (PNG/JPEG) of the model's size.
    #[arg(long, num_args = 1.., conflicts_with_all = ["data", "indices"])]
    pub images: Option<Vec<PathBuf>>,
    /// Dataset folder to take the images from (with --indices).
    #[arg(long, requires = "indices")]
    pub data: Option<PathBuf>,
    /// Comma-separated image indices into --split of the dataset.
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub indices: Option<Vec<usize>>,
    /// Split the indices refer to.
    #[arg(long, default_value = "test")]
    pub split: String,
}

#[derive(Debug, Args)]
pub struct CompressArgs {
    /// Checkpoint: a run folder, a checkpoint folder, or a weights file inside one
    /// (`model.safetensors`, or the averaged `ema.safetensors`, the default when present).
    #[arg(long)]
    pub ckpt: PathBuf,
    #[command(flatten)]
    pub src: ImageArgs,
    /// Temperature of the prior the discarded latents are drawn from.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Seed of the latents drawn from the prior.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The images' class, for a class-conditional model: needed with --images; with
    /// --indices the dataset's labels are used unless --class is given.
    #[arg(long)]
    pub class: Option<u32>,
    /// Output PNG: per image, the original, then the decodings that keep 100 %, 50 %,
    /// 25 %, … of the latents (one scale fewer each time).
    #[arg(long)]
    pub out: PathBuf,
    /// `cpu` or `cuda` (`cuda:N`).
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Debug, Args)]
pub struct RelabelArgs {
    /// Checkpoint: a run folder, a checkpoint folder, or a weights file inside one
    /// (`model.safetensors`, or the averaged `ema.safetensors`, the default when present).
    #[arg(long)]
    pub ckpt: PathBuf,
    #[command(flatten)]
    pub src: ImageArgs,
    /// The images' class: needed with --images; with --indices the dataset's labels are
    /// used unless --class is given.
    #[arg(long)]
    pub class: Option<u32>,
    /// Comma-separated classes to decode with, one column each (default: every class).
    #[arg(long, value_delimiter = ',', num_args = 1)]
    pub to: Option<Vec<u32>>,
    /// Output PNG: per image, the original, then its latents decoded with each class
    /// of --to.
    #[arg(long)]
    pub out: PathBuf,
    /// `cpu` or `cuda` (`cuda:N`).
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Debug, Args)]
pub struct InterpolateArgs {
    /// Checkpoint: a run folder, a checkpoint folder, or a weights file inside one
    /// (`model.safetensors`, or the averaged `ema.safetensors`, the default when present).
    #[arg(long)]
    pub ckpt: PathBuf,
    #[command(flatten)]
    pub src: ImageArgs,
    /// Grid side: steps × steps images (one row of steps with two images).
    #[arg(long, default_value_t = 8)]
    pub steps: usize,
    /// Output PNG.
    #[arg(long)]
    pub out: PathBuf,
    /// `cpu` or `cuda` (`cuda:N`).
    #[arg(long)]
    pub device: Option<String>,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// TOML config whose model is measured (default: the embedded demo).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Training batch size.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed training steps (after the warm-up).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Untimed warm-up training steps.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Evaluation batch size.
    #[arg(long, default_value_t = 256)]
    pub eval_batch: usize,
    /// Timed evaluation batches.
    #[arg(long, default_value_t = 3)]
    pub eval_reps: usize,
    /// Samples per timed sampling call.
    #[arg(long, default_value_t = 64)]
    pub sample_n: usize,
    /// Timed sampling calls.
    #[arg(long, default_value_t = 3)]
    pub sample_reps: usize,
    /// Extra training steps timed phase by phase (forward, backward, update; the device
    /// synchronised after each); 0 skips the split.
    #[arg(long, default_value_t = 3)]
    pub phase_steps: usize,
    /// `cpu` or `cuda` (`cuda:N`).
    #[arg(long)]
    pub device: Option<String>,
    /// Training precision, as `train --precision` (default: the config's).
    #[arg(long)]
    pub precision: Option<Precision>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}
