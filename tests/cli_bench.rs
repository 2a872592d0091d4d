//! `cnnc bench` end to end on LeNet-5 with few repetitions and a small batch: the table names
//! every engine and layer group, the JSON parses into the library's report, `--no-naive` /
//! `--no-reference` drop engines, and bad input fails cleanly with a message naming it.

mod common;

use cnnc::runtime::bench::BenchReport;
use common::{cnnc_fails_with, cnnc_ok};

const LENET: &str = "examples/models/lenet5.cnn";

#[test]
fn table_names_engines_layers_and_memory() {
    let out = cnnc_ok(["bench", LENET, "--batch", "3", "--reps", "2"]);
    for needle in [
        "LeNet5: batch 3",
        "128-bit FMA peak",
        "fused JIT",
        "naive JIT",
        "reference",
        "train step ms",
        "of peak",
        "peak RSS +",
        "fused vs naive JIT",
        "memory: cost report keeps",
        "per layer",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    // One row per fused group, conv1 fused with its relu.
    let row = out.lines().find(|l| l.starts_with("conv1 ")).unwrap_or_else(|| panic!("no conv1 row:\n{out}"));
    assert!(row.contains("conv2d") && row.contains("relu1") && row.contains("direct/direct/direct"), "{row}");
    for g in ["pool1", "conv2", "pool2", "fc1", "fc2", "fc3"] {
        assert!(out.lines().any(|l| l.starts_with(g)), "no {g} row:\n{out}");
    }
}

#[test]
fn json_parses_into_the_report() {
    let out = cnnc_ok(["bench", LENET, "-b", "2", "-r", "1", "--no-reference", "--format", "json"]);
    let r = BenchReport::from_json(&out).unwrap_or_else(|e| panic!("{e}:\n{out}"));
    assert_eq!((r.model.as_str(), r.batch), ("LeNet5", 2));
    let engines: Vec<&str> = r.engines.iter().map(|e| e.engine.as_str()).collect();
    assert_eq!(engines, ["fused JIT", "naive JIT"]);
    assert_eq!(r.layers[0].nodes, ["conv1", "relu1"]);
    assert!(r.engines.iter().all(|e| e.train_ns > 0 && e.infer_ns > 0));
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["engines"][0]["train_gflops"].as_f64().unwrap() > 0.0);
    // The GEMM broadcast variant the kernels ran with is in the JSON too.
    let bc: Vec<&String> = r.notes.iter().filter(|n| n.starts_with("GEMM broadcast: ")).collect();
    assert!(bc.len() == 1 && bc[0].contains("timed here: folded"), "{:?}", r.notes);
}

#[test]
fn fused_only() {
    let out = cnnc_ok(["bench", LENET, "-b", "1", "-r", "1", "--no-naive", "--no-reference", "--threads", "1"]);
    assert!(out.contains("fused JIT") && !out.contains("naive JIT") && !out.contains("reference"), "{out}");
    assert!(out.contains("LeNet5: batch 1, 1 thread(s)") && out.contains("x 1 ="), "{out}");
}

#[test]
fn bad_input_is_a_clear_error() {
    cnnc_fails_with(["bench", "no/such/model.cnn"], &["cannot read", "no/such/model.cnn"]);
    cnnc_fails_with(["bench", LENET, "--model", "NoSuchNet"], &["no model named `NoSuchNet`"]);
    cnnc_fails_with(["bench", LENET, "--batch", "0"], &["--batch must be at least 1"]);
    cnnc_fails_with(["bench", LENET, "--reps", "0"], &["--reps must be at least 1"]);
    cnnc_fails_with(["bench", LENET, "--threads", "0"], &["--threads must be at least 1"]);
    cnnc_fails_with(["bench", LENET, "--format", "xml"], &["xml"]);
}

/// The table's last line says which GEMM broadcast variant the kernels use and why;
/// `CNNC_BROADCAST` sets it, and a value it does not know is a clean error naming it.
#[test]
fn broadcast_variant_is_reported_and_can_be_set() {
    let out = cnnc_ok(["bench", LENET, "-b", "2", "-r", "1", "--no-naive", "--no-reference"]);
    let last = out.lines().last().unwrap_or_default();
    assert!(last.starts_with("note: GEMM broadcast: ") && last.contains("timed here: folded"), "{out}");
    let run = |value: &str| {
        common::cnnc_with_env(["bench", LENET, "-b", "2", "-r", "1", "--no-naive", "--no-reference"], &[("CNNC_BROADCAST", value)])
    };
    let set = run("lanes");
    let stdout = String::from_utf8_lossy(&set.stdout);
    assert!(set.status.success() && stdout.contains("note: GEMM broadcast: lanes (set by CNNC_BROADCAST)"), "{stdout}");
    let bad = run("wide");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{err}");
    assert!(err.contains("CNNC_BROADCAST=\"wide\"") && err.contains("\"mixed\"") && !err.contains("panicked"), "{err}");
}

#[test]
fn help_explains_the_command() {
    let help = cnnc_ok(["help", "bench"]);
    for needle in ["--batch", "--reps", "--threads", "--no-naive", "--no-reference", "--format", "Examples:", "FMA peak", "CNNC_BROADCAST"] {
        assert!(help.contains(needle), "help lacks {needle:?}:\n{help}");
    }
    assert!(cnnc_ok(["--help"]).contains("bench"));
}
