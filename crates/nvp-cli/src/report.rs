//! What a run shows: the progress bar, `metrics.csv`, PNG sample grids and
//! the bits/dim curve.

use std::fs;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use image::{Rgb, RgbImage};
use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar on stderr (hidden when stderr is not a terminal).
pub fn progress(total: u64, start: u64) -> ProgressBar {
    let pb = ProgressBar::new(total);
    pb.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} step {pos}/{len} {msg} (ETA {eta})",
        )
        .expect("progress template")
        .progress_chars("=> "),
    );
    pb.set_position(start);
    pb
}

pub const METRICS_HEADER: &str =
    "step,epoch,elapsed_s,train_bpd,test_bpd,test_bpd_stderr,img_per_s,skipped_steps";

/// One row of `metrics.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricsRow {
    pub step: u64,
    pub epoch: u64,
    pub elapsed_s: f64,
    pub train_bpd: f64,
    pub test_bpd: f64,
    pub test_bpd_stderr: f64,
    pub img_per_s: f64,
    pub skipped_steps: u64,
}

/// Append a row, writing the header first if the file is new.
pub fn append_metrics(path: &Path, r: &MetricsRow) -> Result<()> {
    let new = !path.exists();
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if new {
        writeln!(f, "{METRICS_HEADER}")?;
    }
    writeln!(
        f,
        "{},{},{:.1},{:.5},{:.5},{:.5},{:.2},{}",
        r.step,
        r.epoch,
        r.elapsed_s,
        r.train_bpd,
        r.test_bpd,
        r.test_bpd_stderr,
        r.img_per_s,
        r.skipped_steps
    )?;
    Ok(())
}

/// Read `metrics.csv` (missing file: no rows).
pub fn read_metrics(path: &Path) -> Result<Vec<MetricsRow>> {
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = fs::read_to_string(path)?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let num = |k: usize| -> Result<f64> {
            f.get(k)
                .and_then(|s| s.parse::<f64>().ok())
                .with_context(|| format!("{} line {}: bad field {k}", path.display(), i + 1))
        };
        rows.push(MetricsRow {
            step: num(0)? as u64,
            epoch: num(1)? as u64,
            elapsed_s: num(2)?,
            train_bpd: num(3)?,
            test_bpd: num(4)?,
            test_bpd_stderr: num(5)?,
            img_per_s: num(6)?,
            skipped_steps: num(7)? as u64,
        });
    }
    Ok(rows)
}

/// Keep only rows up to `step` (after resuming from an earlier checkpoint).
pub fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let rows = read_metrics(path)?;
    if rows.iter().all(|r| r.step <= step) {
        return Ok(());
    }
    let tmp = path.with_extension("csv.tmp");
    fs::remove_file(&tmp).ok();
    for r in rows.iter().filter(|r| r.step <= step) {
        append_metrics(&tmp, r)?;
    }
    if !tmp.exists() {
        fs::write(&tmp, format!("{METRICS_HEADER}\n"))?;
    }
    fs::rename(&tmp, path)?;
    Ok(())
}

/// Planar u8 images (`n · C · H · W`, C = 1 or 3) as one grid image with
/// `cols` columns, 2-pixel gaps, each image scaled up `zoom` times.
pub fn grid(
    pixels: &[u8],
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    cols: usize,
    zoom: usize,
) -> RgbImage {
    let cols = cols.max(1).min(n.max(1));
    let rows = n.div_ceil(cols).max(1);
    let (pad, z) = (2usize, zoom.max(1));
    let gw = cols * (w * z + pad) + pad;
    let gh = rows * (h * z + pad) + pad;
    let mut img = RgbImage::from_pixel(gw as u32, gh as u32, Rgb([40, 40, 40]));
    for k in 0..n {
        let (r, col) = (k / cols, k % cols);
        let (x0, y0) = (pad + col * (w * z + pad), pad + r * (h * z + pad));
        let base = k * c * h * w;
        for y in 0..h * z {
            for x in 0..w * z {
                let (sy, sx) = (y / z, x / z);
                let px = |ch: usize| pixels[base + (ch.min(c - 1) * h + sy) * w + sx];
                img.put_pixel((x0 + x) as u32, (y0 + y) as u32, Rgb([px(0), px(1), px(2)]));
            }
        }
    }
    img
}

/// A zoom that makes a grid of `cols` images of width `w` at least ~480 px wide.
pub fn auto_zoom(w: usize, cols: usize) -> usize {
    (480 / (w * cols).max(1)).clamp(1, 8)
}

/// Frames cell (`row`, `col`) of a [`grid`] of `h × w` images at `zoom` in red (the
/// originals among their decodings).
pub fn frame_cell(
    img: &mut RgbImage,
    (row, col): (usize, usize),
    (h, w): (usize, usize),
    zoom: usize,
) {
    let (cw, ch) = ((w * zoom + 2) as u32, (h * zoom + 2) as u32);
    frame(
        img,
        col as u32 * cw,
        row as u32 * ch,
        cw + 2,
        ch + 2,
        2,
        Rgb([230, 30, 30]),
    );
}

/// Draw a rectangle border of `thick` pixels.
pub fn frame(img: &mut RgbImage, x0: u32, y0: u32, w: u32, h: u32, thick: u32, color: Rgb<u8>) {
    for y in y0..(y0 + h).min(img.height()) {
        for x in x0..(x0 + w).min(img.width()) {
            let edge =
                x < x0 + thick || y < y0 + thick || x + thick >= x0 + w || y + thick >= y0 + h;
            if edge {
                img.put_pixel(x, y, color);
            }
        }
    }
}

pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    if let Some(d) = path.parent() {
        if !d.as_os_str().is_empty() {
            fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        }
    }
    img.save(path)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Train (blue) and test (red) bits/dim against step as a PNG line plot,
/// with light grid lines at round bits/dim values.
pub fn plot_bpd(rows: &[MetricsRow], path: &Path) -> Result<()> {
    let (w, h, m) = (640u32, 400u32, 30i64);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    // A diverging run's values (NaN, or 1e13 bits/dim) are left off the plot.
    let plotted = |v: f64| v.is_finite() && v.abs() <= MAX_PLOTTED_BPD;
    let pts: Vec<(f64, f64, f64)> = rows
        .iter()
        .filter(|r| plotted(r.train_bpd))
        .map(|r| (r.step as f64, r.train_bpd, r.test_bpd))
        .collect();
    if pts.is_empty() {
        return save_png(&img, path);
    }
    let xmax = pts.iter().map(|p| p.0).fold(1.0, f64::max);
    let vals = pts.iter().flat_map(|p| [p.1, p.2]).filter(|&v| plotted(v));
    let (lo, hi) = vals.fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = (
        (lo - 0.05 * (hi - lo).max(0.1)).floor(),
        (hi + 0.05 * (hi - lo).max(0.1)).ceil(),
    );
    let tx = |x: f64| m + ((x / xmax) * (w as i64 - 2 * m) as f64) as i64;
    let ty = |y: f64| h as i64 - m - (((y - lo) / (hi - lo)) * (h as i64 - 2 * m) as f64) as i64;
    // Grid lines at whole multiples of 1, 2, 5, 10, 20, … bits/dim: at most 10 of them.
    let step = grid_step(hi - lo);
    let first = (lo / step).ceil() as i64;
    for k in first..=(hi / step).floor() as i64 {
        let y = k as f64 * step;
        line(
            &mut img,
            (m, ty(y)),
            (w as i64 - m, ty(y)),
            Rgb([225, 225, 225]),
        );
    }
    line(
        &mut img,
        (m, h as i64 - m),
        (w as i64 - m, h as i64 - m),
        Rgb([0, 0, 0]),
    );
    line(&mut img, (m, m), (m, h as i64 - m), Rgb([0, 0, 0]));
    for (sel, color) in [(1usize, Rgb([30, 90, 220])), (2, Rgb([220, 50, 40]))] {
        let series: Vec<(i64, i64)> = pts
            .iter()
            .map(|p| (p.0, if sel == 1 { p.1 } else { p.2 }))
            .filter(|p| plotted(p.1))
            .map(|p| (tx(p.0), ty(p.1)))
            .collect();
        for s in series.windows(2) {
            line(&mut img, s[0], s[1], color);
        }
        for &(x, y) in &series {
            for dx in -2..=2 {
                for dy in -2..=2 {
                    put(&mut img, x + dx, y + dy, color);
                }
            }
        }
    }
    save_png(&img, path)
}

/// Bits/dim beyond this are not plotted (a diverged run; 8-bit data with a uniform
/// model has 8).
const MAX_PLOTTED_BPD: f64 = 1e4;

/// The smallest of 1, 2, 5, 10, 20, 50, … that cuts `range` into at most 10 parts.
fn grid_step(range: f64) -> f64 {
    if !(range.is_finite() && range > 10.0) {
        return 1.0;
    }
    let decade = 10f64.powf((range / 10.0).log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * decade)
        .find(|s| range / s <= 10.0)
        .unwrap_or(10.0 * decade)
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn line(img: &mut RgbImage, a: (i64, i64), b: (i64, i64), c: Rgb<u8>) {
    let n = (b.0 - a.0).abs().max((b.1 - a.1).abs()).max(1);
    for i in 0..=n {
        let x = a.0 + (b.0 - a.0) * i / n;
        let y = a.1 + (b.1 - a.1) * i / n;
        put(img, x, y, c);
        put(img, x, y + 1, c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_steps_are_round_and_few() {
        assert_eq!(grid_step(3.0), 1.0);
        assert_eq!(grid_step(10.0), 1.0);
        assert_eq!(grid_step(15.0), 2.0);
        assert_eq!(grid_step(45.0), 5.0);
        assert_eq!(grid_step(9.6e13), 1e13);
    }

    /// A diverging run's metrics (a NaN and a 9.6e13 test bits/dim) are plotted at once
    /// (the grid loop once drew a line per whole bits/dim).
    #[test]
    fn plotting_a_diverged_run_finishes() {
        let row = |step, train_bpd, test_bpd| MetricsRow {
            step,
            epoch: 0,
            elapsed_s: 1.0,
            train_bpd,
            test_bpd,
            test_bpd_stderr: 0.0,
            img_per_s: 1.0,
            skipped_steps: 0,
        };
        let rows = [
            row(2, 36.35, f64::NAN),
            row(4, 58.49, 9.6e13),
            row(6, 1e300, -1e300),
        ];
        let path = std::env::temp_dir().join(format!("nvp-plot-{}.png", std::process::id()));
        plot_bpd(&rows, &path).unwrap();
        assert!(path.is_file());
        std::fs::remove_file(&path).ok();
    }
}
