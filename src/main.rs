//! The `cnnc` command-line tool: cost reports, graphs, training, evaluation and benchmarks for
//! architectures written in the cnnc model language.

mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Diagnostics arrive rendered (rustc style); other errors get cargo's prefix.
            let text = e.to_string();
            if text.starts_with("error") {
                eprint!("{text}");
                if !text.ends_with('\n') {
                    eprintln!();
                }
            } else {
                eprintln!("error: {text}");
            }
            ExitCode::FAILURE
        }
    }
}
