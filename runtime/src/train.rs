//! The training loop: epochs of shuffled, augmented mini-batches (prepared on a background
//! thread while the previous batch trains), an optimiser step per batch, a validation pass per
//! epoch, early stopping on validation loss, atomic checkpoints and training curves.
//!
//! The loop is engine-agnostic ([`Engine`]): the JIT engine in production, the reference
//! interpreter for checking. Progress is reported through [`Observer`] so the CLI can draw
//! progress bars without the runtime depending on a terminal library.

use crate::checkpoint::{self, CheckpointMeta};
use crate::curves::{CurveLog, CurveRow};
use crate::data::{Augment, Dataset, LastBatch, LoaderConfig, Normalizer, Prefetcher};
use crate::engine::{score, BatchStats, Engine};
use crate::optim::{LrMultipliers, Optimizer, OptimizerConfig, Schedule};
use crate::params::ParamStore;
use cnnc_compiler::ir::{Graph, Loss};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Why training stopped with an error. The last good checkpoint (if any) is never overwritten
/// by a failed epoch.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration value is invalid.
    #[error("invalid training configuration: {0}")]
    Config(String),
    /// The engine failed on a batch.
    #[error("epoch {epoch}, batch {batch}: {message}")]
    Engine {
        /// Epoch (1-based).
        epoch: u64,
        /// Batch within the epoch.
        batch: usize,
        /// The engine's message (names the layer).
        message: String,
    },
    /// The loss became NaN or infinite.
    #[error("loss is {loss} at epoch {epoch}, batch {batch}: training stopped{}", .kept.as_ref().map(|p| format!("; the last good checkpoint {} is kept", p.display())).unwrap_or_default())]
    NonFinite {
        /// Epoch (1-based).
        epoch: u64,
        /// Batch within the epoch.
        batch: usize,
        /// The loss value.
        loss: f64,
        /// The checkpoint left untouched.
        kept: Option<PathBuf>,
    },
    /// Loading data failed.
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    /// An optimiser error.
    #[error(transparent)]
    Optim(#[from] crate::optim::OptimError),
    /// Writing or reading a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] crate::checkpoint::CheckpointError),
    /// Writing curves failed.
    #[error(transparent)]
    Curves(#[from] crate::curves::CurvesError),
}

/// Everything that shapes a training run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Passes over the training set.
    pub epochs: u64,
    /// Images per mini-batch.
    pub batch: usize,
    /// Optimiser.
    pub optimizer: OptimizerConfig,
    /// Learning rate per optimiser step (the unit of the schedule is one step).
    pub schedule: Schedule,
    /// Loss on the logits.
    pub loss: Loss,
    /// Seed for shuffling, augmentation and dropout.
    pub seed: u64,
    /// Augmentation of training images.
    pub augment: Option<Augment>,
    /// Stop when validation loss has not improved for this many epochs.
    pub patience: Option<u64>,
    /// Write a checkpoint here after every epoch that improves validation loss.
    pub checkpoint: Option<PathBuf>,
    /// Append training curves (CSV) here; a PNG is rendered beside it.
    pub curves: Option<PathBuf>,
    /// Per-tensor learning-rate multipliers by name prefix, applied in every optimiser step
    /// (fine-tuning: ~1/10 for the top layers, ~1/100 for intermediate ones; 0 leaves a tensor
    /// untouched). `LrMultipliers::new()`: 1 everywhere.
    pub lr_multipliers: LrMultipliers,
}

/// One epoch's outcome.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochSummary {
    /// Epoch (1-based).
    pub epoch: u64,
    /// Training loss/accuracy over the epoch (as the weights changed).
    pub train: BatchStats,
    /// Validation loss/accuracy after the epoch.
    pub val: Option<BatchStats>,
    /// Learning rate at the end of the epoch.
    pub lr: f32,
    /// Training images per second.
    pub images_per_s: f64,
    /// Wall time of the epoch (training and validation).
    pub seconds: f64,
}

/// Receives progress (the CLI draws bars from it).
pub trait Observer {
    /// After each batch: epoch (1-based), batch index, batches in the epoch, running stats.
    fn batch(&mut self, _epoch: u64, _batch: usize, _batches: usize, _running: &BatchStats, _images_per_s: f64) {}
    /// After each epoch.
    fn epoch(&mut self, _summary: &EpochSummary) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl Observer for Quiet {}

/// The result of [`train`].
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    /// Every epoch run.
    pub epochs: Vec<EpochSummary>,
    /// True when early stopping ended the run.
    pub stopped_early: bool,
    /// The normaliser fitted on the training set (apply it to anything you infer on).
    pub normalizer: Normalizer,
}

/// Fingerprint of a graph's architecture: FNV-1a of its IR text (names, ops, shapes).
/// Frozen flags are a training choice, not architecture, and do not count: a checkpoint
/// fine-tuned with frozen layers loads into (evaluates, resumes) the plain model.
pub fn fingerprint(g: &Graph) -> String {
    let mut g = g.clone();
    for id in g.nodes().collect::<Vec<_>>() {
        g.node_mut(id).trainable = true;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in g.to_string().bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Evaluate `params` on `ds` in inference mode, `batch` images at a time.
pub fn evaluate(
    engine: &mut dyn Engine,
    params: &ParamStore,
    ds: &Dataset,
    normalizer: &Normalizer,
    batch: usize,
    loss: Loss,
) -> Result<BatchStats, TrainError> {
    let cfg = LoaderConfig::new(batch).normalize(normalizer.clone());
    let mut total = BatchStats::default();
    for (i, b) in ds.batches(&cfg, 0)?.enumerate() {
        let logits = engine
            .infer(params, &b.images, b.len())
            .map_err(|e| TrainError::Engine { epoch: 0, batch: i, message: e.0 })?;
        total.add(score(&logits, &b.labels, loss).map_err(|e| TrainError::Engine { epoch: 0, batch: i, message: e.0 })?);
    }
    Ok(total)
}

/// Train `params` of `graph` on `train_set` with `engine`, validating on `val` after every
/// epoch.
pub fn train(
    engine: &mut dyn Engine,
    graph: &Graph,
    params: &mut ParamStore,
    train_set: &Dataset,
    val: Option<&Dataset>,
    cfg: &TrainConfig,
    observer: &mut dyn Observer,
) -> Result<TrainOutcome, TrainError> {
    train_resumed(engine, graph, params, train_set, val, cfg, None, observer)
}

/// [`train`], continuing a run from the state a checkpoint recorded ([`load_resume`]: the
/// weights are already in `params`): epochs `resume.epoch + 1 ..= cfg.epochs` (so
/// `cfg.epochs` is the run's total), the optimiser's state and step count, the early-stopping
/// state and the checkpoint's input normaliser. Shuffling, augmentation and dropout are
/// seeded by epoch and step, so with the same data, configuration and thread count the
/// result is bit-identical to a run that was never interrupted. Resuming with another
/// optimiser than the one that wrote the state is an error.
#[allow(clippy::too_many_arguments)]
pub fn train_resumed(
    engine: &mut dyn Engine,
    graph: &Graph,
    params: &mut ParamStore,
    train_set: &Dataset,
    val: Option<&Dataset>,
    cfg: &TrainConfig,
    resume: Option<&Resume>,
    observer: &mut dyn Observer,
) -> Result<TrainOutcome, TrainError> {
    if cfg.batch == 0 || cfg.epochs == 0 {
        return Err(TrainError::Config("epochs and batch size must be at least 1".into()));
    }
    cfg.schedule.validate()?;
    if let Some(r) = resume {
        if r.epoch >= cfg.epochs {
            return Err(TrainError::Config(format!(
                "the checkpoint has already completed epoch {} of the {} asked for (the epoch count is the run's total: ask for more to continue)",
                r.epoch, cfg.epochs
            )));
        }
        if r.optimizer != cfg.optimizer.name() {
            return Err(TrainError::Config(format!(
                "the checkpoint's optimiser state is {}'s but this run uses {}: resume with the same optimiser",
                if r.optimizer.is_empty() { "no optimiser" } else { r.optimizer.as_str() },
                cfg.optimizer.name()
            )));
        }
        let buffers = cfg.optimizer.buffer_names().join(",");
        if r.optimizer_buffers.as_ref().is_some_and(|b| *b != buffers) {
            return Err(TrainError::Config(format!(
                "the checkpoint's {} keeps state [{}] but this run's {} keeps [{buffers}] (momentum or centring differ): resume with the same settings",
                r.optimizer,
                r.optimizer_buffers.as_deref().unwrap_or_default(),
                cfg.optimizer.name()
            )));
        }
    }
    let normalizer = match resume.and_then(|r| r.normalizer.clone()) {
        Some(n) => n,
        None => Normalizer::fit(train_set)?,
    };
    let mut loader = LoaderConfig::new(cfg.batch).shuffled(cfg.seed).last_batch(LastBatch::Keep).normalize(normalizer.clone());
    if let Some(a) = &cfg.augment {
        loader = loader.augment(a.clone());
    }
    loader.validate(train_set)?;
    let data = Arc::new(train_set.clone());
    let mut optimizer = Optimizer::new(cfg.optimizer.clone())?.with_multipliers(cfg.lr_multipliers.clone());
    let mut grads = params.zeros_like();
    let mut curves = cfg.curves.as_ref().map(|p| CurveLog::open(p)).transpose()?;
    // A resumed run's curves continue the log; its PNG shows the epochs before the resume too.
    let mut rows = match (resume, &cfg.curves) {
        (Some(r), Some(p)) if p.is_file() => crate::curves::read_csv(p)?.into_iter().filter(|row| row.epoch <= r.epoch).collect(),
        _ => Vec::new(),
    };
    let mut best_val = f64::INFINITY;
    let mut since_best = 0;
    let mut outcome = TrainOutcome { epochs: Vec::new(), stopped_early: false, normalizer: normalizer.clone() };
    // A failed run never writes: a checkpoint already at the path (e.g. the one resumed
    // from) is the last good one until this run saves its own.
    let mut saved_checkpoint: Option<PathBuf> = cfg.checkpoint.clone().filter(|p| p.is_file());
    let mut step: u64 = 0;
    let mut first_epoch = 1;
    if let Some(r) = resume {
        let tensors: Vec<(String, usize)> = params.infos().iter().map(|i| (i.name.clone(), i.shape.iter().product())).collect();
        optimizer
            .import_state(&r.optimizer_state, &tensors, r.step)
            .map_err(|e| TrainError::Config(format!("cannot resume the optimiser: {e}")))?;
        step = r.step;
        best_val = r.best_val;
        since_best = r.since_best;
        first_epoch = r.epoch + 1;
    }
    for epoch in first_epoch..=cfg.epochs {
        let started = Instant::now();
        let batches = loader.num_batches(train_set.len());
        let mut running = BatchStats::default();
        let mut lr = cfg.schedule.lr_at(step);
        for (bi, b) in Prefetcher::new(Arc::clone(&data), loader.clone(), epoch - 1)?.enumerate() {
            let seed = cfg.seed ^ (step.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let stats = engine
                .train_step(params, &mut grads, &b.images, &b.labels, seed)
                .map_err(|e| TrainError::Engine { epoch, batch: bi, message: e.0 })?;
            if !stats.loss_sum.is_finite() {
                return Err(TrainError::NonFinite { epoch, batch: bi, loss: stats.loss_sum, kept: saved_checkpoint });
            }
            lr = cfg.schedule.lr_at(step);
            optimizer.begin_step();
            for info in params.infos().to_vec() {
                if !info.is_trainable() {
                    continue;
                }
                let g = grads.slice(&info.name).expect("same layout");
                let p = params.slice_mut(&info.name).expect("same layout");
                optimizer.update(&info.name, p, g, lr)?;
            }
            step += 1;
            running.add(stats);
            let ips = running.count as f64 / started.elapsed().as_secs_f64().max(1e-9);
            observer.batch(epoch, bi, batches, &running, ips);
        }
        let train_seconds = started.elapsed().as_secs_f64();
        let val_stats = match val {
            Some(v) => Some(evaluate(engine, params, v, &normalizer, cfg.batch, cfg.loss)?),
            None => None,
        };
        let summary = EpochSummary {
            epoch,
            train: running,
            val: val_stats,
            lr,
            images_per_s: running.count as f64 / train_seconds.max(1e-9),
            seconds: started.elapsed().as_secs_f64(),
        };
        observer.epoch(&summary);
        outcome.epochs.push(summary);
        let row = CurveRow {
            epoch,
            step,
            train_loss: running.mean_loss(),
            train_acc: running.accuracy(),
            val_loss: val_stats.map(|s| s.mean_loss()),
            val_acc: val_stats.map(|s| s.accuracy()),
            lr: lr as f64,
            images_per_s: summary.images_per_s,
        };
        if let Some(log) = curves.as_mut() {
            log.append(&row)?;
            rows.push(row);
            crate::curves::render_png(&rows, &log.path().with_extension("png"), 900, 600)?;
        }
        let monitored = val_stats.map(|s| s.mean_loss()).unwrap_or(running.mean_loss());
        if monitored < best_val {
            best_val = monitored;
            since_best = 0;
            if let Some(path) = &cfg.checkpoint {
                let meta = CheckpointMeta {
                    architecture: graph.name.clone(),
                    fingerprint: fingerprint(graph),
                    epoch,
                    optimizer: cfg.optimizer.name().to_string(),
                    extra: [
                        ("normalizer_mean".to_string(), join(&normalizer.mean)),
                        ("normalizer_std".to_string(), join(&normalizer.std)),
                        (STEP_KEY.to_string(), step.to_string()),
                        (BEST_KEY.to_string(), best_val.to_string()),
                        (SINCE_BEST_KEY.to_string(), since_best.to_string()),
                        (BUFFERS_KEY.to_string(), cfg.optimizer.buffer_names().join(",")),
                    ]
                    .into_iter()
                    .collect(),
                };
                let infos = params.infos().to_vec();
                let state: Vec<checkpoint::Tensor> = optimizer
                    .export_state()
                    .into_iter()
                    .map(|(n, s, d)| (format!("{}{n}", checkpoint::OPTIM_PREFIX), s, d))
                    .collect();
                checkpoint::save(
                    path,
                    &meta,
                    infos
                        .iter()
                        .map(|i| (i.name.as_str(), i.shape.as_slice(), params.slice(&i.name).expect("own name")))
                        .chain(state.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice()))),
                )?;
                saved_checkpoint = Some(path.clone());
            }
        } else {
            since_best += 1;
            if cfg.patience.is_some_and(|p| since_best >= p) {
                outcome.stopped_early = true;
                break;
            }
        }
    }
    Ok(outcome)
}

const STEP_KEY: &str = "step";
const BEST_KEY: &str = "best_monitored_loss";
const SINCE_BEST_KEY: &str = "epochs_since_best";
const BUFFERS_KEY: &str = "optimizer_buffers";

/// The training state a checkpoint written by [`train`] records besides the weights, for
/// [`train_resumed`].
#[derive(Debug, Clone)]
pub struct Resume {
    /// Epochs completed.
    pub epoch: u64,
    /// Optimiser steps taken (the learning-rate schedule and dropout seeds follow it).
    pub step: u64,
    /// Best monitored loss so far (validation loss, or training loss without validation).
    pub best_val: f64,
    /// Epochs since that best (early stopping).
    pub since_best: u64,
    /// Name of the optimiser that wrote the state (`Adam`, `SGD`, ...).
    pub optimizer: String,
    /// Its state buffers per tensor, comma-separated (`momentum_buffer`, ...), if recorded.
    pub optimizer_buffers: Option<String>,
    /// The optimiser's state tensors, `"{tensor}.{buffer}"` (as `Optimizer::export_state`).
    pub optimizer_state: Vec<checkpoint::Tensor>,
    /// The input normaliser the weights were trained with.
    pub normalizer: Option<Normalizer>,
}

/// Load a checkpoint written by [`train`] for [`train_resumed`]: its weights into `params`
/// (architecture, fingerprint and shapes checked first, nothing changed on a mismatch) and
/// its training state. A checkpoint without training state (weights only) is an error that
/// says so.
pub fn load_resume(path: &std::path::Path, graph: &Graph, params: &mut ParamStore) -> Result<Resume, TrainError> {
    let c = read_checked(path, graph, params)?;
    let file = path.display();
    let num = |k: &str| -> Result<Option<String>, TrainError> { Ok(c.meta.extra.get(k).cloned()) };
    let missing = || TrainError::Config(format!("checkpoint {file} holds weights but no training state (optimiser step), so it cannot be resumed; start a new run from its weights instead"));
    let step: u64 = num(STEP_KEY)?.ok_or_else(missing)?.parse().map_err(|_| {
        TrainError::Config(format!("checkpoint {file}: metadata {STEP_KEY} is not a number"))
    })?;
    let best_val: f64 = match num(BEST_KEY)? {
        Some(v) => v.parse().map_err(|_| TrainError::Config(format!("checkpoint {file}: metadata {BEST_KEY} '{v}' is not a number")))?,
        None => f64::INFINITY,
    };
    let since_best: u64 = match num(SINCE_BEST_KEY)? {
        Some(v) => v.parse().map_err(|_| TrainError::Config(format!("checkpoint {file}: metadata {SINCE_BEST_KEY} '{v}' is not a number")))?,
        None => 0,
    };
    let normalizer = restore(&c, params);
    Ok(Resume {
        epoch: c.meta.epoch,
        step,
        best_val,
        since_best,
        optimizer: c.meta.optimizer.clone(),
        optimizer_buffers: c.meta.extra.get(BUFFERS_KEY).cloned(),
        optimizer_state: c.optimizer_tensors(),
        normalizer,
    })
}

/// Read a checkpoint written by [`train`] for `graph`, checking its architecture, fingerprint
/// and every tensor's shape against `params` (which it does not change).
fn read_checked(path: &std::path::Path, graph: &Graph, params: &ParamStore) -> Result<checkpoint::Checkpoint, TrainError> {
    let infos = params.infos().to_vec();
    let expected: Vec<(&str, &[usize])> = infos.iter().map(|i| (i.name.as_str(), i.shape.as_slice())).collect();
    Ok(checkpoint::load_checked(path, &graph.name, &fingerprint(graph), &expected)?)
}

/// Copy a checked checkpoint's weights into `params`; the input normaliser it recorded.
fn restore(c: &checkpoint::Checkpoint, params: &mut ParamStore) -> Option<Normalizer> {
    for (name, _, data) in c.model_tensors() {
        if let Some(dst) = params.slice_mut(name) {
            dst.copy_from_slice(data);
        }
    }
    match (c.meta.extra.get("normalizer_mean"), c.meta.extra.get("normalizer_std")) {
        (Some(m), Some(s)) => split(m).zip(split(s)).and_then(|(m, s)| Normalizer::new(m, s).ok()),
        _ => None,
    }
}

fn join(v: &[f32]) -> String {
    v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

fn split(s: &str) -> Option<Vec<f32>> {
    s.split(',').map(|x| x.parse().ok()).collect()
}

/// What [`load_checkpoint`] found besides the weights.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Epochs completed when saved.
    pub epoch: u64,
    /// The input normaliser the weights were trained with, if recorded.
    pub normalizer: Option<Normalizer>,
}

/// Load the tensors of a checkpoint saved by [`train`] into `params`, checking the
/// architecture, fingerprint and every shape first (nothing is changed on a mismatch).
pub fn load_checkpoint(path: &std::path::Path, graph: &Graph, params: &mut ParamStore) -> Result<Loaded, TrainError> {
    let c = read_checked(path, graph, params)?;
    let normalizer = restore(&c, params);
    Ok(Loaded { epoch: c.meta.epoch, normalizer })
}
