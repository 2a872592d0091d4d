//! Training-step benchmark: LeNet-5 at batch 64 and a small CIFAR-size inception net at batch
//! 32. First the tables of `cnnc_runtime::bench` (what `cnnc bench` prints): `JitEngine` fused
//! (blocked kernels, `Fusion::Full`) vs naive (`Fusion::None`, naive kernels) vs the reference
//! interpreter, inference and training step, medians of repeated runs, GFLOP/s and fraction of
//! the 128-bit FMA peak measured in the same run, memory, one row per fused group. Then
//! criterion timings of the fused training step.
//!
//! Run: `cargo bench --bench train_step` (`-- --report-only` prints only the tables;
//! `TRAIN_STEP_ITERS=n` changes the number of timed steps of the tables, default 7).

use cnnc_compiler::ir::*;
use cnnc_compiler::plan::Fusion;
use cnnc_runtime::bench::{self, BenchConfig};
use cnnc_runtime::engine::Engine;
use cnnc_runtime::exec::JitEngine;
use cnnc_runtime::init::InitConfig;
use cnnc_runtime::params::ParamStore;
use criterion::{Criterion, Throughput};

fn relu() -> Op {
    Op::Act(Activation::Relu)
}

fn lenet() -> Graph {
    let mut g = Graph::new("lenet5");
    let x = g.input("input", Shape::chw(1, 28, 28)).unwrap();
    let c1 = g.add("conv1", Op::Conv2d(Conv2d::new(6, [5, 5]).pad(Padding::uniform(2))), &[x]).unwrap();
    let r1 = g.add("relu1", relu(), &[c1]).unwrap();
    let p1 = g.add("pool1", Op::Pool(Pool2d::new(PoolKind::Max, 2, 2)), &[r1]).unwrap();
    let c2 = g.add("conv2", Op::Conv2d(Conv2d::new(16, [5, 5])), &[p1]).unwrap();
    let r2 = g.add("relu2", relu(), &[c2]).unwrap();
    let p2 = g.add("pool2", Op::Pool(Pool2d::new(PoolKind::Max, 2, 2)), &[r2]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[p2]).unwrap();
    let d1 = g.add("fc1", Op::Dense(Dense { out_features: 120, bias: true }), &[f]).unwrap();
    let a1 = g.add("relu3", relu(), &[d1]).unwrap();
    let d2 = g.add("fc2", Op::Dense(Dense { out_features: 84, bias: true }), &[a1]).unwrap();
    let a2 = g.add("relu4", relu(), &[d2]).unwrap();
    g.add("fc3", Op::Dense(Dense { out_features: 10, bias: true }), &[a2]).unwrap();
    g
}

/// conv-bn-relu stem, two inception modules (1x1 / 1x1->3x3 / pool->1x1 branches, each
/// conv-bn-relu), max pool between them, global pooling, dense head.
fn inception() -> Graph {
    let mut g = Graph::new("mini_inception");
    let x = g.input("input", Shape::chw(3, 32, 32)).unwrap();
    let cbr = |g: &mut Graph, name: &str, x: NodeId, c: usize, k: usize| {
        let pad = if k > 1 { Padding::Same } else { Padding::Valid };
        let y = g.add(format!("{name}.conv"), Op::Conv2d(Conv2d::new(c, [k, k]).pad(pad).bias(false)), &[x]).unwrap();
        let y = g.add(format!("{name}.bn"), Op::BatchNorm(BatchNorm::default()), &[y]).unwrap();
        g.add(format!("{name}.relu"), relu(), &[y]).unwrap()
    };
    let module = |g: &mut Graph, name: &str, x: NodeId, c: usize| {
        let a = cbr(g, &format!("{name}.b1"), x, c, 1);
        let b = cbr(g, &format!("{name}.b2a"), x, c / 2, 1);
        let b = cbr(g, &format!("{name}.b2b"), b, c, 3);
        let mut mp = Pool2d::new(PoolKind::Max, 3, 1);
        mp.padding = Padding::Same;
        let p = g.add(format!("{name}.pool"), Op::Pool(mp), &[x]).unwrap();
        let p = cbr(g, &format!("{name}.b3"), p, c / 2, 1);
        g.add(format!("{name}.cat"), Op::Concat, &[a, b, p]).unwrap()
    };
    let s = cbr(&mut g, "stem", x, 32, 3);
    let m = module(&mut g, "inc1", s, 32);
    let p = g.add("pool", Op::Pool(Pool2d::new(PoolKind::Max, 2, 2)), &[m]).unwrap();
    let m = module(&mut g, "inc2", p, 48);
    let gp = g.add("gap", Op::GlobalAvgPool, &[m]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[gp]).unwrap();
    g.add("fc", Op::Dense(Dense { out_features: 10, bias: true }), &[f]).unwrap();
    g
}

fn main() {
    let reps = std::env::var("TRAIN_STEP_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    let cases = [(lenet(), 64), (inception(), 32)];
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
