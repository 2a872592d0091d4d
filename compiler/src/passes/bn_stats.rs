//! Batch-norm statistics fused into the producing convolution's store.
//!
//! A training batch norm needs its input's per-channel batch statistics before it can
//! normalise a single value, so it cannot join its convolution's chain (`passes::fuse` keeps
//! it a group of its own). Its first pass, though, is a reduction over the values the
//! convolution has just stored: the convolution can compute each output plane's share of the
//! statistics right after it stores a sample, while that sample is still in cache, and the
//! batch norm then only combines the shares (per channel, in sample order: the same numbers
//! as reading the planes itself) before its normalise pass. That saves one read of the
//! tensor from memory per training batch norm.

use crate::ir::{Graph, Op};
use crate::plan::{Fusion, Group, Mode};

/// For each group, the group computing its batch statistics, if fused.
///
/// Does: in a training plan with [`Fusion::Full`], maps the index of every group anchored on a
/// batch norm whose operand is the output of a group made of one convolution alone (no chain:
/// the stored values are the convolution's output) to that group's index.
/// Does not: fuse after a dense layer, after a convolution whose chain does more work than the
/// kernel stores (a residual add or activation there), in inference plans (the batch norm
/// folds into the weights) or without fusion (the naive baseline).
/// Before: `groups` come from `passes::fuse`, in execution order. After: every `Some(j)` at
/// index `i` has `j < i`, group `j` is a single `Conv2d` node and group `i`'s anchor is a
/// `BatchNorm` reading group `j`'s output; no group feeds two batch norms' statistics (its
/// output has one batch-norm reader at most, as a convolution feeding two would need its
/// planes reduced once anyway: the first batch norm takes it).
pub fn bn_stats(g: &Graph, mode: Mode, fusion: Fusion, groups: &[Group]) -> Vec<Option<usize>> {
    let mut from = vec![None; groups.len()];
    if mode != Mode::Training || fusion != Fusion::Full {
        return from;
    }
    let mut taken = vec![false; groups.len()];
    for (i, gr) in groups.iter().enumerate() {
        if !matches!(g.node(gr.anchor()).op, Op::BatchNorm(_)) {
            continue;
        }
        let Some(&x) = g.operands(gr.anchor()).first() else { continue };
        let Some(j) = groups[..i].iter().position(|p| p.output() == x) else { continue };
        if groups[j].nodes.len() == 1 && matches!(g.node(x).op, Op::Conv2d(_)) && !taken[j] {
            taken[j] = true;
            from[i] = Some(j);
        }
    }
    from
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::*;
    use crate::passes::fuse::fuse;

    /// conv-bn-relu, then conv-relu-bn (a chain the kernel ends with an activation), a dense
    /// layer and its batch norm.
    fn graph() -> Graph {
        let mut g = Graph::new("stats");
        let x = g.input("input", Shape::chw(3, 6, 6)).unwrap();
        let conv = |n| Op::Conv2d(Conv2d::new(n, [3, 3]).pad(Padding::uniform(1)).bias(false));
        let c1 = g.add("conv1", conv(4), &[x]).unwrap();
        let b1 = g.add("bn1", Op::BatchNorm(BatchNorm::default()), &[c1]).unwrap();
        let r1 = g.add("relu1", Op::Act(Activation::Relu), &[b1]).unwrap();
        let c2 = g.add("conv2", conv(4), &[r1]).unwrap();
        let r2 = g.add("relu2", Op::Act(Activation::Relu), &[c2]).unwrap();
        let b2 = g.add("bn2", Op::BatchNorm(BatchNorm::default()), &[r2]).unwrap();
        let f = g.add("flat", Op::Flatten, &[b2]).unwrap();
        let d = g.add("fc", Op::Dense(Dense { out_features: 5, bias: true }), &[f]).unwrap();
        g.add("bn3", Op::BatchNorm(BatchNorm::default()), &[d]).unwrap();
        g
    }

    #[test]
    fn only_a_lone_convolution_feeds_statistics() {
        let g = graph();
        let groups = fuse(&g, Mode::Training, Fusion::Full);
        let from = bn_stats(&g, Mode::Training, Fusion::Full, &groups);
        let name = |i: usize| g.node(groups[i].anchor()).name.clone();
        let pairs: Vec<(String, String)> = from.iter().enumerate().filter_map(|(i, j)| j.map(|j| (name(i), name(j)))).collect();
        assert_eq!(pairs, vec![("bn1".to_string(), "conv1".to_string())]);
        assert!(bn_stats(&g, Mode::Inference, Fusion::Full, &fuse(&g, Mode::Inference, Fusion::Full)).iter().all(Option::is_none));
        let naive = fuse(&g, Mode::Training, Fusion::None);
        assert!(bn_stats(&g, Mode::Training, Fusion::None, &naive).iter().all(Option::is_none));
    }
}
