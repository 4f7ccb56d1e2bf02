//! `ImageSet` helpers, flips and the seed mixer.

use nvp::data::augment::{flip_horizontal, RandomFlip};
use nvp::data::image_set::{holdout_indices, planar_to_rgb};
use nvp::data::seed::mix_seed;
use nvp::data::{ImageSet, Split};
use rand::rngs::StdRng;
use rand::SeedableRng;

/// `n` grey 2×3 images with bytes 0, 1, 2, …; labels `i % 3`.
fn small_set(n: usize) -> ImageSet {
    let images = (0..n * 6).map(|k| k as u8).collect();
    let labels = (0..n).map(|i| (i % 3) as u32).collect();
    ImageSet::new(images, Some(labels), 1, 2, 3).unwrap()
}

#[test]
fn construction_checks_sizes() {
    assert!(ImageSet::new(vec![0; 7], None, 1, 2, 3).is_err());
    assert!(ImageSet::new(vec![0; 12], Some(vec![0]), 1, 2, 3).is_err());
    assert!(ImageSet::new(vec![], None, 0, 2, 3).is_err());
    let s = ImageSet::new(vec![0; 12], Some(vec![0, 1]), 1, 2, 3).unwrap();
    assert_eq!((s.len(), s.dims(), s.shape()), (2, 6, (1, 2, 3)));
}

#[test]
fn access_take_subset_append_histogram() {
    let s = small_set(5);
    assert_eq!(s.image(1), &[6, 7, 8, 9, 10, 11]);
    assert_eq!(s.get(5), None);
    assert_eq!(s.label(4), Some(1));
    assert_eq!(s.label(9), None);
    assert_eq!(s.class_histogram(), vec![2, 2, 1]);
    assert_eq!(s.num_classes(), 3);

    let t = s.take(2);
    assert_eq!(t.len(), 2);
    assert_eq!(t.labels, Some(vec![0, 1]));
    assert_eq!(s.take(100).len(), 5);

    let sub = s.subset(&[4, 0, 4]).unwrap();
    assert_eq!(sub.len(), 3);
    assert_eq!(sub.image(0), s.image(4));
    assert_eq!(sub.labels, Some(vec![1, 0, 1]));
    assert!(s.subset(&[5]).is_err());

    let mut a = s.take(1);
    a.append(&s.take(2)).unwrap();
    assert_eq!(a.len(), 3);
    let unl = ImageSet::new(vec![0; 6], None, 1, 2, 3).unwrap();
    assert!(a.append(&unl).is_err());
    let other_shape = ImageSet::new(vec![0; 6], Some(vec![0]), 1, 3, 2).unwrap();
    assert!(a.append(&other_shape).is_err());
    assert!(unl.class_histogram().is_empty());
}

#[test]
fn holdout_split_is_deterministic_disjoint_and_exact() {
    let (tr, te) = holdout_indices(1000, 0.1, 5).unwrap();
    assert_eq!(te.len(), 100);
    assert_eq!(tr.len(), 900);
    let mut all: Vec<usize> = tr.iter().chain(&te).copied().collect();
    all.sort();
    assert_eq!(all, (0..1000).collect::<Vec<_>>());
    assert_eq!(
        holdout_indices(1000, 0.1, 5).unwrap(),
        (tr.clone(), te.clone())
    );
    assert_ne!(holdout_indices(1000, 0.1, 6).unwrap().1, te);
    assert!(holdout_indices(10, 1.5, 0).is_err());
    assert!(holdout_indices(10, f64::NAN, 0).is_err());

    let s = small_set(10);
    let (a, b) = s.split_holdout(0.3, 1).unwrap();
    assert_eq!((a.len(), b.len()), (7, 3));
}

#[test]
fn rgb_conversion_of_grey_and_colour() {
    let grey = ImageSet::new(vec![10, 20, 30, 40, 50, 60], None, 1, 2, 3).unwrap();
    let g = grey.to_rgb_image(0).unwrap();
    assert_eq!(g.dimensions(), (3, 2));
    assert_eq!(g.get_pixel(2, 1).0, [60, 60, 60]);
    assert!(grey.to_rgb_image(1).is_err());
    // 3 planes of 1x2
    let rgb = planar_to_rgb(&[1, 2, 3, 4, 5, 6], 3, 1, 2).unwrap();
    assert_eq!(rgb.get_pixel(0, 0).0, [1, 3, 5]);
    assert_eq!(rgb.get_pixel(1, 0).0, [2, 4, 6]);
    assert!(planar_to_rgb(&[0; 8], 2, 2, 2).is_err());
}

#[test]
fn horizontal_flip_of_an_explicit_image() {
    // C=2, H=2, W=3
    let mut img: Vec<u8> = vec![
        1, 2, 3, //
        4, 5, 6, //
        7, 8, 9, //
        10, 11, 12,
    ];
    flip_horizontal(&mut img, 2, 2, 3).unwrap();
    assert_eq!(img, vec![3, 2, 1, 6, 5, 4, 9, 8, 7, 12, 11, 10]);
    flip_horizontal(&mut img, 2, 2, 3).unwrap();
    assert_eq!(img, (1..=12).collect::<Vec<u8>>());
    assert!(flip_horizontal(&mut img, 2, 2, 2).is_err());
}

#[test]
fn random_flip_is_seeded_and_about_half() {
    let f = RandomFlip::default();
    assert_eq!(f.p, 0.5);
    let run = |seed| {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..2000)
            .map(|_| {
                let mut img = vec![1u8, 2, 3];
                let did = f.apply(&mut img, 1, 1, 3, &mut rng).unwrap();
                assert_eq!(img, if did { vec![3, 2, 1] } else { vec![1, 2, 3] });
                did
            })
            .collect::<Vec<bool>>()
    };
    let a = run(1);
    assert_eq!(a, run(1));
    assert_ne!(a, run(2));
    let flips = a.iter().filter(|&&b| b).count();
    assert!((900..1100).contains(&flips), "{flips}");
    assert!(RandomFlip::new(1.5).is_err());
    let never = RandomFlip::new(0.0).unwrap();
    let mut img = vec![1u8, 2];
    let mut rng = StdRng::seed_from_u64(0);
    assert!(!never.apply(&mut img, 1, 1, 2, &mut rng).unwrap());
}

#[test]
fn split_names_and_seed_mixing() {
    assert_eq!("train".parse::<Split>().unwrap(), Split::Train);
    assert_eq!("val".parse::<Split>().unwrap(), Split::Test);
    assert!("nope".parse::<Split>().is_err());
    assert_eq!(mix_seed(1, 2), mix_seed(1, 2));
    assert_ne!(mix_seed(1, 2), mix_seed(2, 1));
    assert_ne!(mix_seed(0, 0), 0);
}

#[test]
fn hand_built_inconsistent_sets_are_rejected_not_panicked_on() {
    let bad = ImageSet {
        images: vec![0; 12],
        labels: Some(vec![1]),
        channels: 1,
        height: 2,
        width: 3,
    };
    assert!(bad.validate().is_err());
    assert!(bad.subset(&[1]).is_err());
    assert_eq!(bad.take(2).labels, Some(vec![1]));
    let loader = nvp::data::Loader::new(
        std::sync::Arc::new(bad.clone()),
        nvp::data::LoaderConfig::train(1, 0),
    );
    assert!(loader.is_err());
    let mut ok = small_set(2);
    assert!(ok.append(&bad).is_err());
    let ragged = ImageSet {
        images: vec![0; 7],
        labels: None,
        channels: 1,
        height: 2,
        width: 3,
    };
    assert!(ragged.validate().is_err());
}
