//! `nvp sample`: draw from the prior at a temperature and decode.

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::cli::SampleArgs;
use crate::{engine, report};

pub fn run(a: SampleArgs) -> Result<()> {
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        bail!("--temperature must be a number ≥ 0, got {}", a.temperature);
    }
    let l = super::load(&a.ckpt, a.device.as_deref())?;
    let mut rng = StdRng::seed_from_u64(a.seed);
    let m = &l.settings.model;
    let mut px = Vec::with_capacity(a.n * m.dims());
    // Decode in chunks to bound memory.
    let mut left = a.n;
    while left > 0 {
        let k = left.min(256);
        px.extend(engine::sample_pixels(
            &l.model,
            k,
            a.temperature,
            l.settings.data.alpha,
            &mut rng,
        )?);
        left -= k;
    }
    let cols = (a.n as f64).sqrt().ceil() as usize;
    let img = report::grid(
        &px,
        a.n,
        m.channels,
        m.height,
        m.width,
        cols,
        report::auto_zoom(m.width, cols),
    );
    report::save_png(&img, &a.out)?;
    if let Some(dir) = &a.each {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let d = m.dims();
        for i in 0..a.n {
            let one = report::grid(
                &px[i * d..(i + 1) * d],
                1,
                m.channels,
                m.height,
                m.width,
                1,
                1,
            );
            // grid() pads by 2 px; crop back to the image itself
            let one =
                image::imageops::crop_imm(&one, 2, 2, m.width as u32, m.height as u32).to_image();
            report::save_png(&one, &dir.join(format!("sample-{i:05}.png")))?;
        }
    }
    eprintln!(
        "wrote {} samples (T = {}) to {}",
        a.n,
        a.temperature,
        a.out.display()
    );
    Ok(())
}
