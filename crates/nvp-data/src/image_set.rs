//! [`ImageSet`]: the in-memory u8 image collection every reader returns.
//!
//! Images are stored back to back, each `channels × height × width` row-major
//! (channel-planar, like CIFAR-10's binary layout and like a candle `(C, H, W)` tensor).

use crate::error::{Error, Result};
use crate::seed::mix_seed;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Which part of a dataset to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training part.
    Train,
    /// The test (or validation, or held-out) part.
    Test,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Test => "test",
        })
    }
}

impl std::str::FromStr for Split {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "train" | "training" => Ok(Split::Train),
            "test" | "val" | "valid" | "validation" | "eval" => Ok(Split::Test),
            _ => Err(Error::arg(format!(
                "unknown split `{s}` (expected `train` or `test`)"
            ))),
        }
    }
}

/// A set of 8-bit images of one shape, with optional class labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageSet {
    /// `N · C · H · W` bytes; image `i` is `images[i·D .. (i+1)·D]`, `C × H × W` row-major.
    pub images: Vec<u8>,
    /// One label per image, when the dataset has labels.
    pub labels: Option<Vec<u32>>,
    /// Channels per image (3 for RGB).
    pub channels: usize,
    /// Image height.
    pub height: usize,
    /// Image width.
    pub width: usize,
}

impl ImageSet {
    /// Builds a set, checking that the buffer holds a whole number of images and that there
    /// is one label per image.
    pub fn new(
        images: Vec<u8>,
        labels: Option<Vec<u32>>,
        channels: usize,
        height: usize,
        width: usize,
    ) -> Result<Self> {
        let set = ImageSet {
            images,
            labels,
            channels,
            height,
            width,
        };
        set.validate()?;
        Ok(set)
    }

    /// Checks the invariants that [`ImageSet::new`] establishes (the fields are public, so
    /// a set built by hand may break them): a non-zero shape, a whole number of images and
    /// one label per image.
    pub fn validate(&self) -> Result<()> {
        let dims = self
            .channels
            .checked_mul(self.height)
            .and_then(|v| v.checked_mul(self.width))
            .unwrap_or(0);
        if dims == 0 {
            return Err(Error::arg(format!(
                "image shape {}x{}x{} is empty or overflows",
                self.channels, self.height, self.width
            )));
        }
        if self.images.len() % dims != 0 {
            return Err(Error::arg(format!(
                "image buffer of {} bytes is not a multiple of {dims}",
                self.images.len()
            )));
        }
        if let Some(l) = &self.labels {
            if l.len() != self.images.len() / dims {
                return Err(Error::arg(format!(
                    "{} labels for {} images",
                    l.len(),
                    self.images.len() / dims
                )));
            }
        }
        Ok(())
    }

    /// An empty set of the given shape.
    pub fn empty(channels: usize, height: usize, width: usize, labelled: bool) -> Self {
        ImageSet {
            images: Vec::new(),
            labels: labelled.then(Vec::new),
            channels,
            height,
            width,
        }
    }

    /// Sub-pixels per image, `D = C · H · W`.
    pub fn dims(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// `(C, H, W)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.channels, self.height, self.width)
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.len().checked_div(self.dims()).unwrap_or(0)
    }

    /// Whether the set holds no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Image `i` as `C × H × W` bytes.
    ///
    /// # Panics
    /// When `i >= self.len()`, like slice indexing; [`ImageSet::get`] is the checked form.
    pub fn image(&self, i: usize) -> &[u8] {
        let d = self.dims();
        &self.images[i * d..(i + 1) * d]
    }

    /// Image `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<&[u8]> {
        let d = self.dims();
        let start = i.checked_mul(d)?;
        self.images.get(start..start.checked_add(d)?)
    }

    /// Label of image `i` (`None` for unlabelled sets or past the end).
    pub fn label(&self, i: usize) -> Option<u32> {
        self.labels.as_ref().and_then(|l| l.get(i).copied())
    }

    /// Number of classes: one more than the largest label (0 when unlabelled or empty).
    pub fn num_classes(&self) -> usize {
        self.labels
            .as_ref()
            .and_then(|l| l.iter().max())
            .map_or(0, |&m| m as usize + 1)
    }

    /// Count of images per class, indexed by label (length [`ImageSet::num_classes`]);
    /// empty for an unlabelled set.
    pub fn class_histogram(&self) -> Vec<usize> {
        let mut h = vec![0usize; self.num_classes()];
        if let Some(l) = &self.labels {
            for &c in l {
                h[c as usize] += 1;
            }
        }
        h
    }

    /// The first `min(n, len)` images.
    pub fn take(&self, n: usize) -> ImageSet {
        let n = n.min(self.len());
        ImageSet {
            images: self.images[..n * self.dims()].to_vec(),
            labels: self
                .labels
                .as_ref()
                .map(|l| l.iter().take(n).copied().collect()),
            channels: self.channels,
            height: self.height,
            width: self.width,
        }
    }

    /// The images at `indices`, in that order (repeats allowed).
    pub fn subset(&self, indices: &[usize]) -> Result<ImageSet> {
        let n = self.len();
        let d = self.dims();
        let mut images = Vec::with_capacity(indices.len() * d);
        for &i in indices {
            if i >= n {
                return Err(Error::arg(format!(
                    "subset index {i} out of range for {n} images"
                )));
            }
            images.extend_from_slice(self.image(i));
        }
        let labels = match &self.labels {
            None => None,
            Some(l) => Some(
                indices
                    .iter()
                    .map(|&i| {
                        l.get(i)
                            .copied()
                            .ok_or_else(|| Error::arg(format!("image {i} has no label")))
                    })
                    .collect::<Result<Vec<u32>>>()?,
            ),
        };
        Ok(ImageSet {
            images,
            labels,
            channels: self.channels,
            height: self.height,
            width: self.width,
        })
    }

    /// Appends the images of `other`, which must have the same shape and the same label
    /// presence.
    pub fn append(&mut self, other: &ImageSet) -> Result<()> {
        other.validate()?;
        if other.shape() != self.shape() {
            return Err(Error::arg(format!(
                "cannot append {:?} images to a set of {:?} images",
                other.shape(),
                self.shape()
            )));
        }
        match (&mut self.labels, &other.labels) {
            (Some(a), Some(b)) => a.extend_from_slice(b),
            (None, None) => {}
            _ => {
                return Err(Error::arg(
                    "cannot append: one set has labels and the other has not",
                ))
            }
        }
        self.images.extend_from_slice(&other.images);
        Ok(())
    }

    /// Splits into `(train, held_out)`: a seeded random `holdout_fraction` of the images
    /// (rounded to the nearest count) goes to the second set, each part keeping the
    /// original order. Deterministic for a seed.
    pub fn split_holdout(&self, holdout_fraction: f64, seed: u64) -> Result<(ImageSet, ImageSet)> {
        let (train, test) = holdout_indices(self.len(), holdout_fraction, seed)?;
        Ok((self.subset(&train)?, self.subset(&test)?))
    }

    /// Image `i` as an RGB image, so that callers can save or display it. One-channel
    /// images become grey RGB; three-channel images are taken as R, G, B planes.
    pub fn to_rgb_image(&self, i: usize) -> Result<image::RgbImage> {
        let img = self.get(i).ok_or_else(|| {
            Error::arg(format!(
                "image index {i} out of range for {} images",
                self.len()
            ))
        })?;
        planar_to_rgb(img, self.channels, self.height, self.width)
    }
}

/// Converts one `C × H × W` planar image (C = 1 or 3) to an [`image::RgbImage`].
pub fn planar_to_rgb(
    img: &[u8],
    channels: usize,
    height: usize,
    width: usize,
) -> Result<image::RgbImage> {
    let hw = height * width;
    if img.len() != channels * hw {
        return Err(Error::arg(format!(
            "image of {} bytes is not {channels}x{height}x{width}",
            img.len()
        )));
    }
    let (w32, h32) = match (u32::try_from(width), u32::try_from(height)) {
        (Ok(w), Ok(h)) => (w, h),
        _ => return Err(Error::arg("image too large for an RgbImage")),
    };
    let mut out = Vec::with_capacity(hw * 3);
    match channels {
        1 => {
            for &v in img {
                out.extend_from_slice(&[v, v, v]);
            }
        }
        3 => {
            let (r, rest) = img.split_at(hw);
            let (g, b) = rest.split_at(hw);
            for k in 0..hw {
                out.extend_from_slice(&[r[k], g[k], b[k]]);
            }
        }
        c => {
            return Err(Error::arg(format!(
                "cannot convert a {c}-channel image to RGB (1 or 3 channels expected)"
            )))
        }
    }
    image::RgbImage::from_raw(w32, h32, out)
        .ok_or_else(|| Error::arg("RGB buffer does not match the image size"))
}

/// Converts an [`image::RgbImage`] to `3 × H × W` planar bytes, appending to `out`.
pub fn rgb_to_planar(img: &image::RgbImage, out: &mut Vec<u8>) {
    let hw = img.width() as usize * img.height() as usize;
    let raw = img.as_raw();
    let start = out.len();
    out.resize(start + 3 * hw, 0);
    let dst = &mut out[start..];
    let (r, rest) = dst.split_at_mut(hw);
    let (g, b) = rest.split_at_mut(hw);
    for (k, px) in raw.chunks_exact(3).enumerate() {
        r[k] = px[0];
        g[k] = px[1];
        b[k] = px[2];
    }
}

/// The deterministic train / held-out partition of `0..n` used by
/// [`ImageSet::split_holdout`] and the folder reader: `round(n · fraction)` indices chosen
/// by a seeded shuffle go to the held-out part; both parts are returned sorted.
pub fn holdout_indices(
    n: usize,
    holdout_fraction: f64,
    seed: u64,
) -> Result<(Vec<usize>, Vec<usize>)> {
    if !(0.0..=1.0).contains(&holdout_fraction) {
        return Err(Error::arg(format!(
            "held-out fraction {holdout_fraction} is not in [0, 1]"
        )));
    }
    let n_test = ((n as f64) * holdout_fraction).round() as usize;
    let n_test = n_test.min(n);
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(mix_seed(seed, 0x5b11_7e57));
    perm.shuffle(&mut rng);
    let mut test: Vec<usize> = perm[..n_test].to_vec();
    let mut train: Vec<usize> = perm[n_test..].to_vec();
    test.sort_unstable();
    train.sort_unstable();
    Ok((train, test))
}
