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
//!
//! # A flow of your own
//!
//! Layers compose with [`Sequential`]; forward returns the output and each sample's
//! log-determinant, inverse undoes it. Here two checkerboard couplings of opposite
//! parity (so that every pixel is transformed), a squeeze, and a channel coupling:
//!
//! ```
//! use nvp_flow::conditioner::ResNetConfig;
//! use nvp_flow::squeeze::Squeeze;
//! use nvp_flow::{AffineCoupling, DType, Device, Flow, Mask, Mode, ParamStore, Sequential, Tensor};
//!
//! # fn main() -> candle_core::Result<()> {
//! let store = ParamStore::new(0);
//! let vb = store.var_builder(DType::F64, &Device::Cpu);
//! let net = |channels| ResNetConfig { channels, features: 8, blocks: 1, ..Default::default() };
//! let mut flow = Sequential::new();
//! flow.push(AffineCoupling::resnet(Mask::checkerboard(0), net(3), vb.pp("c0"))?);
//! flow.push(AffineCoupling::resnet(Mask::checkerboard(1), net(3), vb.pp("c1"))?);
//! flow.push(Squeeze);
//! flow.push(AffineCoupling::resnet(Mask::channel(0), net(12), vb.pp("c2"))?);
//!
//! let x = Tensor::randn(0f64, 1.0, (2, 3, 8, 8), &Device::Cpu)?;
//! let (y, log_det) = flow.forward(&x, Mode::Eval)?;
//! assert_eq!(y.dims(), &[2, 12, 4, 4]);
//! assert_eq!(log_det.dims(), &[2]); // log |det ∂y/∂x| per sample
//! let err = (flow.inverse(&y)? - &x)?.abs()?.max_all()?.to_scalar::<f64>()?;
//! assert!(err < 1e-12, "inverse error {err}");
//! # Ok(())
//! # }
//! ```
//!
//! The log-determinants are checked against brute-force Jacobians in the tests
//! (`tests/flow_layers.rs`).

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
pub use optim::{Adam, AdamConfig, L2Gradient, UpdateMode};
pub use params::ParamStore;
pub use prior::StandardNormal;

pub use candle_core::{DType, Device, Result, Tensor};
/// bf16 products in the CPU's convolutions for a scope (training only; see
/// [`Bf16Products`]), and whether this CPU has them.
pub use nvp_kernels::{bf16_products_available, Bf16Products};
