//! The passes from a verified graph to an execution [`Plan`], in order:
//!
//! 1. `ir::verify` — the graph's invariants (debug builds, and always on entry).
//! 2. [`passes::fuse::fuse`] — cut the graph into fused groups by the fusion table.
//! 3. [`passes::concat_inplace::concat_inplace`] — place concatenation operands in slices.
//! 4. [`passes::bn_stats::bn_stats`] — training batch norms take their statistics from the
//!    convolution storing their input.
//! 5. [`passes::pool_fuse::pool_fuse`] — pooling layers run inside the groups writing their
//!    input, sample by sample.
//! 6. [`passes::layout::layout`] — the values stored as transposed planes (a `1 x 3`
//!    Winograd convolution's input and output between training batch norms).
//! 7. [`passes::memplan::memplan`] — buffer liveness; one arena in which values and
//!    gradients whose lifetimes do not overlap share memory.
//!
//! Batch-norm folding happens on parameters, not on the graph: a `Gemm -> BatchNorm` group in
//! inference mode tells the runtime to fold the running statistics into the weights.

use crate::error::Result;
use crate::ir::{verify, Graph};
use crate::passes;
use crate::plan::{Fusion, Mode, Plan};

/// Compile `g` into a plan for `mode` with `fusion`.
pub fn plan(g: &Graph, mode: Mode, fusion: Fusion) -> Result<Plan> {
    verify(g)?;
    let groups = passes::fuse::fuse(g, mode, fusion);
    let (placement, inplace_concats) = passes::concat_inplace::concat_inplace(g, &groups, fusion == Fusion::Full);
    let stats_from = passes::bn_stats::bn_stats(g, mode, fusion, &groups);
    let pool_into = passes::pool_fuse::pool_fuse(g, mode, fusion, &groups, &placement);
    let transposed = passes::layout::layout(g, mode, fusion, &groups, &placement, &pool_into);
    let memory = passes::memplan::memplan(g, mode, &groups, &placement, &inplace_concats, &pool_into);
    let plan = Plan { graph: g.clone(), mode, fusion, groups, placement, inplace_concats, stats_from, pool_into, transposed, memory };
    #[cfg(debug_assertions)]
    check(&plan);
    Ok(plan)
}

/// Debug-build invariant check of a plan (see `passes::fuse::fuse`'s "after" clause).
#[cfg(debug_assertions)]
fn check(p: &Plan) {
    let mut seen = std::collections::HashSet::new();
    let mut ready: std::collections::HashSet<_> = p.graph.inputs().into_iter().collect();
    for gr in &p.groups {
        for (i, &n) in gr.nodes.iter().enumerate() {
            assert!(seen.insert(n), "node {n} in two groups");
            if i > 0 {
                assert!(p.graph.operands(n).contains(&gr.nodes[i - 1]), "group chain broken at {n}");
            }
            for o in p.graph.operands(n) {
                assert!(gr.nodes.contains(&o) || ready.contains(&o), "operand {o} of {n} not ready");
            }
        }
        ready.insert(gr.output());
    }
    // `passes::layout`'s "after": a transposed value is a batch-norm group's output read by a
    // lone convolution alone, or that convolution's output, read by a batch norm alone.
    for n in p.graph.nodes().filter(|&n| p.is_transposed(n)) {
        let users = p.graph.users(n);
        assert_eq!(users.len(), 1, "transposed {n} has {} readers", users.len());
        let gr = p.group_of(n).expect("a transposed value is a group's output");
        match p.graph.node(n).op {
            crate::ir::Op::Conv2d(_) => {
                assert_eq!(gr.nodes.len(), 1, "transposed {n}: a convolution with a chain");
                assert!(p.is_transposed(p.graph.operands(n)[0]), "transposed {n}: its input is not");
                assert!(matches!(p.graph.node(users[0]).op, crate::ir::Op::BatchNorm(_)), "transposed {n}: read by no batch norm");
            }
            _ => {
                assert!(matches!(p.graph.node(gr.anchor()).op, crate::ir::Op::BatchNorm(_)), "transposed {n}: not a batch norm's output");
                assert!(p.is_transposed(users[0]), "transposed {n}: its convolution's output is not");
            }
        }
        assert_eq!(p.placement[n.index()], Some(crate::plan::Placement::Own), "transposed {n}: a slice");
    }
}
