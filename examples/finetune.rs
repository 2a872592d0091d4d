//! Transfer learning done by the compiler: LeNet-5 learns digits 0-4, then its convolutional
//! features are frozen and a fresh head learns digits 5-9 — against fine-tuning everything
//! from the same start. Freezing is a graph property (`Node::trainable`): the cost report
//! counts the backward FLOPs it saves and the JIT engine drops exactly that work (no weight
//! gradients for frozen layers, nothing below the lowest trainable layer), so the measured
//! backward time falls with it.
//!
//! `cargo run --release --example finetune [-- EPOCHS]` (default 3 epochs per phase; < 1 min)
//!
//! Prints: held-out accuracy on 0-4 after pre-training; for both fine-tuning runs the held-out
//! 5-9 accuracy per epoch; then the backward time per training step (batch 64, median of
//! repeated steps, per-group profiling of the engine), the % saved, and the cost model's
//! backward FLOPs saved.

use cnnc::compiler::cost::analyze;
use cnnc::compiler::ir::{Graph, Loss};
use cnnc::compiler::lang;
use cnnc::compiler::plan::Fusion;
use cnnc::runtime::data::idx::load_mnist_dir;
use cnnc::runtime::data::{Dataset, LoaderConfig, Normalizer};
use cnnc::runtime::engine::Engine;
use cnnc::runtime::exec::JitEngine;
use cnnc::runtime::init::InitConfig;
use cnnc::runtime::optim::{OptimizerConfig, Schedule};
use cnnc::runtime::params::ParamStore;
use cnnc::runtime::train::{train, EpochSummary, Observer, TrainConfig};
use std::path::Path;
use std::time::{Duration, Instant};

const BATCH: usize = 64;
const FEATURES: [&str; 2] = ["conv1", "conv2"];

/// LeNet-5 from the bundled model file, with a 5-class head.
fn lenet5_classes5(root: &Path) -> Result<Graph, Box<dyn std::error::Error>> {
    let path = root.join("examples/models/lenet5.cnn");
    let src = std::fs::read_to_string(&path)?;
    let src = src.replace("fc3: dense(10)", "fc3: dense(5)");
    let program = lang::parse_source("lenet5.cnn", &src).map_err(|d| d.render("lenet5.cnn", &src))?;
    Ok(program.expand("LeNet5").map_err(|d| d.render("lenet5.cnn", &src))?)
}

/// The images of `ds` whose label is in `lo..lo + 5`, relabelled `0..5`.
fn digits(ds: &Dataset, lo: usize) -> Result<Dataset, Box<dyn std::error::Error>> {
    let idx: Vec<usize> = (0..ds.len()).filter(|&i| (lo..lo + 5).contains(&ds.labels()[i])).collect();
    let sub = ds.subset(&idx)?;
    let labels = sub.labels().iter().map(|&y| y - lo).collect();
    Ok(Dataset::new(sub.images().to_vec(), labels, sub.image_shape(), 5)?)
}

fn config(epochs: u64) -> TrainConfig {
    TrainConfig {
        epochs,
        batch: BATCH,
        optimizer: OptimizerConfig::adam(1e-3),
        schedule: Schedule::constant(1e-3),
        loss: Loss::SoftmaxCrossEntropy,
        seed: 1,
        augment: None,
        patience: None,
        checkpoint: None,
        curves: None,
        lr_multipliers: Default::default(),
    }
}

struct Print(&'static str);
impl Observer for Print {
    fn epoch(&mut self, s: &EpochSummary) {
        let v = s.val.expect("validation set given");
        println!(
            "  {:<22} epoch {}  train loss {:.4}  held-out acc {:.2}%  {:>6.0} img/s",
            self.0,
            s.epoch,
            s.train.mean_loss(),
            100.0 * v.accuracy(),
            s.images_per_s
        );
    }
}

/// Median per-step backward time (sum over the engine's groups) and whole-step time of each
/// `(engine, params)`, over `reps` steps on the first batches of `ds`. The engines take turns
/// step by step, so both see the same machine load.
fn time_steps(runs: &mut [(JitEngine, ParamStore)], ds: &Dataset, reps: usize) -> Result<Vec<(Duration, Duration)>, Box<dyn std::error::Error>> {
    let cfg = LoaderConfig::new(BATCH).normalize(Normalizer::fit(ds)?);
    let batches: Vec<_> = ds.batches(&cfg, 0)?.take(8).collect();
    let mut times = vec![(Vec::new(), Vec::new()); runs.len()];
    for (eng, _) in runs.iter_mut() {
        eng.set_profiling(true);
    }
    for i in 0..reps + 3 {
        let b = &batches[i % batches.len()];
        for ((eng, p), (bw, step)) in runs.iter_mut().zip(times.iter_mut()) {
            let mut g = p.zeros_like();
            let t0 = Instant::now();
            eng.train_step(p, &mut g, &b.images, &b.labels, i as u64)?;
            let t = t0.elapsed();
            if i >= 3 {
                step.push(t);
                bw.push(eng.profile(true).iter().map(|s| s.backward).sum::<Duration>());
            }
        }
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    Ok(times.into_iter().map(|(bw, step)| (median(bw), median(step))).collect())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let epochs: u64 = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(3);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (train_all, test_all) = load_mnist_dir(&root.join("data/mnist10k"))?;
    let (train_a, test_a) = (digits(&train_all, 0)?, digits(&test_all, 0)?);
    let (train_b, test_b) = (digits(&train_all, 5)?, digits(&test_all, 5)?);
    let loss = Loss::SoftmaxCrossEntropy;
    let graph = lenet5_classes5(root)?;

    println!("== 1. Pre-train LeNet-5 on digits 0-4 ({} images, {epochs} epochs, Adam 1e-3, batch {BATCH}) ==", train_a.len());
    let mut pre = ParamStore::for_graph(&graph, &InitConfig::default(), 1)?;
    let mut eng = JitEngine::new(&graph, loss, BATCH, Fusion::Full)?;
    let out = train(&mut eng, &graph, &mut pre, &train_a, Some(&test_a), &config(epochs), &mut Print("digits 0-4"))?;
    let acc_a = out.epochs.last().and_then(|e| e.val).map_or(0.0, |v| v.accuracy());

    // The fine-tuning start: pre-trained weights by name, a fresh head (fc3 skipped).
    let mut start = ParamStore::for_graph(&graph, &InitConfig::default(), 2)?;
    let tensors: Vec<_> = pre.infos().iter().map(|i| (i.name.clone(), i.shape.clone(), pre.slice(&i.name).expect("own").to_vec())).collect();
    let report = start.load_by_name(tensors.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice())), &["fc3".to_string()], "the 0-4 model")?;
    println!("\n== 2. Digits 5-9 ({} images) from the 0-4 weights with a fresh head ==", train_b.len());
    for line in report.to_string().lines() {
        println!("  {line}");
    }
    let mut frozen = graph.clone();
    for l in FEATURES {
        let id = frozen.find(l)?;
        frozen.node_mut(id).trainable = false;
    }
    let (mut runs, mut engines) = (Vec::new(), Vec::new());
    for (label, g) in [("frozen conv1+conv2", &frozen), ("fine-tune everything", &graph)] {
        let mut p = start.clone();
        p.set_trainable_from(g);
        let mut eng = JitEngine::new(g, loss, BATCH, Fusion::Full)?;
        let t0 = Instant::now();
        let out = train(&mut eng, g, &mut p, &train_b, Some(&test_b), &config(epochs), &mut Print(label))?;
        let secs = t0.elapsed().as_secs_f64();
        let acc = out.epochs.last().and_then(|e| e.val).map_or(0.0, |v| v.accuracy());
        for l in FEATURES {
            let same = p.slice(&format!("{l}.weight")) == start.slice(&format!("{l}.weight"));
            if same == g.node(g.find(l)?).trainable {
                return Err(format!("{label}: {l}'s weights {} although it {}", if same { "did not move" } else { "moved" }, if same { "trains" } else { "is frozen" }).into());
            }
        }
        runs.push((label, acc, secs, analyze(g, BATCH)));
        engines.push((eng, p));
    }
    let times = time_steps(&mut engines, &train_b, 40)?;

    println!("\n== Backward cost per training step (batch {BATCH}; median of 40 alternating steps, per-group profile) ==");
    println!("  {:<22} {:>12} {:>12} {:>16} {:>16}", "", "backward ms", "step ms", "backward FLOPs", "held-out 5-9");
    for ((label, acc, _, c), (bw, step)) in runs.iter().zip(&times) {
        println!("  {label:<22} {:>12.2} {:>12.2} {:>16} {:>15.2}%", ms(*bw), ms(*step), c.totals.flops.backward.total(), 100.0 * acc);
    }
    let ((f, a), (tf, ta)) = ((&runs[0], &runs[1]), (times[0], times[1]));
    let saved_flops = f.3.backward_flops_saved as f64 / a.3.totals.flops.backward.total() as f64;
    println!("\n  pre-trained on 0-4: {:.2}% held-out", 100.0 * acc_a);
    println!("  backward time saved by freezing the features: {:.1}% (measured), whole step {:.1}%", 100.0 * (1.0 - ms(tf.0) / ms(ta.0)), 100.0 * (1.0 - ms(tf.1) / ms(ta.1)));
    println!("  backward FLOPs saved (cost model):             {:.1}% ({} of {})", 100.0 * saved_flops, f.3.backward_flops_saved, a.3.totals.flops.backward.total());
    println!("  training wall time, {epochs} epochs: {:.1} s frozen vs {:.1} s everything", f.2, a.2);
    Ok(())
}
