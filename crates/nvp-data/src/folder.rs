//! Image folders (PNG / JPEG / WebP), read recursively in sorted, deterministic order, with the
//! paper's preprocessing presets (CelebA, LSUN) and a generic resize-and-crop.
//!
//! - Files whose extension is `png`, `jpg`, `jpeg` or `webp` (any case) are read (WebP
//!   is what LSUN's export tool writes); names starting
//!   with `.` are ignored. Grey and RGBA images become RGB (alpha is dropped).
//! - With `class_subfolders`, each immediate sub-folder of the root is a class (labels in
//!   sorted folder-name order) and every image must lie inside one.
//! - A train / test split is made from a held-out fraction of the sorted file list, by a
//!   seeded shuffle ([`crate::image_set::holdout_indices`]); only the chosen split's files
//!   are decoded.
//! - Unreadable images either stop the read with an error naming the file
//!   ([`OnError::Fail`]) or are skipped and counted ([`OnError::Skip`]).
//! - LSUN training crops are random but seeded per file (by its index in the sorted list),
//!   so a folder always gives the same images for a seed. [`read_folder`] draws the crop
//!   once, at load time (epoch 0's crop); [`crate::streamed::StreamedFolder`], which
//!   decodes files as batches need them, draws a new one each epoch ([`crop_rng`]).

use crate::error::{Error, Result};
use crate::image_set::{holdout_indices, rgb_to_planar, ImageSet, Split};
use crate::seed::mix_seed2;
use image::imageops::{self, FilterType};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};

/// CelebA: side of the central crop.
pub const CELEBA_CROP: u32 = 148;
/// CelebA and LSUN: output side.
pub const OUTPUT_SIDE: u32 = 64;
/// LSUN: the smaller side after the first resize.
pub const LSUN_RESIZE: u32 = 96;

/// Deepest folder nesting followed (guards against symbolic-link loops).
const MAX_DEPTH: usize = 64;

/// How each image is brought to a common size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preprocess {
    /// Keep the images as they are; they must all have the same size.
    AsIs,
    /// CelebA (paper): central 148×148 crop (smaller if the image is smaller), resized to
    /// 64×64.
    CelebA,
    /// LSUN (paper): resize so that the smaller side is 96 px, then a 64×64 crop — random
    /// (seeded) for training, central for evaluation.
    Lsun {
        /// Random crop when true, central crop when false.
        train: bool,
    },
    /// Resize so that the smaller side is `size`, then a central `size × size` crop.
    ResizeCrop {
        /// Output side.
        size: u32,
    },
}

/// What to do with an image that cannot be read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnError {
    /// Stop with an error naming the file.
    #[default]
    Fail,
    /// Skip it, and count it in [`FolderSet::skipped`].
    Skip,
}

/// Options of [`read_folder`].
#[derive(Clone, Debug, PartialEq)]
pub struct FolderOptions {
    /// Size preset.
    pub preprocess: Preprocess,
    /// Unreadable images: fail or skip.
    pub on_error: OnError,
    /// Use the root's sub-folders as classes.
    pub class_subfolders: bool,
    /// Fraction of the files held out as the test split, in `[0, 1]`.
    pub holdout_fraction: f64,
    /// Seed of the train / test partition.
    pub split_seed: u64,
    /// Seed of the random crops ([`Preprocess::Lsun`] with `train: true`).
    pub crop_seed: u64,
    /// Decoding threads; 0 means all available cores.
    pub threads: usize,
}

impl Default for FolderOptions {
    fn default() -> Self {
        FolderOptions {
            preprocess: Preprocess::AsIs,
            on_error: OnError::Fail,
            class_subfolders: false,
            holdout_fraction: 0.0,
            split_seed: 0,
            crop_seed: 0,
            threads: 0,
        }
    }
}

/// What [`read_folder`] returns.
#[derive(Clone, Debug)]
pub struct FolderSet {
    /// The images (3 channels), with labels when `class_subfolders` was set.
    pub images: ImageSet,
    /// The file of each image, in order.
    pub files: Vec<PathBuf>,
    /// Number of files skipped as unreadable ([`OnError::Skip`]).
    pub skipped: usize,
    /// The skipped files with the reason.
    pub skipped_files: Vec<(PathBuf, String)>,
    /// Class names (sub-folder names) in label order; empty without classes.
    pub class_names: Vec<String>,
}

fn is_image_name(p: &Path) -> bool {
    let hidden = p
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'));
    let ext_ok = p
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase())
        .is_some_and(|e| matches!(e.as_str(), "png" | "jpg" | "jpeg" | "webp"));
    !hidden && ext_ok
}

/// Appends the image files under `dir` to `out`. `seen` holds the canonical paths of
/// the folders listed so far: a folder reached again (through a symbolic link to it or
/// to one above it) is not listed twice, so link loops end and no image is counted twice
/// through linked folders.
fn walk(
    dir: &Path,
    depth: usize,
    seen: &mut std::collections::HashSet<PathBuf>,
    out: &mut Vec<PathBuf>,
) -> Result<()> {
    let canonical = std::fs::canonicalize(dir).map_err(|e| Error::io(dir, e))?;
    if !seen.insert(canonical) {
        return Ok(());
    }
    if depth > MAX_DEPTH {
        return Err(Error::arg(format!(
            "{}: folders nested deeper than {MAX_DEPTH} levels (a link loop?)",
            dir.display()
        )));
    }
    // In name order, so that of a folder and a link to it, the same one is listed
    // whatever order the file system returns them in.
    let mut paths = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .map(|e| e.map(|e| e.path()).map_err(|e| Error::io(dir, e)))
        .collect::<Result<Vec<_>>>()?;
    paths.sort();
    for path in paths {
        // follows symbolic links
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(_) => continue, // dangling link
        };
        if meta.is_dir() {
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if !hidden {
                walk(&path, depth + 1, seen, out)?;
            }
        } else if meta.is_file() && is_image_name(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// All PNG / JPEG / WebP files under `dir`, recursively, sorted by path. An error naming the
/// folder if it holds none.
pub fn list_images(dir: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    let meta = std::fs::metadata(dir).map_err(|e| Error::io(dir, e))?;
    if !meta.is_dir() {
        return Err(Error::arg(format!("{} is not a folder", dir.display())));
    }
    let mut out = Vec::new();
    walk(dir, 0, &mut Default::default(), &mut out)?;
    if out.is_empty() {
        return Err(Error::EmptyFolder {
            dir: dir.to_path_buf(),
            what: "no .png, .jpg, .jpeg or .webp files, searched recursively".into(),
        });
    }
    out.sort();
    Ok(out)
}

/// Decodes one image file to RGB.
pub fn decode_rgb(path: &Path) -> Result<RgbImage> {
    let reader = image::ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let img = reader.decode().map_err(|e| Error::ImageDecode {
        path: path.to_path_buf(),
        source: e,
    })?;
    Ok(img.to_rgb8())
}

fn resize_smaller_side(img: &RgbImage, side: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let (nw, nh) = if w <= h {
        let nh = ((h as f64) * (side as f64) / (w as f64)).round() as u32;
        (side, nh.max(side))
    } else {
        let nw = ((w as f64) * (side as f64) / (h as f64)).round() as u32;
        (nw.max(side), side)
    };
    if (nw, nh) == (w, h) {
        img.clone()
    } else {
        imageops::resize(img, nw, nh, FilterType::Triangle)
    }
}

fn central_crop(img: &RgbImage, cw: u32, ch: u32) -> RgbImage {
    let (w, h) = img.dimensions();
    let cw = cw.min(w);
    let ch = ch.min(h);
    imageops::crop_imm(img, (w - cw) / 2, (h - ch) / 2, cw, ch).to_image()
}

/// Applies `preprocess` to one decoded image; `rng` is used only by the LSUN training crop.
pub fn apply_preprocess<R: Rng + ?Sized>(
    img: &RgbImage,
    preprocess: Preprocess,
    rng: &mut R,
) -> Result<RgbImage> {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return Err(Error::arg("image with a zero dimension"));
    }
    Ok(match preprocess {
        Preprocess::AsIs => img.clone(),
        Preprocess::CelebA => {
            let c = CELEBA_CROP.min(w).min(h);
            let crop = central_crop(img, c, c);
            if c == OUTPUT_SIDE {
                crop
            } else {
                imageops::resize(&crop, OUTPUT_SIDE, OUTPUT_SIDE, FilterType::Triangle)
            }
        }
        Preprocess::Lsun { train } => {
            let r = resize_smaller_side(img, LSUN_RESIZE);
            let (rw, rh) = r.dimensions();
            if train {
                let x0 = rng.random_range(0..=rw - OUTPUT_SIDE);
                let y0 = rng.random_range(0..=rh - OUTPUT_SIDE);
                imageops::crop_imm(&r, x0, y0, OUTPUT_SIDE, OUTPUT_SIDE).to_image()
            } else {
                central_crop(&r, OUTPUT_SIDE, OUTPUT_SIDE)
            }
        }
        Preprocess::ResizeCrop { size } => {
            if size == 0 {
                return Err(Error::arg("resize-crop size must be positive"));
            }
            let r = resize_smaller_side(img, size);
            central_crop(&r, size, size)
        }
    })
}

/// The RNG of the LSUN training crop of file `pos` (its index in the sorted file list)
/// in `epoch`.
pub fn crop_rng(crop_seed: u64, pos: usize, epoch: usize) -> StdRng {
    StdRng::seed_from_u64(mix_seed2(crop_seed, pos as u64, epoch as u64))
}

/// Class of each file (index into the returned names) from the root's sub-folders.
fn classes_of(dir: &Path, files: &[PathBuf]) -> Result<(Vec<String>, Vec<u32>)> {
    let mut tops = Vec::with_capacity(files.len());
    for f in files {
        let rel = f.strip_prefix(dir).unwrap_or(f);
        let mut comps = rel.components();
        let first = comps.next();
        let is_nested = comps.next().is_some();
        match first {
            Some(c) if is_nested => tops.push(c.as_os_str().to_string_lossy().into_owned()),
            _ => {
                return Err(Error::Inconsistent {
                    path: f.clone(),
                    message: "image lies directly in the root folder, but classes are \
                              taken from sub-folders"
                        .into(),
                })
            }
        }
    }
    let mut names = tops.clone();
    names.sort();
    names.dedup();
    let labels = tops
        .iter()
        .map(|t| names.binary_search(t).unwrap_or(0) as u32)
        .collect();
    Ok((names, labels))
}

/// Decodes `path` (file `pos` of the sorted list) and applies the preset, with the LSUN
/// training crop of `epoch`.
pub(crate) fn load_file(
    path: &Path,
    pos: usize,
    epoch: usize,
    opts: &FolderOptions,
) -> Result<RgbImage> {
    let img = decode_rgb(path)?;
    let mut rng = crop_rng(opts.crop_seed, pos, epoch);
    apply_preprocess(&img, opts.preprocess, &mut rng).map_err(|e| Error::Inconsistent {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Whether `e` makes a file unreadable (so [`OnError::Skip`] may skip it), as opposed to
/// an inconsistency that always stops the read.
pub(crate) fn is_unreadable(e: &Error) -> bool {
    matches!(e, Error::ImageDecode { .. } | Error::Io { .. })
}

/// Decodes and preprocesses the files at `positions` (indices into `files`), on `threads`
/// threads; result `k` belongs to `positions[k]`.
fn decode_all(
    files: &[PathBuf],
    positions: &[usize],
    opts: &FolderOptions,
) -> Vec<Result<RgbImage>> {
    let work = |pos: usize| load_file(&files[pos], pos, 0, opts);
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };
    let threads = threads.clamp(1, positions.len().max(1));
    if threads == 1 {
        return positions.iter().map(|&p| work(p)).collect();
    }
    let chunk = positions.len().div_ceil(threads);
    let mut out: Vec<Result<RgbImage>> = Vec::with_capacity(positions.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = positions
            .chunks(chunk)
            .map(|part| s.spawn(move || part.iter().map(|&p| work(p)).collect::<Vec<_>>()))
            .collect();
        for (h, part) in handles.into_iter().zip(positions.chunks(chunk)) {
            match h.join() {
                Ok(v) => out.extend(v),
                Err(_) => out.extend(part.iter().map(|&p| {
                    Err(Error::Worker(format!(
                        "decoding thread panicked near {}",
                        files[p].display()
                    )))
                })),
            }
        }
    });
    out
}

/// The files of one split of a folder.
pub(crate) struct SplitFiles {
    /// Every image file under the root, sorted.
    pub files: Vec<PathBuf>,
    /// The split's files: indices into `files`, ascending (never empty).
    pub positions: Vec<usize>,
    /// The class of every file in `files`, with `class_subfolders`.
    pub all_labels: Option<Vec<u32>>,
    /// Class names in label order.
    pub class_names: Vec<String>,
}

/// Lists the folder and picks `split`'s files (no decoding).
pub(crate) fn split_files(dir: &Path, split: Split, opts: &FolderOptions) -> Result<SplitFiles> {
    let files = list_images(dir)?;
    let (class_names, all_labels) = if opts.class_subfolders {
        let (n, l) = classes_of(dir, &files)?;
        (n, Some(l))
    } else {
        (Vec::new(), None)
    };
    let (train, test) = holdout_indices(files.len(), opts.holdout_fraction, opts.split_seed)?;
    let positions = match split {
        Split::Train => train,
        Split::Test => test,
    };
    if positions.is_empty() {
        return Err(Error::EmptyFolder {
            dir: dir.to_path_buf(),
            what: format!(
                "the {split} split of {} files is empty with held-out fraction {}",
                files.len(),
                opts.holdout_fraction
            ),
        });
    }
    Ok(SplitFiles {
        files,
        positions,
        all_labels,
        class_names,
    })
}

/// Reads `split` of the image folder `dir`.
pub fn read_folder(dir: impl AsRef<Path>, split: Split, opts: &FolderOptions) -> Result<FolderSet> {
    let dir = dir.as_ref();
    let SplitFiles {
        files,
        positions,
        all_labels,
        class_names,
    } = split_files(dir, split, opts)?;
    let decoded = decode_all(&files, &positions, opts);
    let mut images = Vec::new();
    let mut labels = all_labels.as_ref().map(|_| Vec::new());
    let mut kept_files = Vec::new();
    let mut skipped_files = Vec::new();
    let mut size: Option<(u32, u32)> = None;
    for (&pos, res) in positions.iter().zip(decoded) {
        let img = match res {
            Ok(img) => img,
            Err(e) if is_unreadable(&e) => match opts.on_error {
                OnError::Fail => return Err(e),
                OnError::Skip => {
                    skipped_files.push((files[pos].clone(), e.to_string()));
                    continue;
                }
            },
            Err(e) => return Err(e),
        };
        let dims = img.dimensions();
        match size {
            None => size = Some(dims),
            Some(s) if s != dims => {
                return Err(Error::ImageSize {
                    path: files[pos].clone(),
                    width: dims.0 as usize,
                    height: dims.1 as usize,
                    expected_width: s.0 as usize,
                    expected_height: s.1 as usize,
                })
            }
            Some(_) => {}
        }
        rgb_to_planar(&img, &mut images);
        if let (Some(out), Some(all)) = (labels.as_mut(), all_labels.as_ref()) {
            out.push(all[pos]);
        }
        kept_files.push(files[pos].clone());
    }
    let Some((w, h)) = size else {
        return Err(Error::EmptyFolder {
            dir: dir.to_path_buf(),
            what: format!(
                "all {} image files of the {split} split were unreadable and skipped",
                skipped_files.len()
            ),
        });
    };
    let images = ImageSet::new(images, labels, 3, h as usize, w as usize)?;
    Ok(FolderSet {
        images,
        files: kept_files,
        skipped: skipped_files.len(),
        skipped_files,
        class_names,
    })
}
