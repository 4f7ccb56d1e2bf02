//! # nvp-flow — exact Real NVP bijections on candle
//!
//! The building blocks of Real NVP (Dinh, Sohl-Dickstein & Bengio, ICLR 2017):
//! affine coupling layers with checkerboard and channel masks ([`coupling`],
//! [`mask`]), the batch-norm bijection with its log-determinant
//! ([`batch_norm`]), squeeze ([`squeeze`]), and the multi-scale model with
//! factor-out ([`multiscale`]), plus a standard normal prior ([`prior`]) and
//! the bits/dim helpers ([`bits`]), Adam ([`optim`]) and parameter averaging ([`ema`]).
//!
//! Every layer implements [`Flow`]: `forward(x, mode)` returns the output and
//! the per-sample log-determinant, `inverse(y)` returns the input. Parameters
//! live in a [`ParamStore`] (a candle `VarMap` with a seeded initialiser), so
//! checkpoint keys are stable and initialisation is reproducible.
//!
//! This crate does no file I/O and no printing; randomness comes in as a
//! seeded RNG.

pub mod batch_norm;
pub mod bits;
pub mod conditioner;
pub mod config;
pub mod coupling;
pub mod ema;
pub mod flow;
pub mod mask;
pub mod multiscale;
pub mod nn;
pub mod optim;
pub mod params;
pub mod prior;
pub mod squeeze;

pub use batch_norm::{BatchNormVariant, FlowBatchNorm};
pub use config::{ConfigError, RealNvpConfig};
pub use coupling::AffineCoupling;
pub use ema::Ema;
pub use flow::{Flow, Mode, Sequential};
pub use mask::{Mask, MaskKind};
pub use multiscale::RealNvp;
pub use optim::{Adam, AdamConfig, UpdateMode};
pub use params::ParamStore;
pub use prior::StandardNormal;

pub use candle_core::{DType, Device, Result, Tensor};
