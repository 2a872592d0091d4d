//! Optimiser-update benchmark: the Rust reference loops (`OptimizerConfig::step`) against the
//! JIT-compiled fused kernels (`OptimizerConfig::step_jit`, `cnnc_compiler::lower::optim`), per
//! rule, on one parameter buffer of LeNet-5's size (61,706 values, cache-resident) and one of
//! 4M values (64 MiB of parameter+gradient+state traffic per Adam step, memory-bound). The
//! reference loop runs on one thread; the JIT update of a tensor larger than one piece
//! (64Ki values) runs its pieces on the rayon pool (`RAYON_NUM_THREADS=1` for one thread).
//! The two are timed alternately, step after step, and the table shows the medians and their
//! ratio (taken within the run, so a busy machine affects both alike).
//!
//! Run: `cargo bench --bench optim` (`OPTIM_BENCH_REPS=n` changes the number of timed steps
//! per size, default 41).

use cnnc_compiler::lower::optim::UpdateKernel;
use cnnc_runtime::optim::{OptimizerConfig, State};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; accept and ignore libtest-style flags.
    let reps: usize = std::env::var("OPTIM_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(41).max(3);
    let rules = [
        ("sgd", OptimizerConfig::sgd(0.01)),
        ("sgd+wd", OptimizerConfig::sgd(0.01).with_weight_decay(5e-4)),
        ("momentum", OptimizerConfig::sgd_momentum(0.01, 0.9, false)),
        ("nesterov+wd", OptimizerConfig::sgd_momentum(0.01, 0.9, true).with_weight_decay(5e-4)),
        ("rmsprop", OptimizerConfig::rmsprop(1e-3)),
        (
            "rmsprop centred+mom",
            OptimizerConfig::RmsProp { lr: 1e-3, alpha: 0.99, eps: 1e-8, momentum: 0.9, weight_decay: 0.0, centered: true },
        ),
        ("adam", OptimizerConfig::adam(1e-3)),
        ("adamw", OptimizerConfig::adamw(1e-3, 0.01)),
    ];
    println!(
        "optimiser update, medians of {reps} steps (Rust reference loop, one thread, vs JIT kernel, {} thread(s) on tensors of more than 64Ki values)",
        rayon::current_num_threads()
    );
    println!("{:<22} {:>10} {:>12} {:>12} {:>9} {:>12}", "rule", "values", "rust", "jit", "speedup", "jit GB/s");
    for n in [61_706usize, 4 << 20] {
        for (name, cfg) in &rules {
            let kernels = UpdateKernel::compile(&[cfg.update_rule(1), cfg.update_rule(2)]).expect("compile");
            let grad: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 - 499.5) * 1e-4).collect();
            let mut p_ref: Vec<f32> = (0..n).map(|i| ((i * 104_729 % 2000) as f32 - 999.5) * 1e-3).collect();
            let mut p_jit = p_ref.clone();
            let (mut s_ref, mut s_jit) = (State::default(), State::default());
            let (mut t_ref, mut t_jit) = (Vec::new(), Vec::new());
            for t in 1..=(reps as u64 + 1) {
                let k = if t == 1 { &kernels[0] } else { &kernels[1] };
                let t0 = Instant::now();
                cfg.step(&mut p_ref, &grad, &mut s_ref, t, cfg.lr()).expect("step");
                let a = t0.elapsed().as_secs_f64();
                let t0 = Instant::now();
                cfg.step_jit(k, &mut p_jit, &grad, &mut s_jit, t, cfg.lr()).expect("step_jit");
                let b = t0.elapsed().as_secs_f64();
                if t > 1 {
                    // step 1 allocates the state: not timed
                    t_ref.push(a);
                    t_jit.push(b);
                }
            }
            assert!(
                p_ref.iter().zip(&p_jit).all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name}: JIT and reference disagree"
            );
            let (r, j) = (median(t_ref), median(t_jit));
            // bytes moved per step: read grad, read+write param and each state buffer
            let streams = 1 + 2 * (1 + cfg.buffer_names().len());
            let gbs = (streams * n * 4) as f64 / j / 1e9;
            println!(
                "{name:<22} {n:>10} {:>9.1} us {:>9.1} us {:>8.2}x {gbs:>12.1}",
                r * 1e6,
                j * 1e6,
                r / j
            );
        }
    }
}
