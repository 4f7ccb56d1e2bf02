//! [`ParamStore`]: the model's named parameters and buffers, with a seeded
//! initialiser.
//!
//! candle's own initialisers draw from an unseeded RNG on the CPU. The store
//! plugs into [`VarBuilder`] as a backend: a tensor that already exists under
//! a name is returned (shape checked), a new one is drawn from the store's
//! seeded RNG and registered. Names are stable checkpoint keys.
//! Batch-norm running statistics are stored beside the parameters (names
//! ending in `running_mean` / `running_var`) and are not trainable.
//!
//! **Packed groups.** [`ParamStore::pack`] moves named parameters into one flat
//! variable (a *group*, e.g. every parameter of one s/t network), each name then
//! a view of its slice: a layer built afterwards gets the view (the same values,
//! updated with the group), a one-node network op takes the group itself, and
//! autograd, the optimizer and the averaging see one tensor where they saw dozens.
//! Checkpoints are unchanged: [`ParamStore::tensors`] and
//! [`ParamStore::load_tensors`] speak in the member names.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
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
    /// The variables: single tensors and packed groups.
    map: VarMap,
    /// Names that are slices of a packed group.
    views: Arc<Mutex<HashMap<String, View>>>,
    /// Each packed group's members, in order.
    groups: Arc<Mutex<HashMap<String, Vec<Member>>>>,
    rng: Arc<Mutex<StdRng>>,
}

/// A name whose tensor is a slice of a packed group.
#[derive(Clone)]
struct View {
    group: String,
    offset: usize,
    /// The slice, shaped: one tensor handed out every time (a stable id, so that
    /// [`ParamStore::locate`] finds it).
    tensor: Tensor,
}

/// One parameter of a packed group: its name, where it starts in the flat variable,
/// its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub name: String,
    pub offset: usize,
    pub shape: Shape,
}

impl ParamStore {
    /// An empty store whose new tensors are drawn from `StdRng::seed_from_u64(seed)`.
    pub fn new(seed: u64) -> Self {
        Self {
            map: VarMap::new(),
            views: Arc::default(),
            groups: Arc::default(),
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(seed))),
        }
    }

    /// Moves the tensors `members` (existing, of one dtype and device) into one flat
    /// variable named `group`, in that order; each member's name then stands for a
    /// view of its slice. Values do not change. The members are all trainable, or all
    /// buffers (running statistics) under a group name that is a buffer's too
    /// ([`is_buffer`]), so that the group is classed as they are. Build the model
    /// again over [`ParamStore::var_builder`] afterwards: layers built before keep the
    /// old, separate tensors, which no longer train or update the store.
    pub fn pack(&self, group: &str, members: &[String]) -> Result<()> {
        if self.contains_tensor(group) {
            candle_core::bail!("cannot pack into `{group}`: the name is taken");
        }
        // Lock order, here and everywhere: groups, then the variables, then the views.
        let mut groups = self.groups.lock().expect("param store poisoned");
        let mut data = self.map.data().lock().expect("param store poisoned");
        let mut parts = Vec::with_capacity(members.len());
        let mut layout = Vec::with_capacity(members.len());
        let mut offset = 0;
        for (i, name) in members.iter().enumerate() {
            if members[..i].contains(name) {
                candle_core::bail!("cannot pack `{name}` into `{group}` twice");
            }
            let var = data.get(name).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "cannot pack `{name}` into `{group}`: no such single parameter"
                ))
            })?;
            if is_buffer(name) != is_buffer(group) {
                let (kind, other) = if is_buffer(name) {
                    ("a buffer", "a trainable group")
                } else {
                    ("trainable", "a buffer group")
                };
                candle_core::bail!("cannot pack `{name}` ({kind}) into `{group}` ({other})");
            }
            if let Some(first) = parts.first() {
                let first: &Tensor = first;
                if var.dtype() != first.dtype() || !var.device().same_device(first.device()) {
                    candle_core::bail!(
                        "cannot pack `{name}` into `{group}`: its dtype or device differs"
                    );
                }
            }
            parts.push(var.as_tensor().flatten_all()?);
            layout.push(Member {
                name: name.clone(),
                offset,
                shape: var.shape().clone(),
            });
            offset += var.elem_count();
        }
        if parts.is_empty() {
            candle_core::bail!("cannot pack an empty group `{group}`");
        }
        // Written in place: no concatenated temporary and no copy of it into a variable.
        let first: &Tensor = &parts[0];
        let flat = Var::zeros(offset, first.dtype(), first.device())?;
        for (part, m) in parts.iter().zip(&layout) {
            flat.as_tensor().slice_set(part, 0, m.offset)?;
        }
        drop(parts);
        let mut views = self.views.lock().expect("param store poisoned");
        for m in &layout {
            let tensor = flat
                .as_tensor()
                .narrow(0, m.offset, m.shape.elem_count())?
                .reshape(m.shape.clone())?;
            data.remove(&m.name);
            views.insert(
                m.name.clone(),
                View {
                    group: group.to_string(),
                    offset: m.offset,
                    tensor,
                },
            );
        }
        data.insert(group.to_string(), flat);
        groups.insert(group.to_string(), layout);
        Ok(())
    }

    /// The members of the packed group `group`, or `None` where `group` is not one.
    pub fn group_members(&self, group: &str) -> Option<Vec<Member>> {
        self.groups
            .lock()
            .expect("param store poisoned")
            .get(group)
            .cloned()
    }

    /// The gradients in `grads` of the trainable tensors, by their own names (a
    /// packed group's split into its members', as views); a variable without a
    /// gradient is left out.
    pub fn grads_by_name(&self, grads: &GradStore) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, var) in self.trainable_vars() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            match self.group_members(&name) {
                Some(members) => {
                    for m in members {
                        let t = g
                            .narrow(0, m.offset, m.shape.elem_count())?
                            .reshape(m.shape)?;
                        out.insert(m.name, t);
                    }
                }
                None => {
                    out.insert(name, g.clone());
                }
            }
        }
        Ok(out)
    }

    /// Where a tensor handed out by this store's builder lives: a variable's own
    /// tensor gives `(its name, 0)`, a packed member's view `(its group, its
    /// offset)`; `None` for any other tensor.
    pub fn locate(&self, t: &Tensor) -> Option<(String, usize)> {
        if let Some(v) = self
            .views
            .lock()
            .expect("param store poisoned")
            .values()
            .find(|v| v.tensor.id() == t.id())
        {
            return Some((v.group.clone(), v.offset));
        }
        let data = self.map.data().lock().expect("param store poisoned");
        data.iter()
            .find(|(_, v)| v.as_tensor().id() == t.id())
            .map(|(k, _)| (k.clone(), 0))
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
        let mut ts = self
            .named_vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect::<HashMap<_, _>>();
        for (name, view) in self.views.lock().expect("param store poisoned").iter() {
            ts.insert(name.clone(), view.tensor.detach());
        }
        VarBuilder::from_tensors(ts, dtype, device)
    }

    /// The underlying candle `VarMap` (e.g. for `VarMap::save`).
    pub fn var_map(&self) -> &VarMap {
        &self.map
    }

    /// All (name, variable) pairs, sorted by name: single tensors and packed groups
    /// (not the groups' members: see [`ParamStore::tensors`]).
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

    /// Every tensor by its own name (a packed group's members, not the group): what a
    /// checkpoint holds. The tensors share the store's storage.
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        let groups = self.groups.lock().expect("param store poisoned");
        let mut out: HashMap<String, Tensor> = self
            .named_vars()
            .into_iter()
            .filter(|(k, _)| !groups.contains_key(k))
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        for (name, view) in self.views.lock().expect("param store poisoned").iter() {
            out.insert(name.clone(), view.tensor.clone());
        }
        out
    }

    /// Overwrite every tensor of the store from `src`. Every name of the store
    /// must be present with the same shape; extra names in `src` are an error
    /// too (they mean the checkpoint belongs to another architecture).
    pub fn load_tensors(&self, src: &HashMap<String, Tensor>) -> Result<()> {
        let own = self.tensors();
        let mut names: Vec<&String> = own.keys().collect();
        names.sort();
        for name in &names {
            let want = &own[*name];
            let t = src.get(*name).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "tensor `{name}` (shape {:?}) is missing from the checkpoint",
                    want.dims()
                ))
            })?;
            if t.dims() != want.dims() {
                candle_core::bail!(
                    "tensor `{name}`: the checkpoint has shape {:?}, the model expects {:?}",
                    t.dims(),
                    want.dims()
                );
            }
        }
        if let Some(extra) = src.keys().filter(|k| !own.contains_key(*k)).min() {
            candle_core::bail!(
                "tensor `{extra}` in the checkpoint is not a parameter of the model"
            );
        }
        let groups = self.groups.lock().expect("param store poisoned").clone();
        for (name, var) in self.named_vars() {
            let t = match groups.get(&name) {
                Some(members) => {
                    let parts = members
                        .iter()
                        .map(|m| src[&m.name].flatten_all())
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::cat(&parts, 0)?
                }
                None => src[&name].clone(),
            };
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
        if let Some(v) = self.views.lock().expect("param store poisoned").get(name) {
            if v.tensor.shape() != &s {
                candle_core::bail!(
                    "parameter `{name}` exists with shape {:?}, requested {:?}",
                    v.tensor.dims(),
                    s.dims()
                );
            }
            return v.tensor.to_dtype(dtype);
        }
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
        if let Some(v) = self.views.lock().expect("param store poisoned").get(name) {
            return v.tensor.to_dtype(dtype);
        }
        let data = self.map.data().lock().expect("param store poisoned");
        match data.get(name) {
            Some(v) => v.as_tensor().to_dtype(dtype),
            None => candle_core::bail!("parameter `{name}` not found"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.views
            .lock()
            .expect("param store poisoned")
            .contains_key(name)
            || self
                .map
                .data()
                .lock()
                .expect("param store poisoned")
                .contains_key(name)
    }
}

/// The [`Var`] behind a tensor handed out by a [`ParamStore`] builder, so a
/// layer can update it in place (data-dependent init). An error for a tensor that is
/// not a variable (a packed group's view, a frozen builder's detached tensor), where
/// `Var::from_tensor` would update a copy and lose the update.
pub(crate) fn as_var(t: &Tensor) -> Result<Var> {
    if !t.is_variable() {
        candle_core::bail!(
            "a tensor of shape {:?} is not a variable: it cannot be updated through one",
            t.dims()
        );
    }
    Var::from_tensor(t)
}

/// Overwrites `t`, a tensor handed out by a [`ParamStore`] builder, with `new` (its
/// shape), in place: through its variable, or, for a view of one (a packed group's
/// member, a frozen builder's detached tensor), in the storage it shares.
pub(crate) fn set_in_place(t: &Tensor, new: &Tensor) -> Result<()> {
    if t.is_variable() {
        return as_var(t)?.set(new);
    }
    if new.dims() != t.dims() {
        candle_core::bail!("set_in_place: shape {:?} into {:?}", new.dims(), t.dims());
    }
    let new = new.to_dtype(t.dtype())?.force_contiguous()?;
    t.slice_set(&new, 0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An update through a view (a packed member, a frozen builder's detached tensor)
    /// reaches the store; a view is refused as a variable, where `Var::from_tensor`
    /// would update a copy.
    #[test]
    fn in_place_updates_reach_the_store_through_views() {
        let store = ParamStore::new(0);
        let vb = store.var_builder(DType::F64, &Device::Cpu);
        vb.get(2, "a").unwrap();
        vb.get(3, "b").unwrap();
        store
            .pack("g", &["a".to_string(), "b".to_string()])
            .unwrap();
        let b = vb.get(3, "b").unwrap();
        assert!(as_var(&b).is_err());
        let new = Tensor::new(&[1.0f64, 2.0, 3.0], &Device::Cpu).unwrap();
        set_in_place(&b, &new).unwrap();
        let frozen = store.frozen_var_builder(DType::F64, &Device::Cpu);
        let a = frozen.get(2, "a").unwrap();
        set_in_place(&a, &Tensor::new(&[4.0f64, 5.0], &Device::Cpu).unwrap()).unwrap();
        let (_, g) = store.named_vars().pop().unwrap();
        assert_eq!(
            g.as_tensor().to_vec1::<f64>().unwrap(),
            [4.0, 5.0, 1.0, 2.0, 3.0]
        );
        assert!(set_in_place(&b, &Tensor::zeros(2, DType::F64, &Device::Cpu).unwrap()).is_err());
    }
}
