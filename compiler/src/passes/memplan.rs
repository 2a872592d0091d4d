//! Memory planning: buffer liveness over the schedule, and one arena in which buffers whose
//! lifetimes do not overlap share memory.
//!
//! A *buffer* is what a value lives in: a group output placed `Own` (or an input), together
//! with every value placed as a slice of it (in-place concatenation). Time is the position in
//! the schedule: forward group `i` runs at time `i`; in a training plan backward then runs the
//! groups in reverse, group `i`'s backward at backward time `S - 1 - i`, after the loss seeds
//! the heads' gradients at backward time `-1`.
//!
//! - **Inference values.** A value buffer is live from its first writer (inputs: from the
//!   start) to its last reader (model outputs: to the end). Buffers whose intervals are
//!   disjoint may share memory, so a chain of layers needs about two activations, not all of
//!   them.
//! - **Training values** are kept for backward until the last backward step that reads them
//!   (weight gradients read layer inputs, activation derivatives read outputs:
//!   [`backward_reads`], [`backward_reads_output`]; a value no backward step reads, such as a
//!   max pool's input, lives in forward only; the heads' values live to the end), except batch
//!   norm + activation outputs, which are cheap to recompute from the kept batch-norm input and
//!   saved statistics: such a value lives in forward until its last reader, is recomputed right
//!   before the first backward step that reads it ([`MemoryPlan::recompute_before`]) and lives
//!   until its own group's backward step; in between its memory serves other values or
//!   gradients. (Backward group `i` runs at time `2S - 1 - i`.) An in-place concatenation all
//!   of whose channel slices are such outputs (an inception module's branches ending in
//!   conv-bn-relu) is recomputed the same way, slice by slice, and lives until the backward
//!   step of the first group writing a slice. A pooling output whose input backward reads
//!   anyway is recomputed too (pooled again, after its input's own recomputation if it has
//!   one), and lives until its last backward reader.
//! - **Training gradients.** The gradient of a buffer is written by the backward steps of its
//!   consumers (`+=`) and read by the backward steps of its producers; it exists only where
//!   [`Graph::needs_grad`] says backward needs it (or it seeds a head). Its live interval runs
//!   from the first of those events to the last, at time `S + t` for backward time `t`; it is
//!   zeroed right before the step that starts its life
//!   ([`MemoryPlan::zero_before`], [`MemoryPlan::zero_at_seed`]), not all at once, except where
//!   a batch norm's, a pooling layer's, a global average pool's or a convolution's backward
//!   data starts its input's gradient: it writes it whole with `=`
//!   ([`MemoryPlan::overwrite_grad`]).
//! - **One arena.** Values and gradients are placed in one arena: gradients peak late in
//!   backward, where most kept values have had their last reader, so they reuse that memory.
//!
//! Offsets are assigned greedily, largest interval first, into the smallest gap that fits (see
//! `assign`). Intervals are inclusive, so a step's operands and results never overlap:
//! nothing is read and written in place.

use crate::ir::{Graph, NodeId, Op};
use crate::plan::{Group, Mode, Placement};

/// Where every buffer of a plan lives (see the module header).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryPlan {
    /// Offset of each buffer's value in the arena, in elements per sample (a buffer at
    /// offset `o` of `e` elements per sample occupies `[B·o, B·(o + e))` of an arena allocated
    /// for batch `B`), indexed by its root node's [`NodeId::index`] (`None` for nodes that own
    /// no buffer).
    pub value_at: Vec<Option<usize>>,
    /// Offset of each buffer's gradient in the same arena (training plans; `None`: backward
    /// needs no gradient there).
    pub grad_at: Vec<Option<usize>>,
    /// Arena size in elements per sample: values and gradients together.
    pub arena_elems: usize,
    /// Buffers (root nodes) whose gradient starts to live right before group `i`'s backward
    /// step, indexed by group: zeroed there.
    pub zero_before: Vec<Vec<NodeId>>,
    /// Buffers whose gradient is zeroed before the loss seeds the heads' gradients.
    pub zero_at_seed: Vec<NodeId>,
    /// Training, indexed by group: the group is a batch norm, a convolution or a pooling layer
    /// whose backward step starts its input's gradient (nothing wrote it before in its current
    /// life, and no other op of the group writes it), so it writes that gradient whole with `=`
    /// and it is not zeroed first.
    pub overwrite_grad: Vec<bool>,
    /// Training: values (their buffers' root nodes) to recompute right before group `i`'s
    /// backward step, indexed by group: batch norm + activation outputs, in-place
    /// concatenations of them (recomputed by every group writing a slice, see [`writers`]) and
    /// pooling outputs, whose memory other values or gradients used in between (see the module
    /// header), each after the buffers its recomputation reads.
    pub recompute_before: Vec<Vec<NodeId>>,
    /// Elements per sample if every buffer had its own memory (values, then gradients).
    pub unshared_elems: (usize, usize),
}

/// Buffers start at multiples of this many elements per sample (64 bytes: SIMD rows and
/// cache lines never straddle two buffers).
pub const ALIGN: usize = 16;

/// Elements per sample a buffer of `elems` takes in the arena (rounded up to [`ALIGN`]).
pub fn aligned(elems: usize) -> usize {
    elems.div_ceil(ALIGN) * ALIGN
}

/// The buffer (root node) holding `id`'s value: follows concat slices outwards.
pub fn root(placement: &[Option<Placement>], id: NodeId) -> Option<NodeId> {
    root_offset(placement, id).map(|(r, _)| r)
}

/// [`root`], with the channel offset of `id`'s value in that buffer (offsets of nested
/// concatenations composed).
pub fn root_offset(placement: &[Option<Placement>], id: NodeId) -> Option<(NodeId, usize)> {
    match placement.get(id.index()).copied().flatten()? {
        Placement::Own => Some((id, 0)),
        Placement::Slice { concat, offset } => root_offset(placement, concat).map(|(r, o)| (r, o + offset)),
    }
}

/// Operands a group's kernels read: the anchor's (none for an in-place concat, whose
/// operands are its own slices) and each chain node's other operands (residual adds).
fn reads(g: &Graph, gr: &Group, inplace: &[NodeId]) -> Vec<NodeId> {
    let anchor = gr.anchor();
    let mut r = if inplace.contains(&anchor) { Vec::new() } else { g.operands(anchor) };
    for w in gr.nodes.windows(2) {
        r.extend(g.operands(w[1]).into_iter().filter(|&o| o != w[0]));
    }
    r
}

/// Operands whose values a group's backward step reads (the engine's backward, `exec/run.rs`):
/// a convolution's or dense layer's input (weight gradient; none for a frozen layer, which
/// computes only its input gradient), a batch norm's input, an
/// activation's or fallback op's operands. Pooling (max: the recorded winners; average: the
/// window sizes), global pooling, additions, concatenations, flatten and dropout (its mask)
/// read no values; neither does a fused residual addition.
pub fn backward_reads(g: &Graph, gr: &Group, inplace: &[NodeId]) -> Vec<NodeId> {
    let anchor = gr.anchor();
    let reads_none = matches!(g.node(anchor).op, Op::Pool(_) | Op::GlobalAvgPool | Op::Add | Op::Concat | Op::Flatten | Op::Dropout { .. } | Op::Loss(_));
    // A frozen convolution or dense layer runs no weight gradient, the one reader of its input.
    let frozen_gemm = matches!(g.node(anchor).op, Op::Conv2d(_) | Op::Dense(_)) && !g.node(anchor).trainable;
    if reads_none || frozen_gemm || inplace.contains(&anchor) {
        Vec::new()
    } else {
        g.operands(anchor)
    }
}

/// Whether a group's backward step reads its own output: an activation's derivative taken
/// from the output (a fused or standalone activation, a fallback op), except a ReLU right
/// after a batch norm, whose mask the batch norm's backward takes from its input.
pub fn backward_reads_output(g: &Graph, gr: &Group) -> bool {
    let op = |n: NodeId| g.node(n).op;
    let chain_acts = gr.nodes[1..].iter().any(|&n| matches!(op(n), Op::Act(_)));
    let bn_relu = matches!(op(gr.anchor()), Op::BatchNorm(_)) && gr.nodes.len() == 2 && matches!(op(gr.nodes[1]), Op::Act(crate::ir::Activation::Relu));
    let anchor_reads = matches!(op(gr.anchor()), Op::Act(_) | Op::Lrn(_) | Op::ChannelMul | Op::Softmax);
    anchor_reads || (chain_acts && !bn_relu)
}

/// The logits of every model output, main output first (a loss node's operand where an
/// output is one): what the loss seeds.
pub fn heads(g: &Graph) -> Vec<NodeId> {
    g.outputs().into_iter().map(|o| if matches!(g.node(o).op, Op::Loss(_)) { g.operands(o)[0] } else { o }).collect()
}

/// The live time of buffer `root` needing `elems` per sample: inclusive `[start, end]`
/// pieces in increasing order (two for a value recomputed in backward, else one).
#[derive(Clone, Debug)]
struct Interval {
    root: NodeId,
    pieces: Vec<(i64, i64)>,
    elems: usize,
}

impl Interval {
    fn one(root: NodeId, start: i64, end: i64, elems: usize) -> Interval {
        Interval { root, pieces: vec![(start, end)], elems }
    }
    fn start(&self) -> i64 {
        self.pieces[0].0
    }
}

/// Greedy placement by size (TFLite's "greedy by size" for offsets): returns the arena
/// offset of each interval (same order) and the arena size, in elements per sample. Intervals
/// go largest first (ties: earliest start); each takes the smallest gap between the intervals
/// already placed that overlap it in time where it fits, else the end of the highest of them.
/// Two intervals overlapping in time never overlap in the arena. On the CIFAR inception net's
/// training plan at batch 32 this needs 102.9 MiB, where the largest live set is 100.4 MiB and
/// slots of their own for intervals disjoint in time (largest first, smallest free slot)
/// needed 121.9 MiB.
fn assign(intervals: &[Interval]) -> (Vec<usize>, usize) {
    let mut order: Vec<usize> = (0..intervals.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(intervals[i].elems), intervals[i].start(), intervals[i].root.index()));
    let overlap = |a: &[(i64, i64)], b: &[(i64, i64)]| a.iter().any(|x| b.iter().any(|y| x.0 <= y.1 && y.0 <= x.1));
    let mut off = vec![0; intervals.len()];
    let mut placed: Vec<usize> = Vec::new();
    let mut total = 0;
    for i in order {
        let size = aligned(intervals[i].elems);
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|&&j| overlap(&intervals[j].pieces, &intervals[i].pieces))
            .map(|&j| (off[j], off[j] + aligned(intervals[j].elems)))
            .collect();
        busy.sort_unstable();
        // The smallest gap that fits (gap size, start), scanning up the arena.
        let (mut end, mut best): (usize, Option<(usize, usize)>) = (0, None);
        for &(o, e) in &busy {
            if o >= end + size && best.is_none_or(|(gap, _)| o - end < gap) {
                best = Some((o - end, end));
            }
            end = end.max(e);
        }
        off[i] = best.map_or(end, |(_, at)| at);
        total = total.max(off[i] + size);
        placed.push(i);
    }
    (off, total)
}

/// Buffers (root nodes) a training backward pass can recompute instead of keeping, by
/// running again the groups that write them (`writers`, from [`writers`]). A group is
/// recomputable when it is
/// - a batch norm followed only by activations (`y = act(a*x + b)` from the kept input `x`,
///   the saved batch statistics and the unchanged `gamma`, `beta`: elementwise,
///   bit-identical) whose input is not itself recomputed and is read in backward anyway (by
///   the batch norm's own backward; where that does not run, below the lowest trainable
///   layer, keeping `y` costs what keeping `x` would);
/// - a pooling layer alone (a deterministic function of its input) whose input some backward
///   step reads anyway (`read_in_backward`: kept or recomputed), so recomputing never makes a
///   buffer live in backward that was not (the input is then kept, or recomputed, up to the
///   pooling's recomputation): a pool whose input only the pool reads is not recomputed.
///
/// A buffer is recomputable when it is no model output and every group writing it is: a
/// buffer of its own, or an in-place concatenation whose every channel slice is such a
/// group's output (an inception module's branches ending in conv-bn-relu).
fn recomputable(g: &Graph, groups: &[Group], placement: &[Option<Placement>], outputs: &[NodeId], writers: &[Vec<usize>], read_in_backward: &[bool]) -> Vec<bool> {
    let mut r = vec![false; placement.len()];
    let mut group_ok = vec![false; groups.len()];
    for (i, gr) in groups.iter().enumerate() {
        let input = |pred: &dyn Fn(NodeId) -> bool| g.operands(gr.anchor()).iter().all(|o| root(placement, *o).is_some_and(pred));
        group_ok[i] = match g.node(gr.anchor()).op {
            Op::BatchNorm(_) => gr.nodes[1..].iter().all(|&n| matches!(g.node(n).op, Op::Act(_))) && input(&|ro| !r[ro.index()] && read_in_backward[ro.index()]),
            Op::Pool(_) => gr.nodes.len() == 1 && input(&|ro| read_in_backward[ro.index()]),
            _ => false,
        };
        // A buffer is decided once its last writer has run (a concatenation's slices all
        // come before the concatenation's own group, which writes nothing).
        if let Some(ro) = root(placement, gr.output()) {
            let ws = &writers[ro.index()];
            if ws.last().is_some_and(|&w| w <= i) {
                r[ro.index()] = !outputs.contains(&ro) && ws.iter().all(|&w| group_ok[w]);
            }
        }
    }
    r
}

/// For each buffer (indexed by its root node), the groups that write its elements in
/// increasing order: the group whose output it is, or, for an in-place concatenation, the
/// groups writing its channel slices (nested concatenations followed through); a
/// concatenation's own group writes nothing. A recomputation of the buffer runs these groups
/// again.
pub fn writers(groups: &[Group], placement: &[Option<Placement>]) -> Vec<Vec<usize>> {
    let mut is_concat = vec![false; placement.len()];
    for p in placement.iter().flatten() {
        if let Placement::Slice { concat, .. } = p {
            is_concat[concat.index()] = true;
        }
    }
    let mut w = vec![Vec::new(); placement.len()];
    for (i, gr) in groups.iter().enumerate() {
        let out = gr.output();
        if let Some(r) = root(placement, out).filter(|_| !is_concat[out.index()]) {
            w[r.index()].push(i);
        }
    }
    w
}

/// Plan the memory of a schedule.
///
/// Does: computes every buffer's live interval (values; in training plans also gradients, on
/// one timeline) and places them in one arena, disjoint intervals sharing memory, with the
/// zeroing schedule of gradient lives and the recomputations of values (batch norm +
/// activation and pooling outputs). Does not: move values between buffers, or change the
/// schedule.
/// Before: `groups` in execution order, `placement` from `passes::concat_inplace` and
/// `pool_into` from `passes::pool_fuse` (a pooling output lives from the step of the first
/// group that pools into it). After: every buffer (root) has a value offset; every buffer backward reads or writes (in
/// training) has a gradient offset; two lives (values or gradients) that overlap in time
/// (inclusive: a step's operands and results) never overlap in the arena.
pub fn memplan(g: &Graph, mode: Mode, groups: &[Group], placement: &[Option<Placement>], inplace: &[NodeId], pool_into: &[Option<usize>]) -> MemoryPlan {
    let size = placement.len();
    let steps = groups.len() as i64;
    let roots: Vec<NodeId> = g.nodes().filter(|&id| matches!(placement.get(id.index()).copied().flatten(), Some(Placement::Own))).collect();
    let elems = |r: NodeId| g.node(r).shape.numel();
    let root_of = |id: NodeId| root(placement, id);
    let mut plan = MemoryPlan {
        value_at: vec![None; size],
        grad_at: vec![None; size],
        zero_before: vec![Vec::new(); groups.len()],
        unshared_elems: (roots.iter().map(|&r| elems(r)).sum(), 0),
        ..MemoryPlan::default()
    };
    let head_roots: Vec<NodeId> = heads(g).into_iter().chain(g.outputs()).filter_map(root_of).collect();

    // Values.
    let mut span: Vec<Option<(i64, i64)>> = vec![None; size];
    let mut touch = |r: Option<NodeId>, t: i64| {
        if let Some(r) = r {
            let s = &mut span[r.index()];
            *s = Some(s.map_or((t, t), |(a, b)| (a.min(t), b.max(t))));
        }
    };
    for id in g.inputs() {
        touch(root_of(id), -1);
    }
    for (i, gr) in groups.iter().enumerate() {
        touch(root_of(gr.output()), i as i64);
        for o in reads(g, gr, inplace) {
            touch(root_of(o), i as i64);
        }
        // A group pooling its output as it stores it (`passes::pool_fuse`) writes the
        // pooling's output too.
        if let Some(p) = pool_into.get(i).copied().flatten() {
            touch(root_of(groups[p].output()), i as i64);
        }
    }
    for &r in &head_roots {
        touch(Some(r), steps);
    }
    // Training: backward of group `i` runs at time `2S - 1 - i`. A value some backward step
    // that runs reads ([`backward_reads`], [`backward_reads_output`]) is kept until the last
    // of them unless its group is recomputable: then it lives in forward until its last
    // reader, and again from the first backward step that reads it (recomputed just before
    // it) to its own group's backward step. A value no backward step reads lives in forward
    // only; the heads' values live to the end.
    let writers = writers(groups, placement);
    let ng = g.needs_grad();
    let mut back_readers: Vec<Vec<usize>> = vec![Vec::new(); size];
    for (i, gr) in groups.iter().enumerate() {
        if !ng[gr.output().index()] {
            continue; // no backward step runs for this group (at or below the lowest trainable layer)
        }
        let own = backward_reads_output(g, gr).then(|| gr.output());
        for o in backward_reads(g, gr, inplace).into_iter().chain(own) {
            if let Some(r) = root_of(o) {
                back_readers[r.index()].push(i);
            }
        }
    }
    let read_in_backward: Vec<bool> = back_readers.iter().map(|b| !b.is_empty()).collect();
    let recomp = if mode == Mode::Training { recomputable(g, groups, placement, &head_roots, &writers, &read_in_backward) } else { vec![false; size] };
    // A recomputation reads its groups' inputs right before the first backward step reading
    // the recomputed buffer: a backward read of those inputs too (later buffers first, so a
    // pool of a recomputed buffer extends that one's reads in turn).
    for &r in roots.iter().rev().filter(|r| recomp[r.index()]) {
        let Some(&first) = back_readers[r.index()].iter().max() else { continue };
        for &w in &writers[r.index()] {
            for x in g.operands(groups[w].anchor()).into_iter().filter_map(root_of) {
                back_readers[x.index()].push(first);
            }
        }
    }
    plan.recompute_before = vec![Vec::new(); groups.len()];
    let back = |i: usize| 2 * steps - 1 - i as i64;
    let mut intervals: Vec<Interval> = roots
        .iter()
        .map(|&r| {
            let (start, end) = span[r.index()].unwrap_or((-1, steps));
            let backward = &back_readers[r.index()];
            match mode {
                Mode::Inference => Interval::one(r, start, end, elems(r)),
                Mode::Training if head_roots.contains(&r) => Interval::one(r, start, 2 * steps, elems(r)),
                Mode::Training if backward.is_empty() => Interval::one(r, start, end, elems(r)),
                Mode::Training => {
                    let (first, last) = (*backward.iter().max().expect("backward readers"), *backward.iter().min().expect("backward readers"));
                    // The first group (in forward order) writing a recomputed buffer: a batch
                    // norm + activation group's backward may read its output, so it lives until
                    // then; a recomputed pooling output until its last backward reader.
                    match writers[r.index()].first().copied().filter(|_| recomp[r.index()]) {
                        Some(own) => {
                            plan.recompute_before[first].push(r);
                            let until = if matches!(g.node(groups[own].anchor()).op, Op::Pool(_)) { last } else { own };
                            Interval { root: r, pieces: vec![(start, end), (back(first), back(until))], elems: elems(r) }
                        }
                        // Kept from its writer to its last backward reader.
                        None => Interval::one(r, start, back(last), elems(r)),
                    }
                }
            }
        })
        .collect();
    // Recompute a pooling layer's input before the pooling.
    for rs in &mut plan.recompute_before {
        rs.sort_by_key(|r| writers[r.index()].first().copied());
    }
    let values = intervals.len();
    if mode == Mode::Training {
        let gintervals = gradient_intervals(g, groups, inplace, &roots, &head_roots, &ng, root_of);
        plan.unshared_elems.1 = gintervals.iter().map(|iv| iv.elems).sum();
        intervals.extend(gintervals);
        plan.overwrite_grad = vec![false; groups.len()];
    }
    let (at, total) = assign(&intervals);
    for (iv, &o) in intervals[..values].iter().zip(&at) {
        plan.value_at[iv.root.index()] = Some(o);
    }
    for (iv, &o) in intervals[values..].iter().zip(&at[values..]) {
        plan.grad_at[iv.root.index()] = Some(o);
        let t = iv.start() - steps; // backward time
        if t < 0 {
            plan.zero_at_seed.push(iv.root);
        } else {
            let i = (steps - 1 - t) as usize;
            // A step that writes its whole input gradient (`overwrites_input`) overwrites it
            // where that starts the gradient's life, instead of it being zeroed first.
            if overwrites_input(g, &groups[i], iv.root, &root_of) {
                plan.overwrite_grad[i] = true;
            } else {
                plan.zero_before[i].push(iv.root);
            }
        }
    }
    plan.arena_elems = total;
    plan
}

/// Whether group `gr`'s backward may write its anchor's input gradient (buffer `r`) whole with
/// `=` where that gradient's life starts there: the anchor is a batch norm, a convolution
/// (whose backward data computes every input-gradient element once; a kernel that can only
/// accumulate zeroes each sample's share first, `ConvOptions::overwrite_dx`), a pooling layer
/// (whose overwriting backward writes every cell of a sample, zeroing it in cache where windows
/// overlap) or a global average pool (every cell gets its plane's share), its input is the whole
/// buffer `r`, and no other op of the group hands a gradient to `r` (a residual add of the
/// same value runs its backward first, and an overwrite would erase it).
fn overwrites_input(g: &Graph, gr: &Group, r: NodeId, root_of: &impl Fn(NodeId) -> Option<NodeId>) -> bool {
    let a = gr.anchor();
    let Some(&x) = g.operands(a).first() else { return false };
    let chain_writes_r = gr.nodes.windows(2).any(|w| g.operands(w[1]).iter().any(|&o| o != w[0] && root_of(o) == Some(r)));
    matches!(g.node(a).op, Op::BatchNorm(_) | Op::Conv2d(_) | Op::Pool(_) | Op::GlobalAvgPool) && x == r && !chain_writes_r
}

/// The gradients' live intervals (training), on the values' timeline: a gradient at backward
/// time `t` lives at time `S + t` (group `i`'s backward step: `2S - 1 - i`; the seed: `S - 1`,
/// just after forward). A buffer's gradient exists where [`Graph::needs_grad`] says backward
/// needs it (or it seeds a head) and lives from its first writer to its last reader.
fn gradient_intervals(g: &Graph, groups: &[Group], inplace: &[NodeId], roots: &[NodeId], head_roots: &[NodeId], ng: &[bool], root_of: impl Fn(NodeId) -> Option<NodeId>) -> Vec<Interval> {
    let (size, steps) = (ng.len(), groups.len() as i64);
    let mut needs = vec![false; size];
    for id in g.nodes().filter(|id| ng[id.index()]) {
        if let Some(r) = root_of(id) {
            needs[r.index()] = true;
        }
    }
    for &r in head_roots {
        needs[r.index()] = true;
    }
    let mut gspan: Vec<Option<(i64, i64)>> = vec![None; size];
    let mut gtouch = |r: Option<NodeId>, t: i64| {
        if let Some(r) = r {
            let s = &mut gspan[r.index()];
            *s = Some(s.map_or((t, t), |(a, b)| (a.min(t), b.max(t))));
        }
    };
    for &r in head_roots {
        gtouch(Some(r), -1);
    }
    for (i, gr) in groups.iter().enumerate() {
        if !ng[gr.output().index()] {
            continue; // no backward step runs for this group
        }
        let t = steps - 1 - i as i64;
        gtouch(root_of(gr.output()), t);
        for o in reads(g, gr, inplace).into_iter().filter(|o| ng[o.index()]) {
            gtouch(root_of(o), t);
        }
    }
    roots
        .iter()
        .filter(|r| needs[r.index()])
        .map(|&r| {
            let (start, end) = gspan[r.index()].unwrap_or((-1, -1));
            Interval::one(r, steps + start, steps + end, g.node(r).shape.numel())
        })
        .collect()
}
