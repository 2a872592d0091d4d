//! Max pooling per-call timings on one thread: the three pools of the CIFAR inception training
//! step (3x3/1 pad 1 on 64x32x32 and 128x16x16, 2x2/2 on 128x32x32). Each call pools one sample,
//! as the engine does; the calls sweep a batch of 32 samples (`--batch N`) so the data streams
//! from memory rather than staying in cache. Prints the median over `--reps N` (default 21) sweeps of the
//! time per call, in microseconds: forward with winners, forward without (inference and the
//! training step's recomputation), backward accumulating into `d_x`, the same after zeroing
//! `d_x` (what a step that starts the gradient's life costs with it), and
//! `backward_overwrite`.
//!
//! `cargo bench --bench pool [-- --reps N --batch N]`

use cnnc::compiler::ir::{Padding, Pool2d, PoolKind};
use cnnc::compiler::lower::pool::PoolKernels;
use std::time::Instant;


fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median over `reps` sweeps of `f(sample)` over the batch, per call, in µs.
fn time(reps: usize, batch: usize, mut f: impl FnMut(usize)) -> f64 {
    (0..batch).for_each(&mut f);
    median(
        (0..reps)
            .map(|_| {
                let t = Instant::now();
                (0..batch).for_each(&mut f);
                t.elapsed().as_secs_f64() * 1e6 / batch as f64
            })
            .collect(),
    )
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| args.iter().position(|a| a == name).map_or(default, |i| args[i + 1].parse().expect("a number"));
    let (reps, batch) = (arg("--reps", 21), arg("--batch", 32));
    println!("{:<34} {:>10} {:>10} {:>10} {:>10} {:>10}", "pool (one sample, 1 thread)", "fwd+am µs", "fwd µs", "bwd µs", "0+bwd µs", "bwd= µs");
    for (name, k, s, pad, (c, h)) in [("3x3/1 pad 1 on 64x32x32", 3, 1, 1, (64, 32)), ("2x2/2 on 128x32x32", 2, 2, 0, (128, 32)), ("3x3/1 pad 1 on 128x16x16", 3, 1, 1, (128, 16))] {
        let mut p = Pool2d::new(PoolKind::Max, k, s);
        p.padding = Padding::uniform(pad);
        let pk = PoolKernels::new(name, &p, (c, h, h)).expect("pool");
        let (_, oh, ow) = pk.out_shape();
        let (inp, num) = (c * h * h, c * oh * ow);
        // Distinct-ish values with some ties (a pseudo-random walk over a few hundred levels).
        let x: Vec<f32> = (0..batch * inp).map(|i| ((i as u64 * 2_654_435_761) % 509) as f32 * 0.01 - 2.5).collect();
        let mut out = vec![0.0f32; batch * num];
        let mut am = vec![0u8; batch * num];
        let mut dx = vec![0.0f32; batch * inp];
        let d_out: Vec<f32> = (0..batch * num).map(|i| (i % 7) as f32 * 0.5 - 1.0).collect();
        let fwd_am = time(reps, batch, |s| {
            pk.forward(&mut out[s * num..(s + 1) * num], Some(&mut am[s * num..(s + 1) * num]), &x[s * inp..(s + 1) * inp]).unwrap()
        });
        let fwd = time(reps, batch, |s| pk.forward(&mut out[s * num..(s + 1) * num], None, &x[s * inp..(s + 1) * inp]).unwrap());
        pk.forward(&mut out, None, &x).unwrap();
        for s in 0..batch {
            pk.forward(&mut out[s * num..(s + 1) * num], Some(&mut am[s * num..(s + 1) * num]), &x[s * inp..(s + 1) * inp]).unwrap();
        }
        let bwd = time(reps, batch, |s| pk.backward(&mut dx[s * inp..(s + 1) * inp], &d_out[s * num..(s + 1) * num], Some(&am[s * num..(s + 1) * num])).unwrap());
        let zero_bwd = time(reps, batch, |s| {
            dx[s * inp..(s + 1) * inp].fill(0.0);
            pk.backward(&mut dx[s * inp..(s + 1) * inp], &d_out[s * num..(s + 1) * num], Some(&am[s * num..(s + 1) * num])).unwrap()
        });
        let bwd_set = time(reps, batch, |s| {
            pk.backward_overwrite(&mut dx[s * inp..(s + 1) * inp], &d_out[s * num..(s + 1) * num], Some(&am[s * num..(s + 1) * num])).unwrap()
        });
        println!("{name:<34} {fwd_am:>10.1} {fwd:>10.1} {bwd:>10.1} {zero_bwd:>10.1} {bwd_set:>10.1}");
    }
}
