//! IDX loader: the bundled MNIST 10k, and every kind of malformed file.

use cnnc_runtime::data::idx::*;
use cnnc_runtime::data::DataError;
use flate2::write::GzEncoder;
use flate2::Compression;
use std::io::Write;
use std::path::{Path, PathBuf};

fn mnist_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/mnist10k")
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = GzEncoder::new(Vec::new(), Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

fn msg(r: Result<impl std::fmt::Debug, DataError>) -> String {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bundled_mnist10k_loads() {
    let (train, test) = load_mnist_dir(&mnist_dir()).unwrap();
    assert_eq!(train.len(), 8000);
    assert_eq!(test.len(), 2000);
    for ds in [&train, &test] {
        assert_eq!(ds.image_shape(), [1, 28, 28]);
        assert_eq!(ds.num_classes(), 10);
        assert_eq!(ds.images().len(), ds.len() * 784);
        let hist = ds.class_histogram();
        assert_eq!(hist.iter().sum::<usize>(), ds.len());
        // Every digit is present in reasonable proportion (MNIST classes are 9-11% each).
        for (c, &n) in hist.iter().enumerate() {
            assert!(n * 100 > ds.len() * 7, "class {c} has only {n} of {}", ds.len());
        }
        let (lo, hi) = ds.value_range().unwrap();
        assert_eq!(lo, 0.0);
        assert_eq!(hi, 1.0);
        // Digits are mostly background: mean pixel of MNIST is ~0.13.
        let mean = ds.images().iter().map(|&v| v as f64).sum::<f64>() / ds.images().len() as f64;
        assert!((0.09..0.18).contains(&mean), "mean {mean}");
    }
    // Values are k/255.
    let v = train.images()[28 * 14 + 14 + 784 * 3];
    assert!(((v * 255.0).round() - v * 255.0).abs() < 1e-4);
}

#[test]
fn raw_and_gzip_give_the_same_result() {
    let pixels: Vec<u8> = (0..3 * 4 * 5).map(|i| (i * 7 % 256) as u8).collect();
    let raw = encode_idx_images(4, 5, &pixels).unwrap();
    let a = parse_idx_images(&raw, "raw").unwrap();
    let b = parse_idx_images(&gz(&raw), "gz").unwrap();
    assert_eq!(a, b);
    assert_eq!((a.count, a.rows, a.cols), (3, 4, 5));
    assert_eq!(a.pixels, pixels);
    let labels = encode_idx_labels(&[3, 1, 4]).unwrap();
    assert_eq!(parse_idx_labels(&gz(&labels), "l", Some(10)).unwrap(), vec![3, 1, 4]);
}

#[test]
fn truncated_image_file_names_offset_and_image() {
    let pixels = vec![9u8; 3 * 784];
    let raw = encode_idx_images(28, 28, &pixels).unwrap();
    // Cut 10 bytes into image 2.
    let cut = &raw[..16 + 2 * 784 + 10];
    for data in [cut.to_vec(), gz(cut)] {
        let m = msg(parse_idx_images(&data, "data/x.gz"));
        assert_eq!(
            m,
            "data/x.gz: truncated at byte 1594: expected 784 bytes of image 2 (bytes 1584..2368), file ends"
        );
    }
    // Truncated inside the header.
    let m = msg(parse_idx_images(&raw[..10], "h"));
    assert!(m.contains("h: truncated at byte 10") && m.contains("row count at byte 8"), "{m}");
    // Empty file.
    let m = msg(parse_idx_images(&[], "e"));
    assert!(m.contains("e: truncated at byte 0") && m.contains("magic"), "{m}");
}

#[test]
fn truncated_gzip_stream_is_an_error() {
    let pixels = vec![200u8; 50 * 784];
    let compressed = gz(&encode_idx_images(28, 28, &pixels).unwrap());
    for cut in [compressed.len() - 4, compressed.len() / 2, 12] {
        let m = msg(parse_idx_images(&compressed[..cut], "t.gz"));
        assert!(m.starts_with("t.gz: gzip data corrupt or truncated after decompressed byte "), "{m}");
    }
    // Garbage after a 2-byte gzip magic.
    let m = msg(parse_idx_images(&[0x1f, 0x8b, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], "g.gz"));
    assert!(m.starts_with("g.gz: "), "{m}");
}

#[test]
fn wrong_magic_is_reported() {
    let labels = encode_idx_labels(&[1, 2]).unwrap();
    let m = msg(parse_idx_images(&labels, "l"));
    assert_eq!(
        m,
        "l: bad magic number at byte 0: expected 0x00000803 (IDX unsigned-byte 3-D images), found 0x00000801 (an IDX label file)"
    );
    let images = encode_idx_images(2, 2, &[0; 4]).unwrap();
    let m = msg(parse_idx_labels(&images, "i", None));
    assert!(m.contains("expected 0x00000801") && m.contains("found 0x00000803"), "{m}");
    let m = msg(parse_idx_images(b"PK\x03\x04 not an idx file at all", "z"));
    assert!(m.contains("found 0x504b0304"), "{m}");
}

#[test]
fn zero_sized_images_and_trailing_bytes_are_rejected() {
    let mut h = Vec::new();
    for v in [IMAGES_MAGIC, 1, 0, 28] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    assert!(msg(parse_idx_images(&h, "z")).contains("0x28 pixels"));
    let mut raw = encode_idx_images(2, 2, &[1, 2, 3, 4]).unwrap();
    raw.push(0);
    let m = msg(parse_idx_images(&raw, "t"));
    assert!(m.contains("unexpected data at byte 20"), "{m}");
    let mut l = encode_idx_labels(&[1]).unwrap();
    l.extend_from_slice(&[1, 2]);
    assert!(msg(parse_idx_labels(&l, "t", None)).contains("unexpected data at byte 9"));
}

#[test]
fn huge_declared_count_does_not_allocate_or_panic() {
    let mut h = Vec::new();
    for v in [IMAGES_MAGIC, u32::MAX, 28, 28] {
        h.extend_from_slice(&v.to_be_bytes());
    }
    h.extend_from_slice(&[0; 100]);
    let m = msg(parse_idx_images(&h, "big"));
    assert!(m.contains("truncated at byte 116") && m.contains("image 0"), "{m}");
}

#[test]
fn label_out_of_range_and_truncated_labels() {
    let l = encode_idx_labels(&[0, 9, 10, 3]).unwrap();
    assert_eq!(parse_idx_labels(&l, "l", None).unwrap(), vec![0, 9, 10, 3]);
    assert_eq!(
        msg(parse_idx_labels(&l, "l", Some(10))),
        "l: label 10 at byte 10 (label 2) is out of range: expected 0..10 for 10 classes"
    );
    let m = msg(parse_idx_labels(&l[..9], "l", None));
    assert!(m.contains("truncated at byte 9") && m.contains("label 1"), "{m}");
}

#[test]
fn pair_count_mismatch_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let ip = dir.path().join("train-images-idx3-ubyte.gz");
    let lp = dir.path().join("train-labels-idx1-ubyte");
    std::fs::write(&ip, gz(&encode_idx_images(2, 3, &[7; 18]).unwrap())).unwrap();
    std::fs::write(&lp, encode_idx_labels(&[1, 2]).unwrap()).unwrap();
    let m = msg(load_idx_pair(&ip, &lp, 10));
    assert!(m.contains("has 3 images but") && m.contains("has 2 labels"), "{m}");
    std::fs::write(&lp, encode_idx_labels(&[1, 2, 11]).unwrap()).unwrap();
    assert!(msg(load_idx_pair(&ip, &lp, 10)).contains("label 11"));
    std::fs::write(&lp, encode_idx_labels(&[1, 2, 0]).unwrap()).unwrap();
    let ds = load_idx_pair(&ip, &lp, 10).unwrap();
    assert_eq!(ds.image_shape(), [1, 2, 3]);
    assert_eq!(ds.labels(), &[1, 2, 0]);
    assert!((ds.images()[0] - 7.0 / 255.0).abs() < 1e-7);
    // The test split is missing.
    let m = msg(load_mnist_dir(dir.path()));
    assert!(m.contains("test-images-idx3-ubyte"), "{m}");
    let m = msg(read_idx_images(&dir.path().join("nope")));
    assert!(m.contains("nope"), "{m}");
}
