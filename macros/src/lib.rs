//! `cnn_model!`: network architectures written in the cnnc model language inside Rust source,
//! with every shape checked while the macro expands.
//!
//! Use it through the facade crate, `cnnc::cnn_model!`; the generated code names items by the
//! path `::cnnc`. The pipeline, one module per step (as in `serde_derive`):
//!
//! - `input`: the invocation: inline items (`pub model ...`, `block ...`) or `file = "..."`;
//!   peels off the Rust visibility the language itself does not have.
//! - `check`: hands the program to `cnnc_compiler::lang`, expands every model into a graph
//!   and computes what the generated constants hold (shapes, parameters, MACs).
//! - `expand`: the generated Rust items.
//! - `ctxt`: collects spanned errors so several independent ones are reported together.
//! - `source`: the invocation's text with its original layout, for `source()`.

#![deny(missing_docs)]

mod check;
mod ctxt;
mod expand;
mod input;
mod source;

use proc_macro::TokenStream;

/// Declare networks in the cnnc model language; shapes are checked during expansion.
/// (The examples are compiled and run as doctests of the `cnnc` facade, which re-exports this
/// macro: a procedural-macro crate cannot use its own macros in its doctests.)
///
/// ```text
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
/// ```
///
/// or, from a `.cnn` file: a relative path is resolved against the crate's directory
/// (`CARGO_MANIFEST_DIR`), then, like `include_str!`, against the directory of the file holding
/// the invocation. Edits to the file recompile the crate; errors in it are printed with the
/// file's line, column and source line, at the path literal:
///
/// ```text
/// cnnc::cnn_model!(pub file = "models/lenet5.cnn");
/// ```
///
/// Each `model` becomes a unit struct (carrying its doc comments) with the constants
/// `NAME`, `INPUT`, `OUTPUT`, `OUTPUTS`, `PARAMS`, `MACS`, `LAYERS` and the functions
/// `source()`, `graph()` and `report(batch)`. Items without `pub`/`pub(crate)`/... are private,
/// as in Rust. Blocks generate nothing.
///
/// Every error is reported at the offending token, and independent errors are reported
/// together.
#[proc_macro]
pub fn cnn_model(input: TokenStream) -> TokenStream {
    expand::cnn_model(input.into()).into()
}
