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
use petgraph::visit::EdgeRef;
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
            self.g.node_indices().last().map(NodeId).into_iter().collect()
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
}
