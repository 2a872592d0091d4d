//! JIT kernel benchmarks: this machine's 128-bit FMA peak (a JIT'd loop of independent `fma`
//! chains), then GFLOP/s of convolution forward, backward-data and backward-weight for two
//! ResNet-style layers, blocked vs naive, as fractions of that peak (single thread), plus
//! compile time per kernel. Then criterion timings of the blocked kernels.
//!
//! `cargo bench --bench kernels` runs both; `cargo bench --bench kernels -- --report-only`
//! prints only the table.

use cnnc::compiler::ir::{Conv2d, Padding};
use cnnc::compiler::lower::peak::{best_of, PeakKernel};
use cnnc::compiler::lower::{ConvKernels, Epilogue, EpilogueArgs, Mode};
use criterion::{Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Case {
    name: &'static str,
    conv: Conv2d,
    cin: usize,
    hw: usize,
    batch: usize,
}

fn cases() -> Vec<Case> {
    vec![
        Case { name: "3x3 64->64 56x56 b8", conv: Conv2d::new(64, [3, 3]).pad(Padding::uniform(1)), cin: 64, hw: 56, batch: 8 },
        Case { name: "1x1 256->64 56x56 b8", conv: Conv2d::new(64, [1, 1]), cin: 256, hw: 56, batch: 8 },
    ]
}

struct Bufs {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    out: Vec<f32>,
    dx: Vec<f32>,
    dw: Vec<f32>,
    db: Vec<f32>,
}

fn bufs(k: &ConvKernels, batch: usize) -> Bufs {
    let g = k.geometry();
    let mut rng = StdRng::seed_from_u64(7);
    let mut r = |n: usize| (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect::<Vec<_>>();
    Bufs {
        x: r(batch * g.in_numel()),
        w: r(g.weight_numel()),
        b: r(g.cout),
        out: r(batch * g.cout * g.pixels()),
        dx: vec![0.0; batch * g.in_numel()],
        dw: vec![0.0; g.weight_numel()],
        db: vec![0.0; g.cout],
    }
}

fn run(k: &ConvKernels, bf: &mut Bufs, which: usize) {
    match which {
        0 => k.forward(&mut bf.out, &bf.x, &bf.w, Some(&bf.b), EpilogueArgs::default()).unwrap(),
        1 => k.backward_data(&mut bf.dx, &bf.out, &bf.w).unwrap(),
        _ => k.backward_weight(&mut bf.dw, Some(&mut bf.db), &bf.out, &bf.x).unwrap(),
    }
}

const OPS: [&str; 3] = ["forward", "backward-data", "backward-weight"];

fn report() {
    let peak = PeakKernel::compile().expect("peak kernel").measure_gflops(20);
    println!("128-bit FMA peak (JIT'd f32x4 fma loop, 1 thread): {peak:.1} GFLOP/s");
    println!("{:<22} {:<16} {:>8} {:>10} {:>9} {:>8}", "layer", "op", "mode", "ms", "GFLOP/s", "of peak");
    for c in cases() {
        for mode in [Mode::Blocked, Mode::Naive] {
            let k = ConvKernels::compile(c.name, &c.conv, (c.cin, c.hw, c.hw), Epilogue::default(), mode).unwrap();
            let flops = 2.0 * (c.batch * k.geometry().macs()) as f64;
            let mut bf = bufs(&k, c.batch);
            for (op, name) in OPS.iter().enumerate() {
                let reps = if mode == Mode::Blocked { 5 } else { 1 };
                let s = best_of(reps, || run(&k, &mut bf, op));
                let gf = flops / s / 1e9;
                println!("{:<22} {:<16} {:>8} {:>10.2} {:>9.1} {:>8.2}", c.name, name, format!("{mode:?}"), s * 1e3, gf, gf / peak);
            }
            println!(
                "{:<22} compile: {} kernels in {:.2} ms ({:.3} ms/kernel)",
                "",
                k.kernel_count(),
                k.compile_time().as_secs_f64() * 1e3,
                k.compile_time().as_secs_f64() * 1e3 / k.kernel_count() as f64
            );
        }
    }
}

fn main() {
    report();
    if std::env::args().any(|a| a == "--report-only") {
        return;
    }
    let mut crit = Criterion::default().sample_size(10).configure_from_args();
    for c in cases() {
        let k = ConvKernels::compile(c.name, &c.conv, (c.cin, c.hw, c.hw), Epilogue::default(), Mode::Blocked).unwrap();
        let mut bf = bufs(&k, c.batch);
        let mut group = crit.benchmark_group(c.name);
        group.throughput(Throughput::Elements(2 * (c.batch * k.geometry().macs()) as u64));
        for (op, name) in OPS.iter().enumerate() {
            group.bench_function(*name, |b| b.iter(|| run(&k, &mut bf, op)));
        }
        group.finish();
    }
    crit.final_summary();
}
