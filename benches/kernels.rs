//! JIT kernel benchmarks. First a table (`cnnc_compiler::lower::report`): this machine's
//! 128-bit FMA peak measured with a JIT'd loop of independent `fma` chains, the bare GEMM
//! micro-kernel, and convolution forward / backward-data / backward-weight for ResNet's
//! 3x3 64->64 and 1x1 256->64 layers on 56x56, batch 8, blocked vs naive, as GFLOP/s and
//! fractions of that peak (one thread, thread CPU time), with compile time per kernel. The
//! activations sit on huge pages (`lower::hugebuf`), as in the engine's arena.
//! Then criterion timings of the blocked kernels (throughput in FLOP/s).
//!
//! `cargo bench --bench kernels` runs both; `cargo bench --bench kernels -- --report-only`
//! prints only the table; `--blocked-only` leaves the (slow) naive rows out of it, `--small`
//! adds the small layers of the training-step benchmarks (`report::small_cases`), `--only TEXT`
//! keeps the table's cases whose name contains `TEXT` (e.g. `--only 1x1`).

use cnnc::compiler::lower::hugebuf::HugeBuf;
use cnnc::compiler::lower::report::{conv_report, fill, small_cases, standard_cases};
use cnnc::compiler::lower::{ConvKernels, Epilogue, EpilogueArgs, Mode};
use criterion::{Criterion, Throughput};

fn main() {
    let naive = !std::env::args().any(|a| a == "--blocked-only");
    let mut cases = standard_cases();
    if std::env::args().any(|a| a == "--small") {
        cases.extend(small_cases());
    }
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--only") {
        let text = args.get(i + 1).expect("--only TEXT");
        cases.retain(|c| c.name.contains(text.as_str()));
    }
    print!("{}", conv_report(&cases, naive).expect("kernel report"));
    if std::env::args().any(|a| a == "--report-only") {
        return;
    }
    let mut crit = Criterion::default().sample_size(10).configure_from_args();
    for c in standard_cases() {
        let k = ConvKernels::compile(c.name, &c.conv, c.input, Epilogue::default(), Mode::Blocked).expect("compile");
        let g = *k.geometry();
        // Activations on huge pages, as the engine's arena holds them.
        let x = HugeBuf::from_slice(&fill(c.batch * g.in_numel(), 1));
        let w = fill(g.weight_numel(), 2);
        let b = fill(g.cout, 3);
        let mut out = HugeBuf::from_slice(&fill(c.batch * g.cout * g.pixels(), 4));
        let mut dx = HugeBuf::zeroed(x.len());
        let (mut dw, mut db) = (vec![0.0; w.len()], vec![0.0; g.cout]);
        let mut group = crit.benchmark_group(c.name);
        group.throughput(Throughput::Elements(2 * (c.batch * g.macs()) as u64));
        group.bench_function("forward", |bch| {
            bch.iter(|| k.forward(&mut out, &x, &w, Some(&b), EpilogueArgs::default()).unwrap())
        });
        group.bench_function("backward-data", |bch| bch.iter(|| k.backward_data(&mut dx, &out, &w).unwrap()));
        group.bench_function("backward-weight", |bch| {
            bch.iter(|| k.backward_weight(&mut dw, Some(&mut db), &out, &x).unwrap())
        });
        group.finish();
    }
    crit.final_summary();
}
