//! The procedural image set and the 2-D toy distributions.

use nvp::data::procedural::CLASS_NAMES;
use nvp::data::toy2d::{sample, sample_f64, sample_flat};
use nvp::data::{Procedural, ProceduralConfig, Toy2d};
use rand::rngs::StdRng;
use rand::SeedableRng;

#[test]
fn procedural_is_deterministic_and_prefix_stable() {
    let p = Procedural::new(ProceduralConfig::default());
    let a = p.generate(60, 3);
    assert_eq!(a.shape(), (3, 16, 16));
    assert_eq!(a.len(), 60);
    assert_eq!(a, p.generate(60, 3));
    assert_ne!(a, p.generate(60, 4));
    assert_eq!(p.generate(10, 3), a.take(10));
    let (img, label) = p.image(3, 7);
    assert_eq!(img, a.image(7));
    assert_eq!(Some(label), a.label(7));
}

#[test]
fn procedural_has_all_classes_and_real_variation() {
    let p = Procedural::new(ProceduralConfig::default());
    let s = p.generate(400, 0);
    let h = s.class_histogram();
    assert_eq!(h.len(), CLASS_NAMES.len());
    assert!(h.iter().all(|&c| c >= 60), "{h:?}");
    // all distinct
    let mut imgs: Vec<&[u8]> = (0..s.len()).map(|i| s.image(i)).collect();
    imgs.sort();
    imgs.dedup();
    assert_eq!(imgs.len(), 400);
    // every image uses a real range of values (a shape on a background)
    for i in 0..s.len() {
        let im = s.image(i);
        let (lo, hi) = (im.iter().min().unwrap(), im.iter().max().unwrap());
        assert!(hi - lo > 60, "image {i}: {lo}..{hi}");
    }
}

#[test]
fn procedural_images_are_smooth() {
    // low entropy: neighbouring pixels are close on average (uniform noise would give ~85)
    let p = Procedural::new(ProceduralConfig {
        size: 32,
        classes: 4,
    });
    let s = p.generate(100, 1);
    assert_eq!(s.shape(), (3, 32, 32));
    let (mut sum, mut n) = (0u64, 0u64);
    for i in 0..s.len() {
        let im = s.image(i);
        for c in 0..3 {
            for y in 0..32 {
                for x in 1..32 {
                    let a = im[c * 1024 + y * 32 + x] as i64;
                    let b = im[c * 1024 + y * 32 + x - 1] as i64;
                    sum += (a - b).unsigned_abs();
                    n += 1;
                }
            }
        }
    }
    let mean = sum as f64 / n as f64;
    assert!(mean < 12.0, "mean neighbour difference {mean}");
}

#[test]
fn procedural_config_is_clamped() {
    let p = Procedural::new(ProceduralConfig {
        size: 1,
        classes: 0,
    });
    assert_eq!(
        p.config(),
        ProceduralConfig {
            size: 4,
            classes: 1
        }
    );
    let s = p.generate(20, 0);
    assert_eq!(s.shape(), (3, 4, 4));
    assert_eq!(s.class_histogram(), vec![20]);
    let two = Procedural::new(ProceduralConfig {
        size: 8,
        classes: 2,
    });
    assert_eq!(two.generate(100, 0).num_classes(), 2);
    assert!(Procedural::new(ProceduralConfig::default())
        .generate(0, 0)
        .is_empty());
}

#[test]
fn toy_names_parse_and_print() {
    for t in Toy2d::ALL {
        assert_eq!(t.to_string().parse::<Toy2d>().unwrap(), t);
    }
    assert_eq!("two-moons".parse::<Toy2d>().unwrap(), Toy2d::Moons);
    assert_eq!(
        "8_gaussians".parse::<Toy2d>().unwrap(),
        Toy2d::EightGaussians
    );
    assert_eq!("Circles".parse::<Toy2d>().unwrap(), Toy2d::Rings);
    let err = "banana".parse::<Toy2d>().unwrap_err().to_string();
    assert!(
        err.contains("banana") && err.contains("checkerboard"),
        "{err}"
    );
}

#[test]
fn toy_samples_are_seeded_bounded_and_shaped() {
    for t in Toy2d::ALL {
        let a = sample(t, 2000, &mut StdRng::seed_from_u64(5));
        assert_eq!(a.len(), 2000);
        assert_eq!(a, sample(t, 2000, &mut StdRng::seed_from_u64(5)));
        assert_ne!(a, sample(t, 2000, &mut StdRng::seed_from_u64(6)));
        assert!(
            a.iter().flatten().all(|v| v.is_finite() && v.abs() < 7.0),
            "{t}"
        );
        let flat = sample_flat(t, 2000, &mut StdRng::seed_from_u64(5));
        assert_eq!(flat, a.iter().flatten().copied().collect::<Vec<f32>>());
        // spread in both coordinates
        for k in 0..2 {
            let m = a.iter().map(|p| p[k] as f64).sum::<f64>() / 2000.0;
            let v = a.iter().map(|p| (p[k] as f64 - m).powi(2)).sum::<f64>() / 2000.0;
            assert!(v > 0.2, "{t}: variance {v}");
        }
    }
}

#[test]
fn toy_samples_have_their_structure() {
    let mut rng = StdRng::seed_from_u64(9);
    let r = |p: &[f64; 2]| (p[0] * p[0] + p[1] * p[1]).sqrt();

    let g = sample_f64(Toy2d::EightGaussians, 4000, &mut rng);
    let dev = g
        .iter()
        .map(|p| (r(p) - 2.0 * 2f64.sqrt()).abs())
        .sum::<f64>()
        / 4000.0;
    assert!(dev < 0.4, "8 gaussians: mean radial deviation {dev}");

    let rings = sample_f64(Toy2d::Rings, 4000, &mut rng);
    let dev = rings
        .iter()
        .map(|p| {
            [1.0, 2.0, 3.0]
                .iter()
                .map(|&c| (r(p) - c).abs())
                .fold(f64::MAX, f64::min)
        })
        .sum::<f64>()
        / 4000.0;
    assert!(dev < 0.1, "rings: mean distance to the nearest ring {dev}");

    let cb = sample_f64(Toy2d::Checkerboard, 4000, &mut rng);
    for p in &cb {
        assert!(
            p[0] >= -4.0 && p[0] < 4.0 && p[1] >= -4.0 && p[1] < 4.0,
            "{p:?}"
        );
        let cell = (p[0] / 2.0).floor() as i64 + (p[1] / 2.0).floor() as i64;
        assert_eq!(cell.rem_euclid(2), 0, "{p:?} is on a light square");
    }

    let moons = sample_f64(Toy2d::Moons, 4000, &mut rng);
    let upper = moons.iter().filter(|p| p[1] > 0.25).count();
    assert!((1200..2800).contains(&upper), "{upper}");
}
