//! cnnc's compiler: the data flow is **source -> graph -> passes -> kernels**.
//!
//! - [`lang`]: the model language (one grammar for `.cnn` files and the `cnn_model!` macro),
//!   parsed with `syn` and expanded into a [`ir::Graph`].
//! - [`ir`]: the graph IR, shape inference and the verifier.
//! - [`cost`]: the architecture cost report (parameters, MACs, FLOPs, memory, receptive field).
//! - [`algo`]: algorithm choices that follow from a layer's geometry (shared by passes and
//!   lowering).
//! - [`passes`] and [`pipeline`]: graph-to-plan passes, one per file, in order.
//! - `lower` (feature `jit`): Cranelift code generation for the planned kernels.
#![deny(missing_docs)]

pub mod algo;
pub mod cost;
pub mod error;
pub mod ir;
pub mod lang;
pub mod passes;
pub mod pipeline;
pub mod plan;
#[cfg(feature = "jit")]
pub mod lower;

pub use error::{Error, Result};
