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
//!   the rest in blocks of 8, the last zero-padded), `d_b[o] += Σ_n d_out[n, o]`; any range of
//!   output rows on its own ([`DenseKernels::backward_weight_rows`]), so that threads can split
//!   a large layer's weight gradient by rows, each over the whole batch.
//!
//! `backward_*` take the gradient of the pre-activation result (`x·Wᵀ + b`).

use super::entry::Kernel;
use super::gemm::{pack_a, pack_b_block, pack_b_panel, BiasKind, EpiArgs, FusedAct, Gemm, GemmPlan, GemmSpec, MR, NR};
use super::jit::Jit;
use super::naive;
use super::scratch::{self, grow};
use super::Mode;
use crate::ir::Dense;
use crate::{Error, Result};
use std::ops::Range;
use std::time::Duration;

/// Samples per block of the weight-gradient reduction.
const WGRAD_BLOCK: usize = 32;
/// Samples per block of the weight-gradient reduction's rest (fewer than [`WGRAD_BLOCK`]
/// samples left): a batch of 1 to 8 pads to 8 rather than 32, a quarter of the arithmetic on
/// the zero samples, where a large layer's weight gradient at a small batch is that padding.
const WGRAD_TAIL: usize = 8;
/// Row panels (of 4 rows) of the weight gradient per sweep across its columns.
const WGRAD_ROW_PANELS: usize = 16;
/// Input columns of the backward data's `B` (the weights) packed at a time.
const DATA_COLS: usize = 64;
/// Weights (1 MiB of them) from which [`DenseKernels::data_col_parts`] splits the backward
/// data by input columns rather than leaving the batch split: LeNet-5's 120 KiB fc1 is
/// below, AlexNet's fc6, fc7 and fc8 (151, 67 and 16 MB) far above.
pub const DATA_SPLIT_MIN_WEIGHTS: usize = 256 << 10;

#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per layer, built once: boxing would buy nothing
enum Impl {
    /// `bwd`: `None` when compiled forward only ([`DenseKernels::compile_forward`]).
    Blocked { fwd: Gemm, bwd: Option<BlockedBwd> },
    /// `bwd`: the backward data and weight-gradient kernels, `None` when compiled forward
    /// only.
    Naive { fwd: Kernel, bwd: Option<(Kernel, Kernel)> },
}

/// The blocked backward kernels: `w`, the weight gradient over [`WGRAD_BLOCK`] samples;
/// `w_tail` over [`WGRAD_TAIL`]. Both for any number of rows.
#[derive(Debug)]
struct BlockedBwd {
    data: Gemm,
    w: Gemm,
    w_tail: Gemm,
}

/// The blocked drivers' buffers, one holder per thread ([`SCRATCH`]) shared by every dense
/// layer run on it, so a steady-state step allocates none of them (see `lower::scratch`).
/// Each is written before it is read in a call.
#[derive(Default)]
struct DenseScratch {
    /// The packed `A` operand (the batch's inputs or output gradients).
    apack: Vec<f32>,
    /// Packed `B` panels: one (forward), a block of the weights' columns (backward data), or
    /// all of a sample block's inputs (weight gradient).
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
        Self::compile_impl(layer, dense, in_features, act, mode, false)
    }

    /// [`compile`](Self::compile) the forward kernel only: the backward methods then return
    /// an error naming the layer (a part of a layer whose forward threads split by output
    /// features, which never runs a backward of its own).
    pub fn compile_forward(layer: &str, dense: &Dense, in_features: usize, act: FusedAct, mode: Mode) -> Result<DenseKernels> {
        Self::compile_impl(layer, dense, in_features, act, mode, true)
    }

    fn compile_impl(layer: &str, dense: &Dense, in_features: usize, act: FusedAct, mode: Mode, forward_only: bool) -> Result<DenseKernels> {
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
                let bwd = if forward_only {
                    None
                } else {
                    let d = GemmPlan::define(&mut jit, "dense_bwd_data", GemmSpec::plain(None, i, o, i, true))?;
                    let w = GemmPlan::define(&mut jit, "dense_bwd_w", GemmSpec::plain(None, i, WGRAD_BLOCK, i, true))?;
                    let wt = GemmPlan::define(&mut jit, "dense_bwd_w_tail", GemmSpec::plain(None, i, WGRAD_TAIL, i, true))?;
                    Some((d, w, wt))
                };
                let fin = jit.finish()?;
                let bwd = bwd.map(|(d, w, wt)| BlockedBwd { data: d.resolve(&fin), w: w.resolve(&fin), w_tail: wt.resolve(&fin) });
                (Impl::Blocked { fwd: f.resolve(&fin), bwd }, fin.compile_time)
            }
            Mode::Naive => {
                let (f, bwd) = if forward_only {
                    (naive::define_dense_forward(&mut jit, i, o, dense.bias)?, None)
                } else {
                    let (f, d, w) = naive::define_dense(&mut jit, i, o, dense.bias)?;
                    (f, Some((d, w)))
                };
                let fin = jit.finish()?;
                let k = |id: super::jit::KernelId| fin.kernels[id.0].clone();
                (Impl::Naive { fwd: k(f), bwd: bwd.map(|(d, w)| (k(d), k(w))) }, fin.compile_time)
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

    /// The error of a backward asked of kernels compiled forward only.
    fn forward_only(&self, what: &str) -> Error {
        self.err(format!("{what} asked of kernels compiled for the forward only"))
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
        self.backward_data_cols(d_x, 0..self.in_f, d_out, w)
    }

    /// Columns `cols` of the backward data: `d_x[:, cols] += d_out · W[:, cols]` (`d_x`: the
    /// whole `[n, I]` gradient, its other columns untouched), reading only those columns of
    /// the weights: threads splitting a large layer by columns ([`Self::data_col_parts`])
    /// read the weights once between them, where splitting the batch has each read all of
    /// them. `cols` starts at a multiple of 8 and ends at one or at `I`.
    pub fn backward_data_cols(&self, d_x: &mut [f32], cols: Range<usize>, d_out: &[f32], w: &[f32]) -> Result<()> {
        let (i, o) = (self.in_f, self.out_f);
        if cols.start > cols.end || cols.end > i || !cols.start.is_multiple_of(NR) || !(cols.end == i || cols.end.is_multiple_of(NR)) {
            return Err(self.err(format!("input columns {cols:?}: not within 0..{i} in whole {NR}-column panels")));
        }
        let n = self.samples("input gradient", d_x.len(), i)?;
        self.check("output gradient", d_out.len(), n * o)?;
        self.check("weights", w.len(), o * i)?;
        if n == 0 {
            return Ok(());
        }
        match &self.imp {
            Impl::Blocked { bwd: None, .. } | Impl::Naive { bwd: None, .. } => return Err(self.forward_only("input gradient")),
            Impl::Blocked { bwd: Some(BlockedBwd { data: bwd_data, .. }), .. } => scratch::with(&SCRATCH, |sc| {
                pack_a(&mut sc.apack, d_out, n, o, o, 1);
                // B = W (`O x I`, row-major): [`DATA_COLS`] columns' panels at a time, packed
                // from whole row segments (`pack_b_block`), not panel by panel down all `O`
                // rows (a different page every row, on 4 KiB pages a TLB miss each).
                let panel = grow(&mut sc.panel, o * DATA_COLS);
                for j0 in cols.clone().step_by(DATA_COLS) {
                    let cols = DATA_COLS.min(cols.end - j0);
                    pack_b_block(panel, w, o, j0, cols, i);
                    for (t, jt) in (j0..j0 + cols).step_by(NR).enumerate() {
                        bwd_data.run_panel(d_x, jt, n, jt, &sc.apack, &panel[t * o * NR..], &EpiArgs::default());
                    }
                }
            }),
            Impl::Naive { bwd: Some((bwd_data, _)), .. } => {
                // The naive kernel computes whole rows, adding into them: straight into `d_x`
                // for all columns (what the engine asks of it, `data_col_parts`), else each
                // into a scratch row whose columns are added from there.
                let whole = cols == (0..i);
                let mut row = if whole { Vec::new() } else { vec![0.0; i] };
                for s in 0..n {
                    let args = [&d_out[s * o..(s + 1) * o], w, &[][..], &[], &[], &[]];
                    if whole {
                        bwd_data.call(&mut d_x[s * i..(s + 1) * i], args);
                    } else {
                        row.fill(0.0);
                        bwd_data.call(&mut row, args);
                        d_x[s * i..(s + 1) * i][cols.clone()].iter_mut().zip(&row[cols.clone()]).for_each(|(d, v)| *d += v);
                    }
                }
            }
        }
        Ok(())
    }

    /// Backward weight: `d_w += d_outᵀ · x`, and `d_b += Σ_n d_out` for a layer with bias.
    pub fn backward_weight(&self, d_w: &mut [f32], d_b: Option<&mut [f32]>, d_out: &[f32], x: &[f32]) -> Result<()> {
        let o = self.out_f;
        // Every check before anything is written.
        let db = match (self.bias, d_b) {
            (true, Some(db)) => {
                self.check("bias gradient", db.len(), o)?;
                Some(db)
            }
            (false, None) => None,
            (true, None) => return Err(self.err("bias gradient missing".into())),
            (false, Some(_)) => return Err(self.err("bias gradient given to a layer without bias".into())),
        };
        self.backward_weight_rows(d_w, 0..o, d_out, x)?;
        match db {
            Some(db) => self.backward_bias(db, d_out, 0..o),
            None => Ok(()),
        }
    }

    /// `d_b[r] += Σ_n d_out[n, r]` for the output rows `r` in `rows` (`d_b`: those rows).
    pub fn backward_bias(&self, d_b: &mut [f32], d_out: &[f32], rows: Range<usize>) -> Result<()> {
        let o = self.out_f;
        self.check_rows(&rows)?;
        self.check("bias gradient", d_b.len(), rows.len())?;
        if !d_out.len().is_multiple_of(o) {
            return Err(self.err(format!("output gradient has {} elements, not a multiple of {o} per sample", d_out.len())));
        }
        for row in d_out.chunks_exact(o) {
            d_b.iter_mut().zip(&row[rows.clone()]).for_each(|(d, v)| *d += v);
        }
        Ok(())
    }

    /// Rows `rows` of the weight gradient: `d_w += d_out[:, rows]ᵀ · x` (`d_w`: those rows of
    /// `d_W`, `rows.len() x I`), over every sample. Disjoint row ranges write disjoint
    /// memory and each reads the whole batch, so threads can split a layer this way
    /// ([`Self::weight_row_parts`]); each element's sum runs over the same sample blocks in
    /// the same order however the rows are split.
    pub fn backward_weight_rows(&self, d_w: &mut [f32], rows: Range<usize>, d_out: &[f32], x: &[f32]) -> Result<()> {
        let (i, o) = (self.in_f, self.out_f);
        let n = self.samples("input", x.len(), i)?;
        self.check("output gradient", d_out.len(), n * o)?;
        self.check_rows(&rows)?;
        self.check("weight gradient", d_w.len(), rows.len() * i)?;
        if rows.is_empty() {
            return Ok(());
        }
        match &self.imp {
            Impl::Blocked { bwd: None, .. } | Impl::Naive { bwd: None, .. } => return Err(self.forward_only("weight gradient")),
            Impl::Blocked { bwd: Some(BlockedBwd { w: bwd_w, w_tail: bwd_w_tail, .. }), .. } => scratch::with(&SCRATCH, |sc| {
                let DenseScratch { apack, panel, dpad, xpad } = sc;
                let mut s0 = 0;
                while s0 < n {
                    let (kern, kb) = if n - s0 >= WGRAD_BLOCK { (bwd_w, WGRAD_BLOCK) } else { (bwd_w_tail, WGRAD_TAIL) };
                    let real = kb.min(n - s0);
                    let (db, xb): (&[f32], &[f32]) = if real == kb {
                        (&d_out[s0 * o..], &x[s0 * i..])
                    } else {
                        // Zero-pad the last block: zero samples add nothing.
                        dpad.clear();
                        dpad.extend_from_slice(&d_out[s0 * o..(s0 + real) * o]);
                        dpad.resize(kb * o, 0.0);
                        xpad.clear();
                        xpad.extend_from_slice(&x[s0 * i..(s0 + real) * i]);
                        xpad.resize(kb * i, 0.0);
                        (dpad, xpad)
                    };
                    // A = d_out[:, rows]ᵀ: element (r, s) at s*O + rows.start + r. B = x:
                    // element (s, i) at s*I + i, all its panels packed at once (`kb` rows).
                    pack_a(apack, &db[rows.start..], rows.len(), kb, 1, o);
                    let bp = grow(panel, kb * i.next_multiple_of(NR));
                    pack_b_block(bp, xb, kb, 0, i, i);
                    // Blocks of row panels, each swept across every column: `d_w` is written
                    // [`WGRAD_ROW_PANELS`] rows at a time, row by row in order (column panel
                    // by column panel over all rows, each 4 x 8 tile was on 4 pages).
                    let panels = rows.len().div_ceil(MR);
                    for p0 in (0..panels).step_by(WGRAD_ROW_PANELS) {
                        let ps = p0..(p0 + WGRAD_ROW_PANELS).min(panels);
                        for (t, j0) in (0..i).step_by(NR).enumerate() {
                            kern.run_panels(d_w, j0, rows.len(), ps.clone(), j0, NR.min(i - j0), apack, &bp[t * kb * NR..], &EpiArgs::default());
                        }
                    }
                    s0 += real;
                }
            }),
            Impl::Naive { bwd: Some((_, bwd_w)), .. } => {
                // The naive kernel computes every row, adding into its gradient: straight into
                // `d_w` for all rows (what the engine asks of it, `weight_row_parts`), else
                // into a scratch gradient whose rows are added from there.
                let call = |g: &mut [f32]| (0..n).for_each(|s| bwd_w.call(g, [&d_out[s * o..(s + 1) * o], &x[s * i..(s + 1) * i], &[], &[], &[], &[]]));
                if rows == (0..o) {
                    call(d_w);
                } else {
                    let mut full = vec![0.0; o * i];
                    call(&mut full);
                    d_w.iter_mut().zip(&full[rows.start * i..rows.end * i]).for_each(|(d, v)| *d += v);
                }
            }
        }
        Ok(())
    }

    /// Input-column ranges splitting this layer's backward data across `threads` threads
    /// ([`Self::backward_data_cols`]): about `I / threads` columns each, in whole 8-column
    /// panels (the last may be shorter). One range for the naive kernels, and for weights
    /// under [`DATA_SPLIT_MIN_WEIGHTS`] (threads splitting the batch then read them from
    /// cache).
    pub fn data_col_parts(&self, threads: usize) -> Vec<Range<usize>> {
        let i = self.in_f;
        let threads = if matches!(self.imp, Impl::Naive { .. }) || !self.is_large() { 1 } else { threads.max(1) };
        let width = i.div_ceil(threads).next_multiple_of(NR);
        (0..i).step_by(width).map(|c| c..(c + width).min(i)).collect()
    }

    /// Whether the layer has at least [`DATA_SPLIT_MIN_WEIGHTS`] weights: large enough that
    /// threads should split it by its columns or features rather than by samples.
    pub fn is_large(&self) -> bool {
        self.in_f * self.out_f >= DATA_SPLIT_MIN_WEIGHTS
    }

    /// Output-row ranges splitting this layer's weight gradient across `threads` threads
    /// ([`Self::backward_weight_rows`]): about `O / threads` rows each, in whole 4-row panels of
    /// the GEMM (the last may be shorter); fewer ranges where the layer has fewer panels. The
    /// naive kernels compute all rows at once: one range.
    pub fn weight_row_parts(&self, threads: usize) -> Vec<Range<usize>> {
        let o = self.out_f;
        let threads = if matches!(self.imp, Impl::Naive { .. }) { 1 } else { threads.max(1) };
        let width = o.div_ceil(threads).next_multiple_of(MR);
        (0..o).step_by(width).map(|r| r..(r + width).min(o)).collect()
    }

    fn check_rows(&self, rows: &Range<usize>) -> Result<()> {
        if rows.start > rows.end || rows.end > self.out_f {
            return Err(self.err(format!("output rows {rows:?} outside 0..{}", self.out_f)));
        }
        Ok(())
    }
}
