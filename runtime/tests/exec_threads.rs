//! The JIT engine called from different threads: from a program's own thread (the engine moves
//! the step onto the rayon pool), from a pool thread, and from several threads at once, each
//! with its own engine on the shared pool (whose threads the engine keeps polling for work
//! during a step: `exec::KeepHot`). Every call must finish and give, bit for bit, the loss,
//! gradients and logits of one engine stepping alone.

mod common;

use cnnc_compiler::ir::*;
use cnnc_compiler::plan::Fusion;
use common::*;
use cnnc_runtime::engine::Engine;
use cnnc_runtime::exec::JitEngine;
use cnnc_runtime::params::ParamStore;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::mpsc;
use std::time::Duration;

/// conv-bn-relu, a pooled conv-bn-relu, a dense head: several parallel loops per layer,
/// batch-norm reductions across the threads' chunks, and weight-gradient partials.
fn net() -> Graph {
    let mut g = Graph::new("threads");
    let x = g.input("input", Shape::chw(3, 13, 11)).unwrap();
    let r1 = conv_bn_relu(&mut g, 1, conv(8, 3).pad(Padding::uniform(1)).bias(false), x);
    let r2 = conv_bn_relu(&mut g, 2, conv(16, 3).pad(Padding::uniform(1)).bias(false), r1);
    let p = g.add("pool", maxpool(2, 2), &[r2]).unwrap();
    let f = g.add("flatten", Op::Flatten, &[p]).unwrap();
    g.add("fc", dense(10), &[f]).unwrap();
    g
}

/// What a run of `STEPS` steps gives: each step's loss and flattened gradients, then the
/// logits of an inference with the final parameters.
type Trace = (Vec<f64>, Vec<Vec<f32>>, Vec<f32>);

const STEPS: u64 = 4;
const BATCH: usize = 7;

fn batch(g: &Graph, step: u64) -> (Vec<f32>, Vec<usize>) {
    let mut rng = StdRng::seed_from_u64(100 + step);
    let numel = g.node(g.inputs()[0]).shape.numel();
    let x = (0..BATCH * numel)
        .map(|_| {
            let v: f32 = rng.random_range(0.1..2.0);
            if rng.random_bool(0.5) { v } else { -v }
        })
        .collect();
    let labels = (0..BATCH).map(|_| rng.random_range(0..10)).collect();
    (x, labels)
}

/// Build an engine and train `STEPS` plain SGD steps on fixed batches, from whatever thread
/// calls it.
fn run(g: &Graph) -> Trace {
    let mut e = JitEngine::new(g, Loss::SoftmaxCrossEntropy, BATCH, Fusion::Full).unwrap();
    let mut p: ParamStore = params_for(g, 5);
    let mut grads = p.zeros_like();
    let (mut losses, mut all) = (Vec::new(), Vec::new());
    for step in 0..STEPS {
        let (x, labels) = batch(g, step);
        let s = e.train_step(&mut p, &mut grads, &x, &labels, step).unwrap();
        losses.push(s.loss_sum);
        all.push(grads.flat().to_vec());
        p.flat_mut().iter_mut().zip(grads.flat()).for_each(|(w, d)| *w -= 0.05 * d);
    }
    let (x, _) = batch(g, STEPS);
    let logits = e.infer(&p, &x, BATCH).unwrap();
    (losses, all, logits)
}

/// `f` on its own thread, failing the test if it has not finished within a minute (a hang
/// would otherwise stall the suite).
fn within_a_minute<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("{what}: did not finish within a minute"))
}

fn assert_same(what: &str, a: &Trace, b: &Trace) {
    assert_eq!(a.0, b.0, "{what}: losses");
    for (s, (x, y)) in a.1.iter().zip(&b.1).enumerate() {
        assert!(x == y, "{what}: gradients of step {s} differ");
    }
    assert!(a.2 == b.2, "{what}: logits differ");
    assert!(a.1.iter().all(|g| g.iter().any(|&v| v != 0.0)), "{what}: a step with all-zero gradients");
}

#[test]
fn engines_give_the_same_results_from_any_thread_and_stepping_at_once() {
    let g = net();
    // From a thread outside the pool (the step moves onto it).
    let alone = {
        let g = g.clone();
        within_a_minute("one engine", move || run(&g))
    };
    // From a pool thread (runs where it is); then eight engines at once from their own
    // threads and eight from inside a parallel loop on the pool's threads: their steps
    // interleave, each keeping the other threads polling.
    let traces = within_a_minute("sixteen engines at once", {
        let g = g.clone();
        move || {
            let mut all = vec![rayon::scope(|_| run(&g))];
            let outside: Vec<_> = (0..8)
                .map(|_| {
                    let g = g.clone();
                    std::thread::spawn(move || run(&g))
                })
                .collect();
            use rayon::prelude::*;
            let inside: Vec<Trace> = (0..8).into_par_iter().map(|_| run(&g)).collect();
            all.extend(outside.into_iter().map(|h| h.join().unwrap()));
            all.extend(inside);
            all
        }
    });
    assert_eq!(traces.len(), 17);
    assert_same("called from a pool thread", &traces[0], &alone);
    for (i, t) in traces[1..].iter().enumerate() {
        assert_same(&format!("engine {i} of sixteen at once"), t, &alone);
    }
}
