//! `cnnc predict`: classify one image with a trained checkpoint and print the top-5 classes
//! with their softmax probabilities.
//!
//! The image is a PNG/JPEG file (`--image`), which must already have the model's input size
//! (it is converted to the model's channel count, never resized), or a held-out sample of the
//! data directory (`--index`). It is normalised with the normaliser the checkpoint recorded
//! (the one the weights were trained with); a checkpoint without one falls back to fitting
//! the data directory's training images, and says so.

use super::{load_models, CliError, ModelArgs};
use clap::ValueEnum;
use cnnc_compiler::ir::{Graph, Loss};
use cnnc_runtime::data::folder::load_image;
use cnnc_runtime::data::idx::load_mnist_dir;
use cnnc_runtime::data::Normalizer;
use cnnc_runtime::engine::{default_engine, Engine, ReferenceEngine};
use cnnc_runtime::init::InitConfig;
use cnnc_runtime::params::ParamStore;
use cnnc_runtime::train;
use std::path::PathBuf;

#[derive(ValueEnum, Clone, Copy, Debug)]
enum EngineKind {
    /// The fastest available (JIT-compiled kernels)
    Auto,
    /// The ndarray reference interpreter
    Reference,
}

/// Arguments of `cnnc predict`.
#[derive(clap::Args, Debug)]
#[command(
    group(clap::ArgGroup::new("input").required(true).args(["image", "index"])),
    after_help = "Examples:\n  cnnc predict examples/models/lenet5.cnn --checkpoint runs/lenet5.safetensors --image digit.png\n  cnnc predict examples/models/lenet5.cnn --checkpoint runs/lenet5.safetensors --index 17"
)]
pub struct PredictArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The trained checkpoint (from `cnnc train --checkpoint`)
    #[arg(long, value_name = "PATH")]
    checkpoint: PathBuf,
    /// Classify this image (PNG or JPEG, of the model's input size)
    #[arg(long, value_name = "PATH")]
    image: Option<PathBuf>,
    /// Classify held-out sample N of the data directory (0-based)
    #[arg(long, value_name = "N")]
    index: Option<usize>,
    /// Data directory (MNIST-style IDX files), for `--index` and a normaliser fallback
    #[arg(long, value_name = "DIR", default_value = "data/mnist10k")]
    data: PathBuf,
    /// How many classes to list
    #[arg(long, default_value_t = 5)]
    top: usize,
    /// Execution engine
    #[arg(long, value_enum, default_value_t = EngineKind::Auto)]
    engine: EngineKind,
}

/// Numerically stable softmax in `f64`.
fn softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let e: Vec<f64> = logits.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// Run `cnnc predict`.
pub fn run(a: PredictArgs) -> Result<(), CliError> {
    let graph: Graph = load_models(&a.model.file, a.model.model.as_deref())?.pop().expect("at least one model");
    let input = graph.node(graph.inputs()[0]).shape.dims();
    let shape: [usize; 3] = match input.as_slice() {
        [c, h, w] => [*c, *h, *w],
        _ => return Err(CliError(format!("model {} takes {}-dimensional input; predict needs CxHxW images", graph.name, input.len()))),
    };
    let mut params = ParamStore::for_graph(&graph, &InitConfig::default(), 0)?;
    let loaded = train::load_checkpoint(&a.checkpoint, &graph, &mut params)?;
    let held_out = || load_mnist_dir(&a.data).map_err(|e| CliError(format!("loading data: {e}")));
    let (mut image, what, label) = match (&a.image, a.index) {
        (Some(path), _) => {
            let (img, got) = load_image(path, Some(shape[0]))?;
            if got != shape {
                return Err(CliError(format!(
                    "image {} is {}x{} but model {} takes {}x{}x{} images (height x width must match; predict does not resize)",
                    path.display(),
                    got[1],
                    got[2],
                    graph.name,
                    shape[0],
                    shape[1],
                    shape[2]
                )));
            }
            (img, path.display().to_string(), None)
        }
        (None, Some(i)) => {
            let (_, test) = held_out()?;
            let img = test.image(i).ok_or_else(|| {
                CliError(format!("--index {i} is out of range: {} holds {} held-out images", a.data.display(), test.len()))
            })?;
            if test.image_shape() != shape {
                let s = test.image_shape();
                return Err(CliError(format!(
                    "model {} takes {}x{}x{} images but {} holds {}x{}x{} images",
                    graph.name,
                    shape[0],
                    shape[1],
                    shape[2],
                    a.data.display(),
                    s[0],
                    s[1],
                    s[2]
                )));
            }
            (img.to_vec(), format!("held-out image {i} of {}", a.data.display()), test.label(i))
        }
        (None, None) => return Err(CliError("give --image PATH or --index N".into())),
    };
    let normalizer = match loaded.normalizer {
        Some(n) => n,
        None => {
            eprintln!(" note: {} records no input normaliser; fitting one on {}", a.checkpoint.display(), a.data.display());
            let (train_set, _) = held_out()?;
            Normalizer::fit(&train_set)?
        }
    };
    normalizer.normalize_image(&mut image, shape)?;
    let mut engine: Box<dyn Engine> = match a.engine {
        EngineKind::Auto => default_engine(&graph, Loss::SoftmaxCrossEntropy, 1)?,
        EngineKind::Reference => Box::new(ReferenceEngine::new(graph.clone(), Loss::SoftmaxCrossEntropy)),
    };
    let logits = engine.infer(&params, &image, 1)?;
    let probs = softmax(&logits);
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&i, &j| probs[j].total_cmp(&probs[i]).then(i.cmp(&j)));
    let label = label.map(|l| format!(" (label {l})")).unwrap_or_default();
    println!("{} (epoch {}) on {what}{label}:", graph.name, loaded.epoch);
    for (rank, &c) in order.iter().take(a.top.max(1)).enumerate() {
        println!("  {}. class {c}: {:.6}", rank + 1, probs[c]);
    }
    Ok(())
}
