//! Throughput report of the JIT kernels: this machine's 128-bit FMA peak, the bare GEMM
//! micro-kernel (packed operands, no packing cost), and convolution forward / backward-data /
//! backward-weight, blocked vs naive (plus the blocked backward data storing its input gradient
//! rather than adding to it, `backward-data =`, and Winograd forward, backward-data and
//! backward-weight where a layer is eligible, in effective GFLOP/s), as GFLOP/s and fractions
//! of that peak, single-threaded, timed by thread CPU time ([`best_of`]). Used by
//! `benches/kernels.rs`.

use super::gemm::BareTiles;
use super::jit::Jit;
use super::hugebuf::HugeBuf;
use super::peak::{best_of, PeakKernel};
use super::{ConvKernels, Epilogue, EpilogueArgs, Mode};
use crate::ir::{Conv2d, Padding};
use crate::Result;
use std::fmt::Write;

/// One kernel row of [`conv_report`]: layer, op, mode, ms, GFLOP/s (`flops` in `secs`),
/// fraction of `peak`, then `note`.
#[allow(clippy::too_many_arguments)]
fn row(r: &mut String, layer: &str, op: &str, mode: &str, secs: f64, flops: f64, peak: f64, note: &str) {
    let gflops = flops / secs / 1e9;
    let _ = writeln!(r, "{layer:<22} {op:<16} {mode:>8} {:>10.2} {gflops:>9.1} {:>8.2}{note}", secs * 1e3, gflops / peak);
}

/// A convolution benchmark case.
#[derive(Clone, Debug)]
pub struct ConvCase {
    /// Label.
    pub name: &'static str,
    /// The layer.
    pub conv: Conv2d,
    /// Input `(C, H, W)`.
    pub input: (usize, usize, usize),
    /// Samples per call.
    pub batch: usize,
}

/// The two standard cases: ResNet's 3x3 64->64 and 1x1 256->64 on 56x56, batch 8.
pub fn standard_cases() -> Vec<ConvCase> {
    vec![
        ConvCase {
            name: "3x3 64->64 56x56 b8",
            conv: Conv2d::new(64, [3, 3]).pad(Padding::uniform(1)),
            input: (64, 56, 56),
            batch: 8,
        },
        ConvCase { name: "1x1 256->64 56x56 b8", conv: Conv2d::new(64, [1, 1]), input: (256, 56, 56), batch: 8 },
    ]
}

/// The layers of the training-step benchmarks, at half their batch (what one of two threads
/// gets): LeNet-5's two convolutions and the MNIST VGG's Winograd layers (batch 32), the mini
/// inception net's 3x3 convolutions and a 1x1, the narrowest Winograd layer, 16->16, and
/// the CIFAR inception net's factored 1x3 / 3x1 convolutions (1-D Winograd) and the shapes of
/// its ten 1x1 convolutions (nine distinct, batch 16).
pub fn small_cases() -> Vec<ConvCase> {
    let c = |out, k: usize, pad| Conv2d::new(out, [k, k]).pad(Padding::uniform(pad));
    // A factored 1x3 / 3x1 with "same" padding along its filtered axis.
    let f = |out, k: [usize; 2]| {
        let (v, h) = (k[0] / 2, k[1] / 2);
        Conv2d::new(out, k).pad(Padding::Explicit { top: v, bottom: v, left: h, right: h })
    };
    vec![
        ConvCase { name: "lenet c1 1->6 5x5 b32", conv: c(6, 5, 2), input: (1, 28, 28), batch: 32 },
        ConvCase { name: "lenet c2 6->16 5x5 b32", conv: c(16, 5, 0), input: (6, 14, 14), batch: 32 },
        ConvCase { name: "vgg 32->32 28x28 b32", conv: c(32, 3, 1), input: (32, 28, 28), batch: 32 },
        ConvCase { name: "vgg 32->64 14x14 b32", conv: c(64, 3, 1), input: (32, 14, 14), batch: 32 },
        ConvCase { name: "vgg 64->64 14x14 b32", conv: c(64, 3, 1), input: (64, 14, 14), batch: 32 },
        ConvCase { name: "16->16 3x3 32x32 b16", conv: c(16, 3, 1), input: (16, 32, 32), batch: 16 },
        ConvCase { name: "stem 3->32 3x3 b16", conv: c(32, 3, 1), input: (3, 32, 32), batch: 16 },
        ConvCase { name: "inc 16->32 3x3 b16", conv: c(32, 3, 1), input: (16, 32, 32), batch: 16 },
        ConvCase { name: "inc 24->48 3x3 b16", conv: c(48, 3, 1), input: (24, 16, 16), batch: 16 },
        ConvCase { name: "inc 80->48 1x1 b16", conv: c(48, 1, 0), input: (80, 16, 16), batch: 16 },
        ConvCase { name: "cifar 48->64 1x3 b16", conv: f(64, [1, 3]), input: (48, 32, 32), batch: 16 },
        ConvCase { name: "cifar 64->64 3x1 b16", conv: f(64, [3, 1]), input: (64, 32, 32), batch: 16 },
        ConvCase { name: "cifar 96->128 1x3 b16", conv: f(128, [1, 3]), input: (96, 16, 16), batch: 16 },
        ConvCase { name: "cifar 128->128 3x1 b16", conv: f(128, [3, 1]), input: (128, 16, 16), batch: 16 },
        ConvCase { name: "cifar 16->16 1x3 b16", conv: f(16, [1, 3]), input: (16, 32, 32), batch: 16 },
        ConvCase { name: "cifar 16->16 3x1 b16", conv: f(16, [3, 1]), input: (16, 32, 32), batch: 16 },
        ConvCase { name: "cifar 32->48 1x3 b16", conv: f(48, [1, 3]), input: (32, 16, 16), batch: 16 },
        ConvCase { name: "cifar 48->48 3x1 b16", conv: f(48, [3, 1]), input: (48, 16, 16), batch: 16 },
        ConvCase { name: "cifar 1x1 64->32 32x32 b16", conv: c(32, 1, 0), input: (64, 32, 32), batch: 16 },
        ConvCase { name: "cifar 1x1 64->48 32x32 b16", conv: c(48, 1, 0), input: (64, 32, 32), batch: 16 },
        ConvCase { name: "cifar 1x1 64->16 32x32 b16", conv: c(16, 1, 0), input: (64, 32, 32), batch: 16 },
        ConvCase { name: "cifar 1x1 128->40 16x16 b16", conv: c(40, 1, 0), input: (128, 16, 16), batch: 16 },
        ConvCase { name: "cifar 1x1 128->32 16x16 b16", conv: c(32, 1, 0), input: (128, 16, 16), batch: 16 },
        ConvCase { name: "cifar 1x1 128->48 16x16 b16", conv: c(48, 1, 0), input: (128, 16, 16), batch: 16 },
        ConvCase { name: "cifar 1x1 128->64 16x16 b16", conv: c(64, 1, 0), input: (128, 16, 16), batch: 16 },
        ConvCase { name: "cifar 1x1 128->96 16x16 b16", conv: c(96, 1, 0), input: (128, 16, 16), batch: 16 },
        ConvCase { name: "cifar 1x1 40->128 16x16 b16", conv: c(128, 1, 0), input: (40, 16, 16), batch: 16 },
    ]
}

/// Deterministic pseudo-random fill in `[-1, 1)` (no RNG dependency in the library).
pub fn fill(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// GFLOP/s of the bare micro-kernel on an `m x 8` panel with reduction `k`, run `panels`
/// times over the same packed operands (what a convolution's GEMM does without packing).
pub fn microkernel_gflops(m: usize, k: usize, panels: usize, reps: usize) -> Result<f64> {
    let mut tiles = BareTiles::compile(Jit::new("microkernel")?, m, k, panels)?;
    let secs = best_of(reps, || tiles.run());
    Ok(tiles.flops() / secs / 1e9)
}

/// Run the full report over `cases`; `naive` adds the naive kernels (slow: seconds per op).
pub fn conv_report(cases: &[ConvCase], naive: bool) -> Result<String> {
    let mut r = String::new();
    let peak = PeakKernel::compile()?.measure_gflops(30);
    let _ = writeln!(r, "128-bit FMA peak (JIT'd f32x4 fma loop, 1 thread): {peak:.1} GFLOP/s");
    let _ = writeln!(r, "{}", super::gemm::Broadcast::host_summary());
    for (m, k) in [(64, 576), (64, 256), (576, 64)] {
        let gf = microkernel_gflops(m, k, 392, 5)?;
        let _ = writeln!(r, "micro-kernel only, M={m} K={k} (392 panels of 8): {gf:.1} GFLOP/s = {:.2} of peak", gf / peak);
    }
    let _ = writeln!(r, "{:<22} {:<16} {:>8} {:>10} {:>9} {:>8}", "layer", "op", "mode", "ms", "GFLOP/s", "of peak");
    let modes: &[Mode] = if naive { &[Mode::Blocked, Mode::Naive] } else { &[Mode::Blocked] };
    for c in cases {
        for &mode in modes {
            // The direct / im2col kernels; Winograd gets its own row below.
            let k = ConvKernels::compile_with(c.name, &c.conv, c.input, Epilogue::default(), mode, super::ConvOptions { winograd: false, ..Default::default() })?;
            let g = *k.geometry();
            let flops = 2.0 * (c.batch * g.macs()) as f64;
            // Activations on huge pages, as the engine's arena holds them.
            let x = HugeBuf::from_slice(&fill(c.batch * g.in_numel(), 3));
            let w = fill(g.weight_numel(), 4);
            let b = fill(g.cout, 5);
            let mut out = HugeBuf::from_slice(&fill(c.batch * g.cout * g.pixels(), 6));
            let mut dx = HugeBuf::zeroed(x.len());
            let (mut dw, mut db) = (vec![0.0; w.len()], vec![0.0; g.cout]);
            let reps = if mode == Mode::Blocked { 5 } else { 1 };
            let mut err = None;
            for op in ["forward", "backward-data", "backward-weight"] {
                let secs = best_of(reps, || {
                    let res = match op {
                        "forward" => k.forward(&mut out, &x, &w, Some(&b), EpilogueArgs::default()),
                        "backward-data" => k.backward_data(&mut dx, &out, &w),
                        _ => k.backward_weight(&mut dw, Some(&mut db), &out, &x),
                    };
                    if let Err(e) = res {
                        err = Some(e);
                    }
                });
                if let Some(e) = err.take() {
                    return Err(e);
                }
                row(&mut r, c.name, op, &format!("{mode:?}"), secs, flops, peak, "");
            }
            if mode == Mode::Blocked {
                // Backward data storing `d_x` (`=`) rather than adding to it: what the engine
                // runs where the layer's input gradient starts (its input's only or first
                // consumer in backward order, `ConvOptions::overwrite_dx`).
                let opts = super::ConvOptions { winograd: false, overwrite_dx: true, ..Default::default() };
                let ko = ConvKernels::compile_with(c.name, &c.conv, c.input, Epilogue::default(), mode, opts)?;
                let mut res = Ok(());
                let secs = best_of(reps, || res = ko.backward_data(&mut dx, &out, &w));
                res?;
                row(&mut r, c.name, "backward-data =", "Blocked", secs, flops, peak, "");
                // Winograd where the layer is eligible: effective GFLOP/s (direct FLOPs).
                let opts = super::ConvOptions { winograd: true, ..Default::default() };
                let kw = ConvKernels::compile_with(c.name, &c.conv, c.input, Epilogue::default(), mode, opts)?;
                for (i, op) in ["forward", "backward-data", "backward-weight"].into_iter().enumerate() {
                    if kw.algorithms()[i] != "winograd" {
                        continue;
                    }
                    let mut res = Ok(());
                    let secs = best_of(reps, || {
                        res = match i {
                            0 => kw.forward(&mut out, &x, &w, Some(&b), EpilogueArgs::default()),
                            1 => kw.backward_data(&mut dx, &out, &w),
                            _ => kw.backward_weight(&mut dw, Some(&mut db), &out, &x),
                        }
                    });
                    res?;
                    row(&mut r, c.name, op, "Winograd", secs, flops, peak, "  (effective: direct-conv FLOPs / time)");
                }
            }
            let ms = k.compile_time().as_secs_f64() * 1e3;
            let _ = writeln!(
                r,
                "{:<22} compile ({mode:?}): {} kernels in {ms:.2} ms ({:.3} ms/kernel)",
                "",
                k.kernel_count(),
                ms / k.kernel_count() as f64
            );
        }
    }
    Ok(r)
}
