//! Adam (Kingma & Ba) with PyTorch's L2 convention and global gradient-norm
//! clipping, with its state exposed by name so that a training run can be
//! checkpointed and resumed exactly.
//!
//! candle-nn's `AdamW` has decoupled weight decay and keeps its moments
//! private; the paper uses plain Adam with an L2 penalty on some parameters,
//! which the caller adds to the loss.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, TensorId, Var};

use crate::params::{Member, ParamStore};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    /// Where this variable's moments start in the flat `m` and `v`.
    offset: usize,
    /// A packed group's members: the state is saved and loaded under their names.
    members: Option<Vec<Member>>,
}

/// How [`Adam::step`] runs its arithmetic; the results are the same to the bit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpdateMode {
    /// [`UpdateMode::Fused`] on the CPU (f32/f64, unless the fast CPU kernels are
    /// switched off: then [`UpdateMode::PerVariable`]), [`UpdateMode::Flat`] off it.
    #[default]
    Auto,
    /// In place, one pass over each variable with its moments
    /// (`nvp_kernels::adam_update`, f32/f64 on the CPU; elsewhere as
    /// [`UpdateMode::PerVariable`]).
    Fused,
    /// When every variable has a gradient: the gradients concatenated, the moment
    /// and step arithmetic as a dozen ops on the whole vector, then each variable
    /// takes its slice of the step (in place by one cuDNN call where
    /// `nvp_kernels::try_blend_in_place` applies) — on a GPU one or two kernel
    /// launches per variable instead of fifteen. [`Adam::grad_norm`] then also works
    /// on the concatenated gradients, and hands them on to the step.
    Flat,
    /// Variable by variable, as candle ops (the reference the others are tested against).
    PerVariable,
}

/// Adam over named variables.
///
/// The moments of all variables live in two flat vectors (one allocation each); the
/// update runs over them at once or variable by variable ([`UpdateMode`]), with the
/// same arithmetic per element either way. Variables without a gradient are always
/// updated one by one, the others left alone.
pub struct Adam {
    cfg: AdamConfig,
    slots: Vec<Slot>,
    m: Var,
    v: Var,
    step: u64,
    mode: UpdateMode,
    /// The gradients concatenated by the last [`Adam::grad_norm`] on the flat path,
    /// with the ids of the tensors they came from, for the step that follows.
    flat_grad: Mutex<Option<(Vec<TensorId>, Tensor)>>,
}

impl Adam {
    /// All variables must share one dtype and device.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamConfig) -> Result<Self> {
        let (dtype, device) = match vars.first() {
            Some((_, v)) => (v.dtype(), v.device().clone()),
            None => (DType::F32, candle_core::Device::Cpu),
        };
        let mut offset = 0;
        let mut slots = Vec::with_capacity(vars.len());
        for (name, var) in vars {
            if var.dtype() != dtype || !var.device().same_device(&device) {
                candle_core::bail!(
                    "Adam: variable `{name}` is {:?} on {:?}, the others {dtype:?} on {:?}",
                    var.dtype(),
                    var.device().location(),
                    device.location()
                );
            }
            let len = var.elem_count();
            slots.push(Slot {
                name,
                var,
                offset,
                members: None,
            });
            offset += len;
        }
        Ok(Self {
            cfg,
            slots,
            m: Var::zeros(offset, dtype, &device)?,
            v: Var::zeros(offset, dtype, &device)?,
            step: 0,
            mode: UpdateMode::Auto,
            flat_grad: Mutex::new(None),
        })
    }

    /// Adam over the trainable variables of `store` (a packed group is one variable),
    /// with the moments of a packed group's members saved and loaded under the
    /// members' own names by [`Adam::state`] and [`Adam::load_state`]: a checkpoint's
    /// optimizer state does not depend on the packing.
    pub fn for_store(store: &ParamStore, cfg: AdamConfig) -> Result<Self> {
        let mut adam = Self::new(store.trainable_vars(), cfg)?;
        for s in &mut adam.slots {
            s.members = store.group_members(&s.name);
        }
        Ok(adam)
    }

    /// Each saved tensor of a slot: (name, offset in the flat moments, shape).
    fn saved_parts(s: &Slot) -> Vec<(String, usize, candle_core::Shape)> {
        match &s.members {
            Some(members) => members
                .iter()
                .map(|m| (m.name.clone(), s.offset + m.offset, m.shape.clone()))
                .collect(),
            None => vec![(s.name.clone(), s.offset, s.var.shape().clone())],
        }
    }

    /// Whether the update runs on the flat moments ([`UpdateMode::Flat`], or off the
    /// CPU under [`UpdateMode::Auto`]).
    fn flat_mode(&self) -> bool {
        match self.mode {
            UpdateMode::Flat => true,
            UpdateMode::Auto => !self.m.device().is_cpu(),
            UpdateMode::Fused | UpdateMode::PerVariable => false,
        }
    }

    /// The gradients `gs` flattened and concatenated in order: those
    /// [`Adam::grad_norm`] kept when they came from the same tensors, else anew.
    fn flat_gradient(&self, gs: &[&Tensor]) -> Result<Tensor> {
        let ids: Vec<TensorId> = gs.iter().map(|g| g.id()).collect();
        let kept = self
            .flat_grad
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((kept_ids, g)) = kept {
            if kept_ids == ids {
                return Ok(g);
            }
        }
        let flat = gs
            .iter()
            .map(|g| g.flatten_all())
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&flat, 0)
    }

    /// Chooses how the update runs (default [`UpdateMode::Auto`]).
    pub fn set_update_mode(&mut self, mode: UpdateMode) {
        self.mode = mode;
    }

    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Number of steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// Global L2 norm of the gradients of the optimised variables (f64;
    /// NaN or infinite if any gradient is).
    ///
    /// On the CPU each tensor's sum of squares is taken in f64 and added in slot
    /// order. On the flat path ([`UpdateMode::Flat`], and off the CPU) the gradients
    /// are concatenated, converted to f64 and summed on their device, one transfer
    /// back and a few kernels in all; where every variable has a gradient the
    /// concatenation is kept for the [`Adam::step`] that follows (so that on a GPU the
    /// gradients are gathered once, not once for the norm and once for the step).
    /// Elsewhere each tensor's sum of squares stays on its device, and all come back
    /// in one transfer, to be added in slot order in f64.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let gs: Vec<&Tensor> = self
            .slots
            .iter()
            .filter_map(|s| grads.get(s.var.as_tensor()))
            .collect();
        if gs.is_empty() {
            return Ok(0.0);
        }
        if self.flat_mode() {
            let g = self.flat_gradient(&gs)?;
            let sum: f64 = g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
            if gs.len() == self.slots.len() {
                let ids = gs.iter().map(|g| g.id()).collect();
                *self.flat_grad.lock().unwrap_or_else(|e| e.into_inner()) = Some((ids, g));
            }
            return Ok(sum.sqrt());
        }
        if gs.iter().all(|g| g.device().is_cpu()) {
            // One pass per tensor, in f64 from the first element.
            let mut sum = 0f64;
            for g in gs {
                sum += match nvp_kernels::sum_squares_f64(g) {
                    Some(s) => s,
                    None => g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar()?,
                };
            }
            return Ok(sum.sqrt());
        }
        let parts = gs
            .into_iter()
            .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64))
            .collect::<Result<Vec<_>>>()?;
        let parts: Vec<f64> = Tensor::stack(&parts, 0)?.to_vec1()?;
        Ok(parts.iter().fold(0f64, |acc, p| acc + p).sqrt())
    }

    /// One Adam step; gradients are first scaled by `clip_scale` (use
    /// `min(1, max_norm / norm)` for norm clipping). Variables without a
    /// gradient are left alone (their moments too).
    pub fn step(&mut self, grads: &GradStore, clip_scale: f64) -> Result<()> {
        self.step += 1;
        let gs: Vec<Option<&Tensor>> = self
            .slots
            .iter()
            .map(|s| grads.get(s.var.as_tensor()))
            .collect();
        let fused_applies = nvp_kernels::adam_update_applies(self.m.dtype(), self.m.device());
        let fused = match self.mode {
            UpdateMode::Fused => fused_applies,
            UpdateMode::Auto => fused_applies && nvp_kernels::fast_cpu_enabled(),
            UpdateMode::Flat | UpdateMode::PerVariable => false,
        };
        let flat = !fused && self.flat_mode();
        if fused {
            self.step_fused(&gs, clip_scale)
        } else if flat && gs.iter().all(Option::is_some) {
            self.step_flat(&gs.into_iter().flatten().collect::<Vec<_>>(), clip_scale)
        } else {
            self.step_each(&gs, clip_scale)
        }
    }

    /// `(new m, new v, lr · m̂ / (sqrt(v̂) + ε))` for moments `m`, `v` and gradient `g`
    /// (all the same shape), with the step count already advanced.
    fn moments(&self, m: &Tensor, v: &Tensor, g: &Tensor, clip_scale: f64) -> Result<[Tensor; 3]> {
        let c = &self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        let g = if clip_scale != 1.0 {
            (g * clip_scale)?
        } else {
            g.clone()
        };
        let m = ((m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
        let v = ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
        let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
        let update = (((&m / bc1)? / denom)? * c.lr)?;
        Ok([m, v, update])
    }

    /// The update on the flat moments (every variable has a gradient).
    fn step_flat(&mut self, gs: &[&Tensor], clip_scale: f64) -> Result<()> {
        if self.slots.is_empty() {
            return Ok(());
        }
        let g = self.flat_gradient(gs)?;
        let [m, v, update] =
            self.moments(self.m.as_tensor(), self.v.as_tensor(), &g, clip_scale)?;
        self.m.set(&m)?;
        self.v.set(&v)?;
        for s in &self.slots {
            let u = update
                .narrow(0, s.offset, s.var.elem_count())?
                .reshape(s.var.shape())?;
            // `p ← 1·p + (−1)·u` in place is `p − u` to the bit.
            if !nvp_kernels::try_blend_in_place(s.var.as_tensor(), &u, 1.0, -1.0)? {
                s.var.set(&(s.var.as_tensor() - u)?)?;
            }
        }
        Ok(())
    }

    /// The update in place, one pass per variable, skipping those without a gradient.
    fn step_fused(&mut self, gs: &[Option<&Tensor>], clip_scale: f64) -> Result<()> {
        let c = &self.cfg;
        let t = self.step as i32;
        let scalars = nvp_kernels::AdamScalars {
            lr: c.lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            bias1: 1.0 - c.beta1.powi(t),
            bias2: 1.0 - c.beta2.powi(t),
            clip_scale,
        };
        let grads = gs
            .iter()
            .map(|g| g.map(Tensor::contiguous).transpose())
            .collect::<Result<Vec<_>>>()?;
        let params: Vec<nvp_kernels::AdamParam<'_>> = self
            .slots
            .iter()
            .zip(&grads)
            .filter_map(|(s, g)| {
                g.as_ref().map(|grad| nvp_kernels::AdamParam {
                    param: s.var.as_tensor(),
                    grad,
                    offset: s.offset,
                })
            })
            .collect();
        nvp_kernels::adam_update(self.m.as_tensor(), self.v.as_tensor(), &params, &scalars)
    }

    /// The update variable by variable, skipping those without a gradient.
    fn step_each(&mut self, gs: &[Option<&Tensor>], clip_scale: f64) -> Result<()> {
        for (s, g) in self.slots.iter().zip(gs) {
            let Some(g) = g else { continue };
            let n = s.var.elem_count();
            let g = g.flatten_all()?;
            let m0 = self.m.as_tensor().narrow(0, s.offset, n)?;
            let v0 = self.v.as_tensor().narrow(0, s.offset, n)?;
            let [m, v, update] = self.moments(&m0, &v0, &g, clip_scale)?;
            self.m.as_tensor().slice_set(&m, 0, s.offset)?;
            self.v.as_tensor().slice_set(&v, 0, s.offset)?;
            s.var
                .set(&(s.var.as_tensor() - update.reshape(s.var.shape())?)?)?;
        }
        Ok(())
    }

    /// The moments by name (`m.<param>`, `v.<param>`, each shaped as its parameter)
    /// for a checkpoint: copies, unaffected by later steps.
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, offset, shape) in self.slots.iter().flat_map(Self::saved_parts) {
            for (prefix, flat) in [("m", &self.m), ("v", &self.v)] {
                let t = flat
                    .as_tensor()
                    .narrow(0, offset, shape.elem_count())?
                    .reshape(&shape)?
                    // A compact copy of this variable's slice: `copy()` would clone the
                    // whole flat vector behind the view, once per variable.
                    .force_contiguous()?;
                out.insert(format!("{prefix}.{name}"), t);
            }
        }
        Ok(out)
    }

    /// Restore the moments and the step count saved by [`Adam::state`].
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, steps: u64) -> Result<()> {
        let mut loaded = Vec::with_capacity(2 * self.slots.len());
        for (name, offset, shape) in self.slots.iter().flat_map(Self::saved_parts) {
            for (prefix, flat) in [("m", &self.m), ("v", &self.v)] {
                let key = format!("{prefix}.{name}");
                let t = state.get(&key).ok_or_else(|| {
                    candle_core::Error::Msg(format!("optimizer state `{key}` is missing"))
                })?;
                if t.dims() != shape.dims() {
                    candle_core::bail!(
                        "optimizer state `{key}` has shape {:?}, the parameter has {:?}",
                        t.dims(),
                        shape.dims()
                    );
                }
                let t = t
                    .to_dtype(flat.dtype())?
                    .to_device(flat.device())?
                    .flatten_all()?;
                loaded.push((flat, t, offset));
            }
        }
        // Everything checked first: a bad state changes nothing.
        for (flat, t, offset) in loaded {
            flat.as_tensor().slice_set(&t, 0, offset)?;
        }
        self.step = steps;
        Ok(())
    }
}

/// The gradient `2·l2·p` of an L2 penalty `l2 · Σ p²` over some parameters, added to
/// a [`GradStore`] after the backward pass instead of through the graph: the value
/// candle's autograd gives through `sqr` and `sum_all`, without their graph nodes
/// (four per parameter, each a few kernels). A parameter that is a packed group's
/// member ([`ParamStore::pack`]) gets its gradient in its slice of the group's,
/// written in place: adjacent members' slices as one (a network's inner gains are
/// adjacent in its group), a few small kernels per slice.
pub struct L2Gradient {
    l2: f64,
    /// Tensors that are gradient keys themselves (single variables).
    whole: Vec<Tensor>,
    /// (group variable, its penalised slices as (offset, length), in order, merged
    /// where adjacent).
    sliced: Vec<(Tensor, Vec<(usize, usize)>)>,
}

impl L2Gradient {
    /// The penalty `l2 · Σ p²` over `params`, tensors handed out by `store`'s builder
    /// (a model's [`crate::RealNvp::scale_parameters`]). A tensor `store` did not hand
    /// out is an error: its gradient would not reach the optimizer (a model built over
    /// the store before it was packed holds such tensors).
    pub fn new(store: &ParamStore, params: &[Tensor], l2: f64) -> Result<Self> {
        let mut whole = Vec::new();
        let mut ranges: Vec<(String, Vec<(usize, usize)>)> = Vec::new();
        for p in params {
            match store.locate(p) {
                Some((group, offset)) if store.group_members(&group).is_some() => {
                    let range = (offset, p.elem_count());
                    match ranges.iter_mut().find(|(g, _)| *g == group) {
                        Some((_, r)) => r.push(range),
                        None => ranges.push((group, vec![range])),
                    }
                }
                Some(_) => whole.push(p.clone()),
                None => candle_core::bail!(
                    "L2Gradient: a tensor of shape {:?} is not one of the store's (a model \
                     built before the store was packed?)",
                    p.dims()
                ),
            }
        }
        let vars: HashMap<String, Var> = store.named_vars().into_iter().collect();
        let sliced = ranges
            .into_iter()
            .map(|(group, mut r)| {
                r.sort_unstable();
                r.dedup();
                let mut merged: Vec<(usize, usize)> = Vec::with_capacity(r.len());
                for (offset, len) in r {
                    match merged.last_mut() {
                        Some((o, l)) if *o + *l == offset => *l += len,
                        _ => merged.push((offset, len)),
                    }
                }
                (vars[&group].as_tensor().clone(), merged)
            })
            .collect();
        Ok(Self { l2, whole, sliced })
    }

    /// Adds the penalty's gradient to `grads` (where a parameter has none, it becomes
    /// its gradient). A packed group's gradient is updated in place (a contiguous
    /// copy is taken first where it is not contiguous): it must not share storage with
    /// another tensor, as the gradients autograd makes do not.
    pub fn add_to(&self, grads: &mut GradStore) -> Result<()> {
        if self.l2 == 0.0 {
            return Ok(());
        }
        let penalty = |p: &Tensor| p.detach().affine(2.0 * self.l2, 0.0);
        for p in &self.whole {
            let total = match grads.remove(p) {
                Some(d) => (d + penalty(p)?)?,
                None => penalty(p)?,
            };
            grads.insert(p, total);
        }
        for (var, slices) in &self.sliced {
            let grad = match grads.remove(var) {
                Some(d) if d.is_contiguous() => d,
                Some(d) => d.copy()?,
                None => var.zeros_like()?,
            };
            for &(offset, len) in slices {
                let d = grad.narrow(0, offset, len)?;
                let total = (d + penalty(&var.narrow(0, offset, len)?)?)?;
                grad.slice_set(&total, 0, offset)?;
            }
            grads.insert(var, grad);
        }
        Ok(())
    }
}
