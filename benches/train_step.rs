//! Training-step benchmark: LeNet-5 at batch 64 and a small CIFAR-size inception net at batch
//! 32, `JitEngine` fused (blocked kernels, `Fusion::Full`) vs naive (`Fusion::None`, naive
//! kernels) vs the reference interpreter. Prints the median of several steps per engine (and
//! inference medians), plus compile times. Run: `cargo bench --bench train_step`
//! (`TRAIN_STEP_ITERS=n` changes the number of timed steps).

use cnnc_compiler::ir::*;
use cnnc_compiler::plan::Fusion;
use cnnc_runtime::engine::{Engine, ReferenceEngine};
use cnnc_runtime::exec::JitEngine;
use cnnc_runtime::init::InitConfig;
use cnnc_runtime::params::ParamStore;
use std::time::Instant;

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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench(g: &Graph, batch: usize, iters: usize) {
    let loss = Loss::SoftmaxCrossEntropy;
    let params0 = ParamStore::<f32>::for_graph(g, &InitConfig::pytorch(), 1).unwrap();
    let per = g.node(g.inputs()[0]).shape.numel();
    let x: Vec<f32> = (0..batch * per).map(|i| ((i * 7919 % 1009) as f32 / 504.5) - 1.0).collect();
    let labels: Vec<usize> = (0..batch).map(|i| i % 10).collect();
    let threads = JitEngine::new(g, loss, 1, Fusion::None).map(|e| e.threads()).unwrap_or(1);
    println!("\n{} (batch {batch}, {threads} threads)", g.name);
    println!("{:<12} {:>12} {:>14} {:>14} {:>10}", "engine", "compile ms", "train step ms", "infer ms", "speed-up");
    let mut rows = Vec::new();
    let mut engines: Vec<(Box<dyn Engine>, f64, usize)> = Vec::new();
    for fusion in [Fusion::Full, Fusion::None] {
        let e = JitEngine::new(g, loss, batch, fusion).unwrap();
        let ct = e.compile_time().as_secs_f64() * 1e3;
        engines.push((Box::new(e), ct, iters));
    }
    engines.push((Box::new(ReferenceEngine::new(g.clone(), loss)), 0.0, iters.div_ceil(3).max(1)));
    for (mut e, ct, it) in engines {
        let (mut p, mut gr) = (params0.clone(), params0.zeros_like());
        e.train_step(&mut p, &mut gr, &x, &labels, 0).unwrap();
        let mut t = Vec::new();
        for i in 0..it {
            let t0 = Instant::now();
            e.train_step(&mut p, &mut gr, &x, &labels, i as u64).unwrap();
            t.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        let mut ti = Vec::new();
        for _ in 0..it {
            let t0 = Instant::now();
            e.infer(&p, &x, batch).unwrap();
            ti.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        rows.push((e.name().to_string(), ct, median(t), median(ti)));
    }
    let reference = rows.last().map(|r| r.2).unwrap_or(1.0);
    for (name, ct, t, ti) in rows {
        let ct = if name == "reference" { "-".to_string() } else { format!("{ct:.1}") };
        println!("{name:<12} {ct:>12} {t:>14.2} {ti:>14.2} {:>9.1}x", reference / t);
    }
}

fn main() {
    let iters = std::env::var("TRAIN_STEP_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(7);
    bench(&lenet(), 64, iters);
    bench(&inception(), 32, iters);
}
