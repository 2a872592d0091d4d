//! Graphviz DOT output of a graph: one box per layer (name, op, output shape), block instances
//! as nested clusters, edges labelled with the operand position where it matters.

use super::{Graph, Op};
use std::fmt::Write;

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The graph in DOT syntax (render with `dot -Tsvg`).
pub fn to_dot(g: &Graph) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "digraph \"{}\" {{", escape(&g.name));
    out.push_str("  rankdir=TB;\n  node [shape=box, style=\"rounded,filled\", fillcolor=\"#f4f4f4\", fontname=\"Helvetica\", fontsize=10];\n");
    // Nodes, nested in clusters following their scope path.
    let mut open: Vec<String> = Vec::new();
    let mut cluster = 0usize;
    for id in g.nodes() {
        let n = g.node(id);
        let common = open.iter().zip(&n.scope).take_while(|(a, b)| a == b).count();
        while open.len() > common {
            open.pop();
            let _ = writeln!(out, "{}}}", "  ".repeat(open.len() + 1));
        }
        for s in &n.scope[common..] {
            let ind = "  ".repeat(open.len() + 1);
            let _ = writeln!(out, "{ind}subgraph cluster_{cluster} {{");
            let _ = writeln!(out, "{ind}  label=\"{}\"; style=dashed; fontname=\"Helvetica\";", escape(s));
            cluster += 1;
            open.push(s.clone());
        }
        let color = match n.op {
            Op::Input => "#d0e8ff",
            Op::Conv2d(_) | Op::Dense(_) => "#ffe0b0",
            Op::Concat | Op::Add | Op::ChannelMul => "#d8f0d0",
            _ => "#f4f4f4",
        };
        let _ = writeln!(
            out,
            "{}n{} [label=\"{}\\n{}\\n{}\", fillcolor=\"{color}\"];",
            "  ".repeat(open.len() + 1),
            id.index(),
            escape(&n.name),
            escape(&n.op.to_string()),
            n.shape
        );
    }
    while open.pop().is_some() {
        let _ = writeln!(out, "{}}}", "  ".repeat(open.len() + 1));
    }
    for id in g.nodes() {
        let ops = g.operands(id);
        let ordered = matches!(g.node(id).op, Op::ChannelMul);
        for (i, o) in ops.iter().enumerate() {
            if ordered {
                let _ = writeln!(out, "  n{} -> n{} [label=\"{i}\"];", o.index(), id.index());
            } else {
                let _ = writeln!(out, "  n{} -> n{};", o.index(), id.index());
            }
        }
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ir::*;

    #[test]
    fn clusters_and_edges() {
        let mut g = Graph::new("t");
        let x = g.input("input", Shape::chw(3, 8, 8)).unwrap();
        g.push_scope("blk");
        let a = g.add("blk.a", Op::Act(Activation::Relu), &[x]).unwrap();
        g.pop_scope();
        g.add("sum", Op::Add, &[a, x]).unwrap();
        let d = to_dot(&g);
        assert!(d.contains("subgraph cluster_0"), "{d}");
        assert!(d.contains("label=\"blk\""), "{d}");
        assert!(d.contains("n1 -> n2;") && d.contains("n0 -> n2;") && d.contains("n0 -> n1;"), "{d}");
        assert_eq!(d.matches('{').count(), d.matches('}').count());
    }
}
