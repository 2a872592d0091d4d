//! The graph: a `petgraph` DAG of named, shape-checked nodes.
//!
//! Edges run from operand to user and carry the operand's position, so `add(a, b)` and
//! `concat(a, b, c)` keep their operand order. Nodes are added operands-first, which makes
//! insertion order a topological order; [`Graph::nodes`] iterates in it.

use super::infer::infer;
use super::op::Op;
use super::shape::Shape;
use crate::error::{Error, Result};
use petgraph::stable_graph::{NodeIndex, StableDiGraph};
use petgraph::visit::{EdgeRef, NodeIndexable};
use petgraph::Direction;
use std::collections::HashMap;
use std::fmt;

/// A node's id. Prints as in the IR text: `%7`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub(crate) NodeIndex<u32>);

impl NodeId {
    /// The dense index (stable for the node's lifetime).
    pub fn index(self) -> usize {
        self.0.index()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "%{}", self.0.index())
    }
}

/// One layer of the network.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    /// Unique layer name (`conv1`, `inception3a.b2.conv2`).
    pub name: String,
    /// The operation, with attributes resolved.
    pub op: Op,
    /// The inferred per-sample output shape.
    pub shape: Shape,
    /// Enclosing block instances, outermost first (`["layer2", "layer2.0"]`); the cost report
    /// subtotals by these.
    pub scope: Vec<String>,
    /// Whether the layer's parameters are trained (false = frozen for transfer learning).
    pub trainable: bool,
}

/// A network: named nodes, shape-checked on insertion, with designated outputs.
#[derive(Clone, Debug)]
pub struct Graph {
    /// The model's name.
    pub name: String,
    g: StableDiGraph<Node, u32>,
    outputs: Vec<NodeId>,
    names: HashMap<String, NodeId>,
    scope: Vec<String>,
}

impl Graph {
    /// An empty graph called `name`.
    pub fn new(name: impl Into<String>) -> Graph {
        Graph { name: name.into(), g: StableDiGraph::default(), outputs: Vec::new(), names: HashMap::new(), scope: Vec::new() }
    }

    /// Add a graph input of the given per-sample shape.
    pub fn input(&mut self, name: impl Into<String>, shape: Shape) -> Result<NodeId> {
        let name = name.into();
        if shape.numel() == 0 {
            return Err(Error::Shape {
                layer: name,
                op: "input",
                inputs: vec![],
                message: format!("input shape {shape} has no elements"),
                hint: None,
            });
        }
        self.insert(name, Op::Input, shape, &[])
    }

    /// Add a layer applying `op` to `operands`, inferring (and checking) its output shape.
    /// Errors name the layer, the op, the operand shapes and, where possible, what would fit.
    pub fn add(&mut self, name: impl Into<String>, op: Op, operands: &[NodeId]) -> Result<NodeId> {
        let name = name.into();
        let shapes: Vec<Shape> = operands.iter().map(|&o| self.node(o).shape).collect();
        if let (Some(n), got) = (op.arity(), operands.len()) {
            if n != got {
                return Err(Error::Arity { layer: name, op: op.kind(), expected: n.to_string(), got });
            }
        } else if operands.len() < 2 {
            return Err(Error::Arity { layer: name, op: op.kind(), expected: "2 or more".into(), got: operands.len() });
        }
        let (op, shape) = infer(&op, &shapes).map_err(|e| Error::Shape {
            layer: name.clone(),
            op: op.kind(),
            inputs: shapes.clone(),
            message: e.message,
            hint: e.hint,
        })?;
        self.insert(name, op, shape, operands)
    }

    fn insert(&mut self, name: String, op: Op, shape: Shape, operands: &[NodeId]) -> Result<NodeId> {
        if self.names.contains_key(&name) {
            return Err(Error::DuplicateName(name));
        }
        let node = Node { name: name.clone(), op, shape, scope: self.scope.clone(), trainable: true };
        let id = NodeId(self.g.add_node(node));
        for (i, &o) in operands.iter().enumerate() {
            self.g.add_edge(o.0, id.0, i as u32);
        }
        self.names.insert(name, id);
        Ok(id)
    }

    /// Enter a block instance: nodes added until the matching [`Graph::pop_scope`] are
    /// attributed to it (and to every enclosing one) in cost reports.
    pub fn push_scope(&mut self, block_instance: impl Into<String>) {
        self.scope.push(block_instance.into());
    }

    /// Leave the innermost block instance.
    pub fn pop_scope(&mut self) {
        self.scope.pop();
    }

    /// Mark the model's outputs (in order). Defaults to the last node added if never set.
    pub fn set_outputs(&mut self, outputs: &[NodeId]) {
        self.outputs = outputs.to_vec();
    }

    /// The model's outputs.
    pub fn outputs(&self) -> Vec<NodeId> {
        if self.outputs.is_empty() {
            self.g.node_indices().next_back().map(NodeId).into_iter().collect()
        } else {
            self.outputs.clone()
        }
    }

    /// The graph inputs, in insertion order.
    pub fn inputs(&self) -> Vec<NodeId> {
        self.nodes().filter(|&n| self.node(n).op == Op::Input).collect()
    }

    /// The node with id `id`.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.g[id.0]
    }

    /// Mutable access to a node (for passes that change attributes, such as freezing).
    /// Changing `op` or `shape` here must be followed by [`crate::ir::verify`].
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.g[id.0]
    }

    /// The node called `name`.
    pub fn find(&self, name: &str) -> Result<NodeId> {
        self.names.get(name).copied().ok_or_else(|| Error::UnknownLayer(name.to_string()))
    }

    /// All nodes in insertion (= topological) order.
    pub fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.g.node_indices().map(NodeId)
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.g.node_count()
    }

    /// True when the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.g.node_count() == 0
    }

    /// The operands of `id`, in operand order.
    pub fn operands(&self, id: NodeId) -> Vec<NodeId> {
        let mut e: Vec<(u32, NodeId)> =
            self.g.edges_directed(id.0, Direction::Incoming).map(|e| (*e.weight(), NodeId(e.source()))).collect();
        e.sort_unstable();
        e.into_iter().map(|(_, n)| n).collect()
    }

    /// The users of `id` (nodes that take it as an operand), in id order, without repeats.
    pub fn users(&self, id: NodeId) -> Vec<NodeId> {
        let mut u: Vec<NodeId> = self.g.neighbors_directed(id.0, Direction::Outgoing).map(NodeId).collect();
        u.sort_unstable();
        u.dedup();
        u
    }

    /// Operand shapes of `id`, in operand order.
    pub fn operand_shapes(&self, id: NodeId) -> Vec<Shape> {
        self.operands(id).into_iter().map(|o| self.node(o).shape).collect()
    }

    /// Edge weights of `id`'s incoming edges (operand positions), unsorted; for the verifier.
    pub(crate) fn operand_positions(&self, id: NodeId) -> Vec<u32> {
        self.g.edges_directed(id.0, Direction::Incoming).map(|e| *e.weight()).collect()
    }

    /// The underlying petgraph graph (read-only), for algorithms and DOT output.
    pub fn petgraph(&self) -> &StableDiGraph<Node, u32> {
        &self.g
    }

    /// The backward pass's needs-gradient rule, indexed by [`NodeId::index`]: `true` when the
    /// gradient of the node's output is needed, i.e. when the node or anything upstream of it
    /// has trainable parameters (`has_params() && trainable`). The image never needs one,
    /// nothing below the lowest trainable layer does, and a frozen layer's weights get none.
    ///
    /// The one definition of "which backward work exists": the cost model counts backward
    /// FLOPs with it and the JIT runtime drops the backward kernels it rules out, so the
    /// report's `backward_flops_saved` is what the engine actually skips.
    pub fn needs_grad(&self) -> Vec<bool> {
        let mut m = vec![false; self.g.node_bound()];
        for id in self.nodes() {
            let n = self.node(id);
            let own = n.op.has_params() && n.trainable;
            m[id.index()] = own || self.operands(id).iter().any(|o| m[o.index()]);
        }
        m
    }

    /// A feature extractor: the part of the network that computes layer `layer`, i.e. that
    /// layer and everything upstream of it (names, ops, shapes, scopes and frozen flags kept),
    /// with `layer` as its only output. Parameter names are unchanged, so weights load into it
    /// by name (`ParamStore::load_by_name`). The model is called `<name>_to_<layer>`.
    /// An unknown layer is [`Error::UnknownLayer`].
    pub fn cut_at(&self, layer: &str) -> Result<Graph> {
        let end = self.find(layer)?;
        let mut keep = vec![false; self.g.node_bound()];
        keep[end.index()] = true;
        let order: Vec<NodeId> = self.nodes().collect();
        for &id in order.iter().rev() {
            if keep[id.index()] {
                for o in self.operands(id) {
                    keep[o.index()] = true;
                }
            }
        }
        let mut out = Graph::new(format!("{}_to_{layer}", self.name));
        let mut map: HashMap<NodeId, NodeId> = HashMap::new();
        for id in order.into_iter().filter(|id| keep[id.index()]) {
            let n = self.node(id).clone();
            let operands: Vec<NodeId> = self.operands(id).iter().map(|o| map[o]).collect();
            let new = NodeId(out.g.add_node(n.clone()));
            for (i, o) in operands.into_iter().enumerate() {
                out.g.add_edge(o.0, new.0, i as u32);
            }
            out.names.insert(n.name, new);
            map.insert(id, new);
        }
        out.outputs = vec![map[&end]];
        Ok(out)
    }
}

impl fmt::Display for Graph {
    /// The IR text: one line per node, `%id name = op (operands) : shape`.
    ///
    /// ```text
    /// graph LeNet5 {
    ///   %0 input = input : 1x28x28
    ///   %1 conv1 = conv2d 5x5 /1 pad 2 -> 6 (%0) : 6x28x28
    ///   outputs %9
    /// }
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "graph {} {{", self.name)?;
        for id in self.nodes() {
            let n = self.node(id);
            write!(f, "  {id} {} = {}", n.name, n.op)?;
            let ops = self.operands(id);
            if !ops.is_empty() {
                f.write_str(" (")?;
                for (i, o) in ops.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{o}")?;
                }
                f.write_str(")")?;
            }
            write!(f, " : {}", n.shape)?;
            if !n.trainable && n.op.has_params() {
                f.write_str(" frozen")?;
            }
            writeln!(f)?;
        }
        f.write_str("  outputs")?;
        for o in self.outputs() {
            write!(f, " {o}")?;
        }
        writeln!(f)?;
        writeln!(f, "}}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::op::*;

    #[test]
    fn build_and_print() {
        let mut g = Graph::new("tiny");
        let x = g.input("input", Shape::chw(1, 8, 8)).unwrap();
        let c = g.add("conv1", Op::Conv2d(Conv2d::new(4, [3, 3]).pad(Padding::Same)), &[x]).unwrap();
        let r = g.add("relu1", Op::Act(Activation::Relu), &[c]).unwrap();
        let s = g.add("sum", Op::Add, &[r, c]).unwrap();
        assert_eq!(g.operands(s), vec![r, c]);
        assert_eq!(g.users(c), vec![r, s]);
        let text = g.to_string();
        assert!(text.contains("%1 conv1 = conv2d 3x3 /1 pad 1 -> 4 (%0) : 4x8x8"), "{text}");
        assert!(text.contains("%3 sum = add (%2, %1) : 4x8x8"), "{text}");
        assert!(matches!(g.add("conv1", Op::Flatten, &[s]), Err(Error::DuplicateName(_))));
        let e = g.add("bad", Op::Add, &[s]).unwrap_err();
        assert_eq!(e.to_string(), "layer `bad` (add) takes 2 or more operand(s), got 1");
    }

    #[test]
    fn shape_error_names_layer() {
        let mut g = Graph::new("t");
        let x = g.input("input", Shape::chw(6, 4, 4)).unwrap();
        let e = g.add("conv3", Op::Conv2d(Conv2d::new(16, [5, 5])), &[x]).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("layer `conv3` (conv2d): conv 5x5 (no padding) needs at least 5x5 input, got 4x4"), "{s}");
        assert!(s.contains("(input 6x4x4)"), "{s}");
    }

    /// conv1 -> relu -> conv2 -> flatten -> fc, with a residual-free side branch `side`
    /// off conv1 that `cut_at("conv2")` must drop.
    fn small() -> Graph {
        let mut g = Graph::new("small");
        let x = g.input("input", Shape::chw(1, 7, 7)).unwrap();
        let c1 = g.add("conv1", Op::Conv2d(Conv2d::new(3, [3, 3])), &[x]).unwrap();
        let r = g.add("relu1", Op::Act(Activation::Relu), &[c1]).unwrap();
        let c2 = g.add("conv2", Op::Conv2d(Conv2d::new(4, [3, 3])), &[r]).unwrap();
        let f = g.add("flatten", Op::Flatten, &[c2]).unwrap();
        let side = g.add("side", Op::Flatten, &[c1]).unwrap();
        let cat = g.add("cat", Op::Concat, &[f, side]).unwrap();
        let fc = g.add("fc", Op::Dense(Dense { out_features: 5, bias: true }), &[cat]).unwrap();
        g.set_outputs(&[fc]);
        g
    }

    #[test]
    fn needs_grad_follows_the_lowest_trainable_layer() {
        let mut g = small();
        let name = |g: &Graph, v: &[bool]| g.nodes().filter(|n| v[n.index()]).map(|n| g.node(n).name.clone()).collect::<Vec<_>>();
        assert_eq!(name(&g, &g.needs_grad()), ["conv1", "relu1", "conv2", "flatten", "side", "cat", "fc"]);
        g.node_mut(g.find("conv1").unwrap()).trainable = false;
        assert_eq!(name(&g, &g.needs_grad()), ["conv2", "flatten", "cat", "fc"]);
        g.node_mut(g.find("conv2").unwrap()).trainable = false;
        assert_eq!(name(&g, &g.needs_grad()), ["fc"]);
        g.node_mut(g.find("fc").unwrap()).trainable = false;
        assert!(g.needs_grad().iter().all(|&b| !b));
    }

    #[test]
    fn cut_at_keeps_what_the_layer_needs() {
        let mut g = small();
        g.node_mut(g.find("conv1").unwrap()).trainable = false;
        let c = g.cut_at("conv2").unwrap();
        let names: Vec<_> = c.nodes().map(|n| c.node(n).name.clone()).collect();
        assert_eq!(names, ["input", "conv1", "relu1", "conv2"]);
        assert_eq!(c.name, "small_to_conv2");
        let out = c.outputs();
        assert_eq!(out.len(), 1);
        assert_eq!(c.node(out[0]).name, "conv2");
        assert_eq!(c.node(out[0]).shape, Shape::chw(4, 3, 3));
        assert!(!c.node(c.find("conv1").unwrap()).trainable);
        crate::ir::verify(&c).unwrap();
        // A branch point: cutting at `cat` keeps both branches, in operand order.
        let c = g.cut_at("cat").unwrap();
        let cat = c.find("cat").unwrap();
        let ops: Vec<_> = c.operands(cat).iter().map(|&o| c.node(o).name.clone()).collect();
        assert_eq!(ops, ["flatten", "side"]);
        assert_eq!(c.len(), 7);
        let e = g.cut_at("fc9").unwrap_err();
        assert_eq!(e.to_string(), "no layer named `fc9`");
    }
}
