//! `cnnc bench`: time a model per engine and per layer (fused JIT vs naive JIT vs the
//! reference interpreter), against the FMA peak measured in the same run. The measuring is
//! `cnnc_runtime::bench`; this file parses arguments, draws the progress bar and prints.

use super::{load_models, CliError, ModelArgs};
use clap::ValueEnum;
use cnnc_runtime::bench::{self, BenchConfig, BenchReport};
use indicatif::{ProgressBar, ProgressStyle};

#[derive(ValueEnum, Clone, Copy, Debug)]
enum BenchFormat {
    /// Aligned text tables
    Table,
    /// JSON (an array when the file holds several models)
    Json,
}

/// Arguments of `cnnc bench`.
#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  cnnc bench examples/models/lenet5.cnn --batch 64\n  cnnc bench tests/models/mini_inception.cnn --batch 32 --no-reference\n  cnnc bench examples/models/lenet5.cnn --reps 3 --format json\n  cnnc bench examples/models/lenet5.cnn --batch 64 --threads 1 --no-reference\n\nEnvironment:\n  CNNC_BROADCAST=folded|mixed|lanes  the GEMM tiles' broadcast variant (default: the fastest here, timed\n                                     once per process; the report's last note says which)"
)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Samples per step
    #[arg(long, short = 'b', default_value_t = 32, value_name = "N")]
    batch: usize,
    /// Timed runs of the fused engine (the naive JIT and the interpreter run a third as many)
    #[arg(long, short = 'r', default_value_t = 10, value_name = "R")]
    reps: usize,
    /// Threads of the JIT engines (default: RAYON_NUM_THREADS, else one per core)
    #[arg(long, short = 'j', value_name = "N")]
    threads: Option<usize>,
    /// Skip the naive JIT engine
    #[arg(long)]
    no_naive: bool,
    /// Skip the reference interpreter (the slowest engine)
    #[arg(long)]
    no_reference: bool,
    /// Output format
    #[arg(long, short = 'f', value_enum, default_value_t = BenchFormat::Table)]
    format: BenchFormat,
}

/// Run `cnnc bench`.
pub fn run(a: Args) -> Result<(), CliError> {
    if a.batch == 0 {
        return Err(CliError("--batch must be at least 1".into()));
    }
    if a.reps == 0 {
        return Err(CliError("--reps must be at least 1".into()));
    }
    if a.threads == Some(0) {
        return Err(CliError("--threads must be at least 1".into()));
    }
    let graphs = load_models(&a.model.file, a.model.model.as_deref())?;
    let cfg = BenchConfig { batch: a.batch, reps: a.reps, naive: !a.no_naive, reference: !a.no_reference, threads: a.threads, ..BenchConfig::default() };
    let mut reports: Vec<BenchReport> = Vec::new();
    for g in &graphs {
        let bar = ProgressBar::new(1);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>12} [{bar:30}] {pos}/{len} {msg} (ETA {eta})")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(g.name.clone());
        let r = bench::run(g, &cfg, &mut |p| {
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
            bar.set_message(p.what.to_string());
        });
        bar.finish_and_clear();
        let r = r.map_err(|e| CliError(format!("model `{}`: {e}", g.name)))?;
        if matches!(a.format, BenchFormat::Table) {
            if !reports.is_empty() {
                println!();
            }
            print!("{}", r.render_table());
        }
        reports.push(r);
    }
    if matches!(a.format, BenchFormat::Json) {
        let v = match reports.as_slice() {
            [one] => one.to_json(),
            all => serde_json::Value::Array(all.iter().map(BenchReport::to_json).collect()),
        };
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(())
}
