//! Training-step benchmark: LeNet-5 (`examples/models/lenet5.cnn`) at batch 64 and the
//! CIFAR-size inception net of issue 4 (`examples/models/cifar_inception.cnn`: factored
//! inception modules and a bottleneck residual block, 190k params, 72M MACs) at batch 32. First the tables of `cnnc_runtime::bench` (what `cnnc bench` prints): `JitEngine` fused
//! (blocked kernels, `Fusion::Full`) vs naive (`Fusion::None`, naive kernels) vs the reference
//! interpreter, inference and training step, medians of repeated runs, GFLOP/s and fraction of
//! the 128-bit FMA peak measured in the same run, memory, one row per fused group. Then
//! criterion timings of the fused training step.
//!
//! Run: `cargo bench --bench train_step` (`-- --report-only` prints only the tables;
//! `TRAIN_STEP_ITERS=n` changes the number of timed steps of the tables, default 7).

use cnnc_compiler::ir::*;
use cnnc_compiler::lang;
use cnnc_compiler::plan::Fusion;
use cnnc_runtime::bench::{self, BenchConfig};
use cnnc_runtime::engine::Engine;
use cnnc_runtime::exec::JitEngine;
use cnnc_runtime::init::InitConfig;
use cnnc_runtime::params::ParamStore;
use criterion::{Criterion, Throughput};

/// A model of the zoo (`examples/models/FILE`).
fn model(file: &str, name: &str) -> Graph {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/models").join(file);
    lang::load_file(&path).expect("model file").expand(name).expect("model")
}

fn main() {
    let reps = std::env::var("TRAIN_STEP_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    // The cases: LeNet-5 at batch 64, the CIFAR-size inception net at batch 32.
    let cases = [(model("lenet5.cnn", "LeNet5"), 64), (model("cifar_inception.cnn", "CifarInception"), 32)];
    for (i, (g, batch)) in cases.iter().enumerate() {
        let cfg = BenchConfig { batch: *batch, reps, ..BenchConfig::default() };
        let r = bench::run(g, &cfg, &mut |_| {}).expect("benchmark");
        if i > 0 {
            println!();
        }
        print!("{}", r.render_table());
    }
    if std::env::args().any(|a| a == "--report-only") {
        return;
    }
    let mut crit = Criterion::default().sample_size(10).configure_from_args();
    let loss = Loss::SoftmaxCrossEntropy;
    for (g, batch) in &cases {
        let batch = *batch;
        let mut e = JitEngine::new(g, loss, batch, Fusion::Full).expect("compile");
        let mut p = ParamStore::<f32>::for_graph(g, &InitConfig::pytorch(), 1).expect("params");
        let mut gr = p.zeros_like();
        let x = cnnc_compiler::lower::report::fill(batch * g.node(g.inputs()[0]).shape.numel(), 1);
        let labels: Vec<usize> = (0..batch).map(|i| i % 10).collect();
        let c = cnnc_compiler::cost::analyze(g, batch);
        let mut group = crit.benchmark_group(format!("{} b{batch}", g.name));
        group.throughput(Throughput::Elements(c.totals.flops.forward + c.totals.flops.backward.total()));
        group.bench_function("fused train step", |b| b.iter(|| e.train_step(&mut p, &mut gr, &x, &labels, 0).expect("step")));
        group.finish();
    }
    crit.final_summary();
}
