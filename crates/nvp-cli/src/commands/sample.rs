//! `nvp sample`: draw from the prior at a temperature and decode.

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::cli::SampleArgs;
use crate::{engine, report};

/// The most pixel bytes one `nvp sample` call produces (1 GiB).
const MAX_PIXEL_BYTES: usize = 1 << 30;

pub fn run(a: SampleArgs) -> Result<()> {
    if a.n == 0 {
        bail!("--n must be at least 1");
    }
    if !(a.temperature.is_finite() && a.temperature >= 0.0) {
        bail!("--temperature must be a number ≥ 0, got {}", a.temperature);
    }
    let size = a.size.as_deref().map(parse_size).transpose()?;
    let l = super::load_with(&a.ckpt, a.device.as_deref(), |s| {
        if let Some((h, w)) = size {
            // Appendix C: the same weights build the flow at another size.
            s.model.height = h;
            s.model.width = w;
            s.model
                .validate()
                .map_err(|e| anyhow::anyhow!("--size {h}x{w}: {e}"))?;
        }
        Ok(())
    })?;
    let m = &l.settings.model;
    // The pixels and the grid are held in memory: refuse what cannot be.
    if a.n
        .checked_mul(m.dims())
        .is_none_or(|b| b > MAX_PIXEL_BYTES)
    {
        bail!(
            "--n {} images of {}×{}×{} is more than {} GiB of pixels: draw fewer per call (--n) or use --seed to draw more batches",
            a.n,
            m.channels,
            m.height,
            m.width,
            MAX_PIXEL_BYTES >> 30
        );
    }
    let mut rng = StdRng::seed_from_u64(a.seed);
    let mut px = Vec::with_capacity(a.n * m.dims());
    // Decode in chunks of at most 256 CIFAR-10-sized images' worth of values, to
    // bound memory (fewer images per chunk at larger sizes).
    let per_chunk = (256 * 3 * 32 * 32 / m.dims()).clamp(1, 256);
    let mut left = a.n;
    while left > 0 {
        let k = left.min(per_chunk);
        px.extend(engine::sample_pixels(
            &l.model,
            k,
            a.temperature,
            l.settings.data.alpha,
            a.class,
            &mut rng,
        )?);
        left -= k;
    }
    let cols = engine::sample_grid_cols(&l.model, a.n, a.class);
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

/// The largest side `--size` takes: one 4096×4096 image already needs several GB per
/// feature map of a 32-feature network; larger requests would fail on memory, not here.
const MAX_SIDE: usize = 4096;

/// `HxW` (also `H×W`) as (height, width), both in `1..=MAX_SIDE`.
fn parse_size(s: &str) -> Result<(usize, usize)> {
    let parsed = s
        .split_once(['x', 'X', '×'])
        .and_then(|(h, w)| Some((h.trim().parse().ok()?, w.trim().parse().ok()?)));
    match parsed {
        Some((h, w)) if (1..=MAX_SIDE).contains(&h) && (1..=MAX_SIDE).contains(&w) => Ok((h, w)),
        Some(_) => bail!("--size {s}: each side must be between 1 and {MAX_SIDE}"),
        None => bail!("--size must be HxW with positive integers, e.g. 64x64; got `{s}`"),
    }
}
