//! Loader throughput: u8 images → flips → dequantisation + logit → (B, C, H, W) f32
//! tensors, with background prefetch. Uses the CIFAR-10 sample at `NVP_CIFAR_DIR`
//! (default `/work/shared/data/cifar10`) when present, else a procedural 3×32×32 set.
//! Also prints the sample's image counts and class histograms.
//!
//! Run: `cargo bench --bench loader`.

use nvp::data::cifar::{read_cifar10, CLASS_NAMES};
use nvp::data::{ImageSet, Loader, LoaderConfig, Procedural, ProceduralConfig, Split};
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

fn run(name: &str, data: &Arc<ImageSet>, workers: usize, epochs: usize) {
    let cfg = LoaderConfig {
        workers,
        prefetch: 4,
        ..LoaderConfig::train(64, 0)
    };
    let loader = match Loader::new(data.clone(), cfg) {
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

fn main() {
    let (name, set) = dataset();
    let data = Arc::new(set);
    run(&name, &data, 1, 3);
    run(&name, &data, 2, 3);
}
