//! The reference interpreter: plain, obviously-correct `ndarray` code for every [`Op`](cnnc_compiler::ir::Op), forward
//! and backward. It is the oracle every JIT kernel is tested against, so clarity beats speed.
//!
//! # Conventions
//!
//! - **Layout.** Image activations are NCHW [`ndarray::Array4`]s; flat activations are `[N, n]`
//!   [`ndarray::Array2`]s. At the graph level ([`interp`]) a node's value has exactly these
//!   dimensions (`C x H x W` -> 4-D, flat `n` -> 2-D).
//! - **llm.c style.** Every op is a pair `X_forward(outputs.., inputs.., attrs)` /
//!   `X_backward(d_inputs.., d_outputs.., inputs.., attrs)`: outputs come first, forward
//!   *overwrites* its outputs, backward *accumulates* (`+=`) into its `d_`-prefixed gradients,
//!   so a tensor with several users simply receives several contributions. Gradients that are
//!   not wanted are passed as `None`.
//! - **Scalars.** Every op is generic over [`Scalar`] (implemented for `f32` and `f64`), so the
//!   finite-difference gradient checks run in `f64`.
//! - **Errors.** Op functions check every dimension they rely on and return
//!   [`Error::Kernel`] (naming the op and the argument) instead of panicking; the graph
//!   interpreter re-labels errors with the layer name ([`Error::Layer`]).
//!
//! # Modules (one per op family)
//!
//! - [`conv`]: 2-D convolution (stride, asymmetric padding, dilation, groups, optional bias).
//! - [`dense`]: fully connected layers.
//! - [`norm`]: batch normalisation (training and evaluation mode) and local response norm.
//! - [`act`]: elementwise activations.
//! - [`pool`]: max / average / global average pooling.
//! - [`tensor_ops`]: dropout, flatten, concat, add, channel-wise multiply, softmax.
//! - [`loss`]: softmax cross-entropy and the multiclass hinge loss.
//! - [`interp`]: the graph-level interpreter (`forward`, `backward`, `loss_and_grad`).
//! - [`gradcheck`]: central finite differences and the relative error used by the tests.

use std::fmt::{Debug, Display};
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

pub mod act;
pub mod conv;
pub mod dense;
pub mod gradcheck;
pub mod interp;
pub mod loss;
pub mod norm;
pub mod pool;
pub mod tensor_ops;

pub use act::{act_backward, act_forward};
pub use conv::{conv2d_backward, conv2d_forward, conv2d_output_hw};
pub use dense::{dense_backward, dense_forward};
pub use interp::{
    backward, default_loss_weights, forward, forward_with_labels, loss_and_grad, loss_and_grad_weighted, ForwardState, Gradients, LossOutput, Mode,
    Saved, AUX_LOSS_WEIGHT,
};
pub use loss::{
    multiclass_hinge_backward, multiclass_hinge_forward, softmax_cross_entropy_backward,
    softmax_cross_entropy_forward,
};
pub use norm::{
    batchnorm_eval_backward, batchnorm_eval_forward, batchnorm_train_backward, batchnorm_train_forward,
    lrn_backward, lrn_forward,
};
pub use pool::{
    avgpool_backward, avgpool_forward, global_avgpool_backward, global_avgpool_forward, maxpool_backward,
    maxpool_forward, pool_output_hw,
};
pub use tensor_ops::{
    add_backward, add_forward, channel_mul_backward, channel_mul_forward, concat_backward, concat_forward,
    dropout_backward, dropout_forward, dropout_mask, flatten_backward, flatten_forward, softmax_backward,
    softmax_forward,
};



/// The floating-point types the reference ops run in: `f32` (what the JIT computes) and `f64`
/// (for gradient checks).
///
/// The conversion helpers have distinct names so they never clash with `num_traits`'
/// `Option`-returning `from_f32`/`to_f64`.
pub trait Scalar:
    num_traits::Float
    + ndarray::LinalgScalar
    + ndarray::ScalarOperand
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + Sum
    + Debug
    + Display
    + Default
    + Send
    + Sync
    + 'static
{
    /// A constant given in `f64` (rounded for `f32`).
    fn lit(v: f64) -> Self;
    /// An attribute or stored value given in `f32` (exact for both types).
    fn of_f32(v: f32) -> Self;
    /// A count (`1 / N` factors and the like).
    fn of_usize(n: usize) -> Self;
    /// The value as `f64` (exact for both types).
    fn as_f64(self) -> f64;
}

impl Scalar for f32 {
    fn lit(v: f64) -> Self {
        v as f32
    }
    fn of_f32(v: f32) -> Self {
        v
    }
    fn of_usize(n: usize) -> Self {
        n as f32
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl Scalar for f64 {
    fn lit(v: f64) -> Self {
        v
    }
    fn of_f32(v: f32) -> Self {
        v as f64
    }
    fn of_usize(n: usize) -> Self {
        n as f64
    }
    fn as_f64(self) -> f64 {
        self
    }
}

/// Why a reference computation could not run. Never a panic: bad shapes, missing parameters
/// and out-of-range labels all end up here.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// An op function was called with arguments that do not fit (dimension mismatch,
    /// unresolved padding, label out of range, ...).
    #[error("{op}: {message}")]
    Kernel {
        /// The op function (`conv2d`, `maxpool`, ...).
        op: &'static str,
        /// What does not fit.
        message: String,
    },
    /// A layer of a graph could not be evaluated; wraps the cause with the layer's name.
    #[error("layer `{layer}` ({op}): {message}")]
    Layer {
        /// The layer name.
        layer: String,
        /// The op kind (`conv2d`, ...).
        op: &'static str,
        /// What went wrong.
        message: String,
    },
    /// A graph-level problem not tied to one layer (wrong number of inputs or output gradients).
    #[error("graph `{graph}`: {message}")]
    Graph {
        /// The graph name.
        graph: String,
        /// What went wrong.
        message: String,
    },
}

/// Result alias for the reference interpreter.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An [`Error::Kernel`] for op `op`.
pub(crate) fn kerr<R>(op: &'static str, message: impl Into<String>) -> Result<R> {
    Err(Error::Kernel { op, message: message.into() })
}

/// Check that argument `what` of op `op` has dimensions `expected`.
pub(crate) fn check_dims(op: &'static str, what: &str, got: &[usize], expected: &[usize]) -> Result<()> {
    if got != expected {
        return kerr(op, format!("`{what}` has dimensions {got:?}, expected {expected:?}"));
    }
    Ok(())
}

/// The explicit `[top, bottom, left, right]` padding of a resolved conv/pool attribute, or an
/// error if the op was never resolved by adding it to a graph.
pub(crate) fn explicit_pads(op: &'static str, p: cnnc_compiler::ir::Padding) -> Result<[usize; 4]> {
    match p {
        cnnc_compiler::ir::Padding::Explicit { top, bottom, left, right } => Ok([top, bottom, left, right]),
        other => kerr(op, format!("padding `{other}` is not resolved; add the op to a Graph first")),
    }
}

