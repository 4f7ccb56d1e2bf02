//! Score images with a trained Real NVP checkpoint, using only the libraries
//! (no `nvp-cli`): the log-likelihood of each image in nats and in bits per
//! dimension.
//!
//! ```text
//! cargo run --release --example score -- CKPT_DIR IMAGE...
//! ```
//!
//! `CKPT_DIR` is a checkpoint folder (holding `model.safetensors` and
//! `config.toml`, as written by `nvp train`) or a run folder (its `last/`
//! checkpoint is used). Each `IMAGE` is a PNG or JPEG file of exactly the
//! model's size (grey and RGBA images are converted to RGB).
//!
//! Every image is dequantised with the midpoint noise `u = 0.5` (so the score
//! is deterministic) and mapped to logit space with the checkpoint's `α`;
//! then, with `D = C·H·W` and `ld_pre` the log-determinant of that
//! preprocessing (which includes the `−D·ln 256` term),
//!
//! * `log p(x) = log p(y) + ld_pre` (nats), `log p(y)` from the model in
//!   evaluation mode;
//! * `bits/dim = −log p(x) / (D·ln 2)`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use nvp::data::image_set::rgb_to_planar;
use nvp::data::{bits_per_dim, Dequantize, DEFAULT_ALPHA};
use nvp::flow::{Mode, ParamStore, RealNvp, RealNvpConfig};
use serde::Deserialize;

const MODEL_FILE: &str = "model.safetensors";
const CONFIG_FILE: &str = "config.toml";
/// Images scored per forward pass.
const CHUNK: usize = 32;

/// The parts of a checkpoint's `config.toml` this example needs; every other
/// key (run name, `[train]`, the other `[data]` settings) is ignored.
#[derive(Debug, Deserialize)]
struct CheckpointConfig {
    model: RealNvpConfig,
    #[serde(default)]
    data: DataConfig,
}

#[derive(Debug, Deserialize)]
struct DataConfig {
    /// The logit map's α.
    #[serde(default = "default_alpha")]
    alpha: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            alpha: DEFAULT_ALPHA,
        }
    }
}

fn default_alpha() -> f64 {
    DEFAULT_ALPHA
}

/// The checkpoint folder behind `path`: the folder itself if it holds the
/// weights, else a run folder's `last/` (or `last.old/`, left by a save that
/// was cut off).
fn resolve_checkpoint(path: &Path) -> Result<PathBuf> {
    ensure!(path.exists(), "{} does not exist", path.display());
    if path.is_file() {
        let dir = path.parent().unwrap_or(Path::new("."));
        ensure!(
            dir.join(MODEL_FILE).is_file(),
            "{} is not a checkpoint folder (nor a file inside one)",
            path.display()
        );
        return Ok(dir.to_path_buf());
    }
    for dir in [path.to_path_buf(), path.join("last"), path.join("last.old")] {
        if dir.join(MODEL_FILE).is_file() {
            return Ok(dir);
        }
    }
    bail!(
        "{} holds no checkpoint (expected {MODEL_FILE} in it, or a last/ folder from `nvp train`)",
        path.display()
    )
}

fn load_config(dir: &Path) -> Result<CheckpointConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let cfg: CheckpointConfig =
        toml::from_str(&text).with_context(|| format!("{} is not valid", path.display()))?;
    Ok(cfg)
}

/// Builds the model of `cfg` and loads the checkpoint's weights and
/// batch-norm statistics into it.
fn load_model(dir: &Path, cfg: &RealNvpConfig, device: &Device) -> Result<RealNvp> {
    // The seed does not matter: every tensor is overwritten by the checkpoint.
    let store = ParamStore::new(0);
    let model = RealNvp::new(cfg, store.var_builder(DType::F32, device))
        .context("cannot build the model of the checkpoint's config")?;
    let path = dir.join(MODEL_FILE);
    let tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&path, device)
        .with_context(|| format!("cannot read {}", path.display()))?;
    store
        .load_tensors(&tensors)
        .with_context(|| format!("{} does not fit the model", path.display()))?;
    Ok(model)
}

/// Planar `C × H × W` pixels of an image file, checked against the model's size.
fn read_pixels(path: &Path, cfg: &RealNvpConfig) -> Result<Vec<u8>> {
    let img = nvp::data::folder::decode_rgb(path)?;
    let (w, h) = img.dimensions();
    ensure!(
        (w as usize, h as usize) == (cfg.width, cfg.height),
        "{} is {w}×{h} pixels, the model takes {}×{} images",
        path.display(),
        cfg.width,
        cfg.height
    );
    let mut out = Vec::with_capacity(cfg.dims());
    match cfg.channels {
        3 => rgb_to_planar(&img, &mut out),
        1 => out.extend(image::DynamicImage::ImageRgb8(img).to_luma8().into_raw()),
        c => bail!("cannot score images for a model with {c} channels (1 or 3 expected)"),
    }
    Ok(out)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 2 || args.iter().any(|a| a == "-h" || a == "--help") {
        eprintln!("usage: cargo run --release --example score -- CKPT_DIR IMAGE...");
        std::process::exit(2);
    }
    let dir = resolve_checkpoint(Path::new(&args[0]))?;
    let cfg = load_config(&dir)?;
    let device = Device::cuda_if_available(0)?;
    let model = load_model(&dir, &cfg.model, &device)?;
    let deq = Dequantize::new(cfg.data.alpha).context("data.alpha of the checkpoint")?;
    let m = &cfg.model;
    let dims = model.dims();
    println!(
        "checkpoint {}: {}×{}×{} images, {} scales, {} couplings, α = {}",
        dir.display(),
        m.channels,
        m.height,
        m.width,
        m.scales,
        model.num_couplings(),
        cfg.data.alpha
    );

    let images: Vec<PathBuf> = args[1..].iter().map(PathBuf::from).collect();
    let noise = vec![0.5f64; dims];
    let (mut sum_nats, mut sum_bpd) = (0.0, 0.0);
    for chunk in images.chunks(CHUNK) {
        // Dequantise (u = 0.5) and apply the logit map, image by image.
        let mut y = vec![0f32; chunk.len() * dims];
        let mut ld_pre = Vec::with_capacity(chunk.len());
        for (path, out) in chunk.iter().zip(y.chunks_exact_mut(dims)) {
            let pixels = read_pixels(path, m)?;
            ld_pre.push(deq.apply_with_noise(&pixels, &noise, out)?);
        }
        let y = Tensor::from_vec(y, (chunk.len(), m.channels, m.height, m.width), &device)?;
        let log_p_y: Vec<f64> = model
            .log_prob(&y, Mode::Eval)?
            .to_dtype(DType::F64)?
            .to_vec1()?;
        for ((path, lp), ld) in chunk.iter().zip(&log_p_y).zip(&ld_pre) {
            let nats = lp + ld;
            let bpd = bits_per_dim(*lp, *ld, dims);
            println!(
                "{}: log p(x) = {nats:.2} nats, {bpd:.4} bits/dim",
                path.display()
            );
            sum_nats += nats;
            sum_bpd += bpd;
        }
    }
    if images.len() > 1 {
        let n = images.len() as f64;
        println!(
            "mean over {} images: log p(x) = {:.2} nats, {:.4} bits/dim",
            images.len(),
            sum_nats / n,
            sum_bpd / n
        );
    }
    Ok(())
}
