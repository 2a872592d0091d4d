//! cnnc: a code-generating compiler for convolutional networks.
//!
//! - [`compiler`]: the model language, the graph IR, the cost model, passes and JIT lowering.
//! - [`runtime`]: training and inference.
//! - [`cnn_model!`]: architectures written in Rust source, shapes checked at compile time.
//!
//! ```
//! cnnc::cnn_model! {
//!     /// LeNet-5 on 28x28 digits.
//!     pub model LeNet5(input: 1x28x28) {
//!         conv1: conv(6, 5x5, pad=2); relu; pool1: maxpool(2x2);
//!         conv2: conv(16, 5x5); relu; pool2: maxpool(2x2);
//!         flatten; fc1: dense(120); relu; fc2: dense(84); relu; fc3: dense(10);
//!     }
//! }
//! const _: () = assert!(LeNet5::PARAMS == 61_706);
//! assert_eq!(LeNet5::OUTPUT, cnnc::compiler::ir::Shape::flat(10));
//! assert_eq!(LeNet5::graph().len(), LeNet5::LAYERS);
//! ```
#![deny(missing_docs)]

// Lets `cnn_model!`'s output (which names `::cnnc`) be used inside this crate too.
extern crate self as cnnc;

pub use cnnc_compiler as compiler;
/// Examples, compiled and run as this crate's doctests (the macro crate cannot use its own
/// macro in its doctests):
///
/// ```
/// cnnc::cnn_model! {
///     /// A small inception-style network for 32x32 images.
///     pub model MiniInception(input: 3x32x32) {
///         conv1: conv(32, 3x3, pad=1); bn; relu;
///         concat {
///             { conv(16, 1x1); relu; }
///             { conv(24, 3x3, pad=1); relu; }
///         }
///         gap; flatten;
///         fc: dense(10);
///     }
/// }
/// const _: () = assert!(MiniInception::PARAMS < 2_000_000);
/// assert_eq!(MiniInception::OUTPUT, cnnc::compiler::ir::Shape::flat(10));
/// ```
///
/// From a `.cnn` file (relative to the crate's directory):
///
/// ```
/// cnnc::cnn_model!(pub file = "examples/models/lenet5.cnn");
/// // 1x28x28 without padding: 156 + 2,416 + 30,840 + 10,164 + 850 parameters.
/// assert_eq!(LeNet5::PARAMS, 44_426);
/// ```
pub use cnnc_macros::cnn_model;
pub use cnnc_runtime as runtime;

/// Support for the code `cnn_model!` generates. Not a public API.
#[doc(hidden)]
pub mod __private {
    use crate::compiler::ir::Graph;
    use crate::compiler::lang;

    /// Rebuild model `model` from `source`, the program text `cnn_model!` already parsed,
    /// checked and expanded successfully while compiling the caller.
    pub fn graph(source: &str, model: &str) -> Graph {
        match lang::parse_source("<cnn_model!>", source).and_then(|p| p.expand(model)) {
            Ok(g) => g,
            // Unreachable: the same compiler accepted the same text during macro expansion.
            Err(e) => panic!("cnnc bug: model `{model}` passed `cnn_model!` but does not rebuild:\n{e}"),
        }
    }
}
