//! Transfer learning: loading weights by name (a replaced head, a network cut at a layer, a
//! checkpoint of another architecture, batch-norm statistics), the transfer report and its
//! errors; `Graph::cut_at` as a feature extractor (the JIT engine on the cut network gives the
//! full network's activations at that layer); per-layer learning-rate multipliers applied by
//! the trainer.

use cnnc_compiler::ir::*;
use cnnc_compiler::plan::Fusion;
use cnnc_runtime::checkpoint::{self, CheckpointMeta};
use cnnc_runtime::data::Dataset;
use cnnc_runtime::engine::Engine;
use cnnc_runtime::exec::JitEngine;
use cnnc_runtime::init::InitConfig;
use cnnc_runtime::optim::{LrMultipliers, OptimizerConfig, Schedule};
use cnnc_runtime::params::{ParamError, ParamStore, TransferReport};
use cnnc_runtime::reference;
use cnnc_runtime::train::{train, Quiet, TrainConfig};
use ndarray::ArrayViewD;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A small LeNet with a batch norm, on 1x13x11 images, with `classes` outputs.
fn net(classes: usize) -> Graph {
    let mut g = Graph::new("net");
    let x = g.input("input", Shape::chw(1, 13, 11)).unwrap();
    let c1 = g.add("conv1", Op::Conv2d(Conv2d::new(4, [3, 3]).pad(Padding::uniform(1))), &[x]).unwrap();
    let b1 = g.add("bn1", Op::BatchNorm(BatchNorm::default()), &[c1]).unwrap();
    let r1 = g.add("relu1", Op::Act(Activation::Relu), &[b1]).unwrap();
    let p1 = g.add("pool1", Op::Pool(Pool2d::new(PoolKind::Max, 2, 2)), &[r1]).unwrap();
    let c2 = g.add("conv2", Op::Conv2d(Conv2d::new(6, [3, 3])), &[p1]).unwrap();
    let r2 = g.add("relu2", Op::Act(Activation::Relu), &[c2]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[r2]).unwrap();
    let d1 = g.add("fc1", Op::Dense(Dense { out_features: 16, bias: true }), &[f]).unwrap();
    let a1 = g.add("relu3", Op::Act(Activation::Relu), &[d1]).unwrap();
    g.add("fc2", Op::Dense(Dense { out_features: classes, bias: true }), &[a1]).unwrap();
    g
}

/// A store whose every value (running statistics included) is random and distinct.
fn random_store(g: &Graph, seed: u64) -> ParamStore {
    let mut p = ParamStore::<f32>::for_graph(g, &InitConfig::default(), seed).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    p.flat_mut().iter_mut().for_each(|v| *v = rng.random_range(0.2..1.5));
    p
}

fn tensors(p: &ParamStore) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    p.infos().iter().map(|i| (i.name.clone(), i.shape.clone(), p.slice(&i.name).unwrap().to_vec())).collect()
}

fn source(t: &[(String, Vec<usize>, Vec<f32>)]) -> impl Iterator<Item = (&str, &[usize], &[f32])> {
    t.iter().map(|(n, s, d)| (n.as_str(), s.as_slice(), d.as_slice()))
}

fn skip(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn replaced_head_loads_the_features_and_keeps_the_fresh_head() {
    let pretrained = random_store(&net(10), 1);
    let src = tensors(&pretrained);
    let mut p = ParamStore::<f32>::for_graph(&net(5), &InitConfig::default(), 2).unwrap();
    let fresh = p.clone();
    // Without skipping the head: an error naming the tensor and both shapes; nothing changed.
    let e = p.load_by_name(source(&src), &[], "pretrained").unwrap_err();
    assert!(matches!(e, ParamError::TransferShape { .. }));
    let m = e.to_string();
    assert!(m.contains("`fc2.weight`") && m.contains("[10, 16] in pretrained") && m.contains("[5, 16] in the model") && m.contains("skip layer `fc2`"), "{m}");
    assert_eq!(p, fresh);
    // Skipping the head.
    let r = p.load_by_name(source(&src), &skip(&["fc2"]), "pretrained").unwrap();
    let features = ["conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "conv2.weight", "conv2.bias", "fc1.weight", "fc1.bias"];
    assert_eq!(r, TransferReport { loaded: skip(&features), skipped: skip(&["fc2.weight", "fc2.bias"]), new: vec![], unused: vec![] });
    for name in features {
        assert_eq!(p.slice(name).unwrap(), pretrained.slice(name).unwrap(), "{name}");
    }
    for name in ["fc2.weight", "fc2.bias"] {
        assert_eq!(p.slice(name).unwrap(), fresh.slice(name).unwrap(), "{name}");
    }
    // Freezing the features in the graph and the store alike.
    let mut g = net(5);
    for l in ["conv1", "bn1", "conv2"] {
        let id = g.find(l).unwrap();
        g.node_mut(id).trainable = false;
    }
    assert_eq!(p.num_trainable(), p.num_params());
    p.set_trainable_from(&g);
    let frozen: Vec<_> = p.infos().iter().filter(|i| !i.layer_trainable).map(|i| i.name.as_str()).collect();
    assert_eq!(frozen, &features[..8]);
    let text = r.to_string();
    assert!(text.starts_with("loaded 10 tensors: conv1.weight, conv1.bias,") && text.contains("skipped 2 tensors: fc2.weight, fc2.bias"), "{text}");
    // A prefix pattern skips every matching layer.
    let mut q = fresh.clone();
    let r = q.load_by_name(source(&src), &skip(&["fc*"]), "pretrained").unwrap();
    assert_eq!(r.skipped, skip(&["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]));
    assert_eq!(q.slice("fc1.weight").unwrap(), fresh.slice("fc1.weight").unwrap());
    // A pattern matching nothing is an error (a typo must not silently load the head).
    let e = q.load_by_name(source(&src), &skip(&["fc9"]), "pretrained").unwrap_err().to_string();
    assert_eq!(e, "skip `fc9`: no layer of the model or of pretrained has that name");
    let e = q.load_by_name(source(&src), &skip(&["head*"]), "pretrained").unwrap_err().to_string();
    assert_eq!(e, "skip `head*`: no layer of the model or of pretrained starts with that");
}

#[test]
fn cut_network_is_a_feature_extractor() {
    let full = net(10);
    let pretrained = random_store(&full, 3);
    let cut = full.cut_at("fc1").unwrap();
    assert_eq!(cut.node(cut.outputs()[0]).shape, Shape::flat(16));
    let mut p = ParamStore::<f32>::for_graph(&cut, &InitConfig::default(), 4).unwrap();
    let path = std::env::temp_dir().join(format!("cnnc-transfer-{}.safetensors", std::process::id()));
    let meta = CheckpointMeta { architecture: full.name.clone(), fingerprint: "whatever".into(), ..Default::default() };
    checkpoint::save(&path, &meta, pretrained.infos().iter().map(|i| (i.name.as_str(), i.shape.as_slice(), pretrained.slice(&i.name).unwrap()))).unwrap();
    let r = p.load_checkpoint_by_name(&path, &[]);
    std::fs::remove_file(&path).ok();
    let r = r.unwrap();
    assert_eq!(r.loaded.len(), 10);
    assert_eq!(r.unused, skip(&["fc2.weight", "fc2.bias"]));
    assert!(r.new.is_empty() && r.skipped.is_empty());
    // The JIT engine on the cut network = the full network's fc1 values (reference, eval mode).
    let n = 3;
    let mut rng = StdRng::seed_from_u64(5);
    let x: Vec<f32> = (0..n * 13 * 11).map(|_| rng.random_range(-1.0..1.0)).collect();
    let mut jit = JitEngine::new(&cut, Loss::SoftmaxCrossEntropy, 4, Fusion::Full).unwrap();
    let feats = jit.infer(&p, &x, n).unwrap();
    let view = ArrayViewD::from_shape(vec![n, 1, 13, 11], &x).unwrap();
    let st = reference::forward(&full, &pretrained, view, reference::Mode::Eval, 0).unwrap();
    let want: Vec<f32> = st.value(full.find("fc1").unwrap()).unwrap().iter().copied().collect();
    assert_eq!(feats.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    assert!(scale > 0.0);
    for (a, b) in feats.iter().zip(&want) {
        assert!((a - b).abs() <= 1e-4 * scale, "{a} vs {b}");
    }
    // A missing checkpoint is an error naming the file.
    let e = p.load_checkpoint_by_name(std::path::Path::new("/nonexistent/pre.safetensors"), &[]).unwrap_err().to_string();
    assert!(e.contains("/nonexistent/pre.safetensors"), "{e}");
}

/// One SGD step over the whole (random) data set with `mults`; returns the parameters.
fn one_step(g: &Graph, p0: &ParamStore, mults: LrMultipliers) -> ParamStore {
    let mut rng = StdRng::seed_from_u64(6);
    let n = 6;
    let images: Vec<f32> = (0..n * 13 * 11).map(|_| rng.random_range(0.0..1.0)).collect();
    let labels: Vec<usize> = (0..n).map(|i| i % 3).collect();
    let ds = Dataset::new(images, labels, [1, 13, 11], 3).unwrap();
    let cfg = TrainConfig {
        epochs: 1,
        batch: n,
        optimizer: OptimizerConfig::sgd(0.1),
        schedule: Schedule::constant(0.1),
        loss: Loss::SoftmaxCrossEntropy,
        seed: 1,
        augment: None,
        patience: None,
        checkpoint: None,
        curves: None,
        lr_multipliers: mults,
    };
    let mut p = p0.clone();
    let mut eng = JitEngine::new(g, Loss::SoftmaxCrossEntropy, n, Fusion::Full).unwrap();
    train(&mut eng, g, &mut p, &ds, None, &cfg, &mut Quiet).unwrap();
    p
}

#[test]
fn lr_multipliers_scale_the_step_per_layer() {
    let g = net(3);
    let p0 = ParamStore::<f32>::for_graph(&g, &InitConfig::default(), 7).unwrap();
    let base = one_step(&g, &p0, LrMultipliers::new());
    let tuned = one_step(&g, &p0, LrMultipliers::new().set("conv", 0.01).unwrap().set("fc1", 0.1).unwrap().set("bn1", 0.0).unwrap());
    let delta = |p: &ParamStore, name: &str| -> Vec<f32> { p.slice(name).unwrap().iter().zip(p0.slice(name).unwrap()).map(|(a, b)| a - b).collect() };
    // conv1.bias is left out: batch norm right after it makes its gradient zero.
    for info in p0.infos().iter().filter(|i| i.is_trainable() && i.name != "conv1.bias") {
        let m = match info.layer.as_str() {
            "conv1" | "conv2" => 0.01,
            "fc1" => 0.1,
            "bn1" => 0.0,
            _ => 1.0,
        };
        let (d, t) = (delta(&base, &info.name), delta(&tuned, &info.name));
        assert!(d.iter().any(|&v| v != 0.0), "{}: no update at all", info.name);
        let scale = d.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        for (a, b) in t.iter().zip(&d) {
            assert!((a - m * b).abs() <= 1e-3 * scale + 1e-6, "{}: step {a} vs {m} x {b}", info.name);
        }
        if m == 0.0 {
            assert_eq!(tuned.slice(&info.name).unwrap(), p0.slice(&info.name).unwrap(), "{} moved", info.name);
        }
    }
}
