//! The JIT-compiled optimiser updates (`cnnc_compiler::lower::optim`) against the Rust
//! reference (`OptimizerConfig::step`): every rule, random parameters/gradients/learning rates
//! (never zeros), odd lengths that exercise the `f32x4` body and the scalar tail, a length of
//! several pieces updated on all threads, several steps so the state feeds back. The kernels do the reference's operations in the same order, so
//! the results must be bit-identical, not merely close.

use cnnc_runtime::optim::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn configs() -> Vec<(&'static str, OptimizerConfig)> {
    vec![
        ("sgd", OptimizerConfig::sgd(0.1)),
        ("sgd+wd", OptimizerConfig::sgd(0.1).with_weight_decay(0.01)),
        ("momentum", OptimizerConfig::sgd_momentum(0.05, 0.9, false)),
        ("momentum+wd", OptimizerConfig::sgd_momentum(0.05, 0.9, false).with_weight_decay(5e-4)),
        ("nesterov", OptimizerConfig::sgd_momentum(0.05, 0.8, true).with_weight_decay(1e-3)),
        ("rmsprop", OptimizerConfig::rmsprop(0.01)),
        ("rmsprop+wd", OptimizerConfig::rmsprop(0.01).with_weight_decay(0.02)),
        (
            "rmsprop+momentum",
            OptimizerConfig::RmsProp { lr: 0.01, alpha: 0.9, eps: 1e-6, momentum: 0.7, weight_decay: 0.0, centered: false },
        ),
        (
            "rmsprop centred",
            OptimizerConfig::RmsProp { lr: 0.01, alpha: 0.95, eps: 1e-8, momentum: 0.0, weight_decay: 0.0, centered: true },
        ),
        (
            "rmsprop centred+momentum+wd",
            OptimizerConfig::RmsProp { lr: 0.02, alpha: 0.99, eps: 1e-7, momentum: 0.5, weight_decay: 1e-3, centered: true },
        ),
        ("adam", OptimizerConfig::adam(1e-3)),
        ("adam+l2", OptimizerConfig::adam(2e-3).with_weight_decay(0.01)),
        ("adamw", OptimizerConfig::adamw(1e-3, 0.05)),
        (
            "adam odd betas",
            OptimizerConfig::Adam { lr: 3e-3, beta1: 0.8, beta2: 0.95, eps: 1e-6, weight_decay: 0.0, decoupled_weight_decay: false },
        ),
    ]
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let v: f32 = rng.random_range(-1.0..1.0);
            // never exactly zero
            scale * if v.abs() < 1e-3 { 0.5 } else { v }
        })
        .collect()
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

#[test]
fn jit_updates_are_bit_identical_to_the_reference() {
    let mut rng = StdRng::seed_from_u64(0x5eed);
    // The last spans three 64Ki-value pieces and a partial one, updated at once on the pool's
    // threads (`optim::UPDATE_PIECE`).
    let lens = [1usize, 3, 4, 5, 7, 8, 33, 1027, 3 * (1 << 16) + 1027];
    for (what, cfg) in configs() {
        let mut reference = Optimizer::with_backend(cfg.clone(), UpdateBackend::Reference).unwrap();
        let mut jit = Optimizer::with_backend(cfg.clone(), UpdateBackend::Jit).unwrap();
        assert_eq!(reference.backend_in_use(), "reference");
        assert_eq!(jit.backend_in_use(), "jit", "{what}");
        let mut params: Vec<Vec<f32>> = lens.iter().map(|&n| random(&mut rng, n, 1.0)).collect();
        let mut params_jit = params.clone();
        for step in 1..=6u64 {
            reference.begin_step();
            jit.begin_step();
            let lr = cfg.lr() * rng.random_range(0.5f32..1.5);
            for (i, &n) in lens.iter().enumerate() {
                let grad = random(&mut rng, n, 0.1 * step as f32);
                let name = format!("t{i}");
                reference.update(&name, &mut params[i], &grad, lr).unwrap();
                jit.update(&name, &mut params_jit[i], &grad, lr).unwrap();
                assert!(
                    same_bits(&params[i], &params_jit[i]),
                    "{what}, step {step}, length {n}: parameters differ\n ref {:?}\n jit {:?}",
                    &params[i][..n.min(6)],
                    &params_jit[i][..n.min(6)]
                );
                let (sr, sj) = (reference.state(&name).unwrap(), jit.state(&name).unwrap());
                assert_eq!(sr.buffers.len(), sj.buffers.len());
                for ((bn, br), (_, bj)) in sr.buffers.iter().zip(&sj.buffers) {
                    assert!(same_bits(br, bj), "{what}, step {step}, length {n}: state {bn} differs");
                }
            }
        }
        // The update did something (not a no-op kernel).
        let init: Vec<Vec<f32>> = {
            let mut r = StdRng::seed_from_u64(0);
            lens.iter().map(|&n| random(&mut r, n, 1.0)).collect()
        };
        assert_ne!(init, params_jit, "{what}");
        assert_eq!(reference, jit, "{what}: optimiser states differ");
    }
}

#[test]
fn jit_step_function_matches_the_pure_step() {
    // The pure functions directly: `step` vs `step_jit` with one compiled kernel per rule.
    let mut rng = StdRng::seed_from_u64(11);
    for (what, cfg) in configs() {
        let n = 1029;
        let mut p_ref = random(&mut rng, n, 2.0);
        let mut p_jit = p_ref.clone();
        let (mut s_ref, mut s_jit) = (State::default(), State::default());
        let kernels =
            cnnc_compiler::lower::optim::UpdateKernel::compile(&[cfg.update_rule(1), cfg.update_rule(2)]).unwrap();
        for t in 1..=4u64 {
            let g = random(&mut rng, n, 0.3);
            let k = if t == 1 { &kernels[0] } else { &kernels[1] };
            cfg.step(&mut p_ref, &g, &mut s_ref, t, cfg.lr()).unwrap();
            cfg.step_jit(k, &mut p_jit, &g, &mut s_jit, t, cfg.lr()).unwrap();
            assert!(same_bits(&p_ref, &p_jit), "{what} step {t}");
            assert_eq!(s_ref, s_jit, "{what} step {t}");
        }
        // A kernel for another rule is refused, not run.
        let other = if matches!(cfg, OptimizerConfig::Adam { .. }) { OptimizerConfig::sgd(0.1) } else { OptimizerConfig::adam(0.1) };
        let k = cnnc_compiler::lower::optim::UpdateKernel::compile(&[other.update_rule(2)]).unwrap();
        let e = cfg.step_jit(&k[0], &mut p_jit, &vec![0.5; n], &mut s_jit, 5, 0.1).unwrap_err().to_string();
        assert!(e.contains("kernel for"), "{e}");
    }
}

#[test]
fn auto_backend_and_bad_input() {
    // Plain SGD stays on the Rust loop under Auto (memory-bound: the kernel does not win);
    // every rule with state runs compiled.
    assert_eq!(Optimizer::new(OptimizerConfig::sgd(0.1)).unwrap().backend_in_use(), "reference");
    assert_eq!(Optimizer::new(OptimizerConfig::sgd_momentum(0.1, 0.9, true)).unwrap().backend_in_use(), "jit");
    assert_eq!(Optimizer::new(OptimizerConfig::adam(1e-3)).unwrap().backend_in_use(), "jit");
    assert_eq!(Optimizer::new(OptimizerConfig::rmsprop(1e-3)).unwrap().backend_in_use(), "jit");

    // Wrong sizes through the JIT path are errors naming the tensor, never a panic.
    let mut o = Optimizer::with_backend(OptimizerConfig::adam(1e-3), UpdateBackend::Jit).unwrap();
    o.begin_step();
    let mut p = vec![0.5f32; 5];
    let e = o.update("fc.weight", &mut p, &[0.1; 4], 1e-3).unwrap_err().to_string();
    assert!(e.contains("tensor fc.weight") && e.contains("gradient has 4"), "{e}");
    o.update("fc.weight", &mut p, &[0.1; 5], 1e-3).unwrap();
    let mut q = vec![0.5f32; 6];
    let e = o.update("fc.weight", &mut q, &[0.1; 6], 1e-3).unwrap_err().to_string();
    assert!(e.contains("tensor fc.weight") && e.contains("needs"), "{e}");
    let e = o.update("fc.bias", &mut p, &[0.1; 5], f32::NAN).unwrap_err().to_string();
    assert!(e.contains("learning rate"), "{e}");

    // An empty tensor is a no-op, not an out-of-bounds access.
    let mut empty: Vec<f32> = Vec::new();
    o.update("empty", &mut empty, &[], 1e-3).unwrap();
    assert_eq!(o.state("empty").unwrap().buffers[0].1.len(), 0);

    // The compiler-level API checks its buffers too.
    let k = cnnc_compiler::lower::optim::UpdateKernel::compile(&[OptimizerConfig::adam(1e-3).update_rule(1)]).unwrap();
    let (mut m, mut v) = (vec![0.0f32; 5], vec![0.0f32; 4]);
    let e = k[0].run(&[0.0; 9], &mut p, &[0.1; 5], &mut [&mut m, &mut v]).unwrap_err().to_string();
    assert!(e.contains("state buffer 1 has 4 values"), "{e}");
    let e = k[0].run(&[0.0; 3], &mut p, &[0.1; 5], &mut [&mut m]).unwrap_err().to_string();
    assert!(e.contains("3 scalars given"), "{e}");
}
