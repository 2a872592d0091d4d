//! Frozen layers in the JIT engine: with a frozen prefix, frozen middle layers, a frozen
//! batch norm over a trainable convolution, a frozen residual branch, and everything frozen,
//! the fused and naive engines agree with the reference interpreter (loss, running statistics,
//! the gradient of every trainable tensor) and give exact zeros for frozen tensors, while
//! allocating no gradient buffers and running no backward step below the lowest trainable
//! layer (the per-group profile shows which ran). A store that trains a
//! layer the compiled graph froze is a clear error.

mod common;

use cnnc_compiler::cost::analyze;
use cnnc_compiler::ir::*;
use common::*;
use cnnc_compiler::plan::Fusion;
use cnnc_runtime::engine::{Engine, ReferenceEngine};
use cnnc_runtime::exec::JitEngine;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// LeNet-5 on an odd 1x17x15 image (sizes kept small so the test is fast).
fn lenet() -> Graph {
    let mut g = Graph::new("lenet");
    let x = g.input("input", Shape::chw(1, 17, 15)).unwrap();
    let c1 = g.add("conv1", Op::Conv2d(conv(6, 5).pad(Padding::uniform(2))), &[x]).unwrap();
    let r1 = g.add("relu1", relu(), &[c1]).unwrap();
    let p1 = g.add("pool1", Op::Pool(Pool2d::new(PoolKind::Max, 2, 2)), &[r1]).unwrap();
    let c2 = g.add("conv2", Op::Conv2d(conv(16, 3)), &[p1]).unwrap();
    let r2 = g.add("relu2", relu(), &[c2]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[r2]).unwrap();
    let d1 = g.add("fc1", dense(30), &[f]).unwrap();
    let a1 = g.add("relu3", relu(), &[d1]).unwrap();
    let d2 = g.add("fc2", dense(21), &[a1]).unwrap();
    let a2 = g.add("relu4", relu(), &[d2]).unwrap();
    g.add("fc3", dense(7), &[a2]).unwrap();
    g
}

/// conv-bn-relu, strided conv-bn-relu, avg pool, dropout, dense.
fn vgg() -> Graph {
    let mut g = Graph::new("vgg");
    let x = g.input("input", Shape::chw(3, 9, 11)).unwrap();
    let r1 = conv_bn_relu(&mut g, 1, conv(8, 3).pad(Padding::uniform(1)).bias(false), x);
    let r2 = conv_bn_relu(&mut g, 2, conv(12, 3).stride(2), r1);
    let mut ap = Pool2d::new(PoolKind::Avg, 2, 1);
    ap.padding = Padding::uniform(1);
    let p2 = g.add("pool2", Op::Pool(ap), &[r2]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[p2]).unwrap();
    let d0 = g.add("drop1", Op::Dropout { p: 0.3 }, &[f]).unwrap();
    g.add("fc", dense(5), &[d0]).unwrap();
    g
}

/// Stem, a projection block (a residual join of two conv branches), global pool, head.
fn resnet() -> Graph {
    let mut g = Graph::new("resnet");
    let x = g.input("input", Shape::chw(3, 7, 9)).unwrap();
    let c = |n| Op::Conv2d(conv(n, 3).pad(Padding::uniform(1)).bias(false));
    let s = g.add("stem", c(6), &[x]).unwrap();
    let sb = g.add("bn0", bn(), &[s]).unwrap();
    let r0 = g.add("relu0", relu(), &[sb]).unwrap();
    let a = g.add("b.conv1", Op::Conv2d(conv(10, 3).stride(2).pad(Padding::uniform(1)).bias(false)), &[r0]).unwrap();
    let a = g.add("b.bn1", bn(), &[a]).unwrap();
    let a = g.add("b.relu1", relu(), &[a]).unwrap();
    let a = g.add("b.conv2", c(10), &[a]).unwrap();
    let a = g.add("b.bn2", bn(), &[a]).unwrap();
    let p = g.add("b.proj", Op::Conv2d(conv(10, 1).stride(2).bias(false)), &[r0]).unwrap();
    let p = g.add("b.bnp", bn(), &[p]).unwrap();
    let a = g.add("b.add", Op::Add, &[a, p]).unwrap();
    let r = g.add("b.relu2", relu(), &[a]).unwrap();
    let gp = g.add("gap", Op::GlobalAvgPool, &[r]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[gp]).unwrap();
    g.add("fc", dense(6), &[f]).unwrap();
    g
}

fn freeze(g: &Graph, layers: &[&str]) -> Graph {
    let mut g = g.clone();
    for l in layers {
        let id = g.find(l).unwrap_or_else(|e| panic!("{e}"));
        g.node_mut(id).trainable = false;
    }
    g
}

/// One training step with each engine from the same parameters on random data: the JIT
/// engines match the reference on every trainable tensor and leave frozen ones at exactly
/// zero. Returns the fused engine's buffer bytes.
fn check(g: &Graph, compiled: usize, n: usize, seed: u64) -> usize {
    let shape = g.node(g.inputs()[0]).shape;
    let k = g.node(g.outputs()[0]).shape.numel();
    let mut rng = StdRng::seed_from_u64(seed);
    let x: Vec<f32> = (0..n * shape.numel())
        .map(|_| {
            let v: f32 = rng.random_range(0.1..2.0);
            if rng.random_bool(0.5) { v } else { -v }
        })
        .collect();
    let labels: Vec<usize> = (0..n).map(|_| rng.random_range(0..k)).collect();
    let params0 = params_for(g, seed);
    let mut reference = ReferenceEngine::new(g.clone(), Loss::SoftmaxCrossEntropy);
    let mut pr = params0.clone();
    let mut gr = pr.zeros_like();
    let sr = reference.train_step(&mut pr, &mut gr, &x, &labels, 11).unwrap();
    let floor = 1e-2 * gr.flat().iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
    let mut bytes = 0;
    for fusion in [Fusion::Full, Fusion::None] {
        let mut jit = JitEngine::new(g, Loss::SoftmaxCrossEntropy, compiled, fusion).unwrap_or_else(|e| panic!("{fusion:?}: {e}"));
        if fusion == Fusion::Full {
            bytes = jit.buffer_bytes();
        }
        let mut pj = params0.clone();
        // Garbage in the gradient store: train_step must overwrite every tensor.
        let mut gj = pj.zeros_like();
        gj.flat_mut().iter_mut().for_each(|v| *v = 9.0);
        let sj = jit.train_step(&mut pj, &mut gj, &x, &labels, 11).unwrap_or_else(|e| panic!("{fusion:?}: {e}"));
        let what = format!("{} {fusion:?} n={n}", g.name);
        let lrel = (sj.loss_sum - sr.loss_sum).abs() / sr.loss_sum.abs().max(1e-6);
        assert!(lrel < 1e-4, "{what}: loss {} vs {}", sj.loss_sum, sr.loss_sum);
        for info in pr.infos() {
            let (a, b) = (gj.slice(&info.name).unwrap(), gr.slice(&info.name).unwrap());
            if info.is_trainable() {
                assert!(b.iter().any(|&v| v != 0.0), "{what}: reference gradient of trainable {} is zero", info.name);
                let e = rel_floor(a, b, floor);
                assert!(e < 2e-3, "{what}: gradient of {} off by {e:.2e}", info.name);
            } else {
                assert!(a.iter().all(|&v| v == 0.0), "{what}: frozen {} has a non-zero gradient", info.name);
                assert!(b.iter().all(|&v| v == 0.0), "{what}: reference: frozen {} has a non-zero gradient", info.name);
            }
            let e = rel_floor(pj.slice(&info.name).unwrap(), pr.slice(&info.name).unwrap(), 1e-6);
            assert!(e < 1e-4, "{what}: parameter/running stat {} off by {e:.2e}", info.name);
        }
    }
    bytes
}

#[test]
fn lenet_frozen_prefix_middle_and_head() {
    let g = lenet();
    let all = check(&g, 5, 5, 1);
    // The features (course recipe: retrain the head).
    let features = check(&freeze(&g, &["conv1", "conv2"]), 5, 5, 2);
    // Everything but the head.
    let head_only = check(&freeze(&g, &["conv1", "conv2", "fc1", "fc2"]), 4, 3, 3);
    // Frozen middle layers: gradients flow through conv2 and fc1 to conv1 (their input
    // gradient kernels run, their weight gradient kernels do not).
    let middle = check(&freeze(&g, &["conv2", "fc1"]), 5, 1, 4);
    // Only the first layer frozen: its weight kernel goes, nothing else changes.
    check(&freeze(&g, &["conv1"]), 3, 3, 5);
    // No gradient buffers at or below the lowest trainable layer.
    assert!(features < all, "frozen features: {features} buffer bytes vs {all} training everything");
    assert!(head_only < features, "{head_only} vs {features}");
    assert_eq!(middle, all, "a frozen middle still needs every gradient buffer");
}

#[test]
fn vgg_frozen_batch_norm_and_prefix() {
    let g = vgg();
    // bn1 frozen over a trainable conv1: bn1's input gradient runs, its gamma/beta get none.
    check(&freeze(&g, &["bn1"]), 3, 3, 6);
    // conv1 frozen under a trainable bn1: bn1 trains, its throw-away input gradient is not
    // stored anywhere (conv1's output needs no gradient).
    check(&freeze(&g, &["conv1"]), 3, 3, 7);
    check(&freeze(&g, &["conv1", "bn1", "conv2"]), 4, 3, 8);
}

#[test]
fn resnet_frozen_stem_and_branch() {
    let g = resnet();
    check(&freeze(&g, &["stem", "bn0"]), 3, 3, 9);
    // One residual branch frozen, the other trains: the stem still gets its gradient through
    // the frozen projection and the trainable branch.
    check(&freeze(&g, &["b.proj", "b.bnp"]), 3, 3, 10);
    // Only the head trains.
    check(&freeze(&g, &["stem", "bn0", "b.conv1", "b.bn1", "b.conv2", "b.bn2", "b.proj", "b.bnp"]), 3, 2, 11);
}

#[test]
fn everything_frozen_gives_zero_gradients() {
    let g = lenet();
    let layers: Vec<String> = g.nodes().filter(|&n| g.node(n).op.has_params()).map(|n| g.node(n).name.clone()).collect();
    let g = freeze(&g, &layers.iter().map(String::as_str).collect::<Vec<_>>());
    let mut jit = JitEngine::new(&g, Loss::SoftmaxCrossEntropy, 2, Fusion::Full).unwrap();
    let mut p = params_for(&g, 12);
    assert_eq!(p.num_trainable(), 0);
    let mut gr = p.zeros_like();
    gr.flat_mut().fill(1.0);
    let x: Vec<f32> = (0..2 * 17 * 15).map(|i| ((i * 31 % 97) as f32 / 40.0) - 1.2).collect();
    let s = jit.train_step(&mut p, &mut gr, &x, &[1, 6], 0).unwrap();
    assert!(s.loss_sum > 0.0 && s.loss_sum.is_finite());
    assert!(gr.flat().iter().all(|&v| v == 0.0));
}

#[test]
fn store_training_a_layer_the_graph_froze_is_an_error() {
    let g = freeze(&lenet(), &["conv1", "conv2"]);
    let mut jit = JitEngine::new(&g, Loss::SoftmaxCrossEntropy, 2, Fusion::Full).unwrap();
    // A store built for the unfrozen graph says conv1 trains.
    let mut p = params_for(&lenet(), 13);
    let mut gr = p.zeros_like();
    let x = vec![0.5f32; 2 * 17 * 15];
    let e = jit.train_step(&mut p, &mut gr, &x, &[0, 1], 0).unwrap_err().to_string();
    assert!(e.contains("layer `conv1` is frozen in the compiled graph") && e.contains("set_layer_trainable"), "{e}");
    // Freezing it in the store fixes it; the converse (graph trains, store frozen) is fine.
    p.set_layer_trainable("conv1", false);
    p.set_layer_trainable("conv2", false);
    p.set_layer_trainable("fc1", false);
    jit.train_step(&mut p, &mut gr, &x, &[0, 1], 0).unwrap();
    assert!(gr.slice("fc1.weight").unwrap().iter().all(|&v| v == 0.0));
    assert!(gr.slice("fc2.weight").unwrap().iter().any(|&v| v != 0.0));
}

#[test]
fn cost_report_and_engine_share_the_rule() {
    // The report's saved backward FLOPs are positive exactly when the engine drops buffers.
    let g = lenet();
    let f = freeze(&g, &["conv1", "conv2"]);
    let (full, frozen) = (analyze(&g, 8), analyze(&f, 8));
    assert_eq!(full.backward_flops_saved, 0);
    assert_eq!(frozen.backward_flops_saved, full.totals.flops.backward.total() - frozen.totals.flops.backward.total());
    // Everything below fc1 (the lowest trainable layer) costs nothing in backward.
    for l in &frozen.layers {
        if ["conv1", "relu1", "pool1", "conv2", "relu2", "flatten"].contains(&l.name.as_str()) {
            assert_eq!(l.counts.flops.backward.total(), 0, "{}", l.name);
        }
    }
    let ng = f.needs_grad();
    let names: Vec<_> = f.nodes().filter(|n| ng[n.index()]).map(|n| f.node(n).name.clone()).collect();
    assert_eq!(names, ["fc1", "relu3", "fc2", "relu4", "fc3"]);
}

#[test]
fn dropped_backward_steps_do_not_run() {
    // Not a timing test: the engine's per-group profile shows which backward steps ran at
    // all. Below the lowest trainable layer (fc1) no step runs; from fc1 up every one does.
    for fusion in [Fusion::Full, Fusion::None] {
        let g = freeze(&lenet(), &["conv1", "conv2"]);
        let mut jit = JitEngine::new(&g, Loss::SoftmaxCrossEntropy, 4, fusion).unwrap();
        let mut p = params_for(&g, 14);
        let mut gr = p.zeros_like();
        let x: Vec<f32> = (0..4 * 17 * 15).map(|i| ((i * 29 % 83) as f32 / 30.0) - 1.3).collect();
        jit.set_profiling(true);
        jit.train_step(&mut p, &mut gr, &x, &[0, 3, 6, 2], 0).unwrap();
        let plan = jit.plan(true);
        let ng = plan.graph.needs_grad();
        let (mut ran, mut skipped) = (Vec::new(), Vec::new());
        for (group, t) in plan.groups.iter().zip(jit.profile(true)) {
            let name = plan.graph.node(group.anchor()).name.clone();
            assert!(t.forward > std::time::Duration::ZERO, "{fusion:?}: {name} forward did not run");
            if ng[group.output().index()] {
                ran.push(name);
            } else {
                assert_eq!(t.backward, std::time::Duration::ZERO, "{fusion:?}: backward of {name} ran below the lowest trainable layer");
                skipped.push(name);
            }
        }
        assert!(skipped.iter().any(|n| n == "conv1") && skipped.iter().any(|n| n == "conv2") && skipped.iter().any(|n| n == "pool1"), "{fusion:?}: {skipped:?}");
        assert!(ran.iter().any(|n| n == "fc1") && ran.iter().any(|n| n == "fc3"), "{fusion:?}: {ran:?}");
        assert!(!ran.iter().any(|n| n.starts_with("conv")), "{fusion:?}: {ran:?}");
    }
}
