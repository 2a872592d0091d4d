//! Dataset, normalisation, splitting, batching and the prefetcher.

use cnnc_runtime::data::*;
use std::collections::HashSet;
use std::sync::Arc;

/// 23 images of shape [2, 3, 4] whose pixels encode (image, position), labels i % 5.
fn toy(n: usize) -> Dataset {
    let per = 24;
    let images = (0..n * per).map(|k| (k / per) as f32 * 0.01 + (k % per) as f32 * 0.001).collect();
    let labels = (0..n).map(|i| i % 5).collect();
    Dataset::new(images, labels, [2, 3, 4], 5).unwrap()
}

#[test]
fn new_validates() {
    assert!(Dataset::new(vec![0.0; 10], vec![0], [1, 2, 5], 2).is_ok());
    let e = Dataset::new(vec![0.0; 9], vec![0], [1, 2, 5], 2).unwrap_err().to_string();
    assert!(e.contains("9 image values"), "{e}");
    let e = Dataset::new(vec![0.0; 10], vec![2], [1, 2, 5], 2).unwrap_err().to_string();
    assert!(e.contains("label 2 of image 0"), "{e}");
    assert!(Dataset::new(vec![], vec![], [1, 0, 5], 2).is_err());
    assert!(Dataset::new(vec![], vec![], [1, 1, 1], 0).is_err());
    let ds = toy(3);
    assert!(ds.image(3).is_none());
    assert_eq!(ds.image(2).unwrap()[0], 0.02);
    assert!(ds.clone().with_class_names(vec!["a".into()]).is_err());
}

#[test]
fn subset_and_splits() {
    let ds = toy(23);
    let s = ds.subset(&[4, 0, 4]).unwrap();
    assert_eq!(s.labels(), &[4, 0, 4]);
    assert_eq!(s.image(1).unwrap(), ds.image(0).unwrap());
    assert!(ds.subset(&[23]).is_err());
    let (a, b) = ds.split_at(20).unwrap();
    assert_eq!((a.len(), b.len()), (20, 3));
    assert_eq!(b.image(0).unwrap(), ds.image(20).unwrap());
    assert!(ds.split_at(24).is_err());
    let (a1, b1) = ds.shuffled_split(5, 7).unwrap();
    let (a2, _) = ds.shuffled_split(5, 7).unwrap();
    let (a3, _) = ds.shuffled_split(5, 8).unwrap();
    assert_eq!(a1, a2);
    assert_ne!(a1, a3);
    // Disjoint and complete: first pixel identifies the image.
    let ids: HashSet<u32> = a1.images().chunks(24).chain(b1.images().chunks(24)).map(|c| (c[0] * 100.0).round() as u32).collect();
    assert_eq!(ids.len(), 23);
}

#[test]
fn normaliser_fit_and_apply() {
    // Channel 0 holds 1,2,3,4 (mean 2.5, std sqrt(1.25)); channel 1 is constant 7.
    let ds = Dataset::new(vec![1.0, 2.0, 7.0, 7.0, 3.0, 4.0, 7.0, 7.0], vec![0, 1], [2, 1, 2], 2).unwrap();
    let n = Normalizer::fit(&ds).unwrap();
    assert!((n.mean[0] - 2.5).abs() < 1e-6 && (n.mean[1] - 7.0).abs() < 1e-6);
    assert!((n.std[0] - 1.25f32.sqrt()).abs() < 1e-6);
    assert_eq!(n.std[1], 1.0, "constant channel gets std 1");
    let mut d2 = ds.clone();
    n.apply(&mut d2).unwrap();
    let m2 = Normalizer::fit(&d2).unwrap();
    assert!(m2.mean[0].abs() < 1e-6 && (m2.std[0] - 1.0).abs() < 1e-6);
    assert!(d2.images()[2].abs() < 1e-6);
    assert!(Normalizer::new(vec![0.0], vec![0.0]).is_err());
    assert!(Normalizer::new(vec![0.0, 1.0], vec![1.0]).is_err());
    let mut wrong = toy(1);
    assert!(Normalizer::new(vec![0.0; 3], vec![1.0; 3]).unwrap().apply(&mut wrong).is_err());
    let empty = Dataset::new(vec![], vec![], [1, 1, 1], 1).unwrap();
    assert!(Normalizer::fit(&empty).is_err());
}

#[test]
fn batches_cover_the_epoch_with_keep_and_drop() {
    let ds = toy(23);
    let cfg = LoaderConfig::new(5);
    let bs: Vec<Batch> = ds.batches(&cfg, 0).unwrap().collect();
    assert_eq!(bs.len(), 5);
    assert_eq!(bs.iter().map(|b| b.len()).collect::<Vec<_>>(), vec![5, 5, 5, 5, 3]);
    assert_eq!(bs[4].shape, [3, 2, 3, 4]);
    assert_eq!(bs[4].images.len(), 3 * 24);
    let order: Vec<usize> = bs.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(order, (0..23).collect::<Vec<_>>());
    assert_eq!(bs[1].images[..24], *ds.image(5).unwrap());
    assert_eq!(bs[1].labels, vec![0, 1, 2, 3, 4]);

    let drop = LoaderConfig::new(5).last_batch(LastBatch::Drop).shuffled(3);
    let bs: Vec<Batch> = ds.batches(&drop, 0).unwrap().collect();
    assert_eq!(bs.len(), 4);
    assert!(bs.iter().all(|b| b.len() == 5));
    let seen: HashSet<usize> = bs.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(seen.len(), 20);
    assert_eq!(drop.num_batches(23), 4);
    assert_eq!(cfg.num_batches(23), 5);
    assert_eq!(cfg.num_batches(25), 5);
    assert!(ds.batches(&LoaderConfig::new(0), 0).is_err());
}

#[test]
fn shuffling_is_seeded_per_epoch() {
    let ds = toy(23);
    let a = LoaderConfig::new(4).shuffled(42);
    let order = |cfg: &LoaderConfig, e| -> Vec<usize> {
        ds.batches(cfg, e).unwrap().flat_map(|b| b.indices).collect()
    };
    let e0 = order(&a, 0);
    assert_eq!(e0, order(&a, 0), "same seed and epoch, same order");
    assert_ne!(e0, order(&a, 1), "epochs differ");
    assert_ne!(e0, order(&LoaderConfig::new(4).shuffled(43), 0), "seeds differ");
    assert_ne!(e0, (0..23).collect::<Vec<_>>());
    let mut sorted = e0.clone();
    sorted.sort();
    assert_eq!(sorted, (0..23).collect::<Vec<_>>(), "a permutation");
}

#[test]
fn loader_augments_then_normalises() {
    let ds = toy(7);
    let norm = Normalizer::new(vec![0.5, 0.25], vec![2.0, 4.0]).unwrap();
    let cfg = LoaderConfig::new(3).normalize(norm.clone());
    let b = ds.batches(&cfg, 0).unwrap().next().unwrap();
    let mut img = ds.image(0).unwrap().to_vec();
    norm.normalize_image(&mut img, [2, 3, 4]).unwrap();
    assert_eq!(b.images[..24], img[..]);
    // With augmentation the result equals Augment::apply (seeded by dataset index) then normalise.
    let aug = Augment { hflip: true, crop_pad: 1, brightness: 0.2, ..Default::default() };
    let cfg = LoaderConfig::new(3).shuffled(9).augment(aug.clone()).normalize(norm.clone());
    for b in ds.batches(&cfg, 2).unwrap() {
        for (j, &i) in b.indices.iter().enumerate() {
            let mut img = ds.image(i).unwrap().to_vec();
            aug.apply(&mut img, [2, 3, 4], 9, 2, i as u64).unwrap();
            norm.normalize_image(&mut img, [2, 3, 4]).unwrap();
            assert_eq!(b.images[j * 24..(j + 1) * 24], img[..]);
        }
    }
    let bad = LoaderConfig::new(3).normalize(Normalizer::new(vec![0.0], vec![1.0]).unwrap());
    assert!(ds.batches(&bad, 0).is_err());
}

#[test]
fn prefetcher_yields_exactly_what_batches_yields() {
    let ds = Arc::new(toy(23));
    let aug = Augment { hflip: true, crop_pad: 1, scale: Some((0.9, 1.1)), brightness: 0.1, contrast: 0.1 };
    for cfg in [
        LoaderConfig::new(4).shuffled(5).augment(aug.clone()),
        LoaderConfig::new(6).last_batch(LastBatch::Drop),
        LoaderConfig::new(100),
    ] {
        for epoch in 0..3 {
            let direct: Vec<Batch> = ds.batches(&cfg, epoch).unwrap().collect();
            let pre = Prefetcher::new(ds.clone(), cfg.clone(), epoch).unwrap();
            assert_eq!(pre.size_hint(), (direct.len(), Some(direct.len())));
            let pre: Vec<Batch> = pre.collect();
            assert_eq!(pre, direct);
        }
    }
    // Dropping mid-epoch stops the worker (would hang in join otherwise).
    let mut p = Prefetcher::new(ds.clone(), LoaderConfig::new(1), 0).unwrap();
    assert!(p.next().is_some());
    drop(p);
    assert!(Prefetcher::new(ds, LoaderConfig::new(0), 0).is_err());
}
