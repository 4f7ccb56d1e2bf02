//! Figure 1 of the Real NVP paper on a 2-D toy distribution: a vector Real
//! NVP (affine couplings with MLP conditioners and alternating one-feature
//! masks, batch norm between them) trained by maximum likelihood with a
//! standard normal prior, then drawn as three panels side by side:
//!
//! * (a) samples from the data distribution;
//! * (b) the learned density `exp(log p(x))` on a 200×200 grid (eval mode);
//! * (c) samples from the model, `z ~ N(0, I)` mapped through the inverse.
//!
//! ```text
//! cargo run --release --example toy2d -- [DIST] [OUT.png] [--steps N] [--seed N] [--no-bn]
//! ```
//!
//! `DIST` is one of `moons` (the default), `rings`, `8gaussians`,
//! `checkerboard`, `spiral`; `OUT.png` defaults to `toy2d-DIST.png`. The
//! run is seeded (default seed 0) and reproducible; it takes well under a
//! minute on two CPU cores in release mode (it runs on one thread unless
//! `RAYON_NUM_THREADS` says otherwise). The final mean negative
//! log-likelihood is measured on fresh samples.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::{Rgb, RgbImage};
use nvp::data::toy2d::{self, Toy2d};
use nvp::flow::batch_norm::FlowBatchNormConfig;
use nvp::flow::conditioner::{Mlp, MlpConfig};
use nvp::flow::{
    Adam, AdamConfig, AffineCoupling, Flow, FlowBatchNorm, Mask, Mode, ParamStore, Sequential,
    StandardNormal,
};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// Coupling layers (alternating which coordinate is updated).
const COUPLINGS: usize = 8;
/// Hidden units of each conditioner MLP (two hidden layers).
const HIDDEN: usize = 64;
const BATCH: usize = 256;
const DEFAULT_STEPS: usize = 2500;
/// Adam's learning rate, decayed by a cosine to a tenth of it.
const LR: f64 = 2e-3;
/// Global gradient-norm clipping threshold.
const CLIP: f64 = 50.0;
/// Fresh samples for the final negative log-likelihood.
const EVAL_SAMPLES: usize = 20_000;
/// Points in each scatter panel.
const SCATTER_POINTS: usize = 5_000;
/// Density grid cells per side, and pixels per cell.
const GRID: usize = 200;
const CELL_PX: usize = 2;
/// Panel side in pixels.
const PANEL: usize = GRID * CELL_PX;
/// The plotted square `[-BOUND, BOUND]²` (every toy lies roughly within it).
const BOUND: f64 = 4.0;

struct Options {
    toy: Toy2d,
    out: PathBuf,
    steps: usize,
    seed: u64,
    batch_norm: bool,
}

fn parse_args() -> Result<Options> {
    let mut positional = Vec::new();
    let (mut steps, mut seed, mut batch_norm) = (DEFAULT_STEPS, 0u64, true);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--steps" => {
                let v = args.next().context("--steps needs a value")?;
                steps = v.parse().with_context(|| format!("--steps {v}"))?;
            }
            "--seed" => {
                let v = args.next().context("--seed needs a value")?;
                seed = v.parse().with_context(|| format!("--seed {v}"))?;
            }
            "--no-bn" => batch_norm = false,
            "-h" | "--help" => {
                println!(
                    "usage: toy2d [DIST] [OUT.png] [--steps N] [--seed N] [--no-bn]\n\
                     DIST: {}",
                    Toy2d::ALL.map(|t| t.name()).join(", ")
                );
                std::process::exit(0);
            }
            s if s.starts_with("--") => bail!("unknown option {s} (try --help)"),
            _ => positional.push(a),
        }
    }
    if positional.len() > 2 {
        bail!("too many arguments: {positional:?} (try --help)");
    }
    let toy: Toy2d = match positional.first() {
        Some(name) => name.parse()?,
        None => Toy2d::Moons,
    };
    let out = positional
        .get(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(format!("toy2d-{}.png", toy.name())));
    if steps == 0 {
        bail!("--steps must be positive");
    }
    Ok(Options {
        toy,
        out,
        steps,
        seed,
        batch_norm,
    })
}

/// The vector Real NVP: `COUPLINGS` affine couplings on `(N, 2)` inputs with
/// masks `Mask::channel(i % 2)`, each but the last followed by a batch-norm
/// bijection if `batch_norm`.
fn build_flow(vb: &VarBuilder, batch_norm: bool) -> Result<Sequential> {
    let mut flow = Sequential::new();
    for i in 0..COUPLINGS {
        let name = format!("coupling{i}");
        let mlp = MlpConfig {
            features: 2,
            hidden: HIDDEN,
            hidden_layers: 2,
        };
        let net = Mlp::new(mlp, vb.pp(&name).pp("net"))?;
        flow.push(AffineCoupling::new(
            Mask::channel(i % 2),
            net,
            2,
            2,
            vb.pp(&name),
        )?);
        if batch_norm && i + 1 < COUPLINGS {
            let bn = FlowBatchNormConfig::default();
            flow.push(FlowBatchNorm::new(2, bn, vb.pp(format!("{name}_bn")))?);
        }
    }
    Ok(flow)
}

/// `log p(x)` per row of `x` (N, 2): prior log-density of `z = f(x)` plus
/// the flow's log-determinant.
fn log_prob(flow: &Sequential, x: &Tensor, mode: Mode) -> Result<Tensor> {
    let (z, ld) = flow.forward(x, mode)?;
    Ok((StandardNormal.log_prob(&z)? + ld)?)
}

fn batch(toy: Toy2d, n: usize, rng: &mut StdRng, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        toy2d::sample_flat(toy, n, rng),
        (n, 2),
        device,
    )?)
}

fn train(flow: &Sequential, store: &ParamStore, opts: &Options, rng: &mut StdRng) -> Result<()> {
    let device = Device::Cpu;
    let mut adam = Adam::new(
        store.trainable_vars(),
        AdamConfig {
            lr: LR,
            ..AdamConfig::default()
        },
    )?;
    let report_every = (opts.steps / 10).max(1);
    let (mut acc, mut count) = (0.0, 0usize);
    for step in 0..opts.steps {
        let progress = step as f64 / opts.steps as f64;
        adam.set_lr(LR * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())));
        let x = batch(opts.toy, BATCH, rng, &device)?;
        let loss = log_prob(flow, &x, Mode::Train)?.mean_all()?.neg()?;
        let loss_v = loss.to_scalar::<f32>()? as f64;
        if !loss_v.is_finite() {
            bail!("the loss is not finite at step {step}");
        }
        let grads = loss.backward()?;
        let norm = adam.grad_norm(&grads)?;
        let scale = if norm > CLIP { CLIP / norm } else { 1.0 };
        adam.step(&grads, scale)?;
        acc += loss_v;
        count += 1;
        if (step + 1) % report_every == 0 || step + 1 == opts.steps {
            println!(
                "step {:>5}/{}: train NLL {:.4} nats",
                step + 1,
                opts.steps,
                acc / count as f64
            );
            (acc, count) = (0.0, 0);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- drawing

/// Pixel coordinates in a panel of the point `(x, y)` (y up), if inside.
fn to_pixel(x: f32, y: f32) -> Option<(usize, usize)> {
    let u = (f64::from(x) + BOUND) / (2.0 * BOUND) * PANEL as f64;
    let v = (BOUND - f64::from(y)) / (2.0 * BOUND) * PANEL as f64;
    let range = 0.0..PANEL as f64;
    (range.contains(&u) && range.contains(&v)).then_some((u as usize, v as usize))
}

fn blend(img: &mut RgbImage, px: u32, py: u32, colour: [u8; 3], alpha: f64) {
    let p = img.get_pixel_mut(px, py);
    for (c, &t) in p.0.iter_mut().zip(&colour) {
        *c = (f64::from(*c) * (1.0 - alpha) + f64::from(t) * alpha).round() as u8;
    }
}

/// A scatter plot of `points` (flat `[x0, y0, x1, …]`) into the panel whose
/// top-left corner is `(ox, oy)`.
fn scatter(img: &mut RgbImage, ox: usize, oy: usize, points: &[f32], colour: [u8; 3]) {
    for p in points.chunks_exact(2) {
        let Some((u, v)) = to_pixel(p[0], p[1]) else {
            continue;
        };
        for (du, dv, a) in [
            (0, 0, 0.45),
            (-1, 0, 0.2),
            (1, 0, 0.2),
            (0, -1, 0.2),
            (0, 1, 0.2),
        ] {
            let (x, y) = (u as i64 + du, v as i64 + dv);
            if (0..PANEL as i64).contains(&x) && (0..PANEL as i64).contains(&y) {
                blend(
                    img,
                    (ox as i64 + x) as u32,
                    (oy as i64 + y) as u32,
                    colour,
                    a,
                );
            }
        }
    }
}

/// Viridis, approximately: `t ∈ [0, 1]` to RGB.
fn viridis(t: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 5] = [
        [68.0, 1.0, 84.0],
        [59.0, 82.0, 139.0],
        [33.0, 145.0, 140.0],
        [94.0, 201.0, 98.0],
        [253.0, 231.0, 37.0],
    ];
    let s = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let k = (s.floor() as usize).min(STOPS.len() - 2);
    let f = s - k as f64;
    let mut out = [0u8; 3];
    for (c, o) in out.iter_mut().enumerate() {
        *o = (STOPS[k][c] * (1.0 - f) + STOPS[k + 1][c] * f).round() as u8;
    }
    out
}

/// The density panel: `density` is `GRID × GRID`, row 0 at the top.
fn density_panel(img: &mut RgbImage, ox: usize, oy: usize, density: &[f64]) {
    let max = density
        .iter()
        .cloned()
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE);
    for (k, &d) in density.iter().enumerate() {
        let colour = Rgb(viridis(d / max));
        let (row, col) = (k / GRID, k % GRID);
        for dy in 0..CELL_PX {
            for dx in 0..CELL_PX {
                let x = ox + col * CELL_PX + dx;
                let y = oy + row * CELL_PX + dy;
                img.put_pixel(x as u32, y as u32, colour);
            }
        }
    }
}

/// A one-pixel grey frame around the panel at `(ox, oy)`.
fn frame(img: &mut RgbImage, ox: usize, oy: usize) {
    let grey = Rgb([150, 150, 150]);
    for i in 0..PANEL + 2 {
        for (x, y) in [
            (ox - 1 + i, oy - 1),
            (ox - 1 + i, oy + PANEL),
            (ox - 1, oy - 1 + i),
            (ox + PANEL, oy - 1 + i),
        ] {
            img.put_pixel(x as u32, y as u32, grey);
        }
    }
}

/// 5×7 glyphs for the panel labels "(a)", "(b)", "(c)".
fn glyph(c: char) -> [u8; 7] {
    match c {
        '(' => [0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02],
        ')' => [0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08],
        'a' => [0x00, 0x00, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'b' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1E],
        'c' => [0x00, 0x00, 0x0E, 0x10, 0x10, 0x11, 0x0E],
        _ => [0; 7],
    }
}

/// `text` in 5×7 glyphs scaled by `scale`, top-left at `(x, y)`.
fn label(img: &mut RgbImage, x: usize, y: usize, text: &str, scale: usize) {
    for (i, ch) in text.chars().enumerate() {
        for (row, bits) in glyph(ch).iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) == 0 {
                    continue;
                }
                for sy in 0..scale {
                    for sx in 0..scale {
                        let px = x + (i * 6 + col) * scale + sx;
                        let py = y + row * scale + sy;
                        img.put_pixel(px as u32, py as u32, Rgb([0, 0, 0]));
                    }
                }
            }
        }
    }
}

/// Figure 1: data samples, learned density, model samples.
fn figure(data: &[f32], density: &[f64], model: &[f32]) -> RgbImage {
    const MARGIN: usize = 12;
    const LABEL: usize = 30;
    let width = 3 * PANEL + 4 * MARGIN;
    let height = PANEL + 2 * MARGIN + LABEL;
    let mut img = RgbImage::from_pixel(width as u32, height as u32, Rgb([255, 255, 255]));
    let left = |k: usize| MARGIN + k * (PANEL + MARGIN);
    scatter(&mut img, left(0), MARGIN, data, [31, 119, 180]);
    density_panel(&mut img, left(1), MARGIN, density);
    scatter(&mut img, left(2), MARGIN, model, [214, 39, 40]);
    for (k, text) in ["(a)", "(b)", "(c)"].iter().enumerate() {
        frame(&mut img, left(k), MARGIN);
        label(
            &mut img,
            left(k) + PANEL / 2 - 27,
            MARGIN + PANEL + 8,
            text,
            3,
        );
    }
    img
}

// ------------------------------------------------------------------- main

fn main() -> Result<()> {
    // The tensors are tiny (256 × 64): handing each matmul to a thread pool
    // costs more than it saves, and one thread keeps the run bit-for-bit
    // reproducible. Set RAYON_NUM_THREADS to override.
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    let opts = parse_args()?;
    let device = Device::Cpu;
    let store = ParamStore::new(opts.seed);
    let vb = store.var_builder(DType::F32, &device);
    let flow = build_flow(&vb, opts.batch_norm)?;
    let mut rng = StdRng::seed_from_u64(opts.seed.wrapping_add(1));
    println!(
        "toy2d: {} — {COUPLINGS} couplings (MLP 2→{HIDDEN}→{HIDDEN}→4){}, {} parameters; \
         {} steps of batch {BATCH}, seed {}",
        opts.toy,
        if opts.batch_norm { " + batch norm" } else { "" },
        store.num_trainable(),
        opts.steps,
        opts.seed
    );

    let start = Instant::now();
    train(&flow, &store, &opts, &mut rng)?;
    let train_secs = start.elapsed().as_secs_f64();

    // Final NLL on fresh data.
    let x = batch(opts.toy, EVAL_SAMPLES, &mut rng, &device)?;
    let nll = log_prob(&flow, &x, Mode::Eval)?
        .mean_all()?
        .neg()?
        .to_scalar::<f32>()?;

    // (a) data samples, (c) model samples.
    let data = toy2d::sample_flat(opts.toy, SCATTER_POINTS, &mut rng);
    let z = StandardNormal.sample(&[SCATTER_POINTS, 2], 1.0, &mut rng, DType::F32, &device)?;
    let model: Vec<f32> = flow.inverse(&z)?.flatten_all()?.to_vec1()?;

    // (b) the density at the cell centres, row 0 at the top (largest y).
    let cell = 2.0 * BOUND / GRID as f64;
    let centre = |k: usize| -BOUND + (k as f64 + 0.5) * cell;
    let grid: Vec<f32> = (0..GRID * GRID)
        .flat_map(|k| {
            let (row, col) = (k / GRID, k % GRID);
            [centre(col) as f32, -centre(row) as f32]
        })
        .collect();
    let grid = Tensor::from_vec(grid, (GRID * GRID, 2), &device)?;
    let log_p: Vec<f32> = log_prob(&flow, &grid, Mode::Eval)?.to_vec1()?;
    let density: Vec<f64> = log_p.iter().map(|&l| f64::from(l).exp()).collect();
    let mass: f64 = density.iter().sum::<f64>() * cell * cell;

    let img = figure(&data, &density, &model);
    img.save(&opts.out)
        .with_context(|| format!("cannot write {}", opts.out.display()))?;
    println!(
        "final NLL on {EVAL_SAMPLES} fresh samples: {nll:.4} nats ({:.4} bits/dim)",
        f64::from(nll) / (2.0 * std::f64::consts::LN_2)
    );
    println!("probability mass of the learned density on [-{BOUND}, {BOUND}]²: {mass:.4}");
    println!(
        "training {train_secs:.1} s, total {:.1} s; wrote {}",
        start.elapsed().as_secs_f64(),
        opts.out.display()
    );
    Ok(())
}
