//! `nvp compress`: conceptual compression (paper App. D). Each image is encoded; its
//! decodings keep the latents of the `L`, `L − 1`, …, 1 coarsest scales (100 %, 50 %,
//! 25 %, … of the dimensions) and draw the finer ones from the prior. One row per
//! image: the original (framed), then one decoding per kept share.

use anyhow::{bail, Result};
use nvp_flow::Mode;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::cli::CompressArgs;
use crate::{engine, report};

pub fn run(a: CompressArgs) -> Result<()> {
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        bail!("--temperature must be a number ≥ 0, got {}", a.temperature);
    }
    let mut l = super::load(&a.ckpt, a.device.as_deref())?;
    let m = l.settings.model.clone();
    let images = super::read_some_images(
        &mut l,
        &a.src,
        "give the images with --images A [B …], or --data DIR --indices I[,J…]",
    )?;
    let pixels = images.pixels;
    let d = m.dims();
    let n_img = pixels.len() / d;
    let scales = l.model.latent_shapes().len();
    // A class-conditional model encodes and decodes each image with its label: the
    // dataset's (--indices), else --class for all.
    let labels = super::image_labels(&l, images.labels, a.class, n_img)?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let mut px = Vec::with_capacity(n_img * (scales + 1) * d);
    for (i, img) in pixels.chunks_exact(d).enumerate() {
        let y = super::midpoint_logits(&l, img)?;
        let label = labels.as_ref().map(|ls| &ls[i..=i]);
        let cond = engine::condition(&l.model, label)?;
        let (zs, _) = l.model.encode_cond(&y, cond.as_ref(), Mode::Eval)?;
        px.extend_from_slice(img);
        for keep in (1..=scales).rev() {
            let z = l.model.resample_finer(&zs, keep, a.temperature, &mut rng)?;
            px.extend(engine::to_pixels(
                &l.model.decode_cond(&z, cond.as_ref())?,
                l.settings.data.alpha,
            )?);
        }
    }
    let cols = scales + 1;
    let zoom = report::auto_zoom(m.width, cols);
    let mut grid = report::grid(&px, n_img * cols, m.channels, m.height, m.width, cols, zoom);
    for r in 0..n_img {
        report::frame_cell(&mut grid, (r, 0), (m.height, m.width), zoom);
    }
    report::save_png(&grid, &a.out)?;
    let kept: Vec<String> = (1..=scales)
        .rev()
        .map(|k| format!("{}", 100.0 * l.model.kept_fraction(k)))
        .collect();
    eprintln!(
        "wrote {n_img} row(s) to {}: original, then {} % of the latents kept",
        a.out.display(),
        kept.join(" / ")
    );
    Ok(())
}
