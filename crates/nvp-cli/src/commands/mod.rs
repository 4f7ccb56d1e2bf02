//! One module per subcommand.

mod bench;
mod compress;
mod eval;
mod interpolate;
mod relabel;
mod sample;
mod train;

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use nvp_data::Dequantize;
use nvp_data::Split;
use nvp_flow::{ParamStore, RealNvp};

use crate::cli::{Command, ImageArgs};
use crate::settings::{open_device, Settings};

pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Sample(a) => sample::run(a),
        Command::Interpolate(a) => interpolate::run(a),
        Command::Compress(a) => compress::run(a),
        Command::Relabel(a) => relabel::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

/// A trained model from `--ckpt`, its settings and its device.
pub(crate) struct Loaded {
    pub settings: Settings,
    pub device: Device,
    #[allow(dead_code)]
    pub store: ParamStore,
    pub model: RealNvp,
    /// The weights file loaded (`model.safetensors` or `ema.safetensors`).
    pub weights: std::path::PathBuf,
}

pub(crate) fn load(ckpt: &Path, device: Option<&str>) -> Result<Loaded> {
    load_with(ckpt, device, |_| Ok(()))
}

/// [`load`], with the saved settings changed by `edit` before the model is built
/// (e.g. another image size: the weights do not depend on it).
pub(crate) fn load_with(
    ckpt: &Path,
    device: Option<&str>,
    edit: impl FnOnce(&mut Settings) -> Result<()>,
) -> Result<Loaded> {
    let dir = crate::checkpoint::resolve(ckpt)?;
    let mut settings = crate::checkpoint::load_settings(&dir)?;
    edit(&mut settings)?;
    let device = open_device(device.unwrap_or("cpu"))?;
    let weights = crate::checkpoint::weights_file(ckpt, &dir);
    let (store, model) = crate::checkpoint::load_model(&weights, &settings, &device)?;
    Ok(Loaded {
        settings,
        device,
        store,
        model,
        weights,
    })
}

/// Images read by [`read_images`]: planar u8 of the model's size, one after the other,
/// and their labels where the dataset has them (none for image files).
pub(crate) struct Images {
    pub pixels: Vec<u8>,
    pub labels: Option<Vec<u32>>,
}

/// The images of `src`. `count` checks how many were given (`--images` or `--indices`
/// naming the flag), `missing` is the error when neither was.
pub(crate) fn read_images(
    l: &mut Loaded,
    src: &ImageArgs,
    count: impl Fn(&str, usize) -> Result<()>,
    missing: &str,
) -> Result<Images> {
    let m = l.settings.model.clone();
    let d = m.dims();
    match (&src.images, &src.indices) {
        (Some(files), _) => {
            count("--images", files.len())?;
            let mut v = Vec::with_capacity(files.len() * d);
            for f in files {
                let img = nvp_data::folder::decode_rgb(f)
                    .with_context(|| format!("cannot read image {}", f.display()))?;
                if (img.height() as usize, img.width() as usize) != (m.height, m.width)
                    || m.channels != 3
                {
                    bail!(
                        "image {} is {}×{} but the model takes {}×{}×{} (C×H×W)",
                        f.display(),
                        img.width(),
                        img.height(),
                        m.channels,
                        m.height,
                        m.width
                    );
                }
                nvp_data::image_set::rgb_to_planar(&img, &mut v);
            }
            Ok(Images {
                pixels: v,
                labels: None,
            })
        }
        (None, Some(idx)) => {
            count("--indices", idx.len())?;
            if let Some(p) = &src.data {
                l.settings.data.path = Some(p.clone());
            }
            let set = crate::data::open(&l.settings, parse_split(&src.split)?)?;
            let mut v = vec![0u8; idx.len() * d];
            let mut labels = Vec::with_capacity(idx.len());
            for (&i, out) in idx.iter().zip(v.chunks_exact_mut(d)) {
                if i >= set.len() {
                    bail!(
                        "--indices: image {i} is out of range (the {} split has {} images)",
                        src.split,
                        set.len()
                    );
                }
                let label = set
                    .read_into(i, 0, out)
                    .with_context(|| format!("--indices: reading image {i}"))?;
                labels.extend(label);
            }
            let labelled = labels.len() == idx.len();
            Ok(Images {
                pixels: v,
                labels: labelled.then_some(labels),
            })
        }
        (None, None) => bail!("{missing}"),
    }
}

/// [`read_images`] for commands that take any number of images, at least one.
pub(crate) fn read_some_images(l: &mut Loaded, src: &ImageArgs, missing: &str) -> Result<Images> {
    read_images(
        l,
        src,
        |what, n| match n {
            0 => bail!("{what} needs at least one image"),
            _ => Ok(()),
        },
        missing,
    )
}

/// The labels a class-conditional model encodes `n` images with: `--class` for all of
/// them, else the dataset's (`--indices`); `None` for an unconditional model (which
/// refuses `--class`).
pub(crate) fn image_labels(
    l: &Loaded,
    dataset: Option<Vec<u32>>,
    class: Option<u32>,
    n: usize,
) -> Result<Option<Vec<u32>>> {
    match (l.model.is_conditional(), dataset, class) {
        (false, _, Some(_)) => bail!("--class: the model is not class-conditional"),
        (false, _, None) => Ok(None),
        (true, _, Some(c)) => Ok(Some(vec![c; n])),
        (true, Some(ls), None) => Ok(Some(ls)),
        (true, None, None) => bail!(
            "the model is class-conditional (model.classes = {}): give the images' class \
             with --class, or take labelled images with --data/--indices",
            l.settings.model.classes
        ),
    }
}

/// 8-bit images (planar, the model's size) in logit space with the midpoint
/// dequantisation `u = 0.5`: deterministic, for encoding given images.
pub(crate) fn midpoint_logits(l: &Loaded, pixels: &[u8]) -> Result<Tensor> {
    let m = &l.settings.model;
    let d = m.dims();
    let n = pixels.len() / d;
    let deq = Dequantize::new(l.settings.data.alpha)?;
    let mut y = vec![0f32; n * d];
    let half = vec![0.5; d];
    for (px, out) in pixels.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        deq.apply_with_noise(px, &half, out)?;
    }
    Ok(Tensor::from_vec(
        y,
        (n, m.channels, m.height, m.width),
        &l.device,
    )?)
}

pub(crate) fn parse_split(s: &str) -> Result<Split> {
    match s {
        "test" => Ok(Split::Test),
        "train" => Ok(Split::Train),
        _ => bail!("--split must be `test` or `train`, got `{s}`"),
    }
}
