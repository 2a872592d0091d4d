//! The kernel throughput report, on demand (`cargo test --release -p cnnc-compiler --test
//! lower_report -- --ignored --nocapture`). Ignored by default: it times things and asserts
//! nothing about speed; `benches/kernels.rs` prints the same table.
#![cfg(feature = "jit")]

use cnnc_compiler::lower::report::{conv_report, standard_cases};

#[test]
#[ignore = "prints timings; run explicitly in release mode"]
fn print_kernel_report() {
    let naive = std::env::var_os("CNNC_REPORT_NAIVE").is_some();
    println!("{}", conv_report(&standard_cases(), naive).expect("report"));
}
