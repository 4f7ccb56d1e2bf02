//! Score images with a trained Real NVP checkpoint, using only the libraries
//! (no `nvp-cli`): each image's negative log-likelihood bound in nats and in bits
//! per dimension, the quantity `nvp eval` averages over a split.
//!
//! ```text
//! cargo run --release --example score -- CKPT_DIR IMAGE... [--draws K] [--seed N]
//! ```
//!
//! `CKPT_DIR` is a checkpoint folder (holding `model.safetensors` and
//! `config.toml`, as written by `nvp train`) or a run folder (its `last/`
//! checkpoint is used). Each `IMAGE` is a PNG or JPEG file of exactly the
//! model's size (grey and RGBA images are converted to RGB).
//!
//! Dequantisation as in training and `nvp eval`: every sub-pixel gets uniform
//! noise, `x = pixel + u`, `u ~ U[0, 1)`, drawn from a generator seeded by
//! `--seed` (default 0), the image's position in the argument list and the draw
//! (so a score does not depend on the other images); then the logit map with the
//! checkpoint's `α`. With `D = C·H·W` and `ld_pre` the log-determinant of that
//! preprocessing (which includes the `−D·ln 256` term), one draw gives
//!
//! * `log p(x + u) = log p(y) + ld_pre` (nats), `log p(y)` from the model in
//!   evaluation mode — the model's density at the dequantised point, in pixel
//!   units;
//! * `bits/dim = −log p(x + u) / (D·ln 2)`.
//!
//! Each printed score is the mean over `--draws` (default 1) such draws: a Monte
//! Carlo estimate of the dequantisation bound `E_u[−log p(x + u)]/(D·ln 2)`, which
//! is at least the model's `−log₂ P(pixels)/D` for the discrete image (Jensen).
//! `nvp eval` reports this bound with one draw per image, averaged over a split
//! (its noise comes from its own seeded stream, so single-image numbers differ from
//! it by the noise's spread, not in expectation).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use nvp::data::image_set::rgb_to_planar;
use nvp::data::seed::mix_seed2;
use nvp::data::{bits_per_dim, Dequantize, DEFAULT_ALPHA};
use nvp::flow::{Mode, ParamStore, RealNvp, RealNvpConfig};
use rand::rngs::StdRng;
use rand::SeedableRng;
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

const USAGE: &str =
    "usage: cargo run --release --example score -- CKPT_DIR IMAGE... [--draws K] [--seed N]";

/// Command-line arguments.
struct Args {
    ckpt: PathBuf,
    images: Vec<PathBuf>,
    draws: usize,
    seed: u64,
}

fn parse_args() -> Result<Args> {
    let mut positional = Vec::new();
    let (mut draws, mut seed) = (1usize, 0u64);
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "-h" | "--help" => {
                eprintln!("{USAGE}");
                std::process::exit(2);
            }
            "--draws" => {
                let v = it.next().context("--draws needs a value")?;
                draws = v.parse().with_context(|| format!("--draws {v}"))?;
                ensure!(draws > 0, "--draws must be at least 1");
            }
            "--seed" => {
                let v = it.next().context("--seed needs a value")?;
                seed = v.parse().with_context(|| format!("--seed {v}"))?;
            }
            s if s.starts_with("--") => bail!("unknown option {s}\n{USAGE}"),
            _ => positional.push(PathBuf::from(a)),
        }
    }
    if positional.len() < 2 {
        eprintln!("{USAGE}");
        std::process::exit(2);
    }
    let ckpt = positional.remove(0);
    Ok(Args {
        ckpt,
        images: positional,
        draws,
        seed,
    })
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let dir = resolve_checkpoint(&args.ckpt)?;
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
    println!(
        "dequantisation x = pixel + u, u ~ U[0, 1) (seed {}); each score is the mean over {} \
         draw(s) of u of log p(x + u) and of −log p(x + u)/(D·ln 2), D = {dims}: an estimate \
         of the dequantisation bound on bits/dim that `nvp eval` reports",
        args.seed, args.draws
    );

    let images = &args.images;
    let (mut sum_nats, mut sum_bpd) = (0.0, 0.0);
    for (c, chunk) in images.chunks(CHUNK).enumerate() {
        let pixels = chunk
            .iter()
            .map(|path| read_pixels(path, m))
            .collect::<Result<Vec<_>>>()?;
        let (mut nats, mut bpd) = (vec![0.0; chunk.len()], vec![0.0; chunk.len()]);
        for draw in 0..args.draws {
            // Dequantise with fresh noise and apply the logit map, image by image.
            let mut y = vec![0f32; chunk.len() * dims];
            let mut ld_pre = Vec::with_capacity(chunk.len());
            for (j, (px, out)) in pixels.iter().zip(y.chunks_exact_mut(dims)).enumerate() {
                let index = (c * CHUNK + j) as u64;
                let mut rng = StdRng::seed_from_u64(mix_seed2(args.seed, index, draw as u64));
                ld_pre.push(deq.apply(px, &mut rng, out)?);
            }
            let y = Tensor::from_vec(y, (chunk.len(), m.channels, m.height, m.width), &device)?;
            let log_p_y: Vec<f64> = model
                .log_prob(&y, Mode::Eval)?
                .to_dtype(DType::F64)?
                .to_vec1()?;
            for (j, (lp, ld)) in log_p_y.iter().zip(&ld_pre).enumerate() {
                nats[j] += (lp + ld) / args.draws as f64;
                bpd[j] += bits_per_dim(*lp, *ld, dims) / args.draws as f64;
            }
        }
        for ((path, n), b) in chunk.iter().zip(&nats).zip(&bpd) {
            println!(
                "{}: log p(x + u) = {n:.2} nats, {b:.4} bits/dim",
                path.display()
            );
            sum_nats += n;
            sum_bpd += b;
        }
    }
    if images.len() > 1 {
        let n = images.len() as f64;
        println!(
            "mean over {} images: log p(x + u) = {:.2} nats, {:.4} bits/dim",
            images.len(),
            sum_nats / n,
            sum_bpd / n
        );
    }
    Ok(())
}
