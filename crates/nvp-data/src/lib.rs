//! Data for Real NVP: dataset readers returning 8-bit images ([`ImageSet`], or any
//! [`ImageSource`]), the exact dequantisation + logit preprocessing with its
//! log-determinant and bits per dimension ([`preprocess`]), flips ([`augment`]) and a
//! deterministic, prefetching batch loader ([`loader`]).
//!
//! Readers: CIFAR-10 binary ([`cifar`]), image folders with the CelebA / LSUN presets
//! ([`folder`] reads them into memory; [`streamed`] decodes them as batches need them,
//! for datasets larger than memory), downsampled ImageNet `.npz` ([`imagenet`]: into
//! memory, or row by row as batches need them), a
//! procedural image set that needs no files ([`procedural`]) and 2-D toy distributions
//! ([`toy2d`]).
//!
//! The crate reads dataset files and nothing else: it never writes files or prints.

pub mod augment;
pub mod cifar;
pub mod error;
pub mod folder;
pub mod image_set;
pub mod imagenet;
pub mod loader;
pub mod preprocess;
pub mod procedural;
pub mod seed;
pub mod source;
pub mod streamed;
pub mod toy2d;

pub use error::{Error, Result};
pub use image_set::{ImageSet, Split};
pub use imagenet::StreamedImagenet;
pub use loader::{Batch, Batches, Loader, LoaderConfig};
pub use preprocess::{bits_per_dim, Dequantize, Logit, DEFAULT_ALPHA};
pub use procedural::{Procedural, ProceduralConfig};
pub use source::{ImageSource, Prefix};
pub use streamed::StreamedFolder;
pub use toy2d::Toy2d;
