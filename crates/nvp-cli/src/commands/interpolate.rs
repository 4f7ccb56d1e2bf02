//! `nvp interpolate`: the latent manifold of eq. 19,
//! `z = cos φ (cos φ′ z₁ + sin φ′ z₂) + sin φ (cos φ′ z₃ + sin φ′ z₄)`,
//! φ (rows) and φ′ (columns) over `[0, π/2]`, decoded to a grid whose
//! corners are the four originals (marked with a red frame). With two images, the
//! grid's first row: `z = cos φ′ z₁ + sin φ′ z₂`, from one to the other.

use std::f64::consts::FRAC_PI_2;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use image::Rgb;
use nvp_data::Dequantize;
use nvp_flow::{Flow, Mode};

use crate::cli::InterpolateArgs;
use crate::{engine, report};

pub fn run(a: InterpolateArgs) -> Result<()> {
    if a.steps < 2 {
        bail!("--steps must be at least 2");
    }
    let mut l = super::load(&a.ckpt, a.device.as_deref())?;
    let m = l.settings.model.clone();
    let d = m.dims();
    let count = |what: &str, n: usize| -> Result<usize> {
        match n {
            2 | 4 => Ok(n),
            _ => bail!("{what} needs four images (the manifold) or two (the path), got {n}"),
        }
    };
    // The images (four, or two) as planar u8.
    let pixels: Vec<u8> = match (&a.images, &a.indices) {
        (Some(files), _) => {
            count("--images", files.len())?;
            let mut v = Vec::with_capacity(files.len() * d);
            for f in files {
                let img = nvp_data::folder::decode_rgb(f)
                    .with_context(|| format!("cannot read image {}", f.display()))?;
                if (img.height() as usize, img.width() as usize) != (m.height, m.width)
                    || m.channels != 3
                {
                    bail!(
                        "image {} is {}×{} but the model takes {}×{}×{} (C×H×W)",
                        f.display(),
                        img.width(),
                        img.height(),
                        m.channels,
                        m.height,
                        m.width
                    );
                }
                nvp_data::image_set::rgb_to_planar(&img, &mut v);
            }
            v
        }
        (None, Some(idx)) => {
            count("--indices", idx.len())?;
            if let Some(p) = &a.data {
                l.settings.data.path = Some(p.clone());
            }
            let set = crate::data::open(&l.settings, super::parse_split(&a.split)?)?;
            let mut v = vec![0u8; idx.len() * d];
            for (&i, out) in idx.iter().zip(v.chunks_exact_mut(d)) {
                if i >= set.len() {
                    bail!(
                        "--indices: image {i} is out of range (the {} split has {} images)",
                        a.split,
                        set.len()
                    );
                }
                set.read_into(i, 0, out)
                    .with_context(|| format!("--indices: reading image {i}"))?;
            }
            v
        }
        (None, None) => {
            bail!(
                "give four images with --images A B C D, or --data DIR --indices I,J,K,L \
                 (or two of them for the path between two images)"
            )
        }
    };
    let n_img = pixels.len() / d;
    // Encode with the midpoint dequantisation (u = 0.5): deterministic.
    let deq = Dequantize::new(l.settings.data.alpha)?;
    let mut y = vec![0f32; n_img * d];
    for k in 0..n_img {
        deq.apply_with_noise(
            &pixels[k * d..(k + 1) * d],
            &vec![0.5; d],
            &mut y[k * d..(k + 1) * d],
        )?;
    }
    let y = Tensor::from_vec(y, (n_img, m.channels, m.height, m.width), &l.device)?;
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
    let cell = (m.width * zoom + 2) as u32;
    let cell_h = (m.height * zoom + 2) as u32;
    for (r, c) in [(0, 0), (0, s - 1), (rows - 1, 0), (rows - 1, s - 1)] {
        report::frame(
            &mut img,
            c as u32 * cell,
            r as u32 * cell_h,
            cell + 2,
            cell_h + 2,
            2,
            Rgb([230, 30, 30]),
        );
    }
    report::save_png(&img, &a.out)?;
    if n_img == 2 {
        eprintln!("wrote a {s}-step latent path to {}", a.out.display());
    } else {
        eprintln!("wrote a {s}×{s} latent manifold to {}", a.out.display());
    }
    Ok(())
}
