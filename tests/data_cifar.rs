//! CIFAR-10 binary reader: round trip through fixtures written here, and every kind of bad
//! input (truncated, wrong size, label out of range, missing and empty files).

mod common;
use common::TempDir;

use nvp::data::cifar::{self, encode_cifar10, read_cifar10, read_cifar10_file, RECORD_BYTES};
use nvp::data::{Error, ImageSet, Split};
use std::path::Path;

/// `n` 3×32×32 images with distinct, position-dependent bytes; labels `(first + i) % 10`.
fn fixture(n: usize, first: usize) -> ImageSet {
    let d = 3 * 32 * 32;
    let images = (0..n * d)
        .map(|k| ((k / d + first) * 31 + (k % d) * 7) as u8)
        .collect();
    let labels = (0..n).map(|i| ((first + i) % 10) as u32).collect();
    ImageSet::new(images, Some(labels), 3, 32, 32).unwrap()
}

#[test]
fn reads_train_batches_in_order_and_the_test_batch() {
    let dir = TempDir::new("cifar-ok");
    let a = fixture(4, 0);
    let b = fixture(3, 4);
    let t = fixture(2, 100);
    std::fs::write(
        dir.path().join("data_batch_1.bin"),
        encode_cifar10(&a).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("data_batch_3.bin"),
        encode_cifar10(&b).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("test_batch.bin"),
        encode_cifar10(&t).unwrap(),
    )
    .unwrap();
    // a stray file that is not a batch is ignored
    std::fs::write(dir.path().join("batches.meta.txt"), "airplane\n").unwrap();

    let train = read_cifar10(dir.path(), Split::Train).unwrap();
    assert_eq!(train.len(), 7);
    assert_eq!(train.shape(), (3, 32, 32));
    let mut expected = a.clone();
    expected.append(&b).unwrap();
    assert_eq!(train, expected);
    assert_eq!(train.labels.as_deref(), Some(&[0, 1, 2, 3, 4, 5, 6][..]));

    let test = read_cifar10(dir.path(), Split::Test).unwrap();
    assert_eq!(test, t);
    assert_eq!(test.class_histogram(), vec![1, 1]);
    assert_eq!(train.class_histogram(), vec![1, 1, 1, 1, 1, 1, 1]);
}

#[test]
fn record_layout_is_label_then_red_green_blue_planes() {
    let mut rec = vec![0u8; RECORD_BYTES];
    rec[0] = 7;
    // pixel (row 2, col 5): R, G, B planes of 1024 bytes each
    let k = 2 * 32 + 5;
    rec[1 + k] = 200;
    rec[1 + 1024 + k] = 100;
    rec[1 + 2048 + k] = 50;
    let set = cifar::parse_cifar10(&rec, Path::new("mem.bin")).unwrap();
    assert_eq!(set.labels, Some(vec![7]));
    assert_eq!(set.image(0)[k], 200);
    assert_eq!(set.image(0)[1024 + k], 100);
    let rgb = set.to_rgb_image(0).unwrap();
    assert_eq!(rgb.dimensions(), (32, 32));
    assert_eq!(rgb.get_pixel(5, 2).0, [200, 100, 50]);
    assert_eq!(rgb.get_pixel(0, 0).0, [0, 0, 0]);
}

#[test]
fn truncated_file_names_the_file_record_and_offset() {
    let dir = TempDir::new("cifar-trunc");
    let mut bytes = encode_cifar10(&fixture(2, 0)).unwrap();
    bytes.extend_from_slice(&[3u8; 100]);
    let path = dir.path().join("data_batch_1.bin");
    std::fs::write(&path, &bytes).unwrap();
    let err = read_cifar10(dir.path(), Split::Train).unwrap_err();
    match &err {
        Error::CifarTruncated {
            path: p,
            record,
            offset,
            remaining,
            size,
            ..
        } => {
            assert_eq!(p, &path);
            assert_eq!(*record, 2);
            assert_eq!(*offset, 2 * 3073);
            assert_eq!(*remaining, 100);
            assert_eq!(*size, 2 * 3073 + 100);
        }
        e => panic!("unexpected error {e}"),
    }
    let msg = err.to_string();
    assert!(msg.contains("data_batch_1.bin"), "{msg}");
    assert!(
        msg.contains("record 2") && msg.contains("byte offset 6146"),
        "{msg}"
    );
}

#[test]
fn wrong_size_files_are_errors() {
    let dir = TempDir::new("cifar-size");
    // smaller than one record
    let short = dir.path().join("short.bin");
    std::fs::write(&short, vec![1u8; 3072]).unwrap();
    let err = read_cifar10_file(&short).unwrap_err();
    assert!(
        matches!(
            err,
            Error::CifarTruncated {
                record: 0,
                offset: 0,
                remaining: 3072,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("short.bin"));
    // one byte too many
    let long = dir.path().join("long.bin");
    std::fs::write(&long, vec![1u8; 3074]).unwrap();
    let err = read_cifar10_file(&long).unwrap_err();
    assert!(
        matches!(
            err,
            Error::CifarTruncated {
                record: 1,
                offset: 3073,
                remaining: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn label_out_of_range_names_the_record() {
    let dir = TempDir::new("cifar-label");
    let mut bytes = encode_cifar10(&fixture(5, 0)).unwrap();
    bytes[3 * RECORD_BYTES] = 10;
    let path = dir.path().join("test_batch.bin");
    std::fs::write(&path, &bytes).unwrap();
    let err = read_cifar10(dir.path(), Split::Test).unwrap_err();
    match &err {
        Error::LabelOutOfRange {
            path: p,
            record,
            offset,
            label,
            ..
        } => {
            assert_eq!(p, &path);
            assert_eq!((*record, *offset, *label), (3, Some(3 * 3073), 10));
        }
        e => panic!("unexpected error {e}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("test_batch.bin") && msg.contains("record 3"),
        "{msg}"
    );
    assert!(msg.contains("label 10"), "{msg}");
}

#[test]
fn missing_and_empty_files_are_errors() {
    let dir = TempDir::new("cifar-missing");
    let err = read_cifar10(dir.path(), Split::Train).unwrap_err();
    assert!(matches!(err, Error::MissingFiles { .. }), "{err}");
    assert!(err.to_string().contains("data_batch_1.bin"), "{err}");
    assert!(err.to_string().contains(&*dir.path().to_string_lossy()));
    let err = read_cifar10(dir.path(), Split::Test).unwrap_err();
    assert!(err.to_string().contains("test_batch.bin"), "{err}");

    let nowhere = dir.path().join("does-not-exist");
    let err = read_cifar10(&nowhere, Split::Train).unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err}");
    assert!(err.to_string().contains("does-not-exist"));

    let empty = dir.path().join("data_batch_2.bin");
    std::fs::write(&empty, b"").unwrap();
    let err = read_cifar10(dir.path(), Split::Train).unwrap_err();
    assert!(matches!(err, Error::EmptyFile { .. }), "{err}");
    assert!(err.to_string().contains("data_batch_2.bin"));
}

#[test]
fn encode_rejects_what_the_format_cannot_hold() {
    let unlabelled = ImageSet::new(vec![0; 3072], None, 3, 32, 32).unwrap();
    assert!(encode_cifar10(&unlabelled).is_err());
    let small = ImageSet::new(vec![0; 48], Some(vec![0]), 3, 4, 4).unwrap();
    assert!(encode_cifar10(&small).is_err());
    let bad_label = ImageSet::new(vec![0; 3072], Some(vec![10]), 3, 32, 32).unwrap();
    assert!(encode_cifar10(&bad_label).is_err());
}
