//! `nvp relabel`: a class-conditional model's latents under other labels (paper
//! App. F: "encode with y, decode with y′"). Each image is encoded with its own label
//! (midpoint dequantisation) and its latents decoded with each label of `--to`; the
//! column of its own label gives the image back. One row per image: the original
//! (framed), then one decoding per label.

use anyhow::{bail, Result};
use nvp_flow::Mode;

use crate::cli::RelabelArgs;
use crate::{engine, report};

pub fn run(a: RelabelArgs) -> Result<()> {
    let mut l = super::load(&a.ckpt, a.device.as_deref())?;
    if !l.model.is_conditional() {
        bail!("relabel needs a class-conditional model (model.classes > 0); this one is not");
    }
    let m = l.settings.model.clone();
    let to: Vec<u32> = match a.to {
        Some(t) => t,
        None => (0..m.classes as u32).collect(),
    };
    if let Some(&bad) = to.iter().find(|&&c| c as usize >= m.classes) {
        bail!(
            "--to: class {bad} is out of range (the model has {} classes: 0 to {})",
            m.classes,
            m.classes - 1
        );
    }
    let images = super::read_some_images(
        &mut l,
        &a.src,
        "give the images with --images A [B …] and --class, or --data DIR --indices I[,J…]",
    )?;
    let pixels = images.pixels;
    let d = m.dims();
    let n_img = pixels.len() / d;
    let Some(labels) = super::image_labels(&l, images.labels, a.class, n_img)? else {
        bail!("relabel: no labels for the images");
    };
    let y = super::midpoint_logits(&l, &pixels)?;
    let (zs, _) = l.model.encode_cond(
        &y,
        engine::condition(&l.model, Some(&labels))?.as_ref(),
        Mode::Eval,
    )?;
    // Column j decodes every image's latents with label to[j].
    let mut columns = Vec::with_capacity(to.len());
    for &c in &to {
        let cond = engine::condition(&l.model, Some(&vec![c; n_img]))?;
        columns.push(engine::to_pixels(
            &l.model.decode_cond(&zs, cond.as_ref())?,
            l.settings.data.alpha,
        )?);
    }
    let cols = to.len() + 1;
    let mut px = Vec::with_capacity(n_img * cols * d);
    for (i, img) in pixels.chunks_exact(d).enumerate() {
        px.extend_from_slice(img);
        for col in &columns {
            px.extend_from_slice(&col[i * d..(i + 1) * d]);
        }
    }
    let zoom = report::auto_zoom(m.width, cols);
    let mut grid = report::grid(&px, n_img * cols, m.channels, m.height, m.width, cols, zoom);
    for r in 0..n_img {
        report::frame_cell(&mut grid, (r, 0), (m.height, m.width), zoom);
    }
    report::save_png(&grid, &a.out)?;
    let own: Vec<String> = labels.iter().map(u32::to_string).collect();
    let to_s: Vec<String> = to.iter().map(u32::to_string).collect();
    eprintln!(
        "wrote {n_img} row(s) to {}: the original (classes {}), then decoded as classes {}",
        a.out.display(),
        own.join(", "),
        to_s.join(", ")
    );
    Ok(())
}
