//! The main job: cost reports of the bundled models, then a short training run of LeNet-5 on
//! the bundled MNIST digits (8,000 training / 2,000 held-out), reporting held-out accuracy.
//!
//! `cargo run --release --example mnist [-- EPOCHS]` (default 5 epochs)

use cnnc::compiler::cost::{analyze, render, render_compare, Format};
use cnnc::compiler::ir::Loss;
use cnnc::compiler::lang;
use cnnc::runtime::data::idx::load_mnist_dir;
use cnnc::runtime::init::InitConfig;
use cnnc::runtime::optim::{OptimizerConfig, Schedule};
use cnnc::runtime::params::ParamStore;
use cnnc::runtime::train::{train, EpochSummary, Observer, TrainConfig};
use std::path::Path;

struct Print;
impl Observer for Print {
    fn epoch(&mut self, s: &EpochSummary) {
        let v = s.val.expect("validation set given");
        println!(
            "epoch {:>2}  train loss {:.4} acc {:.2}%  |  held-out loss {:.4} acc {:.2}%  |  {:.0} img/s, {:.1} s",
            s.epoch,
            s.train.mean_loss(),
            100.0 * s.train.accuracy(),
            v.mean_loss(),
            100.0 * v.accuracy(),
            s.images_per_s,
            s.seconds
        );
    }
}

fn model(file: &str) -> cnnc::compiler::ir::Graph {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("examples/models").join(file);
    let program = lang::load_file(&path).unwrap_or_else(|d| panic!("{}", d.render_file(&path)));
    let name = program.models().last().expect("a model").name.clone();
    program.expand(&name).unwrap_or_else(|d| panic!("{}", d.render_file(&path)))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let epochs: u64 = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(5);
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));

    println!("== Cost report: LeNet-5 ==\n");
    let lenet = model("lenet5.cnn");
    print!("{}", render(&analyze(&lenet, 1), Format::Table));
    println!("\n== The lecture's inception module: naive vs 1x1 reductions ==\n");
    print!("{}", render_compare(&analyze(&model("inception_naive.cnn"), 1), &analyze(&model("inception_reduced.cnn"), 1), false));

    println!("\n== Training LeNet-5 on the bundled MNIST digits ({epochs} epochs, Adam 1e-3, batch 64) ==\n");
    let (train_set, test_set) = load_mnist_dir(&root.join("data/mnist10k"))?;
    let mut params = ParamStore::for_graph(&lenet, &InitConfig::default(), 1)?;
    let mut engine = cnnc::runtime::engine::default_engine(&lenet, Loss::SoftmaxCrossEntropy, 64)?;
    println!("engine: {}", engine.name());
    let cfg = TrainConfig {
        epochs,
        batch: 64,
        optimizer: OptimizerConfig::adam(1e-3),
        schedule: Schedule::constant(1e-3),
        loss: Loss::SoftmaxCrossEntropy,
        seed: 1,
        augment: None,
        patience: None,
        checkpoint: None,
        curves: None,
        lr_multipliers: Default::default(),
    };
    let out = train(engine.as_mut(), &lenet, &mut params, &train_set, Some(&test_set), &cfg, &mut Print)?;
    let last = out.epochs.last().expect("at least one epoch");
    println!("\nheld-out accuracy after {} epochs: {:.2}%", last.epoch, 100.0 * last.val.expect("val").accuracy());
    Ok(())
}
