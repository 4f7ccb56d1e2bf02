//! Downsampled ImageNet (32×32 and 64×64) in the official `.npz` batches.
//!
//! Each archive holds `data`: uint8, `N × (3·H·W)`, each row channel-planar (1 R plane,
//! 1 G plane, 1 B plane, each H×W row-major, like CIFAR-10), and `labels`: N integers,
//! 1-based in the official files (stored 0-based here). Other arrays (e.g. `mean`) are
//! ignored. A folder is read as `train_data_batch_<k>.npz` in numeric order of `k` (train
//! split) or `val_data.npz` (test split); a path to a single `.npz` file reads that file.

use crate::error::{Error, Result};
use crate::image_set::{ImageSet, Split};
use ndarray::Array2;
use ndarray_npy::{NpzReader, ReadNpzError};
use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

/// Name of the validation archive.
pub const VAL_FILE: &str = "val_data.npz";
/// Prefix of the training archives.
pub const TRAIN_PREFIX: &str = "train_data_batch_";
/// Number of classes.
pub const NUM_CLASSES: usize = 1000;

/// Options of the ImageNet reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImagenetOptions {
    /// Expected image side (32 or 64); `None` infers it from the row length.
    pub size: Option<usize>,
    /// Labels in the files start at 1 (the official files); they are stored 0-based.
    pub labels_one_based: bool,
    /// Number of classes, for the label range check.
    pub num_classes: usize,
}

impl Default for ImagenetOptions {
    fn default() -> Self {
        ImagenetOptions {
            size: None,
            labels_one_based: true,
            num_classes: NUM_CLASSES,
        }
    }
}

/// The archives that make up `split` of `path` (a folder, or one `.npz` file).
pub fn split_files(path: impl AsRef<Path>, split: Split) -> Result<Vec<PathBuf>> {
    let path = path.as_ref();
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    match split {
        Split::Test => {
            let f = path.join(VAL_FILE);
            if f.is_file() {
                Ok(vec![f])
            } else {
                Err(Error::MissingFiles {
                    dir: path.to_path_buf(),
                    expected: format!("{VAL_FILE} (test split)"),
                })
            }
        }
        Split::Train => {
            let mut found: Vec<(u64, PathBuf)> = Vec::new();
            let rd = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
            for entry in rd {
                let entry = entry.map_err(|e| Error::io(path, e))?;
                let name = entry.file_name();
                let Some(name) = name.to_str() else { continue };
                let Some(k) = name
                    .strip_prefix(TRAIN_PREFIX)
                    .and_then(|r| r.strip_suffix(".npz"))
                    .and_then(|k| k.parse::<u64>().ok())
                else {
                    continue;
                };
                found.push((k, entry.path()));
            }
            if found.is_empty() {
                return Err(Error::MissingFiles {
                    dir: path.to_path_buf(),
                    expected: format!("{TRAIN_PREFIX}<k>.npz (train split)"),
                });
            }
            found.sort();
            Ok(found.into_iter().map(|(_, p)| p).collect())
        }
    }
}

/// Reads `split` of downsampled ImageNet at `path` (a folder or a single `.npz` file).
pub fn read_imagenet(
    path: impl AsRef<Path>,
    split: Split,
    opts: &ImagenetOptions,
) -> Result<ImageSet> {
    let files = split_files(path, split)?;
    let mut set: Option<ImageSet> = None;
    for f in &files {
        let part = read_imagenet_file(f, opts)?;
        match set.as_mut() {
            None => set = Some(part),
            Some(s) => s.append(&part).map_err(|e| Error::Inconsistent {
                path: f.clone(),
                message: e.to_string(),
            })?,
        }
    }
    set.ok_or_else(|| Error::MissingFiles {
        dir: PathBuf::new(),
        expected: "at least one .npz archive".into(),
    })
}

/// Reads one `.npz` archive.
pub fn read_imagenet_file(path: impl AsRef<Path>, opts: &ImagenetOptions) -> Result<ImageSet> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    read_imagenet_npz(std::io::BufReader::new(file), path, opts)
}

fn npz_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Npz {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn array_err(path: &Path, array: &str, e: impl std::fmt::Display) -> Error {
    Error::NpzArray {
        path: path.to_path_buf(),
        array: array.into(),
        message: e.to_string(),
    }
}

fn to_vec<T: Clone>(
    a: ndarray::ArrayBase<ndarray::OwnedRepr<T>, impl ndarray::Dimension>,
) -> Vec<T> {
    if a.is_standard_layout() {
        let (v, off) = a.into_raw_vec_and_offset();
        match off {
            Some(0) | None => v,
            Some(o) => v[o..].to_vec(),
        }
    } else {
        a.iter().cloned().collect()
    }
}

/// Reads the labels as integers of whatever integer type they were saved with.
fn read_labels<R: Read + Seek>(
    npz: &mut NpzReader<R>,
    path: &Path,
    name: &str,
) -> Result<Vec<i64>> {
    macro_rules! try_type {
        ($t:ty) => {
            match npz.by_name::<ndarray::OwnedRepr<$t>, ndarray::Ix1>(name) {
                Ok(a) => return Ok(to_vec(a).into_iter().map(|v| v as i64).collect()),
                Err(ReadNpzError::Npy(_)) => {}
                Err(e) => return Err(npz_err(path, e)),
            }
        };
    }
    try_type!(i64);
    try_type!(i32);
    try_type!(u8);
    try_type!(i16);
    try_type!(u16);
    try_type!(u32);
    try_type!(i8);
    // u64 last: values beyond i64::MAX are out of range anyway
    match npz.by_name::<ndarray::OwnedRepr<u64>, ndarray::Ix1>(name) {
        Ok(a) => Ok(to_vec(a)
            .into_iter()
            .map(|v| i64::try_from(v).unwrap_or(i64::MAX))
            .collect()),
        Err(ReadNpzError::Npy(e)) => Err(array_err(
            path,
            name,
            format!("expected a 1-D integer array: {e}"),
        )),
        Err(e) => Err(npz_err(path, e)),
    }
}

/// Reads one archive from any `Read + Seek` source; `path` is used in error messages.
pub fn read_imagenet_npz<R: Read + Seek>(
    reader: R,
    path: &Path,
    opts: &ImagenetOptions,
) -> Result<ImageSet> {
    let mut npz = NpzReader::new(reader).map_err(|e| npz_err(path, e))?;
    let names = npz.names().map_err(|e| npz_err(path, e))?;
    let present = if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
    };
    for required in ["data", "labels"] {
        if !names.iter().any(|n| n == required) {
            return Err(Error::NpzMissingArray {
                path: path.to_path_buf(),
                array: required.into(),
                present,
            });
        }
    }
    let data: Array2<u8> = npz.by_name("data").map_err(|e| match e {
        ReadNpzError::Npy(e) => array_err(
            path,
            "data",
            format!("expected a 2-D uint8 array (N, 3*H*W): {e}"),
        ),
        e => npz_err(path, e),
    })?;
    let (n, row) = data.dim();
    let side = match opts.size {
        Some(s) => {
            let expected = s.checked_mul(s).and_then(|v| v.checked_mul(3));
            if s == 0 || expected != Some(row) {
                return Err(array_err(
                    path,
                    "data",
                    format!(
                        "rows have {row} values, expected 3*{s}*{s} = {} for {s}x{s} images",
                        expected.map_or("(overflow)".to_string(), |e| e.to_string())
                    ),
                ));
            }
            s
        }
        None => {
            let s = ((row / 3) as f64).sqrt().round() as usize;
            if row == 0 || 3 * s * s != row {
                return Err(array_err(
                    path,
                    "data",
                    format!("rows have {row} values, not 3*S*S for any image side S"),
                ));
            }
            s
        }
    };
    let raw_labels = read_labels(&mut npz, path, "labels")?;
    if raw_labels.len() != n {
        return Err(array_err(
            path,
            "labels",
            format!("{} labels for {n} images", raw_labels.len()),
        ));
    }
    let base: i64 = if opts.labels_one_based { 1 } else { 0 };
    let max = opts.num_classes as i64 - 1 + base;
    let mut labels = Vec::with_capacity(n);
    for (i, &l) in raw_labels.iter().enumerate() {
        if l < base || l > max {
            return Err(Error::LabelOutOfRange {
                path: path.to_path_buf(),
                record: i,
                offset: 0,
                label: l,
                max,
            });
        }
        labels.push((l - base) as u32);
    }
    let images = to_vec(data);
    ImageSet::new(images, Some(labels), 3, side, side)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array1;
    use ndarray_npy::NpzWriter;
    use std::io::Cursor;

    #[test]
    fn compressed_archive_with_int64_labels_and_extra_array() {
        let n = 3;
        let data = Array2::from_shape_fn((n, 3 * 4 * 4), |(i, j)| (i * 7 + j) as u8);
        let labels = Array1::from(vec![1i64, 1000, 5]);
        let mean = Array1::from(vec![0.5f32; 48]);
        let mut w = NpzWriter::new_compressed(Cursor::new(Vec::new()));
        w.add_array("data", &data).unwrap();
        w.add_array("labels", &labels).unwrap();
        w.add_array("mean", &mean).unwrap();
        let bytes = w.finish().unwrap().into_inner();
        let set = read_imagenet_npz(
            Cursor::new(bytes),
            Path::new("mem.npz"),
            &ImagenetOptions::default(),
        )
        .unwrap();
        assert_eq!(set.shape(), (3, 4, 4));
        assert_eq!(set.labels, Some(vec![0, 999, 4]));
        assert_eq!(set.image(2)[5], (2 * 7 + 5) as u8);
    }

    #[test]
    fn float_data_is_a_typed_error() {
        let data = Array2::from_elem((2, 12), 1.0f32);
        let labels = Array1::from(vec![1i32, 2]);
        let mut w = NpzWriter::new(Cursor::new(Vec::new()));
        w.add_array("data", &data).unwrap();
        w.add_array("labels", &labels).unwrap();
        let bytes = w.finish().unwrap().into_inner();
        let err = read_imagenet_npz(
            Cursor::new(bytes),
            Path::new("f.npz"),
            &ImagenetOptions::default(),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("f.npz") && msg.contains("`data`"), "{msg}");
    }
}
