//! Real NVP normalizing flows on candle: the umbrella crate.
//!
//! [`flow`] (`nvp-flow`) holds the bijections, the multi-scale model, Adam and
//! parameter averaging; [`data`] (`nvp-data`) the dataset readers, the dequantisation
//! and logit map with their exact log-determinant, and batching. Neither does any
//! printing; the `nvp` command (`nvp-cli`) is built on them.
//!
//! # From pixels to bits/dim, one training step, samples
//!
//! Every number below is exact for the model it comes from: the bits/dim add the
//! model's log-density in logit space to the preprocessing's log-determinant
//! (dequantisation, the `1/256` scaling and the logit), and decoding inverts encoding
//! to rounding error.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use nvp::data::{bits_per_dim, Dequantize, DEFAULT_ALPHA};
//! use nvp::flow::{Adam, AdamConfig, Mode, ParamStore, RealNvp, RealNvpConfig};
//! use rand::rngs::StdRng;
//! use rand::{Rng, SeedableRng};
//!
//! # fn main() -> anyhow::Result<()> {
//! let device = Device::Cpu;
//! // A small Real NVP for 3 × 8 × 8 images: two scales, one residual block, 8 features.
//! let cfg = RealNvpConfig {
//!     height: 8,
//!     width: 8,
//!     res_blocks: 1,
//!     features: 8,
//!     ..RealNvpConfig::cifar10()
//! };
//! let store = ParamStore::new(0); // seeded initialisation; stable checkpoint keys
//! // Each s/t network's parameters in one flat variable (the same values and names;
//! // fewer tensors for autograd and the optimizer; `RealNvp::new` keeps them apart).
//! let model = RealNvp::new_packed(&cfg, &store, DType::F32, &device)?;
//!
//! // A batch of 8-bit images (N × C × H × W, planar), dequantised with uniform noise
//! // and mapped to logit space; `ld_pre` is that map's log-determinant per image.
//! let (n, dims) = (4, model.dims());
//! let mut rng = StdRng::seed_from_u64(1);
//! let pixels: Vec<u8> = (0..n * dims).map(|_| rng.random()).collect();
//! let deq = Dequantize::new(DEFAULT_ALPHA)?;
//! let mut y = vec![0f32; n * dims];
//! let mut ld_pre = Vec::with_capacity(n);
//! for (img, out) in pixels.chunks(dims).zip(y.chunks_mut(dims)) {
//!     ld_pre.push(deq.apply(img, &mut rng, out)?);
//! }
//! let y = Tensor::from_vec(y, (n, cfg.channels, cfg.height, cfg.width), &device)?;
//!
//! // One training step: minimise the batch's bits/dim (`ld_pre` is a constant here;
//! // batch norm in train mode normalises by the batch's statistics and updates its
//! // running averages).
//! let mut adam = Adam::for_store(&store, AdamConfig::default())?;
//! let log_p = model.log_prob(&y, Mode::Train)?; // (N,) nats, logit space
//! let loss = (log_p.mean_all()? * (-1.0 / (dims as f64 * std::f64::consts::LN_2)))?;
//! let grads = loss.backward()?;
//! adam.step(&grads, 1.0)?;
//!
//! // Evaluation (running averages): bits/dim of each 8-bit image.
//! let log_p: Vec<f64> = model.log_prob(&y, Mode::Eval)?.to_dtype(DType::F64)?.to_vec1()?;
//! for (lp, ld) in log_p.iter().zip(&ld_pre) {
//!     let bpd = bits_per_dim(*lp, *ld, dims);
//!     assert!(bpd.is_finite() && bpd > 0.0);
//! }
//!
//! // Encoding and decoding are each other's inverse.
//! let (zs, _log_det) = model.encode(&y, Mode::Eval)?;
//! let back = model.decode(&zs)?;
//! let err = (back - &y)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(err < 1e-3, "inverse error {err}");
//!
//! // Samples at temperature 0.7, in logit space; `Logit::to_pixels` turns them into
//! // 8-bit pixels.
//! let samples = model.sample(2, 0.7, &mut rng)?;
//! assert_eq!(samples.dims(), &[2, 3, 8, 8]);
//! let px = deq.logit.to_pixels(&samples.flatten_all()?.to_vec1::<f32>()?);
//! assert_eq!(px.len(), 2 * dims);
//! # Ok(())
//! # }
//! ```
pub use nvp_data as data;
pub use nvp_flow as flow;
