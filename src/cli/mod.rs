//! Command-line definitions (clap) and dispatch; one file per subcommand.

mod bench;
mod graph;
mod predict;
mod report;
mod train;

use clap::{Parser, Subcommand};
use cnnc_compiler::ir::Graph;
use cnnc_compiler::lang;
use std::path::{Path, PathBuf};

/// A compiler for convolutional networks: cost reports, JIT-compiled training and inference.
#[derive(Parser, Debug)]
#[command(name = "cnnc", version, about, long_about = None, propagate_version = true)]
#[command(after_help = "See 'cnnc help <command>' for more information on a specific command.")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the architecture cost report of a model (params, MACs, FLOPs, memory, receptive field)
    Report(report::Args),
    /// Check a model file and print its graph (IR text, Graphviz DOT, or SVG)
    Graph(graph::Args),
    /// Train a model on a data set, with checkpoints and training curves
    Train(train::TrainArgs),
    /// Evaluate a checkpoint on the held-out data
    Eval(train::EvalArgs),
    /// Classify one image with a checkpoint: the top-5 classes and their probabilities
    Predict(predict::PredictArgs),
    /// Time a model per engine and per layer: fused vs naive JIT vs interpreter, GFLOP/s, memory
    ///
    /// Times inference and the training step with the fused JIT kernels, the naive JIT kernels
    /// and the reference interpreter: medians of repeated runs, GFLOP/s from the cost model's
    /// FLOPs and their fraction of this machine's 128-bit FMA peak (a JIT'd f32x4 fma loop
    /// measured in the same run, times the thread count), compile time, buffer bytes and the
    /// measured peak-RSS growth next to the cost report's activation memory; then one row per
    /// fused group of the training plan. Every model of FILE is benchmarked unless --model
    /// names one. A progress bar runs on stderr.
    Bench(bench::Args),
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Report(a) => report::run(a),
        Command::Graph(a) => graph::run(a),
        Command::Train(a) => train::run_train(a),
        Command::Eval(a) => train::run_eval(a),
        Command::Predict(a) => predict::run(a),
        Command::Bench(a) => bench::run(a),
    }
}

/// A CLI failure: a message for the terminal (diagnostics are pre-rendered).
#[derive(Debug)]
pub struct CliError(pub String);

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl<E: std::error::Error> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError(e.to_string())
    }
}

/// Which models of a file to use.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model file (`.cnn`)
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Model to use when the file defines several (default: all for reports, else the last)
    #[arg(long, value_name = "NAME")]
    pub model: Option<String>,
}

/// Parse `path` and expand its models (one named `model`, or all), with rustc-style errors.
pub fn load_models(path: &Path, model: Option<&str>) -> Result<Vec<Graph>, CliError> {
    let source = std::fs::read_to_string(path).map_err(|e| CliError(format!("cannot read {}: {e}", path.display())))?;
    let name = path.display().to_string();
    let program = lang::parse_source(&name, &source).map_err(|d| CliError(d.render(&name, &source)))?;
    let graphs = match model {
        Some(m) => vec![program.expand(m).map_err(|d| CliError(d.render(&name, &source)))?],
        None => program.expand_all().map_err(|d| CliError(d.render(&name, &source)))?,
    };
    if graphs.is_empty() {
        return Err(CliError(format!("{name} defines no model")));
    }
    Ok(graphs)
}
