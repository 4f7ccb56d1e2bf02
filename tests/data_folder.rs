//! Image-folder reader: order, classes, colour conversion, presets, splits and bad input.
//! Fixtures are written here with the `image` crate into temporary folders.

mod common;
use common::TempDir;

use image::{GrayImage, Rgb, RgbImage, Rgba, RgbaImage};
use nvp::data::folder::{list_images, read_folder, FolderOptions, OnError, Preprocess};
use nvp::data::{Error, Split};
use std::path::PathBuf;

fn solid(w: u32, h: u32, c: [u8; 3]) -> RgbImage {
    RgbImage::from_pixel(w, h, Rgb(c))
}

/// A horizontal + vertical gradient, so that different crops differ.
fn gradient(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 255 / w.max(2)) as u8,
            (y * 255 / h.max(2)) as u8,
            ((x + y) % 256) as u8,
        ])
    })
}

fn opts() -> FolderOptions {
    FolderOptions {
        threads: 2,
        ..FolderOptions::default()
    }
}

#[test]
fn recursive_sorted_with_classes_and_colour_conversion() {
    let dir = TempDir::new("folder-classes");
    solid(4, 3, [10, 20, 30]).save(dir.file("b/z.png")).unwrap();
    GrayImage::from_pixel(4, 3, image::Luma([77]))
        .save(dir.file("a/sub/y.png"))
        .unwrap();
    RgbaImage::from_pixel(4, 3, Rgba([200, 100, 50, 7]))
        .save(dir.file("a/x.PNG"))
        .unwrap();
    solid(4, 3, [1, 2, 3])
        .save(dir.file("b/photo.jpg"))
        .unwrap();
    std::fs::write(dir.file("b/readme.txt"), "not an image").unwrap();
    std::fs::write(dir.file("b/.hidden.png"), "ignored").unwrap();

    let files = list_images(dir.path()).unwrap();
    let rel: Vec<String> = files
        .iter()
        .map(|f| {
            f.strip_prefix(dir.path())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        rel,
        vec!["a/sub/y.png", "a/x.PNG", "b/photo.jpg", "b/z.png"]
    );

    let set = read_folder(
        dir.path(),
        Split::Train,
        &FolderOptions {
            class_subfolders: true,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(set.class_names, vec!["a", "b"]);
    assert_eq!(set.skipped, 0);
    let im = &set.images;
    assert_eq!(im.shape(), (3, 3, 4));
    assert_eq!(im.len(), 4);
    assert_eq!(im.labels, Some(vec![0, 0, 1, 1]));
    // grey → RGB
    assert_eq!(im.to_rgb_image(0).unwrap().get_pixel(1, 1).0, [77, 77, 77]);
    // RGBA → RGB, alpha dropped
    assert_eq!(
        im.to_rgb_image(1).unwrap().get_pixel(3, 2).0,
        [200, 100, 50]
    );
    // PNG is exact
    assert_eq!(im.to_rgb_image(3).unwrap().get_pixel(0, 0).0, [10, 20, 30]);
    // JPEG is close
    let j = im.to_rgb_image(2).unwrap().get_pixel(2, 1).0;
    assert!(
        j.iter()
            .zip([1, 2, 3])
            .all(|(&a, b)| (a as i32 - b).abs() <= 3),
        "{j:?}"
    );
    assert_eq!(set.files, files);

    // without classes: unlabelled, same order
    let plain = read_folder(dir.path(), Split::Train, &opts()).unwrap();
    assert_eq!(plain.images.labels, None);
    assert_eq!(plain.images.images, set.images.images);
}

#[test]
fn different_sizes_need_a_preset() {
    let dir = TempDir::new("folder-sizes");
    solid(8, 8, [1, 1, 1]).save(dir.file("a.png")).unwrap();
    solid(9, 8, [1, 1, 1]).save(dir.file("b.png")).unwrap();
    let err = read_folder(dir.path(), Split::Train, &opts()).unwrap_err();
    assert!(matches!(err, Error::ImageSize { .. }), "{err}");
    assert!(err.to_string().contains("b.png"), "{err}");
    let ok = read_folder(
        dir.path(),
        Split::Train,
        &FolderOptions {
            preprocess: Preprocess::ResizeCrop { size: 4 },
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(ok.images.shape(), (3, 4, 4));
}

#[test]
fn celeba_takes_the_central_148_crop_and_resizes_to_64() {
    let dir = TempDir::new("folder-celeba");
    // 178×218 like aligned CelebA: the central 148×148 (from x=15, y=35) is one colour,
    // the border another; nothing of the border may survive the crop.
    let mut img = solid(178, 218, [255, 0, 0]);
    for y in 35..183 {
        for x in 15..163 {
            img.put_pixel(x, y, Rgb([0, 200, 100]));
        }
    }
    img.save(dir.file("face.png")).unwrap();
    let set = read_folder(
        dir.path(),
        Split::Train,
        &FolderOptions {
            preprocess: Preprocess::CelebA,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(set.images.shape(), (3, 64, 64));
    let rgb = set.images.to_rgb_image(0).unwrap();
    assert!(rgb.pixels().all(|p| p.0 == [0, 200, 100]));
}

#[test]
fn lsun_resizes_to_96_and_crops_64_central_or_seeded_random() {
    let dir = TempDir::new("folder-lsun");
    for k in 0..4 {
        gradient(120 + 10 * k, 200)
            .save(dir.file(&format!("room{k}.png")))
            .unwrap();
    }
    let read = |train: bool, crop_seed: u64| {
        read_folder(
            dir.path(),
            Split::Train,
            &FolderOptions {
                preprocess: Preprocess::Lsun { train },
                crop_seed,
                ..opts()
            },
        )
        .unwrap()
        .images
    };
    let eval = read(false, 0);
    assert_eq!(eval.shape(), (3, 64, 64));
    assert_eq!(eval, read(false, 99), "the central crop ignores the seed");
    let a = read(true, 1);
    assert_eq!(a.shape(), (3, 64, 64));
    assert_eq!(a, read(true, 1), "seeded crops are reproducible");
    assert_ne!(a, read(true, 2), "another seed gives other crops");

    // The central crop of the 96-px resize: the image is 120×200 → 96×160; the
    // green channel encodes y, so the crop's first row is near y = (160-64)/2 = 48 of 160.
    let g_top = eval.to_rgb_image(0).unwrap().get_pixel(32, 0).0[1] as f64;
    let expected = 48.0 / 160.0 * 255.0;
    assert!((g_top - expected).abs() < 4.0, "{g_top} vs {expected}");
}

#[test]
fn holdout_split_is_seeded_disjoint_and_complete() {
    let dir = TempDir::new("folder-split");
    for k in 0..10u8 {
        solid(2, 2, [k, 0, 0])
            .save(dir.file(&format!("{k:02}.png")))
            .unwrap();
    }
    let o = FolderOptions {
        holdout_fraction: 0.3,
        split_seed: 4,
        ..opts()
    };
    let tr = read_folder(dir.path(), Split::Train, &o).unwrap();
    let te = read_folder(dir.path(), Split::Test, &o).unwrap();
    assert_eq!((tr.images.len(), te.images.len()), (7, 3));
    let mut all: Vec<PathBuf> = tr.files.iter().chain(&te.files).cloned().collect();
    all.sort();
    assert_eq!(all, list_images(dir.path()).unwrap());
    let again = read_folder(dir.path(), Split::Test, &o).unwrap();
    assert_eq!(again.files, te.files);
    // with nothing held out, the test split is an error naming the folder
    let err = read_folder(dir.path(), Split::Test, &opts()).unwrap_err();
    assert!(matches!(err, Error::EmptyFolder { .. }), "{err}");
    assert!(err.to_string().contains(&*dir.path().to_string_lossy()));
}

#[test]
fn corrupt_images_fail_naming_the_file_or_are_skipped_and_counted() {
    let dir = TempDir::new("folder-corrupt");
    solid(4, 4, [9, 9, 9]).save(dir.file("good1.png")).unwrap();
    solid(4, 4, [8, 8, 8]).save(dir.file("good2.jpg")).unwrap();
    std::fs::write(dir.file("bad1.png"), b"this is not a png file").unwrap();
    // a truncated PNG: the first 40 bytes of a valid one
    let mut buf = std::io::Cursor::new(Vec::new());
    solid(4, 4, [1, 2, 3])
        .write_to(&mut buf, image::ImageFormat::Png)
        .unwrap();
    std::fs::write(dir.file("bad2.png"), &buf.get_ref()[..40]).unwrap();

    let err = read_folder(dir.path(), Split::Train, &opts()).unwrap_err();
    assert!(matches!(err, Error::ImageDecode { .. }), "{err}");
    assert!(err.to_string().contains("bad1.png"), "{err}");

    let set = read_folder(
        dir.path(),
        Split::Train,
        &FolderOptions {
            on_error: OnError::Skip,
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(set.skipped, 2);
    assert_eq!(set.images.len(), 2);
    let skipped: Vec<String> = set
        .skipped_files
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(skipped, vec!["bad1.png", "bad2.png"]);

    // all unreadable: an error even when skipping
    let dir2 = TempDir::new("folder-allbad");
    std::fs::write(dir2.file("x.jpg"), b"garbage").unwrap();
    let err = read_folder(
        dir2.path(),
        Split::Train,
        &FolderOptions {
            on_error: OnError::Skip,
            ..opts()
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::EmptyFolder { .. }), "{err}");
}

#[test]
fn empty_folder_is_an_error_naming_it() {
    let dir = TempDir::new("folder-empty");
    let err = read_folder(dir.path(), Split::Train, &opts()).unwrap_err();
    assert!(matches!(err, Error::EmptyFolder { .. }), "{err}");
    assert!(
        err.to_string().contains(&*dir.path().to_string_lossy()),
        "{err}"
    );
    std::fs::write(dir.file("notes.txt"), "no images").unwrap();
    std::fs::create_dir_all(dir.path().join("sub")).unwrap();
    let err = list_images(dir.path()).unwrap_err();
    assert!(matches!(err, Error::EmptyFolder { .. }), "{err}");
    let err = read_folder(dir.path().join("missing"), Split::Train, &opts()).unwrap_err();
    assert!(err.to_string().contains("missing"), "{err}");
}

#[test]
fn class_subfolders_reject_images_in_the_root() {
    let dir = TempDir::new("folder-rootimg");
    solid(2, 2, [0, 0, 0]).save(dir.file("cat/a.png")).unwrap();
    solid(2, 2, [0, 0, 0]).save(dir.file("stray.png")).unwrap();
    let err = read_folder(
        dir.path(),
        Split::Train,
        &FolderOptions {
            class_subfolders: true,
            ..opts()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("stray.png"), "{err}");
}

/// Symbolic links to a folder itself or to one above it (link loops) end the scan, and
/// no image is listed twice through them.
#[cfg(unix)]
#[test]
fn link_loops_end_and_list_each_image_once() {
    let dir = TempDir::new("links");
    let sub = dir.path().join("a");
    std::fs::create_dir_all(&sub).unwrap();
    for (i, p) in [
        dir.path().join("x.png"),
        sub.join("y.png"),
        sub.join("z.png"),
    ]
    .iter()
    .enumerate()
    {
        solid(4, 4, [i as u8, 0, 0]).save(p).unwrap();
    }
    std::os::unix::fs::symlink(".", sub.join("self")).unwrap();
    std::os::unix::fs::symlink("..", sub.join("up")).unwrap();
    std::os::unix::fs::symlink("a", dir.path().join("again")).unwrap();
    let files = list_images(dir.path()).unwrap();
    assert_eq!(files.len(), 3, "{files:?}");
    // of the folder and the link to it, the folder (first by name) is listed
    assert!(
        files.iter().all(|f| !f.to_string_lossy().contains("again")),
        "{files:?}"
    );
}
