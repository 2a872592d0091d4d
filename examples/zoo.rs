//! Prints the model zoo: one line per model in `examples/models/*.cnn` with its parameters,
//! multiply-accumulates (conv + dense, without bias) and activation memory for one image
//! (peak during inference with buffer reuse, and what training keeps for backward).
//!
//! Run with `cargo run --example zoo` (optionally `-- <dir>`).

use cnnc::compiler::{cost, lang};
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/models"));
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "cnn"))
            .collect(),
        Err(e) => {
            eprintln!("error: cannot read `{}`: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    files.sort();
    let mut failed = false;
    println!(
        "{:<24} {:<26} {:>14} {:>12} {:>14} {:>15}",
        "model", "file", "params", "MACs", "infer peak", "train saved"
    );
    for path in &files {
        let file = path.file_name().unwrap_or_default().to_string_lossy();
        let program = match lang::load_file(path) {
            Ok(p) => p,
            Err(d) => {
                eprint!("{}", d.render_file(path));
                failed = true;
                continue;
            }
        };
        let names: Vec<String> = program.models().map(|m| m.name.clone()).collect();
        for name in names {
            match program.expand(&name) {
                Ok(g) => {
                    let r = cost::analyze(&g, 1);
                    println!(
                        "{:<24} {:<26} {:>14} {:>11.2}M {:>11.2}MiB {:>12.2}MiB",
                        name,
                        file,
                        cost::thousands(r.totals.params),
                        r.totals.macs as f64 / 1e6,
                        r.memory.inference_peak_bytes as f64 / (1 << 20) as f64,
                        r.memory.training_saved_bytes as f64 / (1 << 20) as f64,
                    );
                }
                Err(d) => {
                    eprint!("{}", d.render_file(path));
                    failed = true;
                }
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
