//! Pooling fused into its producer's store.
//!
//! A pooling layer reads a whole tensor that the groups before it have just written, one
//! sample at a time. Max and average pooling work plane by plane, so each group writing the
//! pooled value (the value's own group, or every branch writing a channel slice of an
//! in-place concatenation) can pool its planes of a sample right after storing them, while
//! they are still in cache: the pooling layer's own step then does nothing in forward, and
//! the tensor is not read back from memory for it. Its backward is unchanged (the winners
//! are recorded by whoever pools).
//!
//! The pass only decides where it is legal; the runtime still checks that each producer's
//! kernel stores the value itself (a convolution whose whole chain runs in its tile store, or
//! a training batch norm's normalise pass) and otherwise leaves the pooling to its own step,
//! which the memory plan allows either way.

use crate::ir::{Graph, Op};
use crate::passes::memplan;
use crate::plan::{Fusion, Group, Mode, Placement};

/// For each group, the later pooling group it also computes, if fused.
///
/// Does: with [`Fusion::Full`], for every group made of one pooling node (max or average)
/// whose operand is a whole buffer (its own group's output, or an in-place concatenation),
/// maps every group writing that buffer ([`memplan::writers`]) to the pooling group's index,
/// when each of them is a convolution (any mode) or a training batch norm and none already
/// pools another value.
/// Does not: fuse global pooling, pool a value read through a channel slice, fuse after a
/// dense layer, an activation, an addition or an inference batch norm left unfolded (their
/// steps run whole-tensor passes), or change the schedule (the pooling group keeps its
/// place; its output now lives from its first writer's step, see `passes::memplan`).
/// Before: `groups` from `passes::fuse` in execution order, `placement` from
/// `passes::concat_inplace`. After: every `Some(i)` at index `j` has `j < i`, group `i` is a
/// single `Pool` node, and group `j` writes (part of) its operand's buffer; either every
/// writer of that buffer maps to `i` or none does; each group maps to one pooling group at
/// most.
pub fn pool_fuse(g: &Graph, mode: Mode, fusion: Fusion, groups: &[Group], placement: &[Option<Placement>]) -> Vec<Option<usize>> {
    let mut into = vec![None; groups.len()];
    if fusion != Fusion::Full {
        return into;
    }
    let writers = memplan::writers(groups, placement);
    for (i, gr) in groups.iter().enumerate() {
        if gr.nodes.len() != 1 || !matches!(g.node(gr.anchor()).op, Op::Pool(_)) {
            continue;
        }
        let Some(&x) = g.operands(gr.anchor()).first() else { continue };
        // A whole buffer: `x` is its own root (not a slice of an outer concatenation).
        if memplan::root(placement, x) != Some(x) {
            continue;
        }
        let ws = &writers[x.index()];
        let can = |w: usize| {
            w < i
                && into[w].is_none()
                && match g.node(groups[w].anchor()).op {
                    Op::Conv2d(_) => true,
                    Op::BatchNorm(_) => mode == Mode::Training,
                    _ => false,
                }
        };
        if !ws.is_empty() && ws.iter().all(|&w| can(w)) {
            for &w in ws {
                into[w] = Some(i);
            }
        }
    }
    into
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::*;
    use crate::passes::{concat_inplace::concat_inplace, fuse::fuse};

    fn max(k: usize, s: usize) -> Op {
        Op::Pool(Pool2d::new(PoolKind::Max, k, s))
    }

    /// conv-bn-relu -> pool; conv-relu -> pool; an inception-like concat of two conv-bn-relu
    /// branches -> pool; a dense layer's output is not pooled (flat).
    fn graph() -> Graph {
        let mut g = Graph::new("pools");
        let x = g.input("input", Shape::chw(3, 8, 8)).unwrap();
        let conv = |n| Op::Conv2d(Conv2d::new(n, [3, 3]).pad(Padding::uniform(1)).bias(false));
        let c1 = g.add("conv1", conv(4), &[x]).unwrap();
        let b1 = g.add("bn1", Op::BatchNorm(BatchNorm::default()), &[c1]).unwrap();
        let r1 = g.add("relu1", Op::Act(Activation::Relu), &[b1]).unwrap();
        let p1 = g.add("pool1", max(2, 2), &[r1]).unwrap();
        let c2 = g.add("conv2", conv(4), &[p1]).unwrap();
        let r2 = g.add("relu2", Op::Act(Activation::Relu), &[c2]).unwrap();
        let p2 = g.add("pool2", max(2, 1), &[r2]).unwrap();
        let branch = |g: &mut Graph, n: &str| {
            let c = g.add(format!("{n}c"), conv(3), &[p2]).unwrap();
            let b = g.add(format!("{n}b"), Op::BatchNorm(BatchNorm::default()), &[c]).unwrap();
            g.add(format!("{n}r"), Op::Act(Activation::Relu), &[b]).unwrap()
        };
        let a = branch(&mut g, "a");
        let b = branch(&mut g, "b");
        let cat = g.add("cat", Op::Concat, &[a, b]).unwrap();
        g.add("pool3", max(3, 1), &[cat]).unwrap();
        g
    }

    fn pairs(g: &Graph, mode: Mode) -> Vec<(String, String)> {
        let groups = fuse(g, mode, Fusion::Full);
        let (placement, _) = concat_inplace(g, &groups, true);
        let into = pool_fuse(g, mode, Fusion::Full, &groups, &placement);
        let name = |i: usize| g.node(groups[i].anchor()).name.clone();
        into.iter().enumerate().filter_map(|(j, i)| i.map(|i| (name(j), name(i)))).collect()
    }

    #[test]
    fn every_writer_of_a_whole_buffer_pools_it() {
        let g = graph();
        let p = |a: &str, b: &str| (a.to_string(), b.to_string());
        // Training: batch norms write pool1's and pool3's inputs (pool3's in two slices),
        // conv2's chain (conv-relu) writes pool2's.
        assert_eq!(pairs(&g, Mode::Training), vec![p("bn1", "pool1"), p("conv2", "pool2"), p("ab", "pool3"), p("bb", "pool3")]);
        // Inference: the batch norms fold into the convolutions.
        assert_eq!(pairs(&g, Mode::Inference), vec![p("conv1", "pool1"), p("conv2", "pool2"), p("ac", "pool3"), p("bc", "pool3")]);
        let groups = fuse(&g, Mode::Training, Fusion::None);
        let (placement, _) = concat_inplace(&g, &groups, false);
        assert!(pool_fuse(&g, Mode::Training, Fusion::None, &groups, &placement).iter().all(Option::is_none));
    }

    #[test]
    fn a_pool_after_an_activation_step_or_a_second_pool_is_not_fused() {
        let mut g = Graph::new("unfused");
        let x = g.input("input", Shape::chw(2, 6, 6)).unwrap();
        // A standalone activation (its operand, the input, has no producing group).
        let r = g.add("relu", Op::Act(Activation::Relu), &[x]).unwrap();
        g.add("p1", max(2, 2), &[r]).unwrap();
        let c = g.add("conv", Op::Conv2d(Conv2d::new(2, [1, 1])), &[x]).unwrap();
        // Two pools of one value: the first takes the convolution.
        let q1 = g.add("q1", max(2, 2), &[c]).unwrap();
        let q2 = g.add("q2", max(3, 1), &[c]).unwrap();
        let _ = (q1, q2);
        let p = |a: &str, b: &str| (a.to_string(), b.to_string());
        assert_eq!(pairs(&g, Mode::Training), vec![p("conv", "q1")]);
    }
}
