//! The memory plan (`passes::memplan`) checked by simulating the schedule, independently of
//! the pass's interval arithmetic: every access to a buffer (value or gradient) must find its
//! arena range still holding that buffer, memory changes hands only where the plan says to
//! zero a gradient or by a write (values), and a buffer never returns to memory it lost. Run on the
//! zoo's shapes of graph: chains, residual blocks, in-place inception concatenations, DenseNet
//! nesting, GoogLeNet's auxiliary heads, frozen prefixes; training values recomputed in
//! backward included. Also: sharing actually happens.

use cnnc_compiler::ir::{Activation, Graph, NodeId, Op};
use cnnc_compiler::lang::{self, Value};
use cnnc_compiler::passes::memplan::{self, root};
use cnnc_compiler::pipeline;
use cnnc_compiler::plan::{Fusion, Group, Mode, Plan};
use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;

fn model(file: &str, name: &str, overrides: &[(&str, Value)]) -> Graph {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(file);
    lang::load_file(&path).unwrap().expand_with(name, overrides).unwrap()
}

fn zoo() -> Vec<Graph> {
    vec![
        model("examples/models/lenet5.cnn", "LeNet5", &[]),
        model("examples/models/mnist_vgg.cnn", "MnistVgg", &[]),
        model("examples/models/resnet.cnn", "ResNet50", &[]),
        model("examples/models/googlenet.cnn", "GoogLeNet", &[("aux", Value::Bool(true))]),
        model("examples/models/densenet.cnn", "DenseNet121", &[]),
        model("tests/models/mini_inception.cnn", "MiniInception", &[]),
        model("examples/models/senet.cnn", "SEResNet50", &[]),
    ]
}

/// Operands a group reads (the anchor's, unless it is an in-place concat, and residual adds).
fn reads(g: &Graph, gr: &Group, inplace: &[NodeId]) -> Vec<NodeId> {
    let a = gr.anchor();
    let mut r = if inplace.contains(&a) { vec![] } else { g.operands(a) };
    for w in gr.nodes.windows(2) {
        r.extend(g.operands(w[1]).into_iter().filter(|&o| o != w[0]));
    }
    r
}

fn heads(g: &Graph) -> Vec<NodeId> {
    g.outputs().into_iter().map(|o| if matches!(g.node(o).op, Op::Loss(_)) { g.operands(o)[0] } else { o }).collect()
}

/// What arena memory holds: a buffer's value or its gradient (values and gradients share it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Held {
    Value(NodeId),
    Grad(NodeId),
}

/// Arena ownership, by ranges (elements per sample): `access` with `may_claim` hands a range
/// to a buffer's value or gradient (whatever held any part of it is dead from then on),
/// without it requires the range to hold it still; `reclaim` is a recomputation.
#[derive(Default)]
struct Owners {
    held: Vec<(Range<usize>, Held)>,
    lost: HashSet<Held>,
}

impl Owners {
    fn take(&mut self, r: &Range<usize>, h: Held) {
        let (gone, kept): (Vec<_>, Vec<_>) = self.held.drain(..).partition(|(q, _)| q.start < r.end && r.start < q.end);
        self.held = kept;
        self.lost.extend(gone.into_iter().map(|(_, o)| o).filter(|&o| o != h));
        self.held.push((r.clone(), h));
    }

    /// A recomputation writes the value back, whoever held its memory meanwhile.
    fn reclaim(&mut self, r: Range<usize>, h: Held) {
        self.take(&r, h);
        self.lost.remove(&h);
    }

    fn access(&mut self, r: Range<usize>, h: Held, may_claim: bool, what: &str) {
        if self.held.iter().any(|(q, o)| *q == r && *o == h) {
            return;
        }
        let holders: Vec<Held> = self.held.iter().filter(|(q, _)| q.start < r.end && r.start < q.end).map(|(_, o)| *o).collect();
        assert!(may_claim, "{what}: {h:?} accessed at {r:?}, held by {holders:?}");
        assert!(!self.lost.contains(&h), "{what}: {h:?} comes back to {r:?} after losing its memory");
        self.take(&r, h);
    }
}

/// The buffers one step touches at once do not overlap in the arena.
fn distinct(accesses: impl Iterator<Item = (Range<usize>, Held)>, what: &str) {
    let mut seen: Vec<(Range<usize>, Held)> = Vec::new();
    for (r, h) in accesses {
        for (q, o) in &seen {
            assert!(*o == h || q.end <= r.start || r.end <= q.start, "{what}: {o:?} at {q:?} and {h:?} at {r:?} overlap in one step");
        }
        seen.push((r, h));
    }
}

/// Simulate the schedule: forward, then (training) the loss seed and backward, values and
/// gradients in one arena.
fn simulate(p: &Plan) {
    let g = &p.graph;
    let m = &p.memory;
    let rt = |id: NodeId| root(&p.placement, id).unwrap();
    let len = |r: NodeId| g.node(r).shape.numel();
    let vrange = |id: NodeId| {
        let o = m.value_at[rt(id).index()].expect("every buffer has a value offset");
        o..o + len(rt(id))
    };
    let val = |id: NodeId| (vrange(id), Held::Value(rt(id)));
    let mut own = Owners::default();
    for i in g.inputs() {
        let (s, h) = val(i);
        own.access(s, h, true, "input");
    }
    for (i, gr) in p.groups.iter().enumerate() {
        let what = format!("{} {:?} group {i} ({})", g.name, p.mode, g.node(gr.anchor()).name);
        let rs = reads(g, gr, &p.inplace_concats);
        for &o in &rs {
            let (s, h) = val(o);
            own.access(s, h, false, &what);
        }
        // A group pooling into a later pooling group (`Plan::pool_into`) writes that group's
        // output too, at this step.
        let pooled = p.pool_into[i].map(|q| p.groups[q].output());
        // A kernel reads its operands while it writes its result: never overlapping memory.
        distinct(rs.iter().map(|&o| val(o)).chain([val(gr.output())]).chain(pooled.map(val)), &what);
        // A pooling group whose producers pooled for it finds its output where they put it.
        let by_producers = p.pool_into.contains(&Some(i));
        let (s, h) = val(gr.output());
        own.access(s, h, !by_producers, &what);
        if let Some(q) = pooled {
            let (s, h) = val(q);
            own.access(s, h, true, &what);
        }
    }
    let outputs: Vec<NodeId> = heads(g).into_iter().chain(g.outputs()).collect();
    for &h in &outputs {
        let (s, v) = val(h);
        own.access(s, v, false, &format!("{} output", g.name));
    }
    if p.mode == Mode::Inference {
        assert!(m.recompute_before.iter().all(Vec::is_empty), "inference recomputes nothing");
        return;
    }
    // The seed: the heads' gradients start (zeroed) while their values are read.
    let ng = g.needs_grad();
    let grad = |id: NodeId| {
        let o = m.grad_at[rt(id).index()].expect("a gradient offset");
        (o..o + len(rt(id)), Held::Grad(rt(id)))
    };
    let fresh: HashSet<NodeId> = m.zero_at_seed.iter().copied().collect();
    for h in heads(g) {
        let (s, d) = grad(h);
        own.access(s, d, fresh.contains(&rt(h)), "seed");
    }
    for &h in &outputs {
        let (s, v) = val(h);
        own.access(s, v, false, &format!("{} output at the seed", g.name));
    }
    distinct(heads(g).into_iter().flat_map(|h| [val(h), grad(h)]), "seed");
    // Backward reads what the engine's backward steps read (restated here from
    // `runtime/src/exec/run.rs`, not taken from the pass): after the planned recomputations
    // (which reclaim memory) and the gradient lives starting there (zeroed, or overwritten by
    // a batch norm), every value read and gradient touched must still hold its memory.
    for (i, gr) in p.groups.iter().enumerate().rev() {
        let what = format!("{} backward group {i} ({})", g.name, g.node(gr.anchor()).name);
        for &r in &m.recompute_before[i] {
            // Every group writing the buffer (its own, or each slice of a concatenation) is a
            // batch norm (+ activations) or a pooling layer alone, and the concatenation has no
            // writer of another kind; each reads its input again, which must be there still
            // (or recomputed before it).
            let writers: Vec<&Group> = p.groups.iter().filter(|w| root(&p.placement, w.output()) == Some(r) && !p.inplace_concats.contains(&w.output())).collect();
            assert!(!writers.is_empty(), "{what}: recomputes {r}, which no group writes");
            for w in writers {
                let ok = match g.node(w.anchor()).op {
                    Op::BatchNorm(_) => w.nodes[1..].iter().all(|&c| matches!(g.node(c).op, Op::Act(_))),
                    Op::Pool(_) => w.nodes.len() == 1,
                    _ => false,
                };
                assert!(ok, "{what}: recomputes {r}, written by `{}`", g.node(w.anchor()).name);
                for x in g.operands(w.anchor()) {
                    let (s, v) = val(x);
                    own.access(s, v, false, &format!("{what}: recomputing {r}"));
                }
            }
            own.reclaim(vrange(r), Held::Value(r));
        }
        let fresh: HashSet<NodeId> = m.zero_before[i].iter().copied().collect();
        if !ng[gr.output().index()] {
            assert!(fresh.is_empty(), "zeroing planned before a backward step that does not run");
            continue;
        }
        // Gradients first (their lives start before the step), then the values the step reads.
        let overwrites = m.overwrite_grad[i];
        // Only a batch norm, a convolution, a pooling layer or a global average pool overwrites,
        // and only its input gradient, which
        // no other op of the group writes (restated from the engine's backward steps).
        let x0 = g.operands(gr.anchor()).first().copied();
        let chain_writes_x = gr.nodes.windows(2).any(|w| g.operands(w[1]).iter().any(|&o| o != w[0] && x0.is_some_and(|x| rt(o) == rt(x))));
        assert!(!overwrites || matches!(g.node(gr.anchor()).op, Op::BatchNorm(_) | Op::Conv2d(_) | Op::Pool(_) | Op::GlobalAvgPool) && !chain_writes_x, "{what}: overwrites");
        let (s, d) = grad(gr.output());
        own.access(s, d, fresh.contains(&rt(gr.output())), &what);
        let operands: Vec<NodeId> = reads(g, gr, &p.inplace_concats).into_iter().filter(|o| ng[o.index()]).collect();
        for &o in &operands {
            let (s, d) = grad(o);
            let claims = fresh.contains(&rt(o)) || overwrites && o == g.operands(gr.anchor())[0];
            own.access(s, d, claims, &what);
        }
        let values = engine_backward_reads(g, gr, &p.inplace_concats);
        for &o in &values {
            let (s, v) = val(o);
            own.access(s, v, false, &what);
        }
        distinct(operands.iter().chain([&gr.output()]).map(|&o| grad(o)).chain(values.iter().map(|&o| val(o))), &what);
    }
}

/// The values a group's backward step reads in the engine: the anchor's operands for a
/// convolution, dense layer, batch norm, activation or fallback op (pooling reads its argmax,
/// global pooling / add / concat / flatten / dropout nothing); its own output where an
/// activation's derivative comes from it (any chain activation, except the ReLU right after a
/// batch norm, whose mask comes from the batch norm's input; a standalone activation or
/// fallback op).
fn engine_backward_reads(g: &Graph, gr: &Group, inplace: &[NodeId]) -> Vec<NodeId> {
    let anchor = g.node(gr.anchor()).op;
    let mut r = match anchor {
        // A frozen convolution or dense layer runs no weight gradient: it reads no input.
        Op::Conv2d(_) | Op::Dense(_) if !g.node(gr.anchor()).trainable => Vec::new(),
        Op::Conv2d(_) | Op::Dense(_) | Op::BatchNorm(_) | Op::Act(_) | Op::Lrn(_) | Op::ChannelMul | Op::Softmax => g.operands(gr.anchor()),
        _ => Vec::new(),
    };
    if inplace.contains(&gr.anchor()) {
        r.clear();
    }
    let acts: Vec<NodeId> = gr.nodes[1..].iter().copied().filter(|&n| matches!(g.node(n).op, Op::Act(_))).collect();
    let bn_relu_only = matches!(anchor, Op::BatchNorm(_)) && gr.nodes.len() == 2 && matches!(g.node(gr.nodes[1]).op, Op::Act(Activation::Relu));
    if matches!(anchor, Op::Act(_) | Op::Lrn(_) | Op::ChannelMul | Op::Softmax) || (!acts.is_empty() && !bn_relu_only) {
        r.push(gr.output());
    }
    r
}

#[test]
fn shared_memory_never_holds_two_live_buffers() {
    for mut g in zoo() {
        for mode in [Mode::Inference, Mode::Training] {
            simulate(&pipeline::plan(&g, mode, Fusion::Full).unwrap());
        }
        // A frozen prefix: gradients stop at the lowest trainable layer.
        let ids: Vec<NodeId> = g.nodes().collect();
        for &id in &ids[..ids.len() / 2] {
            g.node_mut(id).trainable = false;
        }
        simulate(&pipeline::plan(&g, Mode::Training, Fusion::Full).unwrap());
        simulate(&pipeline::plan(&g, Mode::Training, Fusion::None).unwrap());
        // Frozen layers above trainable ones: their backward computes only input gradients
        // (no weight gradient reads their inputs, which are not kept).
        let mut g = g.clone();
        let gemms: Vec<NodeId> = ids.iter().copied().filter(|&id| matches!(g.node(id).op, Op::Conv2d(_) | Op::Dense(_))).collect();
        for &id in &ids {
            g.node_mut(id).trainable = true;
        }
        for &id in gemms.iter().skip(1).step_by(2) {
            g.node_mut(id).trainable = false;
        }
        simulate(&pipeline::plan(&g, Mode::Training, Fusion::Full).unwrap());
        simulate(&pipeline::plan(&g, Mode::Training, Fusion::None).unwrap());
    }
}

/// A frozen convolution above trainable layers keeps no input for backward: in MNIST VGG and
/// ResNet-50 the batch-norm + relu outputs that only frozen convolutions read are no longer
/// recomputed in backward (they were, for a weight gradient that never runs).
#[test]
fn frozen_layers_keep_no_inputs() {
    for (file, name) in [("examples/models/mnist_vgg.cnn", "MnistVgg"), ("examples/models/resnet.cnn", "ResNet50")] {
        let g = model(file, name, &[]);
        let recomputed = |g: &Graph| -> HashSet<NodeId> { pipeline::plan(g, Mode::Training, Fusion::Full).unwrap().memory.recompute_before.into_iter().flatten().collect() };
        let before = recomputed(&g);
        let mut f = g.clone();
        let convs: Vec<NodeId> = f.nodes().filter(|&id| matches!(f.node(id).op, Op::Conv2d(_))).collect();
        let frozen: Vec<NodeId> = convs.iter().copied().skip(1).step_by(2).collect();
        for &id in &frozen {
            f.node_mut(id).trainable = false;
        }
        let after = recomputed(&f);
        // Inputs read by frozen convolutions only.
        let only_frozen: Vec<NodeId> = frozen.iter().map(|&c| f.operands(c)[0]).filter(|&x| f.users(x).iter().all(|u| frozen.contains(u))).collect();
        assert!(only_frozen.iter().any(|x| before.contains(x)), "{name}: no frozen input was recomputed before freezing");
        for x in &only_frozen {
            assert!(!after.contains(x), "{name}: `{}`, read only by frozen convolutions, is still recomputed", f.node(*x).name);
        }
        assert!(after.len() < before.len(), "{name}: recomputations {} -> {}", before.len(), after.len());
    }
}

#[test]
fn chains_share_memory() {
    for g in zoo() {
        let inf = pipeline::plan(&g, Mode::Inference, Fusion::Full).unwrap();
        let m = &inf.memory;
        assert!(m.arena_elems < m.unshared_elems.0, "{}: inference values not shared", g.name);
        let tr = pipeline::plan(&g, Mode::Training, Fusion::Full).unwrap();
        let t = &tr.memory;
        assert!(t.arena_elems < t.unshared_elems.0 + t.unshared_elems.1, "{}: training values and gradients {} of {} + {}", g.name, t.arena_elems, t.unshared_elems.0, t.unshared_elems.1);
    }
    // Networks of conv-bn-relu units recompute the batch norm outputs in backward where a
    // backward step reads them (the next convolution's weight gradient), and neither keep nor
    // recompute those only a max pool reads: their training values shrink (the MNIST VGG's
    // four units, ResNet-50's bottlenecks), so far that values and gradients together fit in
    // less than the values alone would take unshared.
    let recomputed = |p: &Plan| -> Vec<String> { p.memory.recompute_before.iter().flatten().map(|&r| p.graph.node(r).name.clone()).collect() };
    for (file, name, at_least, at_most) in [("examples/models/mnist_vgg.cnn", "MnistVgg", 2, 0.7), ("examples/models/resnet.cnn", "ResNet50", 4, 0.8)] {
        let p = pipeline::plan(&model(file, name, &[]), Mode::Training, Fusion::Full).unwrap();
        let m = &p.memory;
        assert!(recomputed(&p).len() >= at_least, "{name}: recomputations {:?}", recomputed(&p));
        let share = m.arena_elems as f64 / m.unshared_elems.0 as f64;
        assert!(share < at_most, "{name}: training values and gradients {} of unshared values {} ({share:.2})", m.arena_elems, m.unshared_elems.0);
    }
    let vgg = pipeline::plan(&model("examples/models/mnist_vgg.cnn", "MnistVgg", &[]), Mode::Training, Fusion::Full).unwrap();
    assert_eq!(recomputed(&vgg), ["s1.relu1", "s2.relu1"], "MnistVgg: the pools' inputs are not recomputed");
    // The CIFAR net's inception concatenations are read only by a max pool and by global
    // pooling, whose backward steps read no values: neither kept nor recomputed (a
    // concatenation a convolution reads is recomputed slice by slice: runtime/tests/exec_engine.rs).
    let p = pipeline::plan(&model("examples/models/cifar_inception.cnn", "CifarInception", &[]), Mode::Training, Fusion::Full).unwrap();
    let concats: Vec<String> = recomputed(&p).into_iter().filter(|r| r.ends_with("concat1")).collect();
    assert!(concats.is_empty(), "CifarInception: recomputed concatenations {concats:?}");
    assert!(recomputed(&p).len() >= 8, "CifarInception: recomputations {:?}", recomputed(&p));
    // Gradients take over the memory of values whose last backward reader has run: one arena
    // for both holds about a third of what every buffer and gradient would take unshared.
    let m = &p.memory;
    let at = |v: &[Option<usize>]| -> Vec<Range<usize>> { v.iter().enumerate().filter_map(|(i, o)| o.map(|o| o..o + p.graph.node(p.graph.nodes().nth(i).unwrap()).shape.numel())).collect() };
    let (vals, grads) = (at(&m.value_at), at(&m.grad_at));
    let reused = grads.iter().filter(|gr| vals.iter().any(|v| v.start < gr.end && gr.start < v.end)).count();
    assert!(reused >= 10, "CifarInception: {reused} gradients reuse values' memory");
    let share = m.arena_elems as f64 / (m.unshared_elems.0 + m.unshared_elems.1) as f64;
    assert!(share < 0.36, "CifarInception: {} of {} + {} ({share:.2})", m.arena_elems, m.unshared_elems.0, m.unshared_elems.1);
    // LeNet-5 is a chain: at most its three largest activations at a time, not eleven.
    let lenet = model("examples/models/lenet5.cnn", "LeNet5", &[]);
    let p = pipeline::plan(&lenet, Mode::Inference, Fusion::Full).unwrap();
    let mut sizes: Vec<usize> = lenet.nodes().filter(|&id| p.memory.value_at[id.index()].is_some()).map(|id| memplan::aligned(lenet.node(id).shape.numel())).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    assert!(p.memory.arena_elems <= sizes[..3].iter().sum(), "LeNet5: arena of {} for sizes {sizes:?}", p.memory.arena_elems);
}
