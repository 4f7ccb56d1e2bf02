//! Downsampled ImageNet (32×32 and 64×64) in the official `.npz` batches.
//!
//! Each archive holds `data`: uint8, `N × (3·H·W)`, each row channel-planar (1 R plane,
//! 1 G plane, 1 B plane, each H×W row-major, like CIFAR-10), and `labels`: N integers,
//! 1-based in the official files (stored 0-based here). Other arrays (e.g. `mean`) are
//! ignored. A folder is read as `train_data_batch_<k>.npz` in numeric order of `k` (train
//! split) or `val_data.npz` (test split); a path to a single `.npz` file reads that file.

use crate::error::{Error, Result};
use crate::image_set::{ImageSet, Split};
use crate::source::{check_read, ImageSource};
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

/// The image side for rows of `row` values: `opts.size` checked, or inferred.
fn image_side(path: &Path, row: usize, opts: &ImagenetOptions) -> Result<usize> {
    match opts.size {
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
            Ok(s)
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
            Ok(s)
        }
    }
}

/// `n` labels, range-checked and made 0-based.
fn convert_labels(
    path: &Path,
    raw_labels: &[i64],
    n: usize,
    opts: &ImagenetOptions,
) -> Result<Vec<u32>> {
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
                offset: None,
                label: l,
                min: base,
                max,
            });
        }
        labels.push((l - base) as u32);
    }
    Ok(labels)
}

/// Reads one archive from any `Read + Seek` source; `path` is used in error messages.
pub fn read_imagenet_npz<R: Read + Seek>(
    mut reader: R,
    path: &Path,
    opts: &ImagenetOptions,
) -> Result<ImageSet> {
    // The images' shape, from the array's header, against the bytes the archive holds
    // for it, before the array is allocated: a damaged or crafted header would ask for
    // any amount of memory.
    {
        let mut zip = zip::ZipArchive::new(&mut reader).map_err(|e| npz_err(path, e))?;
        if let Ok(entry) = zip.by_name("data.npy") {
            let size = entry.size();
            let (rows, row, header) = npy_u8_header(entry, path)?;
            let need = (rows as u128) * (row as u128);
            if need > u128::from(size.saturating_sub(header)) {
                return Err(array_err(
                    path,
                    "data",
                    format!(
                        "its header declares {rows} × {row} bytes, but the archive holds {} bytes of it",
                        size.saturating_sub(header)
                    ),
                ));
            }
        };
        if let Ok(entry) = zip.by_name("labels.npy") {
            let size = entry.size();
            check_labels_entry(entry, size, path)?;
        };
    }
    reader
        .seek(std::io::SeekFrom::Start(0))
        .map_err(|e| Error::io(path, e))?;
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
    let side = image_side(path, row, opts)?;
    let raw_labels = read_labels(&mut npz, path, "labels")?;
    let labels = convert_labels(path, &raw_labels, n, opts)?;
    let images = to_vec(data);
    ImageSet::new(images, Some(labels), 3, side, side)
}

/// One archive of a [`StreamedImagenet`].
struct Part {
    path: PathBuf,
    file: File,
    /// Byte offset of the first image's first value in the file.
    data_offset: u64,
    rows: usize,
}

/// Downsampled ImageNet read row by row from the `.npz` archives as batches need it,
/// for the 64×64 training split (1.28 M images, 15.7 GB) on machines where it does not
/// fit in memory. Opening reads every archive's labels (small) and the position and
/// shape of its `data` array; [`ImageSource::read_into`] then reads one image with one
/// positioned read. The archives must store `data.npy` uncompressed, as `np.savez`
/// writes it; a compressed one (`np.savez_compressed`) is an error naming it. Same files, order, labels and checks as [`read_imagenet`] (tested
/// equal).
pub struct StreamedImagenet {
    parts: Vec<Part>,
    /// Index of each part's first image.
    starts: Vec<usize>,
    labels: Vec<u32>,
    side: usize,
}

/// Fills `buf` from `file` at `offset` without moving a shared cursor, so that loader
/// threads can read at once.
#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(windows)]
fn read_at(file: &File, mut buf: &mut [u8], mut offset: u64) -> std::io::Result<()> {
    use std::os::windows::fs::FileExt;
    while !buf.is_empty() {
        match file.seek_read(buf, offset)? {
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            n => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
        }
    }
    Ok(())
}

/// The `(rows, row length)` of the uint8 C-order 2-D array whose `.npy` file starts at
/// `offset` in `file`, and the offset of its data.
fn npy_u8_matrix(file: &File, path: &Path, offset: u64) -> Result<(usize, usize, u64)> {
    let mut r = file;
    r.seek(std::io::SeekFrom::Start(offset))
        .map_err(|e| Error::io(path, e))?;
    let (rows, row, header) = npy_u8_header(r, path)?;
    Ok((rows, row, offset + header))
}

/// The shape `(N, row)` of the 2-D uint8 `.npy` array that `r` starts with, and the
/// length of its header in bytes.
fn npy_u8_header(r: impl Read, path: &Path) -> Result<(usize, usize, u64)> {
    let bad = |m: String| array_err(path, "data", m);
    let h = npy_header(r, path, "data")?;
    if !matches!(h.descr.as_str(), "|u1" | "<u1" | ">u1" | "u1" | "=u1") {
        return Err(bad(format!(
            "expected a 2-D uint8 array (N, 3*H*W), got dtype {}",
            h.descr
        )));
    }
    if h.fortran {
        return Err(bad("Fortran-order data is not supported".into()));
    }
    let [rows, row] = h.shape[..] else {
        return Err(bad(format!(
            "expected a 2-D uint8 array (N, 3*H*W), got shape {:?}",
            h.shape
        )));
    };
    Ok((rows, row, h.len))
}

/// What an `.npy` header says.
struct NpyHeader {
    descr: String,
    fortran: bool,
    shape: Vec<usize>,
    /// Bytes before the array's values.
    len: u64,
}

/// The header of the `.npy` array `array` that `r` starts with.
fn npy_header(mut r: impl Read, path: &Path, array: &str) -> Result<NpyHeader> {
    let bad = |m: String| array_err(path, array, m);
    let mut pre = [0u8; 12];
    r.read_exact(&mut pre).map_err(|e| Error::io(path, e))?;
    if &pre[..6] != b"\x93NUMPY" {
        return Err(bad("not an .npy array (bad magic)".into()));
    }
    let (hlen, hstart) = match pre[6] {
        1 => (u16::from_le_bytes([pre[8], pre[9]]) as usize, 10u64),
        2 | 3 => (
            u32::from_le_bytes([pre[8], pre[9], pre[10], pre[11]]) as usize,
            12u64,
        ),
        v => return Err(bad(format!("unsupported .npy version {v}"))),
    };
    let mut h = vec![0u8; hlen];
    if hstart == 10 {
        // version 1: the header began at byte 10, two of which are already read
        h[..2].copy_from_slice(&pre[10..12]);
        r.read_exact(&mut h[2..]).map_err(|e| Error::io(path, e))?;
    } else {
        r.read_exact(&mut h).map_err(|e| Error::io(path, e))?;
    }
    let h = String::from_utf8_lossy(&h);
    let value = |key: &str| -> Option<&str> {
        let at = h.find(&format!("'{key}'"))? + key.len() + 2;
        let rest = h[at..].trim_start().strip_prefix(':')?.trim_start();
        Some(rest)
    };
    let descr = value("descr")
        .and_then(|r| r.strip_prefix('\''))
        .and_then(|r| r.split('\'').next())
        .ok_or_else(|| bad(format!("no dtype in the header {h}")))?
        .to_string();
    let fortran = value("fortran_order").is_some_and(|r| r.starts_with("True"));
    let shape: Vec<usize> = value("shape")
        .and_then(|r| r.strip_prefix('('))
        .and_then(|r| r.split(')').next())
        .map(|t| {
            t.split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(|x| x.trim_end_matches('L').parse::<usize>())
                .collect::<std::result::Result<Vec<_>, _>>()
        })
        .and_then(|r| r.ok())
        .ok_or_else(|| bad(format!("no shape in the header {h}")))?;
    Ok(NpyHeader {
        descr,
        fortran,
        shape,
        len: hstart + hlen as u64,
    })
}

/// The labels array of an archive entry of `size` bytes: 1-D, and no larger than the
/// bytes the entry holds (checked before the array is read and allocated).
fn check_labels_entry(r: impl Read, size: u64, path: &Path) -> Result<()> {
    let h = npy_header(r, path, "labels")?;
    let [n] = h.shape[..] else {
        return Err(array_err(
            path,
            "labels",
            format!("expected a 1-D integer array (N,), got shape {:?}", h.shape),
        ));
    };
    let item: u64 = h
        .descr
        .trim_start_matches(['<', '>', '|', '='])
        .get(1..)
        .and_then(|d| d.parse().ok())
        .unwrap_or(1);
    if (n as u128) * u128::from(item) > u128::from(size.saturating_sub(h.len)) {
        return Err(array_err(
            path,
            "labels",
            format!(
                "its header declares {n} values of {item} bytes, but the archive holds {} bytes of it",
                size.saturating_sub(h.len)
            ),
        ));
    }
    Ok(())
}

impl StreamedImagenet {
    /// Opens `split` of downsampled ImageNet at `path` (a folder or one `.npz` file).
    pub fn open(path: impl AsRef<Path>, split: Split, opts: &ImagenetOptions) -> Result<Self> {
        let files = split_files(path, split)?;
        let (mut parts, mut starts, mut labels) = (Vec::new(), Vec::new(), Vec::new());
        let mut side: Option<usize> = None;
        let mut total = 0usize;
        for f in files {
            let file = File::open(&f).map_err(|e| Error::io(&f, e))?;
            let mut zip = zip::ZipArchive::new(&file).map_err(|e| npz_err(&f, e))?;
            if zip.index_for_name("data.npy").is_none() {
                let present: Vec<&str> = zip
                    .file_names()
                    .map(|n| n.trim_end_matches(".npy"))
                    .collect();
                return Err(Error::NpzMissingArray {
                    path: f.clone(),
                    array: "data".into(),
                    present: present.join(", "),
                });
            }
            let (method, start) = {
                let entry = zip.by_name("data.npy").map_err(|e| npz_err(&f, e))?;
                (entry.compression(), entry.data_start())
            };
            if method != zip::CompressionMethod::Stored {
                return Err(array_err(
                    &f,
                    "data",
                    format!(
                        "stored compressed ({method}); streaming reads uncompressed archives \
                         (as np.savez writes them) — set data.stream = false to read it \
                         into memory"
                    ),
                ));
            }
            let (rows, row, data_offset) = npy_u8_matrix(&file, &f, start)?;
            let s = image_side(&f, row, opts)?;
            if let Some(p) = side.filter(|&p| p != s) {
                return Err(Error::Inconsistent {
                    path: f.clone(),
                    message: format!("{s}x{s} images after {p}x{p} ones"),
                });
            }
            side = Some(s);
            if let Ok(entry) = zip.by_name("labels.npy") {
                let size = entry.size();
                check_labels_entry(entry, size, &f)?;
            };
            let mut npz =
                NpzReader::new(std::io::BufReader::new(&file)).map_err(|e| npz_err(&f, e))?;
            let raw = read_labels(&mut npz, &f, "labels")?;
            labels.extend(convert_labels(&f, &raw, rows, opts)?);
            starts.push(total);
            total += rows;
            parts.push(Part {
                path: f,
                file,
                data_offset,
                rows,
            });
        }
        let side = side.ok_or_else(|| Error::MissingFiles {
            dir: PathBuf::new(),
            expected: "at least one .npz archive".into(),
        })?;
        Ok(StreamedImagenet {
            parts,
            starts,
            labels,
            side,
        })
    }
}

impl ImageSource for StreamedImagenet {
    fn shape(&self) -> (usize, usize, usize) {
        (3, self.side, self.side)
    }

    fn len(&self) -> usize {
        self.labels.len()
    }

    fn labelled(&self) -> bool {
        true
    }

    fn read_into(&self, i: usize, _epoch: usize, out: &mut [u8]) -> Result<Option<u32>> {
        check_read(self, i, out)?;
        let p = self.starts.partition_point(|&s| s <= i) - 1;
        let part = &self.parts[p];
        let r = i - self.starts[p];
        debug_assert!(r < part.rows);
        let at = part.data_offset + (r * out.len()) as u64;
        read_at(&part.file, out, at).map_err(|e| Error::io(&part.path, e))?;
        Ok(Some(self.labels[i]))
    }

    fn describe(&self) -> String {
        format!(
            "{} images of 3×{}×{} in {} .npz archive(s), read as needed",
            self.labels.len(),
            self.side,
            self.side,
            self.parts.len()
        )
    }
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
