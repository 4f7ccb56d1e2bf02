//! Downsampled-ImageNet `.npz` reader. The archives are written here byte by byte (NumPy's
//! `.npy` v1.0 format inside a stored zip, as `np.savez` makes them), independently of the
//! reader's own npz library.

mod common;
use common::TempDir;

use nvp::data::imagenet::{read_imagenet, read_imagenet_file, ImagenetOptions};
use nvp::data::{Error, Split};

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A `.npy` v1.0 file: `descr` like `|u1` or `<i8`, `shape` like `(3, 48)` or `(3,)`.
fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A zip archive with stored (uncompressed) entries.
fn zip_stored(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in entries {
        let offset = out.len() as u32;
        let crc = crc32(data);
        let size = data.len() as u32;
        let mut common = Vec::new();
        common.extend_from_slice(&20u16.to_le_bytes()); // version needed
        common.extend_from_slice(&0u16.to_le_bytes()); // flags
        common.extend_from_slice(&0u16.to_le_bytes()); // stored
        common.extend_from_slice(&0u16.to_le_bytes()); // time
        common.extend_from_slice(&0x21u16.to_le_bytes()); // date 1980-01-01
        common.extend_from_slice(&crc.to_le_bytes());
        common.extend_from_slice(&size.to_le_bytes());
        common.extend_from_slice(&size.to_le_bytes());
        common.extend_from_slice(&(name.len() as u16).to_le_bytes());
        common.extend_from_slice(&0u16.to_le_bytes()); // extra length
        out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        out.extend_from_slice(&common);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);

        central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        central.extend_from_slice(&20u16.to_le_bytes()); // made by
        central.extend_from_slice(&common);
        central.extend_from_slice(&0u16.to_le_bytes()); // comment length
        central.extend_from_slice(&0u16.to_le_bytes()); // disk
        central.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        central.extend_from_slice(&0u32.to_le_bytes()); // external attributes
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

/// `n` images of side `s`: byte `k` of image `i` is `(first + i) * 13 + k`.
fn data_array(n: usize, s: usize, first: usize) -> (Vec<u8>, String) {
    let row = 3 * s * s;
    let bytes = (0..n * row)
        .map(|k| ((first + k / row) * 13 + k % row) as u8)
        .collect();
    (bytes, format!("({n}, {row})"))
}

fn labels_i64(labels: &[i64]) -> Vec<u8> {
    npy(
        "<i8",
        &format!("({},)", labels.len()),
        &labels
            .iter()
            .flat_map(|l| l.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
}

fn archive(n: usize, s: usize, first: usize, labels: &[i64]) -> Vec<u8> {
    let (d, shape) = data_array(n, s, first);
    let mean = npy("<f4", "(4,)", &[0u8; 16]);
    zip_stored(&[
        ("data.npy", npy("|u1", &shape, &d)),
        ("labels.npy", labels_i64(labels)),
        ("mean.npy", mean),
    ])
}

#[test]
fn reads_a_folder_in_numeric_batch_order_with_zero_based_labels() {
    let dir = TempDir::new("imagenet-ok");
    let s = 8;
    std::fs::write(
        dir.path().join("train_data_batch_10.npz"),
        archive(1, s, 20, &[1000]),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("train_data_batch_2.npz"),
        archive(2, s, 10, &[3, 4]),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("train_data_batch_1.npz"),
        archive(2, s, 0, &[1, 2]),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("val_data.npz"),
        archive(3, s, 50, &[7, 8, 9]),
    )
    .unwrap();

    let opts = ImagenetOptions::default();
    let train = read_imagenet(dir.path(), Split::Train, &opts).unwrap();
    assert_eq!(train.shape(), (3, 8, 8));
    assert_eq!(train.len(), 5);
    assert_eq!(train.labels, Some(vec![0, 1, 2, 3, 999]));
    // channel-planar rows are stored as they are
    assert_eq!(train.image(2)[0], (10 * 13) as u8);
    assert_eq!(train.image(4)[100], (20 * 13 + 100) as u8);

    let val = read_imagenet(dir.path(), Split::Test, &opts).unwrap();
    assert_eq!(val.len(), 3);
    assert_eq!(val.labels, Some(vec![6, 7, 8]));

    // a single file
    let one = read_imagenet(
        dir.path().join("train_data_batch_2.npz"),
        Split::Train,
        &opts,
    )
    .unwrap();
    assert_eq!(one.len(), 2);
    // stated size agrees
    let sized = ImagenetOptions {
        size: Some(8),
        ..opts
    };
    assert_eq!(read_imagenet(dir.path(), Split::Test, &sized).unwrap(), val);
}

#[test]
fn int32_labels_and_zero_based_option() {
    let dir = TempDir::new("imagenet-i4");
    let (d, shape) = data_array(2, 4, 0);
    let labels: Vec<u8> = [0i32, 9].iter().flat_map(|l| l.to_le_bytes()).collect();
    let path = dir.path().join("x.npz");
    std::fs::write(
        &path,
        zip_stored(&[
            ("data.npy", npy("|u1", &shape, &d)),
            ("labels.npy", npy("<i4", "(2,)", &labels)),
        ]),
    )
    .unwrap();
    let zero_based = ImagenetOptions {
        labels_one_based: false,
        num_classes: 10,
        ..ImagenetOptions::default()
    };
    let set = read_imagenet_file(&path, &zero_based).unwrap();
    assert_eq!(set.labels, Some(vec![0, 9]));
    // with the official 1-based convention, label 0 is out of range: named by record
    let err = read_imagenet_file(&path, &ImagenetOptions::default()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LabelOutOfRange {
                record: 0,
                label: 0,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("x.npz"), "{err}");
    assert!(
        err.to_string().contains("expected 1..=1000") && !err.to_string().contains("offset"),
        "{err}"
    );
}

#[test]
fn missing_arrays_are_named() {
    let dir = TempDir::new("imagenet-missing");
    let (d, shape) = data_array(2, 4, 0);
    let no_data = dir.path().join("no_data.npz");
    std::fs::write(&no_data, zip_stored(&[("labels.npy", labels_i64(&[1, 2]))])).unwrap();
    let err = read_imagenet_file(&no_data, &ImagenetOptions::default()).unwrap_err();
    match &err {
        Error::NpzMissingArray { path, array, .. } => {
            assert_eq!(path, &no_data);
            assert_eq!(array, "data");
        }
        e => panic!("unexpected {e}"),
    }
    assert!(err.to_string().contains("no_data.npz") && err.to_string().contains("`data`"));

    let no_labels = dir.path().join("no_labels.npz");
    std::fs::write(
        &no_labels,
        zip_stored(&[("data.npy", npy("|u1", &shape, &d))]),
    )
    .unwrap();
    let err = read_imagenet_file(&no_labels, &ImagenetOptions::default()).unwrap_err();
    assert!(
        matches!(&err, Error::NpzMissingArray { array, .. } if array == "labels"),
        "{err}"
    );
    assert!(err.to_string().contains("no_labels.npz"), "{err}");
}

#[test]
fn wrong_shapes_and_types_are_errors() {
    let dir = TempDir::new("imagenet-shape");
    let opts = ImagenetOptions::default();
    // row of 100 values: not 3·S·S
    let bad_row = dir.path().join("row.npz");
    std::fs::write(
        &bad_row,
        zip_stored(&[
            ("data.npy", npy("|u1", "(2, 100)", &[0u8; 200])),
            ("labels.npy", labels_i64(&[1, 2])),
        ]),
    )
    .unwrap();
    let err = read_imagenet_file(&bad_row, &opts).unwrap_err();
    assert!(matches!(err, Error::NpzArray { .. }), "{err}");
    assert!(
        err.to_string().contains("row.npz") && err.to_string().contains("100"),
        "{err}"
    );

    // a header declaring 10¹² images over 12 KB of data: an error naming the file and
    // the shape, not an attempt to allocate 3 PB
    let lie = dir.path().join("lie.npz");
    std::fs::write(
        &lie,
        zip_stored(&[
            (
                "data.npy",
                npy("|u1", "(1000000000000, 3072)", &[0u8; 4 * 3072]),
            ),
            ("labels.npy", labels_i64(&[1, 2, 3, 4])),
        ]),
    )
    .unwrap();
    let err = read_imagenet_file(&lie, &opts).unwrap_err().to_string();
    assert!(
        err.contains("lie.npz") && err.contains("1000000000000 × 3072"),
        "{err}"
    );

    // labels saved as a column (N, 1): the shape is named, not a dtype
    let column = dir.path().join("column.npz");
    let (data, shape) = data_array(2, 32, 0);
    std::fs::write(
        &column,
        zip_stored(&[
            ("data.npy", npy("|u1", &shape, &data)),
            ("labels.npy", npy("<i8", "(2, 1)", &[1u8; 16])),
        ]),
    )
    .unwrap();
    for e in [
        read_imagenet_file(&column, &opts).unwrap_err().to_string(),
        nvp::data::imagenet::StreamedImagenet::open(&column, Split::Train, &opts)
            .err()
            .unwrap()
            .to_string(),
    ] {
        assert!(e.contains("column.npz") && e.contains("[2, 1]"), "{e}");
    }

    // 8×8 data where 32×32 is expected
    let small = dir.path().join("small.npz");
    std::fs::write(&small, archive(2, 8, 0, &[1, 2])).unwrap();
    let err = read_imagenet_file(
        &small,
        &ImagenetOptions {
            size: Some(32),
            ..opts
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("3072"), "{err}");

    // label count differs from image count
    let count = dir.path().join("count.npz");
    std::fs::write(&count, archive(2, 4, 0, &[1, 2, 3])).unwrap();
    let err = read_imagenet_file(&count, &opts).unwrap_err();
    assert!(
        err.to_string().contains("count.npz") && err.to_string().contains("`labels`"),
        "{err}"
    );

    // 1-D data
    let flat = dir.path().join("flat.npz");
    std::fs::write(
        &flat,
        zip_stored(&[
            ("data.npy", npy("|u1", "(48,)", &[0u8; 48])),
            ("labels.npy", labels_i64(&[1])),
        ]),
    )
    .unwrap();
    let err = read_imagenet_file(&flat, &opts).unwrap_err();
    assert!(matches!(err, Error::NpzArray { .. }), "{err}");

    // float labels
    let fl = dir.path().join("floatlabels.npz");
    let (d, shape) = data_array(1, 4, 0);
    std::fs::write(
        &fl,
        zip_stored(&[
            ("data.npy", npy("|u1", &shape, &d)),
            ("labels.npy", npy("<f8", "(1,)", &1.0f64.to_le_bytes())),
        ]),
    )
    .unwrap();
    let err = read_imagenet_file(&fl, &opts).unwrap_err();
    assert!(err.to_string().contains("floatlabels.npz"), "{err}");
}

#[test]
fn not_a_zip_and_missing_files_are_errors() {
    let dir = TempDir::new("imagenet-bad");
    let junk = dir.path().join("val_data.npz");
    std::fs::write(&junk, b"definitely not a zip archive").unwrap();
    let err = read_imagenet(dir.path(), Split::Test, &ImagenetOptions::default()).unwrap_err();
    assert!(matches!(err, Error::Npz { .. }), "{err}");
    assert!(err.to_string().contains("val_data.npz"), "{err}");

    let err = read_imagenet(dir.path(), Split::Train, &ImagenetOptions::default()).unwrap_err();
    assert!(matches!(err, Error::MissingFiles { .. }), "{err}");
    assert!(err.to_string().contains("train_data_batch_"), "{err}");

    let empty = TempDir::new("imagenet-empty");
    let err = read_imagenet(empty.path(), Split::Test, &ImagenetOptions::default()).unwrap_err();
    assert!(err.to_string().contains("val_data.npz"), "{err}");
}

/// The streamed reader (`data.stream = true`): the same images and labels as the
/// in-memory one, read row by row with positioned reads, from any loader thread; the
/// same errors; compressed archives refused by name (streaming needs stored ones).
#[test]
fn streamed_archives_read_the_same_images_as_the_in_memory_reader() {
    use nvp::data::source::collect;
    use nvp::data::{ImageSource, Loader, LoaderConfig, StreamedImagenet};
    use std::sync::Arc;
    let dir = TempDir::new("imagenet-stream");
    let s = 8;
    for (k, n, first) in [(1usize, 5usize, 0usize), (2, 3, 40), (3, 4, 80)] {
        let labels: Vec<i64> = (0..n as i64)
            .map(|i| 1 + (i * 37 + k as i64) % 1000)
            .collect();
        std::fs::write(
            dir.path().join(format!("train_data_batch_{k}.npz")),
            archive(n, s, first, &labels),
        )
        .unwrap();
    }
    std::fs::write(
        dir.path().join("val_data.npz"),
        archive(3, s, 50, &[7, 8, 9]),
    )
    .unwrap();
    let opts = ImagenetOptions::default();
    for split in [Split::Train, Split::Test] {
        let mem = read_imagenet(dir.path(), split, &opts).unwrap();
        let st = StreamedImagenet::open(dir.path(), split, &opts).unwrap();
        assert_eq!((st.len(), st.shape()), (mem.len(), mem.shape()), "{split}");
        assert_eq!(collect(&st, 0).unwrap(), mem, "{split}");
    }
    // through the loader, with 3 workers reading the same files at once
    let mem = Arc::new(read_imagenet(dir.path(), Split::Train, &opts).unwrap());
    let st: Arc<dyn ImageSource> =
        Arc::new(StreamedImagenet::open(dir.path(), Split::Train, &opts).unwrap());
    let cfg = LoaderConfig {
        workers: 3,
        ..LoaderConfig::train(3, 2)
    };
    let a: Vec<_> = Loader::new(mem, cfg.clone())
        .unwrap()
        .stream(0, 0)
        .unwrap()
        .take(8)
        .map(Result::unwrap)
        .collect();
    let b: Vec<_> = Loader::from_source(st, cfg)
        .unwrap()
        .stream(0, 0)
        .unwrap()
        .take(8)
        .map(Result::unwrap)
        .collect();
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(
            (&x.pixels, &x.labels, &x.ld_pre),
            (&y.pixels, &y.labels, &y.ld_pre)
        );
    }

    // errors: a stated size that does not match, a label out of range, float data,
    // a missing array, a compressed archive — each naming the file
    let err = |path: &std::path::Path, o: &ImagenetOptions| match StreamedImagenet::open(
        path,
        Split::Train,
        o,
    ) {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e.to_string(),
    };
    let one = dir.path().join("train_data_batch_2.npz");
    let e = err(
        &one,
        &ImagenetOptions {
            size: Some(32),
            ..opts
        },
    );
    assert!(
        e.contains("train_data_batch_2.npz") && e.contains("3*32*32"),
        "{e}"
    );
    let bad = dir.path().join("bad_label.npz");
    std::fs::write(&bad, archive(2, s, 0, &[1, 1001])).unwrap();
    let e = err(&bad, &opts);
    assert!(e.contains("bad_label.npz") && e.contains("1001"), "{e}");
    let float = dir.path().join("float.npz");
    std::fs::write(
        &float,
        zip_stored(&[
            ("data.npy", npy("<f4", "(1, 192)", &[0u8; 768])),
            ("labels.npy", labels_i64(&[1])),
        ]),
    )
    .unwrap();
    let e = err(&float, &opts);
    assert!(e.contains("float.npz") && e.contains("uint8"), "{e}");
    let nodata = dir.path().join("nodata.npz");
    std::fs::write(&nodata, zip_stored(&[("labels.npy", labels_i64(&[1]))])).unwrap();
    let e = err(&nodata, &opts);
    assert!(e.contains("nodata.npz") && e.contains("`data`"), "{e}");
    let compressed = dir.path().join("compressed.npz");
    {
        use ndarray_npy::NpzWriter;
        let data = ndarray::Array2::<u8>::zeros((2, 192));
        let labels = ndarray::Array1::from(vec![1i64, 2]);
        let mut w = NpzWriter::new_compressed(std::fs::File::create(&compressed).unwrap());
        w.add_array("data", &data).unwrap();
        w.add_array("labels", &labels).unwrap();
        w.finish().unwrap();
    }
    assert_eq!(
        read_imagenet(&compressed, Split::Train, &opts)
            .unwrap()
            .len(),
        2,
        "the in-memory reader takes compressed archives"
    );
    let e = err(&compressed, &opts);
    assert!(
        e.contains("compressed.npz") && e.contains("np.savez") && e.contains("stream = false"),
        "{e}"
    );
}
