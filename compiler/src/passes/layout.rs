//! Layout assignment: which values live as transposed planes.
//!
//! Every kernel reads and writes NCHW: per sample, per channel, an `H x W` plane stored row
//! by row, and vectorises along the rows. One layer kind pays for that layout: a `1 x 3`
//! convolution on the one-dimensional Winograd algorithm (`lower::winograd1d`), whose
//! tiles run along each row. Its input transform has to split every row into phases (a
//! stride-4 gather) and its output transform interleaves the tiles back into rows, where the
//! `3 x 1` convolution of the same size combines whole rows, read in place. Measured on the
//! CIFAR net's `1 x 3` shape (48 -> 64 channels, 32 x 32, batch 32, forward + backward, two
//! threads), the `1 x 3` layer took 15.9-16.7 ms and the `3 x 1` layer 13.0-13.2 ms.
//!
//! A `1 x 3` convolution on transposed planes (each plane stored `W x H`, column by column)
//! is a `3 x 1` convolution: the same weights (`Conv2d::transposed`), an output that is the
//! transpose of the `1 x 3` output. So this pass stores such a layer's input and output as
//! transposed planes. The reorders cost no pass of their own: they ride in the training
//! batch norms on either side, whose passes are per-channel maps over the whole tensor
//! anyway. The batch norm before the convolution writes its output transposed (and reads
//! that output's gradient transposed in backward); the batch norm after it reads its input
//! transposed and writes ordinary planes. Batch statistics and the convolution's bias and
//! per-plane statistics do not depend on the order of a plane's values.
//!
//! A value is transposed only where every reader and writer can handle it. The
//! convolution's input must be the output of a training batch-norm group whose chain holds
//! only activations (element-wise: layout-blind), is in no other reader's hands, lives in a
//! buffer of its own (not a concatenation's slice) and is not pooled as it is stored. The
//! convolution's output must likewise have one reader, a training batch-norm group, and a
//! buffer of its own. Inference plans, where the batch norm folds into the convolution and
//! no pass is left to carry a reorder, and the naive plans keep every value NCHW.

use crate::algo::{winograd_1d_axis, Axis};
use crate::ir::{Graph, NodeId, Op};
use crate::plan::{Fusion, Group, Mode, Placement};

/// For every node (by [`NodeId::index`]), whether its value is stored as transposed planes.
///
/// Does: in a training plan with [`Fusion::Full`], marks the input and the output of every
/// group made of one `1 x 3` convolution that runs on the one-dimensional Winograd
/// algorithm ([`winograd_1d_axis`] is [`Axis::Cols`]) when both sit between
/// training batch-norm groups as the module header describes; the runtime then compiles
/// that convolution as its [`transposed`](crate::ir::Conv2d::transposed) `3 x 1`.
/// Does not: transpose any other value, insert a reorder step (the batch norms carry the
/// reorders), or change groups, placements or the schedule.
/// Before: `groups` from `passes::fuse` in execution order, `placement` from
/// `passes::concat_inplace`, `pool_into` from `passes::pool_fuse`. After: every transposed
/// value is either the output of a batch-norm group (its input is not transposed) whose only
/// reader is a lone convolution group, or the output of that convolution (its input is
/// transposed) whose only reader is a batch-norm group anchored on it; both have `Own`
/// placements, and no group pools into a transposed value.
pub fn layout(g: &Graph, mode: Mode, fusion: Fusion, groups: &[Group], placement: &[Option<Placement>], pool_into: &[Option<usize>]) -> Vec<bool> {
    let mut t = vec![false; g.len()];
    if mode != Mode::Training || fusion != Fusion::Full {
        return t;
    }
    let outputs = g.outputs();
    // The one reader of `v` (every node reading it), if it has exactly one and `v` is not a
    // graph output.
    let only_reader = |v: NodeId| match g.users(v)[..] {
        [n] if !outputs.contains(&v) => Some(n),
        _ => None,
    };
    let group_of = |v: NodeId| groups.iter().position(|gr| gr.output() == v);
    let own = |v: NodeId| matches!(placement.get(v.index()), Some(Some(Placement::Own)));
    // A training batch-norm group whose chain is activations only, not pooling as it stores.
    let bn_group = |i: usize| {
        let gr = &groups[i];
        matches!(g.node(gr.anchor()).op, Op::BatchNorm(_))
            && gr.nodes[1..].iter().all(|&n| matches!(g.node(n).op, Op::Act(_)))
            && pool_into.get(i).copied().flatten().is_none()
    };
    for gr in groups {
        let [conv] = gr.nodes[..] else { continue };
        let Op::Conv2d(c) = g.node(conv).op else { continue };
        let Some(&x) = g.operands(conv).first() else { continue };
        if winograd_1d_axis(&c, g.node(x).shape.as_chw()) != Some(Axis::Cols) {
            continue;
        }
        // The input: a batch-norm group's output read by this convolution alone.
        let input_ok = only_reader(x) == Some(conv) && own(x) && group_of(x).is_some_and(bn_group);
        // The output: read by one batch norm, anchoring its group.
        let output_ok = own(conv)
            && only_reader(conv).is_some_and(|r| groups.iter().position(|q| q.anchor() == r).is_some_and(bn_group));
        if input_ok && output_ok {
            t[x.index()] = true;
            t[conv.index()] = true;
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::*;
    use crate::passes::{concat_inplace::concat_inplace, fuse::fuse, pool_fuse::pool_fuse};

    fn cbr(g: &mut Graph, name: &str, c: usize, k: Hw, x: NodeId) -> NodeId {
        let pad = Padding::hw(k[0] / 2, k[1] / 2);
        let v = g.add(name, Op::Conv2d(Conv2d { kernel: k, ..Conv2d::new(c, [1, 1]) }.pad(pad).bias(false)), &[x]).unwrap();
        let v = g.add(format!("{name}_bn"), Op::BatchNorm(BatchNorm::default()), &[v]).unwrap();
        g.add(format!("{name}_relu"), Op::Act(Activation::Relu), &[v]).unwrap()
    }

    fn transposed(g: &Graph, mode: Mode, fusion: Fusion) -> Vec<String> {
        let groups = fuse(g, mode, fusion);
        let (placement, _) = concat_inplace(g, &groups, fusion == Fusion::Full);
        let pool_into = pool_fuse(g, mode, fusion, &groups, &placement);
        let t = layout(g, mode, fusion, &groups, &placement, &pool_into);
        g.nodes().filter(|n| t[n.index()]).map(|n| g.node(n).name.clone()).collect()
    }

    #[test]
    fn a_wide_1x3_between_batch_norms_runs_transposed() {
        let mut g = Graph::new("t");
        let x = g.input("input", Shape::chw(8, 6, 10)).unwrap();
        let a = cbr(&mut g, "a", 48, [1, 1], x);
        let b = cbr(&mut g, "b", 48, [1, 3], a); // transposed in and out
        let c = cbr(&mut g, "c", 48, [3, 1], b); // a 3x1: stays
        let d = cbr(&mut g, "d", 16, [1, 3], c); // 16 output channels: no Winograd
        let e = cbr(&mut g, "e", 48, [1, 3], d); // 16 input channels: no Winograd
        let f = cbr(&mut g, "f", 48, [1, 3], e); // input read twice (f and the concat)
        let cat = g.add("cat", Op::Concat, &[e, f]).unwrap();
        let h = cbr(&mut g, "h", 48, [1, 3], cat); // input is a concatenation, not a batch norm
        let i = g.add("i", Op::Conv2d(Conv2d::new(48, [1, 3]).pad(Padding::hw(0, 1))), &[h]).unwrap();
        let i = g.add("i_relu", Op::Act(Activation::Relu), &[i]).unwrap(); // output read by a relu
        let gap = g.add("gap", Op::GlobalAvgPool, &[i]).unwrap();
        g.add("fc", Op::Dense(Dense { out_features: 3, bias: true }), &[gap]).unwrap();
        assert_eq!(transposed(&g, Mode::Training, Fusion::Full), ["a_relu", "b"]);
        assert!(transposed(&g, Mode::Inference, Fusion::Full).is_empty());
        assert!(transposed(&g, Mode::Training, Fusion::None).is_empty());
    }
}
