//! Batches for training and evaluation: seeded shuffling, flips, dequantisation and the
//! logit map, computed ahead in background threads.
//!
//! Determinism: every random draw is a function of `(seed, epoch, batch)` only —
//! the epoch's permutation comes from an RNG seeded with `mix_seed(seed, epoch)`, a
//! batch's flips and dequantisation noise from one seeded with `mix_seed2(seed, epoch,
//! batch)`. So the batches are the same whatever the thread timing, the number of worker
//! threads or the prefetch depth, and a run restarted at `(epoch, batch)` sees exactly the
//! batches an uninterrupted run would have seen.
//!
//! Within a batch, for each image in order: one `f64` draw decides the flip (when flips
//! are on), then one `f64` per sub-pixel is the noise `u` (see
//! [`crate::preprocess::Dequantize::apply`]).
//!
//! The workers produce host buffers; the `(B, C, H, W)` f32 tensor is made on the
//! consumer's side, on the configured device.

use crate::augment::{flip_horizontal, RandomFlip};
use crate::error::{Error, Result};
use crate::image_set::ImageSet;
use crate::preprocess::{Dequantize, DEFAULT_ALPHA};
use crate::seed::{mix_seed, mix_seed2};
use crate::source::ImageSource;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Seed stream of the evaluation pass (distinct from every training epoch's).
const EVAL_STREAM: u64 = 0xe7a1_0000_0000_0001;

/// Loader settings.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Images per batch.
    pub batch_size: usize,
    /// Shuffle each epoch (seeded by `seed` and the epoch).
    pub shuffle: bool,
    /// Random horizontal flips with p = 0.5.
    pub flip: bool,
    /// Drop the last, incomplete batch of an epoch.
    pub drop_last: bool,
    /// The seed of all randomness.
    pub seed: u64,
    /// Logit α.
    pub alpha: f64,
    /// Batches prepared ahead per worker (at least 1).
    pub prefetch: usize,
    /// Background threads (at least 1).
    pub workers: usize,
    /// Where the `y` tensors go.
    pub device: Device,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig::train(64, 0)
    }
}

impl LoaderConfig {
    /// Training settings: shuffle, flips, drop the last incomplete batch, α = 0.05,
    /// prefetch 3, one worker, CPU.
    pub fn train(batch_size: usize, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: true,
            flip: true,
            drop_last: true,
            seed,
            alpha: DEFAULT_ALPHA,
            prefetch: 3,
            workers: 1,
            device: Device::Cpu,
        }
    }

    /// Evaluation settings: no shuffle, no flips, keep the last batch.
    pub fn eval(batch_size: usize, seed: u64) -> Self {
        LoaderConfig {
            shuffle: false,
            flip: false,
            drop_last: false,
            ..LoaderConfig::train(batch_size, seed)
        }
    }
}

/// One batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Epoch of the batch (0 for evaluation batches).
    pub epoch: usize,
    /// Index of the batch within its epoch.
    pub index: usize,
    /// The u8 images as fed (after flips), `B · C · H · W`.
    pub pixels: Vec<u8>,
    /// Their labels, when the dataset has labels.
    pub labels: Option<Vec<u32>>,
    /// `(B, C, H, W)` f32 in logit space, on the configured device.
    pub y: Tensor,
    /// Per-image preprocessing log-det (f64), including `−D · ln 256`.
    pub ld_pre: Vec<f64>,
    /// Dataset index of each image.
    pub indices: Vec<usize>,
    /// Whether each image was flipped.
    pub flipped: Vec<bool>,
}

impl Batch {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// Whether the batch is empty (never, for batches from a [`Loader`]).
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// `ld_pre` as a `(B,)` f32 tensor on `y`'s device.
    pub fn ld_pre_tensor(&self) -> Result<Tensor> {
        let v: Vec<f32> = self.ld_pre.iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_vec(v, self.ld_pre.len(), self.y.device())?)
    }
}

/// A batch as made by a worker: host buffers only.
struct HostBatch {
    epoch: usize,
    index: usize,
    pixels: Vec<u8>,
    labels: Option<Vec<u32>>,
    y: Vec<f32>,
    ld_pre: Vec<f64>,
    indices: Vec<usize>,
    flipped: Vec<bool>,
}

/// How a sequence of batches is laid out.
#[derive(Clone, Copy, Debug)]
struct Plan {
    shuffle: bool,
    flip: bool,
    drop_last: bool,
    eval: bool,
}

/// Everything a worker needs.
#[derive(Clone)]
struct Core {
    data: Arc<dyn ImageSource>,
    batch_size: usize,
    seed: u64,
    dq: Dequantize,
}

impl Core {
    fn batches_per_epoch(&self, drop_last: bool) -> usize {
        let n = self.data.len();
        if drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    fn permutation(&self, epoch: usize, shuffle: bool) -> Vec<usize> {
        let mut p: Vec<usize> = (0..self.data.len()).collect();
        if shuffle {
            let mut rng = StdRng::seed_from_u64(mix_seed(self.seed, epoch as u64));
            p.shuffle(&mut rng);
        }
        p
    }

    fn make(&self, plan: Plan, epoch: usize, index: usize, perm: &[usize]) -> Result<HostBatch> {
        let data = &*self.data;
        let n = data.len();
        let start = index * self.batch_size;
        let end = (start + self.batch_size).min(n);
        if start >= end {
            return Err(Error::arg(format!(
                "batch {index} is past the end of an epoch of {n} images"
            )));
        }
        let indices: Vec<usize> = perm[start..end].to_vec();
        let (c, h, w) = data.shape();
        let d = data.dims();
        let b = indices.len();
        let mut pixels = vec![0u8; b * d];
        let mut labels = data.labelled().then(|| Vec::with_capacity(b));
        for (&i, out) in indices.iter().zip(pixels.chunks_exact_mut(d)) {
            let label = data.read_into(i, epoch, out)?;
            if let Some(l) = labels.as_mut() {
                l.push(label.ok_or_else(|| {
                    Error::arg(format!("image {i} of a labelled dataset has no label"))
                })?);
            }
        }
        let stream = if plan.eval {
            mix_seed(self.seed, EVAL_STREAM)
        } else {
            mix_seed(self.seed, epoch as u64)
        };
        let mut rng = StdRng::seed_from_u64(mix_seed2(stream, 0x0062_6174_6368, index as u64));
        let flipper = RandomFlip::default();
        let mut y = vec![0f32; b * d];
        let mut ld_pre = Vec::with_capacity(b);
        let mut flipped = Vec::with_capacity(b);
        for (img, out) in pixels.chunks_exact_mut(d).zip(y.chunks_exact_mut(d)) {
            let f = plan.flip && flipper.decide(&mut rng);
            if f {
                flip_horizontal(img, c, h, w)?;
            }
            flipped.push(f);
            ld_pre.push(self.dq.apply(img, &mut rng, out)?);
        }
        Ok(HostBatch {
            epoch,
            index,
            pixels,
            labels,
            y,
            ld_pre,
            indices,
            flipped,
        })
    }

    /// Worker `w` of `workers`: items `w, w + workers, …` of the sequence starting at the
    /// global batch number `start`, `count` items in all (`None`: endless).
    fn run(
        &self,
        plan: Plan,
        start: u64,
        count: Option<u64>,
        w: u64,
        workers: u64,
        tx: SyncSender<Result<HostBatch>>,
    ) {
        let bpe = self.batches_per_epoch(plan.drop_last) as u64;
        let mut perm: Option<(u64, Vec<usize>)> = None;
        let mut j = w;
        loop {
            if count.is_some_and(|c| j >= c) {
                break;
            }
            let g = start.saturating_add(j);
            let (epoch, index) = (g / bpe, g % bpe);
            if perm.as_ref().is_none_or(|(e, _)| *e != epoch) {
                perm = Some((epoch, self.permutation(epoch as usize, plan.shuffle)));
            }
            let p = perm.as_ref().map_or(&[][..], |(_, p)| p.as_slice());
            let res = self.make(plan, epoch as usize, index as usize, p);
            let failed = res.is_err();
            if tx.send(res).is_err() || failed {
                break;
            }
            j = match j.checked_add(workers) {
                Some(v) => v,
                None => break,
            };
        }
    }
}

/// The data loader: an [`ImageSource`] (an in-memory [`ImageSet`], or images read from
/// disk as batches need them) shared with background workers.
pub struct Loader {
    core: Core,
    cfg: LoaderConfig,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("images", &self.core.data.len())
            .field("shape", &self.core.data.shape())
            .field("config", &self.cfg)
            .finish()
    }
}

impl Loader {
    /// A loader over the in-memory `data`. Errors for an invalid or empty set, a zero
    /// batch size, an invalid α, or `drop_last` with fewer images than one batch.
    pub fn new(data: Arc<ImageSet>, cfg: LoaderConfig) -> Result<Self> {
        data.validate()?;
        Self::from_source(data, cfg)
    }

    /// A loader over any [`ImageSource`]; errors as [`Loader::new`]. Images are read by the
    /// workers as their batches are made, so a source that decodes files does so in the
    /// background threads (`workers` of them).
    pub fn from_source(data: Arc<dyn ImageSource>, cfg: LoaderConfig) -> Result<Self> {
        if cfg.batch_size == 0 {
            return Err(Error::arg("batch size must be positive"));
        }
        if data.is_empty() {
            return Err(Error::arg("the data loader got an empty image set"));
        }
        if cfg.drop_last && data.len() < cfg.batch_size {
            return Err(Error::arg(format!(
                "{} images make no complete batch of {} (drop_last)",
                data.len(),
                cfg.batch_size
            )));
        }
        let dq = Dequantize::new(cfg.alpha)?;
        let mut cfg = cfg;
        cfg.prefetch = cfg.prefetch.max(1);
        cfg.workers = cfg.workers.max(1);
        Ok(Loader {
            core: Core {
                data,
                batch_size: cfg.batch_size,
                seed: cfg.seed,
                dq,
            },
            cfg,
        })
    }

    /// The settings in use.
    pub fn config(&self) -> &LoaderConfig {
        &self.cfg
    }

    /// The images.
    pub fn dataset(&self) -> &Arc<dyn ImageSource> {
        &self.core.data
    }

    /// Sub-pixels per image.
    pub fn dims(&self) -> usize {
        self.core.data.dims()
    }

    fn train_plan(&self) -> Plan {
        Plan {
            shuffle: self.cfg.shuffle,
            flip: self.cfg.flip,
            drop_last: self.cfg.drop_last,
            eval: false,
        }
    }

    fn eval_plan() -> Plan {
        Plan {
            shuffle: false,
            flip: false,
            drop_last: false,
            eval: true,
        }
    }

    /// Batches in one training epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.core.batches_per_epoch(self.cfg.drop_last)
    }

    /// Batches in the evaluation pass (all images, last batch kept).
    pub fn eval_batch_count(&self) -> usize {
        self.core.batches_per_epoch(false)
    }

    /// The order of the dataset's images in `epoch`.
    pub fn permutation(&self, epoch: usize) -> Vec<usize> {
        self.core.permutation(epoch, self.cfg.shuffle)
    }

    fn finish(&self, hb: HostBatch) -> Result<Batch> {
        let (c, h, w) = self.core.data.shape();
        let b = hb.indices.len();
        let y = Tensor::from_vec(hb.y, (b, c, h, w), &self.cfg.device)?;
        Ok(Batch {
            epoch: hb.epoch,
            index: hb.index,
            pixels: hb.pixels,
            labels: hb.labels,
            y,
            ld_pre: hb.ld_pre,
            indices: hb.indices,
            flipped: hb.flipped,
        })
    }

    /// Training batch `index` of `epoch`, made synchronously (identical to the one the
    /// iterators deliver).
    pub fn batch(&self, epoch: usize, index: usize) -> Result<Batch> {
        let bpe = self.batches_per_epoch();
        if index >= bpe {
            return Err(Error::arg(format!(
                "batch {index} out of range: an epoch has {bpe} batches"
            )));
        }
        let perm = self.permutation(epoch);
        let hb = self.core.make(self.train_plan(), epoch, index, &perm)?;
        self.finish(hb)
    }

    /// Evaluation batch `index`, made synchronously.
    pub fn eval_batch(&self, index: usize) -> Result<Batch> {
        let n = self.eval_batch_count();
        if index >= n {
            return Err(Error::arg(format!(
                "evaluation batch {index} out of range: there are {n}"
            )));
        }
        let perm = self.core.permutation(0, false);
        let hb = self.core.make(Self::eval_plan(), 0, index, &perm)?;
        self.finish(hb)
    }

    fn spawn(&self, plan: Plan, start: u64, count: Option<u64>) -> Result<Batches> {
        let workers = self.cfg.workers;
        let mut receivers = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        for w in 0..workers {
            let (tx, rx) = sync_channel(self.cfg.prefetch);
            let core = self.core.clone();
            let h = std::thread::Builder::new()
                .name(format!("nvp-loader-{w}"))
                .spawn(move || core.run(plan, start, count, w as u64, workers as u64, tx))
                .map_err(|e| Error::Worker(format!("cannot start a loader thread: {e}")))?;
            receivers.push(rx);
            handles.push(h);
        }
        Ok(Batches {
            loader: Loader {
                core: self.core.clone(),
                cfg: self.cfg.clone(),
            },
            receivers,
            handles,
            next: 0,
            remaining: count,
            done: false,
        })
    }

    /// The batches of one training epoch, from its first batch.
    pub fn epoch(&self, epoch: usize) -> Result<Batches> {
        self.epoch_from(epoch, 0)
    }

    /// The batches of `epoch` from batch `start_batch` to the end of the epoch.
    pub fn epoch_from(&self, epoch: usize, start_batch: usize) -> Result<Batches> {
        let bpe = self.batches_per_epoch();
        if start_batch > bpe {
            return Err(Error::arg(format!(
                "start batch {start_batch} out of range: an epoch has {bpe} batches"
            )));
        }
        let start = (epoch as u64)
            .saturating_mul(bpe as u64)
            .saturating_add(start_batch as u64);
        self.spawn(self.train_plan(), start, Some((bpe - start_batch) as u64))
    }

    /// An endless stream of training batches from `(start_epoch, start_batch)` on, across
    /// epochs (a `start_batch` past the end of an epoch carries into the next ones). To
    /// resume after batch `(e, b)`, call `stream(e, b + 1)`.
    pub fn stream(&self, start_epoch: usize, start_batch: usize) -> Result<Batches> {
        let bpe = self.batches_per_epoch() as u64;
        let start = (start_epoch as u64)
            .saturating_mul(bpe)
            .saturating_add(start_batch as u64);
        self.spawn(self.train_plan(), start, None)
    }

    /// The evaluation pass: every image once, in dataset order, no flips, the last batch
    /// kept, dequantisation noise fixed by the seed (the same on every call).
    pub fn eval_batches(&self) -> Result<Batches> {
        let n = self.eval_batch_count() as u64;
        self.spawn(Self::eval_plan(), 0, Some(n))
    }
}

/// An iterator of batches prepared by background threads. Dropping it stops them.
pub struct Batches {
    loader: Loader,
    receivers: Vec<Receiver<Result<HostBatch>>>,
    handles: Vec<JoinHandle<()>>,
    next: usize,
    remaining: Option<u64>,
    done: bool,
}

impl Iterator for Batches {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.remaining == Some(0) || self.receivers.is_empty() {
            return None;
        }
        let rx = &self.receivers[self.next];
        self.next = (self.next + 1) % self.receivers.len();
        if let Some(r) = self.remaining.as_mut() {
            *r -= 1;
        }
        match rx.recv() {
            Ok(Ok(hb)) => {
                let b = self.loader.finish(hb);
                if b.is_err() {
                    self.done = true;
                }
                Some(b)
            }
            Ok(Err(e)) => {
                self.done = true;
                Some(Err(e))
            }
            Err(_) => {
                self.done = true;
                Some(Err(Error::Worker(
                    "a loader thread stopped before delivering its batch".into(),
                )))
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self.remaining {
            Some(r) if !self.done => {
                let r = usize::try_from(r).unwrap_or(usize::MAX);
                (r, Some(r))
            }
            Some(_) => (0, Some(0)),
            None => (usize::MAX, None),
        }
    }
}

impl Drop for Batches {
    fn drop(&mut self) {
        // Disconnect first so that blocked senders return, then wait for the threads.
        self.receivers.clear();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}
