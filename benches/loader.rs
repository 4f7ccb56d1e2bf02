//! Loader throughput: u8 images → flips → dequantisation + logit → (B, C, H, W) f32
//! tensors, with background prefetch. Uses the CIFAR-10 sample at `NVP_CIFAR_DIR`
//! (default `/work/shared/data/cifar10`) when present, else a procedural 3×32×32 set.
//! Also prints the sample's image counts and class histograms.
//!
//! Then an LSUN-like image folder, decoded as batches need it (`StreamedFolder`): 512 of
//! those images upscaled to 342×256 (LSUN's files have a smaller side of 256) and saved as
//! JPEG into a temporary folder, read with the LSUN preset (resize to 96, random 64×64
//! crop) — the loader's throughput with 1 and 2 workers, against decoding the whole
//! folder up front (`read_folder`).
//!
//! Run: `cargo bench --bench loader`.

use nvp::data::cifar::{read_cifar10, CLASS_NAMES};
use nvp::data::folder::{read_folder, FolderOptions, Preprocess};
use nvp::data::{
    ImageSet, ImageSource, Loader, LoaderConfig, Procedural, ProceduralConfig, Split,
    StreamedFolder,
};
use std::sync::Arc;
use std::time::Instant;

fn dataset() -> (String, ImageSet) {
    let dir = std::env::var("NVP_CIFAR_DIR").unwrap_or_else(|_| "/work/shared/data/cifar10".into());
    match read_cifar10(&dir, Split::Train) {
        Ok(train) => {
            println!("CIFAR-10 at {dir}");
            println!("  train: {} images", train.len());
            println!("  train histogram: {}", histogram(&train));
            match read_cifar10(&dir, Split::Test) {
                Ok(test) => {
                    println!("  test: {} images", test.len());
                    println!("  test histogram: {}", histogram(&test));
                }
                Err(e) => println!("  test split: {e}"),
            }
            (format!("CIFAR-10 train ({dir})"), train)
        }
        Err(e) => {
            println!("no CIFAR-10 sample ({e}); using a procedural set");
            let p = Procedural::new(ProceduralConfig {
                size: 32,
                classes: 4,
            });
            ("procedural 3x32x32".into(), p.generate(10_000, 0))
        }
    }
}

fn histogram(s: &ImageSet) -> String {
    s.class_histogram()
        .iter()
        .enumerate()
        .map(|(c, n)| format!("{}={n}", CLASS_NAMES.get(c).unwrap_or(&"?")))
        .collect::<Vec<_>>()
        .join(" ")
}

fn run(name: &str, data: &Arc<dyn ImageSource>, workers: usize, epochs: usize) {
    let cfg = LoaderConfig {
        workers,
        prefetch: 4,
        ..LoaderConfig::train(64, 0)
    };
    let loader = match Loader::from_source(data.clone(), cfg) {
        Ok(l) => l,
        Err(e) => {
            println!("loader error: {e}");
            return;
        }
    };
    let start = Instant::now();
    let mut images = 0usize;
    let mut checksum = 0f64;
    let stream = match loader.stream(0, 0) {
        Ok(s) => s,
        Err(e) => {
            println!("loader error: {e}");
            return;
        }
    };
    for b in stream.take(epochs * loader.batches_per_epoch()) {
        match b {
            Ok(b) => {
                images += b.len();
                checksum += b.ld_pre[0];
                // touch the tensor like a consumer would
                if b.y.dims()[0] != b.len() {
                    println!("shape mismatch");
                }
            }
            Err(e) => {
                println!("batch error: {e}");
                return;
            }
        }
    }
    let s = start.elapsed().as_secs_f64();
    println!(
        "{name}: batch 64, flips on, workers {workers}: {images} images in {s:.2} s = {:.0} img/s (checksum {checksum:.1})",
        images as f64 / s
    );
}

/// Writes `n` of `set`'s images, upscaled to 342×256, as JPEG files under `dir`.
fn lsun_like_folder(set: &ImageSet, n: usize, dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for i in 0..n.min(set.len()) {
        let img = set.to_rgb_image(i).map_err(std::io::Error::other)?;
        let big = image::imageops::resize(&img, 342, 256, image::imageops::FilterType::Triangle);
        big.save(dir.join(format!("{i:05}.jpg")))
            .map_err(std::io::Error::other)?;
    }
    Ok(())
}

fn main() {
    let (name, set) = dataset();
    let data: Arc<dyn ImageSource> = Arc::new(set.clone());
    run(&name, &data, 1, 3);
    run(&name, &data, 2, 3);

    let dir = std::env::temp_dir().join(format!("nvp-bench-lsun-{}", std::process::id()));
    if let Err(e) = lsun_like_folder(&set, 512, &dir) {
        println!("cannot write the JPEG folder: {e}");
        return;
    }
    let opts = FolderOptions {
        preprocess: Preprocess::Lsun { train: true },
        ..FolderOptions::default()
    };
    let t0 = Instant::now();
    match read_folder(&dir, Split::Train, &opts) {
        Ok(f) => println!(
            "LSUN-like JPEG folder (342x256 → 64x64), read_folder up front: {} images in {:.2} s = {:.0} img/s ({} threads)",
            f.images.len(),
            t0.elapsed().as_secs_f64(),
            f.images.len() as f64 / t0.elapsed().as_secs_f64(),
            std::thread::available_parallelism().map_or(1, |n| n.get())
        ),
        Err(e) => println!("read_folder: {e}"),
    }
    match StreamedFolder::open(&dir, Split::Train, &opts) {
        Ok(f) => {
            let f: Arc<dyn ImageSource> = Arc::new(f);
            run("LSUN-like JPEG folder, streamed", &f, 1, 2);
            run("LSUN-like JPEG folder, streamed", &f, 2, 2);
        }
        Err(e) => println!("StreamedFolder::open: {e}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
