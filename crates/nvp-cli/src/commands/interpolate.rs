//! `nvp interpolate`: the latent manifold of eq. 19,
//! `z = cos φ (cos φ′ z₁ + sin φ′ z₂) + sin φ (cos φ′ z₃ + sin φ′ z₄)`,
//! φ (rows) and φ′ (columns) over `[0, π/2]`, decoded to a grid whose
//! corners are the four originals (marked with a red frame). With two images, the
//! grid's first row: `z = cos φ′ z₁ + sin φ′ z₂`, from one to the other.

use std::f64::consts::FRAC_PI_2;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use nvp_flow::{Flow, Mode};

use crate::cli::InterpolateArgs;
use crate::{engine, report};

pub fn run(a: InterpolateArgs) -> Result<()> {
    if !(2..=256).contains(&a.steps) {
        bail!(
            "--steps must be from 2 to 256 (a steps × steps grid), got {}",
            a.steps
        );
    }
    let mut l = super::load(&a.ckpt, a.device.as_deref())?;
    if l.model.is_conditional() {
        // Each image's latents are relative to its own label: no one label decodes a
        // mixture of them.
        bail!(
            "interpolate needs an unconditional model; this one is class-conditional \
             (model.classes = {})",
            l.settings.model.classes
        );
    }
    let m = l.settings.model.clone();
    let d = m.dims();
    let count = |what: &str, n: usize| -> Result<()> {
        match n {
            2 | 4 => Ok(()),
            _ => bail!("{what} needs four images (the manifold) or two (the path), got {n}"),
        }
    };
    // The images (four, or two) as planar u8.
    let pixels = super::read_images(
        &mut l,
        &a.src,
        count,
        "give four images with --images A B C D, or --data DIR --indices I,J,K,L \
         (or two of them for the path between two images)",
    )?
    .pixels;
    let n_img = pixels.len() / d;
    // Encode with the midpoint dequantisation (u = 0.5): deterministic.
    let y = super::midpoint_logits(&l, &pixels)?;
    let (z, _) = l.model.forward(&y, Mode::Eval)?;
    let mut z: Vec<f32> = z.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    if n_img == 2 {
        // The first row (φ = 0) of the four-image grid uses only z₁ and z₂.
        z.extend_from_within(..);
    }
    let zk = |k: usize| &z[k * d..(k + 1) * d];
    let s = a.steps;
    let rows = if n_img == 2 { 1 } else { s };
    let mut grid_z = Vec::with_capacity(rows * s * d);
    for i in 0..rows {
        let phi = FRAC_PI_2 * i as f64 / (s - 1) as f64;
        for j in 0..s {
            let psi = FRAC_PI_2 * j as f64 / (s - 1) as f64;
            let (a1, a2) = (
                (phi.cos() * psi.cos()) as f32,
                (phi.cos() * psi.sin()) as f32,
            );
            let (a3, a4) = (
                (phi.sin() * psi.cos()) as f32,
                (phi.sin() * psi.sin()) as f32,
            );
            for t in 0..d {
                grid_z.push(a1 * zk(0)[t] + a2 * zk(1)[t] + a3 * zk(2)[t] + a4 * zk(3)[t]);
            }
        }
    }
    let mut px = Vec::with_capacity(s * s * d);
    for chunk in grid_z.chunks(64 * d) {
        let n = chunk.len() / d;
        let zt = Tensor::from_vec(chunk.to_vec(), (n, d), &l.device)?;
        px.extend(engine::to_pixels(
            &l.model.inverse(&zt)?,
            l.settings.data.alpha,
        )?);
    }
    let zoom = report::auto_zoom(m.width, s);
    let mut img = report::grid(&px, rows * s, m.channels, m.height, m.width, s, zoom);
    for rc in [(0, 0), (0, s - 1), (rows - 1, 0), (rows - 1, s - 1)] {
        report::frame_cell(&mut img, rc, (m.height, m.width), zoom);
    }
    report::save_png(&img, &a.out)?;
    if n_img == 2 {
        eprintln!("wrote a {s}-step latent path to {}", a.out.display());
    } else {
        eprintln!("wrote a {s}×{s} latent manifold to {}", a.out.display());
    }
    Ok(())
}
