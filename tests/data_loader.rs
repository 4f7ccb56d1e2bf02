//! The batch loader: coverage, determinism whatever the threading, exact resume, batch
//! contents, the evaluation pass and bad settings.

use candle_core::{DType, Device};
use nvp::data::augment::flip_horizontal;
use nvp::data::{Batch, ImageSet, Loader, LoaderConfig, Logit, Procedural, ProceduralConfig};
use std::sync::Arc;

fn data(n: usize) -> Arc<ImageSet> {
    Arc::new(
        Procedural::new(ProceduralConfig {
            size: 8,
            classes: 4,
        })
        .generate(n, 42),
    )
}

fn cfg(batch: usize, seed: u64) -> LoaderConfig {
    LoaderConfig {
        device: Device::Cpu,
        ..LoaderConfig::train(batch, seed)
    }
}

/// Everything a batch holds, as plain values.
#[derive(Debug, PartialEq)]
struct Key {
    epoch: usize,
    index: usize,
    indices: Vec<usize>,
    pixels: Vec<u8>,
    y: Vec<f32>,
    ld_pre: Vec<f64>,
    flipped: Vec<bool>,
}

fn key(b: &Batch) -> Key {
    Key {
        epoch: b.epoch,
        index: b.index,
        indices: b.indices.clone(),
        pixels: b.pixels.clone(),
        y: b.y.flatten_all().unwrap().to_vec1().unwrap(),
        ld_pre: b.ld_pre.clone(),
        flipped: b.flipped.clone(),
    }
}

fn collect(it: impl Iterator<Item = nvp::data::Result<Batch>>) -> Vec<Batch> {
    it.map(|b| b.unwrap()).collect()
}

#[test]
fn an_epoch_visits_each_image_once() {
    let d = data(100);
    let l = Loader::new(d.clone(), cfg(16, 1)).unwrap();
    assert_eq!(l.batches_per_epoch(), 6);
    let bs = collect(l.epoch(0).unwrap());
    assert_eq!(bs.len(), 6);
    let mut seen: Vec<usize> = bs.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(seen.len(), 96);
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 96);
    for (k, b) in bs.iter().enumerate() {
        assert_eq!((b.epoch, b.index, b.len()), (0, k, 16));
    }

    let keep = Loader::new(
        d,
        LoaderConfig {
            drop_last: false,
            ..cfg(16, 1)
        },
    )
    .unwrap();
    let bs = collect(keep.epoch(3).unwrap());
    assert_eq!(bs.len(), 7);
    assert_eq!(bs[6].len(), 4);
    let mut seen: Vec<usize> = bs.iter().flat_map(|b| b.indices.clone()).collect();
    seen.sort();
    assert_eq!(seen, (0..100).collect::<Vec<_>>());
}

#[test]
fn epochs_are_shuffled_differently_and_reproducibly() {
    let l = Loader::new(data(50), cfg(10, 7)).unwrap();
    let p0 = l.permutation(0);
    assert_ne!(p0, l.permutation(1));
    assert_eq!(
        p0,
        Loader::new(data(50), cfg(10, 7)).unwrap().permutation(0)
    );
    assert_ne!(
        p0,
        Loader::new(data(50), cfg(10, 8)).unwrap().permutation(0)
    );
    let plain = Loader::new(
        data(50),
        LoaderConfig {
            shuffle: false,
            ..cfg(10, 7)
        },
    )
    .unwrap();
    assert_eq!(plain.permutation(5), (0..50).collect::<Vec<_>>());
}

#[test]
fn batches_do_not_depend_on_threads_or_prefetch_depth() {
    let d = data(70);
    let reference: Vec<_> = Loader::new(d.clone(), cfg(8, 3))
        .unwrap()
        .stream(0, 0)
        .unwrap()
        .take(20)
        .map(|b| key(&b.unwrap()))
        .collect();
    for (workers, prefetch) in [(1, 1), (3, 1), (2, 4), (4, 2)] {
        let l = Loader::new(
            d.clone(),
            LoaderConfig {
                workers,
                prefetch,
                ..cfg(8, 3)
            },
        )
        .unwrap();
        let got: Vec<_> = l
            .stream(0, 0)
            .unwrap()
            .take(20)
            .map(|b| key(&b.unwrap()))
            .collect();
        assert!(got == reference, "workers {workers}, prefetch {prefetch}");
    }
    // another seed: other batches
    let other = Loader::new(d, cfg(8, 4)).unwrap().batch(0, 0).unwrap();
    assert!(key(&other) != reference[0]);
}

#[test]
fn resuming_at_epoch_and_batch_gives_the_same_batches() {
    let d = data(50);
    let l = Loader::new(d.clone(), cfg(8, 11)).unwrap();
    assert_eq!(l.batches_per_epoch(), 6);
    let full: Vec<_> = l
        .stream(0, 0)
        .unwrap()
        .take(15)
        .map(|b| key(&b.unwrap()))
        .collect();
    assert_eq!((full[8].epoch, full[8].index), (1, 2));
    // a fresh loader (as after a restart) at (1, 2)
    let l2 = Loader::new(d.clone(), cfg(8, 11)).unwrap();
    let resumed: Vec<_> = l2
        .stream(1, 2)
        .unwrap()
        .take(7)
        .map(|b| key(&b.unwrap()))
        .collect();
    assert!(resumed[..] == full[8..]);
    // a batch index past the epoch carries over
    let carried = key(&l2.stream(0, 8).unwrap().next().unwrap().unwrap());
    assert!(carried == full[8]);
    // the rest of one epoch, and single batches on demand
    let rest: Vec<_> = l2
        .epoch_from(1, 2)
        .unwrap()
        .map(|b| key(&b.unwrap()))
        .collect();
    assert_eq!(rest.len(), 4);
    assert!(rest[..] == full[8..12]);
    assert!(key(&l2.batch(2, 0).unwrap()) == full[12]);
}

#[test]
fn batch_contents_match_the_dataset_and_the_preprocessing() {
    let d = data(40);
    let l = Loader::new(d.clone(), cfg(10, 5)).unwrap();
    let logit = Logit::default();
    let mut flips = 0;
    let mut total = 0;
    for b in l.epoch(0).unwrap().chain(l.epoch(1).unwrap()) {
        let b = b.unwrap();
        assert_eq!(b.y.dims(), &[10, 3, 8, 8]);
        assert_eq!(b.y.dtype(), DType::F32);
        assert!(b.y.device().is_cpu());
        assert_eq!(b.ld_pre_tensor().unwrap().dims(), &[10]);
        let y: Vec<f32> = b.y.flatten_all().unwrap().to_vec1().unwrap();
        for (k, &i) in b.indices.iter().enumerate() {
            // pixels: the dataset image, mirrored when flipped
            let mut expect = d.image(i).to_vec();
            if b.flipped[k] {
                flip_horizontal(&mut expect, 3, 8, 8).unwrap();
                flips += 1;
            }
            total += 1;
            let px = &b.pixels[k * 192..(k + 1) * 192];
            assert_eq!(px, &expect[..]);
            assert_eq!(b.labels.as_ref().unwrap()[k], d.label(i).unwrap());
            // y: logit of pixel + u with u in [0, 1)
            let yk: Vec<f64> = y[k * 192..(k + 1) * 192]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let x = logit.inverse_f64(&yk);
            for (xv, &p) in x.iter().zip(px) {
                let u = xv - p as f64;
                assert!((-1e-3..1.0 + 1e-3).contains(&u), "u = {u}");
            }
            // ld_pre: the log-det at those x
            let xs: Vec<f64> = x.iter().map(|v| v.clamp(0.0, 256.0)).collect();
            let ld = logit.log_det(&xs).unwrap();
            assert!((ld - b.ld_pre[k]).abs() < 1e-2, "{ld} vs {}", b.ld_pre[k]);
            // per sub-pixel ln|dy/dx| lies in [ln 0.9 − ln 256 + ln 4, ln 0.9 − ln 256 − ln(0.05·0.95)]
            let (lo, hi) = (logit.log_det_scalar(128.0), logit.log_det_scalar(0.0));
            assert!((192.0 * lo..=192.0 * hi).contains(&b.ld_pre[k]));
        }
    }
    let frac = flips as f64 / total as f64;
    assert!((0.3..0.7).contains(&frac), "flip fraction {frac}");

    let no_flip = Loader::new(
        d,
        LoaderConfig {
            flip: false,
            ..cfg(10, 5)
        },
    )
    .unwrap();
    assert!(no_flip
        .epoch(0)
        .unwrap()
        .all(|b| b.unwrap().flipped.iter().all(|f| !f)));
}

#[test]
fn evaluation_pass_is_ordered_unflipped_complete_and_fixed() {
    let d = data(23);
    let l = Loader::new(d.clone(), cfg(5, 9)).unwrap();
    assert_eq!(l.eval_batch_count(), 5);
    let a = collect(l.eval_batches().unwrap());
    assert_eq!(a.len(), 5);
    assert_eq!(a[4].len(), 3);
    let idx: Vec<usize> = a.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(idx, (0..23).collect::<Vec<_>>());
    assert!(a.iter().all(|b| b.flipped.iter().all(|f| !f)));
    let pix: Vec<u8> = a.iter().flat_map(|b| b.pixels.clone()).collect();
    assert_eq!(pix, d.images);
    let b = collect(l.eval_batches().unwrap());
    for (x, y) in a.iter().zip(&b) {
        assert!(key(x) == key(y));
    }
    assert!(key(&l.eval_batch(2).unwrap()) == key(&a[2]));
    // the same from an evaluation config, whatever its flags
    let e = Loader::new(d, LoaderConfig::eval(5, 9)).unwrap();
    let c = collect(e.eval_batches().unwrap());
    assert!(key(&c[0]) == key(&a[0]));
    assert_eq!(e.batches_per_epoch(), 5);
}

#[test]
fn dropping_an_endless_stream_stops_its_threads() {
    let l = Loader::new(
        data(30),
        LoaderConfig {
            workers: 2,
            prefetch: 2,
            ..cfg(4, 0)
        },
    )
    .unwrap();
    for _ in 0..5 {
        let mut s = l.stream(0, 0).unwrap();
        assert!(s.next().unwrap().is_ok());
        drop(s);
    }
    let s = l.epoch(0).unwrap();
    assert_eq!(s.size_hint(), (7, Some(7)));
}

#[test]
fn bad_settings_are_errors() {
    let d = data(10);
    assert!(Loader::new(d.clone(), cfg(0, 0)).is_err());
    assert!(Loader::new(d.clone(), cfg(11, 0)).is_err());
    assert!(Loader::new(
        d.clone(),
        LoaderConfig {
            drop_last: false,
            ..cfg(11, 0)
        }
    )
    .is_ok());
    assert!(Loader::new(
        d.clone(),
        LoaderConfig {
            alpha: 0.5,
            ..cfg(2, 0)
        }
    )
    .is_err());
    let empty = Arc::new(ImageSet::empty(3, 8, 8, false));
    assert!(Loader::new(empty, cfg(1, 0)).is_err());
    let l = Loader::new(d, cfg(4, 0)).unwrap();
    assert!(l.batch(0, 2).is_err());
    assert!(l.epoch_from(0, 3).is_err());
    assert!(l.eval_batch(3).is_err());
    assert_eq!(l.epoch_from(0, 2).unwrap().count(), 0);
}
