//! Elementwise activations and batch normalisation, forward and backward (plain Rust loops
//! written so rustc auto-vectorises them; these ops are memory-bound).
//!
//! All functions follow the `X_forward`/`X_backward` convention: outputs first, gradients
//! accumulated with `+=`, lengths checked (an error names `layer`); the per-sample batch-norm
//! backward can instead overwrite a gradient nothing else has written yet ([`GradWrite`]), so
//! the runtime need not zero its buffer first.
//!
//! Batch norm works on a whole batch `[n, C, H, W]` (statistics span the batch). Each pass is
//! also given as its two phases, so a runtime can split it over threads deterministically:
//! per-channel reductions ([`batchnorm_channel_stats`], [`batchnorm_grad_sums`]: one
//! thread per channel, fixed order inside), then per-sample elementwise work
//! ([`channel_affine_act`], [`batchnorm_backward_sample`]).
//!
//! ## Reductions
//! Sums run in 8 independent f32 lanes (vectorised) over blocks of [`BLOCK`] values, each
//! block's lanes then added in f64 (by an out-of-line `lanes_f64`, which is what makes rustc
//! vectorise the lane loops), in a fixed order: deterministic, and a lane sums at most
//! `BLOCK/8` values in f32. Batch statistics take two passes per channel plane `p` of `hw`
//! values (the second one from cache): a plane centre `c_p` (its f32 mean), then
//! `D_p = Σ (x - c_p)` and `Q_p = Σ (x - c_p)²`. Over the `M` values of the channel,
//! `mean = Σ_p (hw*c_p + D_p) / M` and, since `x - mean = (x - c_p) + (c_p - mean)`,
//! `Σ (x - mean)² = Σ_p [Q_p + 2 (c_p - mean) D_p + hw (c_p - mean)²]` (in f64): no
//! cancellation between large sums, whatever the channel's mean.
//!
//! ## A ReLU after the normalisation
//! `y = max(z, 0)` with `z = x*a + b` (the forward's affine map, recomputed bit for bit from
//! the saved statistics) fuses into both passes: the forward writes `y` directly, and the
//! backward masks `d_out` where `z <= 0` as it reads it (`d_z = [z > 0] d_out`, exactly the
//! gradient `[y > 0] d_out` of the separate activation), saving a pass over the tensor each way.

use crate::ir::Activation;
use crate::{Error, Result};
use std::ops::Range;

fn err(layer: &str, m: String) -> Error {
    Error::Codegen { layer: layer.to_string(), message: m }
}

fn same_len(layer: &str, what: &[(&str, usize)]) -> Result<()> {
    let n = what[0].1;
    for &(name, len) in what {
        if len != n {
            return Err(err(layer, format!("{name} has {len} elements, expected {n} (as {})", what[0].0)));
        }
    }
    Ok(())
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `out = act(x)`.
pub fn activation_forward(layer: &str, act: Activation, out: &mut [f32], x: &[f32]) -> Result<()> {
    same_len(layer, &[("input", x.len()), ("output", out.len())])?;
    match act {
        Activation::Relu => out.iter_mut().zip(x).for_each(|(o, &v)| *o = v.max(0.0)),
        Activation::LeakyRelu { slope } => {
            out.iter_mut().zip(x).for_each(|(o, &v)| *o = if v > 0.0 { v } else { slope * v })
        }
        Activation::Elu { alpha } => {
            out.iter_mut().zip(x).for_each(|(o, &v)| *o = if v > 0.0 { v } else { alpha * v.exp_m1() })
        }
        Activation::Sigmoid => out.iter_mut().zip(x).for_each(|(o, &v)| *o = sigmoid(v)),
        Activation::Tanh => out.iter_mut().zip(x).for_each(|(o, &v)| *o = v.tanh()),
    }
    Ok(())
}

/// `d_x += d_out * act'(x)`, from the activation's input `x`:
/// relu `[x>0]`; leaky `x>0 ? 1 : slope`; elu `x>0 ? 1 : alpha*e^x`; sigmoid `s(1-s)`;
/// tanh `1 - tanh²x`.
pub fn activation_backward(layer: &str, act: Activation, d_x: &mut [f32], d_out: &[f32], x: &[f32]) -> Result<()> {
    same_len(layer, &[("input", x.len()), ("input gradient", d_x.len()), ("output gradient", d_out.len())])?;
    let it = d_x.iter_mut().zip(d_out).zip(x);
    match act {
        Activation::Relu => it.for_each(|((d, &g), &v)| *d += if v > 0.0 { g } else { 0.0 }),
        Activation::LeakyRelu { slope } => it.for_each(|((d, &g), &v)| *d += if v > 0.0 { g } else { slope * g }),
        Activation::Elu { alpha } => it.for_each(|((d, &g), &v)| *d += if v > 0.0 { g } else { g * alpha * v.exp() }),
        Activation::Sigmoid => it.for_each(|((d, &g), &v)| {
            let s = sigmoid(v);
            *d += g * s * (1.0 - s)
        }),
        Activation::Tanh => it.for_each(|((d, &g), &v)| {
            let t = v.tanh();
            *d += g * (1.0 - t * t)
        }),
    }
    Ok(())
}

/// `d_x += d_out * act'(x)` computed from the activation's *output* `y` (what a GEMM epilogue
/// with a fused activation leaves behind): relu `[y>0]`; leaky `y>0 ? 1 : slope` (needs
/// `slope > 0`); elu `y>0 ? 1 : y + alpha`; sigmoid `y(1-y)`; tanh `1 - y²`.
pub fn activation_backward_from_output(layer: &str, act: Activation, d_x: &mut [f32], d_out: &[f32], y: &[f32]) -> Result<()> {
    same_len(layer, &[("output", y.len()), ("input gradient", d_x.len()), ("output gradient", d_out.len())])?;
    let it = d_x.iter_mut().zip(d_out).zip(y);
    match act {
        Activation::Relu => it.for_each(|((d, &g), &v)| *d += if v > 0.0 { g } else { 0.0 }),
        Activation::LeakyRelu { slope } => {
            if slope <= 0.0 {
                return Err(err(layer, format!("leaky_relu slope {slope} <= 0: the gradient is not a function of the output")));
            }
            it.for_each(|((d, &g), &v)| *d += if v > 0.0 { g } else { slope * g })
        }
        Activation::Elu { alpha } => it.for_each(|((d, &g), &v)| *d += if v > 0.0 { g } else { g * (v + alpha) }),
        Activation::Sigmoid => it.for_each(|((d, &g), &v)| *d += g * v * (1.0 - v)),
        Activation::Tanh => it.for_each(|((d, &g), &v)| *d += g * (1.0 - v * v)),
    }
    Ok(())
}

/// Values per f32 partial sum of the vectorised reductions before it joins the f64 total (8
/// lanes of `BLOCK/8` values each).
pub const BLOCK: usize = 256;

/// `Σ v` in f64, from 8 f32 lanes per [`BLOCK`] (vectorised, and as accurate as a serial f32
/// sum or better).
pub fn sum_f64(v: &[f32]) -> f64 {
    let mut total = 0.0f64;
    for blk in v.chunks(BLOCK) {
        let mut acc = [0.0f32; 8];
        let mut it = blk.chunks_exact(8);
        for c in &mut it {
            let c: [f32; 8] = c.try_into().unwrap_or_default();
            for j in 0..8 {
                acc[j] += c[j];
            }
        }
        total += lanes_f64(&acc) + it.remainder().iter().map(|&r| r as f64).sum::<f64>();
    }
    total
}

/// `Σ acc` in f64, in lane order: how a block's 8 f32 lanes join its f64 total. Out of line on
/// purpose: a lane loop feeding it stores its lanes as two whole vectors, and that is what gets
/// the loop vectorised (added up in place, the 8 accumulators came out as scalar or split
/// 2+4+1+1 lanes, with scalar `subss`/`mulss` in `plane_stats` and the gradient sums); a call
/// per block of up to [`BLOCK`] values costs little.
#[inline(never)]
fn lanes_f64(acc: &[f32; 8]) -> f64 {
    acc.iter().map(|&a| a as f64).sum::<f64>()
}

/// `(Σ (v - c), Σ (v - c)²)` in f64, from 8 f32 lanes per [`BLOCK`].
fn centred_sums(v: &[f32], c: f32) -> (f64, f64) {
    let (mut d, mut q) = (0.0f64, 0.0f64);
    for blk in v.chunks(BLOCK) {
        let (mut ad, mut aq) = ([0.0f32; 8], [0.0f32; 8]);
        let mut it = blk.chunks_exact(8);
        for ch in &mut it {
            let ch: [f32; 8] = ch.try_into().unwrap_or_default();
            for j in 0..8 {
                let e = ch[j] - c;
                ad[j] += e;
                aq[j] += e * e;
            }
        }
        for &r in it.remainder() {
            let e = (r - c) as f64;
            d += e;
            q += e * e;
        }
        d += lanes_f64(&ad);
        q += lanes_f64(&aq);
    }
    (d, q)
}

/// `y = act(y)` in place (the formulas of [`activation_forward`]).
pub fn activation_inplace(act: Activation, v: &mut [f32]) {
    match act {
        Activation::Relu => v.iter_mut().for_each(|y| *y = y.max(0.0)),
        Activation::LeakyRelu { slope } => v.iter_mut().for_each(|y| *y = if *y > 0.0 { *y } else { slope * *y }),
        Activation::Elu { alpha } => v.iter_mut().for_each(|y| *y = if *y > 0.0 { *y } else { alpha * y.exp_m1() }),
        Activation::Sigmoid => v.iter_mut().for_each(|y| *y = sigmoid(*y)),
        Activation::Tanh => v.iter_mut().for_each(|y| *y = y.tanh()),
    }
}

/// Batch statistics saved by the training forward pass for the backward pass.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BnSaved {
    /// Per-channel batch mean.
    pub mean: Vec<f32>,
    /// Per-channel `1 / sqrt(var + eps)` (biased batch variance).
    pub rstd: Vec<f32>,
}

/// Shape of a batch-norm call: `n` samples of `c` channels of `hw` pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnShape {
    /// Samples.
    pub n: usize,
    /// Channels.
    pub c: usize,
    /// Pixels per channel (`H*W`; 1 after a dense layer).
    pub hw: usize,
}

impl BnShape {
    fn numel(&self) -> usize {
        self.n * self.c * self.hw
    }
    fn check(&self, layer: &str, what: &str, len: usize, want: usize) -> Result<()> {
        if len != want {
            return Err(err(layer, format!("batchnorm {what} has {len} elements, expected {want}")));
        }
        Ok(())
    }
}

/// Batch statistics of channel `ch` over every sample and pixel of `x` (`[n, c, hw]`):
/// `(mean, Σ (x - mean)²)`, from per-plane centred sums combined in f64 (see the module
/// header). Reads `x` only, so a runtime computes channels on several threads at once.
pub fn batchnorm_channel_stats(shape: BnShape, ch: usize, x: &[f32]) -> (f64, f64) {
    let BnShape { n, c, hw } = shape;
    batchnorm_stats((0..n).map(|s| &x[s * c * hw + ch * hw..s * c * hw + (ch + 1) * hw]))
}

/// One channel plane's share of the batch statistics (see the module header): its length,
/// centre `c_p` (its f32 mean), `D_p = Σ (x - c_p)` and `Q_p = Σ (x - c_p)²`. Computed by
/// [`plane_stats`] wherever the plane is hot in cache (a convolution's forward computes its
/// output's right after storing each sample, see `conv::EpilogueArgs::stats`) and combined
/// per channel by [`combine_plane_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PlaneStats {
    /// Values in the plane.
    pub len: f64,
    /// The plane's f32 mean.
    pub centre: f32,
    /// `Σ (x - centre)`.
    pub d: f64,
    /// `Σ (x - centre)²`.
    pub q: f64,
}

/// A plane's [`PlaneStats`] (two passes over `p`, the second from cache).
pub fn plane_stats(p: &[f32]) -> PlaneStats {
    if p.is_empty() {
        return PlaneStats::default();
    }
    let centre = (sum_f64(p) / p.len() as f64) as f32;
    let (d, q) = centred_sums(p, centre);
    PlaneStats { len: p.len() as f64, centre, d, q }
}

/// A channel's `(mean, Σ (x - mean)²)` from its planes' [`PlaneStats`] (in order; empty
/// planes count nothing), as [`batchnorm_stats`] computes it from the planes themselves.
pub fn combine_plane_stats(parts: impl Iterator<Item = PlaneStats> + Clone) -> (f64, f64) {
    let parts = parts.filter(|p| p.len > 0.0);
    let m: f64 = parts.clone().map(|p| p.len).sum();
    let mean = parts.clone().map(|p| p.len * p.centre as f64 + p.d).sum::<f64>() / m;
    let ss = parts
        .map(|p| {
            let e = p.centre as f64 - mean;
            p.q + 2.0 * e * p.d + p.len * e * e
        })
        .sum::<f64>();
    (mean, ss.max(0.0))
}

/// Batch statistics of one channel from its planes (one per sample, any layout, in order):
/// `(mean, Σ (x - mean)²)` as [`batchnorm_channel_stats`].
pub fn batchnorm_stats<'a>(planes: impl Iterator<Item = &'a [f32]>) -> (f64, f64) {
    let parts: Vec<PlaneStats> = planes.map(plane_stats).collect();
    combine_plane_stats(parts.iter().copied())
}

/// A channel's saved statistics from its [`batchnorm_stats`] over `values` values:
/// `(mean, rstd = 1/sqrt(var + eps))` in f32, `var = Σ (x - mean)² / values` (what
/// [`batchnorm_channel_finish`] saves).
pub fn batchnorm_norm((mean, ss): (f64, f64), values: usize, eps: f32) -> (f32, f32) {
    let var = ss / values as f64;
    (mean as f32, (1.0 / (var + eps as f64).sqrt()) as f32)
}

/// Finish channel `ch` of the training forward from its [`batchnorm_channel_stats`]: saves
/// `mean` and `rstd = 1/sqrt(var + eps)` in `saved` (already sized to `c`), updates the running
/// statistics PyTorch's way (`running = (1-m)*running + m*batch`, unbiased variance, `M` values
/// per channel), and returns the channel's affine map `(a, b)`: `out = x*a + b` with
/// `a = gamma*rstd`, `b = beta - gamma*rstd*mean`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_channel_finish(
    ch: usize,
    (mean, ss): (f64, f64),
    values: usize,
    saved: &mut BnSaved,
    running_mean: &mut [f32],
    running_var: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    momentum: f32,
) -> (f32, f32) {
    let m = values as f64;
    let var = ss / m;
    let (mean32, rstd32) = batchnorm_norm((mean, ss), values, eps);
    saved.mean[ch] = mean32;
    saved.rstd[ch] = rstd32;
    let unbiased = if m > 1.0 { ss / (m - 1.0) } else { var };
    running_mean[ch] = (1.0 - momentum) * running_mean[ch] + momentum * mean32;
    running_var[ch] = (1.0 - momentum) * running_var[ch] + momentum * unbiased as f32;
    batchnorm_affine(gamma[ch], beta[ch], mean32, rstd32)
}

/// The affine map `(a, b)` of a normalised channel, `out = x*a + b`: `a = gamma*rstd`,
/// `b = beta - gamma*rstd*mean` (shared by the forward pass and a backward-time recomputation
/// of its output, so both round identically).
pub fn batchnorm_affine(gamma: f32, beta: f32, mean: f32, rstd: f32) -> (f32, f32) {
    (gamma * rstd, beta - gamma * rstd * mean)
}

/// `out[ch, p] = x[ch, p] * a[i] + b[i]` for the channels `ch = first + i` of one sample
/// (`out`, `x`: that sample's `[c, hw]` values, `a.len()` channels from `first`): the second
/// phase of the training forward, independent per sample.
pub fn channel_affine(out: &mut [f32], x: &[f32], first: usize, a: &[f32], b: &[f32], hw: usize) {
    for (i, (&a, &b)) in a.iter().zip(b).enumerate() {
        let p = (first + i) * hw;
        for (o, &v) in out[p..p + hw].iter_mut().zip(&x[p..p + hw]) {
            *o = v * a + b;
        }
    }
}

/// Every plane of `src` (`rows x cols` values each, row by row) transposed into `dst`
/// (`cols x rows`): `dst[q·P + c·rows + r] = src[q·P + r·cols + c]` with `P = rows·cols`, for
/// planes stored transposed (`passes::layout`).
pub fn transpose_planes(dst: &mut [f32], src: &[f32], rc: (usize, usize)) {
    transpose_planes_map(dst, src, rc, |_| |v| v);
}

/// [`transpose_planes`] with plane `q`'s values mapped by `f(q)` on the way: a batch norm's
/// affine map and activation stored transposed. Each plane is transposed into a buffer in
/// cache (`transpose_plane`) and then copied out whole: written straight to memory in the
/// transposed order, a pass over a tensor beyond the caches took a third longer (measured
/// on one thread over 96 MiB: 3.2-3.5 ms against 2.6 ms; the plain affine pass 1.9 ms).
/// Panics where the lengths differ or are not whole planes (a runtime bug, never a user
/// error: callers size both from the same plan).
pub fn transpose_planes_map<F: Fn(f32) -> f32>(dst: &mut [f32], src: &[f32], (rows, cols): (usize, usize), f: impl Fn(usize) -> F) {
    let p = rows * cols;
    assert!(dst.len() == src.len() && p > 0 && src.len().is_multiple_of(p), "transpose_planes: {} into {} values, planes of {rows}x{cols}", src.len(), dst.len());
    let mut t = vec![0.0f32; p];
    for (q, (d, s)) in dst.chunks_exact_mut(p).zip(src.chunks_exact(p)).enumerate() {
        transpose_plane(&mut t, s, (rows, cols), f(q));
        d.copy_from_slice(&t);
    }
}

/// One `rows x cols` plane `s` transposed into `d`, mapped by `f`: in 4 x 4 blocks (four rows
/// of `d` at a time, each block from four rows of `s`, transposed in registers,
/// `entry::transpose4`), so a plane in L1 streams through at several values per cycle.
#[inline(always)]
fn transpose_plane(d: &mut [f32], s: &[f32], (rows, cols): (usize, usize), f: impl Fn(f32) -> f32) {
    let (r4, c4) = (rows - rows % 4, cols - cols % 4);
    for (k, strip) in d.chunks_exact_mut(4 * rows).enumerate().take(c4 / 4) {
        let c0 = 4 * k;
        let (d0, rest) = strip.split_at_mut(rows);
        let (d1, rest) = rest.split_at_mut(rows);
        let (d2, d3) = rest.split_at_mut(rows);
        let blocks = d0.chunks_exact_mut(4).zip(d1.chunks_exact_mut(4)).zip(d2.chunks_exact_mut(4)).zip(d3.chunks_exact_mut(4));
        for ((((q0, q1), q2), q3), b) in blocks.zip(s.chunks_exact(4 * cols)) {
            let ld = |i: usize| -> [f32; 4] {
                let r: [f32; 4] = b[i * cols + c0..][..4].try_into().unwrap_or_default();
                r.map(&f)
            };
            let [t0, t1, t2, t3] = super::entry::transpose4([ld(0), ld(1), ld(2), ld(3)]);
            q0.copy_from_slice(&t0);
            q1.copy_from_slice(&t1);
            q2.copy_from_slice(&t2);
            q3.copy_from_slice(&t3);
        }
    }
    // The ragged edges: the last `cols % 4` columns, then the last `rows % 4` rows.
    for r in 0..rows {
        for c in if r < r4 { c4..cols } else { 0..cols } {
            d[c * rows + r] = f(s[r * cols + c]);
        }
    }
}

/// [`channel_affine`] followed by `act` (the formulas of [`activation_forward`]), plane by
/// plane while it is in cache; a ReLU is fused into the affine loop:
/// `out = max(x*a + b, 0)`. Bit for bit the affine map, then the activation.
pub fn channel_affine_act(out: &mut [f32], x: &[f32], first: usize, a: &[f32], b: &[f32], hw: usize, act: Activation) {
    for (i, (&a, &b)) in a.iter().zip(b).enumerate() {
        let p = (first + i) * hw;
        let (o, x) = (&mut out[p..p + hw], &x[p..p + hw]);
        if act == Activation::Relu {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = (v * a + b).max(0.0);
            }
        } else {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = v * a + b;
            }
            activation_inplace(act, o);
        }
    }
}

/// Training forward over channels `channels` (use `0..c` for all):
/// `mean_c = E[x]`, `var_c = E[(x-mean)²]`, `out = gamma * (x - mean) / sqrt(var + eps) + beta`;
/// saves `mean`, `rstd` into `saved` (resized to `c`) and updates the running statistics
/// PyTorch's way: `running = (1-m)*running + m*batch`, with the unbiased variance.
/// The composition of [`batchnorm_channel_stats`], [`batchnorm_channel_finish`] and
/// [`channel_affine`], which a runtime can run on several threads (channels, then samples).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_forward_train(
    layer: &str,
    shape: BnShape,
    channels: Range<usize>,
    out: &mut [f32],
    saved: &mut BnSaved,
    running_mean: &mut [f32],
    running_var: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    momentum: f32,
) -> Result<()> {
    let BnShape { n, c, hw } = shape;
    batchnorm_check_train(layer, shape, &channels, x.len(), out.len(), [gamma.len(), beta.len(), running_mean.len(), running_var.len()])?;
    saved.mean.resize(c, 0.0);
    saved.rstd.resize(c, 0.0);
    let (a, b): (Vec<f32>, Vec<f32>) = channels
        .clone()
        .map(|ch| batchnorm_channel_finish(ch, batchnorm_channel_stats(shape, ch, x), n * hw, saved, running_mean, running_var, gamma, beta, eps, momentum))
        .unzip();
    for s in 0..n {
        let r = s * c * hw..(s + 1) * c * hw;
        channel_affine(&mut out[r.clone()], &x[r], channels.start, &a, &b, hw);
    }
    Ok(())
}

/// The length checks of the training forward: input and output `n*c*hw`, per-channel tensors
/// (gamma, beta, running mean, running variance) `c`, `channels` within `0..c`, values present.
pub fn batchnorm_check_train(layer: &str, shape: BnShape, channels: &Range<usize>, x: usize, out: usize, per_channel: [usize; 4]) -> Result<()> {
    let BnShape { n, c, hw } = shape;
    shape.check(layer, "input", x, shape.numel())?;
    shape.check(layer, "output", out, shape.numel())?;
    for (w, l) in ["gamma", "beta", "running mean", "running var"].into_iter().zip(per_channel) {
        shape.check(layer, w, l, c)?;
    }
    if channels.end > c || n * hw == 0 {
        return Err(err(layer, format!("batchnorm channels {channels:?} of {c}, {n} samples x {hw} pixels")));
    }
    Ok(())
}

/// Gradient sums of channel `ch` for the backward pass: `(Σ d_out, Σ d_out*xhat)` over every
/// sample and pixel, `xhat = (x - mean) * rstd` ([`batchnorm_grad_sums`] over the channel's
/// planes of `[n, c, hw]` tensors, no activation). Reads only.
pub fn batchnorm_channel_grad_sums(shape: BnShape, ch: usize, d_out: &[f32], x: &[f32], mean: f32, rstd: f32) -> (f32, f32) {
    let BnShape { n, c, hw } = shape;
    let planes = (0..n).map(|s| {
        let p = s * c * hw + ch * hw;
        (&d_out[p..p + hw], &x[p..p + hw])
    });
    batchnorm_grad_sums(planes, mean, rstd, None)
}

/// Gradient sums of one channel from its `(d_out, x)` planes (one pair per sample, in the
/// same orientation): `(Σ g, Σ g*xhat)` with `xhat = (x - mean) * rstd`, in one pass (8 f32
/// lanes per [`BLOCK`], blocks added in f64, fixed order). `g = d_out`, or with
/// `relu = Some((a, b))` (the forward's affine map of the channel, a ReLU after it)
/// `g = [x*a + b > 0] d_out`: the gradient of the normalised value through the ReLU.
pub fn batchnorm_grad_sums<'a>(planes: impl Iterator<Item = (&'a [f32], &'a [f32])>, mean: f32, rstd: f32, relu: Option<(f32, f32)>) -> (f32, f32) {
    let (mut sg, mut sgx) = (0.0f64, 0.0f64);
    for (g, x) in planes {
        let (pg, pgx) = plane_grad_sums(g, x, mean, relu);
        sg += pg;
        sgx += pgx;
    }
    (sg as f32, (sgx * rstd as f64) as f32)
}

/// One plane's `(Σ g, Σ g*(x - mean))` in f64 from zero, [`BLOCK`] by [`BLOCK`]: the term
/// [`batchnorm_grad_sums`] adds per plane, and [`batchnorm_sample_grad_sums`] stores.
fn plane_grad_sums(g: &[f32], x: &[f32], mean: f32, relu: Option<(f32, f32)>) -> (f64, f64) {
    let (mut sg, mut sgx) = (0.0f64, 0.0f64);
    for (gb, xb) in g.chunks(BLOCK).zip(x.chunks(BLOCK)) {
        block_grad_sums(gb, xb, mean, relu, (&mut sg, &mut sgx));
    }
    (sg, sgx)
}

/// One sample's terms of [`batchnorm_grad_sums`] for every channel: `out[ch]` is the
/// `(Σ g, Σ g*(x - mean))` of the sample's plane of channel `ch` (f64), from its `d_out` and
/// `x` (`[c, hw]` values each, `c = out.len()`), `mean[ch]`, and, for a fused ReLU, the
/// forward's affine maps `relu[ch]`. [`batchnorm_finish_grad_sums`] adds the samples' terms in
/// sample order: the same additions as [`batchnorm_grad_sums`] over the channel's planes, so
/// the same sums bit for bit, from a pass that reads each sample's values in order (one plane
/// after the next) rather than one channel's planes scattered over the batch.
///
/// With [`GradPlanes::Transposed`] each `d_out` plane is turned into `x`'s orientation in place
/// first (transposed into a buffer in cache and copied back), so that afterwards `d_out` holds
/// [`GradPlanes::Same`] planes and the input gradient's pass ([`batchnorm_backward_sample`])
/// reads them as they are instead of transposing each plane again (measured one thread, 48
/// planes of 32x32, batch 16, with the ReLU mask, the best of 40 alternated runs, three runs:
/// both passes 1.26-1.51 -> 0.98-1.10 ms, 0.73-0.78 of the time).
pub fn batchnorm_sample_grad_sums(out: &mut [(f64, f64)], d_out: &mut [f32], x: &[f32], hw: usize, mean: &[f32], relu: Option<&[(f32, f32)]>, layout: GradPlanes) {
    if let GradPlanes::Transposed(rows, cols) = layout {
        assert_eq!(rows * cols, hw, "batch norm gradient sums: transposed planes of {rows}x{cols}, not {hw} values");
    }
    let mut t = layout.buffer();
    for (ch, o) in out.iter_mut().enumerate() {
        let plane = &mut d_out[ch * hw..(ch + 1) * hw];
        if let GradPlanes::Transposed(rows, cols) = layout {
            transpose_plane(&mut t, plane, (cols, rows), |v| v);
            plane.copy_from_slice(&t);
        }
        *o = plane_grad_sums(plane, &x[ch * hw..(ch + 1) * hw], mean[ch], relu.map(|r| r[ch]));
    }
}

/// The channels' [`batchnorm_grad_sums`] from the samples' [`batchnorm_sample_grad_sums`]
/// (`parts[s*c + ch]`, `c = rstd.len()`), added in sample order.
pub fn batchnorm_finish_grad_sums(parts: &[(f64, f64)], rstd: &[f32]) -> Vec<(f32, f32)> {
    let c = rstd.len();
    (0..c)
        .map(|ch| {
            let (mut sg, mut sgx) = (0.0f64, 0.0f64);
            for p in parts.iter().skip(ch).step_by(c) {
                sg += p.0;
                sgx += p.1;
            }
            (sg as f32, (sgx * rstd[ch] as f64) as f32)
        })
        .collect()
}

/// How a batch norm's output-gradient planes are stored against its input's planes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradPlanes {
    /// In the same orientation.
    Same,
    /// Transposed: the input's planes are `rows x cols`, the output gradient's `cols x rows`
    /// (`passes::layout`).
    Transposed(usize, usize),
}

impl GradPlanes {
    /// The buffer turning a plane takes: one plane for `Transposed`, none for `Same`.
    fn buffer(self) -> Vec<f32> {
        match self {
            GradPlanes::Same => Vec::new(),
            GradPlanes::Transposed(rows, cols) => vec![0.0f32; rows * cols],
        }
    }
}

/// `d_out`, masked by a ReLU after the affine map `(a, b)` when `RELU`: `[x*a + b > 0] d_out`.
/// A bit mask, not an `if`: rustc turns the `if` into branches around conditional loads.
#[inline(always)]
fn relu_masked<const RELU: bool>(g: f32, x: f32, a: f32, b: f32) -> f32 {
    if RELU {
        let keep = u32::from(x * a + b > 0.0).wrapping_neg();
        f32::from_bits(g.to_bits() & keep)
    } else {
        g
    }
}

/// One block's (at most [`BLOCK`] values) share of [`batchnorm_grad_sums`], added to
/// `(sg, sgx)` (out of line, so its loops compile the same whichever crate instantiates the
/// generic caller).
#[inline(never)]
fn block_grad_sums(g: &[f32], x: &[f32], mean: f32, relu: Option<(f32, f32)>, acc: (&mut f64, &mut f64)) {
    match relu {
        Some(ab) => block_sums::<true>(g, x, mean, ab, acc),
        None => block_sums::<false>(g, x, mean, (0.0, 0.0), acc),
    }
}

/// [`block_grad_sums`], `g` masked by the ReLU when `RELU`: the values after the last full 8
/// one by one in f64, then 8 f32 lanes of `Σ g` and of `Σ g*(x - mean)` (added in f64).
#[inline(always)]
fn block_sums<const RELU: bool>(g: &[f32], x: &[f32], mean: f32, (a, b): (f32, f32), (sg, sgx): (&mut f64, &mut f64)) {
    let (mut ag, mut agx) = ([0.0f32; 8], [0.0f32; 8]);
    let (mut gi, mut xi) = (g.chunks_exact(8), x.chunks_exact(8));
    for (gc, xc) in (&mut gi).zip(&mut xi) {
        let gc: [f32; 8] = gc.try_into().unwrap_or_default();
        let xc: [f32; 8] = xc.try_into().unwrap_or_default();
        for j in 0..8 {
            let g = relu_masked::<RELU>(gc[j], xc[j], a, b);
            ag[j] += g;
            agx[j] += g * (xc[j] - mean);
        }
    }
    for (&g, &v) in gi.remainder().iter().zip(xi.remainder()) {
        let g = relu_masked::<RELU>(g, v, a, b);
        *sg += g as f64;
        *sgx += (g * (v - mean)) as f64;
    }
    *sg += lanes_f64(&ag);
    *sgx += lanes_f64(&agx);
}

/// The input gradient of one sample (`d_x`, `d_out`, `x`: its `[c, hw]` values) for the
/// channels `first..first + sums.len()`, from their [`batchnorm_grad_sums`]:
/// `d_x += gamma*rstd/M * (M*g - Σg - xhat*Σ(g*xhat))` with `M` values per channel, where
/// `g = d_out`, or `g = [x*a + b > 0] d_out` with `relu = Some(affine)` (`affine[ch] = (a, b)`,
/// each channel's forward map before its ReLU, indexed like `gamma`). `write` says whether the
/// result is added to `d_x` (`+=`) or replaces it (`=`, for a gradient nothing else has written
/// yet: its buffer need not be zeroed first). `d_out`'s planes are in `x`'s orientation
/// (transposed ones are turned by [`batchnorm_sample_grad_sums`] first).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward_sample(
    d_x: &mut [f32],
    d_out: &[f32],
    x: &[f32],
    first: usize,
    sums: &[(f32, f32)],
    saved: &BnSaved,
    gamma: &[f32],
    values: usize,
    hw: usize,
    relu: Option<&[(f32, f32)]>,
    write: GradWrite,
) {
    for (i, &(sg, sgx)) in sums.iter().enumerate() {
        let ch = first + i;
        let p = ch * hw;
        batchnorm_backward_plane(&mut d_x[p..p + hw], &d_out[p..p + hw], &x[p..p + hw], (saved.mean[ch], saved.rstd[ch], gamma[ch]), (sg, sgx), values, relu.map(|r| r[ch]), write);
    }
}

/// How a backward kernel stores an input gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradWrite {
    /// `d_x += result` (other consumers' contributions are summed in the same buffer).
    Accumulate,
    /// `d_x = result` (the first and only write of this gradient in its buffer's life).
    Overwrite,
}

/// [`batchnorm_backward_sample`] for one plane of one channel (`d_x`, `d_out`, `x`: its values in
/// one sample), given the channel's `(mean, rstd, gamma)`, its [`batchnorm_grad_sums`] and,
/// for a fused ReLU, its forward affine map `(a, b)`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward_plane(d_x: &mut [f32], d_out: &[f32], x: &[f32], (mean, rstd, gamma): (f32, f32, f32), (sg, sgx): (f32, f32), values: usize, relu: Option<(f32, f32)>, write: GradWrite) {
    let m = values as f32;
    let k = gamma * rstd / m;
    let c = (mean, rstd, k, m, sg, sgx);
    match (relu, write) {
        (Some(r), GradWrite::Accumulate) => backward_plane::<true, true>(d_x, d_out, x, c, r),
        (Some(r), GradWrite::Overwrite) => backward_plane::<true, false>(d_x, d_out, x, c, r),
        (None, GradWrite::Accumulate) => backward_plane::<false, true>(d_x, d_out, x, c, (0.0, 0.0)),
        (None, GradWrite::Overwrite) => backward_plane::<false, false>(d_x, d_out, x, c, (0.0, 0.0)),
    }
}

/// One plane of [`batchnorm_backward_sample`]: `d_x += k * (m*g - sg - xhat*sgx)` (`ACC`),
/// else `d_x = ...`.
#[inline(always)]
fn backward_plane<const RELU: bool, const ACC: bool>(d_x: &mut [f32], d_out: &[f32], x: &[f32], (mean, rstd, k, m, sg, sgx): (f32, f32, f32, f32, f32, f32), (a, b): (f32, f32)) {
    for ((d, &g), &v) in d_x.iter_mut().zip(d_out).zip(x) {
        let g = relu_masked::<RELU>(g, v, a, b);
        let xhat = (v - mean) * rstd;
        let r = k * (m * g - sg - xhat * sgx);
        *d = if ACC { *d + r } else { r };
    }
}

/// Backward of the training forward, with `xhat = (x - mean) * rstd` and `M = n*hw`:
/// `d_beta += Σ d_out`, `d_gamma += Σ d_out*xhat`,
/// `d_x += gamma*rstd/M * (M*d_out - Σd_out - xhat*Σ(d_out*xhat))`.
/// The composition of [`batchnorm_channel_grad_sums`] and [`batchnorm_backward_sample`].
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward(
    layer: &str,
    shape: BnShape,
    channels: Range<usize>,
    d_x: &mut [f32],
    d_gamma: &mut [f32],
    d_beta: &mut [f32],
    d_out: &[f32],
    x: &[f32],
    saved: &BnSaved,
    gamma: &[f32],
) -> Result<()> {
    let BnShape { n, c, hw } = shape;
    batchnorm_check_backward(layer, shape, &channels, [x.len(), d_x.len(), d_out.len()], [gamma.len(), d_gamma.len(), d_beta.len()], saved)?;
    let sums: Vec<(f32, f32)> = channels.clone().map(|ch| batchnorm_channel_grad_sums(shape, ch, d_out, x, saved.mean[ch], saved.rstd[ch])).collect();
    for (ch, &(sg, sgx)) in channels.clone().zip(&sums) {
        d_beta[ch] += sg;
        d_gamma[ch] += sgx;
    }
    for s in 0..n {
        let r = s * c * hw..(s + 1) * c * hw;
        batchnorm_backward_sample(&mut d_x[r.clone()], &d_out[r.clone()], &x[r], channels.start, &sums, saved, gamma, n * hw, hw, None, GradWrite::Accumulate);
    }
    Ok(())
}

/// The length checks of the backward pass: input, input gradient and output gradient `n*c*hw`;
/// gamma, its gradient, beta's gradient and the saved statistics `c`; `channels` within `0..c`.
pub fn batchnorm_check_backward(layer: &str, shape: BnShape, channels: &Range<usize>, full: [usize; 3], per_channel: [usize; 3], saved: &BnSaved) -> Result<()> {
    for (w, l) in ["input", "input gradient", "output gradient"].into_iter().zip(full) {
        shape.check(layer, w, l, shape.numel())?;
    }
    let names = ["gamma", "gamma gradient", "beta gradient", "saved mean", "saved rstd"];
    for (w, l) in names.into_iter().zip(per_channel.into_iter().chain([saved.mean.len(), saved.rstd.len()])) {
        shape.check(layer, w, l, shape.c)?;
    }
    if channels.end > shape.c {
        return Err(err(layer, format!("batchnorm channels {channels:?} of {}", shape.c)));
    }
    Ok(())
}

/// Inference forward with running statistics: `out = gamma*(x - rm)/sqrt(rv + eps) + beta`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_forward_infer(
    layer: &str,
    shape: BnShape,
    out: &mut [f32],
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
) -> Result<()> {
    shape.check(layer, "input", x.len(), shape.numel())?;
    shape.check(layer, "output", out.len(), shape.numel())?;
    let (scale, shift) = batchnorm_fold(layer, gamma, beta, running_mean, running_var, eps)?;
    shape.check(layer, "gamma", scale.len(), shape.c)?;
    let BnShape { n, c, hw } = shape;
    for s in 0..n {
        for ch in 0..c {
            let p = s * c * hw + ch * hw;
            for (o, &v) in out[p..p + hw].iter_mut().zip(&x[p..p + hw]) {
                *o = v * scale[ch] + shift[ch];
            }
        }
    }
    Ok(())
}

/// Fold inference batch norm into a per-channel affine map `y = x*scale + shift` (what a
/// convolution's [`Epilogue::affine`](super::conv::Epilogue::affine) applies):
/// `scale = gamma / sqrt(rv + eps)`, `shift = beta - rm * scale`.
pub fn batchnorm_fold(
    layer: &str,
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
) -> Result<(Vec<f32>, Vec<f32>)> {
    same_len(layer, &[("gamma", gamma.len()), ("beta", beta.len()), ("running mean", running_mean.len()), ("running var", running_var.len())])?;
    let scale: Vec<f32> = gamma.iter().zip(running_var).map(|(&g, &v)| g / (v + eps).sqrt()).collect();
    let shift = beta.iter().zip(running_mean).zip(&scale).map(|((&b, &m), &s)| b - m * s).collect();
    Ok((scale, shift))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// The documented summation order written out one value at a time, for one block: lane `j`
    /// sums `term(j)`, `term(j + 8)`, ... in f32 over the full groups of 8; returns the lanes'
    /// f64 sum (in lane order) and the indices of the values after the last full group.
    fn lanes_spec(len: usize, term: impl Fn(usize) -> f32) -> (f64, Range<usize>) {
        let full = len / 8 * 8;
        let mut lanes = [0.0f32; 8];
        for i in 0..full {
            lanes[i % 8] += term(i);
        }
        (lanes.iter().map(|&a| a as f64).sum::<f64>(), full..len)
    }

    fn sum_spec(v: &[f32]) -> f64 {
        let mut total = 0.0f64;
        for blk in v.chunks(BLOCK) {
            let (lanes, rest) = lanes_spec(blk.len(), |i| blk[i]);
            total += lanes + blk[rest].iter().map(|&r| r as f64).sum::<f64>();
        }
        total
    }

    fn plane_stats_spec(p: &[f32]) -> PlaneStats {
        let centre = (sum_spec(p) / p.len() as f64) as f32;
        let (mut d, mut q) = (0.0f64, 0.0f64);
        for blk in p.chunks(BLOCK) {
            let (ld, rest) = lanes_spec(blk.len(), |i| blk[i] - centre);
            let (lq, _) = lanes_spec(blk.len(), |i| (blk[i] - centre) * (blk[i] - centre));
            for &r in &blk[rest] {
                let e = (r - centre) as f64;
                d += e;
                q += e * e;
            }
            d += ld;
            q += lq;
        }
        PlaneStats { len: p.len() as f64, centre, d, q }
    }

    fn grad_sums_spec(planes: &[(Vec<f32>, Vec<f32>)], mean: f32, rstd: f32, relu: Option<(f32, f32)>) -> (f32, f32) {
        let (mut sg, mut sgx) = (0.0f64, 0.0f64);
        for (g, x) in planes {
            for (gb, xb) in g.chunks(BLOCK).zip(x.chunks(BLOCK)) {
                let gm = |i: usize| match relu {
                    Some((a, b)) if xb[i] * a + b > 0.0 => gb[i],
                    Some(_) => 0.0,
                    None => gb[i],
                };
                let (lg, rest) = lanes_spec(gb.len(), gm);
                let (lgx, _) = lanes_spec(gb.len(), |i| gm(i) * (xb[i] - mean));
                for i in rest {
                    sg += gm(i) as f64;
                    sgx += (gm(i) * (xb[i] - mean)) as f64;
                }
                sg += lg;
                sgx += lgx;
            }
        }
        (sg as f32, (sgx * rstd as f64) as f32)
    }

    /// The vectorised reductions add in exactly the documented order (bit for bit against the
    /// same order written out scalar), for lengths with and without lane remainders, over one
    /// and several blocks.
    #[test]
    fn reductions_follow_the_documented_order() {
        let mut rng = StdRng::seed_from_u64(7);
        for len in [1, 5, 8, 9, 63, 64, 100, 255, 256, 257, 300, 1031] {
            let x: Vec<f32> = (0..len).map(|_| rng.random_range(-1.0f32..1.0) * 3.0 + 50.0).collect();
            assert_eq!(sum_f64(&x).to_bits(), sum_spec(&x).to_bits(), "sum_f64, {len} values");
            let (got, want) = (plane_stats(&x), plane_stats_spec(&x));
            assert_eq!((got.centre.to_bits(), got.d.to_bits(), got.q.to_bits()), (want.centre.to_bits(), want.d.to_bits(), want.q.to_bits()), "plane_stats, {len} values");
            let planes: Vec<(Vec<f32>, Vec<f32>)> =
                (0..3).map(|_| ((0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect(), (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect())).collect();
            for relu in [None, Some((1.3f32, 0.2f32))] {
                let got = batchnorm_grad_sums(planes.iter().map(|(g, x)| (&g[..], &x[..])), 0.1, 1.7, relu);
                let want = grad_sums_spec(&planes, 0.1, 1.7, relu);
                assert_eq!((got.0.to_bits(), got.1.to_bits()), (want.0.to_bits(), want.1.to_bits()), "grad sums, {len} values, relu {relu:?}");
            }
        }
    }
}
