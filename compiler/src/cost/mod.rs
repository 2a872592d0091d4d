//! The architecture cost model: parameters, multiply-accumulates, FLOPs forward and backward,
//! activation memory and receptive field, per layer, per block and in total.
//!
//! # Counting conventions (every figure is labelled with one of these)
//!
//! - **`macs`**: multiply-accumulates of convolutions and dense layers only, *without* bias:
//!   `H_out * W_out * C_out * kh * kw * C_in / groups` for a convolution, `in * out` for a dense
//!   layer. This is what papers quote, what fvcore reports for BN-free nets, and half of what
//!   PyTorch's FLOP counter prints.
//! - **`flops.forward`**: every floating-point operation of the forward pass: `2 * macs` plus
//!   bias adds, batch-norm, pooling, activations and other elementwise work (table below).
//! - **`flops.backward`**: split into `input` (gradients flowing to the layer's operands) and
//!   `weight` (parameter gradients). These are exact per op, not "2x forward": a layer whose
//!   operand needs no gradient (the image, or anything below the lowest trainable layer) costs
//!   no input-gradient FLOPs, and a frozen layer costs no weight-gradient FLOPs.
//!
//! Per-element FLOP counts (`E` = output elements, `I` = input elements, `n` = features):
//!
//! | op | forward | backward input | backward weight |
//! | --- | --- | --- | --- |
//! | conv / dense | `2 macs` (+ `E` bias) | `2 macs` | `2 macs` (+ `E` bias) |
//! | batch-norm (train) | `7 E` (sum, sum of squares, normalise, scale, shift) | `4 E` | `3 E` |
//! | relu / leaky relu / elu / sigmoid / tanh | `1 / 2 / 3 / 4 / 1 E` | `1 / 2 / 2 / 3 / 3 E` | |
//! | lrn (window `s`) | `(s + 5) E` | `(2 s + 6) E` | |
//! | max pool `k x k` | `(k^2 - 1) E` comparisons | `E` | |
//! | avg pool `k x k` | `k^2 E` | `k^2 E` | |
//! | global avg pool | `I + C` | `I` | |
//! | add of `m` operands | `(m - 1) E` | 0 | |
//! | channel mul | `E` | `3 E` | |
//! | dropout | `E` | `E` | |
//! | softmax / softmax cross-entropy / hinge | `4 n` / `4 n + 1` / `3 n` | `2 n` / `2 n` / `2 n` | |
//! | flatten, concat, input | 0 | 0 | |
//!
//! A value used by several layers also costs `(users - 1) * E` backward adds to sum its
//! gradients, charged to the producing layer's `input` column.
//!
//! # Memory
//!
//! `activation_bytes` of a layer is its output for the whole batch (f32). The model's
//! **inference peak** simulates execution in graph order, freeing each value after its last
//! user (buffer reuse): the peak over steps of the live values, the step's inputs and output
//! included. **Training keeps** the values backward needs (deduplicated): a conv/dense layer's
//! operand (when its weights train), an activation's output, a max-pool's argmax (4 bytes per
//! output), a batch-norm's operand, dropout's mask (1 byte per element), both channel-mul
//! operands, LRN's operand and output, and the loss's probabilities: what a framework that
//! keeps every saved tensor to the end of backward holds. **cnnc's plans** are what cnnc's
//! engine allocates for the batch: the memory plan's arena (`passes::memplan`: values and
//! gradients sharing memory where their lives do not overlap, batch-norm and pooling outputs
//! recomputed in backward) plus, in training, one byte per max-pool output for its winners.
//!
//! # Receptive field
//!
//! From the input: a window op of dilated extent `k` and stride `s` maps `rf -> rf + (k-1) * j`
//! and `j -> j * s` (`j` = effective stride, the product of strides); joins take the maximum;
//! global pooling and dense layers see the whole map.

mod report;

pub use report::{render, render_compare, thousands, to_json as report_json, Format};

use crate::ir::{Activation, Graph, Loss, NodeId, Op, PoolKind, Shape};
use crate::plan::{Fusion, Mode};
use serde::Serialize;
use std::collections::{BTreeSet, HashMap};

/// FLOPs of a backward pass, by what the gradient is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BackwardFlops {
    /// Gradients with respect to the layer's operands.
    pub input: u64,
    /// Gradients with respect to the layer's parameters.
    pub weight: u64,
}

impl BackwardFlops {
    /// `input + weight`.
    pub fn total(&self) -> u64 {
        self.input + self.weight
    }
}

/// FLOPs of one layer (or a sum of layers).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Flops {
    /// Forward pass.
    pub forward: u64,
    /// Backward pass.
    pub backward: BackwardFlops,
}

/// Costs that add up over layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// All parameters (weights, biases, batch-norm scale and shift; not running statistics).
    pub params: u64,
    /// Parameters of trainable layers.
    pub trainable_params: u64,
    /// Parameters of frozen layers.
    pub frozen_params: u64,
    /// Conv/dense multiply-accumulates without bias, for the batch.
    pub macs: u64,
    /// FLOPs for the batch.
    pub flops: Flops,
    /// Output activations for the batch, in bytes.
    pub activation_bytes: u64,
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.params += o.params;
        self.trainable_params += o.trainable_params;
        self.frozen_params += o.frozen_params;
        self.macs += o.macs;
        self.flops.forward += o.flops.forward;
        self.flops.backward.input += o.flops.backward.input;
        self.flops.backward.weight += o.flops.backward.weight;
        self.activation_bytes += o.activation_bytes;
    }
}

/// The cost of one layer.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerCost {
    /// Layer name.
    pub name: String,
    /// Op kind (`conv2d`, `maxpool`, ...).
    pub op: &'static str,
    /// The op with its attributes, as in the IR text.
    pub detail: String,
    /// Enclosing block instances, outermost first.
    pub scope: Vec<String>,
    /// Per-sample output shape.
    pub output_shape: Shape,
    /// Additive costs.
    #[serde(flatten)]
    pub counts: Counts,
    /// Receptive field `[h, w]` in input pixels.
    pub receptive_field: [usize; 2],
    /// Effective stride `[h, w]`: input pixels between adjacent outputs.
    pub effective_stride: [usize; 2],
}

/// A block instance's subtotal (never added into the model totals again).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BlockCost {
    /// The block instance path (`layer2.0`).
    pub name: String,
    /// Nesting depth (0 = top level).
    pub depth: usize,
    /// Index of the block's first layer in [`CostReport::layers`].
    pub first_layer: usize,
    /// Number of layers in the block.
    pub layer_count: usize,
    /// Output shape of the block's last layer.
    pub output_shape: Shape,
    /// Sum over the block's layers.
    #[serde(flatten)]
    pub counts: Counts,
}

/// Activation memory of the whole model for the batch, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Memory {
    /// Peak of live values during inference with buffer reuse.
    pub inference_peak_bytes: u64,
    /// Values the backward pass needs kept from the forward pass.
    pub training_saved_bytes: u64,
    /// Sum of all layer outputs (no reuse).
    pub all_outputs_bytes: u64,
    /// cnnc's training plan: its arena of values and gradients and max pooling's one-byte
    /// winners (`None` where the graph cannot be planned).
    pub training_plan_bytes: Option<u64>,
    /// cnnc's inference plan: its arena of values.
    pub inference_plan_bytes: Option<u64>,
}

/// The architecture cost report of a graph.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CostReport {
    /// Model name.
    pub model: String,
    /// Batch size the counts are for.
    pub batch: usize,
    /// Per-sample input shapes.
    pub input: Vec<Shape>,
    /// Per-sample output shapes.
    pub output: Vec<Shape>,
    /// Every layer, in graph order.
    pub layers: Vec<LayerCost>,
    /// Every block instance, in order of first layer (outer before inner).
    pub blocks: Vec<BlockCost>,
    /// Sum over layers.
    pub totals: Counts,
    /// Model activation memory.
    pub memory: Memory,
    /// Backward FLOPs that frozen layers save (0 when everything trains).
    pub backward_flops_saved: u64,
}

/// The cost report of `g` for a batch of `batch` samples.
pub fn analyze(g: &Graph, batch: usize) -> CostReport {
    let nodes: Vec<NodeId> = g.nodes().collect();
    let grad = needs_grad(g);
    let mut rf: HashMap<NodeId, ([usize; 2], [usize; 2])> = HashMap::new();
    let mut layers = Vec::with_capacity(nodes.len());
    for &id in &nodes {
        let n = g.node(id);
        let ops = g.operands(id);
        let ins: Vec<Shape> = ops.iter().map(|&o| g.node(o).shape).collect();
        let mut counts = per_sample(g, id, &ins, &grad);
        let b = batch as u64;
        counts.macs *= b;
        counts.flops.forward *= b;
        counts.flops.backward.input *= b;
        counts.flops.backward.weight *= b;
        counts.activation_bytes = n.shape.numel() as u64 * 4 * b;
        let (field, jump) = receptive(&n.op, ops.iter().map(|o| rf[o]).collect(), &ins);
        rf.insert(id, (field, jump));
        layers.push(LayerCost {
            name: n.name.clone(),
            op: n.op.kind(),
            detail: n.op.to_string(),
            scope: n.scope.clone(),
            output_shape: n.shape,
            counts,
            receptive_field: field,
            effective_stride: jump,
        });
    }
    let mut totals = Counts::default();
    for l in &layers {
        totals.add(&l.counts);
    }
    let all_trainable = {
        let mut g2 = g.clone();
        for id in nodes.iter().copied() {
            g2.node_mut(id).trainable = true;
        }
        let ng = needs_grad(&g2);
        nodes
            .iter()
            .map(|&id| {
                let ins = g2.operand_shapes(id);
                per_sample(&g2, id, &ins, &ng).flops.backward.total() * batch as u64
            })
            .sum::<u64>()
    };
    let blocks = blocks(&layers);
    CostReport {
        model: g.name.clone(),
        batch,
        input: g.inputs().iter().map(|&i| g.node(i).shape).collect(),
        output: g.outputs().iter().map(|&o| g.node(o).shape).collect(),
        backward_flops_saved: all_trainable.saturating_sub(totals.flops.backward.total()),
        memory: memory(g, batch),
        layers,
        blocks,
        totals,
    }
}

/// For each node: whether a gradient with respect to its output is needed. The rule is
/// [`Graph::needs_grad`], the one the JIT runtime uses to drop backward kernels.
fn needs_grad(g: &Graph) -> HashMap<NodeId, bool> {
    let v = g.needs_grad();
    g.nodes().map(|id| (id, v[id.index()])).collect()
}

/// Parameters of one layer: `(count, has_bias_like_extra)`.
pub fn param_count(op: &Op, ins: &[Shape]) -> u64 {
    match *op {
        Op::Conv2d(c) => {
            let cin = ins[0].channels();
            let w = c.out_channels * (cin / c.groups) * c.kernel[0] * c.kernel[1];
            (w + if c.bias { c.out_channels } else { 0 }) as u64
        }
        Op::Dense(d) => {
            let i = ins[0].numel();
            (i * d.out_features + if d.bias { d.out_features } else { 0 }) as u64
        }
        Op::BatchNorm(_) => 2 * ins[0].channels() as u64,
        _ => 0,
    }
}

/// Conv/dense multiply-accumulates of one layer for one sample, without bias.
pub fn mac_count(op: &Op, ins: &[Shape], out: Shape) -> u64 {
    match *op {
        Op::Conv2d(c) => {
            let (_, oh, ow) = out.as_chw();
            (oh * ow * c.out_channels * c.kernel[0] * c.kernel[1] * (ins[0].channels() / c.groups)) as u64
        }
        Op::Dense(d) => (ins[0].numel() * d.out_features) as u64,
        _ => 0,
    }
}

fn per_sample(g: &Graph, id: NodeId, ins: &[Shape], needs_grad: &HashMap<NodeId, bool>) -> Counts {
    let n = g.node(id);
    let e = n.shape.numel() as u64;
    let operand_grad = g.operands(id).iter().any(|o| needs_grad[o]);
    let params = param_count(&n.op, ins);
    let macs = mac_count(&n.op, ins, n.shape);
    let i = ins.first().map(|s| s.numel() as u64).unwrap_or(0);
    // (forward, backward input, backward weight), per sample.
    let (fwd, bin, bw) = match n.op {
        Op::Input | Op::Flatten | Op::Concat => (0, 0, 0),
        Op::Conv2d(c) => {
            let bias = if c.bias { e } else { 0 };
            (2 * macs + bias, 2 * macs, 2 * macs + bias)
        }
        Op::Dense(d) => {
            let bias = if d.bias { e } else { 0 };
            (2 * macs + bias, 2 * macs, 2 * macs + bias)
        }
        Op::BatchNorm(_) => (7 * e, 4 * e, 3 * e),
        Op::Act(a) => match a {
            Activation::Relu => (e, e, 0),
            Activation::LeakyRelu { .. } => (2 * e, 2 * e, 0),
            Activation::Elu { .. } => (3 * e, 2 * e, 0),
            Activation::Sigmoid => (4 * e, 3 * e, 0),
            Activation::Tanh => (e, 3 * e, 0),
        },
        Op::Lrn(l) => ((l.size as u64 + 5) * e, (2 * l.size as u64 + 6) * e, 0),
        Op::Pool(p) => {
            let kk = (p.kernel[0] * p.kernel[1]) as u64;
            match p.kind {
                PoolKind::Max => ((kk - 1) * e, e, 0),
                PoolKind::Avg => (kk * e, kk * e, 0),
            }
        }
        Op::GlobalAvgPool => (i + n.shape.channels() as u64, i, 0),
        Op::Add => ((ins.len() as u64 - 1) * e, 0, 0),
        Op::ChannelMul => (e, 3 * e, 0),
        Op::Dropout { .. } => (e, e, 0),
        Op::Softmax => (4 * i, 2 * i, 0),
        Op::Loss(Loss::SoftmaxCrossEntropy) => (4 * i + 1, 2 * i, 0),
        Op::Loss(Loss::MulticlassHinge { .. }) => (3 * i, 2 * i, 0),
    };
    let trains = n.op.has_params() && n.trainable;
    let users = g.users(id).len() as u64;
    let fanout = if needs_grad[&id] { users.saturating_sub(1) * e } else { 0 };
    Counts {
        params,
        trainable_params: if trains { params } else { 0 },
        frozen_params: if trains { 0 } else { params },
        macs,
        flops: Flops {
            forward: fwd,
            backward: BackwardFlops {
                input: if operand_grad { bin } else { 0 } + fanout,
                weight: if trains { bw } else { 0 },
            },
        },
        activation_bytes: 0,
    }
}

fn receptive(op: &Op, inputs: Vec<([usize; 2], [usize; 2])>, ins: &[Shape]) -> ([usize; 2], [usize; 2]) {
    let window = |(rf, j): ([usize; 2], [usize; 2]), k: [usize; 2], s: [usize; 2]| {
        (
            [rf[0].saturating_add((k[0] - 1).saturating_mul(j[0])), rf[1].saturating_add((k[1] - 1).saturating_mul(j[1]))],
            [j[0].saturating_mul(s[0]), j[1].saturating_mul(s[1])],
        )
    };
    let Some(&first) = inputs.first() else { return ([1, 1], [1, 1]) };
    let joined = inputs.iter().fold(first, |(rf, j), &(r2, j2)| {
        ([rf[0].max(r2[0]), rf[1].max(r2[1])], [j[0].max(j2[0]), j[1].max(j2[1])])
    });
    match *op {
        Op::Conv2d(c) => window(first, c.dilated_kernel(), c.stride),
        Op::Pool(p) => window(first, p.kernel, p.stride),
        Op::GlobalAvgPool | Op::Dense(_) | Op::Flatten => match ins[0] {
            Shape::Chw { h, w, .. } => window(first, [h, w], [h, w]),
            Shape::Flat { .. } => first,
        },
        // The gate is one value per channel: outputs are spaced like `x`'s, but each sees
        // everything the gate saw.
        Op::ChannelMul => (joined.0, first.1),
        _ => joined,
    }
}

fn blocks(layers: &[LayerCost]) -> Vec<BlockCost> {
    let mut out: Vec<BlockCost> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for (li, l) in layers.iter().enumerate() {
        for (depth, name) in l.scope.iter().enumerate() {
            let bi = *index.entry(name.clone()).or_insert_with(|| {
                out.push(BlockCost {
                    name: name.clone(),
                    depth,
                    first_layer: li,
                    layer_count: 0,
                    output_shape: l.output_shape,
                    counts: Counts::default(),
                });
                out.len() - 1
            });
            let b = &mut out[bi];
            b.layer_count += 1;
            b.output_shape = l.output_shape;
            b.counts.add(&l.counts);
        }
    }
    out
}

fn memory(g: &Graph, batch: usize) -> Memory {
    let bytes = |id: NodeId| g.node(id).shape.numel() as u64 * 4 * batch as u64;
    let nodes: Vec<NodeId> = g.nodes().collect();
    let outputs: BTreeSet<NodeId> = g.outputs().into_iter().collect();
    // Last user of each value (outputs live to the end).
    let mut last_use: HashMap<NodeId, usize> = HashMap::new();
    for (step, &id) in nodes.iter().enumerate() {
        for o in g.operands(id) {
            last_use.insert(o, step);
        }
    }
    let mut live: BTreeSet<NodeId> = BTreeSet::new();
    let mut peak = 0;
    for (step, &id) in nodes.iter().enumerate() {
        live.insert(id);
        let now: u64 = live.iter().map(|&v| bytes(v)).sum();
        peak = peak.max(now);
        live.retain(|v| outputs.contains(v) || last_use.get(v).is_some_and(|&s| s > step));
    }
    let ng = needs_grad(g);
    let mut saved: BTreeSet<(NodeId, u8)> = BTreeSet::new(); // (value, 0 = f32 value, 1 = argmax, 2 = mask, 3 = probabilities)
    let mut extra = 0u64;
    for &id in &nodes {
        let n = g.node(id);
        let ops = g.operands(id);
        if !ng[&id] {
            continue; // nothing below the lowest trainable layer is differentiated
        }
        match n.op {
            Op::Conv2d(_) | Op::Dense(_) if n.trainable => {
                saved.insert((ops[0], 0));
            }
            Op::BatchNorm(_) => {
                saved.insert((ops[0], 0));
            }
            Op::Act(_) => {
                saved.insert((id, 0));
            }
            Op::Lrn(_) => {
                saved.insert((ops[0], 0));
                saved.insert((id, 0));
            }
            Op::ChannelMul => {
                saved.insert((ops[0], 0));
                saved.insert((ops[1], 0));
            }
            Op::Pool(p) if p.kind == PoolKind::Max => {
                saved.insert((id, 1));
            }
            Op::Dropout { .. } => extra += n.shape.numel() as u64 * batch as u64,
            Op::Loss(_) => {
                saved.insert((ops[0], 3));
            }
            _ => {}
        }
    }
    let training_saved_bytes = saved.iter().map(|&(v, _)| bytes(v)).sum::<u64>() + extra;
    let planned = |mode: Mode| {
        let p = crate::pipeline::plan(g, mode, Fusion::Full).ok()?;
        let argmax: usize = match mode {
            Mode::Training => nodes.iter().filter(|&&id| matches!(g.node(id).op, Op::Pool(p) if p.kind == PoolKind::Max)).map(|&id| g.node(id).shape.numel()).sum(),
            Mode::Inference => 0,
        };
        Some((p.memory.arena_elems as u64 * 4 + argmax as u64) * batch as u64)
    };
    Memory {
        inference_peak_bytes: peak,
        training_saved_bytes,
        all_outputs_bytes: nodes.iter().map(|&id| bytes(id)).sum(),
        training_plan_bytes: planned(Mode::Training),
        inference_plan_bytes: planned(Mode::Inference),
    }
}

#[cfg(test)]
mod tests;
