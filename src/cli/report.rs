//! `cnnc report`: the architecture cost report.

use super::{load_models, CliError, ModelArgs};
use clap::ValueEnum;
use cnnc_compiler::cost::{self, Format};
use std::path::PathBuf;

#[derive(ValueEnum, Clone, Copy, Debug)]
enum OutputFormat {
    Table,
    Json,
    Markdown,
}

/// Arguments of `cnnc report`.
#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  cnnc report examples/models/lenet5.cnn\n  cnnc report examples/models/inception_naive.cnn --compare examples/models/inception_reduced.cnn\n  cnnc report examples/models/resnet.cnn --model ResNet50 --batch 32 --format json")]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Batch size the counts are for (parameters do not scale with it)
    #[arg(long, short = 'b', default_value_t = 1, value_name = "N")]
    batch: usize,
    /// Output format
    #[arg(long, short = 'f', value_enum, default_value_t = OutputFormat::Table)]
    format: OutputFormat,
    /// Compare with another model file, side by side with ratios
    #[arg(long, value_name = "OTHER")]
    compare: Option<PathBuf>,
    /// Freeze these layers (comma-separated names, or a prefix ending in `*`), to see the
    /// backward FLOPs transfer learning saves
    #[arg(long, value_delimiter = ',', value_name = "LAYERS")]
    freeze: Vec<String>,
}

/// Run `cnnc report`.
pub fn run(a: Args) -> Result<(), CliError> {
    if a.batch == 0 {
        return Err(CliError("--batch must be at least 1".into()));
    }
    let mut graphs = load_models(&a.model.file, a.model.model.as_deref())?;
    for g in &mut graphs {
        freeze(g, &a.freeze)?;
    }
    if let Some(other) = &a.compare {
        let others = load_models(other, None)?;
        let left = cost::analyze(graphs.last().expect("non-empty"), a.batch);
        let right = cost::analyze(others.last().expect("non-empty"), a.batch);
        print!("{}", cost::render_compare(&left, &right, matches!(a.format, OutputFormat::Markdown)));
        return Ok(());
    }
    let format = match a.format {
        OutputFormat::Table => Format::Table,
        OutputFormat::Json => Format::Json,
        OutputFormat::Markdown => Format::Markdown,
    };
    if matches!(format, Format::Json) && graphs.len() > 1 {
        let all: Vec<_> = graphs.iter().map(|g| cost::report_json(&cost::analyze(g, a.batch))).collect();
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    for (i, g) in graphs.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print!("{}", cost::render(&cost::analyze(g, a.batch), format));
    }
    Ok(())
}

/// Mark the named layers (or every layer whose name starts with `prefix*`) frozen.
pub fn freeze(g: &mut cnnc_compiler::ir::Graph, names: &[String]) -> Result<(), CliError> {
    for pat in names.iter().filter(|p| !p.is_empty()) {
        let ids: Vec<_> = match pat.strip_suffix('*') {
            Some(prefix) => g.nodes().filter(|&n| g.node(n).name.starts_with(prefix)).collect(),
            None => vec![g.find(pat).map_err(|e| CliError(format!("--freeze: {e} in model {}", g.name)))?],
        };
        if ids.is_empty() {
            return Err(CliError(format!("--freeze: no layer of {} starts with `{}`", g.name, pat.trim_end_matches('*'))));
        }
        for id in ids {
            g.node_mut(id).trainable = false;
        }
    }
    Ok(())
}
