//! Auxiliary losses (GoogLeNet's side classifiers): every graph output gets the loss with a
//! weight (1 for the main output, 0.3 for side outputs by default). The reference
//! interpreter's weighted loss is checked against central finite differences in f64, and the
//! JIT engine (fused and naive) against the reference engine: loss, every gradient, with the
//! default weights and with custom ones (a zero weight removes a head from the gradient).

use cnnc_compiler::ir::{Graph, Loss};
use cnnc_compiler::lang;
use cnnc_compiler::plan::Fusion;
use cnnc_runtime::engine::{Engine, ReferenceEngine};
use cnnc_runtime::exec::JitEngine;
use cnnc_runtime::init::InitConfig;
use cnnc_runtime::params::ParamStore;
use cnnc_runtime::reference::{default_loss_weights, gradcheck::numerical_grad, loss_and_grad, loss_and_grad_weighted, Mode};
use ndarray::ArrayD;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Two side heads branching off the trunk at different depths (one of them off a value that
/// the main chain also consumes, so their gradients meet there).
const SRC: &str = "
model Aux(input: 2x7x9, classes = 4) {
    conv1: conv(5, 3x3, pad=1); relu;
    side { gap; flatten; aux1: dense(classes); }
    conv2: conv(6, 3x3, stride=2, pad=1); relu;
    side { flatten; aux2_fc: dense(7); relu; aux2: dense(classes); }
    gap; flatten;
    fc: dense(classes);
}";

fn graph() -> Graph {
    lang::parse_source("aux.cnn", SRC).unwrap().expand("Aux").unwrap()
}

fn random(len: usize, rng: &mut StdRng) -> Vec<f32> {
    (0..len)
        .map(|_| {
            let v: f32 = rng.random_range(0.1..1.5);
            if rng.random_bool(0.5) { v } else { -v }
        })
        .collect()
}

#[test]
fn side_outputs_get_the_default_weights() {
    let g = graph();
    assert_eq!(g.outputs().len(), 3);
    assert_eq!(default_loss_weights(&g), vec![1.0, 0.3, 0.3]);
}

#[test]
fn weighted_loss_is_the_weighted_sum_and_its_gradient_matches_finite_differences() {
    let g = graph();
    let p = ParamStore::<f64>::for_graph(&g, &InitConfig::pytorch(), 3).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let n = 3;
    let x = ArrayD::from_shape_vec(vec![n, 2, 7, 9], random(n * 2 * 7 * 9, &mut rng).into_iter().map(f64::from).collect()).unwrap();
    let labels = [1, 3, 0];
    let loss = Loss::SoftmaxCrossEntropy;
    // Each head alone (the others weighted 0), then the weighted total is their weighted sum.
    let alone: Vec<f64> = (0..3)
        .map(|i| {
            let mut w = vec![0.0; 3];
            w[i] = 1.0;
            loss_and_grad_weighted(&g, &p, x.view(), &labels, loss, &w, Mode::Train, 0).unwrap().loss
        })
        .collect();
    assert!(alone.iter().all(|&l| l > 0.0));
    let w = [1.0f32, 0.3, 0.7];
    let out = loss_and_grad_weighted(&g, &p, x.view(), &labels, loss, &w, Mode::Train, 0).unwrap();
    // (the weights are f32: 0.3f32 is not 0.3)
    let expect = alone[0] + f64::from(w[1]) * alone[1] + f64::from(w[2]) * alone[2];
    assert!((out.loss - expect).abs() < 1e-12 * expect.abs().max(1.0), "{} vs {expect}", out.loss);
    // The default weights are what loss_and_grad uses.
    let d = loss_and_grad(&g, &p, x.view(), &labels, loss, Mode::Train, 0).unwrap().loss;
    let aux = f64::from(0.3f32);
    assert!((d - (alone[0] + aux * alone[1] + aux * alone[2])).abs() < 1e-12 * d);
    // Input gradient against central differences of the weighted loss.
    let num = numerical_grad(x.view(), 1e-5, |xx| loss_and_grad_weighted(&g, &p, xx.view(), &labels, loss, &w, Mode::Train, 0).unwrap().loss);
    let input = g.inputs()[0];
    let ana = out.grads.node(input).expect("input gradient");
    let scale = num.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let err = ana.iter().zip(num.iter()).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
    assert!(scale > 0.0 && err / scale < 1e-6, "input gradient off by {:.2e} of {scale:.2e}", err);
    // A weight of 0 is the same as not having that head: aux2's layers then get no gradient.
    let z = loss_and_grad_weighted(&g, &p, x.view(), &labels, loss, &[1.0, 0.3, 0.0], Mode::Train, 0).unwrap();
    assert!(z.grads.params.slice("aux2.weight").unwrap().iter().all(|&v| v == 0.0));
    assert!(out.grads.params.slice("aux2.weight").unwrap().iter().any(|&v| v != 0.0));
    // Bad weights are errors naming the problem.
    let e = loss_and_grad_weighted(&g, &p, x.view(), &labels, loss, &[1.0, 0.3], Mode::Train, 0).unwrap_err().to_string();
    assert!(e.contains("2 loss weight(s) for 3 output(s)"), "{e}");
    let e = loss_and_grad_weighted(&g, &p, x.view(), &labels, loss, &[1.0, -0.3, 0.3], Mode::Train, 0).unwrap_err().to_string();
    assert!(e.contains("-0.3"), "{e}");
}

#[test]
fn jit_engine_matches_the_reference_with_auxiliary_heads() {
    let g = graph();
    let p0 = ParamStore::<f32>::for_graph(&g, &InitConfig::pytorch(), 5).unwrap();
    let mut rng = StdRng::seed_from_u64(21);
    for fusion in [Fusion::Full, Fusion::None] {
        for (weights, n) in [(None, 3usize), (Some([1.0f32, 0.5, 0.0]), 1), (Some([0.8, 0.3, 1.2]), 5)] {
            let mut jit = JitEngine::new(&g, Loss::SoftmaxCrossEntropy, 5, fusion).unwrap();
            let mut reference = ReferenceEngine::new(g.clone(), Loss::SoftmaxCrossEntropy);
            if let Some(w) = weights {
                jit.set_loss_weights(&w).unwrap();
                reference.set_loss_weights(&w).unwrap();
            }
            let x = random(n * 2 * 7 * 9, &mut rng);
            let labels: Vec<usize> = (0..n).map(|_| rng.random_range(0..4)).collect();
            let (mut pj, mut pr) = (p0.clone(), p0.clone());
            let (mut gj, mut gr) = (pj.zeros_like(), pr.zeros_like());
            let sj = jit.train_step(&mut pj, &mut gj, &x, &labels, 1).unwrap();
            let sr = reference.train_step(&mut pr, &mut gr, &x, &labels, 1).unwrap();
            let what = format!("{fusion:?} weights {weights:?} n={n}");
            assert!((sj.loss_sum - sr.loss_sum).abs() < 1e-4 * sr.loss_sum.abs(), "{what}: loss {} vs {}", sj.loss_sum, sr.loss_sum);
            assert_eq!(sj.correct, sr.correct, "{what}");
            let top = gr.flat().iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for info in pr.infos() {
                let (a, b) = (gj.slice(&info.name).unwrap(), gr.slice(&info.name).unwrap());
                let err = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
                assert!(err < 2e-3 * top, "{what}: gradient of {} off by {err:.2e} (largest gradient {top:.2e})", info.name);
            }
            let aux2 = gr.slice("aux2.weight").unwrap();
            assert_eq!(aux2.iter().all(|&v| v == 0.0), weights.is_some_and(|w| w[2] == 0.0), "{what}");
            // Inference returns the main head's logits.
            let lj = jit.infer(&pr, &x, n).unwrap();
            let lr = reference.infer(&pr, &x, n).unwrap();
            assert_eq!(lj.len(), n * 4);
            let err = lj.iter().zip(&lr).fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(err < 1e-4, "{what}: inference logits off by {err:.2e}");
        }
        let mut jit = JitEngine::new(&g, Loss::SoftmaxCrossEntropy, 2, fusion).unwrap();
        let e = jit.set_loss_weights(&[1.0, f32::NAN, 0.3]).unwrap_err().to_string();
        assert!(e.contains("aux1") && e.contains("NaN"), "{e}");
        let e = jit.set_loss_weights(&[1.0]).unwrap_err().to_string();
        assert!(e.contains("1 loss weight(s) for the 3 output(s)"), "{e}");
    }
}
