//! Training data: loaders, normalisation, splitting, batching and augmentation.
//!
//! A [`Dataset`] holds every image of a set in one contiguous `f32` buffer in NCHW order
//! (values normally in `[0, 1]`), one class label per image, the per-image shape `[C, H, W]`
//! and the class count.
//!
//! - [`idx`]: the IDX format of the MNIST family (raw or gzip), strictly validated.
//! - [`folder`]: an image-folder dataset, `DIR/<class>/*.png|jpg`.
//! - [`augment`]: seeded, deterministic per-image augmentation (flip, padded crop, scale,
//!   brightness/contrast jitter).
//! - [`batch`]: seeded shuffling into mini-batches, and a [`Prefetcher`] that assembles the
//!   next batch on a background thread while the current one trains.
//!
//! The intended pipeline is: load (pixels in `[0, 1]`) -> [`Normalizer::fit`] on the training
//! set -> per batch: augment the raw image, then normalise it (the loader does both, see
//! [`LoaderConfig`]), so zero padding and colour jitter act on `[0, 1]` pixels as in
//! torchvision's `RandomCrop` / `ColorJitter` followed by `Normalize`.

pub mod augment;
pub mod batch;
pub mod folder;
pub mod idx;

pub use augment::Augment;
pub use batch::{Batch, Batches, LastBatch, LoaderConfig, Prefetcher};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::PathBuf;

/// Every error of the data layer. Messages name the file (and where relevant the byte
/// offset or image) and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file could not be opened or read at the OS level.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file's content is malformed (corrupt, truncated, wrong magic, out-of-range value...).
    #[error("{0}")]
    Format(String),
    /// A request that does not fit the data (bad index, shape mismatch, bad configuration).
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }
}

/// An in-memory labelled image dataset: images as one contiguous NCHW `f32` buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    images: Vec<f32>,
    labels: Vec<usize>,
    shape: [usize; 3],
    num_classes: usize,
    class_names: Vec<String>,
}

impl Dataset {
    /// Builds a dataset from `images` (`labels.len() * C * H * W` values, NCHW),
    /// `labels` (each `< num_classes`), the per-image `shape = [C, H, W]` and the class count.
    /// Class names default to `"0"`, `"1"`, ...
    pub fn new(
        images: Vec<f32>,
        labels: Vec<usize>,
        shape: [usize; 3],
        num_classes: usize,
    ) -> Result<Self, DataError> {
        if shape.contains(&0) {
            return Err(DataError::Invalid(format!(
                "dataset image shape {shape:?} has a zero dimension"
            )));
        }
        if num_classes == 0 {
            return Err(DataError::Invalid("dataset must have at least one class".into()));
        }
        let per = shape[0] * shape[1] * shape[2];
        let expected = labels.len().checked_mul(per).ok_or_else(|| {
            DataError::Invalid(format!("{} images of shape {shape:?} overflow usize", labels.len()))
        })?;
        if images.len() != expected {
            return Err(DataError::Invalid(format!(
                "dataset has {} labels of images of shape {shape:?} ({expected} values) but {} image values",
                labels.len(),
                images.len()
            )));
        }
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l >= num_classes) {
            return Err(DataError::Invalid(format!(
                "label {l} of image {i} is out of range for {num_classes} classes"
            )));
        }
        let class_names = (0..num_classes).map(|c| c.to_string()).collect();
        Ok(Dataset { images, labels, shape, num_classes, class_names })
    }

    /// Replaces the class names (one per class, e.g. folder names).
    pub fn with_class_names(mut self, names: Vec<String>) -> Result<Self, DataError> {
        if names.len() != self.num_classes {
            return Err(DataError::Invalid(format!(
                "{} class names given for {} classes",
                names.len(),
                self.num_classes
            )));
        }
        self.class_names = names;
        Ok(self)
    }

    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the dataset has no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Per-image shape `[C, H, W]`.
    pub fn image_shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Values per image, `C * H * W`.
    pub fn image_len(&self) -> usize {
        self.shape[0] * self.shape[1] * self.shape[2]
    }

    /// Number of classes.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// Class names, indexed by label.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// All images, NCHW.
    pub fn images(&self) -> &[f32] {
        &self.images
    }

    /// All images, NCHW, mutable (e.g. for in-place normalisation).
    pub fn images_mut(&mut self) -> &mut [f32] {
        &mut self.images
    }

    /// All labels.
    pub fn labels(&self) -> &[usize] {
        &self.labels
    }

    /// Image `i` (`C*H*W` values), or `None` past the end.
    pub fn image(&self, i: usize) -> Option<&[f32]> {
        let per = self.image_len();
        self.images.get(i.checked_mul(per)?..(i + 1).checked_mul(per)?)
    }

    /// Label of image `i`, or `None` past the end.
    pub fn label(&self, i: usize) -> Option<usize> {
        self.labels.get(i).copied()
    }

    /// How many images each class has.
    pub fn class_histogram(&self) -> Vec<usize> {
        let mut h = vec![0; self.num_classes];
        for &l in &self.labels {
            h[l] += 1;
        }
        h
    }

    /// A new dataset of the images at `indices`, in that order (repeats allowed).
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset, DataError> {
        let per = self.image_len();
        let mut images = Vec::with_capacity(indices.len() * per);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            let img = self.image(i).ok_or_else(|| {
                DataError::Invalid(format!("subset index {i} out of range for {} images", self.len()))
            })?;
            images.extend_from_slice(img);
            labels.push(self.labels[i]);
        }
        Ok(Dataset {
            images,
            labels,
            shape: self.shape,
            num_classes: self.num_classes,
            class_names: self.class_names.clone(),
        })
    }

    /// Splits into the first `n_first` images and the rest, keeping order.
    pub fn split_at(&self, n_first: usize) -> Result<(Dataset, Dataset), DataError> {
        if n_first > self.len() {
            return Err(DataError::Invalid(format!(
                "cannot split {} images at {n_first}",
                self.len()
            )));
        }
        let idx: Vec<usize> = (0..self.len()).collect();
        Ok((self.subset(&idx[..n_first])?, self.subset(&idx[n_first..])?))
    }

    /// Shuffles the indices with `StdRng::seed_from_u64(seed)`, then splits into `n_first`
    /// images and the rest (e.g. a validation split). Same seed, same split.
    pub fn shuffled_split(&self, n_first: usize, seed: u64) -> Result<(Dataset, Dataset), DataError> {
        if n_first > self.len() {
            return Err(DataError::Invalid(format!(
                "cannot split {} images at {n_first}",
                self.len()
            )));
        }
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
        Ok((self.subset(&idx[..n_first])?, self.subset(&idx[n_first..])?))
    }

    /// Smallest and largest pixel value (`None` when empty).
    pub fn value_range(&self) -> Option<(f32, f32)> {
        let first = *self.images.first()?;
        Some(self.images.iter().fold((first, first), |(lo, hi), &v| (lo.min(v), hi.max(v))))
    }
}

/// Per-channel mean/std normalisation, `x' = (x - mean[c]) / std[c]`, as torchvision's
/// `Normalize`. Fit it on the training set, then apply it to every set.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalizer {
    /// Per-channel mean.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation (> 0).
    pub std: Vec<f32>,
}

impl Normalizer {
    /// A normaliser from given per-channel statistics; every std must be finite and > 0.
    pub fn new(mean: Vec<f32>, std: Vec<f32>) -> Result<Self, DataError> {
        if mean.len() != std.len() || mean.is_empty() {
            return Err(DataError::Invalid(format!(
                "normaliser needs one mean and one std per channel, got {} means and {} stds",
                mean.len(),
                std.len()
            )));
        }
        if let Some((c, s)) = std.iter().enumerate().find(|(_, s)| !(s.is_finite() && **s > 0.0)) {
            return Err(DataError::Invalid(format!("normaliser std of channel {c} is {s}, must be > 0")));
        }
        if let Some((c, m)) = mean.iter().enumerate().find(|(_, m)| !m.is_finite()) {
            return Err(DataError::Invalid(format!("normaliser mean of channel {c} is {m}")));
        }
        Ok(Normalizer { mean, std })
    }

    /// Per-channel mean and population standard deviation over every pixel of `ds`
    /// (two passes, `f64` accumulation). A constant channel (std 0) gets std 1, so it is only
    /// centred.
    pub fn fit(ds: &Dataset) -> Result<Self, DataError> {
        if ds.is_empty() {
            return Err(DataError::Invalid("cannot fit a normaliser on an empty dataset".into()));
        }
        let [c, h, w] = ds.shape;
        let plane = h * w;
        let count = (ds.len() * plane) as f64;
        let mut sum = vec![0f64; c];
        for img in ds.images.chunks_exact(c * plane) {
            for ch in 0..c {
                sum[ch] += img[ch * plane..(ch + 1) * plane].iter().map(|&v| v as f64).sum::<f64>();
            }
        }
        let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
        let mut sq = vec![0f64; c];
        for img in ds.images.chunks_exact(c * plane) {
            for ch in 0..c {
                let m = mean[ch];
                sq[ch] += img[ch * plane..(ch + 1) * plane]
                    .iter()
                    .map(|&v| (v as f64 - m) * (v as f64 - m))
                    .sum::<f64>();
            }
        }
        let std = sq
            .iter()
            .map(|s| {
                let s = (s / count).sqrt() as f32;
                if s > 0.0 && s.is_finite() { s } else { 1.0 }
            })
            .collect();
        Normalizer::new(mean.iter().map(|&m| m as f32).collect(), std)
    }

    /// Number of channels this normaliser expects.
    pub fn channels(&self) -> usize {
        self.mean.len()
    }

    /// Normalises one CHW image in place.
    pub fn normalize_image(&self, img: &mut [f32], shape: [usize; 3]) -> Result<(), DataError> {
        let [c, h, w] = shape;
        if c != self.channels() || img.len() != c * h * w {
            return Err(DataError::Invalid(format!(
                "normaliser for {} channels applied to an image of shape {shape:?} with {} values",
                self.channels(),
                img.len()
            )));
        }
        normalize_unchecked(&self.mean, &self.std, img, h * w);
        Ok(())
    }

    /// Normalises every image of `ds` in place.
    pub fn apply(&self, ds: &mut Dataset) -> Result<(), DataError> {
        let shape = ds.shape;
        if shape[0] != self.channels() {
            return Err(DataError::Invalid(format!(
                "normaliser for {} channels applied to a dataset of {}-channel images",
                self.channels(),
                shape[0]
            )));
        }
        let per = ds.image_len();
        for img in ds.images.chunks_exact_mut(per) {
            normalize_unchecked(&self.mean, &self.std, img, shape[1] * shape[2]);
        }
        Ok(())
    }
}

fn normalize_unchecked(mean: &[f32], std: &[f32], img: &mut [f32], plane: usize) {
    for (ch, p) in img.chunks_exact_mut(plane).enumerate() {
        let (m, inv) = (mean[ch], 1.0 / std[ch]);
        for v in p {
            *v = (*v - m) * inv;
        }
    }
}

/// SplitMix64 finaliser: a well-mixed 64-bit hash used to derive independent per-(epoch,
/// image, op) seeds from one user seed.
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derives a seed from a base seed and a sequence of integers (order matters).
pub(crate) fn derive_seed(seed: u64, parts: &[u64]) -> u64 {
    parts.iter().fold(mix64(seed), |acc, &p| mix64(acc ^ mix64(p)))
}
