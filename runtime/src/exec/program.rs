//! Compiling a [`Plan`] into a [`Program`]: one [`Step`] per fused group with its JIT kernels,
//! the location of every materialised value ([`Loc`]) and the value / gradient buffers,
//! allocated once for the largest batch.
//!
//! A group `[anchor, c1, c2, ..]` becomes a step whose anchor kernel fuses as long a prefix
//! of the chain `c1, c2, ..` as it can (a convolution: folded batch norm, one residual, relu /
//! leaky relu; a dense layer: relu / leaky relu); the rest of the chain runs as in-place passes
//! over the group's output ([`Chain`]). Backward walks the whole chain in reverse whether or not
//! an op was fused: an activation's derivative is taken from the group's output, a residual add
//! hands its gradient to its other operands.

use crate::engine::EngineError;
use cnnc_compiler::ir::{Activation, Dense, Graph, Loss, NodeId, Op, PoolKind, Shape};
use cnnc_compiler::lower::pointwise::{BnSaved, PlaneStats};
use cnnc_compiler::lower::hugebuf::HugeBuf;
use cnnc_compiler::lower::pool::PoolKernels;
use cnnc_compiler::lower::{self, ChannelSlice, ConvKernels, ConvOptions, DenseKernels, Epilogue, FusedAct};
use cnnc_compiler::passes::memplan;
use cnnc_compiler::pipeline;
use cnnc_compiler::plan::{Fusion, Mode as PlanMode, Plan};
use std::time::{Duration, Instant};

pub(crate) fn eerr(m: impl Into<String>) -> EngineError {
    EngineError(m.into())
}

/// Where a value lives: channels `off..off + ch` of the buffer at arena offset `buf`, whose
/// samples have `total` channels of `hw` pixels (`off = 0`, `ch = total` unless the value is a
/// concat slice); the buffer's gradient is at arena offset `grad`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loc {
    /// Arena offset of the buffer's values.
    pub buf: usize,
    /// Arena offset of the buffer's gradient ([`NO_GRAD`] where backward needs none).
    pub grad: usize,
    pub off: usize,
    pub ch: usize,
    pub total: usize,
    pub hw: usize,
    /// Elements of the whole buffer (compiled batch x `total * hw`).
    pub cap: usize,
}

/// [`Loc::grad`] of a buffer without a gradient.
pub(crate) const NO_GRAD: usize = usize::MAX;

impl Loc {
    /// Elements per sample in the buffer.
    pub fn stride(&self) -> usize {
        self.total * self.hw
    }
    /// Elements per sample of the value itself.
    pub fn numel(&self) -> usize {
        self.ch * self.hw
    }
    /// Whether the value is its whole buffer.
    pub fn contiguous(&self) -> bool {
        self.off == 0 && self.ch == self.total
    }
    /// Sample `s`'s elements in the buffer.
    pub fn sample(&self, s: usize) -> std::ops::Range<usize> {
        let b = s * self.stride() + self.off * self.hw;
        b..b + self.numel()
    }
}

/// One op of a group's chain after its anchor.
#[derive(Clone, Debug)]
pub(crate) enum Chain {
    /// Inference batch norm folded to `x*scale + shift` (layer name, eps).
    Fold { layer: String, eps: f32 },
    /// Residual add of the other operands.
    Add { others: Vec<NodeId> },
    /// Activation.
    Act(Activation),
}

/// What a step's anchor computes.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Kind {
    /// `stats`: `[batch, Cout]` plane statistics the forward stores for a training batch norm
    /// reading the output (`Plan::stats_from`; empty otherwise).
    /// `parts`: the forward split by output channels, for batches smaller than the thread
    /// count ([`Parts`]; `None` where the program's batch fills every thread).
    Conv { k: Box<ConvKernels>, x: NodeId, layer: String, bias: bool, residual: Option<NodeId>, fold: Option<(String, f32)>, stats: Vec<PlaneStats>, parts: Option<Parts<ConvKernels>> },
    /// `parts`: the forward split by output features, as a convolution's.
    Dense { k: DenseKernels, x: NodeId, layer: String, bias: bool, parts: Option<Parts<DenseKernels>> },
    /// `stats_from`: the earlier convolution step whose forward computes this batch norm's
    /// plane statistics (`Plan::stats_from`).
    /// `flip`: the output's planes are the input's transposed (`passes::layout`), the input
    /// planes being stored `rows x cols` (`Some((rows, cols))`); the output gradient is then
    /// read transposed against the input.
    BnTrain { x: NodeId, layer: String, eps: f32, momentum: f32, saved: BnSaved, new_rm: Vec<f32>, new_rv: Vec<f32>, stats_from: Option<usize>, flip: Option<(usize, usize)> },
    BnInfer { x: NodeId, layer: String, eps: f32 },
    /// `argmax`: each sample's `per_am` max-pooling window offsets (training programs; empty
    /// with `per_am == 0` for average pooling and inference, whose forward records none).
    /// `by_producers`: the groups writing `x` pool each sample as they store it
    /// (`Plan::pool_into`), so this step's forward does nothing.
    Pool { k: PoolKernels, x: NodeId, argmax: Vec<u8>, per_am: usize, by_producers: bool },
    Gap { x: NodeId },
    Act { x: NodeId, act: Activation },
    Add { xs: Vec<NodeId> },
    Concat { xs: Vec<NodeId> },
    Flatten { x: NodeId },
    Dropout { x: NodeId, p: f32, mask: Vec<bool> },
    /// LRN, channel-wise multiply, softmax: the reference op functions on ndarray views (slow).
    Fallback { node: NodeId },
    /// In-place concatenation, or the graph's loss node (computed by the engine).
    Skip,
}

/// A layer's forward split by output channels (a convolution's) or features (a dense
/// layer's), so that a batch smaller than the thread count still keeps every thread busy:
/// each sample's outputs are cut into [`Self::ranges`], run at once on the pool by kernels
/// compiled for that many outputs (the same input, their rows of the weights, bias and folded
/// batch-norm map, their planes of the residual and statistics), each storing its outputs
/// contiguously. The split layer computes the same sums as the whole one, but each part may
/// block them differently (a narrower convolution can even take a different algorithm), so
/// results agree to rounding, not bit for bit.
///
/// Only for layers wider than one part (ungrouped convolutions; dense layers large enough,
/// `DenseKernels::is_large`, smaller ones being cheap next to a fork and join),
/// and only where the program's batch is smaller than the thread count (a full batch splits
/// by samples instead).
pub(crate) struct Parts<K> {
    /// Outputs of each part, in order, and the index of its kernel in `kernels`.
    pub ranges: Vec<(std::ops::Range<usize>, usize)>,
    /// One kernel per distinct part width (at most two: the common width and the last).
    pub kernels: Vec<K>,
}

/// [`Parts`] are whole multiples of this many outputs (but the last): for a convolution, two
/// of the micro-kernel's 4-row panels of weights, so that no part but the last ends mid-panel;
/// for a dense layer, one 8-column panel. With many threads and a narrow layer that leaves
/// fewer parts than threads.
pub(crate) const PART_CHANNELS: usize = 8;

impl<K> Parts<K> {
    /// The split of `total` outputs for `threads` threads, `compile` building the kernel of
    /// a part of the width given, or `None` where it would have fewer than two parts. Parts
    /// are `ceil(total / threads)` outputs rounded up to a multiple of [`PART_CHANNELS`], the
    /// last taking the rest.
    fn build(total: usize, threads: usize, mut compile: impl FnMut(usize) -> Result<K, EngineError>) -> Result<Option<Parts<K>>, EngineError> {
        let width = total.div_ceil(threads.max(1)).next_multiple_of(PART_CHANNELS);
        if width >= total {
            return Ok(None);
        }
        let mut kernels: Vec<(usize, K)> = Vec::new();
        let mut ranges = Vec::new();
        for c0 in (0..total).step_by(width) {
            let w = width.min(total - c0);
            let ki = match kernels.iter().position(|(kw, _)| *kw == w) {
                Some(i) => i,
                None => {
                    kernels.push((w, compile(w)?));
                    kernels.len() - 1
                }
            };
            ranges.push((c0..c0 + w, ki));
        }
        Ok(Some(Parts { ranges, kernels: kernels.into_iter().map(|(_, k)| k).collect() }))
    }
}

/// [`Parts`] of a convolution: forward-only kernels, each storing its planes contiguously
/// (no concatenation slice); `None` for a grouped layer.
fn conv_parts(name: &str, conv: &cnnc_compiler::ir::Conv2d, in_shape: (usize, usize, usize), epi: Epilogue, lmode: lower::Mode, opts: ConvOptions, threads: usize) -> Result<Option<Parts<ConvKernels>>, EngineError> {
    if conv.groups != 1 {
        return Ok(None);
    }
    let epi = Epilogue { concat: None, ..epi };
    let opts = ConvOptions { forward_only: true, ..opts };
    Parts::build(conv.out_channels, threads, |w| {
        let sub = cnnc_compiler::ir::Conv2d { out_channels: w, ..*conv };
        ConvKernels::compile_with(name, &sub, in_shape, epi, lmode, opts).map_err(|e| eerr(e.to_string()))
    })
}

/// One fused group.
pub(crate) struct Step {
    /// The anchor's layer name (for errors).
    pub name: String,
    /// The node whose value the step produces.
    pub out: NodeId,
    pub kind: Kind,
    /// Chain ops after the anchor, in order.
    pub chain: Vec<Chain>,
    /// How many leading chain ops the anchor kernel fuses (the rest run as passes).
    pub fused: usize,
    /// The later pooling step this step computes as it stores each sample (`Plan::pool_into`,
    /// where the runtime can: see [`compile`]).
    pub pool: Option<usize>,
    /// Wall time of the step's last forward and backward run (set only while profiling).
    pub time: super::StepTime,
}

/// A compiled plan with its buffers.
pub(crate) struct Program {
    pub graph: Graph,
    pub plan: Plan,
    pub steps: Vec<Step>,
    pub locs: Vec<Option<Loc>>,
    /// Values and gradients, placed by the memory plan (`passes::memplan`): one allocation
    /// of `batch x arena_elems`; each step sees it through an [`arena::Mem`](super::arena::Mem).
    pub arena: HugeBuf,
    pub input: NodeId,
    pub logits: NodeId,
    /// The logits of every graph output, main (`logits`) first: each gets the loss.
    pub heads: Vec<NodeId>,
    pub batch: usize,
    pub threads: usize,
    pub compile_time: Duration,
    /// Per-thread-chunk weight (and bias) gradient partials, shared by every convolution (one
    /// layer's backward runs at a time), sized for the largest; empty for inference programs.
    /// A dense layer's backward data uses them for its column parts' input gradients
    /// (`run::dense_layer_backward`).
    pub partials: Vec<Vec<f32>>,
    /// The training batch norms' per-sample gradient-sum terms (`[sample][channel]`, see
    /// `pointwise::batchnorm_sample_grad_sums`), shared by all of them and sized for the
    /// widest at the full batch, so that a step allocates nothing for them.
    pub bn_terms: Vec<(f64, f64)>,
    /// Steps whose output backward recomputes before group `i`'s step (indexed by group; from
    /// the memory plan's `recompute_before`).
    pub recompute: Vec<Vec<usize>>,
    /// Whether `forward` / `backward` record each step's wall time in [`Step::time`].
    pub profiling: bool,
}

impl Program {
    /// The location of a materialised value.
    pub fn loc(&self, id: NodeId) -> Result<Loc, EngineError> {
        loc_of(&self.locs, &self.graph, id)
    }
}

pub(crate) fn loc_of(locs: &[Option<Loc>], g: &Graph, id: NodeId) -> Result<Loc, EngineError> {
    locs.get(id.index())
        .copied()
        .flatten()
        .ok_or_else(|| eerr(format!("layer `{}`: value is not materialised by the plan", g.node(id).name)))
}

/// Per-sample `(C, H*W)` of a shape (a flat vector is `n x 1`).
fn chw(s: Shape) -> (usize, usize) {
    let (c, h, w) = s.as_chw();
    (c, h * w)
}

/// The logits node of every graph output, main output first (a loss node's operand where an
/// output is one): each head gets the loss, weighted (see `JitEngine::set_loss_weights`).
pub(crate) fn head_nodes(g: &Graph, loss: Loss) -> Result<Vec<NodeId>, EngineError> {
    if let Some(out) = g.outputs().into_iter().find(|&o| matches!(g.node(o).op, Op::Loss(own) if own != loss)) {
        return Err(eerr(format!("layer `{}`: the graph ends in `{}`, but `{}` was asked for", g.node(out).name, g.node(out).op, Op::Loss(loss))));
    }
    let heads = memplan::heads(g);
    if heads.is_empty() {
        return Err(eerr(format!("graph `{}` has no output", g.name)));
    }
    Ok(heads)
}

/// Compile `g` for `mode` with `fusion` for batches of up to `batch` samples on `threads`
/// threads.
pub(crate) fn compile(g: &Graph, loss: Loss, mode: PlanMode, fusion: Fusion, batch: usize, threads: usize) -> Result<Program, EngineError> {
    let t0 = Instant::now();
    let plan = pipeline::plan(g, mode, fusion).map_err(|e| eerr(e.to_string()))?;
    let g = plan.graph.clone();
    let inputs = g.inputs();
    let [input] = inputs.as_slice() else {
        return Err(eerr(format!("graph `{}`: the engine needs exactly one input, it has {}", g.name, inputs.len())));
    };
    let input = *input;
    let heads = head_nodes(&g, loss)?;
    let logits = heads[0];
    let lmode = if fusion == Fusion::Full { lower::Mode::Blocked } else { lower::Mode::Naive };
    let train = mode == PlanMode::Training;

    // Locations: follow slices to their root buffer, composing offsets.
    let size = plan.placement.len();
    let mut locs: Vec<Option<Loc>> = vec![None; size];
    // The arena from the memory plan (`passes::memplan`): values and gradients whose lives do
    // not overlap share memory; offsets per sample scale by the compiled batch. Gradients
    // exist only where backward writes or reads one ([`Graph::needs_grad`], the cost model's
    // rule, and the heads' logits, which the loss seeds).
    let mem = &plan.memory;
    let arena = HugeBuf::zeroed(batch * mem.arena_elems);
    for id in g.nodes() {
        let Some((r, off)) = memplan::root_offset(&plan.placement, id) else { continue };
        let rb = batch * mem.value_at[r.index()].ok_or_else(|| eerr(format!("layer `{}`: no memory planned", g.node(r).name)))?;
        let grad = mem.grad_at[r.index()].map_or(NO_GRAD, |o| batch * o);
        let (ch, hw) = chw(g.node(id).shape);
        let (total, rhw) = chw(g.node(r).shape);
        if rhw != hw {
            return Err(eerr(format!("layer `{}`: concat slice with {hw} pixels in a buffer of {rhw}", g.node(id).name)));
        }
        locs[id.index()] = Some(Loc { buf: rb, grad, off, ch, total, hw, cap: batch * total * hw });
    }
    let contiguous = |id: NodeId| locs[id.index()].is_some_and(|l| l.contiguous());

    let mut steps = Vec::with_capacity(plan.groups.len());
    let mut partial_len = 0;
    // Convolutions that compute a later batch norm's statistics as they store.
    let mut feeds_stats = vec![false; plan.groups.len()];
    for &j in plan.stats_from.iter().flatten() {
        feeds_stats[j] = true;
    }
    for (gi, gr) in plan.groups.iter().enumerate() {
        let anchor = gr.anchor();
        let node = g.node(anchor);
        let name = node.name.clone();
        let out = gr.output();
        let oloc = locs[out.index()].ok_or_else(|| eerr(format!("layer `{name}`: group output not placed")))?;
        let ops = g.operands(anchor);
        // The chain after the anchor.
        let mut chain = Vec::new();
        for w in gr.nodes.windows(2) {
            let (prev, n) = (w[0], w[1]);
            let nn = g.node(n);
            chain.push(match nn.op {
                Op::BatchNorm(bn) if !train => Chain::Fold { layer: nn.name.clone(), eps: bn.eps },
                Op::Add => Chain::Add { others: g.operands(n).into_iter().filter(|&o| o != prev).collect() },
                Op::Act(a) => Chain::Act(a),
                ref op => return Err(eerr(format!("layer `{}`: `{}` cannot follow `{}` in a fused group", nn.name, op.kind(), g.node(prev).name))),
            });
        }
        if train {
            for c in &chain {
                if let Chain::Act(a) = c {
                    let bad = match *a {
                        Activation::LeakyRelu { slope } => slope < 0.0,
                        Activation::Elu { alpha } => alpha <= 0.0,
                        _ => false,
                    };
                    if bad {
                        return Err(eerr(format!("layer `{name}`: fused `{}` with a negative slope/alpha: its gradient cannot be taken from the output", a.name())));
                    }
                }
            }
        }
        let in_chw = |i: usize| -> Result<(usize, usize, usize), EngineError> {
            ops.get(i).map(|&o| g.node(o).shape.as_chw()).ok_or_else(|| eerr(format!("layer `{name}`: missing operand {i}")))
        };
        let mut fused = 0;
        let kind = match node.op {
            Op::Conv2d(c) => {
                let mut epi = Epilogue::default();
                let (mut fold, mut residual) = (None, None);
                for (i, ch) in chain.iter().enumerate() {
                    if fused != i {
                        break;
                    }
                    match ch {
                        Chain::Fold { layer, eps } if !epi.residual && epi.act == FusedAct::None => {
                            epi.affine = true;
                            fold = Some((layer.clone(), *eps));
                            fused += 1;
                        }
                        Chain::Add { others } if others.len() == 1 && contiguous(others[0]) && epi.act == FusedAct::None => {
                            epi.residual = true;
                            residual = Some(others[0]);
                            fused += 1;
                        }
                        Chain::Act(a) => {
                            if let Some(fa) = FusedAct::from_ir(a) {
                                epi.act = fa;
                                fused += 1;
                            }
                        }
                        _ => {}
                    }
                }
                if !oloc.contiguous() {
                    epi.concat = Some(ChannelSlice { total: oloc.total, offset: oloc.off });
                }
                // Backward data stores its input gradient where that gradient's life starts
                // here (the memory plan's `overwrite_grad`: nothing zeroes it first).
                let opts = ConvOptions { overwrite_dx: plan.memory.overwrite_grad.get(gi).copied().unwrap_or(false), ..Default::default() };
                // On transposed planes (`passes::layout`: input and output both), the
                // transposed convolution with the same weights.
                let (c, in_shape) = match (plan.is_transposed(ops[0]), plan.is_transposed(out)) {
                    (false, false) => (c, in_chw(0)?),
                    (true, true) => {
                        let (ci, h, w) = in_chw(0)?;
                        (c.transposed(), (ci, w, h))
                    }
                    _ => return Err(eerr(format!("layer `{name}`: input and output planned in different plane layouts"))),
                };
                let k = ConvKernels::compile_with(&name, &c, in_shape, epi, lmode, opts).map_err(|e| eerr(e.to_string()))?;
                let wn = k.geometry().weight_numel();
                partial_len = partial_len.max(wn + c.out_channels);
                if feeds_stats[gi] && (!chain.is_empty() || !oloc.contiguous()) {
                    return Err(eerr(format!("layer `{name}`: batch-norm statistics planned after a convolution whose kernel does not store the batch norm's input")));
                }
                let stats = if feeds_stats[gi] { vec![PlaneStats::default(); batch * c.out_channels] } else { Vec::new() };
                let parts = if batch < threads { conv_parts(&name, &c, in_shape, epi, lmode, opts, threads)? } else { None };
                Kind::Conv { k: Box::new(k), x: ops[0], layer: name.clone(), bias: c.bias, residual, fold, stats, parts }
            }
            Op::Dense(d) => {
                let mut act = FusedAct::None;
                if let Some(Chain::Act(a)) = chain.first() {
                    if let Some(fa) = FusedAct::from_ir(a) {
                        act = fa;
                        fused = 1;
                    }
                }
                if !oloc.contiguous() {
                    return Err(eerr(format!("layer `{name}`: a dense layer writing into a concat slice is not supported")));
                }
                let inf = g.node(ops[0]).shape.numel();
                let k = DenseKernels::compile(&name, &d, inf, act, lmode).map_err(|e| eerr(e.to_string()))?;
                // No weight-gradient partials (a dense layer's weight gradient goes straight
                // into the parameter gradients, split by rows); a large layer's backward data,
                // split by input columns, uses them for each part's `[batch, I]` input
                // gradient (`run::dense_layer_backward`).
                if k.is_large() {
                    partial_len = partial_len.max(batch * inf);
                }
                let parts = if batch < threads && k.is_large() {
                    Parts::build(d.out_features, threads, |w| DenseKernels::compile_forward(&name, &Dense { out_features: w, ..d }, inf, act, lmode).map_err(|e| eerr(e.to_string())))?
                } else {
                    None
                };
                Kind::Dense { k, x: ops[0], layer: name.clone(), bias: d.bias, parts }
            }
            Op::BatchNorm(bn) if train => Kind::BnTrain {
                x: ops[0],
                layer: name.clone(),
                eps: bn.eps,
                momentum: bn.momentum,
                saved: BnSaved::default(),
                new_rm: Vec::new(),
                new_rv: Vec::new(),
                stats_from: plan.stats_from.get(gi).copied().flatten(),
                flip: match (plan.is_transposed(ops[0]), plan.is_transposed(out)) {
                    (a, b) if a == b => None,
                    (a, _) => {
                        let (_, h, w) = in_chw(0)?;
                        Some(if a { (w, h) } else { (h, w) })
                    }
                },
            },
            Op::BatchNorm(bn) => Kind::BnInfer { x: ops[0], layer: name.clone(), eps: bn.eps },
            Op::Pool(p) => {
                let k = PoolKernels::new(&name, &p, in_chw(0)?).map_err(|e| eerr(e.to_string()))?;
                let (c, oh, ow) = k.out_shape();
                let per_am = if p.kind == PoolKind::Max && train { c * oh * ow } else { 0 };
                Kind::Pool { k, x: ops[0], argmax: vec![0; batch * per_am], per_am, by_producers: false }
            }
            Op::GlobalAvgPool => Kind::Gap { x: ops[0] },
            Op::Act(a) => Kind::Act { x: ops[0], act: a },
            Op::Add => Kind::Add { xs: ops.clone() },
            Op::Concat if plan.inplace_concats.contains(&anchor) => Kind::Skip,
            Op::Concat => Kind::Concat { xs: ops.clone() },
            Op::Flatten => Kind::Flatten { x: ops[0] },
            Op::Dropout { p } => Kind::Dropout { x: ops[0], p, mask: Vec::new() },
            Op::Lrn(_) | Op::ChannelMul | Op::Softmax => Kind::Fallback { node: anchor },
            Op::Loss(_) => Kind::Skip,
            Op::Input => return Err(eerr(format!("layer `{name}`: an input inside the plan"))),
        };
        // Operands read by kernels must be whole buffers (the plan guarantees it: a concat
        // slice's only user is its concat).
        for o in ops.iter().chain(chain.iter().flat_map(|c| match c {
            Chain::Add { others } => others.as_slice(),
            _ => &[],
        })) {
            if !matches!(kind, Kind::Skip) && !contiguous(*o) {
                return Err(eerr(format!("layer `{name}`: operand `{}` is not a whole buffer", g.node(*o).name)));
            }
        }
        steps.push(Step { name, out, kind, chain, fused, pool: None, time: Default::default() });
    }
    // Pooling fused into the groups writing its input (`Plan::pool_into`) where every one of
    // them stores the pooled value itself, sample by sample: a convolution whose kernel runs
    // its whole chain, or a training batch norm (whose normalise pass applies its chain per
    // sample). Otherwise the pooling step pools on its own (the memory plan allows both).
    let mut pool_writers = vec![Vec::new(); steps.len()];
    for (j, p) in plan.pool_into.iter().enumerate() {
        if let Some(ws) = p.and_then(|p| pool_writers.get_mut(p)) {
            ws.push(j);
        }
    }
    for (p, ws) in pool_writers.iter().enumerate() {
        let stores = |j: usize| match steps[j].kind {
            Kind::Conv { .. } => steps[j].fused == steps[j].chain.len(),
            Kind::BnTrain { .. } => true,
            _ => false,
        };
        if ws.is_empty() || !ws.iter().all(|&j| j < p && stores(j)) {
            continue;
        }
        let Kind::Pool { by_producers, .. } = &mut steps[p].kind else {
            return Err(eerr(format!("layer `{}`: pooling planned into its producers, but it is not a pooling layer", steps[p].name)));
        };
        *by_producers = true;
        for &j in ws {
            steps[j].pool = Some(p);
        }
    }
    if !heads.iter().all(|&h| contiguous(h)) || !contiguous(input) {
        return Err(eerr("the logits and the input must be whole buffers"));
    }
    let partials = if train { vec![vec![0.0f32; partial_len]; threads] } else { Vec::new() };
    let bn_channels = steps.iter().filter(|s| matches!(s.kind, Kind::BnTrain { .. })).filter_map(|s| locs[s.out.index()].map(|l| l.ch)).max();
    let bn_terms = vec![(0.0, 0.0); batch * bn_channels.unwrap_or(0)];
    // The steps that recompute a buffer: the groups writing it (its own, or every channel
    // slice of an in-place concatenation), one step per group.
    let writers = memplan::writers(&plan.groups, &plan.placement);
    let steps_of = |r: NodeId| -> Result<&[usize], EngineError> {
        Some(writers[r.index()].as_slice()).filter(|ws| !ws.is_empty()).ok_or_else(|| eerr(format!("layer `{}`: recomputed value has no step", g.node(r).name)))
    };
    let recompute = plan.memory.recompute_before.iter().map(|rs| rs.iter().map(|&r| steps_of(r)).collect::<Result<Vec<_>, _>>().map(|v| v.concat())).collect::<Result<Vec<_>, _>>()?;
    Ok(Program { graph: g, plan, steps, locs, arena, input, logits, heads, batch, threads, compile_time: t0.elapsed(), profiling: false, partials, bn_terms, recompute })
}
