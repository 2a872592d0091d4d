//! Image-folder datasets, written with the `image` crate into a temporary directory.

use cnnc_runtime::data::folder::*;
use image::{GrayImage, Luma, Rgb, RgbImage};
use std::path::Path;

fn grey(path: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> u8) {
    GrayImage::from_fn(w, h, |x, y| Luma([f(x, y)])).save(path).unwrap();
}

#[test]
fn loads_sorted_classes_and_pixels() {
    let d = tempfile::tempdir().unwrap();
    for c in ["zebra", "apple", "mango"] {
        std::fs::create_dir(d.path().join(c)).unwrap();
    }
    grey(&d.path().join("zebra/b.png"), 4, 3, |x, y| (x * 10 + y) as u8);
    grey(&d.path().join("zebra/a.png"), 4, 3, |_, _| 255);
    grey(&d.path().join("apple/x.PNG"), 4, 3, |_, _| 51);
    grey(&d.path().join("mango/m.png"), 4, 3, |_, _| 0);
    std::fs::write(d.path().join("mango/notes.txt"), "ignored").unwrap();
    std::fs::write(d.path().join("README"), "ignored").unwrap();
    let ds = load_image_folder(d.path(), FolderOptions::default()).unwrap();
    assert_eq!(ds.class_names(), &["apple", "mango", "zebra"]);
    assert_eq!(ds.labels(), &[0, 1, 2, 2]);
    assert_eq!(ds.image_shape(), [1, 3, 4]);
    assert!((ds.image(0).unwrap()[0] - 0.2).abs() < 1e-6);
    assert!(ds.image(2).unwrap().iter().all(|&v| v == 1.0), "zebra/a.png comes first");
    // zebra/b.png: pixel (y=2, x=3) = 32.
    assert!((ds.image(3).unwrap()[2 * 4 + 3] - 32.0 / 255.0).abs() < 1e-6);
}

#[test]
fn rgb_and_jpeg_to_chw() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("c")).unwrap();
    RgbImage::from_fn(5, 2, |x, _| Rgb([255, 0, (x * 50) as u8])).save(d.path().join("c/1.png")).unwrap();
    RgbImage::from_pixel(5, 2, Rgb([128, 128, 128])).save(d.path().join("c/2.jpg")).unwrap();
    let ds = load_image_folder(d.path(), FolderOptions::default()).unwrap();
    assert_eq!(ds.image_shape(), [3, 2, 5]);
    let a = ds.image(0).unwrap();
    assert!(a[..10].iter().all(|&v| v == 1.0), "red plane");
    assert!(a[10..20].iter().all(|&v| v == 0.0), "green plane");
    assert!((a[20 + 5 + 4] - 200.0 / 255.0).abs() < 1e-6, "blue plane, y=1 x=4");
    let b = ds.image(1).unwrap();
    assert!(b.iter().all(|&v| (v - 128.0 / 255.0).abs() < 0.02), "jpeg grey");
    // Forcing 1 channel converts to luma.
    let g = load_image_folder(d.path(), FolderOptions { channels: Some(1), ..Default::default() }).unwrap();
    assert_eq!(g.image_shape(), [1, 2, 5]);
}

#[test]
fn wrong_size_is_an_error_or_resized() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir(d.path().join("a")).unwrap();
    grey(&d.path().join("a/1.png"), 4, 4, |_, _| 100);
    grey(&d.path().join("a/2.png"), 6, 5, |_, _| 100);
    let e = load_image_folder(d.path(), FolderOptions::default()).unwrap_err().to_string();
    assert!(e.contains("2.png: image is 5x6 (height x width) but 4x4 is expected"), "{e}");
    let e = load_image_folder(d.path(), FolderOptions { size: Some((5, 6)), ..Default::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("1.png: image is 4x4"), "{e}");
    let ds = load_image_folder(d.path(), FolderOptions { size: Some((3, 3)), resize: true, channels: None }).unwrap();
    assert_eq!(ds.image_shape(), [1, 3, 3]);
    assert_eq!(ds.len(), 2);
    assert!(ds.images().iter().all(|&v| (v - 100.0 / 255.0).abs() < 0.01));
}

#[test]
fn bad_folders_are_errors() {
    let d = tempfile::tempdir().unwrap();
    assert!(load_image_folder(d.path(), FolderOptions::default()).unwrap_err().to_string().contains("no class"));
    std::fs::create_dir(d.path().join("empty")).unwrap();
    let e = load_image_folder(d.path(), FolderOptions::default()).unwrap_err().to_string();
    assert!(e.contains("'empty' has no"), "{e}");
    std::fs::write(d.path().join("empty/broken.png"), b"\x89PNG not really").unwrap();
    let e = load_image_folder(d.path(), FolderOptions::default()).unwrap_err().to_string();
    assert!(e.contains("broken.png: cannot decode"), "{e}");
    assert!(load_image_folder(&d.path().join("missing"), FolderOptions::default()).is_err());
    assert!(load_image_folder(d.path(), FolderOptions { channels: Some(2), ..Default::default() }).is_err());
}
