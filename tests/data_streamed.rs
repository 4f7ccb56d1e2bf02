//! Image folders decoded as batches need them (`StreamedFolder`), WebP files, and the
//! loader over any `ImageSource`: the same images and batches as the in-memory reader,
//! LSUN crops drawn anew each epoch from a seed, bad files named or skipped. Fixtures are
//! written here with the `image` crate into temporary folders.

mod common;
use common::TempDir;

use std::sync::Arc;

use image::{Rgb, RgbImage};
use nvp::data::folder::{
    apply_preprocess, crop_rng, decode_rgb, list_images, read_folder, FolderOptions, OnError,
    Preprocess,
};
use nvp::data::image_set::rgb_to_planar;
use nvp::data::source::collect;
use nvp::data::{Error, ImageSource, Loader, LoaderConfig, Prefix, Split, StreamedFolder};

/// A gradient with a per-image offset, so that images and crops differ.
fn picture(w: u32, h: u32, k: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x * 255 / w.max(2)) as u8,
            (y * 255 / h.max(2)) as u8,
            ((x + 3 * y + 17 * k) % 256) as u8,
        ])
    })
}

fn opts(preprocess: Preprocess) -> FolderOptions {
    FolderOptions {
        preprocess,
        holdout_fraction: 0.25,
        split_seed: 3,
        crop_seed: 11,
        threads: 2,
        ..FolderOptions::default()
    }
}

/// 12 images of assorted sizes in two class folders, PNG and JPEG.
fn folder(name: &str) -> TempDir {
    let dir = TempDir::new(name);
    for k in 0..12u32 {
        let img = picture(100 + 7 * k, 130 - 3 * k, k);
        let class = if k % 3 == 0 { "cats" } else { "dogs" };
        let ext = if k % 2 == 0 { "png" } else { "jpg" };
        img.save(dir.file(&format!("{class}/img{k:02}.{ext}")))
            .unwrap();
    }
    dir
}

#[test]
fn streamed_epoch_zero_equals_the_in_memory_reader_for_every_preset() {
    let dir = folder("stream-presets");
    let presets = [
        Preprocess::CelebA,
        Preprocess::Lsun { train: true },
        Preprocess::Lsun { train: false },
        Preprocess::ResizeCrop { size: 40 },
    ];
    for p in presets {
        for split in [Split::Train, Split::Test] {
            for classes in [false, true] {
                let o = FolderOptions {
                    class_subfolders: classes,
                    ..opts(p)
                };
                let mem = read_folder(dir.path(), split, &o).unwrap();
                let st = StreamedFolder::open(dir.path(), split, &o).unwrap();
                assert_eq!(st.files(), &mem.files[..], "{p:?} {split}");
                assert_eq!(st.shape(), mem.images.shape(), "{p:?} {split}");
                assert_eq!(st.labelled(), classes);
                assert_eq!(
                    collect(&st, 0).unwrap(),
                    mem.images,
                    "{p:?} {split} classes={classes}: the streamed images differ"
                );
                if classes {
                    assert_eq!(st.class_names(), ["cats", "dogs"]);
                }
            }
        }
    }
    // as-is needs one size: the first image fixes it, another size is an error naming
    // the file when it is read
    let same = TempDir::new("stream-asis");
    for k in 0..3 {
        picture(8, 6, k)
            .save(same.file(&format!("{k}.png")))
            .unwrap();
    }
    picture(9, 6, 0).save(same.file("3-odd.png")).unwrap();
    let st = StreamedFolder::open(
        same.path(),
        Split::Train,
        &FolderOptions {
            holdout_fraction: 0.0,
            ..opts(Preprocess::AsIs)
        },
    )
    .unwrap();
    assert_eq!(st.shape(), (3, 6, 8));
    let mut buf = vec![0u8; st.dims()];
    for i in 0..3 {
        st.read_into(i, 0, &mut buf).unwrap();
        let mut expected = Vec::new();
        rgb_to_planar(&picture(8, 6, i as u32), &mut expected);
        assert_eq!(buf, expected, "image {i}");
    }
    let err = st.read_into(3, 0, &mut buf).unwrap_err();
    assert!(matches!(err, Error::ImageSize { .. }), "{err}");
    assert!(err.to_string().contains("3-odd.png"), "{err}");
    // an index past the end, a buffer of the wrong length
    assert!(st.read_into(4, 0, &mut buf).is_err());
    assert!(st.read_into(0, 0, &mut buf[1..]).is_err());
}

#[test]
fn lsun_training_crops_are_drawn_per_epoch_from_the_seed() {
    let dir = folder("stream-lsun");
    let o = opts(Preprocess::Lsun { train: true });
    let st = StreamedFolder::open(dir.path(), Split::Train, &o).unwrap();
    let all = list_images(dir.path()).unwrap();
    let n = st.len();
    let d = st.dims();
    let (mut a, mut b) = (vec![0u8; d], vec![0u8; d]);
    let mut differ = 0;
    for i in 0..n {
        // each epoch's crop is the one crop_rng(seed, file, epoch) gives
        let pos = all.iter().position(|f| f == &st.files()[i]).unwrap();
        for epoch in [0usize, 1, 7] {
            st.read_into(i, epoch, &mut a).unwrap();
            let img = decode_rgb(&st.files()[i]).unwrap();
            let crop = apply_preprocess(&img, o.preprocess, &mut crop_rng(11, pos, epoch)).unwrap();
            let mut expected = Vec::new();
            rgb_to_planar(&crop, &mut expected);
            assert_eq!(a, expected, "image {i}, epoch {epoch}");
        }
        st.read_into(i, 1, &mut a).unwrap();
        st.read_into(i, 1, &mut b).unwrap();
        assert_eq!(a, b, "the same epoch gives the same crop");
        st.read_into(i, 2, &mut b).unwrap();
        differ += usize::from(a != b);
    }
    assert!(
        differ >= n / 2,
        "only {differ} of {n} crops changed between epochs"
    );
    // the central crop (evaluation) ignores the epoch
    let ev = StreamedFolder::open(
        dir.path(),
        Split::Test,
        &opts(Preprocess::Lsun { train: false }),
    )
    .unwrap();
    assert_eq!(collect(&ev, 0).unwrap(), collect(&ev, 5).unwrap());
}

#[test]
fn loader_batches_from_a_streamed_folder_equal_the_in_memory_ones() {
    let dir = folder("stream-loader");
    let o = FolderOptions {
        class_subfolders: true,
        ..opts(Preprocess::CelebA)
    };
    let mem = Arc::new(read_folder(dir.path(), Split::Train, &o).unwrap().images);
    let st: Arc<dyn ImageSource> =
        Arc::new(StreamedFolder::open(dir.path(), Split::Train, &o).unwrap());
    let cfg = |workers| LoaderConfig {
        workers,
        ..LoaderConfig::train(4, 5)
    };
    let a = Loader::new(mem.clone(), cfg(1)).unwrap();
    let b = Loader::from_source(st.clone(), cfg(3)).unwrap();
    assert_eq!(a.batches_per_epoch(), b.batches_per_epoch());
    let from_mem: Vec<_> = a
        .stream(0, 1)
        .unwrap()
        .take(5)
        .map(Result::unwrap)
        .collect();
    let from_disk: Vec<_> = b
        .stream(0, 1)
        .unwrap()
        .take(5)
        .map(Result::unwrap)
        .collect();
    for (x, y) in from_mem.iter().zip(&from_disk) {
        assert_eq!((x.epoch, x.index), (y.epoch, y.index));
        assert_eq!(x.indices, y.indices);
        assert_eq!(x.flipped, y.flipped);
        assert_eq!(x.pixels, y.pixels);
        assert_eq!(x.labels, y.labels);
        assert_eq!(x.ld_pre, y.ld_pre);
        let (vx, vy) = (
            x.y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            y.y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(vx, vy);
    }
    // a prefix of a source (test-limit) reads the same first images
    let p = Prefix::new(st.clone(), 5);
    assert_eq!((p.len(), p.shape()), (5, st.shape()));
    assert_eq!(collect(&p, 0).unwrap(), mem.take(5));
    assert_eq!(Prefix::new(st.clone(), 100).len(), st.len());
}

#[test]
fn unreadable_files_fail_naming_them_or_are_replaced_by_the_next_readable_one() {
    let dir = TempDir::new("stream-bad");
    for k in 0..5u32 {
        picture(70, 70, k)
            .save(dir.file(&format!("{k}.png")))
            .unwrap();
    }
    std::fs::write(dir.file("1b-broken.jpg"), b"not a jpeg").unwrap();
    let o = FolderOptions {
        holdout_fraction: 0.0,
        ..opts(Preprocess::CelebA)
    };
    let st = StreamedFolder::open(dir.path(), Split::Train, &o).unwrap();
    assert_eq!(st.len(), 6);
    let names: Vec<_> = st
        .files()
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["0.png", "1.png", "1b-broken.jpg", "2.png", "3.png", "4.png"]
    );
    let mut buf = vec![0u8; st.dims()];
    let err = st.read_into(2, 0, &mut buf).unwrap_err();
    assert!(matches!(err, Error::ImageDecode { .. }), "{err}");
    assert!(err.to_string().contains("1b-broken.jpg"), "{err}");
    // through the loader, the batch holding it fails with that error
    let l = Loader::from_source(
        Arc::new(st),
        LoaderConfig {
            shuffle: false,
            ..LoaderConfig::train(3, 0)
        },
    )
    .unwrap();
    let err = l.batch(0, 0).unwrap_err();
    assert!(err.to_string().contains("1b-broken.jpg"), "{err}");

    // skipping: the next readable file stands in, and the bad one is listed
    let skip = StreamedFolder::open(
        dir.path(),
        Split::Train,
        &FolderOptions {
            on_error: OnError::Skip,
            ..o.clone()
        },
    )
    .unwrap();
    let mut next = vec![0u8; skip.dims()];
    skip.read_into(2, 0, &mut buf).unwrap();
    skip.read_into(3, 0, &mut next).unwrap();
    assert_eq!(buf, next, "file 2 is replaced by file 3");
    skip.read_into(2, 1, &mut buf).unwrap();
    let listed = skip.skipped_files();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].0.ends_with("1b-broken.jpg"));

    // a folder where nothing reads: an error even when skipping
    let none = TempDir::new("stream-allbad");
    std::fs::write(none.file("a.png"), b"x").unwrap();
    let err = StreamedFolder::open(
        none.path(),
        Split::Train,
        &FolderOptions {
            on_error: OnError::Skip,
            ..opts(Preprocess::AsIs)
        },
    );
    let err = match err {
        Ok(_) => panic!("a folder of unreadable files opened"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("unreadable"), "{err}");
}

#[test]
fn webp_files_are_listed_and_decoded() {
    let dir = TempDir::new("stream-webp");
    let img = picture(20, 12, 4);
    // lossless WebP (what LSUN's export tool writes is lossy WebP; the decoder is the same)
    img.save(dir.file("room.webp")).unwrap();
    img.save(dir.file("room.png")).unwrap();
    let files = list_images(dir.path()).unwrap();
    assert_eq!(files.len(), 2);
    let webp = decode_rgb(&dir.file("room.webp")).unwrap();
    assert_eq!(webp, img, "lossless WebP round trip");
    let mem = read_folder(
        dir.path(),
        Split::Train,
        &FolderOptions {
            holdout_fraction: 0.0,
            ..opts(Preprocess::AsIs)
        },
    )
    .unwrap();
    assert_eq!(mem.images.image(0), mem.images.image(1));
}
