//! Opening the configured dataset as u8 images: in memory, or (image folders and
//! ImageNet archives with `data.stream = true`) read by the loader's workers as batches
//! need them.

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use nvp_data::folder::{read_folder, FolderOptions, OnError, Preprocess};
use nvp_data::imagenet::{read_imagenet, ImagenetOptions, StreamedImagenet};
use nvp_data::{ImageSource, Procedural, ProceduralConfig, Split, StreamedFolder};

use crate::settings::{DatasetKind, FolderPreprocess, Settings};

/// Seed stream of the procedural test split (distinct from the train split).
const PROCEDURAL_TEST_SEED: u64 = 0x7e57;

/// Open `split` of the configured dataset and check it fits the model.
pub fn open(s: &Settings, split: Split) -> Result<Arc<dyn ImageSource>> {
    let d = &s.data;
    let set = match d.dataset {
        DatasetKind::Procedural => {
            if let Some(p) = &d.path {
                bail!(
                    "the dataset is procedural (generated, no files), but a data folder was given ({}): \
                     pass the config of a file dataset with --config (e.g. configs/cifar10.toml)",
                    p.display()
                );
            }
            if !(4..=1024).contains(&s.model.height) {
                bail!(
                    "the procedural dataset makes images of 4 to 1024 pixels a side, not {}",
                    s.model.height
                );
            }
            let gen = Procedural::new(ProceduralConfig {
                size: s.model.height,
                classes: d.classes,
            });
            match split {
                Split::Train => gen.generate(d.train_size, s.train.seed),
                Split::Test => gen.generate(d.test_size, s.train.seed ^ PROCEDURAL_TEST_SEED),
            }
        }
        DatasetKind::Cifar10 => {
            let p = path(s)?;
            nvp_data::cifar::read_cifar10(p, split)
                .with_context(|| format!("reading CIFAR-10 from {}", p.display()))?
        }
        DatasetKind::Imagenet => {
            let p = path(s)?;
            let opts = ImagenetOptions {
                size: Some(s.model.height),
                ..ImagenetOptions::default()
            };
            if d.stream {
                let f = StreamedImagenet::open(p, split, &opts)
                    .with_context(|| format!("opening ImageNet at {}", p.display()))?;
                check_fits(s, &f, split)?;
                return Ok(Arc::new(f));
            }
            read_imagenet(p, split, &opts)
                .with_context(|| format!("reading ImageNet from {}", p.display()))?
        }
        DatasetKind::Folder => {
            let p = path(s)?;
            let preprocess = match d.preprocess {
                FolderPreprocess::AsIs => Preprocess::AsIs,
                FolderPreprocess::Celeba => Preprocess::CelebA,
                FolderPreprocess::Lsun => Preprocess::Lsun {
                    train: split == Split::Train,
                },
                FolderPreprocess::Resize => Preprocess::ResizeCrop {
                    size: s.model.height as u32,
                },
            };
            let opts = FolderOptions {
                preprocess,
                on_error: if d.skip_bad_images {
                    OnError::Skip
                } else {
                    OnError::Fail
                },
                class_subfolders: d.class_subfolders,
                holdout_fraction: d.holdout,
                split_seed: s.train.seed,
                crop_seed: s.train.seed,
                threads: 0,
            };
            if d.stream {
                let f = StreamedFolder::open(p, split, &opts)
                    .with_context(|| format!("opening the image folder {}", p.display()))?;
                check_class_count(s, p, f.class_names())?;
                check_fits(s, &f, split)?;
                return Ok(Arc::new(f));
            }
            let fs = read_folder(p, split, &opts)
                .with_context(|| format!("reading images from {}", p.display()))?;
            check_class_count(s, p, &fs.class_names)?;
            if fs.skipped > 0 {
                eprintln!(
                    "warning: skipped {} unreadable image(s) in {}",
                    fs.skipped,
                    p.display()
                );
            }
            fs.images
        }
    };
    check_fits(s, &set, split)?;
    Ok(Arc::new(set))
}

fn path(s: &Settings) -> Result<&std::path::Path> {
    match &s.data.path {
        Some(p) => Ok(p.as_path()),
        None => bail!("data.path is not set: give the dataset with --data DIR"),
    }
}

/// A class-conditional model must have a class for each of the folder's class
/// sub-folders (refused here, before training, rather than at the first batch).
fn check_class_count(s: &Settings, dir: &std::path::Path, names: &[String]) -> Result<()> {
    let k = s.model.classes;
    if k > 0 && names.len() > k {
        bail!(
            "{} has {} class sub-folders ({}{}), but model.classes = {k}: set model.classes = {}",
            dir.display(),
            names.len(),
            names[..names.len().min(4)].join(", "),
            if names.len() > 4 { ", …" } else { "" },
            names.len()
        );
    }
    Ok(())
}

/// The images must have the model's shape.
pub fn check_fits(s: &Settings, set: &dyn ImageSource, split: Split) -> Result<()> {
    let m = &s.model;
    let (c, h, w) = set.shape();
    if (c, h, w) != (m.channels, m.height, m.width) {
        bail!(
            "the {split:?} images are {c}×{h}×{w} (C×H×W) but the model expects {}×{}×{}",
            m.channels,
            m.height,
            m.width
        );
    }
    if set.is_empty() {
        bail!("the {split:?} split of the dataset is empty");
    }
    Ok(())
}
