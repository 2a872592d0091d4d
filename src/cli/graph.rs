//! `cnnc graph`: check a model file and print its graph.

use super::{load_models, CliError, ModelArgs};
use clap::ValueEnum;
use cnnc_compiler::ir::to_dot;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

#[derive(ValueEnum, Clone, Copy, Debug)]
enum GraphFormat {
    /// The IR text, one line per layer
    Text,
    /// Graphviz DOT
    Dot,
    /// SVG rendered by Graphviz's `dot` (must be installed)
    Svg,
}

/// Arguments of `cnnc graph`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Output format
    #[arg(long, short = 'f', value_enum, default_value_t = GraphFormat::Text)]
    format: GraphFormat,
    /// Write to this file instead of standard output
    #[arg(long, short = 'o', value_name = "PATH")]
    output: Option<PathBuf>,
}

/// Run `cnnc graph`.
pub fn run(a: Args) -> Result<(), CliError> {
    let graphs = load_models(&a.model.file, a.model.model.as_deref())?;
    let mut out = Vec::new();
    for g in &graphs {
        match a.format {
            GraphFormat::Text => out.extend(g.to_string().into_bytes()),
            GraphFormat::Dot => out.extend(to_dot(g).into_bytes()),
            GraphFormat::Svg => out.extend(svg(&to_dot(g))?),
        }
    }
    match a.output {
        Some(p) => std::fs::write(&p, out).map_err(|e| CliError(format!("cannot write {}: {e}", p.display())))?,
        None => std::io::stdout().write_all(&out)?,
    }
    Ok(())
}

fn svg(dot: &str) -> Result<Vec<u8>, CliError> {
    let mut child = Command::new("dot")
        .arg("-Tsvg")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| CliError(format!("cannot run Graphviz `dot` ({e}); install graphviz, or use --format dot")))?;
    child.stdin.take().expect("piped").write_all(dot.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(CliError(format!("`dot -Tsvg` failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(out.stdout)
}
