//! Every shipped config (`configs/*.toml`) trains one step on a small dataset written
//! here in its format (CIFAR-10 binary batches, ImageNet `.npz`, an image folder, or
//! none for the procedural demo), at the config's own model size, and writes a complete
//! checkpoint, which then evaluates and samples: the full-size models (13 M parameters
//! for `cifar10`, 63 M for the 64×64 configs) are exercised, not only the tiny ones of
//! `cli.rs`. (A one-copy-per-variable
//! bug in the optimizer's state made the first checkpoint of `cifar10` need tens of GB;
//! this is the test that catches that class of fault.) Sequential, one config at a time.

use std::path::{Path, PathBuf};
use std::process::Command;

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nvp-configs-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Deterministic bytes.
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

fn cifar(dir: &Path) {
    let rec = |n: usize, seed| -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                let mut r = vec![(i % 10) as u8];
                r.extend(bytes(3072, seed + i as u64));
                r
            })
            .collect()
    };
    std::fs::write(dir.join("data_batch_1.bin"), rec(6, 1)).unwrap();
    std::fs::write(dir.join("test_batch.bin"), rec(3, 100)).unwrap();
}

fn imagenet(dir: &Path, side: usize) {
    let write = |name: &str, n: usize, seed| {
        let data =
            ndarray::Array2::from_shape_vec((n, 3 * side * side), bytes(n * 3 * side * side, seed))
                .unwrap();
        let labels = ndarray::Array1::from_iter((0..n as i64).map(|i| i % 1000 + 1));
        let mut npz = ndarray_npy::NpzWriter::new(std::fs::File::create(dir.join(name)).unwrap());
        npz.add_array("data", &data).unwrap();
        npz.add_array("labels", &labels).unwrap();
        npz.finish().unwrap();
    };
    write("train_data_batch_1.npz", 6, 1);
    write("val_data.npz", 3, 2);
}

fn folder(dir: &Path) {
    for k in 0..24u32 {
        let img = image::RgbImage::from_fn(70 + k, 90, |x, y| {
            image::Rgb([(x * 3 + k) as u8, (y * 2) as u8, ((x ^ y) + k) as u8])
        });
        img.save(dir.join(format!("{k:03}.png"))).unwrap();
    }
}

#[test]
fn every_shipped_config_trains_checkpoints_evaluates_and_samples() {
    let mut names: Vec<PathBuf> = std::fs::read_dir(configs_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    names.sort();
    assert!(names.len() >= 9, "configs: {names:?}");
    for cfg in names {
        let name = cfg.file_stem().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&cfg).unwrap();
        let v: toml::Value = toml::from_str(&text).unwrap();
        let dataset = v
            .get("data")
            .and_then(|d| d.get("dataset"))
            .and_then(|d| d.as_str())
            .unwrap_or("cifar10")
            .to_string();
        let side = v
            .get("model")
            .and_then(|m| m.get("height"))
            .and_then(|h| h.as_integer())
            .unwrap_or(32) as usize;
        let d = tmp(&name);
        let data = d.join("data");
        std::fs::create_dir_all(&data).unwrap();
        match dataset.as_str() {
            "cifar10" => cifar(&data),
            "imagenet" => imagenet(&data, side),
            "folder" => folder(&data),
            "procedural" => {}
            other => panic!("{name}: no fixture for dataset `{other}`"),
        }
        let run = d.join("run");
        // (the procedural dataset has no files: --data would be an error)
        let data_args = if dataset == "procedural" {
            vec![]
        } else {
            vec!["--data".as_ref(), data.as_os_str()]
        };
        let o = Command::new(env!("CARGO_BIN_EXE_nvp"))
            .args(["train", "--config"])
            .arg(&cfg)
            .args(&data_args)
            .arg("--out")
            .arg(&run)
            .args(["--max-steps", "1", "--batch-size", "2"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{name}: nvp train failed: {err}");
        for f in [
            "model.safetensors",
            "optimizer.safetensors",
            "state.toml",
            "config.toml",
        ] {
            let p = run.join("last").join(f);
            assert!(p.is_file(), "{name}: no {}", p.display());
        }
        // the model file holds every trainable parameter (f32) and the batch-norm
        // statistics: at least 4 bytes per parameter the run reported
        let params: u64 = err
            .split(" parameters")
            .next()
            .and_then(|s| s.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no parameter count in {err}"));
        let size = std::fs::metadata(run.join("last/model.safetensors"))
            .unwrap()
            .len();
        assert!(
            size >= 4 * params,
            "{name}: {size} bytes for {params} parameters"
        );
        // the checkpoint serves evaluation and sampling at full size too
        let run_s = run.to_str().unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_nvp"))
            .args(["eval", "--ckpt", run_s, "--json", "--limit", "2"])
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains("\"bpd\":"),
            "{name}: nvp eval failed: {out} {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let png = d.join("s.png");
        let o = Command::new(env!("CARGO_BIN_EXE_nvp"))
            .args(["sample", "--ckpt", run_s, "--n", "2", "--out"])
            .arg(&png)
            .output()
            .unwrap();
        assert!(
            o.status.success() && png.is_file(),
            "{name}: nvp sample failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        std::fs::remove_dir_all(&d).ok();
    }
}
