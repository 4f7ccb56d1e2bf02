//! The crate's error type: every failure names what it concerns (the file, the record
//! index and byte offset, the array, the folder) so that a user can fix the input.

use std::path::PathBuf;

/// Errors of the data crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error while reading `path`.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder being read.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A file that must hold at least one record is empty.
    #[error("{}: the file is empty", path.display())]
    EmptyFile {
        /// The empty file.
        path: PathBuf,
    },

    /// A CIFAR-10 binary file whose size is not a whole number of records.
    #[error(
        "{}: file size {size} bytes is not a multiple of the {record_bytes}-byte CIFAR-10 \
         record: record {record} at byte offset {offset} is truncated ({remaining} of \
         {record_bytes} bytes)",
        path.display()
    )]
    CifarTruncated {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
        /// The record size (3073).
        record_bytes: usize,
        /// Index of the incomplete record.
        record: usize,
        /// Byte offset at which the incomplete record starts.
        offset: u64,
        /// Bytes present for the incomplete record.
        remaining: usize,
    },

    /// A label outside the valid range.
    #[error(
        "{}: record {record}{} has label {label}, expected {min}..={max}",
        path.display(),
        offset.map(|o| format!(" (byte offset {o})")).unwrap_or_default()
    )]
    LabelOutOfRange {
        /// The file.
        path: PathBuf,
        /// Index of the record (image) in the file.
        record: usize,
        /// Byte offset of the label within the file, where that means something (a
        /// binary record file; not a compressed array).
        offset: Option<u64>,
        /// The label as found in the file.
        label: i64,
        /// The smallest and largest valid labels.
        min: i64,
        max: i64,
    },

    /// Required dataset files are missing.
    #[error("{}: missing dataset files: {expected}", dir.display())]
    MissingFiles {
        /// The folder that was searched.
        dir: PathBuf,
        /// What was expected there.
        expected: String,
    },

    /// An image file that cannot be decoded.
    #[error("{}: cannot read image: {source}", path.display())]
    ImageDecode {
        /// The image file.
        path: PathBuf,
        /// The decoder's error.
        #[source]
        source: image::ImageError,
    },

    /// An image whose size differs from the others (when no resizing preset is used).
    #[error(
        "{}: image is {width}x{height}, expected {expected_width}x{expected_height} like the \
         first image (use a resizing preset)",
        path.display()
    )]
    ImageSize {
        /// The image file.
        path: PathBuf,
        /// Its width.
        width: usize,
        /// Its height.
        height: usize,
        /// The expected width.
        expected_width: usize,
        /// The expected height.
        expected_height: usize,
    },

    /// A folder with no usable images in it.
    #[error("{}: no images found ({what})", dir.display())]
    EmptyFolder {
        /// The folder.
        dir: PathBuf,
        /// What was looked for, or why nothing is left.
        what: String,
    },

    /// An `.npz` archive that cannot be opened or read.
    #[error("{}: cannot read npz archive: {message}", path.display())]
    Npz {
        /// The archive.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },

    /// An `.npz` archive without a required array.
    #[error("{}: npz archive has no array `{array}` (arrays present: {present})", path.display())]
    NpzMissingArray {
        /// The archive.
        path: PathBuf,
        /// The missing array's name.
        array: String,
        /// The arrays that the archive does hold.
        present: String,
    },

    /// An `.npz` array with the wrong type or shape.
    #[error("{}: array `{array}`: {message}", path.display())]
    NpzArray {
        /// The archive.
        path: PathBuf,
        /// The array's name.
        array: String,
        /// What is wrong with it.
        message: String,
    },

    /// Two parts of one dataset disagree (image sizes, label presence).
    #[error("{}: {message}", path.display())]
    Inconsistent {
        /// The file that disagrees with the ones read before it.
        path: PathBuf,
        /// How.
        message: String,
    },

    /// An invalid argument (a parameter out of range, mismatched lengths, an index past the
    /// end).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// An unknown toy-distribution name.
    #[error("unknown 2-D toy distribution `{name}` (known: {known})")]
    UnknownToy {
        /// The name given.
        name: String,
        /// The names accepted.
        known: String,
    },

    /// A candle error while building a tensor.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// The loader's background thread stopped unexpectedly.
    #[error("data loader worker thread failed: {0}")]
    Worker(String),
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// An [`Error::InvalidArgument`].
    pub(crate) fn arg(message: impl Into<String>) -> Self {
        Error::InvalidArgument(message.into())
    }
}
