//! The execution plan: what the passes produce and the runtime executes.
//!
//! A [`Plan`] is the graph cut into [`Group`]s — chains of nodes one kernel computes
//! (a convolution with its bias, folded batch-norm, residual add and activation, say) — in an
//! order where every group's operands are ready, plus where each group writes its result
//! ([`Placement`]: its own buffer, or a channel slice of a concatenation's buffer), and which
//! arena offset every buffer and gradient uses ([`MemoryPlan`]).

use crate::ir::{Graph, NodeId};
pub use crate::passes::memplan::MemoryPlan;
use std::fmt;

/// What the plan is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Forward only, batch-norm with running statistics (foldable into weights), dropout off.
    Inference,
    /// Forward and backward, batch-norm with batch statistics, dropout on.
    Training,
}

/// How aggressively nodes are grouped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fusion {
    /// Every node is its own group and every value its own buffer ("naive" kernels).
    None,
    /// The fusion table of `passes::fuse` and in-place concatenation.
    Full,
}

/// A chain of nodes computed by one kernel: `nodes[0]` is the anchor (the op that does the
/// work); each later node takes the previous one's value as an operand and is applied in the
/// anchor's epilogue. Only the last node's value is materialised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    /// The chain, anchor first.
    pub nodes: Vec<NodeId>,
}

impl Group {
    /// The anchor.
    pub fn anchor(&self) -> NodeId {
        self.nodes[0]
    }
    /// The node whose value the group produces.
    pub fn output(&self) -> NodeId {
        *self.nodes.last().expect("groups are non-empty")
    }
}

/// Where a group's value lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Its own buffer.
    Own,
    /// Channels `offset..offset + C` of the buffer of the concatenation node `concat`
    /// (concatenation written in place; the concat node itself then runs no kernel).
    Slice {
        /// The concatenation node.
        concat: NodeId,
        /// First channel of the slice.
        offset: usize,
    },
}

/// The compiled schedule of a graph.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The graph the plan refers to.
    pub graph: Graph,
    /// Inference or training.
    pub mode: Mode,
    /// Fusion level used.
    pub fusion: Fusion,
    /// Groups in execution order.
    pub groups: Vec<Group>,
    /// Placement of each node's value, indexed by `NodeId::index()`; values computed inside a
    /// group (not its output) are `None`: they never exist in memory.
    pub placement: Vec<Option<Placement>>,
    /// Concatenations computed in place (no kernel runs for them).
    pub inplace_concats: Vec<NodeId>,
    /// Indexed by group: for a training batch norm, the earlier convolution group that
    /// computes its batch statistics as it stores its output (`passes::bn_stats`).
    pub stats_from: Vec<Option<usize>>,
    /// Indexed by group: the later pooling group this group also computes, pooling each
    /// sample's planes right after storing them (`passes::pool_fuse`; the pooling group's own
    /// forward then does nothing).
    pub pool_into: Vec<Option<usize>>,
    /// Indexed by node: whether its value is stored as transposed planes (each channel's
    /// `H x W` plane stored `W x H`; `passes::layout`). Gradients share their value's layout.
    pub transposed: Vec<bool>,
    /// Where values and (training) gradients live: offsets in one arena, shared by those never
    /// live at the same time (`passes::memplan`).
    pub memory: MemoryPlan,
}

impl Plan {
    /// The group that produces `node`'s value, if it is materialised.
    pub fn group_of(&self, node: NodeId) -> Option<&Group> {
        self.groups.iter().find(|g| g.output() == node)
    }

    /// Whether `node`'s value (and its gradient) is stored as transposed planes
    /// ([`Plan::transposed`]).
    pub fn is_transposed(&self, node: NodeId) -> bool {
        self.transposed.get(node.index()).copied().unwrap_or(false)
    }
}

impl fmt::Display for Plan {
    /// One line per group: `group %3 [conv1 -> bn1 -> relu1] -> slice of %9 @ 64`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "plan {} ({:?}, fusion {:?}) {{", self.graph.name, self.mode, self.fusion)?;
        for (i, g) in self.groups.iter().enumerate() {
            let names: Vec<&str> = g.nodes.iter().map(|&n| self.graph.node(n).name.as_str()).collect();
            write!(f, "  {} [{}]", g.output(), names.join(" -> "))?;
            if let Some(j) = self.stats_from.get(i).copied().flatten() {
                write!(f, " (statistics from {})", self.groups[j].output())?;
            }
            if let Some(j) = self.pool_into.get(i).copied().flatten() {
                write!(f, " (pools into {})", self.groups[j].output())?;
            }
            if self.is_transposed(g.output()) {
                write!(f, " (transposed planes)")?;
            }
            match self.placement[g.output().index()] {
                Some(Placement::Slice { concat, offset }) => writeln!(f, " -> slice of {concat} @ {offset}")?,
                _ => writeln!(f)?,
            }
        }
        for c in &self.inplace_concats {
            writeln!(f, "  {c} {} in place", self.graph.node(*c).name)?;
        }
        writeln!(f, "}}")
    }
}
