//! The IR verifier. It checks, for every node:
//!
//! 1. **Operand count**: an `Input` has none; fixed-arity ops have exactly their arity;
//!    `Concat` and `Add` have at least two.
//! 2. **Operand positions**: incoming edge weights are exactly `0..n`, each once.
//! 3. **Topological order**: every operand was inserted before its user (so insertion order
//!    is an execution order and the graph is acyclic).
//! 4. **Shapes**: the node's shape equals [`infer`] applied to its operands' shapes.
//! 5. **Resolved attributes**: convolution and pooling padding is [`Padding::Explicit`], and
//!    re-inference does not change the op.
//! 6. **Names**: layer names are unique and non-empty.
//! 7. **Outputs**: there is at least one output and every output is a node of the graph.
//!
//! Passes call [`verify`] after they run in debug builds (see `pipeline.rs`).

use super::{infer, Graph, Op, Padding};
use crate::error::{Error, Result};
use std::collections::HashSet;

/// Check every invariant listed in the module header; the first violation is returned.
pub fn verify(g: &Graph) -> Result<()> {
    let mut names = HashSet::new();
    let bad = |id: super::NodeId, message: String| Error::Verify {
        node: id.to_string(),
        layer: g.node(id).name.clone(),
        message,
    };
    for id in g.nodes() {
        let n = g.node(id);
        if n.name.is_empty() || !names.insert(n.name.as_str()) {
            return Err(bad(id, "empty or duplicate layer name".into()));
        }
        let operands = g.operands(id);
        let mut pos = g.operand_positions(id);
        pos.sort_unstable();
        if pos.iter().enumerate().any(|(i, &p)| p as usize != i) {
            return Err(bad(id, format!("operand positions {pos:?} are not 0..{}", pos.len())));
        }
        if let Some(o) = operands.iter().find(|o| o.index() >= id.index()) {
            return Err(bad(id, format!("operand {o} does not precede its user")));
        }
        if n.op == Op::Input {
            if !operands.is_empty() {
                return Err(bad(id, "input node with operands".into()));
            }
            continue;
        }
        let shapes = g.operand_shapes(id);
        let (op, shape) = infer(&n.op, &shapes).map_err(|e| bad(id, e.message))?;
        if shape != n.shape {
            return Err(bad(id, format!("stored shape {} but operands give {shape}", n.shape)));
        }
        if op != n.op {
            return Err(bad(id, format!("op `{}` is not in resolved form (`{op}`)", n.op)));
        }
        let unresolved = |p: Padding| !matches!(p, Padding::Explicit { .. });
        match n.op {
            Op::Conv2d(c) if unresolved(c.padding) => return Err(bad(id, "unresolved padding".into())),
            Op::Pool(p) if unresolved(p.padding) => return Err(bad(id, "unresolved padding".into())),
            _ => {}
        }
    }
    let outs = g.outputs();
    if outs.is_empty() {
        return Err(Error::Verify { node: "-".into(), layer: g.name.clone(), message: "graph has no outputs".into() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::*;

    #[test]
    fn catches_a_corrupted_shape() {
        let mut g = Graph::new("t");
        let x = g.input("x", Shape::chw(3, 8, 8)).unwrap();
        let c = g.add("c", Op::Conv2d(Conv2d::new(4, [3, 3])), &[x]).unwrap();
        verify(&g).unwrap();
        g.node_mut(c).shape = Shape::chw(4, 8, 8);
        let e = verify(&g).unwrap_err().to_string();
        assert_eq!(e, "IR verifier: node %1 `c`: stored shape 4x8x8 but operands give 4x6x6");
        g.node_mut(c).shape = Shape::chw(4, 6, 6);
        g.node_mut(c).op = Op::Conv2d(Conv2d::new(4, [3, 3]).pad(Padding::Valid));
        assert!(verify(&g).unwrap_err().to_string().contains("not in resolved form"));
    }
}
