//! In-place concatenation: each branch of an inception module writes straight into its channel
//! slice of the shared output, so the concatenation costs no kernel and no copy.

use crate::ir::{Graph, NodeId, Op};
use crate::plan::{Group, Placement};

/// Decide where every value lives.
///
/// Does: for each `Concat` whose operands are all distinct group outputs used by nothing else
/// and not model outputs, places operand `i` at channel offset `sum(C_0..C_i)` of the concat's
/// buffer and records the concat as in place. A concat may itself be a slice of an outer
/// concat (DenseNet-style nesting); offsets compose at run time.
/// Does not: move values that have other users (they would need a copy anyway), or handle
/// flat-vector concatenation (left to a kernel).
/// Before: `groups` come from `passes::fuse`. After: `placement[n]` is `Some` exactly for
/// group outputs and inputs; every `Slice` names an in-place concat.
pub fn concat_inplace(g: &Graph, groups: &[Group], enable: bool) -> (Vec<Option<Placement>>, Vec<NodeId>) {
    let size = g.nodes().map(|n| n.index() + 1).max().unwrap_or(0);
    let mut placement = vec![None; size];
    for id in g.inputs() {
        placement[id.index()] = Some(Placement::Own);
    }
    for gr in groups {
        placement[gr.output().index()] = Some(Placement::Own);
    }
    let mut inplace = Vec::new();
    if !enable {
        return (placement, inplace);
    }
    let outputs = g.outputs();
    let group_outputs: Vec<NodeId> = groups.iter().map(Group::output).collect();
    for id in g.nodes() {
        if g.node(id).op != Op::Concat {
            continue;
        }
        if matches!(g.node(id).shape, crate::ir::Shape::Flat { .. }) {
            continue;
        }
        let ops = g.operands(id);
        let mut distinct = ops.clone();
        distinct.sort_unstable();
        distinct.dedup();
        let ok = distinct.len() == ops.len()
            && ops.iter().all(|o| group_outputs.contains(o) && g.users(*o).len() == 1 && !outputs.contains(o));
        if !ok {
            continue;
        }
        let mut offset = 0;
        for o in ops {
            placement[o.index()] = Some(Placement::Slice { concat: id, offset });
            offset += g.node(o).shape.channels();
        }
        inplace.push(id);
    }
    (placement, inplace)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::*;
    use crate::passes::fuse::fuse;
    use crate::plan::{Fusion, Mode};

    #[test]
    fn branches_write_into_slices() {
        let mut g = Graph::new("inc");
        let x = g.input("input", Shape::chw(4, 5, 5)).unwrap();
        let a = g.add("a", Op::Conv2d(Conv2d::new(3, [1, 1])), &[x]).unwrap();
        let b = g.add("b", Op::Conv2d(Conv2d::new(2, [3, 3]).pad(Padding::Same)), &[x]).unwrap();
        let br = g.add("br", Op::Act(Activation::Relu), &[b]).unwrap();
        let mut p = Pool2d::new(PoolKind::Max, 3, 1);
        p.padding = Padding::Same;
        let c = g.add("pool", Op::Pool(p), &[x]).unwrap();
        let cat = g.add("cat", Op::Concat, &[a, br, c]).unwrap();
        let groups = fuse(&g, Mode::Inference, Fusion::Full);
        let (pl, inplace) = concat_inplace(&g, &groups, true);
        assert_eq!(inplace, vec![cat]);
        assert_eq!(pl[a.index()], Some(Placement::Slice { concat: cat, offset: 0 }));
        assert_eq!(pl[br.index()], Some(Placement::Slice { concat: cat, offset: 3 }));
        assert_eq!(pl[c.index()], Some(Placement::Slice { concat: cat, offset: 5 }));
        assert_eq!(pl[b.index()], None, "fused into br's group, never materialised");
        // the input is used by several branches: not a slice
        assert_eq!(pl[x.index()], Some(Placement::Own));
        let (_, none) = concat_inplace(&g, &groups, false);
        assert!(none.is_empty());
    }
}
