//! Running a [`Program`]: forward over the steps in plan order, backward in reverse.
//!
//! Backward does only the work [`Graph::needs_grad`] (the cost model's rule) leaves: a step
//! whose output needs no gradient (everything at or below the lowest trainable layer) is
//! skipped whole, no input gradient is computed for an operand that needs none (the image
//! included), and a frozen convolution, dense or batch-norm layer runs no weight-gradient
//! kernel. Gradient buffers of values that need no gradient are not even allocated.
//!
//! Threads: convolution, dense and pooling steps split the batch into `threads` fixed chunks of
//! `ceil(n / threads)` samples (rayon); weight gradients go to one partial buffer per chunk and
//! are summed in chunk order, so results are deterministic for a given thread count. Training
//! batch norm reduces one channel per task and then maps one sample per task (fixed orders, so
//! deterministic for any thread count), with a ReLU after it fused into both passes; where the
//! plan says so (`Plan::stats_from`) the convolution storing its input has already computed
//! each plane's share of the statistics as it stored it, and the reduction only combines those
//! shares, in the same order (the same numbers, one read of the tensor fewer); global
//! average pooling maps one sample per task. The reference fallbacks run on the calling thread.
//!
//! Layouts: values are NCHW planes, except those the plan stores as transposed planes
//! (`Plan::transposed`, `passes::layout`): a convolution reading and writing them is compiled
//! as its transpose (`Conv2d::transposed`), and a batch norm whose input and output differ in
//! orientation transposes each plane as it normalises (forward and recomputation) and, in
//! backward, turns its output gradient's planes into its input's orientation in place (the
//! first of its two passes, so the second reads them as they are).
//!
//! Memory: buffers sit at the plan's [`MemoryPlan`](cnnc_compiler::passes::memplan::MemoryPlan)
//! offsets in the arena, which each step sees through an [`arena::Mem`](super::arena::Mem)
//! (the buffers it writes taken out first, the rest read): a gradient is zeroed where its
//! life starts, except where a batch norm's or a pooling layer's backward or a convolution's
//! backward data starts its input's gradient and overwrites it whole (`overwrite_grad`; a
//! convolution kernel that can only accumulate zeroes each sample's share itself, in cache,
//! `ConvOptions::overwrite_dx`); values the plan recomputes
//! are rewritten right before the backward step that first reads them.

use super::arena::Mem;
use super::program::{eerr, loc_of, Chain, Kind, Loc, Program, Step, NO_GRAD};
use crate::engine::EngineError;
use crate::init::tensor_rng;
use crate::params::ParamStore;
use crate::reference;
use cnnc_compiler::ir::{Activation, Graph, NodeId, Op};
use cnnc_compiler::lower::pointwise::{self, BnSaved, BnShape, GradPlanes, GradWrite};
use cnnc_compiler::lower::pool::PoolKernels;
use cnnc_compiler::lower::{ConvKernels, DenseKernels, EpilogueArgs, GradHook, SampleHook};
use cnnc_compiler::passes::memplan;
use ndarray::{ArrayD, ArrayView2, ArrayView4, ArrayViewD, ArrayViewMut2, ArrayViewMut4, ArrayViewMutD, IxDyn};
use rayon::prelude::*;
use std::time::Instant;

type R<T = ()> = Result<T, EngineError>;

fn lerr(e: impl std::fmt::Display) -> EngineError {
    EngineError(e.to_string())
}

/// `<layer>.<suffix>` from the store, or an error naming it.
fn param<'a>(params: &'a ParamStore, layer: &str, suffix: &str) -> R<&'a [f32]> {
    params.slice(&format!("{layer}.{suffix}")).ok_or_else(|| eerr(format!("missing parameter `{layer}.{suffix}`")))
}

/// The first `n` samples of a whole-buffer value.
fn whole<'a>(mem: &'a Mem<'_>, locs: &[Option<Loc>], g: &Graph, id: NodeId, n: usize) -> R<&'a [f32]> {
    let l = loc_of(locs, g, id)?;
    if !l.contiguous() {
        return Err(eerr(format!("layer `{}`: value is not a whole buffer", g.node(id).name)));
    }
    mem.get(l.buf, n * l.numel()).ok_or_else(|| overlap(g, id, "value"))
}

/// A buffer a step touches is not wholly inside the memory left to it: the memory plan let
/// it overlap another buffer of the step (or it lies past the arena).
fn overlap(g: &Graph, id: NodeId, what: &str) -> EngineError {
    eerr(format!("layer `{}`: its {what} overlaps another buffer of the step in the memory plan", g.node(id).name))
}

/// Take buffer `id`'s values (`grad = false`) or gradient out of `mem` for writing: the whole
/// buffer (compiled batch), in which [`Loc::sample`] indexes.
fn take<'a>(mem: &mut Mem<'a>, locs: &[Option<Loc>], g: &Graph, id: NodeId, grad: bool) -> R<(usize, &'a mut [f32])> {
    let l = loc_of(locs, g, id)?;
    let at = if grad { l.grad } else { l.buf };
    if at == NO_GRAD {
        return Err(eerr(format!("layer `{}`: no gradient planned", g.node(id).name)));
    }
    mem.take(at, l.cap).map(|b| (at, b)).ok_or_else(|| overlap(g, id, if grad { "gradient" } else { "value" }))
}

/// `(scale, shift)` of an inference batch norm from its parameters.
fn fold(params: &ParamStore, layer: &str, eps: f32) -> R<(Vec<f32>, Vec<f32>)> {
    pointwise::batchnorm_fold(layer, param(params, layer, "weight")?, param(params, layer, "bias")?, param(params, layer, "running_mean")?, param(params, layer, "running_var")?, eps)
        .map_err(lerr)
}

/// `g *= act'(x)` in place, from the activation's output `y`:
/// relu `[y>0]`; leaky `y>0 ? 1 : slope` (slope >= 0); elu `y>0 ? 1 : y + alpha` (alpha > 0);
/// sigmoid `y(1-y)`; tanh `1 - y²`.
fn act_grad_inplace(a: Activation, g: &mut [f32], y: &[f32]) {
    let it = g.iter_mut().zip(y);
    match a {
        Activation::Relu => it.for_each(|(d, &v)| *d = if v > 0.0 { *d } else { 0.0 }),
        Activation::LeakyRelu { slope } => it.for_each(|(d, &v)| *d = if v > 0.0 { *d } else { slope * *d }),
        Activation::Elu { alpha } => it.for_each(|(d, &v)| *d = if v > 0.0 { *d } else { *d * (v + alpha) }),
        Activation::Sigmoid => it.for_each(|(d, &v)| *d *= v * (1.0 - v)),
        Activation::Tanh => it.for_each(|(d, &v)| *d *= 1.0 - v * v),
    }
}

/// `buf.fill(0)` on all threads (gradients are megabytes; one core cannot saturate the
/// memory bandwidth).
pub(crate) fn zero(buf: &mut [f32]) {
    buf.par_chunks_mut(1 << 16).for_each(|c| c.fill(0.0));
}

/// Chunk size (samples) for `n` samples on `threads` threads.
fn chunk(n: usize, threads: usize) -> usize {
    n.div_ceil(threads.max(1)).max(1)
}

/// Apply the chain from op `from` on (the part the anchor kernel did not fuse) in place over
/// the output region.
#[allow(clippy::too_many_arguments)]
fn chain_forward(step: &Step, from: usize, params: &ParamStore, out: &mut [f32], ol: Loc, vals: &Mem<'_>, locs: &[Option<Loc>], g: &Graph, n: usize) -> R {
    for c in &step.chain[from..] {
        match c {
            Chain::Fold { layer, eps } => {
                let (scale, shift) = fold(params, layer, *eps)?;
                for s in 0..n {
                    let r = &mut out[ol.sample(s)];
                    for (ch, plane) in r.chunks_exact_mut(ol.hw).enumerate() {
                        plane.iter_mut().for_each(|v| *v = *v * scale[ch] + shift[ch]);
                    }
                }
            }
            Chain::Add { others } => {
                for &o in others {
                    let x = whole(vals, locs, g, o, n)?;
                    for s in 0..n {
                        let xs = &x[s * ol.numel()..(s + 1) * ol.numel()];
                        out[ol.sample(s)].iter_mut().zip(xs).for_each(|(v, &a)| *v += a);
                    }
                }
            }
            Chain::Act(a) => {
                let (num, off) = (ol.numel(), ol.off * ol.hw);
                out[..n * ol.stride()].par_chunks_mut(ol.stride()).for_each(|o| pointwise::activation_inplace(*a, &mut o[off..off + num]));
            }
        }
    }
    Ok(())
}

/// Input views for the reference fallbacks: `[n, dims...]`.
fn view_of<'a>(g: &Graph, id: NodeId, x: &'a [f32], n: usize) -> R<ArrayViewD<'a, f32>> {
    let mut d = vec![n];
    d.extend(g.node(id).shape.dims());
    ArrayViewD::from_shape(IxDyn(&d), x).map_err(lerr)
}

fn as4(v: ArrayViewD<'_, f32>) -> R<ArrayView4<'_, f32>> {
    let s = v.shape().to_vec();
    let d = if s.len() == 4 { (s[0], s[1], s[2], s[3]) } else { (s[0], s[1..].iter().product(), 1, 1) };
    v.into_shape_with_order(d).map_err(lerr)
}
fn as4m(v: ArrayViewMutD<'_, f32>) -> R<ArrayViewMut4<'_, f32>> {
    let s = v.shape().to_vec();
    let d = if s.len() == 4 { (s[0], s[1], s[2], s[3]) } else { (s[0], s[1..].iter().product(), 1, 1) };
    v.into_shape_with_order(d).map_err(lerr)
}
fn as2(v: ArrayViewD<'_, f32>) -> R<ArrayView2<'_, f32>> {
    let n = v.shape()[0];
    let r: usize = v.shape()[1..].iter().product();
    v.into_shape_with_order((n, r)).map_err(lerr)
}
fn as2m(v: ArrayViewMutD<'_, f32>) -> R<ArrayViewMut2<'_, f32>> {
    let n = v.shape()[0];
    let r: usize = v.shape()[1..].iter().product();
    v.into_shape_with_order((n, r)).map_err(lerr)
}

/// Copy a contiguous `[n, ch*hw]` value into its (possibly sliced) location.
fn scatter(out: &mut [f32], ol: Loc, src: &[f32], n: usize) {
    for s in 0..n {
        out[ol.sample(s)].copy_from_slice(&src[s * ol.numel()..(s + 1) * ol.numel()]);
    }
}

/// Gather a (possibly sliced) value into a contiguous `[n, ch*hw]` vector.
fn gather(dst: &mut Vec<f32>, buf: &[f32], l: Loc, n: usize) {
    dst.clear();
    for s in 0..n {
        dst.extend_from_slice(&buf[l.sample(s)]);
    }
}

/// A pooling step computed by the step writing its input (`Plan::pool_into`) over a run of
/// samples (the batch, or one thread's chunk of it), indexed from its first: its kernels, its
/// output buffer and winners for those samples, and its output's location.
struct FusedPool<'a> {
    k: &'a PoolKernels,
    out: &'a mut [f32],
    am: &'a mut [u8],
    ol: Loc,
    per_am: usize,
}

impl<'a> FusedPool<'a> {
    /// Take pooling step `ps`'s output out of `mem` (the memory plan keeps it apart from the
    /// producing step's buffers).
    fn take<'m: 'a>(ps: &'a mut Step, mem: &mut Mem<'m>, locs: &[Option<Loc>], g: &Graph, n: usize) -> R<FusedPool<'a>> {
        let pl = loc_of(locs, g, ps.out)?;
        let Kind::Pool { k, argmax, per_am, .. } = &mut ps.kind else {
            return Err(eerr(format!("layer `{}`: fused as a pooling, but it is not one", ps.name)));
        };
        let (_, buf) = take(mem, locs, g, ps.out, false)?;
        Ok(FusedPool { k, out: &mut buf[..n * pl.stride()], am: &mut argmax[..n * *per_am], ol: pl, per_am: *per_am })
    }

    /// Chunks of `per` samples (of `n`), one per chunk of the producer's samples; `None`s
    /// without a fused pooling.
    fn chunks(fp: Option<FusedPool<'a>>, per: usize, n: usize) -> Vec<Option<FusedPool<'a>>> {
        let Some(fp) = fp else { return (0..n.div_ceil(per)).map(|_| None).collect() };
        let (k, ol, per_am) = (fp.k, fp.ol, fp.per_am);
        let ams: Vec<&'a mut [u8]> = match per_am {
            0 => (0..n.div_ceil(per)).map(|_| <&mut [u8]>::default()).collect(),
            _ => fp.am.chunks_mut(per * per_am).collect(),
        };
        fp.out.chunks_mut(per * ol.stride()).zip(ams).map(|(out, am)| Some(FusedPool { k, out, am, ol, per_am })).collect()
    }

    /// Pool sample `j` (of the run)'s channels `c0..c0 + c` of the pooled value from
    /// `planes` (those channels' input planes), winners included in training.
    fn sample(&mut self, j: usize, c0: usize, c: usize, planes: &[f32]) -> cnnc_compiler::Result<()> {
        let ohw = self.ol.hw;
        let r = self.ol.sample(j);
        let out = &mut self.out[r.start + c0 * ohw..r.start + (c0 + c) * ohw];
        let am = (self.per_am > 0).then(|| &mut self.am[j * self.per_am + c0 * ohw..j * self.per_am + (c0 + c) * ohw]);
        self.k.forward_planes(out, am, planes)
    }
}

impl Program {
    /// Forward over the first `n` samples; the input must already be in its buffer.
    /// Dropout masks come from `reference::dropout_mask` with `tensor_rng(seed, layer)` over the
    /// `[n, dims..]` value, exactly as the reference interpreter draws them.
    pub fn forward(&mut self, params: &ParamStore, n: usize, train: bool, seed: u64) -> R {
        let Program { graph: g, steps, locs, arena, threads, profiling, .. } = self;
        let threads = *threads;
        let ch = chunk(n, threads);
        for i in 0..steps.len() {
            // Earlier steps stay readable: a batch norm combines the plane statistics its
            // convolution stored (`Plan::stats_from`).
            // (A pooling step this one computes as it stores comes later.)
            let (done, rest) = steps.split_at_mut(i);
            let (step, later) = rest.split_first_mut().ok_or_else(|| eerr("no step"))?;
            let t0 = profiling.then(Instant::now);
            let ol = loc_of(locs, g, step.out)?;
            let stride = ol.stride();
            let mut mem = Mem::new(arena);
            // A training batch norm applies its whole chain (activations, residual adds) in
            // its normalise pass, sample by sample.
            let from = if matches!(step.kind, Kind::BnTrain { .. }) { step.chain.len() } else { step.fused };
            let r = (|| -> R {
                let (_, outbuf) = take(&mut mem, locs, g, step.out, false)?;
                let out = &mut outbuf[..n * stride];
                // The pooling this step computes as it stores (`Plan::pool_into`).
                let fused_pool = match step.pool {
                    Some(p) => {
                        let ps = p.checked_sub(i + 1).and_then(|q| later.get_mut(q)).ok_or_else(|| eerr(format!("layer `{}`: pools into a step before it", step.name)))?;
                        Some(FusedPool::take(ps, &mut mem, locs, g, n)?)
                    }
                    None => None,
                };
                let vals = &mem;
                let name = step.name.clone();
                match &mut step.kind {
                    Kind::Conv { k, x, layer, bias, residual, fold: fo, stats, parts, .. } => {
                        let w = param(params, layer, "weight")?;
                        let b = if *bias { Some(param(params, layer, "bias")?) } else { None };
                        let aff = match fo {
                            Some((bn, eps)) => Some(fold(params, bn, *eps)?),
                            None => None,
                        };
                        let xin = whole(vals, locs, g, *x, n)?;
                        let inp = xin.len() / n;
                        let res = match residual {
                            Some(r) => Some(whole(vals, locs, g, *r, n)?),
                            None => None,
                        };
                        let rp = ol.numel();
                        // Each chunk's plane statistics, when a batch norm takes them from here.
                        let per = if stats.is_empty() { 0 } else { ol.ch };
                        let mut st_chunks: Vec<Option<&mut [_]>> = match per {
                            0 => (0..n.div_ceil(ch)).map(|_| None).collect(),
                            _ => stats[..n * per].chunks_mut(ch * per).map(Some).collect(),
                        };
                        let mut pool_chunks = FusedPool::chunks(fused_pool, ch, n);
                        let (c0, cs) = (ol.off, ol.ch);
                        if let Some(parts) = parts.as_ref().filter(|_| n < threads) {
                            // Fewer samples than threads: each sample's output channels split
                            // across the pool (`Parts`), samples one after another.
                            let p = ol.hw;
                            let wrow = w.len() / cs;
                            let mut st_rest = if per == 0 { None } else { Some(&mut stats[..n * per]) };
                            for (s, (o, pc)) in out.chunks_mut(stride).zip(pool_chunks.iter_mut()).enumerate() {
                                let xs = &xin[s * inp..(s + 1) * inp];
                                let mut rest = Some(&mut o[c0 * p..(c0 + cs) * p]);
                                let mut st_s = split_front(&mut st_rest, per);
                                let jobs: Vec<_> = parts.ranges.iter().map(|(r, ki)| (r.clone(), &parts.kernels[*ki], split_front(&mut rest, r.len() * p), split_front(&mut st_s, r.len()))).collect();
                                jobs.into_par_iter().try_for_each(|(r, pk, po, pst)| {
                                    let po = po.ok_or_else(|| cnnc_compiler::Error::Codegen { layer: name.clone(), message: "channel parts past the output".into() })?;
                                    let extra = EpilogueArgs {
                                        affine: aff.as_ref().map(|(a, b)| (&a[r.clone()], &b[r.clone()])),
                                        residual: res.map(|rv| &rv[s * rp + r.start * p..s * rp + r.end * p]),
                                        stats: pst,
                                        after_sample: None,
                                    };
                                    pk.forward(po, xs, &w[r.start * wrow..r.end * wrow], b.map(|b| &b[r.clone()]), extra)
                                }).map_err(lerr)?;
                                // The fused pooling, once the sample's planes are all stored.
                                if let Some(pc) = pc {
                                    pc.sample(0, c0, cs, &o[c0 * p..(c0 + cs) * p]).map_err(lerr)?;
                                }
                            }
                        } else {
                            out.par_chunks_mut(ch * stride).zip(st_chunks.par_iter_mut()).zip(pool_chunks.par_iter_mut()).enumerate().try_for_each(|(i, ((oc, st), pc))| {
                                let (s0, s1) = (i * ch, i * ch + oc.len() / stride);
                                // Each stored sample pooled while in cache.
                                let mut pool = pc.as_mut().map(|pc| move |j: usize, planes: &[f32]| pc.sample(j, c0, cs, planes));
                                let extra = EpilogueArgs {
                                    affine: aff.as_ref().map(|(a, b)| (a.as_slice(), b.as_slice())),
                                    residual: res.map(|r| &r[s0 * rp..s1 * rp]),
                                    stats: st.take(),
                                    after_sample: pool.as_mut().map(|f| SampleHook(f as &mut dyn FnMut(usize, &[f32]) -> cnnc_compiler::Result<()>)),
                                };
                                k.forward(oc, &xin[s0 * inp..s1 * inp], w, b, extra)
                            }).map_err(lerr)?;
                        }
                    }
                    Kind::Dense { k, x, layer, bias, parts } => {
                        let w = param(params, layer, "weight")?;
                        let b = if *bias { Some(param(params, layer, "bias")?) } else { None };
                        let xin = whole(vals, locs, g, *x, n)?;
                        let inp = xin.len() / n;
                        if let Some(parts) = parts.as_ref().filter(|_| n < threads) {
                            // Fewer samples than threads: each sample's output features split
                            // across the pool (`Parts`), samples one after another.
                            for (s, o) in out.chunks_mut(stride).enumerate() {
                                let xs = &xin[s * inp..(s + 1) * inp];
                                let mut rest = Some(&mut o[..]);
                                let jobs: Vec<_> = parts.ranges.iter().map(|(r, ki)| (r.clone(), &parts.kernels[*ki], split_front(&mut rest, r.len()))).collect();
                                jobs.into_par_iter()
                                    .try_for_each(|(r, pk, po)| match po {
                                        Some(po) => pk.forward(po, xs, &w[r.start * inp..r.end * inp], b.map(|b| &b[r])),
                                        None => Err(cnnc_compiler::Error::Codegen { layer: name.clone(), message: "feature parts past the output".into() }),
                                    })
                                    .map_err(lerr)?;
                            }
                        } else {
                            out.par_chunks_mut(ch * stride).enumerate().try_for_each(|(i, oc)| {
                                let (s0, s1) = (i * ch, i * ch + oc.len() / stride);
                                k.forward(oc, &xin[s0 * inp..s1 * inp], w, b)
                            }).map_err(lerr)?;
                        }
                    }
                    Kind::BnTrain { x, layer, eps, momentum, saved, new_rm, new_rv, stats_from, flip } => {
                        let xin = whole(vals, locs, g, *x, n)?;
                        let shape = BnShape { n, c: ol.ch, hw: ol.hw };
                        *new_rm = param(params, layer, "running_mean")?.to_vec();
                        *new_rv = param(params, layer, "running_var")?.to_vec();
                        if n * ol.hw < 2 {
                            return Err(eerr(format!("layer `{layer}`: batch norm over a single value per channel (batch {n}): the unbiased variance is undefined")));
                        }
                        let (gamma, beta) = (param(params, layer, "weight")?, param(params, layer, "bias")?);
                        let (c, hw, num, off) = (ol.ch, ol.hw, ol.numel(), ol.off * ol.hw);
                        pointwise::batchnorm_check_train(layer, shape, &(0..c), xin.len(), n * num, [gamma.len(), beta.len(), new_rm.len(), new_rv.len()]).map_err(lerr)?;
                        // Per-channel statistics on all threads (each channel on one, in a fixed
                        // order: deterministic), then the affine map per sample.
                        // (Or combined from the plane statistics the convolution storing the
                        // input computed: the same numbers, without reading it again.)
                        let stats: Vec<(f64, f64)> = match *stats_from {
                            Some(j) => {
                                let parts = match done.get(j).map(|s| &s.kind) {
                                    Some(Kind::Conv { stats, .. }) if stats.len() >= n * c => &stats[..n * c],
                                    _ => return Err(eerr(format!("layer `{layer}`: its statistics' convolution step {j} stored none"))),
                                };
                                (0..c).into_par_iter().map(|ch| pointwise::combine_plane_stats((0..n).map(|s| parts[s * c + ch]))).collect()
                            }
                            None => (0..c).into_par_iter().map(|ch| pointwise::batchnorm_channel_stats(shape, ch, xin)).collect(),
                        };
                        saved.mean.resize(c, 0.0);
                        saved.rstd.resize(c, 0.0);
                        let (a, b): (Vec<f32>, Vec<f32>) = stats
                            .into_iter()
                            .enumerate()
                            .map(|(ch, st)| pointwise::batchnorm_channel_finish(ch, st, n * hw, saved, new_rm, new_rv, gamma, beta, *eps, *momentum))
                            .unzip();
                        // Per sample: the affine map with the first activation, the rest of
                        // the chain (as `chain_forward` would apply it, bit for bit), then the
                        // fused pooling while the sample is in cache.
                        let first_act = match step.chain.first() {
                            Some(Chain::Act(a)) => Some(*a),
                            _ => None,
                        };
                        let rest = &step.chain[usize::from(first_act.is_some())..];
                        let mut others: Vec<Vec<&[f32]>> = Vec::new();
                        for c in rest {
                            others.push(match c {
                                Chain::Add { others } => others.iter().map(|&o| whole(vals, locs, g, o, n)).collect::<R<_>>()?,
                                _ => Vec::new(),
                            });
                        }
                        let mut pool_chunks = FusedPool::chunks(fused_pool, 1, n);
                        let (c0, cs) = (ol.off, ol.ch);
                        if flip.is_some() && (!rest.iter().all(|c| matches!(c, Chain::Act(_))) || pool_chunks.iter().any(Option::is_some)) {
                            return Err(eerr(format!("layer `{layer}`: only activations can follow a batch norm storing transposed planes")));
                        }
                        let flip = *flip;
                        out.par_chunks_mut(stride).zip(xin.par_chunks(num)).zip(pool_chunks.par_iter_mut()).enumerate().try_for_each(|(s, ((o, xs), pc))| {
                            let o = &mut o[off..off + num];
                            affine_sample(o, xs, (&a, &b), hw, first_act, flip);
                            for (c, adds) in rest.iter().zip(&others) {
                                match c {
                                    Chain::Add { .. } => adds.iter().for_each(|r| o.iter_mut().zip(&r[s * num..(s + 1) * num]).for_each(|(v, &a)| *v += a)),
                                    Chain::Act(act) => pointwise::activation_inplace(*act, o),
                                    Chain::Fold { layer, .. } => return Err(cnnc_compiler::Error::Codegen { layer: layer.clone(), message: "a folded batch norm after a training batch norm".into() }),
                                }
                            }
                            match pc {
                                Some(pc) => pc.sample(0, c0, cs, o),
                                None => Ok(()),
                            }
                        }).map_err(lerr)?;
                    }
                    Kind::BnInfer { x, layer, eps } => {
                        let xin = whole(vals, locs, g, *x, n)?;
                        let (scale, shift) = fold(params, layer, *eps)?;
                        for s in 0..n {
                            let xs = &xin[s * ol.numel()..(s + 1) * ol.numel()];
                            let o = &mut out[ol.sample(s)];
                            for (c, (op, xp)) in o.chunks_exact_mut(ol.hw).zip(xs.chunks_exact(ol.hw)).enumerate() {
                                op.iter_mut().zip(xp).for_each(|(v, &a)| *v = a * scale[c] + shift[c]);
                            }
                        }
                    }
                    // Pooled by the steps writing its input, as they stored it.
                    Kind::Pool { by_producers: true, .. } => {}
                    Kind::Pool { k, x, argmax, per_am, .. } => {
                        let xin = whole(vals, locs, g, *x, n)?;
                        let inp = xin.len() / n;
                        let per_am = *per_am;
                        let num = ol.numel();
                        let off = ol.off * ol.hw;
                        let one = |oc: &mut [f32], am: Option<&mut [u8]>, s0: usize| -> cnnc_compiler::Result<()> {
                            let cnt = oc.len() / stride;
                            match am {
                                Some(am) => {
                                    for (j, a) in am.chunks_exact_mut(per_am).enumerate().take(cnt) {
                                        k.forward(&mut oc[j * stride + off..j * stride + off + num], Some(a), &xin[(s0 + j) * inp..(s0 + j + 1) * inp])?;
                                    }
                                }
                                None => {
                                    for j in 0..cnt {
                                        k.forward(&mut oc[j * stride + off..j * stride + off + num], None, &xin[(s0 + j) * inp..(s0 + j + 1) * inp])?;
                                    }
                                }
                            }
                            Ok(())
                        };
                        if per_am > 0 {
                            out.par_chunks_mut(ch * stride)
                                .zip(argmax[..n * per_am].par_chunks_mut(ch * per_am))
                                .enumerate()
                                .try_for_each(|(i, (oc, am))| one(oc, Some(am), i * ch))
                                .map_err(lerr)?;
                        } else {
                            out.par_chunks_mut(ch * stride).enumerate().try_for_each(|(i, oc)| one(oc, None, i * ch)).map_err(lerr)?;
                        }
                    }
                    Kind::Gap { x } => {
                        let xin = whole(vals, locs, g, *x, n)?;
                        let xl = loc_of(locs, g, *x)?;
                        let (num, hw, off) = (xl.numel(), xl.hw, ol.off * ol.hw);
                        // Each plane's mean from a lane-parallel sum; samples on all threads.
                        out[..n * stride].par_chunks_mut(stride).zip(xin.par_chunks(num)).for_each(|(o, xs)| {
                            for (o, p) in o[off..off + ol.numel()].iter_mut().zip(xs.chunks_exact(hw)) {
                                *o = (pointwise::sum_f64(p) / hw as f64) as f32;
                            }
                        });
                    }
                    Kind::Act { x, act } => {
                        let xin = whole(vals, locs, g, *x, n)?;
                        for s in 0..n {
                            pointwise::activation_forward(&name, *act, &mut out[ol.sample(s)], &xin[s * ol.numel()..(s + 1) * ol.numel()]).map_err(lerr)?;
                        }
                    }
                    Kind::Add { xs } => {
                        for (i, &o) in xs.iter().enumerate() {
                            let xin = whole(vals, locs, g, o, n)?;
                            for s in 0..n {
                                let src = &xin[s * ol.numel()..(s + 1) * ol.numel()];
                                let d = &mut out[ol.sample(s)];
                                if i == 0 {
                                    d.copy_from_slice(src);
                                } else {
                                    d.iter_mut().zip(src).for_each(|(v, &a)| *v += a);
                                }
                            }
                        }
                    }
                    Kind::Concat { xs } => {
                        let mut off = 0;
                        for &o in xs.iter() {
                            let xl = loc_of(locs, g, o)?;
                            let xin = whole(vals, locs, g, o, n)?;
                            for s in 0..n {
                                let b = ol.sample(s).start + off * ol.hw;
                                out[b..b + xl.numel()].copy_from_slice(&xin[s * xl.numel()..(s + 1) * xl.numel()]);
                            }
                            off += xl.ch;
                        }
                    }
                    Kind::Flatten { x } => {
                        let xin = whole(vals, locs, g, *x, n)?;
                        scatter(out, ol, xin, n);
                    }
                    Kind::Dropout { x, p, mask } => {
                        let xin = whole(vals, locs, g, *x, n)?;
                        if train {
                            if !(0.0..1.0).contains(p) {
                                return Err(eerr(format!("layer `{name}`: dropout probability {p} is outside [0, 1)")));
                            }
                            let mut dims = vec![n];
                            dims.extend(g.node(step.out).shape.dims());
                            *mask = reference::dropout_mask(&dims, *p, &mut tensor_rng(seed, &name)).iter().copied().collect();
                            let scale = 1.0 / (1.0 - *p);
                            for s in 0..n {
                                let m = &mask[s * ol.numel()..(s + 1) * ol.numel()];
                                let xs = &xin[s * ol.numel()..(s + 1) * ol.numel()];
                                for ((o, &v), &k) in out[ol.sample(s)].iter_mut().zip(xs).zip(m) {
                                    *o = if k { v * scale } else { 0.0 };
                                }
                            }
                        } else {
                            scatter(out, ol, xin, n);
                        }
                    }
                    Kind::Fallback { node } => {
                        let ops = g.operands(*node);
                        let x0 = view_of(g, ops[0], whole(vals, locs, g, ops[0], n)?, n)?;
                        let mut dims = vec![n];
                        dims.extend(g.node(*node).shape.dims());
                        let mut o = ArrayD::<f32>::zeros(IxDyn(&dims));
                        match g.node(*node).op {
                            Op::Lrn(l) => reference::lrn_forward(as4m(o.view_mut())?, as4(x0)?, &l),
                            Op::ChannelMul => {
                                let x1 = view_of(g, ops[1], whole(vals, locs, g, ops[1], n)?, n)?;
                                reference::channel_mul_forward(as4m(o.view_mut())?, as4(x0)?, as2(x1)?)
                            }
                            Op::Softmax => reference::softmax_forward(as2m(o.view_mut())?, as2(x0)?),
                            ref op => return Err(eerr(format!("layer `{name}`: no fallback for `{}`", op.kind()))),
                        }
                        .map_err(|e| eerr(format!("layer `{name}`: {e}")))?;
                        let flat: Vec<f32> = o.iter().copied().collect();
                        scatter(out, ol, &flat, n);
                    }
                    Kind::Skip => {}
                }
                chain_forward(step, from, params, out, ol, vals, locs, g, n)
            })();
            if let Some(t0) = t0 {
                step.time.forward = t0.elapsed();
            }
            r?;
        }
        Ok(())
    }

    /// Backward over the first `n` samples: the logits' gradient must already be in its
    /// gradient buffer and every other gradient buffer zero. Parameter gradients are added to
    /// `pgrads`.
    pub fn backward(&mut self, params: &ParamStore, pgrads: &mut ParamStore, n: usize) -> R {
        let Program { graph: g, plan, steps, locs, arena, threads, profiling, partials, bn_terms, recompute, .. } = self;
        let threads = *threads;
        let ng = g.needs_grad();
        let ch = chunk(n, threads);
        for i in (0..steps.len()).rev() {
            // Values whose memory served others since forward: recompute them now (the memory
            // plan's batch norm + activation and pooling outputs).
            // (Profiling: a recomputation counts as backward time of the group whose output
            // it recomputes, zeroing as this group's.)
            for &r in &recompute[i] {
                let t0 = profiling.then(Instant::now);
                recompute_step(&steps[r], params, arena, locs, g, n, threads)?;
                if let Some(t0) = t0 {
                    steps[r].time.backward += t0.elapsed();
                }
            }
            let step = &mut steps[i];
            let overwrite = plan.memory.overwrite_grad.get(i).copied().unwrap_or(false);
            let t0 = profiling.then(Instant::now);
            // Gradients whose life starts here are zeroed (a batch norm's backward instead
            // overwrites its input's gradient whole: `overwrite`).
            for &r in &plan.memory.zero_before[i] {
                zero_grad(arena, locs, g, r, n)?;
            }
            if !ng[step.out.index()] {
                continue; // at or below the lowest trainable layer: no backward at all
            }
            let ol = loc_of(locs, g, step.out)?;
            let stride = ol.stride();
            let mut mem = Mem::new(arena);
            // The output's value, where backward reads it (the memory plan keeps it then;
            // otherwise its memory may serve others).
            let needs_y = memplan::backward_reads_output(g, &plan.groups[i]);
            let step_name = step.name.clone();
            let r = (|| -> R {
                let (_, gbuf) = take(&mut mem, locs, g, step.out, true)?;
                let y: Option<&[f32]> = if needs_y { Some(&take(&mut mem, locs, g, step.out, false)?.1[..n * stride]) } else { None };
                let kept_y = || y.ok_or_else(|| eerr(format!("layer `{step_name}`: output not kept for its backward")));
                let gr = &mut gbuf[..n * stride];
                // A ReLU right after a training batch norm: its gradient mask is applied inside
                // the batch norm's backward (from the recomputed affine map), not as a pass here.
                let bn_relu = matches!(step.kind, Kind::BnTrain { .. }) && matches!(step.chain.first(), Some(Chain::Act(Activation::Relu)));
                let conv_act = mask_in_backward_data(step, &ng);
                // The chain, in reverse: activation from the output, residual to its operands.
                for (j, c) in step.chain.iter().enumerate().rev() {
                    match c {
                        Chain::Act(_) if j == 0 && (bn_relu || conv_act.is_some()) => {}
                        Chain::Act(a) => {
                            let y = kept_y()?;
                            let (num, off) = (ol.numel(), ol.off * ol.hw);
                            gr.par_chunks_mut(stride).zip(y.par_chunks(stride)).for_each(|(d, y)| act_grad_inplace(*a, &mut d[off..off + num], &y[off..off + num]));
                        }
                        Chain::Add { others } => {
                            for &o in others {
                                add_into(&mut mem, locs, g, o, gr, ol, n)?;
                            }
                        }
                        Chain::Fold { layer, .. } => return Err(eerr(format!("layer `{layer}`: folded batch norm in a training plan"))),
                    }
                }
                let name = step.name.clone();
                match &mut step.kind {
                    Kind::Conv { k, x, layer, bias, .. } => {
                        let k: &ConvKernels = k;
                        let mask = match conv_act {
                            Some(act) => Some(ActMask { act, y: kept_y()?, range: ol.off * ol.hw..ol.off * ol.hw + ol.numel() }),
                            None => None,
                        };
                        gemm_layer_backward(k, *x, layer, *bias, partials, GemmCtx { params, pgrads, mem: &mut mem, locs, g, need_dx: ng[x.index()], trains: trains(g, layer), gr, mask, stride, n, ch })?;
                    }
                    Kind::Dense { k, x, layer, bias, .. } => {
                        dense_layer_backward(k, *x, layer, *bias, partials, GemmCtx { params, pgrads, mem: &mut mem, locs, g, need_dx: ng[x.index()], trains: trains(g, layer), gr, mask: None, stride, n, ch })?;
                    }
                    Kind::BnTrain { x, layer, saved, flip, .. } => {
                        let dx = if ng[x.index()] { Some(take(&mut mem, locs, g, *x, true)?.1) } else { None };
                        let xin = whole(&mem, locs, g, *x, n)?;
                        let xl = loc_of(locs, g, *x)?;
                        let shape = BnShape { n, c: ol.ch, hw: ol.hw };
                        let gamma = param(params, layer, "weight")?;
                        let (c, hw, num, off) = (ol.ch, ol.hw, ol.numel(), ol.off * ol.hw);
                        pointwise::batchnorm_check_backward(layer, shape, &(0..c), [xin.len(), n * xl.numel(), n * num], [gamma.len(), c, c], saved).map_err(lerr)?;
                        // The forward's affine map per channel, for the fused ReLU's mask.
                        let relu = if bn_relu { Some(saved_affine(params, layer, saved, c)?) } else { None };
                        let layout = match *flip {
                            Some((rows, cols)) => GradPlanes::Transposed(rows, cols),
                            None => GradPlanes::Same,
                        };
                        // Per-channel sums: each sample's terms on all threads (its d_out, a slice
                        // of the possibly concatenated gradient, and its x read in order), added
                        // in sample order (deterministic); then the input gradient per sample
                        // where needed. (Output planes stored transposed: the sums' pass turns
                        // each d_out plane into the input's orientation in place first, so both
                        // passes read the same values in the same order as without.)
                        if bn_terms.len() < n * c {
                            bn_terms.resize(n * c, (0.0, 0.0));
                        }
                        let parts = &mut bn_terms[..n * c];
                        parts.par_chunks_mut(c).zip(gr.par_chunks_mut(stride).zip(xin.par_chunks(num))).for_each(|(p, (go, xs))| {
                            pointwise::batchnorm_sample_grad_sums(p, &mut go[off..off + num], xs, hw, &saved.mean, relu.as_deref(), layout)
                        });
                        let sums = pointwise::batchnorm_finish_grad_sums(parts, &saved.rstd[..c]);
                        if let Some(dx) = dx {
                            // `=` where this step starts the input gradient's life (the memory
                            // plan then did not zero it), else `+=`.
                            let write = if overwrite { GradWrite::Overwrite } else { GradWrite::Accumulate };
                            let dx = &mut dx[..n * xl.numel()];
                            dx.par_chunks_mut(num).zip(gr.par_chunks(stride).zip(xin.par_chunks(num))).for_each(|(d, (go, xs))| {
                                pointwise::batchnorm_backward_sample(d, &go[off..off + num], xs, 0, &sums, saved, gamma, n * hw, hw, relu.as_deref(), write)
                            });
                        }
                        if trains(g, layer) {
                            let (db, dg): (Vec<f32>, Vec<f32>) = sums.into_iter().unzip();
                            add_param(pgrads, layer, "weight", &dg)?;
                            add_param(pgrads, layer, "bias", &db)?;
                        }
                    }
                    Kind::BnInfer { layer, .. } => return Err(eerr(format!("layer `{layer}`: inference batch norm in a training plan"))),
                    Kind::Pool { k, x, argmax, per_am, .. } => {
                        if !ng[x.index()] {
                            return Ok(());
                        }
                        let xl = loc_of(locs, g, *x)?;
                        let inp = xl.numel();
                        let per_am = *per_am;
                        let (num, off) = (ol.numel(), ol.off * ol.hw);
                        let dx = &mut take(&mut mem, locs, g, *x, true)?.1[..n * inp];
                        let am: &[u8] = argmax;
                        dx.par_chunks_mut(ch * inp).enumerate().try_for_each(|(i, dxc)| -> cnnc_compiler::Result<()> {
                            for (j, d) in dxc.chunks_exact_mut(inp).enumerate() {
                                let s = i * ch + j;
                                let a = (per_am > 0).then(|| &am[s * per_am..(s + 1) * per_am]);
                                // `=` where this step starts the input gradient's life (the
                                // memory plan then did not zero it), else `+=`.
                                let d_out = &gr[s * stride + off..s * stride + off + num];
                                if overwrite {
                                    k.backward_overwrite(d, d_out, a)?;
                                } else {
                                    k.backward(d, d_out, a)?;
                                }
                            }
                            Ok(())
                        }).map_err(lerr)?;
                    }
                    Kind::Gap { x } if ng[x.index()] => {
                        // Every cell of a plane gets the plane's share `d_out / hw`, samples on
                        // all threads: `=` where this step starts the input gradient's life
                        // (the memory plan then did not zero it), else `+=`.
                        let xl = loc_of(locs, g, *x)?;
                        let (num, hw, off) = (xl.numel(), xl.hw, ol.off * ol.hw);
                        let dx = &mut take(&mut mem, locs, g, *x, true)?.1[..n * num];
                        dx.par_chunks_mut(num).zip(gr.par_chunks(stride)).for_each(|(d, go)| {
                            for (p, &v) in d.chunks_exact_mut(hw).zip(&go[off..off + ol.numel()]) {
                                let v = v / hw as f32;
                                if overwrite {
                                    p.fill(v);
                                } else {
                                    p.iter_mut().for_each(|e| *e += v);
                                }
                            }
                        });
                    }
                    Kind::Act { x, act } if ng[x.index()] => {
                        let dx = take(&mut mem, locs, g, *x, true)?.1;
                        let xin = whole(&mem, locs, g, *x, n)?;
                        let xl = loc_of(locs, g, *x)?;
                        for s in 0..n {
                            let r = s * xl.numel()..(s + 1) * xl.numel();
                            pointwise::activation_backward(&name, *act, &mut dx[r.clone()], &gr[ol.sample(s)], &xin[r]).map_err(lerr)?;
                        }
                    }
                    Kind::Add { xs } => {
                        for &o in xs.iter() {
                            add_into(&mut mem, locs, g, o, gr, ol, n)?;
                        }
                    }
                    Kind::Concat { xs } => {
                        let mut off = 0;
                        for &o in xs.iter() {
                            let xl = loc_of(locs, g, o)?;
                            add_into(&mut mem, locs, g, o, gr, Loc { off: ol.off + off, ch: xl.ch, ..ol }, n)?;
                            off += xl.ch;
                        }
                    }
                    Kind::Flatten { x } => add_into(&mut mem, locs, g, *x, gr, ol, n)?,
                    Kind::Dropout { x, p, mask } if ng[x.index()] => {
                        let xl = loc_of(locs, g, *x)?;
                        let scale = 1.0 / (1.0 - *p);
                        let dx = take(&mut mem, locs, g, *x, true)?.1;
                        for s in 0..n {
                            let r = s * xl.numel()..(s + 1) * xl.numel();
                            for ((d, &v), &k) in dx[r.clone()].iter_mut().zip(&gr[ol.sample(s)]).zip(&mask[r]) {
                                if k {
                                    *d += v * scale;
                                }
                            }
                        }
                    }
                    Kind::Fallback { node } => {
                        let ops = g.operands(*node);
                        let mut dy = Vec::new();
                        gather(&mut dy, gr, ol, n);
                        let dyv = view_of(g, *node, &dy, n)?;
                        let x0 = view_of(g, ops[0], whole(&mem, locs, g, ops[0], n)?, n)?;
                        let mut dx0 = ArrayD::<f32>::zeros(x0.raw_dim());
                        let mut dx1 = None;
                        match g.node(*node).op {
                            Op::Lrn(l) => reference::lrn_backward(as4m(dx0.view_mut())?, as4(dyv)?, as4(x0)?, &l),
                            Op::ChannelMul => {
                                let x1 = view_of(g, ops[1], whole(&mem, locs, g, ops[1], n)?, n)?;
                                let mut d1 = ArrayD::<f32>::zeros(x1.raw_dim());
                                let r = reference::channel_mul_backward(Some(as4m(dx0.view_mut())?), Some(as2m(d1.view_mut())?), as4(dyv)?, as4(x0)?, as2(x1)?);
                                dx1 = Some(d1);
                                r
                            }
                            Op::Softmax => {
                                let mut yv = Vec::new();
                                gather(&mut yv, kept_y()?, ol, n);
                                let yv = view_of(g, *node, &yv, n)?;
                                reference::softmax_backward(as2m(dx0.view_mut())?, as2(dyv)?, as2(yv)?)
                            }
                            ref op => return Err(eerr(format!("layer `{name}`: no fallback for `{}`", op.kind()))),
                        }
                        .map_err(|e| eerr(format!("layer `{name}`: {e}")))?;
                        for (o, d) in ops.iter().zip([Some(dx0), dx1]) {
                            if let Some(d) = d {
                                let d: Vec<f32> = d.iter().copied().collect();
                                let l = loc_of(locs, g, *o)?;
                                add_into(&mut mem, locs, g, *o, &d, Loc { buf: usize::MAX, off: 0, total: l.ch, ..l }, n)?;
                            }
                        }
                    }
                    // Operands that need no gradient (guards above).
                    Kind::Gap { .. } | Kind::Act { .. } | Kind::Dropout { .. } => {}
                    Kind::Skip => {}
                }
                Ok(())
            })();
            if let Some(t0) = t0 {
                step.time.backward += t0.elapsed();
            }
            r?;
        }
        Ok(())
    }
}

/// The first `k` elements of `*s`, leaving the rest there (`None` stays `None`).
fn split_front<'a, T>(s: &mut Option<&'a mut [T]>, k: usize) -> Option<&'a mut [T]> {
    let (a, b) = s.take()?.split_at_mut(k);
    *s = Some(b);
    Some(a)
}

/// One sample of a training batch norm's normalise pass, `o = act(a*x + b)` per channel
/// (`(a, b)` per channel, planes of `hw`, the first activation of the chain fused in), as the
/// forward pass and its recomputation both run it: stored transposed when `flip` (the input's
/// planes are `rows x cols`, `passes::layout`).
fn affine_sample(o: &mut [f32], xs: &[f32], (a, b): (&[f32], &[f32]), hw: usize, act: Option<Activation>, flip: Option<(usize, usize)>) {
    match (flip, act) {
        (None, Some(act)) => pointwise::channel_affine_act(o, xs, 0, a, b, hw, act),
        (None, None) => pointwise::channel_affine(o, xs, 0, a, b, hw),
        // The map and the ReLU in the transposing pass; another activation after it.
        (Some(rc), Some(Activation::Relu)) => pointwise::transpose_planes_map(o, xs, rc, |c| move |v: f32| (v * a[c] + b[c]).max(0.0)),
        (Some(rc), act) => {
            pointwise::transpose_planes_map(o, xs, rc, |c| move |v: f32| v * a[c] + b[c]);
            if let Some(act) = act {
                pointwise::activation_inplace(act, o);
            }
        }
    }
}

/// Recompute a step's output in backward, exactly as the forward pass computed it: the memory
/// plan let others use its memory. A pooling layer pools its (kept or recomputed) input again
/// without recording winners; a batch norm: [`recompute_bn_act`].
fn recompute_step(step: &Step, params: &ParamStore, arena: &mut [f32], locs: &[Option<Loc>], g: &Graph, n: usize, threads: usize) -> R {
    let (k, x) = match &step.kind {
        Kind::Pool { k, x, .. } => (k, x),
        Kind::BnTrain { .. } => return recompute_bn_act(step, params, arena, locs, g, n),
        _ => return Err(eerr(format!("layer `{}`: only a batch norm's or a pooling layer's output can be recomputed", step.name))),
    };
    if !step.chain.is_empty() {
        return Err(eerr(format!("layer `{}`: a recomputed pooling has nothing fused after it", step.name)));
    }
    let ol = loc_of(locs, g, step.out)?;
    let mut mem = Mem::new(arena);
    let (_, out) = take(&mut mem, locs, g, step.out, false)?;
    let xin = whole(&mem, locs, g, *x, n)?;
    let (inp, num, stride, off) = (xin.len() / n, ol.numel(), ol.stride(), ol.off * ol.hw);
    out[..n * stride]
        .par_chunks_mut(stride)
        .zip(xin.par_chunks(inp))
        .with_min_len(n.div_ceil(threads.max(1)))
        .try_for_each(|(o, xs)| k.forward(&mut o[off..off + num], None, xs))
        .map_err(|e| eerr(format!("layer `{}`: {e}", step.name)))
}

/// Recompute a training batch norm's output (with its activation chain) from its kept input,
/// its saved batch statistics and `gamma`, `beta`, exactly as the forward pass computed it
/// (same affine map, same activation code).
fn recompute_bn_act(step: &Step, params: &ParamStore, arena: &mut [f32], locs: &[Option<Loc>], g: &Graph, n: usize) -> R {
    let Kind::BnTrain { x, layer, saved, flip, .. } = &step.kind else {
        return Err(eerr(format!("layer `{}`: not a batch norm", step.name)));
    };
    let ol = loc_of(locs, g, step.out)?;
    let (a, b): (Vec<f32>, Vec<f32>) = saved_affine(params, layer, saved, ol.ch)?.into_iter().unzip();
    let mut mem = Mem::new(arena);
    let (_, out) = take(&mut mem, locs, g, step.out, false)?;
    let r = (|| -> R {
        let xin = whole(&mem, locs, g, *x, n)?;
        // The output may be a channel slice of an in-place concatenation: `num` elements at
        // `off` in each sample's `stride`.
        let (num, hw, stride, off) = (ol.numel(), ol.hw, ol.stride(), ol.off * ol.hw);
        let o = out.get_mut(..n * stride).ok_or_else(|| eerr(format!("layer `{layer}`: buffer too small")))?;
        if xin.len() != n * num {
            return Err(eerr(format!("layer `{layer}`: input of {} elements for {n} samples of {num}", xin.len())));
        }
        let acts = step
            .chain
            .iter()
            .map(|c| match c {
                Chain::Act(act) => Ok(*act),
                _ => Err(eerr(format!("layer `{layer}`: only activations can follow a recomputed batch norm"))),
            })
            .collect::<R<Vec<Activation>>>()?;
        // The first activation in the affine pass, as the forward pass applied it.
        o.par_chunks_mut(stride).zip(xin.par_chunks(num)).for_each(|(o, xs)| {
            let o = &mut o[off..off + num];
            affine_sample(o, xs, (&a, &b), hw, acts.first().copied(), *flip);
            for &act in acts.iter().skip(1) {
                pointwise::activation_inplace(act, o);
            }
        });
        Ok(())
    })();
    r
}

/// A training batch norm's per-channel forward map `(a, b)` (`y = a*x + b`) from `gamma`,
/// `beta` and the batch statistics its forward saved: bit-identical to the forward's, for
/// recomputing its output and for the mask of a ReLU fused into its backward.
fn saved_affine(params: &ParamStore, layer: &str, saved: &BnSaved, c: usize) -> R<Vec<(f32, f32)>> {
    let (gamma, beta) = (param(params, layer, "weight")?, param(params, layer, "bias")?);
    if saved.mean.len() != c || saved.rstd.len() != c || gamma.len() != c || beta.len() != c {
        return Err(eerr(format!("layer `{layer}`: statistics or parameters of another shape than its {c} channels")));
    }
    Ok((0..c).map(|ch| pointwise::batchnorm_affine(gamma[ch], beta[ch], saved.mean[ch], saved.rstd[ch])).collect())
}

/// `grad(o) += src` where `src` is laid out as `sl` (per-sample ranges of `src`); nothing when
/// `o`'s buffer has no gradient (no value in it needs one).
fn add_into(mem: &mut Mem<'_>, locs: &[Option<Loc>], g: &Graph, o: NodeId, src: &[f32], sl: Loc, n: usize) -> R {
    let l = loc_of(locs, g, o)?;
    if l.numel() != sl.numel() {
        return Err(eerr(format!("layer `{}`: gradient of {} elements per sample for a value of {}", g.node(o).name, sl.numel(), l.numel())));
    }
    if l.grad == NO_GRAD {
        return Ok(());
    }
    let (at, d) = take(mem, locs, g, o, true)?;
    // Samples on all threads (a residual's or a concatenation's gradient is megabytes).
    let (da, sa, num) = (l.off * l.hw, sl.off * sl.hw, l.numel());
    d[..n * l.stride()].par_chunks_mut(l.stride()).zip(src[..n * sl.stride()].par_chunks(sl.stride())).for_each(|(d, s)| {
        d[da..da + num].iter_mut().zip(&s[sa..sa + num]).for_each(|(a, &b)| *a += b);
    });
    mem.put(at, d);
    Ok(())
}

/// Zero the first `n` samples of buffer `r`'s gradient (its life starts).
pub(crate) fn zero_grad(arena: &mut [f32], locs: &[Option<Loc>], g: &Graph, r: NodeId, n: usize) -> R {
    let l = loc_of(locs, g, r)?;
    if l.grad == NO_GRAD {
        return Err(eerr(format!("layer `{}`: no gradient planned", g.node(r).name)));
    }
    let d = arena.get_mut(l.grad..).and_then(|d| d.get_mut(..n * l.stride())).ok_or_else(|| eerr(format!("layer `{}`: gradient past the arena", g.node(r).name)))?;
    zero(d);
    Ok(())
}

/// Whether layer `layer` trains (frozen layers get no weight gradients).
fn trains(g: &Graph, layer: &str) -> bool {
    g.find(layer).is_ok_and(|id| g.node(id).trainable)
}

/// The gradient of parameter `{layer}.{suffix}`, checked to hold `len` elements.
fn grad_mut<'a>(pgrads: &'a mut ParamStore, layer: &str, suffix: &str, len: usize) -> R<&'a mut [f32]> {
    let name = format!("{layer}.{suffix}");
    let d = pgrads.slice_mut(&name).ok_or_else(|| eerr(format!("missing gradient `{name}`")))?;
    if d.len() != len {
        return Err(eerr(format!("gradient `{name}` has {} elements, expected {len}", d.len())));
    }
    Ok(d)
}

fn add_param(pgrads: &mut ParamStore, layer: &str, suffix: &str, v: &[f32]) -> R {
    grad_mut(pgrads, layer, suffix, v.len())?.iter_mut().zip(v).for_each(|(a, &b)| *a += b);
    Ok(())
}

/// Backward of a dense layer: the input gradient per sample chunk on all threads, as a
/// convolution's; the weight gradient split by output rows across the threads
/// (`DenseKernels::weight_row_parts`), each part over the whole batch and added straight into
/// the parameter gradient, then the bias gradient. A per-chunk partial of the weights, zeroed
/// and summed every step, was most of a large layer's backward: AlexNet's fc6 has 37.7M
/// weights (151 MB a partial, on 4 KiB pages).
fn dense_layer_backward(k: &DenseKernels, x: NodeId, layer: &str, bias: bool, partials: &mut [Vec<f32>], c: GemmCtx<'_, '_>) -> R {
    let GemmCtx { params, pgrads, mem, locs, g, need_dx, trains, gr, mask, stride, n, ch } = c;
    if mask.is_some() {
        return Err(eerr(format!("layer `{layer}`: an activation mask fused into a dense layer's backward")));
    }
    let w = param(params, layer, "weight")?;
    let dx = if need_dx { Some(take(mem, locs, g, x, true)?.1) } else { None };
    // The input, read by the weight gradient only: a frozen layer's is not kept for backward.
    let xin: &[f32] = if trains { whole(mem, locs, g, x, n)? } else { &[] };
    let inp = loc_of(locs, g, x)?.numel();
    let gr: &[f32] = &gr[..n * stride];
    // (`partials` holds one buffer per thread.)
    let threads = partials.len();
    if let Some(dx) = dx {
        let dx = &mut dx[..n * inp];
        let cols = k.data_col_parts(threads);
        if cols.len() > 1 && partials.iter().all(|p| p.len() >= n * inp) {
            // By input columns, each part into its thread's buffer (zeroed on its columns),
            // then added into `d_x`: the weights read once between the threads.
            partials
                .par_iter_mut()
                .zip(cols.par_iter())
                .try_for_each(|(t, c)| {
                    let t = &mut t[..n * inp];
                    t.chunks_exact_mut(inp).for_each(|row| row[c.clone()].fill(0.0));
                    k.backward_data_cols(t, c.clone(), gr, w)
                })
                .map_err(lerr)?;
            let parts = &partials[..cols.len()];
            dx.par_chunks_mut(inp).enumerate().for_each(|(s, d)| {
                for (t, c) in parts.iter().zip(&cols) {
                    d[c.clone()].iter_mut().zip(&t[s * inp..][c.clone()]).for_each(|(a, &b)| *a += b);
                }
            });
        } else {
            dx.par_chunks_mut(ch * inp).zip(gr.par_chunks(ch * stride)).try_for_each(|(dxc, d)| k.backward_data(dxc, d, w)).map_err(lerr)?;
        }
    }
    if !trains {
        return Ok(());
    }
    let mut rest = Some(grad_mut(pgrads, layer, "weight", w.len())?);
    let jobs: Vec<_> = k.weight_row_parts(threads).into_iter().map(|r| (split_front(&mut rest, r.len() * inp), r)).collect();
    jobs.into_par_iter()
        .try_for_each(|(d, r)| match d {
            Some(d) => k.backward_weight_rows(d, r, gr, xin),
            None => Err(cnnc_compiler::Error::Codegen { layer: layer.to_string(), message: "weight-gradient rows past the weights".into() }),
        })
        .map_err(lerr)?;
    if bias {
        let o = param(params, layer, "bias")?.len();
        k.backward_bias(grad_mut(pgrads, layer, "bias", o)?, gr, 0..o).map_err(lerr)?;
    }
    Ok(())
}

/// What [`gemm_layer_backward`] reads and writes besides the layer itself.
struct GemmCtx<'a, 'm> {
    params: &'a ParamStore,
    pgrads: &'a mut ParamStore,
    mem: &'a mut Mem<'m>,
    locs: &'a [Option<Loc>],
    g: &'a Graph,
    /// Whether the operand needs its gradient (false for the image and below the lowest
    /// trainable layer).
    need_dx: bool,
    /// Whether the layer trains (false: no weight-gradient kernel).
    trains: bool,
    /// Gradient of the layer's (chain's) output, `n * stride` values.
    gr: &'a mut [f32],
    /// The activation of a convolution + activation group, whose mask backward data applies
    /// to `gr` per sample (`None`: `gr` is final).
    mask: Option<ActMask<'a>>,
    stride: usize,
    n: usize,
    /// Samples per thread chunk.
    ch: usize,
}

/// The activation of a convolution + activation group whose input needs a gradient
/// (`needs_grad`, by node): its mask is applied per sample inside the convolution's backward
/// data, right before the kernel reads the sample (`ConvKernels::backward_data_with`), rather
/// than as a pass over the whole gradient. Not where the chain also adds a residual (the add
/// passes the masked gradient on before backward data runs) nor where no backward data runs
/// (the first layer: the mask is then a pass of its own).
pub(crate) fn mask_in_backward_data(step: &Step, needs_grad: &[bool]) -> Option<Activation> {
    match (&step.kind, step.chain.as_slice()) {
        (Kind::Conv { x, .. }, [Chain::Act(a)]) if needs_grad[x.index()] => Some(*a),
        _ => None,
    }
}

/// The gradient mask of an activation fused into a convolution's forward, applied inside its
/// backward data (see [`act_grad_inplace`]).
struct ActMask<'a> {
    act: Activation,
    /// The group's output (the activation's), `n * stride` values.
    y: &'a [f32],
    /// The layer's elements within a sample's `stride` (its concatenation slice).
    range: std::ops::Range<usize>,
}

/// Backward of a convolution over `n` samples in fixed chunks of `ch`: the
/// input gradient (only when the operand needs one) straight into its buffer, the weight and bias
/// gradients into one partial buffer per chunk, then summed in chunk order into `pgrads`
/// (deterministic for a thread count).
fn gemm_layer_backward(k: &ConvKernels, x: NodeId, layer: &str, bias: bool, partials: &mut [Vec<f32>], c: GemmCtx<'_, '_>) -> R {
    let GemmCtx { params, pgrads, mem, locs, g, need_dx, trains, gr, mask, stride, n, ch } = c;
    if !need_dx && !trains {
        return Ok(());
    }
    let w = param(params, layer, "weight")?;
    let dx = if need_dx { Some(take(mem, locs, g, x, true)?.1) } else { None };
    // The input, read by the weight gradient only: a frozen layer's is not kept for backward.
    let xin: &[f32] = if trains { whole(mem, locs, g, x, n)? } else { &[] };
    let inp = loc_of(locs, g, x)?.numel();
    let wn = w.len();
    let bn = if bias { pgrads.slice(&format!("{layer}.bias")).map_or(0, <[f32]>::len) } else { 0 };
    if partials.iter().any(|p| p.len() < wn + bn) {
        return Err(eerr(format!("layer `{layer}`: {wn} weights and {bn} biases exceed the compiled gradient scratch")));
    }
    if mask.is_some() && dx.is_none() {
        return Err(eerr(format!("layer `{layer}`: activation mask fused into a backward data that does not run")));
    }
    let mask = mask.as_ref();
    let gr = &mut gr[..n * stride];
    // With fewer samples than threads (one sample a chunk, threads to spare), each chunk's
    // input gradient and weight gradient run at once on two threads; both read the final
    // output gradient, so a fused activation's mask is then applied first, as a pass.
    // (`partials` holds one buffer per thread.)
    let overlap = n < partials.len() && trains;
    // Chunk `i`: its samples' output gradient `d` (masked per sample by backward data where
    // the group's activation is fused there), then the weight gradient from the final `d`.
    let work = |i: usize, mut dx: Option<&mut [f32]>, d: &mut [f32], part: &mut Vec<f32>| -> cnnc_compiler::Result<()> {
        let part = &mut part[..wn + bn];
        part.fill(0.0);
        // (Chunks come from `gr[..n * stride]`: every one holds samples, `s0 < n`.)
        let s0 = i * ch;
        let s1 = (s0 + ch).min(n);
        if let (Some(dx), true) = (dx.as_deref_mut(), overlap) {
            if let Some(m) = mask {
                for (j, ds) in d.chunks_mut(stride).enumerate() {
                    act_grad_inplace(m.act, &mut ds[m.range.clone()], &m.y[(s0 + j) * stride..][m.range.clone()]);
                }
            }
            let (pw, pb) = part.split_at_mut(wn);
            let d: &[f32] = d;
            let (rd, rw) = rayon::join(|| k.backward_data(dx, d, w), || k.backward_weight(pw, bias.then_some(pb), d, &xin[s0 * inp..s1 * inp]));
            return rd.and(rw);
        }
        if let Some(dx) = dx {
            match mask {
                Some(m) => {
                    // Sample `s` of the chunk: `d *= act'` from the group's output, in place.
                    let mut hook = |s: usize, ds: &mut [f32]| {
                        act_grad_inplace(m.act, ds, &m.y[(s0 + s) * stride..][m.range.clone()]);
                        Ok(())
                    };
                    k.backward_data_with(dx, d, w, GradHook(&mut hook))?
                }
                None => k.backward_data(dx, d, w)?,
            }
        }
        if !trains {
            return Ok(());
        }
        let (pw, pb) = part.split_at_mut(wn);
        k.backward_weight(pw, bias.then_some(pb), d, &xin[s0 * inp..s1 * inp])
    };
    if let Some(dx) = dx {
        let dx = &mut dx[..n * inp];
        dx.par_chunks_mut(ch * inp).zip(gr.par_chunks_mut(ch * stride)).zip(partials.par_iter_mut()).enumerate().try_for_each(|(i, ((dxc, d), part))| work(i, Some(dxc), d, part)).map_err(lerr)?;
    } else {
        gr.par_chunks_mut(ch * stride).zip(partials.par_iter_mut()).enumerate().try_for_each(|(i, (d, part))| work(i, None, d, part)).map_err(lerr)?;
    }
    // chunks beyond n (fewer samples than threads) were not run: their partials add nothing
    let used = n.div_ceil(ch);
    partials[used..].iter_mut().for_each(|p| p[..wn + bn].fill(0.0));
    if !trains {
        return Ok(());
    }
    for p in partials.iter() {
        add_param(pgrads, layer, "weight", &p[..wn])?;
        if bias {
            add_param(pgrads, layer, "bias", &p[wn..wn + bn])?;
        }
    }
    Ok(())
}
