//! The memory plan (`passes::memplan`) checked by simulating the schedule, independently of
//! the pass's interval arithmetic: every access to a buffer (value or gradient) must find its
//! slot still holding that buffer, a slot changes hands only where the plan says to zero it
//! (gradients) or by a write (values), and a buffer never returns to a slot it lost. Run on the
//! zoo's shapes of graph: chains, residual blocks, in-place inception concatenations, DenseNet
//! nesting, GoogLeNet's auxiliary heads, frozen prefixes; training values recomputed in
//! backward included. Also: sharing actually happens.

use cnnc_compiler::ir::{Activation, Graph, NodeId, Op};
use cnnc_compiler::lang::{self, Value};
use cnnc_compiler::passes::memplan::root;
use cnnc_compiler::pipeline;
use cnnc_compiler::plan::{Fusion, Group, Mode, Plan};
use std::collections::{HashMap, HashSet};
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

/// Slot ownership: `claim` hands a slot to a buffer (allowed only when `may_claim`), `touch`
/// requires the buffer to own its slot.
#[derive(Default)]
struct Owners {
    owner: HashMap<usize, NodeId>,
    lost: HashSet<(usize, NodeId)>,
}

impl Owners {
    /// A recomputation writes the buffer back into its slot, whoever held it meanwhile.
    fn reclaim(&mut self, slot: usize, r: NodeId) {
        if let Some(p) = self.owner.insert(slot, r) {
            if p != r {
                self.lost.insert((slot, p));
            }
        }
        self.lost.remove(&(slot, r));
    }

    fn access(&mut self, slot: usize, r: NodeId, may_claim: bool, what: &str) {
        match self.owner.get(&slot) {
            Some(&o) if o == r => {}
            prev => {
                assert!(may_claim, "{what}: buffer {r} accessed but slot {slot} holds {prev:?}");
                assert!(!self.lost.contains(&(slot, r)), "{what}: buffer {r} comes back to slot {slot} after losing it");
                if let Some(&p) = prev {
                    self.lost.insert((slot, p));
                }
                self.owner.insert(slot, r);
            }
        }
    }
}

/// The buffers one step touches at once occupy distinct slots.
fn distinct(accesses: impl Iterator<Item = (usize, NodeId)>, what: &str) {
    let mut by_slot: HashMap<usize, NodeId> = HashMap::new();
    for (s, r) in accesses {
        let prev = *by_slot.entry(s).or_insert(r);
        assert_eq!(prev, r, "{what}: buffers {prev} and {r} share slot {s} in one step");
    }
}

fn check_values(p: &Plan) {
    let g = &p.graph;
    let m = &p.memory;
    let slot = |id: NodeId| m.value_slot[root(&p.placement, id).unwrap().index()].expect("every buffer has a value slot");
    let mut own = Owners::default();
    for i in g.inputs() {
        own.access(slot(i), root(&p.placement, i).unwrap(), true, "input");
    }
    for (i, gr) in p.groups.iter().enumerate() {
        let what = format!("{} {:?} group {i} ({})", g.name, p.mode, g.node(gr.anchor()).name);
        let rs = reads(g, gr, &p.inplace_concats);
        for &o in &rs {
            own.access(slot(o), root(&p.placement, o).unwrap(), false, &what);
        }
        // A kernel reads its operands while it writes its result: never the same slot.
        let out = root(&p.placement, gr.output()).unwrap();
        distinct(rs.iter().map(|&o| (slot(o), root(&p.placement, o).unwrap())).chain([(slot(gr.output()), out)]), &what);
        own.access(slot(gr.output()), out, true, &what);
    }
    for h in heads(g).into_iter().chain(g.outputs()) {
        own.access(slot(h), root(&p.placement, h).unwrap(), false, &format!("{} output", g.name));
    }
    if p.mode == Mode::Inference {
        assert!(m.recompute_before.iter().all(Vec::is_empty), "inference recomputes nothing");
        return;
    }
    // Backward reads what the engine's backward steps read (restated here from
    // `runtime/src/exec/run.rs`, not taken from the pass): after the planned recomputations
    // (which reclaim a slot), every one must still hold its value.
    for (i, gr) in p.groups.iter().enumerate().rev() {
        let what = format!("{} backward group {i} ({})", g.name, g.node(gr.anchor()).name);
        for &r in &m.recompute_before[i] {
            // Every group writing the buffer (its own, or each slice of a concatenation) is a
            // batch norm, and the concatenation has no writer of another kind.
            let writers: Vec<&Group> = p.groups.iter().filter(|w| root(&p.placement, w.output()) == Some(r) && !p.inplace_concats.contains(&w.output())).collect();
            assert!(!writers.is_empty(), "{what}: recomputes {r}, which no group writes");
            for w in writers {
                assert!(matches!(g.node(w.anchor()).op, Op::BatchNorm(_)), "{what}: recomputes {r}, written by `{}`", g.node(w.anchor()).name);
            }
            own.reclaim(slot(r), r);
        }
        for o in engine_backward_reads(g, gr, &p.inplace_concats) {
            own.access(slot(o), root(&p.placement, o).unwrap(), false, &what);
        }
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

fn check_grads(p: &Plan) {
    let g = &p.graph;
    let m = &p.memory;
    let ng = g.needs_grad();
    let gslot = |id: NodeId| m.grad_slot[root(&p.placement, id).unwrap().index()];
    let mut own = Owners::default();
    let fresh: HashSet<usize> = m.zero_at_seed.iter().copied().collect();
    for h in heads(g) {
        let s = gslot(h).expect("heads have a gradient slot");
        own.access(s, root(&p.placement, h).unwrap(), fresh.contains(&s), "seed");
    }
    for (i, gr) in p.groups.iter().enumerate().rev() {
        let fresh: HashSet<usize> = m.zero_before[i].iter().copied().collect();
        if !ng[gr.output().index()] {
            assert!(fresh.is_empty(), "zeroing planned before a backward step that does not run");
            continue;
        }
        let what = format!("{} backward group {i} ({})", g.name, g.node(gr.anchor()).name);
        let s = gslot(gr.output()).expect("a group that runs backward has an output gradient");
        let touched = reads(g, gr, &p.inplace_concats).into_iter().filter(|o| ng[o.index()]).chain([gr.output()]);
        distinct(touched.map(|o| (gslot(o).unwrap(), root(&p.placement, o).unwrap())), &what);
        own.access(s, root(&p.placement, gr.output()).unwrap(), fresh.contains(&s), &what);
        // A batch norm the plan lets overwrite its input gradient claims that slot unzeroed.
        let overwrites = m.overwrite_grad[i];
        assert!(!overwrites || matches!(g.node(gr.anchor()).op, Op::BatchNorm(_)), "{what}: only batch norms overwrite");
        for o in reads(g, gr, &p.inplace_concats).into_iter().filter(|o| ng[o.index()]) {
            let s = gslot(o).expect("an operand needing a gradient has a slot");
            let claims = fresh.contains(&s) || overwrites && o == g.operands(gr.anchor())[0];
            own.access(s, root(&p.placement, o).unwrap(), claims, &what);
        }
    }
}

#[test]
fn shared_slots_never_hold_two_live_buffers() {
    for mut g in zoo() {
        for mode in [Mode::Inference, Mode::Training] {
            let p = pipeline::plan(&g, mode, Fusion::Full).unwrap();
            check_values(&p);
            if mode == Mode::Training {
                check_grads(&p);
            }
        }
        // A frozen prefix: gradients stop at the lowest trainable layer.
        let ids: Vec<NodeId> = g.nodes().collect();
        for &id in &ids[..ids.len() / 2] {
            g.node_mut(id).trainable = false;
        }
        let p = pipeline::plan(&g, Mode::Training, Fusion::Full).unwrap();
        check_values(&p);
        check_grads(&p);
        let p = pipeline::plan(&g, Mode::Training, Fusion::None).unwrap();
        check_grads(&p);
    }
}

#[test]
fn chains_share_memory() {
    for g in zoo() {
        let inf = pipeline::plan(&g, Mode::Inference, Fusion::Full).unwrap();
        let m = &inf.memory;
        let buffers = m.value_slot.iter().flatten().count();
        assert!(m.value_slot_elems.len() < buffers, "{}: {} slots for {buffers} buffers", g.name, m.value_slot_elems.len());
        assert!(m.value_elems() < m.unshared_elems.0, "{}: inference values not shared", g.name);
        let tr = pipeline::plan(&g, Mode::Training, Fusion::Full).unwrap();
        let t = &tr.memory;
        assert!(t.value_elems() <= t.unshared_elems.0, "{}: training values", g.name);
        assert!(t.grad_elems() < t.unshared_elems.1, "{}: gradients not shared ({} of {})", g.name, t.grad_elems(), t.unshared_elems.1);
    }
    // Networks of conv-bn-relu units recompute the batch norm outputs in backward where a
    // backward step reads them (the next convolution's weight gradient), and neither keep nor
    // recompute those only a max pool reads: their training values shrink (the MNIST VGG's
    // four units, ResNet-50's bottlenecks).
    let recomputed = |p: &Plan| -> Vec<String> { p.memory.recompute_before.iter().flatten().map(|&r| p.graph.node(r).name.clone()).collect() };
    for (file, name, at_least, at_most) in [("examples/models/mnist_vgg.cnn", "MnistVgg", 2, 0.75), ("examples/models/resnet.cnn", "ResNet50", 4, 0.85)] {
        let p = pipeline::plan(&model(file, name, &[]), Mode::Training, Fusion::Full).unwrap();
        let m = &p.memory;
        assert!(recomputed(&p).len() >= at_least, "{name}: recomputations {:?}", recomputed(&p));
        let share = m.value_elems() as f64 / m.unshared_elems.0 as f64;
        assert!(share < at_most, "{name}: training values {} of {} ({share:.2})", m.value_elems(), m.unshared_elems.0);
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
    // LeNet-5 is a chain: two or three live activations at a time, not eleven.
    let lenet = model("examples/models/lenet5.cnn", "LeNet5", &[]);
    let p = pipeline::plan(&lenet, Mode::Inference, Fusion::Full).unwrap();
    assert!(p.memory.value_slot_elems.len() <= 3, "{:?}", p.memory.value_slot_elems);
}
