//! The graph IR: shapes, the operator set, the graph itself, shape inference and the verifier.

mod dot;
mod graph;
mod infer;
mod op;
mod shape;
mod verify;

pub use dot::to_dot;
pub use graph::{Graph, Node, NodeId};
pub use infer::{infer, ShapeError};
pub use op::*;
pub use shape::Shape;
pub use verify::verify;
