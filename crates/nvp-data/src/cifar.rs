//! CIFAR-10 in the official binary layout (`cifar-10-batches-bin`).
//!
//! A file is a sequence of 3073-byte records: 1 label byte (0..=9), then 1024 red, 1024
//! green and 1024 blue bytes, each plane 32×32 row-major. The train split is every
//! `data_batch_1.bin` … `data_batch_5.bin` present in the folder (at least one), in that
//! order; the test split is `test_batch.bin`.

use crate::error::{Error, Result};
use crate::image_set::{ImageSet, Split};
use std::path::{Path, PathBuf};

/// Image side.
pub const SIDE: usize = 32;
/// Channels.
pub const CHANNELS: usize = 3;
/// Bytes of one image (`3 · 32 · 32`).
pub const IMAGE_BYTES: usize = CHANNELS * SIDE * SIDE;
/// Bytes of one record: the label byte and the image.
pub const RECORD_BYTES: usize = 1 + IMAGE_BYTES;
/// Number of classes.
pub const NUM_CLASSES: usize = 10;
/// Class names in label order.
pub const CLASS_NAMES: [&str; NUM_CLASSES] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];
/// Names of the training batches, in reading order.
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
/// Name of the test batch.
pub const TEST_FILE: &str = "test_batch.bin";

/// The files that make up `split` in `dir`: for [`Split::Train`] those of
/// [`TRAIN_FILES`] that exist (an error if none does), for [`Split::Test`] `test_batch.bin`
/// (an error if it is missing).
pub fn split_files(dir: impl AsRef<Path>, split: Split) -> Result<Vec<PathBuf>> {
    let dir = dir.as_ref();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::MissingFiles {
                dir: dir.to_path_buf(),
                expected: "a folder holding the CIFAR-10 binary batches".into(),
            })
        }
        Err(e) => return Err(Error::io(dir, e)),
    }
    let files: Vec<PathBuf> = match split {
        Split::Train => TRAIN_FILES
            .iter()
            .map(|f| dir.join(f))
            .filter(|p| p.is_file())
            .collect(),
        Split::Test => [dir.join(TEST_FILE)]
            .into_iter()
            .filter(|p| p.is_file())
            .collect(),
    };
    if files.is_empty() {
        let expected = match split {
            Split::Train => "none of data_batch_1.bin .. data_batch_5.bin (train split)".into(),
            Split::Test => format!("{TEST_FILE} (test split)"),
        };
        return Err(Error::MissingFiles {
            dir: dir.to_path_buf(),
            expected,
        });
    }
    Ok(files)
}

/// Reads `split` of the CIFAR-10 binary dataset in `dir`.
pub fn read_cifar10(dir: impl AsRef<Path>, split: Split) -> Result<ImageSet> {
    let files = split_files(dir, split)?;
    let mut set = ImageSet::empty(CHANNELS, SIDE, SIDE, true);
    for f in &files {
        let part = read_cifar10_file(f)?;
        set.append(&part)?;
    }
    Ok(set)
}

/// Reads one CIFAR-10 binary file.
pub fn read_cifar10_file(path: impl AsRef<Path>) -> Result<ImageSet> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    parse_cifar10(&bytes, path)
}

/// Parses the bytes of a CIFAR-10 binary file; `path` is only used in error messages.
pub fn parse_cifar10(bytes: &[u8], path: &Path) -> Result<ImageSet> {
    if bytes.is_empty() {
        return Err(Error::EmptyFile {
            path: path.to_path_buf(),
        });
    }
    let n = bytes.len() / RECORD_BYTES;
    let rem = bytes.len() % RECORD_BYTES;
    if rem != 0 {
        return Err(Error::CifarTruncated {
            path: path.to_path_buf(),
            size: bytes.len() as u64,
            record_bytes: RECORD_BYTES,
            record: n,
            offset: (n * RECORD_BYTES) as u64,
            remaining: rem,
        });
    }
    let mut images = Vec::with_capacity(n * IMAGE_BYTES);
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks_exact(RECORD_BYTES).enumerate() {
        let label = rec[0];
        if label as usize >= NUM_CLASSES {
            return Err(Error::LabelOutOfRange {
                path: path.to_path_buf(),
                record: i,
                offset: Some((i * RECORD_BYTES) as u64),
                label: i64::from(label),
                min: 0,
                max: NUM_CLASSES as i64 - 1,
            });
        }
        labels.push(u32::from(label));
        images.extend_from_slice(&rec[1..]);
    }
    ImageSet::new(images, Some(labels), CHANNELS, SIDE, SIDE)
}

/// Encodes a 3×32×32 labelled set in the CIFAR-10 binary layout (in memory; for tests and
/// tools that write fixtures).
pub fn encode_cifar10(set: &ImageSet) -> Result<Vec<u8>> {
    if set.shape() != (CHANNELS, SIDE, SIDE) {
        return Err(Error::arg(format!(
            "CIFAR-10 records hold 3x32x32 images, not {:?}",
            set.shape()
        )));
    }
    let labels = set
        .labels
        .as_ref()
        .ok_or_else(|| Error::arg("CIFAR-10 records need labels"))?;
    let mut out = Vec::with_capacity(set.len() * RECORD_BYTES);
    for (i, &l) in labels.iter().enumerate() {
        let l = u8::try_from(l)
            .ok()
            .filter(|&l| (l as usize) < NUM_CLASSES)
            .ok_or_else(|| Error::arg(format!("label {l} of image {i} is not in 0..=9")))?;
        out.push(l);
        out.extend_from_slice(set.image(i));
    }
    Ok(out)
}
