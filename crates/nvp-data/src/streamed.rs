//! [`StreamedFolder`]: an image folder read as batches need it, for datasets that do not
//! fit in memory or would take long to decode up front (LSUN bedroom: 3 million files,
//! 37 GB as 64×64 images).
//!
//! Opening lists the folder and picks the split's files exactly as
//! [`crate::folder::read_folder`] does (same sorted order, same held-out partition, same
//! labels); nothing is decoded but, for [`Preprocess::AsIs`], the first file, which fixes
//! the image size. Each [`ImageSource::read_into`] then decodes and preprocesses one file.
//! The loader calls it from its worker threads, so decoding overlaps training.
//!
//! - The LSUN training crop is drawn per epoch from [`crate::folder::crop_rng`]`(seed,
//!   file, epoch)`: a new random crop every epoch, as the paper's augmentation, and the same
//!   one for the same `(seed, file, epoch)` whatever the threads. Epoch 0's crops are the
//!   ones [`crate::folder::read_folder`] draws, so for every preset the streamed images of
//!   epoch 0 equal the in-memory ones byte for byte (tested).
//! - An unreadable file fails the read with an error naming it ([`OnError::Fail`]), or,
//!   with [`OnError::Skip`], is replaced by the next readable file of the split (in split
//!   order, wrapping around: deterministic) and remembered, so it is not decoded again;
//!   [`ImageSource::skipped_files`] lists those met so far.
//! - An image whose size after preprocessing differs from the first one's (only possible
//!   with [`Preprocess::AsIs`]) is an error naming the file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use image::RgbImage;

use crate::error::{Error, Result};
use crate::folder::{
    is_unreadable, load_file, split_files, FolderOptions, OnError, Preprocess, SplitFiles,
    OUTPUT_SIDE,
};
use crate::image_set::{rgb_to_planar, Split};
use crate::source::{check_read, ImageSource};

/// One split of an image folder, decoded on demand. See the module documentation.
pub struct StreamedFolder {
    dir: PathBuf,
    split: Split,
    /// The split's files, in split order.
    files: Vec<PathBuf>,
    /// Index of each in the folder's sorted file list (seeds its crops).
    positions: Vec<usize>,
    labels: Option<Vec<u32>>,
    class_names: Vec<String>,
    /// The preset, the crop seed and what to do with unreadable files.
    opts: FolderOptions,
    /// Width and height of every image.
    size: (u32, u32),
    /// Unreadable files met so far (index in `files` → reason).
    bad: Mutex<BTreeMap<usize, String>>,
}

impl std::fmt::Debug for StreamedFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The output size of a preset, when it fixes one.
fn preset_size(p: Preprocess) -> Option<(u32, u32)> {
    match p {
        Preprocess::AsIs => None,
        Preprocess::CelebA | Preprocess::Lsun { .. } => Some((OUTPUT_SIDE, OUTPUT_SIDE)),
        Preprocess::ResizeCrop { size } => Some((size, size)),
    }
}

impl StreamedFolder {
    /// Lists `dir` and selects `split` (options as for [`crate::folder::read_folder`];
    /// `threads` is not used: the loader's workers decode). Errors: the folder is missing
    /// or holds no image, the split is empty, a zero `ResizeCrop` size, or (as-is only)
    /// no readable first image.
    pub fn open(dir: impl AsRef<Path>, split: Split, opts: &FolderOptions) -> Result<Self> {
        let dir = dir.as_ref();
        if opts.preprocess == (Preprocess::ResizeCrop { size: 0 }) {
            return Err(Error::arg("resize-crop size must be positive"));
        }
        let SplitFiles {
            files,
            positions,
            all_labels,
            class_names,
        } = split_files(dir, split, opts)?;
        let labels = all_labels.map(|all| positions.iter().map(|&p| all[p]).collect());
        let files: Vec<PathBuf> = positions.iter().map(|&p| files[p].clone()).collect();
        let mut s = StreamedFolder {
            dir: dir.to_path_buf(),
            split,
            files,
            positions,
            labels,
            class_names,
            opts: opts.clone(),
            size: preset_size(opts.preprocess).unwrap_or((0, 0)),
            bad: Mutex::new(BTreeMap::new()),
        };
        if preset_size(opts.preprocess).is_none() {
            // As-is: the first readable image fixes the size.
            let (_, img) = s.first_readable(0, 0)?;
            s.size = img.dimensions();
        }
        Ok(s)
    }

    /// The split's files, in the order of the source's indices.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Class names (sub-folder names) in label order; empty without classes.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// The first file from `k` on (wrapping) that reads, skipping unreadable ones when
    /// allowed.
    fn first_readable(&self, k: usize, epoch: usize) -> Result<(usize, RgbImage)> {
        let n = self.files.len();
        for step in 0..n {
            let j = (k + step) % n;
            if self.is_bad(j) {
                continue;
            }
            match load_file(&self.files[j], self.positions[j], epoch, &self.opts) {
                Ok(img) => return Ok((j, img)),
                Err(e) if is_unreadable(&e) && self.opts.on_error == OnError::Skip => {
                    let mut bad = self.bad.lock().unwrap_or_else(|e| e.into_inner());
                    bad.insert(j, e.to_string());
                }
                Err(e) => return Err(e),
            }
        }
        Err(Error::EmptyFolder {
            dir: self.dir.clone(),
            what: format!(
                "all {n} image files of the {} split are unreadable and were skipped",
                self.split
            ),
        })
    }

    fn is_bad(&self, k: usize) -> bool {
        let bad = self.bad.lock().unwrap_or_else(|e| e.into_inner());
        bad.contains_key(&k)
    }
}

impl ImageSource for StreamedFolder {
    fn shape(&self) -> (usize, usize, usize) {
        (3, self.size.1 as usize, self.size.0 as usize)
    }

    fn len(&self) -> usize {
        self.files.len()
    }

    fn labelled(&self) -> bool {
        self.labels.is_some()
    }

    fn read_into(&self, i: usize, epoch: usize, out: &mut [u8]) -> Result<Option<u32>> {
        check_read(self, i, out)?;
        let (k, img) = self.first_readable(i, epoch)?;
        let (w, h) = img.dimensions();
        if (w, h) != self.size {
            return Err(Error::ImageSize {
                path: self.files[k].clone(),
                width: w as usize,
                height: h as usize,
                expected_width: self.size.0 as usize,
                expected_height: self.size.1 as usize,
            });
        }
        let mut planar = Vec::with_capacity(out.len());
        rgb_to_planar(&img, &mut planar);
        out.copy_from_slice(&planar);
        Ok(self.labels.as_ref().map(|l| l[k]))
    }

    /// The unreadable files met so far and why, in split order ([`OnError::Skip`]).
    fn skipped_files(&self) -> Vec<(PathBuf, String)> {
        let bad = self.bad.lock().unwrap_or_else(|e| e.into_inner());
        bad.iter()
            .map(|(&k, why)| (self.files[k].clone(), why.clone()))
            .collect()
    }

    fn describe(&self) -> String {
        format!(
            "{} image files of the {} split under {}, decoded as read to 3×{}×{}",
            self.files.len(),
            self.split,
            self.dir.display(),
            self.size.1,
            self.size.0
        )
    }
}
