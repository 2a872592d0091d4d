//! Augmentation primitives and the seeded pipeline.

use cnnc_runtime::data::augment::*;
use rand::{Rng, SeedableRng};

fn random_image(shape: [usize; 3], seed: u64) -> Vec<f32> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    (0..shape.iter().product::<usize>()).map(|_| r.random_range(0.05..0.95)).collect()
}

#[test]
fn flip_twice_is_identity_and_flip_mirrors() {
    let shape = [3, 5, 7];
    let img = random_image(shape, 1);
    let mut f = img.clone();
    hflip(&mut f, shape).unwrap();
    assert_ne!(f, img);
    assert_eq!(f[2 * 35 + 4 * 7 + 1], img[2 * 35 + 4 * 7 + 5]);
    hflip(&mut f, shape).unwrap();
    assert_eq!(f, img);
    assert!(hflip(&mut f, [3, 5, 6]).is_err());
}

#[test]
fn crop_identity_and_shift() {
    let shape = [2, 5, 6];
    let img = random_image(shape, 2);
    let mut out = vec![0.0; img.len()];
    crop_padded(&mut out, &img, shape, 0, 0, 0).unwrap();
    assert_eq!(out, img, "pad 0 is the identity");
    crop_padded(&mut out, &img, shape, 2, 2, 2).unwrap();
    assert_eq!(out, img, "centre crop of the padded image is the identity");
    // dy = 0, dx = 3 with pad 2: out[y][x] = img[y - 2][x + 1].
    crop_padded(&mut out, &img, shape, 2, 0, 3).unwrap();
    for c in 0..2 {
        for y in 0..5 {
            for x in 0..6 {
                let v = out[(c * 5 + y) * 6 + x];
                if y < 2 || x + 1 >= 6 {
                    assert_eq!(v, 0.0);
                } else {
                    assert_eq!(v, img[(c * 5 + y - 2) * 6 + x + 1]);
                }
            }
        }
    }
    assert!(crop_padded(&mut out, &img, shape, 2, 5, 0).is_err());
}

#[test]
fn scale_one_is_identity_and_two_zooms_centre() {
    let shape = [1, 6, 6];
    let img = random_image(shape, 3);
    let mut out = vec![0.0; 36];
    scale_about_centre(&mut out, &img, shape, 1.0).unwrap();
    assert_eq!(out, img);
    // Odd size, factor 2: centre pixel (2,2) of a 5x5 maps to itself, (2,4) samples (2,3).
    let shape = [1, 5, 5];
    let img = random_image(shape, 4);
    let mut out = vec![0.0; 25];
    scale_about_centre(&mut out, &img, shape, 2.0).unwrap();
    assert!((out[12] - img[12]).abs() < 1e-6);
    assert!((out[2 * 5 + 4] - img[2 * 5 + 3]).abs() < 1e-6);
    // (2,3) samples (2, 2.5): the mean of (2,2) and (2,3).
    assert!((out[2 * 5 + 3] - 0.5 * (img[12] + img[13])).abs() < 1e-6);
    // Factor 0.5 shrinks: corners sample outside the image -> 0.
    scale_about_centre(&mut out, &img, shape, 0.5).unwrap();
    assert_eq!(out[0], 0.0);
    assert_eq!(out[12], img[12]);
    assert!(scale_about_centre(&mut out, &img, shape, 0.0).is_err());
}

#[test]
fn brightness_and_contrast() {
    let shape = [1, 2, 2];
    let mut img = vec![0.2, 0.4, 0.6, 0.8];
    adjust_brightness(&mut img, 1.5);
    for (a, b) in img.iter().zip([0.3, 0.6, 0.9, 1.0]) {
        assert!((a - b).abs() < 1e-6, "{img:?} (0.8 * 1.5 clamps to 1)");
    }
    let mut img = vec![0.2, 0.4, 0.6, 0.8];
    adjust_contrast(&mut img, shape, 0.5).unwrap(); // mean 0.5
    let want = [0.35, 0.45, 0.55, 0.65];
    for (a, b) in img.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{img:?}");
    }
    let mut img = random_image([3, 4, 4], 5);
    let orig = img.clone();
    adjust_contrast(&mut img, [3, 4, 4], 1.0).unwrap();
    for (a, b) in img.iter().zip(&orig) {
        assert!((a - b).abs() < 1e-6);
    }
}

#[test]
fn pipeline_shapes_determinism_and_seed_dependence() {
    let shape = [3, 28, 28];
    let img = random_image(shape, 6);
    let aug = Augment { hflip: true, crop_pad: 2, scale: Some((0.8, 1.2)), brightness: 0.3, contrast: 0.3 };
    let run = |seed, epoch, index| {
        let mut x = img.clone();
        aug.apply(&mut x, shape, seed, epoch, index).unwrap();
        x
    };
    let a = run(1, 0, 7);
    assert_eq!(a.len(), img.len());
    assert!(a.iter().all(|v| (0.0..=1.0).contains(v)));
    assert_eq!(a, run(1, 0, 7), "deterministic");
    assert_ne!(a, run(2, 0, 7), "seed matters");
    assert_ne!(a, run(1, 1, 7), "epoch matters");
    assert_ne!(a, run(1, 0, 8), "index matters");
    assert_ne!(a, img);
    // The identity pipeline leaves the image alone.
    let mut x = img.clone();
    Augment::default().apply(&mut x, shape, 1, 2, 3).unwrap();
    assert_eq!(x, img);
    assert!(Augment::default().is_identity());
    // Over many draws both flip outcomes occur and crop offsets vary.
    let flip = Augment { hflip: true, ..Default::default() };
    let mut flipped = 0;
    for i in 0..200 {
        let mut x = img.clone();
        flip.apply(&mut x, shape, 3, 0, i).unwrap();
        if x != img {
            flipped += 1;
        }
    }
    assert!((60..140).contains(&flipped), "{flipped}");
    // Invalid configurations are errors, not panics.
    let mut x = img.clone();
    assert!(Augment { scale: Some((1.2, 0.8)), ..Default::default() }.apply(&mut x, shape, 0, 0, 0).is_err());
    assert!(Augment { brightness: 2.0, ..Default::default() }.apply(&mut x, shape, 0, 0, 0).is_err());
    assert!(aug.apply(&mut x[..10], shape, 0, 0, 0).is_err());
}
