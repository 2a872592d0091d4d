//! Resuming a run: a checkpoint carries the weights, the optimiser state, the step count and
//! the early-stopping state, so "train 2 epochs" and "train 1 epoch, then `--resume` for the
//! 2nd" give bit-identical weights, for every optimiser family. Resuming with another
//! optimiser, or past the requested epoch count, is a clear error.

mod common;

use cnnc::compiler::ir::{Graph, Loss};
use cnnc::compiler::lang;
use cnnc::runtime::checkpoint;
use cnnc::runtime::data::idx::load_mnist_dir;
use cnnc::runtime::data::Dataset;
use cnnc::runtime::engine::default_engine;
use cnnc::runtime::init::InitConfig;
use cnnc::runtime::optim::{OptimizerConfig, Schedule};
use cnnc::runtime::params::ParamStore;
use cnnc::runtime::train::{load_resume, train, train_resumed, Quiet, TrainConfig};
use common::{at, cnnc_fails_with, cnnc_ok, TempDir};
use std::path::PathBuf;

/// Small, but with batch norm (running statistics are state too) and dropout (seeded per
/// step, so the step count must be restored).
const MODEL: &str = "model Small(input: 1x28x28) {
    conv1: conv(4, 5x5, stride=2); bn; relu;
    pool1: maxpool(2x2);
    flatten;
    fc1: dense(24); relu;
    dropout(0.25);
    fc2: dense(10);
}";

fn small() -> Graph {
    lang::parse_source("small.cnn", MODEL).unwrap().expand("Small").unwrap()
}

fn data() -> (Dataset, Dataset) {
    let (train_set, test_set) = load_mnist_dir(&at("data/mnist10k")).unwrap();
    (train_set.split_at(200).unwrap().0, test_set.split_at(100).unwrap().0)
}

fn config(optimizer: OptimizerConfig, epochs: u64, checkpoint: Option<PathBuf>) -> TrainConfig {
    let lr = optimizer.lr();
    TrainConfig {
        epochs,
        batch: 24, // 200 = 8 x 24 + 8: a short last batch
        optimizer,
        schedule: Schedule::cosine(lr, 17, lr * 0.1), // the lr moves every step
        loss: Loss::SoftmaxCrossEntropy,
        seed: 11,
        augment: None,
        patience: Some(5),
        checkpoint,
        curves: None,
        lr_multipliers: Default::default(),
    }
}

fn bits(p: &ParamStore) -> Vec<u32> {
    p.flat().iter().map(|v| v.to_bits()).collect()
}

#[test]
fn one_epoch_plus_resume_equals_two_epochs_for_every_optimizer() {
    let (train_set, val) = data();
    let g = small();
    let dir = TempDir::new("resume-lib");
    let optimizers = [
        OptimizerConfig::adam(2e-3),
        OptimizerConfig::adamw(2e-3, 0.05),
        OptimizerConfig::sgd(0.05).with_weight_decay(1e-3),
        OptimizerConfig::sgd_momentum(0.02, 0.9, true).with_weight_decay(5e-4),
        OptimizerConfig::rmsprop(1e-3),
    ];
    for opt in optimizers {
        let what = opt.name();
        let mut engine = default_engine(&g, Loss::SoftmaxCrossEntropy, 24).unwrap();
        // Straight through.
        let mut straight = ParamStore::for_graph(&g, &InitConfig::default(), 3).unwrap();
        train(engine.as_mut(), &g, &mut straight, &train_set, Some(&val), &config(opt.clone(), 2, None), &mut Quiet).unwrap();
        // One epoch, checkpointed.
        let ckpt = dir.join(&format!("{what}-{}.safetensors", opt.lr()));
        let mut first = ParamStore::for_graph(&g, &InitConfig::default(), 3).unwrap();
        train(engine.as_mut(), &g, &mut first, &train_set, Some(&val), &config(opt.clone(), 1, Some(ckpt.clone())), &mut Quiet)
            .unwrap();
        let saved = checkpoint::load(&ckpt).unwrap();
        assert!(saved.tensors.iter().any(|(n, _, _)| n.starts_with(checkpoint::OPTIM_PREFIX)) || opt.buffer_names().is_empty());
        assert_eq!(saved.meta.extra.get("step").map(String::as_str), Some("9"), "{what}");
        // Resume into differently initialised parameters and a fresh engine.
        let mut resumed = ParamStore::for_graph(&g, &InitConfig::default(), 99).unwrap();
        let state = load_resume(&ckpt, &g, &mut resumed).unwrap();
        assert_eq!((state.epoch, state.step), (1, 9));
        assert_eq!(bits(&resumed), bits(&first), "{what}: weights not restored");
        let mut engine = default_engine(&g, Loss::SoftmaxCrossEntropy, 24).unwrap();
        let out = train_resumed(
            engine.as_mut(),
            &g,
            &mut resumed,
            &train_set,
            Some(&val),
            &config(opt.clone(), 2, None),
            Some(&state),
            &mut Quiet,
        )
        .unwrap();
        assert_eq!(out.epochs.len(), 1);
        assert_eq!(out.epochs[0].epoch, 2);
        assert_ne!(bits(&first), bits(&straight), "{what}: the second epoch changed nothing");
        assert_eq!(bits(&resumed), bits(&straight), "{what}: resumed weights differ from an uninterrupted run");
    }
}

#[test]
fn resume_without_optimizer_state_is_not_bit_identical() {
    // The check above can fail: dropping the optimiser state (weights only) changes the result.
    let (train_set, val) = data();
    let g = small();
    let dir = TempDir::new("resume-neg");
    let opt = OptimizerConfig::adam(2e-3);
    let mut engine = default_engine(&g, Loss::SoftmaxCrossEntropy, 24).unwrap();
    let mut straight = ParamStore::for_graph(&g, &InitConfig::default(), 3).unwrap();
    train(engine.as_mut(), &g, &mut straight, &train_set, Some(&val), &config(opt.clone(), 2, None), &mut Quiet).unwrap();
    let ckpt = dir.join("a.safetensors");
    let mut p = ParamStore::for_graph(&g, &InitConfig::default(), 3).unwrap();
    train(engine.as_mut(), &g, &mut p, &train_set, Some(&val), &config(opt.clone(), 1, Some(ckpt.clone())), &mut Quiet).unwrap();
    let mut state = load_resume(&ckpt, &g, &mut p).unwrap();
    state.optimizer_state.clear();
    state.step = 0;
    train_resumed(engine.as_mut(), &g, &mut p, &train_set, Some(&val), &config(opt, 2, None), Some(&state), &mut Quiet).unwrap();
    assert_ne!(bits(&p), bits(&straight));
}

#[test]
fn cli_resume_continues_bit_identically_and_refuses_mismatches() {
    let dir = TempDir::new("resume-cli");
    let model = at("examples/models/lenet5.cnn");
    let ckpt = |name: &str| dir.join(name);
    // A constant learning rate: a cosine or step schedule spans `--epochs`, so a 1-epoch run
    // follows another schedule than a 2-epoch one (an interrupted 2-epoch run resumes exactly).
    let base = |epochs: &str, out: &PathBuf| -> Vec<String> {
        [
            "train",
            model.to_str().unwrap(),
            "--limit",
            "160",
            "--batch",
            "32",
            "--optimizer",
            "nesterov",
            "--lr",
            "0.02",
            "--weight-decay",
            "1e-4",
            "--epochs",
            epochs,
            "--checkpoint",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let straight = ckpt("straight.safetensors");
    cnnc_ok(base("2", &straight));
    let part = ckpt("part.safetensors");
    let curves = ckpt("curves.csv");
    let mut args = base("1", &part);
    args.extend(["--curves".to_string(), curves.to_str().unwrap().to_string()]);
    cnnc_ok(&args);
    let resumed = ckpt("resumed.safetensors");
    std::fs::copy(&part, &resumed).unwrap();
    let mut args = base("2", &resumed);
    args.extend(["--resume".to_string(), resumed.to_str().unwrap().to_string()]);
    args.extend(["--curves".to_string(), curves.to_str().unwrap().to_string()]);
    cnnc_ok(&args);
    // The curve log continues: epoch 1 from the first run, epoch 2 from the resumed one.
    let csv = std::fs::read_to_string(&curves).unwrap();
    let epochs: Vec<&str> = csv.lines().skip(1).map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(epochs, ["1", "2"], "{csv}");
    assert!(curves.with_extension("png").is_file());
    let (a, b) = (checkpoint::load(&straight).unwrap(), checkpoint::load(&resumed).unwrap());
    // Both saved epoch 2 only if held-out loss improved in epoch 2; either way they match.
    assert_eq!(a.meta.epoch, b.meta.epoch);
    let differing: Vec<&str> =
        a.tensors.iter().zip(&b.tensors).filter(|(x, y)| x != y).map(|(x, _)| x.0.as_str()).collect();
    assert!(a.tensors.len() == b.tensors.len() && differing.is_empty(), "resumed run differs from the straight one in {differing:?}");
    assert!(a.tensors != checkpoint::load(&part).unwrap().tensors, "epoch 2 changed nothing");

    // Another optimiser: refused, and the checkpoint is left alone.
    let before = std::fs::read(&part).unwrap();
    let mut args = base("2", &part);
    assert_eq!(args[7], "nesterov");
    args[7] = "adam".into();
    args.extend(["--resume".to_string(), part.to_str().unwrap().to_string()]);
    cnnc_fails_with(&args, &["optimiser state is SGD's but this run uses Adam"]);
    // The same optimiser without momentum keeps no state: refused too, not silently reset.
    let mut args = base("2", &part);
    args[7] = "sgd".into();
    args.extend(["--resume".to_string(), part.to_str().unwrap().to_string()]);
    cnnc_fails_with(&args, &["keeps state [momentum_buffer] but this run's SGD keeps []"]);
    // Already at the requested epoch count.
    let mut args = base("1", &part);
    args.extend(["--resume".to_string(), part.to_str().unwrap().to_string()]);
    cnnc_fails_with(&args, &["already completed epoch 1 of the 1"]);
    assert_eq!(std::fs::read(&part).unwrap(), before);
}
