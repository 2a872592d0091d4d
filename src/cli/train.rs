//! `cnnc train` and `cnnc eval`: training with a progress bar, evaluation of a checkpoint.

use super::report::freeze;
use super::{load_models, CliError, ModelArgs};
use clap::ValueEnum;
use cnnc_compiler::ir::{Graph, Loss};
use cnnc_runtime::data::idx::load_mnist_dir;
use cnnc_runtime::data::{Augment, Dataset};
use cnnc_runtime::engine::{default_engine, Engine, ReferenceEngine};
use cnnc_runtime::init::InitConfig;
use cnnc_runtime::optim::{LrMultipliers, OptimizerConfig, Schedule};
use cnnc_runtime::params::ParamStore;
use cnnc_runtime::train::{self, EpochSummary, Observer, TrainConfig};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

#[derive(ValueEnum, Clone, Copy, Debug)]
enum OptimizerKind {
    Sgd,
    Momentum,
    Nesterov,
    Rmsprop,
    Adam,
    Adamw,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum ScheduleKind {
    Constant,
    Step,
    Cosine,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LossKind {
    /// Softmax cross-entropy
    Softmax,
    /// Multiclass hinge (SVM)
    Hinge,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum EngineKind {
    /// The fastest available (JIT-compiled kernels)
    Auto,
    /// The ndarray reference interpreter (slow, the correctness oracle)
    Reference,
}

/// Where the data is.
#[derive(clap::Args, Debug, Clone)]
struct DataArgs {
    /// Data directory: MNIST-style IDX files (train-*/test-* or t10k-*)
    #[arg(long, value_name = "DIR", default_value = "data/mnist10k")]
    data: PathBuf,
    /// Use only the first N training images (quick runs)
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
}

/// Arguments of `cnnc train`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  cnnc train examples/models/lenet5.cnn --epochs 15 --optimizer adam --lr 1e-3 --checkpoint runs/lenet5.safetensors\n  # fine-tune: its weights, a fresh head, frozen features, slower middle layers\n  cnnc train examples/models/lenet5.cnn --init-from runs/lenet5.safetensors --skip fc3 --freeze conv1,conv2 --lr-mult fc1=0.1,fc2=0.1")]
pub struct TrainArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// Passes over the training set
    #[arg(long, default_value_t = 5)]
    epochs: u64,
    /// Images per mini-batch
    #[arg(long, short = 'b', default_value_t = 64)]
    batch: usize,
    /// Optimiser
    #[arg(long, value_enum, default_value_t = OptimizerKind::Adam)]
    optimizer: OptimizerKind,
    /// Learning rate
    #[arg(long, default_value_t = 1e-3)]
    lr: f32,
    /// Momentum (sgd-family and rmsprop)
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// L2 weight decay (decoupled for adamw)
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Learning-rate schedule over optimiser steps
    #[arg(long, value_enum, default_value_t = ScheduleKind::Constant)]
    schedule: ScheduleKind,
    /// Linear warm-up, in epochs
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Loss on the logits
    #[arg(long, value_enum, default_value_t = LossKind::Softmax)]
    loss: LossKind,
    /// Random crop: zero-pad by this many pixels and crop back (0 = off)
    #[arg(long, default_value_t = 0, value_name = "PIXELS")]
    crop_pad: usize,
    /// Random horizontal flips (not for digits)
    #[arg(long)]
    hflip: bool,
    /// Stop when held-out loss has not improved for this many epochs
    #[arg(long, value_name = "EPOCHS")]
    patience: Option<u64>,
    /// Save the best weights here (safetensors, written atomically)
    #[arg(long, value_name = "PATH")]
    checkpoint: Option<PathBuf>,
    /// Continue the run this checkpoint recorded (weights, optimiser state, step, early
    /// stopping); `--epochs` is then the run's total, so `--epochs 10` after 4 trains 6 more
    #[arg(long, value_name = "PATH")]
    resume: Option<PathBuf>,
    /// Write training curves here (CSV; a PNG is rendered beside it)
    #[arg(long, value_name = "PATH")]
    curves: Option<PathBuf>,
    /// Freeze these layers (comma-separated names, or a prefix ending in `*`): the compiler
    /// drops their backward work
    #[arg(long, value_delimiter = ',', value_name = "LAYERS")]
    freeze: Vec<String>,
    /// Transfer learning: initialise from this checkpoint by tensor name (any architecture;
    /// layers whose shapes differ must be skipped)
    #[arg(long, value_name = "PATH")]
    init_from: Option<PathBuf>,
    /// With --init-from: layers not to load, kept freshly initialised (a replaced head;
    /// comma-separated names, or a prefix ending in `*`)
    #[arg(long, value_delimiter = ',', value_name = "LAYERS", requires = "init_from")]
    skip: Vec<String>,
    /// Learning-rate multiplier for the tensors whose name starts with PREFIX (repeatable or
    /// comma-separated; the longest matching prefix wins), e.g. `conv=0.01,fc1=0.1`
    #[arg(long = "lr-mult", value_delimiter = ',', value_name = "PREFIX=M", value_parser = parse_lr_mult)]
    lr_mult: Vec<(String, f32)>,
    /// Seed for initialisation, shuffling, augmentation and dropout
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Execution engine
    #[arg(long, value_enum, default_value_t = EngineKind::Auto)]
    engine: EngineKind,
}

/// Arguments of `cnnc eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    data: DataArgs,
    /// The checkpoint to evaluate
    #[arg(long, value_name = "PATH")]
    checkpoint: PathBuf,
    /// Images per batch
    #[arg(long, short = 'b', default_value_t = 256)]
    batch: usize,
}

/// `PREFIX=M` of `--lr-mult`.
fn parse_lr_mult(s: &str) -> Result<(String, f32), String> {
    let (prefix, m) = s.split_once('=').ok_or_else(|| format!("`{s}` is not PREFIX=MULTIPLIER (e.g. fc1=0.1)"))?;
    let m: f32 = m.trim().parse().map_err(|_| format!("`{m}` in `{s}` is not a number"))?;
    if prefix.is_empty() {
        return Err(format!("`{s}` has an empty layer prefix"));
    }
    Ok((prefix.to_string(), m))
}

/// The trainer's per-tensor multipliers from `--lr-mult`; a prefix that matches no parameter
/// of the model is an error (a typo would otherwise train at the full rate).
fn lr_multipliers(rules: &[(String, f32)], params: &ParamStore, model: &str) -> Result<LrMultipliers, CliError> {
    let mut m = LrMultipliers::new();
    for (prefix, mult) in rules {
        if !params.infos().iter().any(|i| !i.kind.is_buffer() && i.name.starts_with(prefix.as_str())) {
            return Err(CliError(format!("--lr-mult {prefix}={mult}: no parameter of {model} starts with `{prefix}`")));
        }
        m = m.set(prefix, *mult).map_err(|e| CliError(format!("--lr-mult: {e}")))?;
    }
    Ok(m)
}

fn one_model(m: &ModelArgs) -> Result<Graph, CliError> {
    let mut graphs = load_models(&m.file, m.model.as_deref())?;
    Ok(graphs.pop().expect("load_models returns at least one"))
}

fn load_data(d: &DataArgs, graph: &Graph) -> Result<(Dataset, Dataset), CliError> {
    let (mut train, test) = load_mnist_dir(&d.data).map_err(|e| CliError(format!("loading data: {e}")))?;
    if let Some(n) = d.limit {
        let n = n.min(train.len());
        train = train.split_at(n).map_err(|e| CliError(e.to_string()))?.0;
    }
    let input = graph.node(graph.inputs()[0]).shape;
    let img = train.image_shape();
    if input.dims() != img.to_vec() {
        return Err(CliError(format!(
            "model {} takes {input} images but {} holds {}x{}x{} images",
            graph.name,
            d.data.display(),
            img[0],
            img[1],
            img[2]
        )));
    }
    Ok((train, test))
}

fn engine(kind: EngineKind, g: &Graph, loss: Loss, batch: usize) -> Result<Box<dyn Engine>, CliError> {
    Ok(match kind {
        EngineKind::Auto => default_engine(g, loss, batch)?,
        EngineKind::Reference => Box::new(ReferenceEngine::new(g.clone(), loss)),
    })
}

struct Bars {
    bar: Option<ProgressBar>,
}

impl Observer for Bars {
    fn batch(&mut self, epoch: u64, batch: usize, batches: usize, running: &cnnc_runtime::engine::BatchStats, ips: f64) {
        let bar = self.bar.get_or_insert_with(|| {
            let b = ProgressBar::new(batches as u64);
            b.set_style(
                ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {msg} (ETA {eta})")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b
        });
        bar.set_prefix(format!("epoch {epoch}"));
        bar.set_position(batch as u64 + 1);
        bar.set_message(format!("loss {:.4} acc {:.2}% {:.0} img/s", running.mean_loss(), 100.0 * running.accuracy(), ips));
    }

    fn epoch(&mut self, s: &EpochSummary) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        let val = s
            .val
            .map(|v| format!("  held-out loss {:.4} acc {:.2}%", v.mean_loss(), 100.0 * v.accuracy()))
            .unwrap_or_default();
        eprintln!(
            "   epoch {:>3}  loss {:.4} acc {:.2}%{val}  lr {:.2e}  {:.0} img/s  {:.1}s",
            s.epoch,
            s.train.mean_loss(),
            100.0 * s.train.accuracy(),
            s.lr,
            s.images_per_s,
            s.seconds
        );
    }
}

/// Run `cnnc train`.
pub fn run_train(a: TrainArgs) -> Result<(), CliError> {
    let mut graph = one_model(&a.model)?;
    freeze(&mut graph, &a.freeze)?;
    let (train_set, test_set) = load_data(&a.data, &graph)?;
    let mut params = ParamStore::for_graph(&graph, &InitConfig::default(), a.seed)?;
    if let Some(src) = &a.init_from {
        if a.resume.is_some() {
            return Err(CliError("--init-from and --resume exclude each other: --resume continues this model's own run, --init-from starts a new one from another model's weights".into()));
        }
        let report = params.load_checkpoint_by_name(src, &a.skip).map_err(|e| CliError(format!("--init-from: {e}")))?;
        eprintln!(" Initialised from {} by tensor name:", src.display());
        for line in report.to_string().lines() {
            eprintln!("   {line}");
        }
    }
    let resume = match &a.resume {
        Some(r) => {
            let state = train::load_resume(r, &graph, &mut params)?;
            eprintln!(" Resuming from {} (epoch {}, step {})", r.display(), state.epoch, state.step);
            Some(state)
        }
        None => None,
    };
    for info in params.infos().to_vec() {
        if !info.layer_trainable {
            params.set_layer_trainable(&info.layer, false);
        }
    }
    let loss = match a.loss {
        LossKind::Softmax => Loss::SoftmaxCrossEntropy,
        LossKind::Hinge => Loss::MulticlassHinge { margin: 1.0 },
    };
    let optimizer = match a.optimizer {
        OptimizerKind::Sgd => OptimizerConfig::sgd(a.lr),
        OptimizerKind::Momentum => OptimizerConfig::sgd_momentum(a.lr, a.momentum, false),
        OptimizerKind::Nesterov => OptimizerConfig::sgd_momentum(a.lr, a.momentum, true),
        OptimizerKind::Rmsprop => OptimizerConfig::rmsprop(a.lr),
        OptimizerKind::Adam => OptimizerConfig::adam(a.lr),
        OptimizerKind::Adamw => OptimizerConfig::adamw(a.lr, a.weight_decay),
    };
    let optimizer = match a.optimizer {
        OptimizerKind::Adamw => optimizer,
        _ => optimizer.with_weight_decay(a.weight_decay),
    };
    let steps_per_epoch = train_set.len().div_ceil(a.batch.max(1)) as u64;
    let total = a.epochs * steps_per_epoch;
    let schedule = match a.schedule {
        ScheduleKind::Constant => Schedule::constant(a.lr),
        ScheduleKind::Step => Schedule::step(a.lr, 0.1, (total / 3).max(1)),
        ScheduleKind::Cosine => Schedule::cosine(a.lr, total.saturating_sub(a.warmup * steps_per_epoch).max(1), 0.0),
    }
    .with_warmup(a.warmup * steps_per_epoch);
    let augment = (a.crop_pad > 0 || a.hflip).then(|| Augment { hflip: a.hflip, crop_pad: a.crop_pad, ..Augment::default() });
    let cfg = TrainConfig {
        epochs: a.epochs,
        batch: a.batch,
        optimizer,
        schedule,
        loss,
        seed: a.seed,
        augment,
        patience: a.patience,
        checkpoint: a.checkpoint.clone(),
        curves: a.curves.clone(),
        lr_multipliers: lr_multipliers(&a.lr_mult, &params, &graph.name)?,
    };
    let mut eng = engine(a.engine, &graph, loss, a.batch)?;
    eprintln!(
        "  Training {} ({} trainable parameters) on {} images, {} held out, engine {}",
        graph.name,
        params.num_trainable(),
        train_set.len(),
        test_set.len(),
        eng.name()
    );
    let frozen: Vec<&str> = graph.nodes().map(|n| graph.node(n)).filter(|n| n.op.has_params() && !n.trainable).map(|n| n.name.as_str()).collect();
    if !frozen.is_empty() {
        let c = cnnc_compiler::cost::analyze(&graph, a.batch);
        let all = c.totals.flops.backward.total() + c.backward_flops_saved;
        eprintln!(
            "  Frozen {}: backward drops {} of {} FLOPs per batch ({:.1}%)",
            frozen.join(", "),
            c.backward_flops_saved,
            all,
            100.0 * c.backward_flops_saved as f64 / all.max(1) as f64
        );
    }
    let out = train::train_resumed(eng.as_mut(), &graph, &mut params, &train_set, Some(&test_set), &cfg, resume.as_ref(), &mut Bars { bar: None })?;
    if out.stopped_early {
        eprintln!("   Stopped early: held-out loss did not improve for {} epochs", a.patience.unwrap_or(0));
    }
    if let Some(p) = &a.checkpoint {
        eprintln!("    Saved best weights to {}", p.display());
    }
    if let Some(c) = &a.curves {
        eprintln!("    Curves in {} and {}", c.display(), c.with_extension("png").display());
    }
    Ok(())
}

/// Run `cnnc eval`.
pub fn run_eval(a: EvalArgs) -> Result<(), CliError> {
    let graph = one_model(&a.model)?;
    let (train_set, test_set) = load_data(&a.data, &graph)?;
    let mut params = ParamStore::for_graph(&graph, &InitConfig::default(), 0)?;
    let loaded = train::load_checkpoint(Path::new(&a.checkpoint), &graph, &mut params)?;
    let epoch = loaded.epoch;
    let normalizer = match loaded.normalizer {
        Some(n) => n,
        None => cnnc_runtime::data::Normalizer::fit(&train_set).map_err(|e| CliError(e.to_string()))?,
    };
    let mut eng = engine(EngineKind::Auto, &graph, Loss::SoftmaxCrossEntropy, a.batch)?;
    let s = train::evaluate(eng.as_mut(), &params, &test_set, &normalizer, a.batch, Loss::SoftmaxCrossEntropy)?;
    println!(
        "{} (epoch {epoch}) on {} held-out images: accuracy {:.2}%, loss {:.4}",
        graph.name,
        s.count,
        100.0 * s.accuracy(),
        s.mean_loss()
    );
    Ok(())
}
