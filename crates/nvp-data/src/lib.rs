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
//!
//! # Bits/dim by hand
//!
//! One sub-pixel of value 128 with dequantisation noise 0 is `x = 128`, so
//! `p = α + (1 − 2α)·128/256 = 0.5` and `y = logit(p) = 0`; the map's log-determinant is
//! `ln(1 − 2α) − ln 256 − ln p − ln(1 − p) = ln 0.9 − 6 ln 2` (α = 0.05). Under a
//! standard normal in logit space, `log p(y) = −½ ln 2π`, and the bits/dim of the
//! 8-bit value are `−(log p(y) + ld_pre) / ln 2`:
//!
//! ```
//! use nvp_data::preprocess::standard_normal_log_prob;
//! use nvp_data::{bits_per_dim, Dequantize, DEFAULT_ALPHA};
//! use std::f64::consts::{LN_2, PI};
//!
//! let deq = Dequantize::new(DEFAULT_ALPHA).unwrap();
//! let (y, ld_pre) = deq.apply_with_noise_f64(&[128], &[0.0]).unwrap();
//! assert!(y[0].abs() < 1e-15);
//! assert!((ld_pre - (0.9f64.ln() - 6.0 * LN_2)).abs() < 1e-12);
//!
//! let log_p_y = standard_normal_log_prob(&y);
//! let by_hand = (0.5 * (2.0 * PI).ln() - 0.9f64.ln() + 6.0 * LN_2) / LN_2; // ≈ 7.478
//! assert!((bits_per_dim(log_p_y, ld_pre, 1) - by_hand).abs() < 1e-12);
//! ```

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
