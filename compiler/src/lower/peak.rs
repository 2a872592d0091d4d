//! This machine's 128-bit FMA peak, measured with a JIT'd loop of independent `f32x4` `fma`
//! chains (enough of them to cover the FMA latency on every port), and a best-of timing helper.
//! The benchmarks report kernel GFLOP/s as a fraction of this peak.

use super::entry::Kernel;
use super::jit::{emit, Jit};
use crate::Result;
use cranelift_codegen::ir::types::F32X4;
use cranelift_codegen::ir::{BlockArg, InstBuilder};
use std::time::Instant;

/// Independent accumulator chains (12 of the 16 XMM registers).
pub const CHAINS: usize = 12;
/// Loop iterations per call.
pub const ITERS: usize = 1 << 18;
/// Floating-point operations per call: `ITERS * CHAINS * 4 lanes * 2`.
pub const FLOPS_PER_CALL: f64 = (ITERS * CHAINS * 4 * 2) as f64;

/// The compiled peak loop: `out[0..48] = fma chains seeded from in[0..8]`.
pub struct PeakKernel {
    kernel: Kernel,
}

impl PeakKernel {
    /// Compile the loop. It has no GEMM tiles, so it builds without the host's
    /// [`Broadcast`](super::gemm::Broadcast) choice (whose timing measures this peak too).
    pub fn compile() -> Result<PeakKernel> {
        let mut jit = Jit::with_broadcast("fma_peak", super::gemm::Broadcast::Folded)?;
        let id = jit.define("fma_peak", [CHAINS * 4, 8, 0, 0, 0, 0, 0], |b, a| {
            let x = emit::ld4(b, a[1], 0);
            let y = emit::ld4(b, a[1], 4);
            let head = b.create_block();
            let exit = b.create_block();
            let params: Vec<_> = (0..CHAINS).map(|_| b.append_block_param(head, F32X4)).collect();
            let ctr = b.append_block_param(head, cranelift_codegen::ir::types::I64);
            let n = b.ins().iconst(cranelift_codegen::ir::types::I64, ITERS as i64);
            let init: Vec<BlockArg> = (0..CHAINS).map(|_| BlockArg::Value(y)).chain([BlockArg::Value(n)]).collect();
            b.ins().jump(head, &init);
            b.switch_to_block(head);
            let next: Vec<_> = params.iter().map(|&p| b.ins().fma(p, x, y)).collect();
            let c1 = b.ins().iadd_imm_s(ctr, -1);
            let args: Vec<BlockArg> = next.iter().map(|&v| BlockArg::Value(v)).chain([BlockArg::Value(c1)]).collect();
            let outs: Vec<_> = (0..CHAINS).map(|_| b.append_block_param(exit, F32X4)).collect();
            let exit_args: Vec<BlockArg> = next.iter().map(|&v| BlockArg::Value(v)).collect();
            b.ins().brif(c1, head, &args, exit, &exit_args);
            b.seal_block(head);
            b.switch_to_block(exit);
            b.seal_block(exit);
            for (i, &v) in outs.iter().enumerate() {
                emit::st(b, v, a[0], (i * 4) as i64);
            }
            b.ins().return_(&[]);
        })?;
        let fin = jit.finish()?;
        Ok(PeakKernel { kernel: fin.kernels[id.0].clone() })
    }

    /// Run once; returns the chains' final values (so the work cannot be elided).
    pub fn run(&self, seed: [f32; 8]) -> [f32; CHAINS * 4] {
        let mut out = [0.0f32; CHAINS * 4];
        self.kernel.call(&mut out, [&seed, &[], &[], &[], &[], &[]]);
        out
    }

    /// Measured 128-bit FMA peak in GFLOP/s on one thread (best of `reps` calls).
    pub fn measure_gflops(&self, reps: usize) -> f64 {
        let seed = [0.999f32, 0.999, 0.999, 0.999, 1e-3, 1e-3, 1e-3, 1e-3];
        let secs = best_of(reps, || {
            std::hint::black_box(self.run(seed));
        });
        FLOPS_PER_CALL / secs / 1e9
    }
}

/// Seconds of the fastest of `reps` runs of `f` (after one warm-up run), by [`thread_time`].
pub fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = thread_time();
        f();
        best = best.min(thread_time() - t);
    }
    best
}

/// Seconds this thread has spent on a CPU ([`entry::thread_cpu_time`](super::entry::thread_cpu_time)),
/// so timings are not inflated by other processes on a shared machine; falls back to
/// wall-clock time where unavailable.
pub fn thread_time() -> f64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    super::entry::thread_cpu_time().unwrap_or_else(|| START.get_or_init(Instant::now).elapsed().as_secs_f64())
}
