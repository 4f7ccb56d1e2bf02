//! [`ParamStore`]: the model's named parameters and buffers, with a seeded
//! initialiser.
//!
//! candle's own initialisers draw from an unseeded RNG on the CPU. The store
//! plugs into [`VarBuilder`] as a backend: a tensor that already exists under
//! a name is returned (shape checked), a new one is drawn from the store's
//! seeded RNG and registered. Names are stable checkpoint keys.
//! Batch-norm running statistics are stored beside the parameters (names
//! ending in `running_mean` / `running_var`) and are not trainable.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::{FanInOut, Init, NormalOrUniform};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// Suffixes of non-trainable buffers.
const BUFFER_SUFFIXES: [&str; 2] = ["running_mean", "running_var"];

/// Whether a parameter name is a non-trainable buffer.
pub fn is_buffer(name: &str) -> bool {
    BUFFER_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// Named tensors with a seeded initialiser; clones share the same storage.
#[derive(Clone)]
pub struct ParamStore {
    map: VarMap,
    rng: Arc<Mutex<StdRng>>,
}

impl ParamStore {
    /// An empty store whose new tensors are drawn from `StdRng::seed_from_u64(seed)`.
    pub fn new(seed: u64) -> Self {
        Self {
            map: VarMap::new(),
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(seed))),
        }
    }

    /// A [`VarBuilder`] over this store.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// A [`VarBuilder`] over *detached* views of this store's tensors: a
    /// model built from it shares the storage (it sees every later update of
    /// the parameters and running statistics) but records no autograd graph,
    /// so evaluation and sampling free their activations as they go — the
    /// equivalent of PyTorch's `no_grad`. Build the model over
    /// [`ParamStore::var_builder`] first, so every tensor exists.
    pub fn frozen_var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        let ts = self
            .named_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect::<HashMap<_, _>>();
        VarBuilder::from_tensors(ts, dtype, device)
    }

    /// The underlying candle `VarMap` (e.g. for `VarMap::save`).
    pub fn var_map(&self) -> &VarMap {
        &self.map
    }

    /// All (name, variable) pairs, sorted by name.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let data = self.map.data().lock().expect("param store poisoned");
        let mut v: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Trainable variables (buffers excluded), sorted by name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.named_vars()
            .into_iter()
            .filter(|(n, _)| !is_buffer(n))
            .collect()
    }

    /// Number of trainable scalars.
    pub fn num_trainable(&self) -> usize {
        self.trainable_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Number of buffer scalars (batch-norm running statistics).
    pub fn num_buffers(&self) -> usize {
        self.named_vars()
            .iter()
            .filter(|(n, _)| is_buffer(n))
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// A snapshot of every tensor, by name (for saving).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.named_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    /// Overwrite every tensor of the store from `src`. Every name of the store
    /// must be present with the same shape; extra names in `src` are an error
    /// too (they mean the checkpoint belongs to another architecture).
    pub fn load_tensors(&self, src: &HashMap<String, Tensor>) -> Result<()> {
        let vars = self.named_vars();
        for (name, var) in &vars {
            let t = src.get(name).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "tensor `{name}` (shape {:?}) is missing from the checkpoint",
                    var.dims()
                ))
            })?;
            if t.dims() != var.dims() {
                candle_core::bail!(
                    "tensor `{name}`: the checkpoint has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                );
            }
        }
        if let Some(extra) = src
            .keys()
            .filter(|k| !vars.iter().any(|(n, _)| n == *k))
            .min()
        {
            candle_core::bail!(
                "tensor `{extra}` in the checkpoint is not a parameter of the model"
            );
        }
        for (name, var) in &vars {
            let t = &src[name];
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    fn draw(&self, shape: &Shape, init: Init) -> Vec<f64> {
        let n = shape.elem_count();
        let mut rng = self.rng.lock().expect("param store rng poisoned");
        let normal = |rng: &mut StdRng, mean: f64, std: f64| -> Vec<f64> {
            (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(rng);
                    mean + std * z
                })
                .collect()
        };
        match init {
            Init::Const(c) => vec![c; n],
            Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
            Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up)).collect(),
            Init::Kaiming {
                dist,
                fan,
                non_linearity,
            } => {
                let fan = match fan {
                    FanInOut::FanIn | FanInOut::FanOut => fan.for_shape(shape),
                };
                let std = non_linearity.gain() / (fan.max(1) as f64).sqrt();
                match dist {
                    NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
                    NormalOrUniform::Uniform => {
                        let b = 3f64.sqrt() * std;
                        (0..n).map(|_| rng.random_range(-b..b)).collect()
                    }
                }
            }
        }
    }
}

impl SimpleBackend for ParamStore {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        {
            let data = self.map.data().lock().expect("param store poisoned");
            if let Some(v) = data.get(name) {
                if v.shape() != &s {
                    candle_core::bail!(
                        "parameter `{name}` exists with shape {:?}, requested {:?}",
                        v.dims(),
                        s.dims()
                    );
                }
                return v.as_tensor().to_dtype(dtype);
            }
        }
        let values = self.draw(&s, h);
        let t = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        self.map
            .data()
            .lock()
            .expect("param store poisoned")
            .insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let data = self.map.data().lock().expect("param store poisoned");
        match data.get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("parameter `{name}` not found"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map
            .data()
            .lock()
            .expect("param store poisoned")
            .contains_key(name)
    }
}

/// The [`Var`] behind a tensor handed out by a [`ParamStore`] builder, so a
/// layer can update it in place (running statistics, data-dependent init).
pub(crate) fn as_var(t: &Tensor) -> Result<Var> {
    Var::from_tensor(t)
}
