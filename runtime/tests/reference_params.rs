//! Parameter store layout (PyTorch names and shapes), counts, views, and the initialisers'
//! statistics.

use cnnc_compiler::ir::*;
use cnnc_runtime::init::{tensor_rng, FanMode, Fans, Init, InitConfig};
use cnnc_runtime::params::{ParamKind, ParamStore};
use ndarray::ArrayD;

fn lenet5() -> Graph {
    let mut g = Graph::new("LeNet5");
    let x = g.input("input", Shape::chw(1, 28, 28)).unwrap();
    let c1 = g.add("conv1", Op::Conv2d(Conv2d::new(6, [5, 5])), &[x]).unwrap();
    let r1 = g.add("relu1", Op::Act(Activation::Relu), &[c1]).unwrap();
    let p1 = g.add("pool1", Op::Pool(Pool2d::new(PoolKind::Max, 2, 2)), &[r1]).unwrap();
    let c2 = g.add("conv2", Op::Conv2d(Conv2d::new(16, [5, 5])), &[p1]).unwrap();
    let r2 = g.add("relu2", Op::Act(Activation::Relu), &[c2]).unwrap();
    let p2 = g.add("pool2", Op::Pool(Pool2d::new(PoolKind::Max, 2, 2)), &[r2]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[p2]).unwrap();
    let d1 = g.add("fc1", Op::Dense(Dense { out_features: 120, bias: true }), &[f]).unwrap();
    let r3 = g.add("relu3", Op::Act(Activation::Relu), &[d1]).unwrap();
    let d2 = g.add("fc2", Op::Dense(Dense { out_features: 84, bias: true }), &[r3]).unwrap();
    let r4 = g.add("relu4", Op::Act(Activation::Relu), &[d2]).unwrap();
    g.add("fc3", Op::Dense(Dense { out_features: 10, bias: true }), &[r4]).unwrap();
    g
}

#[test]
fn lenet5_layout_and_count() {
    let g = lenet5();
    let p = ParamStore::<f32>::for_graph(&g, &InitConfig::default(), 0).unwrap();
    let names: Vec<(&str, Vec<usize>)> = p.infos().iter().map(|i| (i.name.as_str(), i.shape.clone())).collect();
    assert_eq!(
        names,
        vec![
            ("conv1.weight", vec![6, 1, 5, 5]),
            ("conv1.bias", vec![6]),
            ("conv2.weight", vec![16, 6, 5, 5]),
            ("conv2.bias", vec![16]),
            ("fc1.weight", vec![120, 256]),
            ("fc1.bias", vec![120]),
            ("fc2.weight", vec![84, 120]),
            ("fc2.bias", vec![84]),
            ("fc3.weight", vec![10, 84]),
            ("fc3.bias", vec![10]),
        ]
    );
    assert_eq!(p.num_trainable(), 44_426);
    assert_eq!(p.num_params(), 44_426);
    assert_eq!(p.num_buffers(), 0);
    assert_eq!(p.flat().len(), 44_426);
    // Offsets are contiguous in graph order.
    let mut off = 0;
    for i in p.infos() {
        assert_eq!(i.offset, off);
        off += i.len;
    }
    // PyTorch default init: |w| <= 1/sqrt(fan_in), fan_in(conv2) = 6*5*5 = 150.
    let bound = 1.0 / 150f32.sqrt();
    let w = p.slice("conv2.weight").unwrap();
    assert!(w.iter().all(|v| v.abs() <= bound));
    assert!(w.iter().any(|v| v.abs() > 0.9 * bound));
    let b = p.slice("conv2.bias").unwrap();
    assert!(b.iter().all(|v| v.abs() <= bound) && b.iter().any(|&v| v != 0.0));
}

fn bn_graph() -> Graph {
    let mut g = Graph::new("bn");
    let x = g.input("x", Shape::chw(3, 5, 5)).unwrap();
    let c = g.add("stem.conv", Op::Conv2d(Conv2d::new(8, [3, 3]).groups(1).bias(false)), &[x]).unwrap();
    let b = g.add("stem.bn", Op::BatchNorm(BatchNorm::default()), &[c]).unwrap();
    let f = g.add("flat", Op::Flatten, &[b]).unwrap();
    let d = g.add("head", Op::Dense(Dense { out_features: 4, bias: false }), &[f]).unwrap();
    g.add("head_bn", Op::BatchNorm(BatchNorm::default()), &[d]).unwrap();
    g
}

#[test]
fn batchnorm_tensors_buffers_and_init() {
    let g = bn_graph();
    let p = ParamStore::<f32>::for_graph(&g, &InitConfig::default(), 3).unwrap();
    let names: Vec<&str> = p.infos().iter().map(|i| i.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "stem.conv.weight",
            "stem.bn.weight",
            "stem.bn.bias",
            "stem.bn.running_mean",
            "stem.bn.running_var",
            "head.weight",
            "head_bn.weight",
            "head_bn.bias",
            "head_bn.running_mean",
            "head_bn.running_var"
        ]
    );
    assert_eq!(p.info("head.weight").unwrap().shape, vec![4, 8 * 3 * 3]);
    assert_eq!(p.info("stem.bn.running_var").unwrap().kind, ParamKind::RunningVar);
    assert!(!p.info("stem.bn.running_var").unwrap().is_trainable());
    assert!(p.info("stem.bn.weight").unwrap().is_trainable());
    assert_eq!(p.num_params(), 8 * 27 + 16 + 4 * 72 + 8);
    assert_eq!(p.num_trainable(), p.num_params());
    assert_eq!(p.num_buffers(), 16 + 8);
    assert!(p.slice("stem.bn.weight").unwrap().iter().all(|&v| v == 1.0));
    assert!(p.slice("stem.bn.bias").unwrap().iter().all(|&v| v == 0.0));
    assert!(p.slice("stem.bn.running_mean").unwrap().iter().all(|&v| v == 0.0));
    assert!(p.slice("head_bn.running_var").unwrap().iter().all(|&v| v == 1.0));
}

#[test]
fn frozen_layers_are_not_trainable() {
    let mut g = lenet5();
    let c1 = g.find("conv1").unwrap();
    g.node_mut(c1).trainable = false;
    let mut p = ParamStore::<f32>::for_graph(&g, &InitConfig::default(), 0).unwrap();
    assert_eq!(p.num_params(), 44_426);
    assert_eq!(p.num_trainable(), 44_426 - 156);
    assert!(p.set_layer_trainable("conv1", true));
    assert_eq!(p.num_trainable(), 44_426);
    assert!(!p.set_layer_trainable("relu1", true));
}

#[test]
fn views_zeros_like_cast_and_set() {
    let g = bn_graph();
    let mut p = ParamStore::<f32>::for_graph(&g, &InitConfig::he(), 9).unwrap();
    // get / slice / flat agree.
    let info = p.info("head.weight").unwrap().clone();
    let view = p.get("head.weight").unwrap();
    assert_eq!(view.shape(), &[4, 72]);
    assert_eq!(view[[2, 5]], p.slice("head.weight").unwrap()[2 * 72 + 5]);
    assert_eq!(view[[2, 5]], p.flat()[info.offset + 2 * 72 + 5]);
    // Mutation through one view is seen through the others.
    p.get_mut("head.weight").unwrap()[[3, 1]] = 42.0;
    assert_eq!(p.slice("head.weight").unwrap()[3 * 72 + 1], 42.0);
    p.slice_mut("stem.bn.bias").unwrap()[2] = -1.5;
    assert_eq!(p.get("stem.bn.bias").unwrap()[[2]], -1.5);
    for (i, mut v) in p.iter_mut() {
        if i.kind == ParamKind::RunningMean {
            v.fill(0.25);
        }
    }
    assert!(p.slice("head_bn.running_mean").unwrap().iter().all(|&v| v == 0.25));
    // zeros_like keeps the layout.
    let z = p.zeros_like();
    assert_eq!(z.infos(), p.infos());
    assert!(z.flat().iter().all(|&v| v == 0.0));
    // cast to f64 is exact.
    let p64: ParamStore<f64> = p.cast();
    assert!(p64.flat().iter().zip(p.flat()).all(|(&a, &b)| a == b as f64));
    // set checks the dimensions and the name.
    let e = p.set("head.weight", ArrayD::zeros(ndarray::IxDyn(&[72, 4])).view()).unwrap_err();
    assert_eq!(e.to_string(), "parameter `head.weight` has dimensions [4, 72], got [72, 4]");
    let e = p.set("nope.weight", ArrayD::zeros(ndarray::IxDyn(&[1])).view()).unwrap_err();
    assert_eq!(e.to_string(), "missing parameter `nope.weight`");
    assert!(p.tensor("head.bias").is_err());
    p.set("head_bn.bias", ndarray::arr1(&[1.0f32, 2.0, 3.0, 4.0]).into_dyn().view()).unwrap();
    assert_eq!(p.slice("head_bn.bias").unwrap(), &[1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn seeding_is_deterministic_and_per_tensor() {
    let g = lenet5();
    let a = ParamStore::<f32>::for_graph(&g, &InitConfig::default(), 7).unwrap();
    let b = ParamStore::<f32>::for_graph(&g, &InitConfig::default(), 7).unwrap();
    let c = ParamStore::<f32>::for_graph(&g, &InitConfig::default(), 8).unwrap();
    assert_eq!(a.flat(), b.flat());
    assert_ne!(a.slice("fc1.weight"), c.slice("fc1.weight"));
    // An f64 store holds exactly the f32 store's values.
    let d = ParamStore::<f64>::for_graph(&g, &InitConfig::default(), 7).unwrap();
    assert_eq!(d, a.cast::<f64>());
    // Two tensors of one shape and init are not copies of each other.
    let mut g2 = Graph::new("two");
    let x = g2.input("x", Shape::flat(50)).unwrap();
    let d1 = g2.add("a", Op::Dense(Dense { out_features: 50, bias: false }), &[x]).unwrap();
    g2.add("b", Op::Dense(Dense { out_features: 50, bias: false }), &[d1]).unwrap();
    let p = ParamStore::<f32>::for_graph(&g2, &InitConfig::default(), 1).unwrap();
    assert_ne!(p.slice("a.weight"), p.slice("b.weight"));
}

fn empirical(init: Init, fans: Fans, n: usize) -> (f64, f64, f64) {
    let mut v = vec![0.0f32; n];
    init.fill(&mut v, fans, &mut tensor_rng(123, "stats")).unwrap();
    let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
    let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    let max = v.iter().map(|x| x.abs() as f64).fold(0.0, f64::max);
    (mean, var.sqrt(), max)
}

#[test]
fn initialiser_statistics_match_the_formulas() {
    let fans = Fans { fan_in: 300, fan_out: 500 };
    let n = 200_000;
    let cases: [(Init, f64, Option<f64>); 8] = [
        // (init, expected std, expected bound for uniform ones)
        (Init::xavier_uniform(), (2.0 / 800.0f64).sqrt(), Some((6.0 / 800.0f64).sqrt())),
        (Init::XavierNormal { gain: 2.0 }, 2.0 * (2.0 / 800.0f64).sqrt(), None),
        (Init::he_uniform(), (2.0 / 300.0f64).sqrt(), Some((6.0 / 300.0f64).sqrt())),
        (Init::he_normal(), (2.0 / 300.0f64).sqrt(), None),
        (Init::KaimingNormal { a: 0.0, mode: FanMode::FanOut }, (2.0 / 500.0f64).sqrt(), None),
        (Init::KaimingUniform { a: 0.2, mode: FanMode::FanIn }, (2.0 / 1.04 / 300.0f64).sqrt(), Some((6.0 / 1.04 / 300.0f64).sqrt())),
        (Init::PYTORCH_WEIGHT, 1.0 / (3.0 * 300.0f64).sqrt(), Some(1.0 / 300f64.sqrt())),
        (Init::PyTorchBias, 1.0 / (3.0 * 300.0f64).sqrt(), Some(1.0 / 300f64.sqrt())),
    ];
    for (init, std, bound) in cases {
        let (_, formula) = init.moments(fans).unwrap();
        assert!((formula - std).abs() < 1e-6 * std, "{init:?}: formula {formula} vs {std}");
        let (m, s, max) = empirical(init, fans, n);
        assert!(m.abs() < 4.0 * std / (n as f64).sqrt() + 1e-9, "{init:?}: mean {m}");
        assert!((s / std - 1.0).abs() < 0.01, "{init:?}: std {s} vs {std}");
        if let Some(b) = bound {
            assert!(max <= b * (1.0 + 1e-6), "{init:?}: {max} > {b}");
            assert!(max > 0.99 * b, "{init:?}: {max} never near {b}");
        }
    }
    let (m, s, _) = empirical(Init::Normal { mean: 0.5, std: 0.1 }, fans, n);
    assert!((m - 0.5).abs() < 0.002 && (s - 0.1).abs() < 0.002);
    let (m, s, max) = empirical(Init::Constant(0.25), fans, 10);
    assert_eq!((m, s, max), (0.25, 0.0, 0.25));
}

#[test]
fn conv_fans_use_groups_and_receptive_field() {
    // Depthwise 3x3 on 32 channels: weight [32, 1, 3, 3], fan_in 9, so the PyTorch bound is 1/3.
    let mut g = Graph::new("dw");
    let x = g.input("x", Shape::chw(32, 8, 8)).unwrap();
    g.add("dw", Op::Conv2d(Conv2d::new(32, [3, 3]).groups(32)), &[x]).unwrap();
    let p = ParamStore::<f32>::for_graph(&g, &InitConfig::default(), 5).unwrap();
    let info = p.info("dw.weight").unwrap();
    assert_eq!(info.shape, vec![32, 1, 3, 3]);
    assert_eq!(info.fans, Fans { fan_in: 9, fan_out: 32 * 9 });
    let w = p.slice("dw.weight").unwrap();
    assert!(w.iter().all(|v| v.abs() <= 1.0 / 3.0) && w.iter().any(|v| v.abs() > 0.3));
}
