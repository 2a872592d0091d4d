//! Helpers shared by the engine tests: layer constructors, random parameters with non-trivial
//! batch-norm statistics, and a scale-aware comparison.

#![allow(dead_code)]

use cnnc_compiler::ir::*;
use cnnc_runtime::init::InitConfig;
use cnnc_runtime::params::{ParamKind, ParamStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub fn conv(c: usize, k: usize) -> Conv2d {
    Conv2d::new(c, [k, k])
}

pub fn bn() -> Op {
    Op::BatchNorm(BatchNorm::default())
}

pub fn relu() -> Op {
    Op::Act(Activation::Relu)
}

pub fn dense(n: usize) -> Op {
    Op::Dense(Dense { out_features: n, bias: true })
}

/// `conv{i}` -> `bn{i}` -> `relu{i}` on `x`: the conv-bn-relu unit of the test networks.
pub fn conv_bn_relu(g: &mut Graph, i: usize, c: Conv2d, x: NodeId) -> NodeId {
    let c = g.add(format!("conv{i}"), Op::Conv2d(c), &[x]).unwrap();
    let b = g.add(format!("bn{i}"), bn(), &[c]).unwrap();
    g.add(format!("relu{i}"), relu(), &[b]).unwrap()
}

pub fn maxpool(k: usize, s: usize) -> Op {
    Op::Pool(Pool2d::new(PoolKind::Max, k, s))
}

/// Random parameters with non-trivial batch-norm affine parameters and running statistics
/// (layers whose name contains `bn`) and biases; the store's frozen flags come from the graph.
pub fn params_for(g: &Graph, seed: u64) -> ParamStore {
    let mut p = ParamStore::<f32>::for_graph(g, &InitConfig::pytorch(), seed).unwrap();
    let mut rng = StdRng::seed_from_u64(seed ^ 0xabc);
    for info in p.infos().to_vec() {
        let v = p.slice_mut(&info.name).unwrap();
        let is_bn = info.layer.contains("bn");
        match (is_bn, info.kind) {
            (true, ParamKind::Weight) => v.iter_mut().for_each(|x| *x = rng.random_range(0.5..1.5)),
            (true, ParamKind::Bias) | (true, ParamKind::RunningMean) => v.iter_mut().for_each(|x| *x = rng.random_range(-0.5..0.5)),
            (true, ParamKind::RunningVar) => v.iter_mut().for_each(|x| *x = rng.random_range(0.5..2.0)),
            (false, ParamKind::Bias) => v.iter_mut().for_each(|x| *x = rng.random_range(-0.3..0.3)),
            _ => {}
        }
    }
    p
}

/// Max-abs difference over the reference's max-abs, the scale floored at `floor`: gradients
/// that are mathematically zero (the bias of a convolution followed by batch norm) are
/// rounding noise.
pub fn rel_floor(a: &[f32], b: &[f32], floor: f64) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, &v| m.max(v.abs() as f64)).max(floor).max(1e-12);
    let diff = a.iter().zip(b).fold(0.0f64, |m, (&x, &y)| m.max((x - y).abs() as f64));
    diff / scale
}
