//! Fusion: cut the graph into [`Group`]s by a table of pattern -> rewrite rules.
//!
//! The table ([`RULES`]) says which op may be appended to a chain, given the chain's anchor and
//! what the chain already holds. A node joins the chain of its operand only when that operand's
//! value has no other user and is not a model output (so nothing else needs it materialised).

use crate::ir::{Graph, NodeId, Op};
use crate::plan::{Fusion, Group, Mode};

/// Classes of ops the fusion table speaks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Convolution or dense layer (a GEMM whose tile store can run an epilogue).
    Gemm,
    /// Batch normalisation.
    Norm,
    /// Elementwise sum (residual connection).
    Add,
    /// Activation function.
    Act,
    /// Anything else: never fused.
    Other,
}

/// The class of an op.
pub fn class(op: &Op) -> Class {
    match op {
        Op::Conv2d(_) | Op::Dense(_) => Class::Gemm,
        Op::BatchNorm(_) => Class::Norm,
        Op::Add => Class::Add,
        Op::Act(_) => Class::Act,
        _ => Class::Other,
    }
}

/// One fusion rule: a chain anchored on `anchor` whose last member is of class `tail` may take
/// a following node of class `next`, in `mode` (`None` = both modes).
#[derive(Clone, Copy, Debug)]
pub struct Rule {
    /// Class of the chain's anchor.
    pub anchor: Class,
    /// Class of the chain's current last node.
    pub tail: Class,
    /// Class of the candidate node.
    pub next: Class,
    /// Mode the rule holds in, or both.
    pub mode: Option<Mode>,
    /// Why it is legal and what the kernel does.
    pub why: &'static str,
}

/// The fusion table.
pub const RULES: &[Rule] = &[
    Rule { anchor: Class::Gemm, tail: Class::Gemm, next: Class::Norm, mode: Some(Mode::Inference),
           why: "batch-norm with running statistics is an affine map per channel: folded into the weights and bias" },
    Rule { anchor: Class::Gemm, tail: Class::Gemm, next: Class::Add, mode: None,
           why: "residual add of an already computed value, in the tile store" },
    Rule { anchor: Class::Gemm, tail: Class::Norm, next: Class::Add, mode: Some(Mode::Inference),
           why: "residual add after the folded batch-norm" },
    Rule { anchor: Class::Gemm, tail: Class::Gemm, next: Class::Act, mode: None,
           why: "activation in the tile store; backward reads the mask from the group's output" },
    Rule { anchor: Class::Gemm, tail: Class::Norm, next: Class::Act, mode: Some(Mode::Inference),
           why: "activation after the folded batch-norm" },
    Rule { anchor: Class::Gemm, tail: Class::Add, next: Class::Act, mode: None,
           why: "activation after the residual add (ResNet's conv-bn-add-relu)" },
    Rule { anchor: Class::Norm, tail: Class::Norm, next: Class::Add, mode: Some(Mode::Training),
           why: "training batch-norm's normalise pass adds the residual as it stores" },
    Rule { anchor: Class::Norm, tail: Class::Norm, next: Class::Act, mode: Some(Mode::Training),
           why: "training batch-norm's normalise pass applies the activation as it stores" },
    Rule { anchor: Class::Norm, tail: Class::Add, next: Class::Act, mode: Some(Mode::Training),
           why: "bn-add-relu in one pass" },
    Rule { anchor: Class::Add, tail: Class::Add, next: Class::Act, mode: None,
           why: "standalone residual add followed by its activation" },
];

fn allowed(mode: Mode, anchor: Class, tail: Class, next: Class) -> bool {
    RULES
        .iter()
        .any(|r| r.anchor == anchor && r.tail == tail && r.next == next && r.mode.is_none_or(|m| m == mode))
}

/// Cut `g` into groups, in execution order.
///
/// Does: walks nodes in graph order; extends the chain that produced a node's operand when the
/// [`RULES`] allow it and that operand has a single user and is not a model output; otherwise
/// starts a new group. `Input` nodes form no group (their values are provided).
/// Does not: reorder nodes, duplicate computation, or fuse across a value with several users.
/// Before: `g` verifies. After: every non-input node is in exactly one group; each group is a
/// chain where node `i + 1` takes node `i` as an operand; every operand of a group's nodes
/// outside the group is the output of an earlier group or an input. With [`Fusion::None`]
/// every group has one node.
pub fn fuse(g: &Graph, mode: Mode, fusion: Fusion) -> Vec<Group> {
    let outputs = g.outputs();
    let mut groups: Vec<Group> = Vec::new();
    let mut group_of: Vec<Option<usize>> = vec![None; g.nodes().map(|n| n.index() + 1).max().unwrap_or(0)];
    for id in g.nodes() {
        let node = g.node(id);
        if node.op == Op::Input {
            continue;
        }
        let joined = (fusion == Fusion::Full)
            .then(|| candidate(g, id, mode, &outputs, &groups, &group_of))
            .flatten();
        match joined {
            Some(gi) => {
                groups[gi].nodes.push(id);
                group_of[id.index()] = Some(gi);
            }
            None => {
                groups.push(Group { nodes: vec![id] });
                group_of[id.index()] = Some(groups.len() - 1);
            }
        }
    }
    // A group runs when its last node's turn comes: move each group to that position.
    groups.sort_by_key(|gr| gr.output());
    groups
}

/// The group `id` may join, if any.
fn candidate(
    g: &Graph,
    id: NodeId,
    mode: Mode,
    outputs: &[NodeId],
    groups: &[Group],
    group_of: &[Option<usize>],
) -> Option<usize> {
    let next = class(&g.node(id).op);
    for operand in g.operands(id) {
        let Some(gi) = group_of[operand.index()] else { continue };
        let group = &groups[gi];
        if group.output() != operand || g.users(operand).len() != 1 || outputs.contains(&operand) {
            continue;
        }
        // Add takes exactly one operand from the chain; the others must be earlier values.
        if next == Class::Add && g.operands(id).iter().filter(|o| group.nodes.contains(o)).count() != 1 {
            continue;
        }
        let anchor = class(&g.node(group.anchor()).op);
        let tail = class(&g.node(operand).op);
        if allowed(mode, anchor, tail, next) {
            return Some(gi);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::*;

    /// conv-bn-relu, conv-bn, add(shortcut), relu: a ResNet basic block.
    fn basic_block() -> Graph {
        let mut g = Graph::new("basic");
        let x = g.input("input", Shape::chw(8, 6, 6)).unwrap();
        let conv = |n| Op::Conv2d(Conv2d::new(n, [3, 3]).pad(Padding::uniform(1)).bias(false));
        let c1 = g.add("conv1", conv(8), &[x]).unwrap();
        let b1 = g.add("bn1", Op::BatchNorm(BatchNorm::default()), &[c1]).unwrap();
        let r1 = g.add("relu1", Op::Act(Activation::Relu), &[b1]).unwrap();
        let c2 = g.add("conv2", conv(8), &[r1]).unwrap();
        let b2 = g.add("bn2", Op::BatchNorm(BatchNorm::default()), &[c2]).unwrap();
        let s = g.add("add", Op::Add, &[b2, x]).unwrap();
        g.add("relu2", Op::Act(Activation::Relu), &[s]).unwrap();
        g
    }

    fn names(g: &Graph, groups: &[Group]) -> Vec<Vec<String>> {
        groups.iter().map(|gr| gr.nodes.iter().map(|&n| g.node(n).name.clone()).collect()).collect()
    }

    #[test]
    fn inference_folds_bn_and_fuses_residual() {
        let g = basic_block();
        let groups = fuse(&g, Mode::Inference, Fusion::Full);
        assert_eq!(names(&g, &groups), vec![vec!["conv1", "bn1", "relu1"], vec!["conv2", "bn2", "add", "relu2"]]);
    }

    #[test]
    fn training_keeps_batch_statistics_separate() {
        let g = basic_block();
        let groups = fuse(&g, Mode::Training, Fusion::Full);
        assert_eq!(
            names(&g, &groups),
            vec![vec!["conv1"], vec!["bn1", "relu1"], vec!["conv2"], vec!["bn2", "add", "relu2"]]
        );
    }

    #[test]
    fn naive_is_one_node_per_group_and_fanout_blocks_fusion() {
        let g = basic_block();
        assert_eq!(fuse(&g, Mode::Inference, Fusion::None).len(), 7);
        // conv whose output is used twice cannot absorb its relu
        let mut g = Graph::new("fan");
        let x = g.input("input", Shape::chw(2, 4, 4)).unwrap();
        let c = g.add("c", Op::Conv2d(Conv2d::new(2, [1, 1])), &[x]).unwrap();
        let r = g.add("r", Op::Act(Activation::Relu), &[c]).unwrap();
        g.add("s", Op::Add, &[r, c]).unwrap();
        let groups = fuse(&g, Mode::Inference, Fusion::Full);
        assert_eq!(names(&g, &groups), vec![vec!["c"], vec!["r"], vec!["s"]]);
    }
}
