//! [`ImageSource`]: where the [`crate::Loader`] gets its images — all in memory
//! ([`ImageSet`]) or read from disk when a batch needs them
//! ([`crate::streamed::StreamedFolder`], for datasets larger than memory such as LSUN).
//!
//! A source hands out image `i` as `C × H × W` bytes (channel-planar) with its label. It
//! is also told the epoch, so that a source which augments at read time (the LSUN random
//! crop) can draw a new crop each epoch from a seed of `(seed, file, epoch)`: what a batch
//! holds stays a function of `(seed, epoch, batch)`, whatever the threads, and a resumed
//! run sees the images an uninterrupted one would have seen.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::image_set::ImageSet;

/// A fixed-length, indexable collection of 8-bit images of one shape.
pub trait ImageSource: Send + Sync {
    /// `(channels, height, width)` of every image.
    fn shape(&self) -> (usize, usize, usize);

    /// Number of images.
    fn len(&self) -> usize;

    /// Whether every image has a class label.
    fn labelled(&self) -> bool;

    /// Writes image `i` into `out` (`C · H · W` bytes, channel-planar) and returns its
    /// label. `epoch` seeds augmentation done at read time (sources without any ignore
    /// it). Errors name the file or index concerned.
    fn read_into(&self, i: usize, epoch: usize, out: &mut [u8]) -> Result<Option<u32>>;

    /// A short description for messages, e.g. `"10000 images of 3×32×32 in memory"`.
    fn describe(&self) -> String;

    /// Unreadable files skipped so far by a source that reads files as needed, with the
    /// reason (none for others).
    fn skipped_files(&self) -> Vec<(std::path::PathBuf, String)> {
        Vec::new()
    }

    /// Whether the source holds no image.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes (sub-pixels) per image.
    fn dims(&self) -> usize {
        let (c, h, w) = self.shape();
        c * h * w
    }
}

/// The checks every [`ImageSource::read_into`] makes: `i` in range and `out` one image
/// long.
pub(crate) fn check_read(src: &dyn ImageSource, i: usize, out: &[u8]) -> Result<()> {
    if i >= src.len() {
        return Err(Error::arg(format!(
            "image {i} out of range: the source has {} images",
            src.len()
        )));
    }
    if out.len() != src.dims() {
        return Err(Error::arg(format!(
            "image buffer of {} bytes for images of {} bytes",
            out.len(),
            src.dims()
        )));
    }
    Ok(())
}

impl ImageSource for ImageSet {
    fn shape(&self) -> (usize, usize, usize) {
        ImageSet::shape(self)
    }

    fn len(&self) -> usize {
        ImageSet::len(self)
    }

    fn labelled(&self) -> bool {
        self.labels.is_some()
    }

    fn read_into(&self, i: usize, _epoch: usize, out: &mut [u8]) -> Result<Option<u32>> {
        check_read(self, i, out)?;
        out.copy_from_slice(self.image(i));
        Ok(self.label(i))
    }

    fn describe(&self) -> String {
        format!(
            "{} images of {}×{}×{} in memory",
            ImageSet::len(self),
            self.channels,
            self.height,
            self.width
        )
    }
}

/// The first `n` images of another source (e.g. a test split cut to `test-limit`).
pub struct Prefix {
    inner: Arc<dyn ImageSource>,
    n: usize,
}

impl Prefix {
    /// The first `min(n, inner.len())` images of `inner`.
    pub fn new(inner: Arc<dyn ImageSource>, n: usize) -> Self {
        let n = n.min(inner.len());
        Prefix { inner, n }
    }
}

impl ImageSource for Prefix {
    fn shape(&self) -> (usize, usize, usize) {
        self.inner.shape()
    }

    fn len(&self) -> usize {
        self.n
    }

    fn labelled(&self) -> bool {
        self.inner.labelled()
    }

    fn read_into(&self, i: usize, epoch: usize, out: &mut [u8]) -> Result<Option<u32>> {
        check_read(self, i, out)?;
        self.inner.read_into(i, epoch, out)
    }

    fn describe(&self) -> String {
        format!("the first {} of {}", self.n, self.inner.describe())
    }

    fn skipped_files(&self) -> Vec<(std::path::PathBuf, String)> {
        self.inner.skipped_files()
    }
}

/// Reads every image of `src` (for `epoch`) into an [`ImageSet`].
pub fn collect(src: &dyn ImageSource, epoch: usize) -> Result<ImageSet> {
    let (c, h, w) = src.shape();
    let d = src.dims();
    let n = src.len();
    let mut images = vec![0u8; n * d];
    let mut labels = src.labelled().then(|| Vec::with_capacity(n));
    for (i, out) in images.chunks_exact_mut(d.max(1)).enumerate().take(n) {
        let label = src.read_into(i, epoch, out)?;
        if let Some(l) = labels.as_mut() {
            l.push(label.ok_or_else(|| {
                Error::arg(format!("image {i} of a labelled source has no label"))
            })?);
        }
    }
    ImageSet::new(images, labels, c, h, w)
}
