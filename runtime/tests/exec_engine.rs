//! `JitEngine` (fused and naive) against `ReferenceEngine`: loss, every parameter gradient,
//! running statistics and inference logits, on random non-zero inputs and parameters, for
//! LeNet-5, a VGG-style conv-bn-relu-pool-dropout-dense net, residual blocks (identity,
//! projection, bn-free fused residual, residuals of a conv's or batch norm's own input), an inception module with in-place concat (conv, relu'd
//! conv and bare pool branches), fallback ops (LRN, SE channel_mul, softmax), hinge loss, odd
//! batch sizes (1, 3) and odd image sizes, stride 2, asymmetric padding; plus error cases.

mod common;

use cnnc_compiler::ir::*;
use common::*;
use cnnc_compiler::plan::Fusion;
use cnnc_runtime::engine::{Engine, ReferenceEngine};
use cnnc_compiler::lower::{DenseKernels, FusedAct};
use cnnc_runtime::exec::JitEngine;
use cnnc_runtime::init::InitConfig;
use cnnc_runtime::params::ParamStore;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn rel(a: &[f32], b: &[f32]) -> f64 {
    rel_floor(a, b, 1e-6)
}

/// Train two steps (to exercise buffer reuse) with each engine from the same parameters, with
/// an inference between them, and compare against the reference after each step; then compare
/// inference logits.
fn check(g: &Graph, loss: Loss, compiled: usize, n: usize, seed: u64) {
    let shape = g.node(g.inputs()[0]).shape;
    let k = g.node(g.outputs()[0]).shape.numel();
    let mut rng = StdRng::seed_from_u64(seed);
    let params0 = params_for(g, seed);
    for fusion in [Fusion::Full, Fusion::None] {
        let mut jit = JitEngine::new(g, loss, compiled, fusion).unwrap_or_else(|e| panic!("{fusion:?}: {e}"));
        let mut reference = ReferenceEngine::new(g.clone(), loss);
        let (mut pj, mut pr) = (params0.clone(), params0.clone());
        let (mut gj, mut gr) = (pj.zeros_like(), pr.zeros_like());
        for step in 0..2 {
            let x: Vec<f32> = (0..n * shape.numel())
                .map(|_| {
                    let v: f32 = rng.random_range(0.1..2.0);
                    if rng.random_bool(0.5) { v } else { -v }
                })
                .collect();
            let labels: Vec<usize> = (0..n).map(|_| rng.random_range(0..k)).collect();
            let sj = jit.train_step(&mut pj, &mut gj, &x, &labels, 7 + step).unwrap_or_else(|e| panic!("{fusion:?}: {e}"));
            let sr = reference.train_step(&mut pr, &mut gr, &x, &labels, 7 + step).unwrap();
            let what = format!("{} {fusion:?} n={n} step {step}", g.name);
            assert_eq!(sj.count, n);
            assert_eq!(sj.correct, sr.correct, "{what}: accuracy");
            let lrel = (sj.loss_sum - sr.loss_sum).abs() / sr.loss_sum.abs().max(1e-6);
            assert!(lrel < 1e-4, "{what}: loss {} vs {}", sj.loss_sum, sr.loss_sum);
            assert!(sr.loss_sum > 0.0);
            let mut nonzero = 0;
            // 1% of the largest gradient anywhere: the floor for (near-)zero gradient tensors.
            let floor = 1e-2 * gr.flat().iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64));
            for info in pr.infos() {
                let (a, b) = (gj.slice(&info.name).unwrap(), gr.slice(&info.name).unwrap());
                if b.iter().any(|&v| v != 0.0) {
                    nonzero += 1;
                }
                let e = rel_floor(a, b, floor);
                assert!(e < 2e-3, "{what}: gradient of {} off by {e:.2e}\njit {:?}\nref {:?}", info.name, &a[..a.len().min(8)], &b[..b.len().min(8)]);
                let e = rel(pj.slice(&info.name).unwrap(), pr.slice(&info.name).unwrap());
                assert!(e < 1e-4, "{what}: parameter/running stat {} off by {e:.2e}", info.name);
            }
            assert!(nonzero > 0, "{what}: all gradients zero");
            // Same parameters for the next step (running stats agree to ~1e-6 already).
            pj = pr.clone();
            // Inference between training steps: it borrows the training program's value
            // buffers, which the next step must get back intact (max pooling's argmax buffers
            // are the training program's own: inference records no winners).
            if step == 0 {
                let e = rel(&jit.infer(&pj, &x, n).unwrap(), &reference.infer(&pr, &x, n).unwrap());
                assert!(e < 1e-4, "{what}: inference between training steps off by {e:.2e}");
            }
        }
        let x: Vec<f32> = (0..n * shape.numel()).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) + 0.013).collect();
        let lj = jit.infer(&pr, &x, n).unwrap();
        let lr = reference.infer(&pr, &x, n).unwrap();
        let e = rel(&lj, &lr);
        assert!(e < 1e-4, "{} {fusion:?}: inference logits off by {e:.2e}", g.name);
    }
}

fn lenet() -> Graph {
    let mut g = Graph::new("lenet5");
    let x = g.input("input", Shape::chw(1, 28, 28)).unwrap();
    let c1 = g.add("conv1", Op::Conv2d(conv(6, 5).pad(Padding::uniform(2))), &[x]).unwrap();
    let r1 = g.add("relu1", relu(), &[c1]).unwrap();
    let p1 = g.add("pool1", maxpool(2, 2), &[r1]).unwrap();
    let c2 = g.add("conv2", Op::Conv2d(conv(16, 5)), &[p1]).unwrap();
    let r2 = g.add("relu2", relu(), &[c2]).unwrap();
    let p2 = g.add("pool2", maxpool(2, 2), &[r2]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[p2]).unwrap();
    let d1 = g.add("fc1", dense(120), &[f]).unwrap();
    let a1 = g.add("relu3", relu(), &[d1]).unwrap();
    let d2 = g.add("fc2", dense(84), &[a1]).unwrap();
    let a2 = g.add("relu4", relu(), &[d2]).unwrap();
    g.add("fc3", dense(10), &[a2]).unwrap();
    g
}

/// conv-bn-relu-pool twice (odd 9x11 input, stride 2, asymmetric padding), dropout, dense head.
fn vgg() -> Graph {
    let mut g = Graph::new("vgg");
    let x = g.input("input", Shape::chw(3, 9, 11)).unwrap();
    let r1 = conv_bn_relu(&mut g, 1, conv(8, 3).pad(Padding::uniform(1)).bias(false), x);
    let mut mp = Pool2d::new(PoolKind::Max, 2, 2);
    mp.ceil_mode = true;
    let p1 = g.add("pool1", Op::Pool(mp), &[r1]).unwrap();
    let c2 = Conv2d::new(12, [3, 3]).stride(2).pad(Padding::Explicit { top: 0, bottom: 1, left: 1, right: 0 });
    let r2 = conv_bn_relu(&mut g, 2, c2, p1);
    let mut ap = Pool2d::new(PoolKind::Avg, 2, 1);
    ap.padding = Padding::uniform(1);
    let p2 = g.add("pool2", Op::Pool(ap), &[r2]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[p2]).unwrap();
    let d0 = g.add("drop1", Op::Dropout { p: 0.4 }, &[f]).unwrap();
    let d1 = g.add("fc1", dense(24), &[d0]).unwrap();
    let a1 = g.add("relu3", relu(), &[d1]).unwrap();
    let d2 = g.add("drop2", Op::Dropout { p: 0.5 }, &[a1]).unwrap();
    g.add("fc2", dense(5), &[d2]).unwrap();
    g
}

/// Stem, an identity basic block, a projection block (stride 2), a bn-free residual, head.
fn resnet() -> Graph {
    let mut g = Graph::new("resnet");
    let x = g.input("input", Shape::chw(3, 7, 9)).unwrap();
    let c = |n| Op::Conv2d(conv(n, 3).pad(Padding::uniform(1)).bias(false));
    let s = g.add("stem", c(6), &[x]).unwrap();
    let sb = g.add("bn0", bn(), &[s]).unwrap();
    let r0 = g.add("relu0", relu(), &[sb]).unwrap();
    // identity block
    let a = g.add("b1.conv1", c(6), &[r0]).unwrap();
    let a = g.add("b1.bn1", bn(), &[a]).unwrap();
    let a = g.add("b1.relu1", relu(), &[a]).unwrap();
    let a = g.add("b1.conv2", c(6), &[a]).unwrap();
    let a = g.add("b1.bn2", bn(), &[a]).unwrap();
    let a = g.add("b1.add", Op::Add, &[a, r0]).unwrap();
    let r1 = g.add("b1.relu2", relu(), &[a]).unwrap();
    // projection block, stride 2
    let a = g.add("b2.conv1", Op::Conv2d(conv(10, 3).stride(2).pad(Padding::uniform(1)).bias(false)), &[r1]).unwrap();
    let a = g.add("b2.bn1", bn(), &[a]).unwrap();
    let a = g.add("b2.relu1", relu(), &[a]).unwrap();
    let a = g.add("b2.conv2", c(10), &[a]).unwrap();
    let a = g.add("b2.bn2", bn(), &[a]).unwrap();
    let p = g.add("b2.proj", Op::Conv2d(conv(10, 1).stride(2).bias(false)), &[r1]).unwrap();
    let p = g.add("b2.bnp", bn(), &[p]).unwrap();
    let a = g.add("b2.add", Op::Add, &[a, p]).unwrap();
    let r2 = g.add("b2.relu2", relu(), &[a]).unwrap();
    // residual without batch norm: conv + add + leaky relu fused in the conv epilogue
    let a = g.add("b3.conv", Op::Conv2d(conv(10, 3).pad(Padding::Same)), &[r2]).unwrap();
    let a = g.add("b3.add", Op::Add, &[a, r2]).unwrap();
    let r3 = g.add("b3.leaky", Op::Act(Activation::LeakyRelu { slope: 0.1 }), &[a]).unwrap();
    let gp = g.add("gap", Op::GlobalAvgPool, &[r3]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[gp]).unwrap();
    g.add("fc", dense(6), &[f]).unwrap();
    g
}

/// Residuals of a group's own input: `relu(conv(x) + x)` (a direct kernel, 11 pixels wide,
/// whose backward data may store its input gradient, but the fused add's gradient reaches
/// `x` first) and `relu(bn(c) + c)` (the batch norm's input is also the add's other operand).
fn self_residuals() -> Graph {
    let mut g = Graph::new("self_residuals");
    let x = g.input("input", Shape::chw(3, 6, 11)).unwrap();
    let c = |n| Op::Conv2d(conv(n, 3).pad(Padding::uniform(1)).bias(false));
    let s = g.add("stem", c(6), &[x]).unwrap();
    let s = g.add("bn0", bn(), &[s]).unwrap();
    let r0 = g.add("relu0", relu(), &[s]).unwrap();
    let a = g.add("a.conv", c(6), &[r0]).unwrap();
    let a = g.add("a.add", Op::Add, &[a, r0]).unwrap();
    let r1 = g.add("a.relu", relu(), &[a]).unwrap();
    let c2 = g.add("b.conv", c(6), &[r1]).unwrap();
    let b = g.add("b.bn", bn(), &[c2]).unwrap();
    let b = g.add("b.add", Op::Add, &[b, c2]).unwrap();
    let r2 = g.add("b.relu", relu(), &[b]).unwrap();
    let gp = g.add("gap", Op::GlobalAvgPool, &[r2]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[gp]).unwrap();
    g.add("fc", dense(5), &[f]).unwrap();
    g
}

/// An inception module: 1x1 (bn-relu'd: training batch norm writing its channel slice),
/// 1x1->3x3 (relu'd), pool->1x1 and a bare avg-pool branch,
/// concatenated in place, then bn-relu on the concat, a 1x1 conv, global pooling and a head.
fn inception() -> Graph {
    let mut g = Graph::new("inception");
    let x = g.input("input", Shape::chw(3, 8, 7)).unwrap();
    let s = g.add("stem", Op::Conv2d(conv(8, 3).pad(Padding::uniform(1))), &[x]).unwrap();
    let s = g.add("stem_relu", relu(), &[s]).unwrap();
    let a = g.add("b1", Op::Conv2d(conv(4, 1)), &[s]).unwrap();
    let a = g.add("bn_b1", bn(), &[a]).unwrap();
    let a = g.add("b1_relu", relu(), &[a]).unwrap();
    let b = g.add("b2a", Op::Conv2d(conv(3, 1)), &[s]).unwrap();
    let b = g.add("b2a_relu", relu(), &[b]).unwrap();
    let b = g.add("b2b", Op::Conv2d(conv(5, 3).pad(Padding::Same)), &[b]).unwrap();
    let b = g.add("b2b_relu", relu(), &[b]).unwrap();
    let mut mp = Pool2d::new(PoolKind::Max, 3, 1);
    mp.padding = Padding::Same;
    let c = g.add("b3pool", Op::Pool(mp), &[s]).unwrap();
    let c = g.add("b3", Op::Conv2d(conv(2, 1)), &[c]).unwrap();
    let mut ap = Pool2d::new(PoolKind::Avg, 3, 1);
    ap.padding = Padding::Same;
    let d = g.add("b4pool", Op::Pool(ap), &[s]).unwrap();
    let cat = g.add("cat", Op::Concat, &[a, b, c, d]).unwrap();
    let y = g.add("bn_cat", bn(), &[cat]).unwrap();
    let y = g.add("relu_cat", relu(), &[y]).unwrap();
    let y = g.add("mix", Op::Conv2d(conv(6, 1)), &[y]).unwrap();
    let y = g.add("gap", Op::GlobalAvgPool, &[y]).unwrap();
    g.add("fc", dense(4), &[y]).unwrap();
    g
}

/// Two inception modules whose every branch ends in conv-bn-relu (the pool branch too), the
/// second reading the first's concatenation (its 1x1s' weight gradients and its max pool read
/// it in backward), then wider layers: the memory plan recomputes both concatenations slice by
/// slice, their memory holding other values in between.
fn inception_cbr() -> Graph {
    let mut g = Graph::new("inception_cbr");
    let x = g.input("input", Shape::chw(3, 7, 9)).unwrap();
    let mut y = g.add("stem", Op::Conv2d(conv(6, 3).pad(Padding::uniform(1))), &[x]).unwrap();
    for m in ["m1", "m2"] {
        let cbr = |g: &mut Graph, name: &str, c: usize, k: usize, x: NodeId| {
            let pad = if k > 1 { Padding::Same } else { Padding::uniform(0) };
            let v = g.add(format!("{m}.{name}"), Op::Conv2d(conv(c, k).pad(pad)), &[x]).unwrap();
            let v = g.add(format!("{m}.{name}_bn"), bn(), &[v]).unwrap();
            g.add(format!("{m}.{name}_relu"), relu(), &[v]).unwrap()
        };
        let a = cbr(&mut g, "b1", 3, 1, y);
        let b = cbr(&mut g, "b2a", 2, 1, y);
        let b = cbr(&mut g, "b2b", 5, 3, b);
        let mut mp = Pool2d::new(PoolKind::Max, 3, 1);
        mp.padding = Padding::Same;
        let c = g.add(format!("{m}.pool"), Op::Pool(mp), &[y]).unwrap();
        let c = cbr(&mut g, "b3", 2, 1, c);
        y = g.add(format!("{m}.cat"), Op::Concat, &[a, b, c]).unwrap();
    }
    // Wider values after the modules: they reuse the concatenations' memory.
    let y = g.add("post1", Op::Conv2d(conv(12, 1)), &[y]).unwrap();
    let y = g.add("post1_bn", bn(), &[y]).unwrap();
    let y = g.add("post1_relu", relu(), &[y]).unwrap();
    let y = g.add("post2", Op::Conv2d(conv(12, 3).pad(Padding::Same)), &[y]).unwrap();
    let y = g.add("gap", Op::GlobalAvgPool, &[y]).unwrap();
    g.add("fc", dense(4), &[y]).unwrap();
    g
}

/// Fallback ops (LRN, squeeze-excitation with channel_mul, softmax), non-fusable activations
/// after a convolution (tanh, sigmoid, elu), a copied concat (an operand used twice), bn after
/// a dense layer.
fn odd_ops() -> Graph {
    let mut g = Graph::new("odd");
    let x = g.input("input", Shape::chw(4, 5, 5)).unwrap();
    let c = g.add("conv1", Op::Conv2d(conv(6, 3).pad(Padding::uniform(1))), &[x]).unwrap();
    let t = g.add("tanh", Op::Act(Activation::Tanh), &[c]).unwrap();
    let l = g.add("lrn", Op::Lrn(Lrn { size: 3, alpha: 0.5, beta: 0.75, k: 1.0 }), &[t]).unwrap();
    let sq = g.add("se.gap", Op::GlobalAvgPool, &[l]).unwrap();
    let e = g.add("se.fc1", dense(3), &[sq]).unwrap();
    let e = g.add("se.elu", Op::Act(Activation::Elu { alpha: 1.0 }), &[e]).unwrap();
    let e = g.add("se.fc2", dense(6), &[e]).unwrap();
    let e = g.add("se.sigmoid", Op::Act(Activation::Sigmoid), &[e]).unwrap();
    let m = g.add("se.scale", Op::ChannelMul, &[l, e]).unwrap();
    let c2 = g.add("conv2", Op::Conv2d(conv(3, 1)), &[m]).unwrap();
    let cat = g.add("cat", Op::Concat, &[m, c2, m]).unwrap();
    let p = g.add("pool", Op::Pool(Pool2d::new(PoolKind::Avg, 2, 2)), &[cat]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[p]).unwrap();
    let d = g.add("fc1", dense(7), &[f]).unwrap();
    let b = g.add("bn1", bn(), &[d]).unwrap();
    let r = g.add("relu", relu(), &[b]).unwrap();
    let d = g.add("fc2", dense(5), &[r]).unwrap();
    g.add("softmax", Op::Softmax, &[d]).unwrap();
    g
}

/// A chain of convolution + activation groups, one activation each, whose masks run inside
/// the convolutions' backward data: odd 7x9 input, direct 3x3, 1x1, stride 2 with asymmetric
/// padding (col2im), 1x3, a 16->16 3x3 (Winograd), and a grouped convolution.
fn conv_acts() -> Graph {
    let mut g = Graph::new("conv_acts");
    let x = g.input("input", Shape::chw(3, 7, 9)).unwrap();
    let c = g.add("conv1", Op::Conv2d(conv(4, 3).pad(Padding::uniform(1))), &[x]).unwrap();
    let a = g.add("relu1", relu(), &[c]).unwrap();
    let c = g.add("conv2", Op::Conv2d(conv(6, 3).pad(Padding::uniform(1))), &[a]).unwrap();
    let a = g.add("leaky2", Op::Act(Activation::LeakyRelu { slope: 0.1 }), &[c]).unwrap();
    let c = g.add("conv3", Op::Conv2d(conv(6, 1)), &[a]).unwrap();
    let a = g.add("elu3", Op::Act(Activation::Elu { alpha: 0.7 }), &[c]).unwrap();
    let c4 = Conv2d::new(16, [3, 3]).stride(2).pad(Padding::Explicit { top: 0, bottom: 1, left: 1, right: 0 });
    let c = g.add("conv4", Op::Conv2d(c4), &[a]).unwrap();
    let a = g.add("sigmoid4", Op::Act(Activation::Sigmoid), &[c]).unwrap();
    let c5 = Conv2d::new(16, [1, 3]).pad(Padding::Explicit { top: 0, bottom: 0, left: 1, right: 1 });
    let c = g.add("conv5", Op::Conv2d(c5), &[a]).unwrap();
    let a = g.add("tanh5", Op::Act(Activation::Tanh), &[c]).unwrap();
    let c = g.add("conv6", Op::Conv2d(conv(16, 3).pad(Padding::uniform(1))), &[a]).unwrap();
    let a = g.add("relu6", relu(), &[c]).unwrap();
    let mut c7 = conv(8, 3).pad(Padding::uniform(1));
    c7.groups = 4;
    let c = g.add("conv7", Op::Conv2d(c7), &[a]).unwrap();
    let a = g.add("relu7", relu(), &[c]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[a]).unwrap();
    g.add("fc", dense(5), &[f]).unwrap();
    g
}

/// Factored 1x3 convolutions wide enough for the 1-D Winograd between training batch norms:
/// the layout pass stores their inputs and outputs as transposed planes. Odd, non-square
/// 5x7 planes (a transposition bug cannot hide in a square), a ReLU and a tanh after the
/// batch norms that carry the reorders, a bias on one convolution, and a 1x3 whose input
/// another layer also reads (which stays untransposed).
fn factored_1x3() -> Graph {
    let mut g = Graph::new("factored_1x3");
    let x = g.input("input", Shape::chw(3, 5, 7)).unwrap();
    let c = g.add("stem", Op::Conv2d(conv(48, 1).bias(false)), &[x]).unwrap();
    let b = g.add("stem_bn", bn(), &[c]).unwrap();
    let a = g.add("stem_relu", relu(), &[b]).unwrap();
    let c = g.add("f1", Op::Conv2d(Conv2d::new(48, [1, 3]).pad(Padding::hw(0, 1)).bias(false)), &[a]).unwrap();
    let b = g.add("f1_bn", bn(), &[c]).unwrap();
    let a = g.add("f1_tanh", Op::Act(Activation::Tanh), &[b]).unwrap();
    let c = g.add("f2", Op::Conv2d(Conv2d::new(56, [3, 1]).pad(Padding::hw(1, 0))), &[a]).unwrap();
    let b = g.add("f2_bn", bn(), &[c]).unwrap();
    let a = g.add("f2_relu", relu(), &[b]).unwrap();
    // Valid along the row: 7 -> 5 columns, and a bias.
    let c = g.add("f3", Op::Conv2d(Conv2d::new(48, [1, 3])), &[a]).unwrap();
    let b = g.add("f3_bn", bn(), &[c]).unwrap();
    let f3 = g.add("f3_relu", relu(), &[b]).unwrap();
    // Read by f4 and by the pool: stays as it is.
    let c = g.add("f4", Op::Conv2d(Conv2d::new(48, [1, 3]).pad(Padding::hw(0, 1)).bias(false)), &[f3]).unwrap();
    let b = g.add("f4_bn", bn(), &[c]).unwrap();
    let f4 = g.add("f4_relu", relu(), &[b]).unwrap();
    let p = g.add("gap_a", Op::GlobalAvgPool, &[f3]).unwrap();
    let q = g.add("gap_b", Op::GlobalAvgPool, &[f4]).unwrap();
    let cat = g.add("cat", Op::Concat, &[p, q]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[cat]).unwrap();
    g.add("fc", dense(5), &[f]).unwrap();
    g
}

#[test]
fn transposed_planes_match_reference() {
    let g = factored_1x3();
    let plan = cnnc_compiler::pipeline::plan(&g, cnnc_compiler::plan::Mode::Training, Fusion::Full).unwrap();
    let t: Vec<&str> = g.nodes().filter(|&n| plan.is_transposed(n)).map(|n| g.node(n).name.as_str()).collect();
    assert_eq!(t, ["stem_relu", "f1", "f2_relu", "f3"]);
    check(&g, Loss::SoftmaxCrossEntropy, 3, 3, 31);
    check(&g, Loss::SoftmaxCrossEntropy, 3, 1, 32);
}

#[test]
fn activation_masks_in_backward_data_match_reference() {
    check(&conv_acts(), Loss::SoftmaxCrossEntropy, 3, 3, 21);
    check(&conv_acts(), Loss::SoftmaxCrossEntropy, 3, 1, 22);
    // The first layer's input (the image) has no gradient: its mask stays a pass of its own.
    let e = JitEngine::new(&conv_acts(), Loss::SoftmaxCrossEntropy, 2, Fusion::Full).unwrap();
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(e.masked_in_backward_data(), s(&["conv2", "conv3", "conv4", "conv5", "conv6", "conv7"]));
    assert_eq!(JitEngine::new(&lenet(), Loss::SoftmaxCrossEntropy, 2, Fusion::Full).unwrap().masked_in_backward_data(), s(&["conv2"]));
}

/// Layers of 9 to 33 output channels (a batch smaller than the thread count splits their
/// forward by output channels, in parts of unequal widths): a biased 3x3 with a ReLU, a
/// 3x3 on Winograd between batch norms, an in-place concatenation of a 1x1 and a 1x3 (the
/// parts write sub-slices of their slices), a 3x3 with a fused residual, a max pooling fused
/// into its producer, a strided 3x3 and a 9-channel 1x1 (a last part of one channel).
fn wide() -> Graph {
    let mut g = Graph::new("wide");
    let x = g.input("input", Shape::chw(3, 9, 11)).unwrap();
    let y = g.add("conv1", Op::Conv2d(conv(20, 3).pad(Padding::uniform(1))), &[x]).unwrap();
    let y = g.add("relu1", relu(), &[y]).unwrap();
    let y = g.add("conv2", Op::Conv2d(conv(24, 3).pad(Padding::uniform(1)).bias(false)), &[y]).unwrap();
    let y = g.add("bn2", bn(), &[y]).unwrap();
    let y = g.add("relu2", relu(), &[y]).unwrap();
    let a = g.add("b1", Op::Conv2d(conv(16, 1)), &[y]).unwrap();
    let b = g.add("b2", Op::Conv2d(Conv2d::new(17, [1, 3]).pad(Padding::Explicit { top: 0, bottom: 0, left: 1, right: 1 })), &[y]).unwrap();
    let cat = g.add("cat", Op::Concat, &[a, b]).unwrap();
    let y = g.add("conv3", Op::Conv2d(conv(33, 3).pad(Padding::uniform(1))), &[cat]).unwrap();
    let y = g.add("res", Op::Add, &[y, cat]).unwrap();
    let y = g.add("relu3", relu(), &[y]).unwrap();
    let y = g.add("pool", maxpool(2, 2), &[y]).unwrap();
    let y = g.add("conv4", Op::Conv2d(conv(16, 3).stride(2).pad(Padding::uniform(1))), &[y]).unwrap();
    let y = g.add("bn4", bn(), &[y]).unwrap();
    let y = g.add("relu4", relu(), &[y]).unwrap();
    let y = g.add("conv5", Op::Conv2d(conv(9, 1)), &[y]).unwrap();
    let y = g.add("gap", Op::GlobalAvgPool, &[y]).unwrap();
    g.add("fc", dense(5), &[y]).unwrap();
    g
}

#[test]
fn batches_smaller_than_the_thread_count_split_channels_and_match_reference() {
    let g = wide();
    let all: Vec<String> = ["conv1", "conv2", "b1", "b2", "conv3", "conv4", "conv5"].map(String::from).to_vec();
    for (threads, compiled, batches) in [(2, 1, &[1][..]), (3, 2, &[2, 1][..])] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let e = JitEngine::new(&g, Loss::SoftmaxCrossEntropy, compiled, Fusion::Full).unwrap();
            assert_eq!(e.channel_split_layers(), [all.clone(), all.clone()], "{threads} threads, batch {compiled}");
            for (i, &n) in batches.iter().enumerate() {
                check(&g, Loss::SoftmaxCrossEntropy, compiled, n, 40 + i as u64);
            }
        });
    }
    // A batch as large as the thread count splits by samples: no channel parts compiled.
    let e = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap().install(|| JitEngine::new(&g, Loss::SoftmaxCrossEntropy, 2, Fusion::Full).unwrap());
    assert_eq!(e.channel_split_layers(), [Vec::<String>::new(), Vec::new()]);
}

/// A dense layer of 307,200 weights (past `DATA_SPLIT_MIN_WEIGHTS`: its backward data splits
/// by input columns, its weight gradient by output rows) between a convolution and a small
/// head, its input gradient shared with nothing.
fn wide_dense() -> Graph {
    let mut g = Graph::new("wide_dense");
    let x = g.input("input", Shape::chw(3, 16, 16)).unwrap();
    let y = g.add("conv", Op::Conv2d(conv(3, 3).pad(Padding::uniform(1))), &[x]).unwrap();
    let y = g.add("flatten", Op::Flatten, &[y]).unwrap();
    let y = g.add("fc1", dense(400), &[y]).unwrap();
    let y = g.add("relu", relu(), &[y]).unwrap();
    g.add("fc2", dense(7), &[y]).unwrap();
    g
}

#[test]
fn large_dense_layers_split_by_rows_and_columns_match_reference() {
    let g = wide_dense();
    let fc1 = DenseKernels::compile("fc1", &Dense { out_features: 400, bias: true }, 768, FusedAct::Relu, cnnc_compiler::lower::Mode::Blocked).unwrap();
    assert!(fc1.data_col_parts(2).len() == 2 && fc1.data_col_parts(3).len() == 3);
    for threads in [2, 3] {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| {
            check(&g, Loss::SoftmaxCrossEntropy, 5, 5, 50);
            check(&g, Loss::SoftmaxCrossEntropy, 5, 2, 51);
            // Fewer samples than threads: fc1's forward splits by output features too (the
            // 3-channel convolution and the 7-feature head are one part each).
            let e = JitEngine::new(&g, Loss::SoftmaxCrossEntropy, threads - 1, Fusion::Full).unwrap();
            let fc1 = vec!["fc1".to_string()];
            assert_eq!(e.channel_split_layers(), [fc1.clone(), fc1]);
            check(&g, Loss::SoftmaxCrossEntropy, threads - 1, 1, 52);
        });
    }
}

#[test]
fn lenet5_matches_reference() {
    check(&lenet(), Loss::SoftmaxCrossEntropy, 5, 5, 1);
    check(&lenet(), Loss::SoftmaxCrossEntropy, 5, 1, 2);
}

#[test]
fn vgg_style_matches_reference_with_partial_batches() {
    check(&vgg(), Loss::SoftmaxCrossEntropy, 6, 6, 3);
    check(&vgg(), Loss::SoftmaxCrossEntropy, 6, 3, 4);
    check(&vgg(), Loss::MulticlassHinge { margin: 1.0 }, 4, 4, 5);
}

#[test]
fn residual_blocks_match_reference() {
    check(&resnet(), Loss::SoftmaxCrossEntropy, 3, 3, 6);
    check(&resnet(), Loss::SoftmaxCrossEntropy, 3, 1, 7);
}

#[test]
fn residuals_of_a_groups_own_input_match_reference() {
    check(&self_residuals(), Loss::SoftmaxCrossEntropy, 3, 3, 8);
}

#[test]
fn inception_matches_reference() {
    check(&inception(), Loss::SoftmaxCrossEntropy, 4, 3, 8);
}

#[test]
fn recomputed_concatenations_match_reference() {
    let g = inception_cbr();
    let plan = cnnc_compiler::pipeline::plan(&g, cnnc_compiler::plan::Mode::Training, Fusion::Full).unwrap();
    let concats = plan.memory.recompute_before.iter().flatten().filter(|&&r| matches!(g.node(r).op, Op::Concat)).count();
    assert_eq!(concats, 2, "both concatenations are recomputed");
    // So are both max pools, whose inputs backward reads anyway: m1's from the kept stem, m2's
    // from m1's concatenation, recomputed before it (a chain).
    let pools = plan.memory.recompute_before.iter().flatten().filter(|&&r| matches!(g.node(r).op, Op::Pool(_))).count();
    assert_eq!(pools, 2, "both max pools are recomputed");
    // ...and their memory holds other values or gradients in between (else recomputing
    // changes nothing).
    let m = &plan.memory;
    let range = |at: &[Option<usize>], i: cnnc_compiler::ir::NodeId| at[i.index()].map(|o| o..o + g.node(i).shape.numel());
    for cat in ["m1.cat", "m2.cat"] {
        let c = g.nodes().find(|&i| g.node(i).name == cat).unwrap();
        let r = range(&m.value_at, c).unwrap();
        let overlaps = |q: Option<std::ops::Range<usize>>| q.is_some_and(|q| q.start < r.end && r.start < q.end);
        let shared = g.nodes().filter(|&i| (i != c && overlaps(range(&m.value_at, i))) || overlaps(range(&m.grad_at, i))).count();
        assert!(shared > 0, "{cat}: its memory {r:?} holds nothing else");
    }
    for (n, seed) in [(1, 11), (3, 12)] {
        check(&g, Loss::SoftmaxCrossEntropy, 3, n, seed);
    }
}

#[test]
fn fallback_ops_match_reference() {
    check(&odd_ops(), Loss::MulticlassHinge { margin: 0.5 }, 3, 3, 9);
}

#[test]
fn plans_fuse_what_they_should() {
    let e = JitEngine::new(&resnet(), Loss::SoftmaxCrossEntropy, 2, Fusion::Full).unwrap();
    let t = e.plan(true).to_string();
    assert!(t.contains("[b1.bn2 -> b1.add -> b1.relu2]"), "{t}");
    assert!(t.contains("[b3.conv -> b3.add -> b3.leaky]"), "{t}");
    let i = e.plan(false).to_string();
    assert!(i.contains("[b1.conv2 -> b1.bn2 -> b1.add -> b1.relu2]"), "{i}");
    let e = JitEngine::new(&inception(), Loss::SoftmaxCrossEntropy, 2, Fusion::Full).unwrap();
    assert!(e.plan(true).inplace_concats.len() == 1);
    assert_eq!(e.fallback_layers(), 0);
    let naive = JitEngine::new(&inception(), Loss::SoftmaxCrossEntropy, 2, Fusion::None).unwrap();
    assert!(naive.plan(true).inplace_concats.is_empty());
    assert_eq!(naive.name(), "jit-naive");
    assert_eq!(JitEngine::new(&odd_ops(), Loss::SoftmaxCrossEntropy, 2, Fusion::Full).unwrap().fallback_layers(), 3);
}

/// Pooling fused into the steps writing its input (`passes::pool_fuse`), which the
/// `*_matches_reference` tests above run against the reference: a convolution's chain
/// (LeNet), training batch norms (VGG, max with ceil mode and average with padding), only the
/// first of two pools of one value (inception), and the three channel slices of an in-place
/// concatenation (the second inception module's max pool, whose input is the first's output).
#[test]
fn pools_run_inside_their_producers() {
    let pooled = |g: &Graph, train: bool| JitEngine::new(g, Loss::SoftmaxCrossEntropy, 2, Fusion::Full).unwrap().pooled_by_producers(train);
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(pooled(&lenet(), true), s(&["pool1", "pool2"]));
    assert_eq!(pooled(&lenet(), false), s(&["pool1", "pool2"]));
    assert_eq!(pooled(&vgg(), true), s(&["pool1", "pool2"]));
    assert_eq!(pooled(&vgg(), false), s(&["pool1", "pool2"]));
    assert_eq!(pooled(&inception(), true), s(&["b3pool"]));
    assert_eq!(pooled(&inception_cbr(), true), s(&["m1.pool", "m2.pool"]));
    // The copied concatenation's kernel does not pool.
    assert!(pooled(&odd_ops(), true).is_empty());
    assert!(JitEngine::new(&lenet(), Loss::SoftmaxCrossEntropy, 2, Fusion::None).unwrap().pooled_by_producers(true).is_empty());
}

#[test]
fn graph_ending_in_a_loss_node() {
    let mut g = lenet();
    let out = g.outputs()[0];
    g.add("loss", Op::Loss(Loss::SoftmaxCrossEntropy), &[out]).unwrap();
    let mut e = JitEngine::new(&g, Loss::SoftmaxCrossEntropy, 2, Fusion::Full).unwrap();
    let p = params_for(&g, 3);
    let mut gr = p.zeros_like();
    let x = vec![0.5f32; 2 * 784];
    let s = e.train_step(&mut p.clone(), &mut gr, &x, &[1, 2], 0).unwrap();
    assert!(s.loss_sum > 0.0);
    assert_eq!(e.infer(&p, &x, 2).unwrap().len(), 20);
    assert!(JitEngine::new(&g, Loss::MulticlassHinge { margin: 1.0 }, 2, Fusion::Full).is_err());
}

#[test]
fn bad_batches_are_errors() {
    let g = lenet();
    let mut e = JitEngine::new(&g, Loss::SoftmaxCrossEntropy, 2, Fusion::Full).unwrap();
    let mut p = params_for(&g, 1);
    let mut gr = p.zeros_like();
    let x = vec![0.1f32; 3 * 784];
    let err = e.train_step(&mut p, &mut gr, &x, &[0, 1, 2], 0).unwrap_err();
    assert!(err.0.contains("1..=2"), "{err}");
    let err = e.train_step(&mut p, &mut gr, &x[..784 * 2 - 1], &[0, 1], 0).unwrap_err();
    assert!(err.0.contains("input has"), "{err}");
    let err = e.train_step(&mut p, &mut gr, &x[..784 * 2], &[0, 10], 0).unwrap_err();
    assert!(err.0.contains("out of range"), "{err}");
    assert!(e.infer(&p, &x, 0).is_err());
    assert!(JitEngine::new(&g, Loss::SoftmaxCrossEntropy, 0, Fusion::Full).is_err());
    // missing parameters
    let other = ParamStore::<f32>::for_graph(&vgg(), &InitConfig::pytorch(), 0).unwrap();
    assert!(e.infer(&other, &x[..784], 1).is_err());
}

#[test]
fn deterministic_for_a_thread_count() {
    let g = vgg();
    let p = params_for(&g, 11);
    let x: Vec<f32> = (0..5 * 3 * 9 * 11).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0 + 0.01).collect();
    let labels = [0, 1, 2, 3, 4];
    let run = || {
        let mut e = JitEngine::new(&g, Loss::SoftmaxCrossEntropy, 5, Fusion::Full).unwrap();
        let (mut pp, mut gr) = (p.clone(), p.zeros_like());
        e.train_step(&mut pp, &mut gr, &x, &labels, 3).unwrap();
        (gr.flat().to_vec(), pp.flat().to_vec())
    };
    assert_eq!(run(), run());
}

/// Inference borrows the training program's value buffers: running it between training steps
/// changes nothing (bit-identical gradients and statistics), and its logits match an engine
/// that never trained.
#[test]
fn inference_between_training_steps_changes_nothing() {
    for g in [inception(), resnet()] {
        let p = params_for(&g, 12);
        let shape = g.node(g.inputs()[0]).shape;
        let x: Vec<f32> = (0..3 * shape.numel()).map(|i| ((i * 17 % 31) as f32 - 15.0) / 9.0 + 0.02).collect();
        let labels = [0, 2, 1];
        let run = |interleave: bool| {
            let mut e = JitEngine::new(&g, Loss::SoftmaxCrossEntropy, 3, Fusion::Full).unwrap();
            let (mut pp, mut gr) = (p.clone(), p.zeros_like());
            let mut logits = Vec::new();
            for step in 0..2 {
                e.train_step(&mut pp, &mut gr, &x, &labels, step).unwrap();
                if interleave {
                    logits.push(e.infer(&pp, &x[..2 * shape.numel()], 2).unwrap());
                }
            }
            (gr.flat().to_vec(), pp.flat().to_vec(), logits)
        };
        let (a, b) = (run(false), run(true));
        assert_eq!((&a.0, &a.1), (&b.0, &b.1), "{}: inference between steps changed training", g.name);
        let fresh = JitEngine::new(&g, Loss::SoftmaxCrossEntropy, 3, Fusion::Full).unwrap().infer(&trained_twice(&g, &p, &x, &labels), &x[..2 * shape.numel()], 2).unwrap();
        assert_eq!(b.2[1], fresh, "{}: logits of a borrowing inference", g.name);
    }
}

/// The parameters after two training steps from `p` (what the second inference above sees).
fn trained_twice(g: &Graph, p: &ParamStore, x: &[f32], labels: &[usize]) -> ParamStore {
    let mut e = JitEngine::new(g, Loss::SoftmaxCrossEntropy, 3, Fusion::Full).unwrap();
    let (mut pp, mut gr) = (p.clone(), p.zeros_like());
    for step in 0..2 {
        e.train_step(&mut pp, &mut gr, x, labels, step).unwrap();
    }
    pp
}
