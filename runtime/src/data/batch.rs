//! Mini-batching: seeded shuffling, the last-batch policy, per-batch augmentation and
//! normalisation, and a background-thread prefetcher.
//!
//! The order of epoch `e` is a Fisher-Yates shuffle of `0..n` driven by
//! `StdRng::seed_from_u64(h(seed, e))` (a fixed hash of the seed and the epoch), so the same
//! `(seed, epoch)` always gives the same order, and different epochs give different orders.
//! Without shuffling the order is `0..n`.
//!
//! **Last partial batch.** When `n` is not a multiple of the batch size, [`LastBatch::Keep`]
//! (the default, PyTorch's `drop_last=False`) yields a final smaller batch of the remaining
//! `n % batch_size` images; [`LastBatch::Drop`] (`drop_last=True`) skips them, so every batch
//! has exactly `batch_size` images (with shuffling, different images are skipped each epoch).

use super::{derive_seed, Augment, DataError, Dataset, Normalizer};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// What to do with the final `n % batch_size` images of an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LastBatch {
    /// Yield them as a smaller last batch.
    #[default]
    Keep,
    /// Skip them.
    Drop,
}

/// How a dataset is cut into batches.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Images per batch (> 0).
    pub batch_size: usize,
    /// Shuffle every epoch (seeded by `seed` and the epoch number).
    pub shuffle: bool,
    /// Seed for shuffling and augmentation.
    pub seed: u64,
    /// Last partial batch policy.
    pub last_batch: LastBatch,
    /// Augmentation applied to each image (before normalisation).
    pub augment: Option<Augment>,
    /// Normalisation applied to each image (after augmentation).
    pub normalize: Option<Normalizer>,
}

impl LoaderConfig {
    /// In-order batches of `batch_size`, partial last batch kept, no augmentation or
    /// normalisation (an evaluation loader).
    pub fn new(batch_size: usize) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: false,
            seed: 0,
            last_batch: LastBatch::Keep,
            augment: None,
            normalize: None,
        }
    }

    /// Shuffle every epoch with this seed (which also seeds augmentation).
    pub fn shuffled(mut self, seed: u64) -> Self {
        self.shuffle = true;
        self.seed = seed;
        self
    }

    /// Sets the last partial batch policy.
    pub fn last_batch(mut self, policy: LastBatch) -> Self {
        self.last_batch = policy;
        self
    }

    /// Augments every image.
    pub fn augment(mut self, augment: Augment) -> Self {
        self.augment = Some(augment);
        self
    }

    /// Normalises every image.
    pub fn normalize(mut self, normalizer: Normalizer) -> Self {
        self.normalize = Some(normalizer);
        self
    }

    /// Checks the configuration against a dataset.
    pub fn validate(&self, ds: &Dataset) -> Result<(), DataError> {
        if self.batch_size == 0 {
            return Err(DataError::Invalid("batch size must be > 0".into()));
        }
        if let Some(a) = &self.augment {
            a.validate()?;
        }
        if let Some(n) = &self.normalize {
            if n.channels() != ds.image_shape()[0] {
                return Err(DataError::Invalid(format!(
                    "normaliser for {} channels but the dataset's images have shape {:?}",
                    n.channels(),
                    ds.image_shape()
                )));
            }
        }
        Ok(())
    }

    /// Number of batches an epoch over `n` images yields.
    pub fn num_batches(&self, n: usize) -> usize {
        if self.batch_size == 0 {
            return 0;
        }
        match self.last_batch {
            LastBatch::Keep => n.div_ceil(self.batch_size),
            LastBatch::Drop => n / self.batch_size,
        }
    }

    /// The image order of `epoch` over `n` images (before the last-batch policy).
    pub fn epoch_order(&self, n: usize, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        if self.shuffle {
            order.shuffle(&mut StdRng::seed_from_u64(derive_seed(self.seed, &[epoch, 0x5EED])));
        }
        order
    }
}

/// One mini-batch: images NCHW, labels, and which dataset images they are.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `n * C * H * W` values.
    pub images: Vec<f32>,
    /// `n` labels.
    pub labels: Vec<usize>,
    /// Dataset indices of the images.
    pub indices: Vec<usize>,
    /// `[n, C, H, W]`.
    pub shape: [usize; 4],
    /// Epoch it belongs to.
    pub epoch: u64,
    /// Position of the batch within the epoch.
    pub batch_index: usize,
}

impl Batch {
    /// Images in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch is empty (never yielded by the loaders).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Assembles the batch of dataset images `indices` (config already validated).
fn make_batch(ds: &Dataset, cfg: &LoaderConfig, epoch: u64, batch_index: usize, indices: &[usize]) -> Batch {
    let shape = ds.image_shape();
    let per = ds.image_len();
    let mut images = Vec::with_capacity(indices.len() * per);
    let mut labels = Vec::with_capacity(indices.len());
    for &i in indices {
        // Indices come from epoch_order(ds.len()), so they are in range.
        images.extend_from_slice(&ds.images()[i * per..(i + 1) * per]);
        labels.push(ds.labels()[i]);
    }
    for (img, &i) in images.chunks_exact_mut(per).zip(indices) {
        if let Some(a) = &cfg.augment {
            // Cannot fail: config validated and img has exactly `per` values.
            let _ = a.apply(img, shape, cfg.seed, epoch, i as u64);
        }
        if let Some(n) = &cfg.normalize {
            let _ = n.normalize_image(img, shape);
        }
    }
    Batch {
        images,
        labels,
        indices: indices.to_vec(),
        shape: [indices.len(), shape[0], shape[1], shape[2]],
        epoch,
        batch_index,
    }
}

/// Iterator over the batches of one epoch, computed on the calling thread.
#[derive(Debug)]
pub struct Batches<'a> {
    ds: &'a Dataset,
    cfg: &'a LoaderConfig,
    order: Vec<usize>,
    epoch: u64,
    next: usize,
    total: usize,
}

impl<'a> Batches<'a> {
    /// Batches of epoch `epoch` of `ds` under `cfg`.
    pub fn new(ds: &'a Dataset, cfg: &'a LoaderConfig, epoch: u64) -> Result<Self, DataError> {
        cfg.validate(ds)?;
        Ok(Batches {
            ds,
            cfg,
            order: cfg.epoch_order(ds.len(), epoch),
            epoch,
            next: 0,
            total: cfg.num_batches(ds.len()),
        })
    }
}

impl Iterator for Batches<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.total {
            return None;
        }
        let b = self.next;
        self.next += 1;
        let bs = self.cfg.batch_size;
        let end = ((b + 1) * bs).min(self.order.len());
        Some(make_batch(self.ds, self.cfg, self.epoch, b, &self.order[b * bs..end]))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let r = self.total - self.next;
        (r, Some(r))
    }
}

impl ExactSizeIterator for Batches<'_> {}

impl Dataset {
    /// The batches of epoch `epoch` under `cfg`, computed lazily on this thread.
    pub fn batches<'a>(&'a self, cfg: &'a LoaderConfig, epoch: u64) -> Result<Batches<'a>, DataError> {
        Batches::new(self, cfg, epoch)
    }
}

/// Iterator over the batches of one epoch, each assembled (augmented, normalised) on a
/// background thread one batch ahead: a `sync_channel(1)` holds the next batch ready while
/// the caller trains on the current one. Yields exactly what [`Batches`] yields for the same
/// arguments. Dropping it early stops and joins the thread.
#[derive(Debug)]
pub struct Prefetcher {
    rx: Option<Receiver<Batch>>,
    handle: Option<JoinHandle<()>>,
    remaining: usize,
}

impl Prefetcher {
    /// Starts the background thread for epoch `epoch` of `ds` under `cfg`.
    pub fn new(ds: Arc<Dataset>, cfg: LoaderConfig, epoch: u64) -> Result<Self, DataError> {
        cfg.validate(&ds)?;
        let remaining = cfg.num_batches(ds.len());
        let (tx, rx) = sync_channel::<Batch>(1);
        let handle = std::thread::Builder::new()
            .name(format!("cnnc-prefetch-e{epoch}"))
            .spawn(move || {
                // Batches::new cannot fail: validated above.
                if let Ok(batches) = Batches::new(&ds, &cfg, epoch) {
                    for b in batches {
                        if tx.send(b).is_err() {
                            return; // consumer dropped
                        }
                    }
                }
            })
            .map_err(|e| DataError::Invalid(format!("cannot start the prefetch thread: {e}")))?;
        Ok(Prefetcher { rx: Some(rx), handle: Some(handle), remaining })
    }
}

impl Iterator for Prefetcher {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.remaining == 0 {
            return None;
        }
        match self.rx.as_ref()?.recv() {
            Ok(b) => {
                self.remaining -= 1;
                Some(b)
            }
            Err(_) => {
                // The worker ended early: it can only have panicked (a bug); re-raise it
                // rather than silently shortening the epoch.
                self.rx = None;
                if let Some(h) = self.handle.take() {
                    if let Err(p) = h.join() {
                        std::panic::resume_unwind(p);
                    }
                }
                None
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for Prefetcher {}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.rx = None; // unblocks a worker waiting in send()
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
