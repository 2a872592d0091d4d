//! The compiler's error type: every variant names the layer (node) it is about.

use crate::ir::Shape;
use std::fmt;

/// An error raised while building, checking or compiling a graph.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A layer's operands do not fit the op (shape inference failed).
    #[error("layer `{layer}` ({op}): {message}{}{}", InputsNote(inputs), HintNote(hint))]
    Shape {
        /// Layer name.
        layer: String,
        /// Op kind (`conv2d`, `add`, ...).
        op: &'static str,
        /// Operand shapes, in order.
        inputs: Vec<Shape>,
        /// What is wrong, in the user's terms.
        message: String,
        /// What would fit, where one can say.
        hint: Option<String>,
    },
    /// A layer got the wrong number of operands.
    #[error("layer `{layer}` ({op}) takes {expected} operand(s), got {got}")]
    Arity {
        /// Layer name.
        layer: String,
        /// Op kind.
        op: &'static str,
        /// What it takes, in words.
        expected: String,
        /// What it got.
        got: usize,
    },
    /// Two layers share a name.
    #[error("duplicate layer name `{0}`")]
    DuplicateName(String),
    /// A referenced layer does not exist.
    #[error("no layer named `{0}`")]
    UnknownLayer(String),
    /// A graph invariant does not hold (a bug in a pass, reported by the verifier).
    #[error("IR verifier: node {node} `{layer}`: {message}")]
    Verify {
        /// The node id as printed in IR text (`%3`).
        node: String,
        /// Layer name.
        layer: String,
        /// The invariant broken.
        message: String,
    },
    /// Code generation failed.
    #[error("codegen for `{layer}`: {message}")]
    Codegen {
        /// Layer (or kernel) name.
        layer: String,
        /// What failed.
        message: String,
    },
}

/// Result alias for the compiler.
pub type Result<T, E = Error> = std::result::Result<T, E>;

struct InputsNote<'a>(&'a [Shape]);
impl fmt::Display for InputsNote<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            [] => Ok(()),
            [one] => write!(f, " (input {one})"),
            many => {
                f.write_str(" (inputs ")?;
                for (i, s) in many.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{s}")?;
                }
                f.write_str(")")
            }
        }
    }
}

struct HintNote<'a>(&'a Option<String>);
impl fmt::Display for HintNote<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(h) => write!(f, "; {h}"),
            None => Ok(()),
        }
    }
}
