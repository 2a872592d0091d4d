//! Dense (fully connected) layers as GEMMs over the batch, on the JIT GEMM or on naive loops.
//!
//! ## Layouts
//! `x`: `[n, I]` (a `C x H x W` input is read flat, `I = C*H*W`); `w`: `[O, I]` (PyTorch's
//! `Linear`); `b`: `[O]`; `out`, `d_out`: `[n, O]`. `n` is whatever the slices hold.
//!
//! ## Maths
//! - forward: `out[n, O] = act(x[n, I] · Wᵀ + b)` (bias and activation fused per column);
//! - backward data: `d_x[n, I] += d_out[n, O] · W[O, I]`;
//! - backward weight: `d_W[O, I] += d_outᵀ[O, n] · x[n, I]` (samples reduced in blocks of 32,
//!   the last block zero-padded), `d_b[o] += Σ_n d_out[n, o]`.
//!
//! `backward_*` take the gradient of the pre-activation result (`x·Wᵀ + b`).

use super::entry::Kernel;
use super::gemm::{pack_a, pack_b_panel, BiasKind, EpiArgs, FusedAct, Gemm, GemmPlan, GemmSpec, NR};
use super::jit::Jit;
use super::naive;
use super::scratch::{self, grow};
use super::Mode;
use crate::ir::Dense;
use crate::{Error, Result};
use std::time::Duration;

/// Samples per block of the weight-gradient reduction.
const WGRAD_BLOCK: usize = 32;

#[derive(Debug)]
enum Impl {
    Blocked { fwd: Gemm, bwd_data: Gemm, bwd_w: Gemm },
    Naive { fwd: Kernel, bwd_data: Kernel, bwd_w: Kernel },
}

/// The blocked drivers' buffers, one holder per thread ([`SCRATCH`]) shared by every dense
/// layer run on it, so a steady-state step allocates none of them (see `lower::scratch`).
/// Each is written before it is read in a call.
#[derive(Default)]
struct DenseScratch {
    /// The packed `A` operand (the batch's inputs or output gradients).
    apack: Vec<f32>,
    /// One packed `B` panel.
    panel: Vec<f32>,
    /// The weight gradient's last block of output gradients and inputs, zero-padded to a
    /// whole block.
    dpad: Vec<f32>,
    xpad: Vec<f32>,
}

thread_local! {
    /// This thread's [`DenseScratch`].
    static SCRATCH: std::cell::RefCell<DenseScratch> = std::cell::RefCell::new(DenseScratch::default());
}

/// The compiled kernels of one dense layer. `Send + Sync`.
#[derive(Debug)]
pub struct DenseKernels {
    layer: String,
    in_f: usize,
    out_f: usize,
    bias: bool,
    act: FusedAct,
    imp: Impl,
    compile_time: Duration,
}

impl DenseKernels {
    /// Compile `dense` (named `layer` in errors) on `in_features` inputs, with a fused
    /// activation on the forward pass (`FusedAct::None` for none).
    pub fn compile(layer: &str, dense: &Dense, in_features: usize, act: FusedAct, mode: Mode) -> Result<DenseKernels> {
        let (i, o) = (in_features, dense.out_features);
        if i == 0 || o == 0 {
            return Err(Error::Codegen {
                layer: layer.to_string(),
                message: format!("dense {i} -> {o}: both sizes must be >= 1"),
            });
        }
        let mut jit = Jit::new(layer)?;
        let imp = match mode {
            Mode::Blocked => {
                let fs = GemmSpec {
                    bias: if dense.bias { BiasKind::Col } else { BiasKind::None },
                    act,
                    ..GemmSpec::plain(None, o, i, o, false)
                };
                let f = GemmPlan::define(&mut jit, "dense_fwd", fs)?;
                let d = GemmPlan::define(&mut jit, "dense_bwd_data", GemmSpec::plain(None, i, o, i, true))?;
                let w = GemmPlan::define(&mut jit, "dense_bwd_w", GemmSpec::plain(Some(o), i, WGRAD_BLOCK, i, true))?;
                let fin = jit.finish()?;
                (Impl::Blocked { fwd: f.resolve(&fin), bwd_data: d.resolve(&fin), bwd_w: w.resolve(&fin) }, fin.compile_time)
            }
            Mode::Naive => {
                let (f, d, w) = naive::define_dense(&mut jit, i, o, dense.bias)?;
                let fin = jit.finish()?;
                let k = |id: super::jit::KernelId| fin.kernels[id.0].clone();
                (Impl::Naive { fwd: k(f), bwd_data: k(d), bwd_w: k(w) }, fin.compile_time)
            }
        };
        Ok(DenseKernels {
            layer: layer.to_string(),
            in_f: i,
            out_f: o,
            bias: dense.bias,
            act,
            imp: imp.0,
            compile_time: imp.1,
        })
    }

    /// Time spent in Cranelift for this layer.
    pub fn compile_time(&self) -> Duration {
        self.compile_time
    }

    fn err(&self, m: String) -> Error {
        Error::Codegen { layer: self.layer.clone(), message: m }
    }

    fn samples(&self, what: &str, len: usize, per: usize) -> Result<usize> {
        if !len.is_multiple_of(per) {
            return Err(self.err(format!("{what} has {len} elements, not a multiple of {per} per sample")));
        }
        Ok(len / per)
    }

    fn check(&self, what: &str, len: usize, want: usize) -> Result<()> {
        if len != want {
            return Err(self.err(format!("{what} has {len} elements, expected {want}")));
        }
        Ok(())
    }

    fn bias_arg<'a>(&self, b: Option<&'a [f32]>) -> Result<&'a [f32]> {
        match (self.bias, b) {
            (true, Some(b)) => {
                self.check("bias", b.len(), self.out_f)?;
                Ok(b)
            }
            (false, None) => Ok(&[]),
            (true, None) => Err(self.err("bias missing".into())),
            (false, Some(_)) => Err(self.err("bias given to a layer without one".into())),
        }
    }

    /// Forward: `out = act(x · Wᵀ + b)` for every sample in `x`.
    pub fn forward(&self, out: &mut [f32], x: &[f32], w: &[f32], b: Option<&[f32]>) -> Result<()> {
        let (i, o) = (self.in_f, self.out_f);
        let n = self.samples("input", x.len(), i)?;
        self.check("output", out.len(), n * o)?;
        self.check("weights", w.len(), o * i)?;
        let bias = self.bias_arg(b)?;
        if n == 0 {
            return Ok(());
        }
        match &self.imp {
            Impl::Blocked { fwd, .. } => scratch::with(&SCRATCH, |sc| {
                pack_a(&mut sc.apack, x, n, i, i, 1);
                let panel = grow(&mut sc.panel, i * NR);
                let epi = EpiArgs { bias, ..Default::default() };
                for j0 in (0..o).step_by(NR) {
                    // B = Wᵀ: element (k, j) at j*I + k.
                    pack_b_panel(panel, w, i, j0, NR.min(o - j0), 1, i);
                    fwd.run_panel(out, j0, n, j0, &sc.apack, panel, &epi);
                }
            }),
            Impl::Naive { fwd, .. } => {
                for s in 0..n {
                    let row = &mut out[s * o..(s + 1) * o];
                    fwd.call(row, [&x[s * i..(s + 1) * i], w, bias, &[], &[], &[]]);
                    for v in row.iter_mut() {
                        *v = self.act.apply(*v);
                    }
                }
            }
        }
        Ok(())
    }

    /// Backward data: `d_x += d_out · W`.
    pub fn backward_data(&self, d_x: &mut [f32], d_out: &[f32], w: &[f32]) -> Result<()> {
        let (i, o) = (self.in_f, self.out_f);
        let n = self.samples("input gradient", d_x.len(), i)?;
        self.check("output gradient", d_out.len(), n * o)?;
        self.check("weights", w.len(), o * i)?;
        if n == 0 {
            return Ok(());
        }
        match &self.imp {
            Impl::Blocked { bwd_data, .. } => scratch::with(&SCRATCH, |sc| {
                pack_a(&mut sc.apack, d_out, n, o, o, 1);
                bwd_data.run_strided_b(d_x, 0, n, &sc.apack, w, i, 1, &EpiArgs::default(), &mut sc.panel);
            }),
            Impl::Naive { bwd_data, .. } => {
                for s in 0..n {
                    bwd_data.call(&mut d_x[s * i..(s + 1) * i], [&d_out[s * o..(s + 1) * o], w, &[], &[], &[], &[]]);
                }
            }
        }
        Ok(())
    }

    /// [`backward_data`](Self::backward_data) with `before_sample` run on each sample's
    /// `d_out` row in place first, the contract of
    /// [`ConvKernels::backward_data_with`](super::ConvKernels::backward_data_with). The dense
    /// GEMM reads the whole batch at once, so here the hook runs over every row before it
    /// (a pass of its own, not fused).
    pub fn backward_data_with(&self, d_x: &mut [f32], d_out: &mut [f32], w: &[f32], before_sample: super::GradHook<'_>) -> Result<()> {
        let n = self.samples("input gradient", d_x.len(), self.in_f)?;
        self.check("output gradient", d_out.len(), n * self.out_f)?;
        let super::GradHook(h) = before_sample;
        for (s, row) in d_out.chunks_exact_mut(self.out_f).enumerate() {
            h(s, row)?;
        }
        self.backward_data(d_x, d_out, w)
    }

    /// Backward weight: `d_w += d_outᵀ · x`, and `d_b += Σ_n d_out` for a layer with bias.
    pub fn backward_weight(&self, d_w: &mut [f32], d_b: Option<&mut [f32]>, d_out: &[f32], x: &[f32]) -> Result<()> {
        let (i, o) = (self.in_f, self.out_f);
        let n = self.samples("input", x.len(), i)?;
        self.check("output gradient", d_out.len(), n * o)?;
        self.check("weight gradient", d_w.len(), o * i)?;
        match (self.bias, d_b) {
            (true, Some(db)) => {
                self.check("bias gradient", db.len(), o)?;
                for s in 0..n {
                    for (d, v) in db.iter_mut().zip(&d_out[s * o..(s + 1) * o]) {
                        *d += v;
                    }
                }
            }
            (false, None) => {}
            (true, None) => return Err(self.err("bias gradient missing".into())),
            (false, Some(_)) => return Err(self.err("bias gradient given to a layer without bias".into())),
        }
        match &self.imp {
            Impl::Blocked { bwd_w, .. } => scratch::with(&SCRATCH, |sc| {
                let DenseScratch { apack, panel, dpad, xpad } = sc;
                for s0 in (0..n).step_by(WGRAD_BLOCK) {
                    let kb = WGRAD_BLOCK.min(n - s0);
                    let (db, xb): (&[f32], &[f32]) = if kb == WGRAD_BLOCK {
                        (&d_out[s0 * o..], &x[s0 * i..])
                    } else {
                        // Zero-pad the last block: zero samples add nothing.
                        dpad.clear();
                        dpad.extend_from_slice(&d_out[s0 * o..(s0 + kb) * o]);
                        dpad.resize(WGRAD_BLOCK * o, 0.0);
                        xpad.clear();
                        xpad.extend_from_slice(&x[s0 * i..(s0 + kb) * i]);
                        xpad.resize(WGRAD_BLOCK * i, 0.0);
                        (dpad, xpad)
                    };
                    // A = d_outᵀ: element (o, s) at s*O + o. B = x: element (s, i) at s*I + i.
                    pack_a(apack, db, o, WGRAD_BLOCK, 1, o);
                    bwd_w.run_strided_b(d_w, 0, o, apack, xb, i, 1, &EpiArgs::default(), panel);
                }
            }),
            Impl::Naive { bwd_w, .. } => {
                for s in 0..n {
                    bwd_w.call(d_w, [&d_out[s * o..(s + 1) * o], &x[s * i..(s + 1) * i], &[], &[], &[], &[]]);
                }
            }
        }
        Ok(())
    }
}
