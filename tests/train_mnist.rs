//! End-to-end: LeNet-5 trained briefly on the bundled MNIST digits must reach >= 95% held-out
//! accuracy with the default engine, so a broken gradient, optimiser or loader cannot pass.
//! Also: the same seed gives bit-identical weights, and a checkpoint round-trips.

use cnnc::compiler::ir::{Graph, Loss};
use cnnc::compiler::lang;
use cnnc::runtime::data::idx::load_mnist_dir;
use cnnc::runtime::engine::default_engine;
use cnnc::runtime::init::InitConfig;
use cnnc::runtime::optim::{OptimizerConfig, Schedule};
use cnnc::runtime::params::ParamStore;
use cnnc::runtime::train::{evaluate, load_checkpoint, train, Quiet, TrainConfig};
use std::path::Path;

fn lenet() -> Graph {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/models/lenet5.cnn");
    lang::load_file(&path).unwrap().expand("LeNet5").unwrap()
}

fn config(epochs: u64, checkpoint: Option<std::path::PathBuf>) -> TrainConfig {
    TrainConfig {
        epochs,
        batch: 32,
        optimizer: OptimizerConfig::adam(2e-3),
        schedule: Schedule::constant(2e-3),
        loss: Loss::SoftmaxCrossEntropy,
        seed: 7,
        augment: None,
        patience: None,
        checkpoint,
        curves: None,
        lr_multipliers: Default::default(),
    }
}

#[test]
fn lenet5_reaches_95_percent() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (train_set, test_set) = load_mnist_dir(&root.join("data/mnist10k")).unwrap();
    let g = lenet();
    let mut params = ParamStore::for_graph(&g, &InitConfig::default(), 3).unwrap();
    let mut engine = default_engine(&g, Loss::SoftmaxCrossEntropy, 32).unwrap();
    let dir = std::env::temp_dir().join(format!("cnnc-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ckpt = dir.join("lenet5.safetensors");
    let out = train(engine.as_mut(), &g, &mut params, &train_set, Some(&test_set), &config(2, Some(ckpt.clone())), &mut Quiet).unwrap();
    let acc = out.epochs.last().unwrap().val.unwrap().accuracy();
    assert!(acc >= 0.95, "held-out accuracy {acc}");
    assert!(out.epochs[1].train.mean_loss() < out.epochs[0].train.mean_loss());

    // The best checkpoint reloads into fresh parameters and evaluates the same.
    let mut fresh = ParamStore::for_graph(&g, &InitConfig::default(), 99).unwrap();
    let loaded = load_checkpoint(&ckpt, &g, &mut fresh).unwrap();
    assert_eq!(loaded.epoch, 2);
    let normalizer = loaded.normalizer.expect("normaliser recorded");
    let s = evaluate(engine.as_mut(), &fresh, &test_set, &normalizer, 32, Loss::SoftmaxCrossEntropy).unwrap();
    assert_eq!(s.accuracy(), acc);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn same_seed_same_weights() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (train_set, _) = load_mnist_dir(&root.join("data/mnist10k")).unwrap();
    let (small, _) = train_set.split_at(256).unwrap();
    let g = lenet();
    let run = || {
        let mut params = ParamStore::for_graph(&g, &InitConfig::default(), 5).unwrap();
        let mut engine = default_engine(&g, Loss::SoftmaxCrossEntropy, 32).unwrap();
        train(engine.as_mut(), &g, &mut params, &small, None, &config(1, None), &mut Quiet).unwrap();
        params.flat().to_vec()
    };
    let (a, b) = (run(), run());
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "weights differ between identical runs");
    let init: ParamStore = ParamStore::for_graph(&g, &InitConfig::default(), 5).unwrap();
    assert_ne!(init.flat(), &a[..], "training changed nothing");
}
